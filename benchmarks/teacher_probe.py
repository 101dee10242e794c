"""Why a teacher trails its student: measurements of a trained LGD run at its saved checkpoints (issue 13).

For each checkpoint it runs the same ``--batches`` training batches (no optimizer step) and writes one JSON line:
- **attention** of the relation adapter (``student_guided``: each object's appearance queries the objects' label
  embeddings), per FPN level, averaged over heads and over the real objects of images with at least two objects
  (context box included as a key, never as a query): the weight on the object's own label (``own``) against chance
  (1 / the number of keys), the weight on labels of its own class (``same_class``) against chance, the share of
  objects whose largest weight is their own label (``argmax_own``), and the entropy divided by its maximum
  log(keys) (``entropy``: 1 = uniform, the labels are mixed without regard to which object is which);
- the **distillation loss per level**: the mean squared error between the instance-normalised adapted student
  map and the teacher map (``lgd.methods.lgd.distillation_loss`` on one level), before ``lgd.distill_weight``;
- the **transfer**: the same distance inside the ground-truth objects and outside them (how far the student's
  adapted features are from the teacher's where the teacher knows something, and where it paints only the
  background), and the detection loss of the shared head on the teacher's maps minus on the student's
  (``head_gain``: positive = the head scores better on what the teacher gives, so it has something to pass on);
- **gradient norms per loss group** (student detection, teacher detection, distillation, each as weighted in
  training): at the shared head's parameters, and at the student's FPN maps (what the body and FPN learn from);
- the attention's query, key and value projections: their norms, how far training moved each from its initial
  weights (rebuilt from the run's seed, as training builds them), and the gradient norm the teacher's detection
  loss gives each (the only loss that trains them);
- every loss term.

It prints a markdown table of the means (attention averaged over levels) when done.

    python benchmarks/teacher_probe.py -c RUN/config.yaml --checkpoints RUN/model_0000900.pth RUN/model_final.pth \\
        --out probe.jsonl [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgd.config import load_config  # noqa: E402
from lgd.data import build_train_loader  # noqa: E402
from lgd.data.build import build_dataset, to_device  # noqa: E402
from lgd.engine.checkpoint import load_checkpoint, load_model_weights  # noqa: E402
from lgd.methods.build import build_model  # noqa: E402
from lgd.methods.lgd import distillation_loss  # noqa: E402
from lgd.teacher.descriptors import pad_objects  # noqa: E402
from lgd.utils.env import seed_everything  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_probe import loss_groups  # noqa: E402


def attention_stats(weights: Tensor, classes: Tensor, valid: Tensor, is_context: Tensor) -> dict[str, float]:
    """Where objects look, for one level.

    Args:
        weights: (B, N, N) attention weights (queries x keys), averaged over heads; padded keys carry weight 0.
        classes: (B, N) class ids, -1 for the context box and padding.
        valid: (B, N) bool, real objects and the context box.
        is_context: (B, N) bool.

    Returns:
        means over the queries counted (real objects of images with >= 2 keys) of ``own``, ``own_chance``,
        ``same_class``, ``same_class_chance``, ``argmax_own``, ``entropy`` (0-1), and their number ``objects``.
    """
    sums = dict.fromkeys(("own", "own_chance", "same_class", "same_class_chance", "argmax_own", "entropy"), 0.0)
    count = 0
    for b in range(weights.shape[0]):
        keys = valid[b]
        n_keys = int(keys.sum())
        if n_keys < 2:
            continue
        for n in torch.nonzero(valid[b] & ~is_context[b]).flatten().tolist():
            w = weights[b, n]
            same = keys & (classes[b] == classes[b, n])
            sums["own"] += float(w[n])
            sums["own_chance"] += 1.0 / n_keys
            sums["same_class"] += float(w[same].sum())
            sums["same_class_chance"] += float(same.sum()) / n_keys
            sums["argmax_own"] += float(int(w.argmax()) == n)
            p = w[keys].clamp_min(1e-12)
            sums["entropy"] += float(-(p * p.log()).sum()) / math.log(n_keys)
            count += 1
    return {**{k: v / max(count, 1) for k, v in sums.items()}, "objects": count}


def _head(student: torch.nn.Module) -> torch.nn.Module:
    """The head the student and the teacher share: one-stage detectors' ``head``, the R-CNNs' RPN and ROI heads."""
    if hasattr(student, "head"):
        return student.head
    return torch.nn.ModuleList([student.rpn, student.roi_heads])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _norm(grads) -> float:
    parts = [g.flatten() for g in grads if g is not None]
    return float(torch.cat(parts).norm()) if parts else 0.0


def probe(cfg, checkpoint: Path, batches: list) -> dict:
    """The measurements of one checkpoint over ``batches`` (lists of (images, targets)); see the module docstring."""
    ckpt = load_checkpoint(checkpoint)
    seed_everything(cfg.seed)  # as training does right before it builds the model: the same initial weights
    model = build_model(cfg, len(ckpt["categories"]["ids"]))
    teacher = model.teacher
    attention = teacher.relation.attention  # None for the patterns without attention
    initial = [w.detach().clone() for w in attention.in_proj_weight.chunk(3)] if attention is not None else None
    load_model_weights(model, ckpt)
    model.train()
    model.set_iteration(int(ckpt["iteration"]))
    captured: dict[str, list] = {"attention": [], "teacher_in": [], "fpn": []}

    def on_attention(module, args, kwargs, output):
        with torch.no_grad():  # the same call again, with the weights; .forward skips this hook
            _, w = module.forward(*args, key_padding_mask=kwargs.get("key_padding_mask"), need_weights=True,
                                  average_attn_weights=True)
        captured["attention"].append(w)

    hooks = [attention.register_forward_hook(on_attention, with_kwargs=True) if attention is not None else None,
             teacher.register_forward_hook(lambda m, a, out: captured["teacher_in"].append((a, out))),
             model.student.backbone.register_forward_hook(lambda m, a, out: captured["fpn"].append(list(out.values())))]
    head_params = [p for p in _head(model.student).parameters() if p.requires_grad]
    levels: list[list[dict]] = []
    distill_levels: list[list[float]] = []
    inside_levels: list[list[float]] = []
    outside_levels: list[list[float]] = []
    grads: dict[str, dict[str, list[float]]] = {"head": {}, "fpn": {}}
    losses_seen: dict[str, list[float]] = {}
    projection_grads: dict[str, list[float]] = {}
    losses_by_group: dict[str, list[float]] = {}
    for images, targets in batches:
        for values in captured.values():
            values.clear()
        losses = model(images, targets)
        for k, v in losses.items():
            losses_seen.setdefault(k, []).append(float(v.detach()))
        (features, boxes, classes, size, _masks), out = captured["teacher_in"][0]
        objects = pad_objects(boxes, classes, size, teacher.context_box)
        if captured["attention"]:
            levels.append([attention_stats(w, objects.classes, objects.valid, objects.is_context)
                           for w in captured["attention"]])
        index = out.has_objects.nonzero().flatten()
        with torch.no_grad():
            pairs = list(zip(captured["fpn"][0], out.features, out.object_pixels))
            distill_levels.append([float(distillation_loss([model.adapter(s[index])], [t[index]])) for s, t, _ in pairs])
            inside_levels.append([float(distillation_loss([model.adapter(s[index])], [t[index]], [m[index]]))
                                  for s, t, m in pairs])
            outside_levels.append([float(distillation_loss([model.adapter(s[index])], [t[index]], [~m[index]]))
                                   for s, t, m in pairs])
        groups = loss_groups(losses)
        for name in ("student", "teacher"):
            losses_by_group.setdefault(name, []).append(float(groups[name].detach()))
        if attention is not None:  # only the teacher's own loss trains the attention
            (g,) = torch.autograd.grad(groups["teacher"], attention.in_proj_weight, retain_graph=True)
            for part, block in zip("qkv", g.chunk(3)):
                projection_grads.setdefault(part, []).append(float(block.norm()))
        for name, value in groups.items():
            g_head = torch.autograd.grad(value, head_params, retain_graph=True, allow_unused=True)
            g_fpn = torch.autograd.grad(value, captured["fpn"][0], retain_graph=True, allow_unused=True)
            grads["head"].setdefault(name, []).append(_norm(g_head))
            grads["fpn"].setdefault(name, []).append(_norm(g_fpn))
    for hook in hooks:
        if hook is not None:
            hook.remove()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    record = {
        "checkpoint": str(checkpoint), "iteration": int(ckpt["iteration"]),
        "losses": {k: mean(v) for k, v in losses_seen.items()},
        "distill_per_level": [mean(col) for col in zip(*distill_levels)],
        "transfer": {
            "distill_inside_per_level": [mean(col) for col in zip(*inside_levels)],
            "distill_outside_per_level": [mean(col) for col in zip(*outside_levels)],
            "head_gain": mean([float(groups_student - groups_teacher) for groups_student, groups_teacher in zip(
                losses_by_group["student"], losses_by_group["teacher"])]),
        },
        "grad_norm": {where: {k: mean(v) for k, v in per.items()} for where, per in grads.items()},
    }
    if attention is not None:
        # xavier_uniform_ starts each C x C block of in_proj_weight at a Frobenius norm of about sqrt(C / 2)
        weights = attention.in_proj_weight.detach().chunk(3)
        record["attention_projections"] = {
            "init_norm": math.sqrt(teacher.channels / 2),
            **{f"{part}_norm": float(w.norm()) for part, w in zip("qkv", weights)},
            # how far training moved each block from the weights it started at, relative to them
            **{f"{part}_moved": float((w - w0).norm() / w0.norm()) for part, w, w0 in zip("qkv", weights, initial)},
            **{f"{part}_grad": mean(v) for part, v in projection_grads.items()},
        }
    if levels:
        per_level = []
        for col in zip(*levels):
            total = sum(c["objects"] for c in col)
            per_level.append({k: sum(c[k] * c["objects"] for c in col) / max(total, 1)
                              for k in col[0] if k != "objects"} | {"objects": total})
        record["attention"] = per_level
    return record


def markdown(records: list[dict]) -> str:
    """One table row per checkpoint: attention (mean over levels), distillation loss per level, gradient norms."""
    lines = ["| iteration | own label / chance | same class / chance | entropy (0-1) | largest weight on own label "
             "| distillation loss per level | inside / outside objects (mean over levels) | head gain on teacher maps "
             "| head grad: student / teacher | FPN grad: student / teacher / distill |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        att = r.get("attention")
        mean = (lambda k: sum(level[k] for level in att) / len(att)) if att else None
        cells = ([f"{mean('own'):.3f} / {mean('own_chance'):.3f}", f"{mean('same_class'):.3f} / "
                  f"{mean('same_class_chance'):.3f}", f"{mean('entropy'):.4f}", f"{mean('argmax_own'):.2f}"]
                 if att else ["n/a"] * 4)
        head, fpn = r["grad_norm"]["head"], r["grad_norm"]["fpn"]
        lines.append(f"| {r['iteration']} | " + " | ".join(cells)
                     + f" | {' / '.join(f'{v:.3f}' for v in r['distill_per_level'])}"
                     + f" | {_mean(r['transfer']['distill_inside_per_level']):.3f} / "
                       f"{_mean(r['transfer']['distill_outside_per_level']):.3f} | {r['transfer']['head_gain']:+.3f}"
                     + f" | {head['student']:.3f} / {head['teacher']:.3f}"
                     + f" | {fpn['student']:.4f} / {fpn['teacher']:.4f} / {fpn['distill']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="the run's config.yaml")
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    parser.add_argument("--batches", type=int, default=8, help="training batches per checkpoint (the same ones)")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per checkpoint (a table is printed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.lgd.enabled:
        parser.error(f"{args.config} is not an LGD run (lgd.enabled is false)")
    seed_everything(cfg.seed)
    dataset = build_dataset(cfg, "train", train=True)
    loader = iter(build_train_loader(dataset, cfg.data.batch_size, cfg.seed, 0, cfg.data.aspect_ratio_grouping))
    batches = [to_device(*next(loader), torch.device("cpu")) for _ in range(args.batches)]
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for path in args.checkpoints:
            record = probe(cfg, path, batches)
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
    print(markdown(records), flush=True)
    return records


if __name__ == "__main__":
    main()
