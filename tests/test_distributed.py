"""Scale-out: torchrun data parallelism, gradient accumulation and mixed precision give one process's results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgd.config import save_config
from lgd.data.loader import ShardedBatchSampler, TrainBatchSampler
from lgd.engine.checkpoint import FINAL, load_checkpoint
from lgd.engine.training import _check_runtime, train
from lgd.errors import ConfigError
from lgd.utils import distributed
from lgd.utils.distributed import Context

REPO = Path(__file__).parent.parent
# GroupNorm everywhere: batch statistics would differ between one batch of 4 and two of 2 by design.
GN = ("model.norm=gn", "model.head_norm=gn")


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_each_rank_takes_its_share_of_the_single_process_batches():
    ratios = [1.0, 0.5, 2.0, 1.0, 0.7, 1.3, 1.0, 0.8, 1.0, 1.0]
    stream = lambda: TrainBatchSampler(ratios, batch_size=4, seed=3, start_iter=1)  # noqa: E731
    shares = [ShardedBatchSampler(stream(), 4, rank, 2) for rank in (0, 1)]
    for whole, first, second, _ in zip(stream(), *shares, range(6)):
        assert first + second == whole and len(first) == 2
    with pytest.raises(ConfigError, match="data.batch_size=6 .* must split evenly into 2 processes x "
                                          "solver.accumulate=2 micro-batches; use a multiple of 4"):
        distributed.per_rank_batch(6, 2, accumulate=2)


# How far float rounding alone moves the weights when the same gradients are summed in another order. The
# reference's element-wise clipping leaves the steps at full size (norm clipping scaled them down 10-30 times),
# so differences of ~1e-7 in a gradient grow to ~7e-5 after four steps; a lost or doubled micro-batch moves
# weights by the step itself, lr x gradient, which is orders of magnitude more (see the test below this one).
ROUNDING = 2e-4


def test_two_torchrun_processes_match_one_process(tiny_config, tmp_path):
    """Same global batch of 4: one process, or two gloo processes each accumulating two micro-batches of one
    image. Also runs LGD's frozen-backbone window (parameters without gradient under DDP)."""
    common = GN + ("data.batch_size=4", "lgd.freeze_backbone_iters=2", "model.score_thresh=0.0",
                   "model.detections_per_img=5")
    single = tiny_config(f"output_dir={tmp_path / 'one'}", *common)
    train(single, progress=False)

    config = tmp_path / "two.yaml"
    save_config(tiny_config(f"output_dir={tmp_path / 'two'}", "solver.accumulate=2", *common), config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lgd", "train", "-c", str(config), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("bbox AP") == 1  # only rank 0 reports

    one, two = tmp_path / "one", tmp_path / "two"
    assert _max_difference(load_checkpoint(one / FINAL)["model"], load_checkpoint(two / FINAL)["model"]) < ROUNDING
    # Losses logged by rank 0 are the mean over both ranks: the single process's loss over the same 4 images.
    records_one, records_two = _train_records(one), _train_records(two)
    assert [r["iter"] for r in records_two] == [1, 2, 3, 4]  # one writer: no duplicated records
    for a, b in zip(records_one, records_two):
        assert b["losses"].keys() == a["losses"].keys()
        for k in a["losses"]:
            assert b["losses"][k] == pytest.approx(a["losses"][k], rel=1e-5), (a["iter"], k)
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=1e-5)
    # Evaluation: each rank detected its half of the val images, rank 0 gathered them all.
    dets_one = json.loads((one / "detections_val.json").read_text())
    dets_two = json.loads((two / "detections_val.json").read_text())
    assert {d["image_id"] for d in dets_two} == {d["image_id"] for d in dets_one}
    assert len(dets_two) == len(dets_one) == 6 * 5
    assert len(list((two / "tensorboard").iterdir())) == 1


def test_gradient_accumulation_gives_the_full_batch_step(tiny_config, tmp_path):
    runs = {}
    for name, overrides in (("whole", ()), ("accumulated", ("solver.accumulate=2",)), ("half", ("data.batch_size=1",))):
        cfg = tiny_config(f"output_dir={tmp_path / name}", "solver.max_iter=2", *GN, *overrides)
        train(cfg, progress=False)
        runs[name] = load_checkpoint(Path(cfg.output_dir) / FINAL)["model"]
    assert _max_difference(runs["whole"], runs["accumulated"]) < ROUNDING
    # The tolerance still sees a real error: training on half of each batch lands far outside it.
    assert _max_difference(runs["whole"], runs["half"]) > 10 * ROUNDING


def test_bf16_autocast_on_cpu_keeps_the_lgd_losses_finite_and_close(tiny_config, tmp_path):
    # 128 px, not 64: torch's oneDNN bf16 convolution backward can return garbage weight gradients for a
    # stride-2 convolution on a 1x1 map (FPN's P7 from a 1x1 P6, i.e. images of 64 px or less).
    losses = {}
    for amp in ("none", "bf16"):
        cfg = tiny_config(f"output_dir={tmp_path / amp}", f"solver.amp={amp}", "solver.max_iter=2",
                          "model.min_size=[128]", "model.max_size=128", *GN)
        train(cfg, progress=False)
        losses[amp] = [r["losses"] for r in _train_records(Path(cfg.output_dir))]
    for fp32, bf16 in zip(losses["none"], losses["bf16"]):
        assert bf16.keys() == fp32.keys() and "loss_distill" in bf16
        for k in fp32:
            assert torch.isfinite(torch.tensor(bf16[k]))
            assert bf16[k] == pytest.approx(fp32[k], rel=0.05), k


def test_settings_this_machine_cannot_run_are_refused_before_training(tiny_config):
    with pytest.raises(ConfigError, match="solver.amp=fp16 needs CUDA"):
        _check_runtime(tiny_config("solver.amp=fp16"), Context(device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="model.sync_bn needs CUDA"):
        _check_runtime(tiny_config("model.sync_bn=true"), Context(world_size=2, device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="use a multiple of 4"):
        _check_runtime(tiny_config("data.batch_size=2"), Context(world_size=4, device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="solver.accumulate must be a positive divisor"):
        tiny_config("solver.accumulate=3")
