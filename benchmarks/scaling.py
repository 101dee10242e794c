"""Training throughput: 2 data-parallel processes (torchrun, gloo) against 1, and bf16 autocast against fp32.

    python benchmarks/scaling.py                 # the demo config, 40 iterations per run (a few minutes, 2 cores)
    python benchmarks/scaling.py --quick         # tiny sizes, about a minute (the test suite runs this)

Every run is ``lgd train`` with the same config and global batch (the 1-process runs in this process, the
2-process one under torchrun). Throughput is images per second of training steps, from the per-iteration
times in metrics.jsonl, the first logging window (warm-up) left out. On a CPU the cores are shared out: one
process uses all of them as threads, two processes half each (``threads`` and OMP_NUM_THREADS), so the
2-process figure measures data parallelism against intra-op threading on the same hardware.
Writes benchmarks/results/scaling.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from lgd.config import load_config
from lgd.engine.training import train
from lgd.utils.files import to_json

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
DEMO = ROOT / "configs" / "synthetic_retinanet_lgd.yaml"
# 128 px as in the demo: at 64 px or less, torch's CPU bf16 convolution backward may return NaN gradients
# (a oneDNN fault with stride-2 convolutions on 1x1 maps, FPN's P7), which lgd stops on.
QUICK = ["data.synth.num_train=16", "data.synth.num_val=4", "data.synth.num_test=4", "data.synth.size=64",
         "model.fpn_channels=32", "model.min_size=[128]", "model.max_size=128", "data.batch_size=2",
         "solver.reference_batch_size=2", "data.eval_batch_size=4", "data.workers=0"]


def run(config: Path, overrides: list[str], processes: int, threads: int, out: Path) -> dict:
    """Train with ``processes`` processes of ``threads`` threads each; seconds per iteration and images/s.

    One process trains here, in this process (the timing covers training steps only, so how it was started
    does not matter); several are started by torchrun.
    """
    overrides = overrides + [f"output_dir={out}", f"threads={threads}"]
    if processes == 1:
        previous = torch.get_num_threads()
        try:
            train(load_config(config, overrides), progress=False)
        finally:
            torch.set_num_threads(previous)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "lgd", "train", "-c", str(config), "--no-progress", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r["kind"] == "train"]
    seconds = statistics.mean(times[1:] or times)
    batch = load_config(config, overrides).data.batch_size
    return {"processes": processes, "threads_per_process": threads, "seconds_per_iter": seconds,
            "images_per_s": batch / seconds, "global_batch": batch, "windows": len(times)}


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['machine']} (torch {report['torch']}). "
             f"Command: `{report['command']}`", "",
             f"Config: `{report['config']}` {' '.join(report['overrides'])}; global batch {report['global_batch']}, "
             f"{report['iterations']} iterations per run, the first {report['log_period']} (warm-up) not timed.", "",
             "| run | processes x threads | precision | s/iter | images/s | vs 1 process fp32 |",
             "|---|---|---|---|---|---|"]
    ref = report["runs"]["1 process, fp32"]["images_per_s"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['processes']} x {r['threads_per_process']} | {r['amp']} | "
                     f"{r['seconds_per_iter']:.3f} | {r['images_per_s']:.2f} | **{r['images_per_s'] / ref:.2f}x** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--config", default=str(DEMO), help="the config to train (default: the demo)")
    parser.add_argument("--iters", type=int, default=40, help="iterations per run (default 40)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores to share out (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for scaling.json and scaling.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iters, log_period = (2, 1) if args.quick else (args.iters, 10)
    # Past pre-distillation, so that the student also gets the distillation gradient, as in most of a run.
    overrides = (QUICK if args.quick else []) + [
        f"solver.max_iter={iters}", f"log_period={log_period}", f"checkpoint_period={iters}", "eval_period=0",
        "lgd.pre_distill_iters=0", "solver.scale_schedule=false"]  # the recipe's warm-up and steps, as measured
    config = Path(args.config)
    cores = max(args.cores, 2)
    plan = {
        "1 process, fp32": (1, cores, "none"),
        "2 processes (torchrun, gloo), fp32": (2, cores // 2, "none"),
        "1 process, bf16 autocast": (1, cores, "bf16"),
    }
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lgd-scaling-") as tmp:
        for i, (name, (processes, threads, amp)) in enumerate(plan.items()):
            r = run(config, overrides + [f"solver.amp={amp}"], processes, threads, Path(tmp) / str(i))
            runs[name] = {**r, "amp": amp}
            print(f"{name}: {r['images_per_s']:.2f} images/s", flush=True)
    one = runs["1 process, fp32"]["images_per_s"]
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__,
        "command": "python benchmarks/scaling.py" + (" --quick" if args.quick else ""),
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "overrides": overrides, "iterations": iters, "log_period": log_period,
        "global_batch": runs["1 process, fp32"]["global_batch"], "runs": runs,
        "two_process_speedup": runs["2 processes (torchrun, gloo), fp32"]["images_per_s"] / one,
        "bf16_speedup": runs["1 process, bf16 autocast"]["images_per_s"] / one,
    }
    (out / "scaling.json").write_text(to_json(report, indent=1))
    (out / "scaling.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
