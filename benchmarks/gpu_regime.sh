#!/usr/bin/env bash
# The pretrained-regime comparison (issue 21) at a larger scale, for a GPU lent for minutes; never needed by CI.
#
#   bash benchmarks/gpu_regime.sh --prepare   # here, once: copy the cached pretrained body into ./.cache (ignored)
#   bash benchmarks/gpu_regime.sh --check     # here, on CPU: the script, its flags and the cache, without training
#   bash benchmarks/gpu_regime.sh             # on the GPU machine (carry .cache): results and commands in $OUT
#
# FCOS and Faster R-CNN, seeds 0-2, baseline and LGD at equal iterations, 3,000 iterations (twice the CPU
# schedule, every window scaled with it), six runs side by side on the one GPU. The target dataset is rebuilt
# there from its seed (deterministic, ~1 min); the pretrained body travels, as pretraining would not be the same
# on another machine's kernels. Everything stops at 7.5 minutes; finished runs' result.json files are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
export LGD_CACHE="$PWD/.cache"
mode="${1:-run}"
if [[ "$mode" == "--prepare" ]]; then
    src="${HOME}/.cache/lgd/regime"
    mkdir -p .cache/regime
    cp "$src"/resnet18-pretrain-*.pth "$src"/resnet18-pretrain-*.json .cache/regime/
    ls -la .cache/regime
    exit 0
fi
body=$(ls .cache/regime/resnet18-pretrain-*.pth 2>/dev/null | head -1 || true)
[[ -n "$body" ]] || { echo "no pretrained body in .cache/regime: run 'bash $0 --prepare' first" >&2; exit 2; }
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
iters=3000
args=(--regime pretrained --arch fcos fasterrcnn --seeds 0 1 2 --no-equal-time --parallel 6 --out "$OUT/regime"
      "solver.max_iter=$iters" "solver.steps=[2000,2667]" solver.warmup_iters=200 lgd.pre_distill_iters=500
      lgd.freeze_backbone_iters=333 eval_period=300 data.workers=2 device=cuda)
if [[ "$mode" == "--check" ]]; then
    bash -n "$0"
    python benchmarks/accuracy.py --help > /dev/null
    python -c "import torch, torchvision, pycocotools; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    echo "body: $body"
    echo "would run: python benchmarks/accuracy.py ${args[*]}"
    exit 0
fi
python -c "import pycocotools" 2>/dev/null || pip install --no-index --find-links .whl pycocotools
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "python benchmarks/accuracy.py ${args[*]}" > "$OUT/commands.txt"
timeout 450 python benchmarks/accuracy.py "${args[@]}" > "$OUT/accuracy.log" 2>&1 || echo "stopped: exit $?" >> "$OUT/accuracy.log"
tail -5 "$OUT/accuracy.log"
