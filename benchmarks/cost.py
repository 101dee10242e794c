"""Training cost of LGD against the plain detector, measured side by side in one process.

    python benchmarks/cost.py                  # the full benchmark (about 10 minutes on 2 CPU cores)
    python benchmarks/cost.py --quick          # tiny sizes, seconds (the test suite runs this)

Reports, as medians of interleaved repetitions:
  * training step time and peak memory, LGD / baseline, for RetinaNet R-50-FPN at 512x512, batch 2,
    80 classes, 10 objects per image (the issue's anchor setting), for FCOS X-101-32x8d-DCNv2 and Swin-T
    Mask R-CNN at 256x256, batch 1, and for the accuracy benchmark's config;
  * the teacher's share of the LGD step (its forward and backward alone);
  * inference time of the exported student against the plain torchvision model (and identical parameters);
  * teacher time as objects per image (1, 10, 100, 300) and image size grow, with a plot.
Writes a JSON with every number and a Markdown table (benchmarks/results/cost.{json,md}).
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from lgd.config import LGDConfig, ModelConfig, SolverConfig, load_config
from lgd.detectors import VIEWS, build_detector, set_test_size
from lgd.engine.solver import build_optimization
from lgd.engine.step import Stepper
from lgd.methods.lgd import LGD
from lgd.methods.trainable import Baseline
from lgd.utils.distributed import Context
from lgd.utils.files import to_json

RESULTS = Path(__file__).parent / "results"
REFERENCE_BACKBONES = [
    ("FCOS X-101-32x8d-DCNv2-FPN", "fcos", {"backbone": "resnext101_32x8d", "deform_stages": [False, True, True, True]}),
    ("Mask R-CNN Swin-T-FPN (mask-guided)", "maskrcnn", {"backbone": "swin_t"}),
]


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_probe(model_cfg: ModelConfig, num_classes: int, lgd: bool, lgd_cfg: LGDConfig, batch, queue) -> None:
    runtime = _status_mib("VmRSS")
    stepper = training_stepper(model_cfg, num_classes, lgd, lgd_cfg)
    for _ in range(2):
        stepper(*batch, stop_requested=False)
    queue.put(_status_mib("VmHWM") - runtime)


def training_peak_mib(model_cfg: ModelConfig, num_classes: int, lgd: bool, lgd_cfg: LGDConfig, batch) -> float:
    """Peak resident memory of a fresh process that builds the model and trains two steps, less what the
    process held before building it (the Python and torch runtime).

    A fresh process per measurement: the CPU allocator keeps freed memory, so peaks inside one process
    that already ran the other model would be meaningless. In it, glibc serves every block of 64 KiB or
    more with its own mapping, returned on free, so the peak follows the tensors alive at once instead
    of heap fragments the allocator happens to keep (runs agree to 1 MiB rather than +-50 MiB)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_probe, args=(model_cfg, num_classes, lgd, lgd_cfg, batch, queue))
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    peak = queue.get()
    proc.join()
    return peak


def make_batch(arch: str, num_images: int, size: int, objects: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    view = VIEWS[arch]
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.rand(3, size, size, generator=g))
        xy = torch.rand(objects, 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(objects, 2, generator=g) * size * 0.25
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        target = {"boxes": boxes, "labels": torch.randint(0, num_classes, (objects,), generator=g) + view.label_offset}
        if view.has_masks:  # box-shaped instance masks
            target["masks"] = torch.zeros(objects, size, size, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                target["masks"][i, y1:y2 + 1, x1:x2 + 1] = 1
        targets.append(target)
    return images, targets


def training_stepper(model_cfg: ModelConfig, num_classes: int, lgd: bool, lgd_cfg: LGDConfig) -> Stepper:
    """lgd's own training step (``Stepper``: forward, the finiteness check, backward, clipping, every optimiser) of
    a plain or LGD model on the CPU, with the optimisers the model asks for (``optimizer_groups``) at lr 0.001."""
    torch.manual_seed(0)
    detector = build_detector(model_cfg, num_classes)
    model = LGD(detector, num_classes, lgd_cfg, max_iter=10**9) if lgd else Baseline(detector)
    model.train()
    solver = SolverConfig(base_lr=0.001)
    return Stepper(model, build_optimization(model.optimizer_groups(), solver), Context(), solver)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_ratio(model_cfg: ModelConfig, num_classes: int, lgd_cfg: LGDConfig, batch, repeats: int) -> dict:
    """Baseline and LGD steps interleaved (B, L, B, L, ...) after one warm-up each; medians and peak memory."""
    steppers = {"baseline": training_stepper(model_cfg, num_classes, False, lgd_cfg),
                "lgd": training_stepper(model_cfg, num_classes, True, lgd_cfg)}
    times: dict[str, list[float]] = {"baseline": [], "lgd": []}
    for stepper in steppers.values():
        stepper(*batch, stop_requested=False)
    for _ in range(repeats):
        for name, stepper in steppers.items():
            times[name].append(timed(lambda: stepper(*batch, stop_requested=False)))
    t_b, t_l = statistics.median(times["baseline"]), statistics.median(times["lgd"])
    m_b = training_peak_mib(model_cfg, num_classes, False, lgd_cfg, batch)
    m_l = training_peak_mib(model_cfg, num_classes, True, lgd_cfg, batch)
    teacher = teacher_share(steppers["lgd"].net, batch, repeats)
    return {
        "baseline_step_s": t_b, "lgd_step_s": t_l, "step_ratio": t_l / t_b,
        "baseline_peak_mib": m_b, "lgd_peak_mib": m_l, "memory_ratio": m_l / m_b,
        "teacher_fwd_bwd_s": teacher, "teacher_share": teacher / t_l,
        "all_times": times,
    }


def teacher_share(model: LGD, batch, repeats: int) -> float:
    """Median time of the teacher's own forward and backward on this batch (student features precomputed)."""
    images, targets = batch
    with torch.no_grad():
        image_list, t = model.view.preprocess(images, [dict(x) for x in targets])
        features = model.view.features(image_list)
    features = {k: v.requires_grad_() for k, v in features.items()}

    def run() -> None:
        out = model.teach(image_list.tensors.shape[-2:], features, t)
        sum(f.sum() for f in out.features).backward()

    run()
    return statistics.median(timed(run) for _ in range(repeats))


def inference_ratio(model_cfg: ModelConfig, num_classes: int, batch, repeats: int) -> dict:
    """The exported student against a freshly built torchvision model with the same weights."""
    from lgd.export import export_student, load_student
    import tempfile

    torch.manual_seed(0)
    plain = build_detector(model_cfg, num_classes).eval()
    set_test_size(plain, model_cfg)
    wrapped = LGD(copy.deepcopy(plain), num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_student(wrapped.student, model_cfg, [str(i) for i in range(num_classes)],
                              list(range(1, num_classes + 1)), 0, Path(tmp) / "student.pth")
        exported, _ = load_student(path)
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), exported.state_dict().values()))
    images = batch[0]
    times: dict[str, list[float]] = {"plain": [], "exported": []}
    with torch.no_grad():
        plain(images), exported(images)
        for _ in range(repeats):
            times["plain"].append(timed(lambda: plain(images)))
            times["exported"].append(timed(lambda: exported(images)))
    p, e = statistics.median(times["plain"]), statistics.median(times["exported"])
    return {"plain_s": p, "exported_s": e, "ratio": e / p, "parameters_identical": same,
            "parameters": sum(x.numel() for x in exported.parameters())}


def teacher_scaling(channels: int, num_classes: int, sizes: list[tuple[int, int]], objects: list[int],
                    repeats: int) -> list[dict]:
    """Teacher forward+backward time on P3-P7-shaped features, batch 2, per (image size, objects)."""
    from lgd.teacher import ImplicitTeacher

    torch.manual_seed(0)
    teacher = ImplicitTeacher(num_classes, channels, context_box=True)
    rows = []
    for h, w in sizes:
        feats = [torch.randn(2, channels, -(-h // s), -(-w // s), requires_grad=True) for s in (8, 16, 32, 64, 128)]
        for n in objects:
            g = torch.Generator().manual_seed(n)
            boxes, classes = [], []
            for _ in range(2):
                xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8
                wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.2
                boxes.append(torch.cat([xy, xy + wh], 1))
                classes.append(torch.randint(0, num_classes, (n,), generator=g))

            def run() -> None:
                out = teacher(feats, boxes, classes, (h, w))
                sum(f.sum() for f in out.features).backward()

            run()
            rows.append({"height": h, "width": w, "objects": n,
                         "seconds": statistics.median(timed(run) for _ in range(repeats))})
    return rows


def plot_scaling(rows: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    largest = max((r["height"] * r["width"], (r["height"], r["width"])) for r in rows)[1]
    by_objects = [r for r in rows if (r["height"], r["width"]) == largest]
    ax1.plot([r["objects"] for r in by_objects], [r["seconds"] for r in by_objects], "o-")
    ax1.set_xscale("log")
    ax1.set_xlabel("objects per image")
    ax1.set_ylabel("teacher fwd+bwd (s)")
    ax1.set_title(f"{largest[0]}x{largest[1]}, batch 2")
    ten = sorted((r for r in rows if r["objects"] == 10), key=lambda r: r["height"] * r["width"])
    ax2.plot([r["height"] * r["width"] / 1e6 for r in ten], [r["seconds"] for r in ten], "o-")
    ax2.set_xlabel("image megapixels")
    ax2.set_title("10 objects per image, batch 2")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['machine']} (torch {report['torch']}, "
             f"{report['threads']} threads). Command: `{report['command']}`", ""]
    lines += ["| setting | baseline step (s) | LGD step (s) | step ratio | peak training memory ratio | teacher share |",
              "|---|---|---|---|---|---|"]
    for name, r in report["steps"].items():
        lines.append(f"| {name} | {r['baseline_step_s']:.3f} | {r['lgd_step_s']:.3f} | **{r['step_ratio']:.2f}x** | "
                     f"{r['memory_ratio']:.2f}x ({r['baseline_peak_mib']:.0f} -> {r['lgd_peak_mib']:.0f} MiB) | "
                     f"{100 * r['teacher_share']:.0f}% |")
    inf = report["inference"]
    lines += ["", f"Inference, exported student / plain torchvision model: **{inf['ratio']:.3f}x** "
              f"({inf['exported_s']:.3f} s vs {inf['plain_s']:.3f} s); parameters identical: "
              f"{inf['parameters_identical']} ({inf['parameters']:,})", ""]
    lines += ["| image | objects/image | teacher fwd+bwd (s) | vs 10 objects |", "|---|---|---|---|"]
    for r in report["scaling"]:
        ref = next((x["seconds"] for x in report["scaling"]
                    if x["objects"] == 10 and (x["height"], x["width"]) == (r["height"], r["width"])), float("nan"))
        lines.append(f"| {r['height']}x{r['width']} | {r['objects']} | {r['seconds']:.3f} | {r['seconds'] / ref:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per measurement")
    parser.add_argument("--bench-config", default=str(Path(__file__).parent.parent / "configs" /
                                                      "synthetic_retinanet_lgd.yaml"),
                        help="the accuracy benchmark's config (its model and batch are timed too)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for cost.json, cost.md and teacher_scaling.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = 1 if args.quick else args.repeats

    steps = {}
    if args.quick:
        anchor = ModelConfig(depth=18, fpn_channels=32, norm="bn", min_size=[64], max_size=64)
        steps["tiny R-18 64 px"] = step_ratio(anchor, 3, LGDConfig(pre_distill_iters=0),
                                              make_batch("retinanet", 2, 64, 3, 3), repeats)
    else:
        anchor = ModelConfig(depth=50, fpn_channels=256, norm="frozen_bn", min_size=[512], max_size=512)
        # past the pre-distillation window, so the student also receives the distillation gradient
        steps["RetinaNet R-50-FPN 512x512, batch 2, K=80, 10 obj/img"] = step_ratio(
            anchor, 80, LGDConfig(pre_distill_iters=0), make_batch("retinanet", 2, 512, 10, 80), repeats)
        # the reference's heaviest backbones, at a small size (DCN is slow on CPU): the paper's headline FCOS and
        # its Swin-T Mask R-CNN (timed with SGD on both sides; the recipe's AdamW student costs about the same)
        for name, arch, extra in REFERENCE_BACKBONES:
            cfg = ModelConfig(arch=arch, fpn_channels=256, norm="frozen_bn", min_size=[256], max_size=256, **extra)
            steps[f"{name} 256x256, batch 1, K=80, 10 obj/img"] = step_ratio(
                cfg, 80, LGDConfig(pre_distill_iters=0, mask_guided=VIEWS[arch].has_masks),
                make_batch(arch, 1, 256, 10, 80), repeats)
        bench = load_config(args.bench_config)
        size = bench.model.min_size[0]
        steps[f"benchmark config ({Path(args.bench_config).name})"] = step_ratio(
            bench.model, 8, bench.lgd, make_batch(bench.model.arch, bench.data.batch_size, size, 8, 8), repeats)
    inference = inference_ratio(anchor, 3 if args.quick else 80,
                                make_batch("retinanet", 2, anchor.min_size[0], 1, 3), max(repeats, 3))
    if args.quick:
        scaling = teacher_scaling(16, 3, [(64, 96)], [1, 10], 1)
    else:
        scaling = teacher_scaling(256, 80, [(768, 1280)], [1, 10, 100, 300], 3)
        scaling += teacher_scaling(256, 80, [(256, 256), (512, 512), (1024, 1024)], [10], 3)
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{platform.system()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python benchmarks/cost.py" + (" --quick" if args.quick else ""),
        "steps": steps, "inference": inference, "scaling": scaling,
    }
    (out / "cost.json").write_text(to_json(report, indent=1))
    (out / "cost.md").write_text(markdown(report))
    plot_scaling(scaling, out / "teacher_scaling.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
