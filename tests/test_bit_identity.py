"""Training computes exactly what it computed before the harness was restructured (issue 16).

A few steps of LGD and of the baseline, for RetinaNet and Faster R-CNN, must log the per-step losses, learning
rates, final weights and val metrics recorded in ``tests/data/recorded_training.json``. The values were recorded
with this very function on commit da63fa2 (``lgd/engine.py`` still whole), on the CPU with one thread: any
change of the loop, the optimisers, the schedule windows or the evaluation that alters a single bit fails here.
They hold for the torch version recorded beside them; another version may compute other bits and is skipped.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from lgd.checkpoint import FINAL, load_checkpoint
from lgd.training import train

RECORDED = Path(__file__).parent / "data" / "recorded_training.json"
CASES = [("retinanet", True), ("retinanet", False), ("fasterrcnn", True), ("fasterrcnn", False)]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensor bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def training_record(cfg) -> dict:
    """What a run computed: its train records (wall time left out), final weights' digest and val metrics."""
    out = train(cfg, progress=False)
    run = Path(cfg.output_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "train"]
    return {"steps": steps, "final_state": state_digest(load_checkpoint(run / FINAL)["model"]),
            "metrics": out["metrics"]}


@pytest.fixture
def one_thread():
    """One CPU thread (reductions split over threads may round differently), restored afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch,lgd", CASES, ids=[f"{a}-{'lgd' if on else 'baseline'}" for a, on in CASES])
def test_training_is_bit_identical_to_the_recording(tiny_config, one_thread, arch, lgd):
    recorded = json.loads(RECORDED.read_text())
    if recorded["torch"] != torch.__version__:
        pytest.skip(f"values recorded with torch {recorded['torch']}, this is {torch.__version__}")
    cfg = tiny_config(f"model.arch={arch}", f"lgd.enabled={str(lgd).lower()}", "device=cpu", "threads=1")
    got = training_record(cfg)
    want = recorded["runs"][f"{arch}-{'lgd' if lgd else 'baseline'}"]
    for step_got, step_want in zip(got["steps"], want["steps"]):
        assert step_got == step_want, f"iteration {step_want['iter']}"
    assert len(got["steps"]) == len(want["steps"])
    assert got["final_state"] == want["final_state"]
    assert json.dumps(got["metrics"]) == json.dumps(want["metrics"])  # as text: NaN (no such objects) == NaN
