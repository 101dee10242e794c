"""Training computes exactly what it computed before the harness was restructured (issue 16).

A few steps of LGD and of the baseline, for RetinaNet and Faster R-CNN, must log the per-step losses, learning
rates, final weights and val metrics recorded in ``tests/data/recorded_training.json``, on the CPU with one thread:
any change of the loop, the optimisers, the schedule windows or the evaluation that alters a single bit fails here.

The bits depend on the processor as well as on torch: the kernels torch picks (AVX2, AVX-512) and the vendor's
rounding differ by the last bit of a float, so each recording is kept per processor. The first recording was made
on commit da63fa2 (``lgd/engine.py`` still whole); one for another processor is added by running this file as a
script (``python tests/test_bit_identity.py``) on a commit that passes here on a recorded processor. On a processor
with no recording the values must still agree to a relative 1e-3 with the first recording: far tighter than any
change of the computation (a reordered random stream or a moved schedule window changes the first digits), looser
than rounding grown over four steps (1.4e-4 seen between an AMD EPYC and the first machine). Another torch version
may compute other bits and is skipped.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lgd.config import load_config
from lgd.engine.checkpoint import FINAL, load_checkpoint
from lgd.engine.training import train

RECORDED = Path(__file__).parent / "data" / "recorded_training.json"
CASES = [("retinanet", True), ("retinanet", False), ("fasterrcnn", True), ("fasterrcnn", False)]
RELATIVE = 1e-3


def processor() -> str:
    """This machine's processor as the recordings are keyed: torch's CPU kernel level and the model name."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{torch.backends.cpu.get_cpu_capability()} {model}"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensor bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def training_record(cfg) -> dict:
    """What a run computed: its train records (wall time left out), final weights' digest and val metrics."""
    before = torch.get_num_threads()
    try:
        out = train(cfg, progress=False)
    finally:
        torch.set_num_threads(before)
    run = Path(cfg.output_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "train"]
    return {"steps": steps, "final_state": state_digest(load_checkpoint(run / FINAL)["model"]),
            "metrics": out["metrics"]}


def case_overrides(arch: str, lgd: bool) -> list[str]:
    return [f"model.arch={arch}", f"lgd.enabled={str(lgd).lower()}", "device=cpu", "threads=1"]


def case_name(arch: str, lgd: bool) -> str:
    return f"{arch}-{'lgd' if lgd else 'baseline'}"


def assert_close(got, want, where: str) -> None:
    """``got`` equals ``want`` in structure, and its numbers to a relative ``RELATIVE`` (NaN equals NaN)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, float) or isinstance(got, float):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=RELATIVE, abs=1e-9), where
    else:
        assert got == want, where


@pytest.mark.parametrize("arch,lgd", CASES, ids=[case_name(a, on) for a, on in CASES])
def test_training_is_bit_identical_to_the_recording(tiny_config, arch, lgd):
    recorded = json.loads(RECORDED.read_text())
    if recorded["torch"] != torch.__version__:
        pytest.skip(f"values recorded with torch {recorded['torch']}, this is {torch.__version__}")
    got = training_record(tiny_config(*case_overrides(arch, lgd)))
    here = [r for r in recorded["recordings"] if r["processor"] == processor()]
    want = (here or recorded["recordings"])[0]["runs"][case_name(arch, lgd)]
    assert len(got["steps"]) == len(want["steps"])
    if here:
        for step_got, step_want in zip(got["steps"], want["steps"]):
            assert step_got == step_want, f"iteration {step_want['iter']}"
        assert got["final_state"] == want["final_state"]
        assert json.dumps(got["metrics"]) == json.dumps(want["metrics"])  # as text: NaN (no such objects) == NaN
    else:
        for step_got, step_want in zip(got["steps"], want["steps"]):
            assert_close(step_got, step_want, f"iteration {step_want['iter']}")
        assert_close(got["metrics"], want["metrics"], "metrics")


def record_this_processor(commit: str) -> None:
    """Run every case here and add (or replace) this processor's recording in ``RECORDED``."""
    from helpers import tiny_overrides
    from lgd.data.synthetic import write_synthetic

    recorded = json.loads(RECORDED.read_text())
    if recorded["torch"] != torch.__version__:
        raise SystemExit(f"{RECORDED} holds torch {recorded['torch']}, this is {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        write_synthetic(root, seed=0, num_train=16, num_val=6, num_test=4, size=64, progress=False)
        runs = {}
        for arch, lgd in CASES:
            out = Path(tmp) / case_name(arch, lgd)
            runs[case_name(arch, lgd)] = training_record(
                load_config(None, tiny_overrides(root, out) + case_overrides(arch, lgd)))
    first = recorded["recordings"][0]["runs"]
    for name, run in runs.items():
        for step_got, step_want in zip(run["steps"], first[name]["steps"]):
            assert_close(step_got, step_want, f"{name} iteration {step_want['iter']}")
    recorded["recordings"] = [r for r in recorded["recordings"] if r["processor"] != processor()]
    recorded["recordings"].append({"processor": processor(), "commit": commit, "runs": runs})
    RECORDED.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"recorded {len(runs)} runs for {processor()} in {RECORDED}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    record_this_processor(sys.argv[1] if len(sys.argv) > 1 else "unknown")
