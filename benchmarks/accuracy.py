"""Does LGD beat the baseline? Equal iterations and equal wall-clock time, several seeds, on the test split.

    python benchmarks/accuracy.py --arch retinanet            # 3 seeds, equal-iteration + equal-time
    python benchmarks/accuracy.py --arch fcos --seeds 0 1 2
    python benchmarks/accuracy.py --quick                     # tiny, for the test suite

For every seed it trains the baseline (``lgd.enabled=false``) and LGD with the same recipe, seed and iteration
count, and evaluates both on the **test** split (used for nothing else). Validation AP is logged during
training for the AP-versus-iteration plot. The equal-time baseline trains ``ratio`` times as many iterations
(its schedule stretched by the same factor), where ``ratio`` is LGD's measured seconds per iteration over the
baseline's in the equal-iteration runs. Runs go ``--parallel`` at a time, one thread each.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")


def run_one(config: str, overrides: list[str]) -> dict:
    """Train one run (a subprocess worker) and evaluate it on the test split."""
    import torch

    from lgd.config import load_config
    from lgd.engine import evaluate, load_trained, resolve_device, train

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    out = train(cfg, progress=False)
    model, test = load_trained(cfg, "test")
    result = evaluate(model, test, cfg, resolve_device(cfg.device), progress=False)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["time"] for r in records if r["kind"] == "train"]
    curve = [(r["iter"], r["metrics"]["bbox/AP"]) for r in records if r["kind"] == "eval" and r["split"] == "val"]
    return {"overrides": overrides, "test": result.metrics, "val_final": out["metrics"],
            "seconds_per_iter": statistics.median(step_times[1:] or step_times), "val_curve": curve}


def stretched(overrides: list[str], cfg, factor: float) -> list[str]:
    """The same recipe over ``factor`` times as many iterations (every iteration count scaled)."""
    s = cfg.solver
    steps = ",".join(str(round(x * factor)) for x in s.steps)
    return overrides + [f"solver.max_iter={round(s.max_iter * factor)}", f"solver.steps=[{steps}]",
                        f"solver.warmup_iters={round(s.warmup_iters * factor)}",
                        f"eval_period={round(max(cfg.eval_period, 1) * factor) if cfg.eval_period else 0}"]


def summarise(pairs: list[tuple[dict, dict]]) -> dict:
    deltas = [lgd["test"]["bbox/AP"] - base["test"]["bbox/AP"] for base, lgd in pairs]
    return {
        "baseline_mean": statistics.mean(b["test"]["bbox/AP"] for b, _ in pairs),
        "lgd_mean": statistics.mean(l["test"]["bbox/AP"] for _, l in pairs),
        "delta_mean": statistics.mean(deltas),
        "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
        "deltas": deltas,
        "all_positive": all(d > 0 for d in deltas),
    }


def table(title: str, seeds: list[int], pairs: list[tuple[dict, dict]], summary: dict) -> str:
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = [f"**{title}**", "",
             "| seed | model | AP | AP50 | AP75 | APs | APm | APl | s/iter |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, (base, lgd) in zip(seeds, pairs):
        for name, run in (("baseline", base), ("LGD", lgd)):
            cells = " | ".join(fmt(run["test"].get(m)) for m in METRICS)
            lines.append(f"| {seed} | {name} | {cells} | {run['seconds_per_iter']:.3f} |")
        lines.append(f"| {seed} | **delta** | **{lgd['test']['bbox/AP'] - base['test']['bbox/AP']:+.2f}** "
                     "| | | | | | |")
    lines += ["", f"Mean AP: baseline {summary['baseline_mean']:.2f}, LGD {summary['lgd_mean']:.2f}; "
                  f"delta {summary['delta_mean']:+.2f} ± {summary['delta_std']:.2f} (std over seeds); "
                  f"every seed positive: {summary['all_positive']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="retinanet", choices=("retinanet", "fcos", "fasterrcnn"))
    parser.add_argument("--config", help="LGD config (default: configs/synthetic_<arch>_lgd.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal-time baseline")
    parser.add_argument("--quick", action="store_true", help="tiny runs, for the test suite")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
    args = parser.parse_args(argv)

    from lgd.config import load_config
    from lgd.engine import split_paths
    from lgd.plots import plot_ap_curves

    config = args.config or str(ROOT / "configs" / f"synthetic_{args.arch}_lgd.yaml")
    out = Path(args.out)
    runs_dir = out / "runs" / args.arch
    common = list(args.overrides)
    if args.quick:
        common += ["model.min_size=[64]", "model.max_size=64", "model.fpn_channels=32", "solver.max_iter=4",
                   "solver.steps=[3]", "solver.warmup_iters=1", "data.batch_size=2", "eval_period=2",
                   "lgd.pre_distill_iters=1", "data.synth.num_train=12", "data.synth.num_val=4",
                   "data.synth.num_test=4", "data.synth.size=64", "data.workers=0"]
    cfg = load_config(config, common)
    split_paths(cfg, "train")  # generate the built-in dataset once, before parallel runs look for it

    def spec(seed: int, kind: str, extra: list[str]) -> list[str]:
        return common + [f"seed={seed}", f"output_dir={runs_dir / f'{kind}_s{seed}'}"] + extra

    jobs = {}
    for seed in args.seeds:
        jobs[("baseline", seed)] = spec(seed, "baseline", ["lgd.enabled=false"])
        jobs[("lgd", seed)] = spec(seed, "lgd", [])
    results = _run_all(config, jobs, args.parallel)
    pairs = [(results[("baseline", s)], results[("lgd", s)]) for s in args.seeds]
    report = {"date": date.today().isoformat(), "arch": args.arch, "config": config, "overrides": common,
              "seeds": args.seeds, "equal_iterations": {"runs": pairs, "summary": summarise(pairs)}}
    ratio = statistics.median(l["seconds_per_iter"] / b["seconds_per_iter"] for b, l in pairs)
    report["step_time_ratio"] = ratio
    md = [table(f"Equal iterations ({cfg.solver.max_iter} each), test split", args.seeds, pairs,
                report["equal_iterations"]["summary"])]
    if not args.no_equal_time:
        eq_jobs = {("baseline_eqtime", s): stretched(spec(s, "baseline_eqtime", ["lgd.enabled=false"]), cfg, ratio)
                   for s in args.seeds}
        eq = _run_all(config, eq_jobs, args.parallel)
        eq_pairs = [(eq[("baseline_eqtime", s)], results[("lgd", s)]) for s in args.seeds]
        report["equal_time"] = {"factor": ratio, "runs": eq_pairs, "summary": summarise(eq_pairs)}
        md.append(table(f"Equal wall-clock time: baseline trained {ratio:.2f}x as many iterations "
                        f"({round(cfg.solver.max_iter * ratio)}), schedule stretched; test split",
                        args.seeds, eq_pairs, report["equal_time"]["summary"]))
    curves = {}
    for (kind, seed), run in {**results}.items():
        if run["val_curve"]:
            curves[f"{kind} seed {seed}"] = run["val_curve"]
    if curves:
        plot_ap_curves(curves, out / f"ap_vs_iter_{args.arch}.png", f"{args.arch}: val AP vs iteration")
    (out / f"accuracy_{args.arch}.json").write_text(json.dumps(report, indent=1))
    text = "\n".join(md)
    (out / f"accuracy_{args.arch}.md").write_text(text)
    print(text)
    return report


def _run_all(config: str, jobs: dict, parallel: int) -> dict:
    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(run_one, config, overrides) for key, overrides in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
