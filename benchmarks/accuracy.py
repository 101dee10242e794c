"""Does LGD beat the baseline? Equal iterations and equal wall-clock time, several seeds, on the test split.

    python benchmarks/accuracy.py --arch retinanet            # 3 seeds, equal-iteration + equal-time
    python benchmarks/accuracy.py --arch retinanet fcos --seeds 0 1 2
    python benchmarks/accuracy.py --arch retinanet --ablation teacher_fill:lgd.attention=teacher_fill
    python benchmarks/accuracy.py --arch retinanet fcos --parallel 12 --budget 480 --iters 1000 2000 4000
    python benchmarks/accuracy.py --quick                     # tiny, for the test suite
    python benchmarks/accuracy.py --regime pretrained --arch fcos   # pretrained backbone, photographic target
    python benchmarks/accuracy.py --regime pretrained --arch fcos fasterrcnn --method lgd fgfi --teacher-factor 3
    python benchmarks/accuracy.py --regime pretrained --arch fasterrcnn --method lgd fgfi --teacher-factor equal-time \
        --step-ratio fasterrcnn=1.909

For every architecture and seed it trains the baseline (``lgd.enabled=false``) and LGD with the same recipe, seed
and iteration count, and evaluates both on the **test** split (used for nothing else); for every LGD run it also
evaluates the teacher diagnostic (the head on the teacher's features) on test. Validation AP is logged during
training for the AP-versus-iteration plot. The equal-time baseline trains ``ratio`` times as many iterations
(its schedule stretched by the same factor), where ``ratio`` is LGD's measured seconds per iteration over the
baseline's in that architecture's equal-iteration runs. ``--ablation NAME:KEY=VALUE,...`` adds LGD variants (first
architecture, ``--ablation-seeds``), reported beside the same seeds' baseline and default LGD.

Runs go ``--parallel`` at a time, one thread each. With ``--budget SECONDS`` (for a GPU machine lent for minutes)
every kind of run first trains a few steps side by side to measure its seconds per step; the longest schedule in
``--iters`` whose runs fit the budget is chosen and recorded, and an equal-time or ablation run that no longer fits
is not started (the report lists it as not run); the equal-iteration pairs always run. Each finished run writes
``result.json`` in its folder as soon as it ends.

``--regime pretrained`` (issue 13) trains every run from a ResNet-18 body pretrained by ``pretrain_backbone.py`` on the
target of ``regime_data.py`` (shapes on photographs), with ``configs/regime_<arch>_lgd.yaml``. Backbone and dataset
are made once and cached ($LGD_CACHE/regime or ~/.cache/lgd/regime); the report gives the pretraining's cost once,
and whether this invocation paid it or found the file cached. The cached body's name comes from its recipe, and
another CPU pretrains other bytes from the same recipe: every run folder is stamped with its body's SHA-256
(``backbone_weights.sha256``, and ``backbone_weights_sha256`` in result.json), and a folder begun from another
body is refused rather than resumed or paired.

``--method lgd fgfi`` (issue 25) adds FGFI runs (``distill.method=fgfi``) at the same iterations and seeds, with the
teacher ``--fgfi-teacher FILE`` or, by default, one teacher per architecture trained first: the same detector as a
baseline ``--teacher-factor`` times as long (schedule stretched, seed 0), evaluated on test like every run; with
``--teacher-factor equal-time`` the teacher is the first seed's equal-time baseline, the plain detector trained for
the time an LGD run takes (FGFI then costs its teacher what LGD costs, and no run is trained twice). Every
run records its training CPU seconds (``train_cpu_s``, ``time.process_time`` of its one-thread process), from which
the report gives each method's extra cost beyond the student's own (LGD: LGD minus baseline; FGFI: the teacher's
training plus FGFI minus baseline, means over seeds) and their ratio. ``train_cpu_s`` covers everything ``train``
does, the evaluations on val during training included (and LGD's teacher diagnostic there): for cost comparisons
pass ``eval_period=0 lgd.eval_teacher=false``, and run the pairs quietly (``--parallel`` no more than the cores).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lgd, not another installed one
RESULTS = Path(__file__).parent / "results"
METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")
CALIBRATION_STEPS = 30
# Priorities: the equal-iteration pairs first, then the equal-time baselines, then ablations.
# Every run here sets its own schedule (``stretched``) and batch, and the overrides that identify a finished run
# (result.json) predate the schedule scaling and the linear scaling rule: both are off under them (the overrides
# may still turn them on), so an override of max_iter or data.batch_size means what it meant when those runs were
# recorded.
AS_RECORDED = ["solver.scale_schedule=false", "solver.reference_batch_size=0"]
MAIN, EQUAL_TIME, ABLATION = 0, 1, 2
EQUAL_TIME_TEACHER = "equal-time"  # --teacher-factor: FGFI distils the first seed's equal-time baseline


def run_one(config: str, overrides: list[str], teacher: bool) -> dict:
    """Train one run (a subprocess worker), evaluate it on the test split, write its result.json.

    A run whose folder already holds the result.json of the same overrides is not repeated; one interrupted
    before that resumes from its last checkpoint. So an interrupted benchmark continues where it stopped.
    """
    import torch

    from lgd.config import load_config
    from lgd.engine.checkpoint import load_trained
    from lgd.engine.training import train
    from lgd.evaluation.evaluator import evaluate
    from lgd.plots import read_metrics
    from lgd.utils.atomic import atomic_write_text
    from lgd.utils.env import resolve_device
    from lgd.utils.files import to_json

    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = load_config(config, AS_RECORDED + overrides)
    done = Path(cfg.output_dir) / "result.json"
    metrics_file = Path(cfg.output_dir) / "metrics.jsonl"
    body = same_body(cfg)
    if finished(overrides):
        teacher_curve = _val_curve(read_metrics(metrics_file), "val_teacher")
        return {**json.loads(done.read_text()), "teacher_val_curve": teacher_curve}
    cpu_started = time.process_time()
    resumed = (Path(cfg.output_dir) / "last.pth").is_file()
    out = train(cfg, resume=resumed, progress=False)
    train_cpu_s = time.process_time() - cpu_started  # of a resumed run: only this process's part
    model, test = load_trained(cfg, "test")
    device = resolve_device(cfg.device)
    model.to(device)
    result = evaluate(model, test, cfg, device, progress=False, split="test")
    records = read_metrics(metrics_file)
    step_times = [r["time"] for r in records if r["kind"] == "train"]
    run = {"overrides": overrides, "max_iter": cfg.solver.max_iter, "test": result.metrics,
           "val_final": out["metrics"], "seconds_per_iter": statistics.median(step_times[1:] or step_times),
           "val_curve": _val_curve(records, "val"), "teacher_val_curve": _val_curve(records, "val_teacher"),
           "device": str(device), "train_cpu_s": train_cpu_s, "resumed": resumed, "backbone_weights_sha256": body}
    if teacher:
        run["teacher_test"] = evaluate(model, test, cfg, device, teacher=True, progress=False, split="test").metrics
    run["wall_s"] = time.perf_counter() - started
    atomic_write_text(Path(cfg.output_dir) / "result.json", to_json(run, indent=1))
    return run


BODY_STAMP = "backbone_weights.sha256"


def same_body(cfg) -> str | None:
    """The SHA-256 of the run's local ``model.backbone_weights`` file (None without one), stamped in its folder.

    The regime's body is cached under a name made from its recipe, but pretraining gives other bytes on another
    CPU (BENCHMARKS.md: two machines of one kind, two bodies), so a run folder begun with one body and resumed,
    or reused as finished, beside a re-made cache would pair runs of different bodies without a word. The first
    call stamps the folder; a later call with another body, or on a finished or resumable run that predates the
    stamp, raises.

    Raises:
        RuntimeError: the folder's runs began from another body (the message names both digests).
    """
    from lgd.utils.atomic import atomic_write_text
    from lgd.utils.files import file_digest

    weights = cfg.model.backbone_weights
    body = file_digest(Path(weights)) if weights and Path(weights).is_file() else None
    out = Path(cfg.output_dir)
    stamp = out / BODY_STAMP
    if stamp.is_file():
        began = stamp.read_text().strip() or None
    elif body and ((out / "result.json").is_file() or (out / "last.pth").is_file()):
        began = "no digest (the run predates the stamp)"
    else:
        if body:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stamp, body + "\n")
        return body
    if began != body:
        raise RuntimeError(f"{out}: this run began from backbone weights {began}, but {weights} now has SHA-256 "
                           f"{body}; results of two bodies would be paired (pretraining on another CPU gives "
                           f"other bytes): give another --out, or move this run folder away")
    return body


def _val_curve(records: list[dict], split: str) -> list[tuple[int, float]]:
    """[(iteration, AP in percent)] of a run's evaluations on ``split`` ("val", or "val_teacher" for the teacher
    diagnostic that ``lgd.eval_teacher`` logs), from its metrics.jsonl records."""
    return [(r["iter"], r["metrics"]["bbox/AP"]) for r in records if r["kind"] == "eval" and r["split"] == split]


def calibrate_one(config: str, overrides: list[str]) -> float:
    """Median seconds per training step of a short run (a subprocess worker)."""
    import torch

    from lgd.config import load_config
    from lgd.engine.training import train

    torch.set_num_threads(1)
    cfg = load_config(config, AS_RECORDED + overrides + [f"solver.max_iter={CALIBRATION_STEPS}", "log_period=5",
                                                         "eval_period=0", f"checkpoint_period={CALIBRATION_STEPS}"])
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a throwaway timing run: an earlier one is not resumed
    train(cfg, progress=False)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time"] for r in records if r["kind"] == "train" and r["iter"] > 10)


def stretched(overrides: list[str], cfg, factor: float) -> list[str]:
    """The same recipe over ``factor`` times as many iterations (every iteration count scaled)."""
    s = cfg.solver
    steps = ",".join(str(round(x * factor)) for x in s.steps)
    scaled = overrides + [f"solver.max_iter={round(s.max_iter * factor)}", f"solver.steps=[{steps}]",
                          f"solver.warmup_iters={round(s.warmup_iters * factor)}",
                          f"lgd.pre_distill_iters={round(cfg.lgd.pre_distill_iters * factor)}",
                          f"eval_period={round(cfg.eval_period * factor) if cfg.eval_period else 0}"]
    # Only when there is a freeze window: the overrides identify a finished run (result.json), so recipes without
    # one keep the overrides their finished runs were recorded with.
    if cfg.lgd.freeze_backbone_iters:
        scaled.append(f"lgd.freeze_backbone_iters={round(cfg.lgd.freeze_backbone_iters * factor)}")
    return scaled


def schedule(cfg, iters: int) -> list[str]:
    """The config's schedule scaled to ``iters`` iterations (LR steps, warm-up, pre-distillation, eval period)."""
    factor = iters / cfg.solver.max_iter
    return stretched([], cfg, factor)


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


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def table(title: str, seeds: list[int], pairs: list[tuple[dict, dict]], summary: dict) -> str:
    lines = [f"**{title}**", "",
             "| seed | model | AP | AP50 | AP75 | APs | APm | APl | s/iter | teacher AP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, (base, lgd) in zip(seeds, pairs):
        for name, run in (("baseline", base), ("LGD", lgd)):
            cells = " | ".join(_fmt(run["test"].get(m)) for m in METRICS)
            teacher = _fmt(run["teacher_test"]["bbox/AP"]) if "teacher_test" in run else ""
            lines.append(f"| {seed} | {name} | {cells} | {run['seconds_per_iter']:.3f} | {teacher} |")
        lines.append(f"| {seed} | **delta** | **{lgd['test']['bbox/AP'] - base['test']['bbox/AP']:+.2f}** "
                     "| | | | | | | |")
    lines += ["", f"Mean AP: baseline {summary['baseline_mean']:.2f}, LGD {summary['lgd_mean']:.2f}; "
                  f"delta {summary['delta_mean']:+.2f} ± {summary['delta_std']:.2f} (std over seeds); "
                  f"every seed positive: {summary['all_positive']}", ""]
    return "\n".join(lines)


def ablation_table(title: str, rows: list[tuple[str, str, int, dict, dict]]) -> str:
    """rows: (name, overrides, seed, run, baseline run of that seed)."""
    lines = [f"**{title}**", "", "| variant | overrides | seed | AP | AP50 | vs baseline | teacher AP |",
             "|---|---|---|---|---|---|---|"]
    for name, overrides, seed, run, base in rows:
        delta = f"{run['test']['bbox/AP'] - base['test']['bbox/AP']:+.2f}" if base else "n/a"
        teacher = _fmt(run["teacher_test"]["bbox/AP"]) if "teacher_test" in run else ""
        lines.append(f"| {name} | `{overrides}` | {seed} | {_fmt(run['test']['bbox/AP'])} | "
                     f"{_fmt(run['test']['bbox/AP50'])} | {delta} | {teacher} |")
    return "\n".join(lines + [""])


@dataclass(order=True)
class Job:
    priority: int
    order: int
    key: tuple = field(compare=False)
    overrides: list = field(compare=False)
    teacher: bool = field(compare=False)
    iters: int = field(compare=False)
    seconds_per_iter: float = field(compare=False, default=0.0)


def parse_ablation(text: str) -> tuple[str, list[str]]:
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise SystemExit(f"--ablation expects NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, [s for s in spec.split(",") if s]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["retinanet"], choices=("retinanet", "fcos", "fasterrcnn"))
    parser.add_argument("--regime", choices=("scratch", "pretrained"), default="scratch",
                        help="scratch: the built-in dataset from scratch; pretrained: a cached pretrained ResNet-18 "
                             "body and the photographic target (both made on first use)")
    parser.add_argument("--config", help="LGD config for a single --arch (default: configs/synthetic_<arch>_lgd.yaml, "
                                         "with --regime pretrained configs/regime_<arch>_lgd.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal-time baselines")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an LGD variant for the first --arch (repeatable)")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", help="seeds of the ablations (default: the first)")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds for all training: calibrate, pick the longest --iters that fits, start no run "
                             "that would not finish in time (0 = run everything with the config's schedule)")
    parser.add_argument("--iters", type=int, nargs="+", default=[],
                        help="schedule lengths --budget chooses from (each scales the config's whole schedule)")
    parser.add_argument("--step-ratio", action="append", default=[], metavar="ARCH=FACTOR",
                        help="the equal-time factor of ARCH (LGD's seconds per step over the baseline's), measured "
                             "elsewhere; default: the median over seeds of the equal-iteration runs' own ratios")
    parser.add_argument("--measure-step-ratio", type=int, default=0, metavar="ROUNDS",
                        help="before anything else, measure each --arch's equal-time factor from ROUNDS quiet pairs: "
                             "a baseline and an LGD run of %d steps side by side, one thread each (run it with "
                             "nothing else on the machine); with --method fgfi and --fgfi-teacher also a baseline "
                             "and an FGFI run per round; writes step_ratio_<arch>.json" % CALIBRATION_STEPS)
    parser.add_argument("--method", nargs="+", default=["lgd"], choices=("lgd", "fgfi"),
                        help="distillation methods beside the baseline; lgd always runs (the reference)")
    parser.add_argument("--fgfi-teacher", metavar="FILE", help="FGFI's teacher for every --arch (default: trained, "
                        "see --teacher-factor)")
    parser.add_argument("--teacher-factor", type=_teacher_factor, default=3.0,
                        help="FGFI's trained teacher: the baseline recipe this many times as long (default 3), or "
                             "'equal-time': the first seed's equal-time baseline (the plain detector trained for "
                             "as long as LGD takes), so no extra run trains the teacher")
    parser.add_argument("--fgfi-override", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to the FGFI runs only (repeatable), e.g. fgfi.warmup_iters=100, so that "
                             "finished baseline and LGD runs recorded without it are reused")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the report of the runs that have finished (e.g. after stopping a "
                             "long invocation); the others are listed as not run")
    parser.add_argument("--quick", action="store_true", help="tiny runs, for the test suite")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
    args = parser.parse_args(argv)
    if args.config and len(args.arch) > 1:
        parser.error("--config needs a single --arch")
    if "lgd" not in args.method:
        parser.error("--method: lgd is the reference every report compares with; give e.g. --method lgd fgfi")
    if args.teacher_factor == EQUAL_TIME_TEACHER and (args.no_equal_time or args.fgfi_teacher):
        parser.error("--teacher-factor equal-time: the teacher is an equal-time baseline; drop --no-equal-time "
                     "and --fgfi-teacher")
    if args.budget and not args.iters:
        parser.error("--budget needs --iters, the schedule lengths to choose from")
    given_ratio = {}
    for item in args.step_ratio:
        arch, _, factor = item.partition("=")
        if arch not in args.arch or not _is_positive_number(factor):
            parser.error(f"--step-ratio {item!r}: expected ARCH=FACTOR with ARCH among --arch and FACTOR > 0")
        given_ratio[arch] = float(factor)

    from lgd.config import load_config
    from lgd.data.build import split_paths
    from lgd.plots import plot_ap_curves
    from lgd.utils.files import to_json

    began = time.perf_counter()
    out = Path(args.out)
    common = list(args.overrides)
    if args.quick:
        common += ["model.min_size=[64]", "model.max_size=64", "model.fpn_channels=32", "solver.max_iter=4",
                   "solver.steps=[3]", "solver.warmup_iters=1", "data.batch_size=2", "eval_period=2",
                   "lgd.pre_distill_iters=1", "data.synth.num_train=12", "data.synth.num_val=4",
                   "data.synth.num_test=4", "data.synth.size=64", "data.workers=0"]
    report: dict = {"date": date.today().isoformat(), "command": "python benchmarks/accuracy.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "regime": args.regime}
    if args.regime == "pretrained":
        regime, regime_overrides = prepare_pretrained_regime(args.quick)
        report["pretrained_regime"] = regime
        # after the user's overrides: the cached files are what this regime means
        common += regime_overrides + (["lgd.freeze_backbone_iters=1"] if args.quick else [])
    prefix = "regime" if args.regime == "pretrained" else "synthetic"
    configs = {a: args.config or str(ROOT / "configs" / f"{prefix}_{a}_lgd.yaml") for a in args.arch}
    cfgs = {a: load_config(configs[a], AS_RECORDED + common) for a in args.arch}
    for cfg in cfgs.values():
        split_paths(cfg, "train")  # generate the built-in dataset once, before parallel runs look for it
    ablations = [parse_ablation(a) for a in args.ablation]
    ablation_seeds = args.ablation_seeds or args.seeds[:1]

    def spec(arch: str, seed: int, kind: str, extra: list[str]) -> list[str]:
        return common + [f"seed={seed}", f"output_dir={out / 'runs' / arch / f'{kind}_s{seed}'}"] + extra

    kinds = {"baseline": ["lgd.enabled=false"], "lgd": []}
    report.update({"overrides": common, "seeds": args.seeds, "archs": {}})
    chosen = {a: cfgs[a].solver.max_iter for a in args.arch}
    calibration: dict = {}
    if args.budget:
        # as many calibration runs as --parallel, so each is measured under the contention the real runs will see
        keys = [(a, k) for a in args.arch for k in kinds]
        probes = []
        for i in range(max(args.parallel, len(keys))):
            arch, kind = keys[i % len(keys)]
            probes.append(((arch, kind), spec(arch, 0, f"calibrate{i}_{kind}", kinds[kind])))
        calibration = _calibrate(configs, probes, args.parallel)
        report["calibration_s_per_iter"] = calibration
        chosen = _choose_iters(args, calibration, args.budget - (time.perf_counter() - began))
        report["chosen_iters"] = chosen
        print(f"calibrated s/iter {calibration}; schedule: {chosen}", flush=True)

    # FGFI's step cost is measured only with a teacher at hand: a trained one does not exist yet
    fgfi_kind = (["distill.method=fgfi", f"fgfi.teacher={args.fgfi_teacher}", "fgfi.warmup_iters=0"]
                 if "fgfi" in args.method and args.fgfi_teacher else [])
    # steady-state steps: the body trains and the distillation reaches it, as in most of a run
    steady = ["lgd.freeze_backbone_iters=0", "lgd.pre_distill_iters=0"]
    # each round, every method in turn beside a baseline: its cost beyond the student's own, measured alike
    contenders = {"lgd": kinds["lgd"] + steady, **({"fgfi": fgfi_kind} if fgfi_kind else {})}
    for arch in args.arch if args.measure_step_ratio else []:
        rounds: dict = {m: [] for m in contenders}
        for r in range(args.measure_step_ratio):
            for method, extra in contenders.items():
                probes = [((arch, k), spec(arch, 0, f"step_ratio{r}_{k}", e))
                          for k, e in (("baseline", kinds["baseline"] + steady), (method, extra))]
                rounds[method].append(_calibrate(configs, probes, len(probes))[arch])
        pairs, fgfi_pairs = rounds["lgd"], rounds.get("fgfi", [])
        given_ratio[arch] = statistics.median(p["lgd"] / p["baseline"] for p in pairs)
        measured = {"arch": arch, "date": date.today().isoformat(), "rounds_s_per_iter": pairs,
                    "steps_per_run": CALIBRATION_STEPS, "ratio": given_ratio[arch],
                    "how": "each round: a baseline and an LGD run side by side, one thread each; median s/step over "
                           "steps 11 on; ratio = median over rounds of LGD / baseline"}
        if fgfi_pairs:
            measured.update({"fgfi_rounds_s_per_iter": fgfi_pairs, "fgfi_teacher": args.fgfi_teacher,
                             "fgfi_ratio": statistics.median(p["fgfi"] / p["baseline"] for p in fgfi_pairs),
                             "fgfi_how": "each round after the LGD pair: a baseline and an FGFI run (imitation from "
                                         "the first step) side by side, one thread each; median over rounds of "
                                         "FGFI / baseline"})
        (out / f"step_ratio_{arch}.json").write_text(to_json(measured, indent=1))
        print(f"{arch}: step ratio {given_ratio[arch]:.3f} from {len(pairs)} quiet pairs {pairs}", flush=True)
        if fgfi_pairs:
            print(f"{arch}: FGFI step ratio {measured['fgfi_ratio']:.3f} from {len(fgfi_pairs)} quiet pairs "
                  f"{fgfi_pairs}", flush=True)

    sched = {a: schedule(cfgs[a], chosen[a]) for a in args.arch}
    jobs, order = [], 0
    for arch in args.arch:
        for seed in args.seeds:
            for kind, extra in kinds.items():
                jobs.append(Job(MAIN, order, (arch, kind, seed), spec(arch, seed, kind, sched[arch] + extra),
                                kind == "lgd", chosen[arch], calibration.get(arch, {}).get(kind, 0.0)))
                order += 1
    if "fgfi" in args.method:
        jobs += fgfi_teacher_jobs(args, configs, spec, sched, chosen)
    first = args.arch[0]
    for name, extra in ablations:
        for seed in ablation_seeds:
            jobs.append(Job(ABLATION, order, (first, f"ablation:{name}", seed),
                            spec(first, seed, f"ablation_{name}", sched[first] + extra), True, chosen[first],
                            calibration.get(first, {}).get("lgd", 0.0)))
            order += 1

    def follow_up(done: dict) -> list[Job]:
        """The jobs that wait on results: an architecture's FGFI runs once its teacher is trained (at once with
        ``--fgfi-teacher``); its equal-time baselines once its factor is known: at once with a given or measured step
        ratio, so that a free lane need not wait for the pairs; otherwise once all its equal-iteration pairs are
        in."""
        new = []
        for arch in args.arch if "fgfi" in args.method else []:
            teacher = fgfi_teacher_record(args, arch, done)
            if teacher is not None and (arch, "fgfi", args.seeds[0]) not in queued:
                report.setdefault("fgfi_teachers", {})[arch] = teacher
                new += fgfi_jobs(args, spec, sched, chosen, arch, teacher, order=order + len(queued))
                queued.update((arch, "fgfi", s) for s in args.seeds)
        if args.no_equal_time:
            return new
        for arch in args.arch:
            if (arch, "eqtime", args.seeds[0]) in queued:
                continue
            pairs = [(done.get((arch, "baseline", s)), done.get((arch, "lgd", s))) for s in args.seeds]
            if arch not in given_ratio and not all(b and lg for b, lg in pairs):
                continue
            ratio = given_ratio.get(arch) or statistics.median(
                lg["seconds_per_iter"] / b["seconds_per_iter"] for b, lg in pairs)
            report["archs"].setdefault(arch, {})["step_time_ratio"] = ratio
            report["archs"][arch]["step_time_ratio_source"] = (
                "given or measured from quiet pairs (--step-ratio / --measure-step-ratio)" if arch in given_ratio
                else "median over seeds of the equal-iteration runs' own s/iter ratios")
            recipe = spec(arch, args.seeds[0], "baseline", kinds["baseline"] + sched[arch])
            base_cfg = load_config(configs[arch], AS_RECORDED + recipe)
            for seed in args.seeds:
                overrides = stretched(spec(arch, seed, "baseline_eqtime", kinds["baseline"] + sched[arch]),
                                      base_cfg, ratio)
                iters = round(chosen[arch] * ratio)
                # FGFI's teacher, when it is this run, goes first: the longest run, on which the FGFI runs wait
                teacher = args.teacher_factor == EQUAL_TIME_TEACHER and seed == args.seeds[0]
                new.append(Job(MAIN if teacher else EQUAL_TIME, -1 if teacher else len(queued),
                               (arch, "eqtime", seed), overrides, False, iters,
                               calibration.get(arch, {}).get("baseline", 0.0)))
                queued.add((arch, "eqtime", seed))
        return new

    queued: set = set()
    deadline = began + args.budget if args.budget else math.inf
    jobs += follow_up({})  # FGFI runs with a given --fgfi-teacher need not wait for anything
    results, skipped, failed = _run_jobs(configs, jobs, args.parallel, follow_up, deadline, args.report_only)
    for arch in args.arch if "fgfi" in args.method else []:
        if arch not in report.get("fgfi_teachers", {}):
            report.setdefault("fgfi_teachers_failed", {})[arch] = failed.get((arch, "fgfi_teacher", 0), "not run")
    report["not_run"] = [list(k) for k in skipped]
    report["failed"] = {" ".join(map(str, k)): v for k, v in failed.items()}

    for arch in args.arch:
        md = [regime_note(report["pretrained_regime"])] if args.regime == "pretrained" else []
        entry = report["archs"].setdefault(arch, {})
        entry["config"] = configs[arch]
        entry["iters"] = chosen[arch]
        seeds = [s for s in args.seeds if (arch, "baseline", s) in results and (arch, "lgd", s) in results]
        pairs = [(results[(arch, "baseline", s)], results[(arch, "lgd", s)]) for s in seeds]
        if pairs:
            entry["equal_iterations"] = {"seeds": seeds, "runs": pairs, "summary": summarise(pairs)}
            md.append(table(f"{arch}: equal iterations ({chosen[arch]} each), test split", seeds, pairs,
                            entry["equal_iterations"]["summary"]))
        eq_seeds = [s for s in seeds if (arch, "eqtime", s) in results]
        if eq_seeds:
            eq_pairs = [(results[(arch, "eqtime", s)], results[(arch, "lgd", s)]) for s in eq_seeds]
            ratio = entry["step_time_ratio"]
            entry["equal_time"] = {"factor": ratio, "seeds": eq_seeds, "runs": eq_pairs,
                                   "summary": summarise(eq_pairs)}
            md.append(table(f"{arch}: equal wall-clock time: baseline trained {ratio:.2f}x as many iterations "
                            f"({eq_pairs[0][0]['max_iter']}), schedule stretched; test split",
                            eq_seeds, eq_pairs, entry["equal_time"]["summary"]))

        def variant_rows(name: str, kind: str, extra: list[str]) -> list[tuple]:
            return [(name, ",".join(extra), seed, results[(arch, kind, seed)], results.get((arch, "baseline", seed)))
                    for seed in ablation_seeds if (arch, kind, seed) in results]

        fgfi_seeds = [s for s in seeds if (arch, "fgfi", s) in results]
        if fgfi_seeds:
            entry["methods"] = methods_summary([results[(arch, "baseline", s)] for s in fgfi_seeds],
                                               [results[(arch, "lgd", s)] for s in fgfi_seeds],
                                               [results[(arch, "fgfi", s)] for s in fgfi_seeds],
                                               report.get("fgfi_teachers", {}).get(arch, {}))
            md.append(methods_table(f"{arch}: baseline, LGD, FGFI at equal iterations ({chosen[arch]} each), seeds "
                                    f"{fgfi_seeds}, test split", entry["methods"]))
        rows = [row for n, e in (ablations if arch == first else []) for row in variant_rows(n, f"ablation:{n}", e)]
        if rows:
            rows = variant_rows("LGD (default)", "lgd", []) + rows
            entry["ablations"] = [{"name": n, "overrides": o, "seed": s, "run": r} for n, o, s, r, _ in rows]
            md.append(ablation_table(f"{arch}: ablations ({chosen[arch]} iterations), test split", rows))
        # both students and the teacher diagnostic on one figure: colour = what, line style = seed
        colours = {"baseline": "tab:blue", "lgd": "tab:orange", "teacher": "tab:green"}
        dashes = ["-", "--", ":", "-."]
        curves, styles = {}, {}
        for (a, kind, seed), run in sorted(results.items()):
            if a != arch or kind not in kinds:
                continue
            named = [(f"{'LGD student' if kind == 'lgd' else kind} seed {seed}", kind, run["val_curve"])]
            if kind == "lgd":
                named.append((f"LGD teacher diagnostic seed {seed}", "teacher", run.get("teacher_val_curve", [])))
            for name, what, points in named:
                if points:
                    curves[name] = points
                    styles[name] = {"color": colours[what], "linestyle": dashes[args.seeds.index(seed) % len(dashes)]}
        if curves:
            plot_ap_curves(curves, out / f"ap_vs_iter_{arch}.png", f"{arch}: val AP vs iteration", styles)
        not_run = [f"{k} seed {s}" for a, k, s in skipped if a == arch]
        not_run += [f"{k} seed {s} (failed: {why})" for (a, k, s), why in failed.items() if a == arch]
        if not_run:
            why = "not finished (--report-only)" if args.report_only else "would not have finished within --budget"
            md.append(f"Not run ({why}) or failed: " + ", ".join(not_run) + "\n")
        text = "\n".join(md)
        (out / f"accuracy_{arch}.md").write_text(text)
        print(text)
    report["wall_s"] = round(time.perf_counter() - began, 1)
    (out / f"accuracy_{'_'.join(args.arch)}.json").write_text(to_json(report, indent=1))
    return report


def fgfi_teacher_jobs(args, configs: dict, spec, sched: dict, chosen: dict) -> list[Job]:
    """The runs that train FGFI's teachers (none with ``--fgfi-teacher``): per architecture, the baseline recipe
    ``--teacher-factor`` times as long (schedule stretched, seed 0). They go first in the queue (negative order), as
    the longest runs on which the FGFI runs wait, and share the pool with the pairs, so that no lane idles while a
    teacher trains."""
    from lgd.config import load_config

    if args.fgfi_teacher or args.teacher_factor == EQUAL_TIME_TEACHER:
        return []
    factor = args.teacher_factor
    jobs = []
    for i, arch in enumerate(args.arch):
        base = spec(arch, 0, f"fgfi_teacher_x{factor:g}", ["distill.method=none"] + sched[arch])
        jobs.append(Job(MAIN, i - len(args.arch), (arch, "fgfi_teacher", 0),
                        stretched(base, load_config(configs[arch], AS_RECORDED + base), factor), False,
                        round(chosen[arch] * factor)))
    return jobs


def fgfi_teacher_record(args, arch: str, done: dict) -> dict | None:
    """FGFI's teacher of ``arch`` as the report gives it (file, test AP, training CPU seconds), or None while its
    training run is not finished."""
    if args.fgfi_teacher:
        return {"file": args.fgfi_teacher, "train_cpu_s": None}
    equal_time = args.teacher_factor == EQUAL_TIME_TEACHER
    run = done.get((arch, "eqtime", args.seeds[0]) if equal_time else (arch, "fgfi_teacher", 0))
    if run is None:
        return None
    return {"file": str(Path(run_dir(run["overrides"])) / "model_final.pth"), "factor": args.teacher_factor,
            "iters": run["max_iter"], "test": run["test"], "train_cpu_s": run["train_cpu_s"]}


def _teacher_factor(text: str) -> float | str:
    """``--teacher-factor``: a number > 0, or ``equal-time``."""
    if text == EQUAL_TIME_TEACHER:
        return text
    if not _is_positive_number(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0 or {EQUAL_TIME_TEACHER!r}")
    return float(text)


def fgfi_jobs(args, spec, sched: dict, chosen: dict, arch: str, teacher: dict, order: int) -> list[Job]:
    """The FGFI runs (``distill.method=fgfi``) of ``arch``, one per seed, distilling ``teacher["file"]``."""
    extra = (["fgfi.warmup_iters=1"] if args.quick else []) + args.fgfi_override
    return [Job(MAIN, order + i, (arch, "fgfi", seed),
                spec(arch, seed, "fgfi",
                     sched[arch] + extra + ["distill.method=fgfi", f"fgfi.teacher={teacher['file']}"]),
                False, chosen[arch])
            for i, seed in enumerate(args.seeds)]


def run_dir(overrides: list[str]) -> str:
    """The output_dir a run's overrides set (the last one given)."""
    return [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")][-1]


def methods_summary(baselines: list[dict], lgds: list[dict], fgfis: list[dict], teacher: dict) -> dict:
    """Mean (and std over seeds) test AP and training CPU seconds of each method, and the extra cost beyond the
    student's own: LGD minus baseline; the teacher's training plus FGFI minus baseline (issue 25).

    A run's CPU seconds count only when they cover its whole training: recorded with ``"resumed": false`` (a
    resumed run's count is the last process's part; a run recorded before the field existed cannot show it was
    not resumed). A method without such a run has ``train_cpu_s`` None, and the extra costs that need it None."""
    def stats(values: list[float]) -> dict | None:
        if not values:
            return None
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "runs": len(values)}

    out = {name: {"AP": stats([r["test"]["bbox/AP"] for r in runs]),
                  "train_cpu_s": stats([r["train_cpu_s"] for r in runs if r.get("resumed") is False])}
           for name, runs in (("baseline", baselines), ("lgd", lgds), ("fgfi", fgfis))}
    cpu = {name: (row["train_cpu_s"] or {}).get("mean") for name, row in out.items()}
    teacher_cpu = teacher.get("train_cpu_s")
    known = cpu["baseline"] is not None
    out["lgd"]["extra_cpu_s"] = cpu["lgd"] - cpu["baseline"] if known and cpu["lgd"] is not None else None
    out["fgfi"]["extra_cpu_s"] = (teacher_cpu + cpu["fgfi"] - cpu["baseline"]
                                  if known and None not in (teacher_cpu, cpu["fgfi"]) else None)
    lgd_extra, fgfi_extra = out["lgd"]["extra_cpu_s"], out["fgfi"]["extra_cpu_s"]
    out["lgd_over_fgfi_extra_cost"] = lgd_extra / fgfi_extra if lgd_extra is not None and fgfi_extra else None
    out["teacher"] = teacher
    return out


def methods_table(title: str, summary: dict) -> str:
    teacher = summary["teacher"]
    lines = [f"**{title}**", "", "| method | AP (mean ± std) | train CPU s | extra CPU s beyond the student's own |",
             "|---|---|---|---|"]
    for name, label in (("baseline", "baseline"), ("lgd", "LGD"), ("fgfi", "FGFI")):
        row = summary[name]
        extra = row.get("extra_cpu_s")
        cpu = row["train_cpu_s"]
        cpu_cell = f"{cpu['mean']:.0f} ({cpu['runs']} runs)" if cpu else "not known (no run measured whole)"
        lines.append(f"| {label} | {row['AP']['mean']:.2f} ± {row['AP']['std']:.2f} | "
                     f"{cpu_cell} | {'' if name == 'baseline' else _fmt(extra)} |")
    test_ap = teacher.get("test", {}).get("bbox/AP")
    lines += ["", f"FGFI teacher: {teacher.get('file')}" + (f", test AP {_fmt(test_ap)}" if test_ap is not None else "")
              + (f", trained in {teacher['train_cpu_s']:.0f} CPU s (counted in FGFI's extra cost)"
                 if teacher.get("train_cpu_s") is not None else ", training cost not known (--fgfi-teacher)"),
              f"Extra-cost ratio LGD / FGFI: {_fmt(summary['lgd_over_fgfi_extra_cost'])} (the paper: 0.49)", ""]
    return "\n".join(lines)


def _is_positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def prepare_pretrained_regime(quick: bool) -> tuple[dict, list[str]]:
    """Make (or find cached) the pretrained backbone and the target dataset of ``--regime pretrained``.

    Returns what the report records (weights file, SHA-256, pretraining cost and checks, whether this call paid
    that cost, the dataset folder) and the overrides that point every run at them. Runs in this process, before any
    run starts, so parallel runs never race to write them."""
    from pretrain_backbone import QUICK, RECIPE, cached, ensure_pretrained, paths
    from regime_data import ensure_target_dataset, regime_cache_dir, split_overrides

    cache = regime_cache_dir()
    recipe = QUICK if quick else RECIPE
    reused = cached(cache, recipe) is not None
    weights = ensure_pretrained(cache, recipe, progress=not quick)
    manifest = json.loads(paths(cache, recipe)["manifest"].read_text())
    # quick: a tiny target on 64 px images, like the built-in dataset's quick mode
    target = dict(num_train=12, num_val=4, num_test=4, size=64, min_px=8, max_px=24, max_objects=3) if quick else {}
    dataset = ensure_target_dataset(cache, **target)
    regime = {"weights": str(weights), "sha256": manifest["sha256"], "pretraining_cost": manifest["cost"],
              "pretraining_paid_here": not reused, "pretraining_checks": manifest["checks"], "dataset": str(dataset)}
    return regime, [f"model.backbone_weights={weights}"] + split_overrides(dataset)


def regime_note(regime: dict) -> str:
    """One Markdown paragraph: which backbone and dataset the runs used, and the pretraining's cost (counted once)."""
    cost = regime["pretraining_cost"]
    probe = regime["pretraining_checks"]["linear_probe"]
    paid = "paid by this invocation" if regime["pretraining_paid_here"] else "paid once before; the file was cached"
    return (f"Pretrained regime: backbone `{Path(regime['weights']).name}` (SHA-256 {regime['sha256'][:16]}...), "
            f"pretraining {cost['wall_s'] / 60:.1f} min wall-clock / {cost['cpu_s'] / 60:.1f} min CPU ({paid}); "
            f"held-out accuracy {regime['pretraining_checks']['heldout_accuracy']:.3f}, linear probe on target crops "
            f"{probe['pretrained']:.3f} vs {probe['random_init']:.3f} at random init; target "
            f"`{Path(regime['dataset']).name}`.\n")


def _calibrate(configs: dict, probes: list[tuple[tuple[str, str], list[str]]], parallel: int) -> dict:
    """Median seconds per step of every (arch, kind) among ``probes`` (key, overrides), all run side by side."""
    with ProcessPoolExecutor(max_workers=max(parallel, len(probes)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(key, pool.submit(calibrate_one, configs[key[0]], o)) for key, o in probes]
        times = [(key, f.result()) for key, f in futures]
    out: dict = {}
    for (arch, kind), _ in probes:
        out.setdefault(arch, {})[kind] = statistics.median(t for key, t in times if key == (arch, kind))
    return out


def _choose_iters(args, calibration: dict, seconds: float) -> dict:
    """The longest --iters whose equal-iteration (and equal-time) runs fit ``seconds`` at the calibrated speeds.

    All equal-iteration runs start together; the equal-time baselines start when they end and take about as long as
    the LGD runs, so the wall time is about (1 or 2) x iterations x LGD's slowest seconds per step."""
    slowest = max(c["lgd"] for c in calibration.values())
    main_runs = len(args.arch) * len(args.seeds) * 2
    waves = math.ceil(main_runs / args.parallel) + (0 if args.no_equal_time else 1)
    # 15% for evaluations, process start-up and stragglers
    fits = [n for n in sorted(args.iters) if waves * n * slowest * 1.15 <= seconds]
    if not fits:
        print(f"warning: no --iters fits {seconds:.0f} s at {slowest:.3f} s/step; using the shortest, {min(args.iters)}"
              " (runs that would not finish are not started)", flush=True)
    return {a: (fits or [min(args.iters)])[-1] for a in args.arch}


def _run_jobs(configs: dict, jobs: list[Job], parallel: int, follow_up,
              deadline: float, finished_only: bool = False) -> tuple[dict, list, dict]:
    """Run jobs by priority, at most ``parallel`` at a time; a job whose estimated time would pass the deadline is
    not started, nor, with ``finished_only``, one without a finished run to reuse (``finished``).
    ``follow_up(results)`` may add jobs as results arrive.

    Returns (results by job key, keys not started, failure message by job key)."""
    pending = sorted(jobs)
    running: dict[Future, Job] = {}
    results: dict = {}
    skipped: list = []
    failed: dict = {}
    previous = signal.signal(signal.SIGTERM, stop_workers)
    try:
        with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            while pending or running:
                while pending and len(running) < parallel:
                    job = pending.pop(0)
                    # The equal-iteration pairs always run (the schedule was sized for them): half a pair is worthless.
                    late = time.perf_counter() + job.iters * job.seconds_per_iter * 1.1 > deadline
                    if (job.priority != MAIN and late) or (finished_only and not finished(job.overrides)):
                        skipped.append(job.key)
                        continue
                    running[pool.submit(run_one, configs[job.key[0]], job.overrides, job.teacher)] = job
                if not running:
                    break
                ended, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in ended:
                    job = running.pop(future)
                    try:
                        results[job.key] = future.result()
                    except Exception as error:  # noqa: BLE001 - one failed run must not lose the others' results
                        failed[job.key] = f"{type(error).__name__}: {error}"
                        print(f"FAILED {job.key}: {failed[job.key]}", flush=True)
                        continue
                    print(f"done {job.key}: test AP {results[job.key]['test']['bbox/AP']:.2f} "
                          f"({results[job.key]['wall_s']:.0f} s)", flush=True)
                pending = sorted(pending + follow_up(results))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results, skipped, failed


def finished(overrides: list[str]) -> bool:
    """Whether the run of ``overrides`` has finished: its folder's result.json was written with these overrides
    (the test ``run_one`` makes before reusing it)."""
    done = Path(run_dir(overrides)) / "result.json"
    return done.is_file() and json.loads(done.read_text()).get("overrides") == overrides


def stop_workers(signum: int, frame=None) -> None:
    """SIGTERM to the benchmark stops its runs too, then exits with 128 + signum.

    The pool's workers are processes of their own: were the parent killed alone, they would train on as orphans,
    and a restarted benchmark would resume the same run folders beside them (two writers of one metrics.jsonl and
    last.pth). Each worker is sent SIGTERM, on which its run checkpoints and stops (lgd's signal handling), so the
    restart continues from there.
    """
    for child in multiprocessing.active_children():
        child.terminate()
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main(sys.argv[1:])
