"""Why a shared head's box-regression branch dies: per-iteration measurements of the first iterations of a run.

For each iteration it records, as one JSON line in ``--out``:
- every loss term (student, ``teacher/...``, ``loss_distill``);
- the scale (RMS) of the student's FPN features and of the teacher's maps, per level, as they enter the head;
- the fraction of the box-regression outputs above zero (torchvision's FCOS applies a ReLU to them, so a branch
  whose outputs are all <= 0 predicts zero-size boxes: GIoU loss 1.0, and no gradient reaches it), per pass;
- the gradient norm, largest element and signed bias-gradient sum of each loss group (student detection, teacher detection, distillation)
  at the head's box-regression layer, before clipping.

    python benchmarks/head_probe.py -c configs/synthetic_fcos_lgd.yaml --iters 300 --out probe.jsonl [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgd.config import load_config  # noqa: E402
from lgd.data import build_train_loader  # noqa: E402
from lgd.data.build import build_dataset, to_device  # noqa: E402
from lgd.engine.solver import build_optimization, linear_lr_scale  # noqa: E402
from lgd.methods.build import build_model  # noqa: E402
from lgd.utils.env import seed_everything  # noqa: E402


def _rms(levels) -> list[float]:
    return [float(x.detach().pow(2).mean().sqrt()) for x in levels]


def loss_groups(losses: dict) -> dict:
    """An LGD step's losses summed by what they train from: the student's detection terms, the teacher's
    (``teacher/...``) and the distillation (``loss_distill``); a baseline's groups other than the student's are 0
    and None."""
    return {
        "student": sum(v for k, v in losses.items() if not k.startswith("teacher/") and k != "loss_distill"),
        "teacher": sum(v for k, v in losses.items() if k.startswith("teacher/")),
        "distill": losses.get("loss_distill"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    dataset = build_dataset(cfg, "train", train=True)
    model = build_model(cfg, dataset.num_classes).train()
    opt = build_optimization(model.optimizer_groups(), cfg.solver,
                             linear_lr_scale(cfg.data.batch_size, cfg.solver.reference_batch_size))
    student = model.student
    bbox_reg = student.head.regression_head.bbox_reg
    seen: dict[str, list] = {"fpn": [], "alive": []}
    student.backbone.register_forward_hook(lambda m, a, out: seen["fpn"].append(list(out.values())))
    bbox_reg.register_forward_hook(lambda m, a, out: seen["alive"].append(float((out > 0).float().mean())))
    teacher_maps: list = []
    if cfg.lgd.enabled:
        model.teacher.register_forward_hook(lambda m, a, out: teacher_maps.append(out.features))
    params = list(bbox_reg.parameters())
    loader = iter(build_train_loader(dataset, cfg.data.batch_size, cfg.seed, 0, cfg.data.aspect_ratio_grouping))
    with args.out.open("w") as f:
        for it in range(args.iters):
            seen["fpn"].clear(), seen["alive"].clear(), teacher_maps.clear()
            images, targets = to_device(*next(loader), torch.device("cpu"))
            model.set_iteration(it)
            losses = model(images, targets)
            groups = loss_groups(losses)
            grads = {}
            for name, value in groups.items():
                if not torch.is_tensor(value):  # a baseline has no teacher or distillation terms
                    continue
                g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                flat = torch.cat([x.flatten() for x in g if x is not None]) if any(x is not None for x in g) else None
                bias = g[-1]  # the layer's bias: the signed sum says which way the group pushes every output
                grads[name] = ([0.0, 0.0, 0.0] if flat is None
                               else [float(flat.norm()), float(flat.abs().max()), float(bias.sum())])
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            record = {
                "iter": it, "losses": {k: float(v.detach()) for k, v in losses.items()},
                "fpn_rms": _rms(seen["fpn"][0]), "teacher_rms": _rms(teacher_maps[0]) if teacher_maps else None,
                "reg_alive": seen["alive"], "reg_grad": grads,
                "reg_bias_mean": float(bbox_reg.bias.detach().mean()), "lr": opt.lrs()[0],
            }
            f.write(json.dumps(record) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
