"""The benchmark scripts in quick mode, so they never rot. No timing is asserted."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_benchmark_quick(tmp_path):
    report = _load("cost").main(["--quick", "--out", str(tmp_path)])
    step = next(iter(report["steps"].values()))
    assert step["lgd_step_s"] > 0 and step["baseline_step_s"] > 0
    assert report["inference"]["parameters_identical"] is True
    assert {r["objects"] for r in report["scaling"]} == {1, 10}
    assert json.loads((tmp_path / "cost.json").read_text())["command"].endswith("--quick")
    assert (tmp_path / "cost.md").read_text().count("|") > 10
    assert (tmp_path / "teacher_scaling.png").stat().st_size > 0


def test_accuracy_benchmark_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    report = _load("accuracy").main(["--quick", "--seeds", "0", "--parallel", "1", "--out", str(tmp_path)])
    base, lgd = report["equal_iterations"]["runs"][0]
    assert set(base["test"]) >= {"bbox/AP", "bbox/AP50", "bbox/AP75"}
    assert report["equal_time"]["factor"] > 0
    assert len(report["equal_time"]["runs"]) == 1
    assert (tmp_path / "accuracy_retinanet.md").is_file()
    assert (tmp_path / "ap_vs_iter_retinanet.png").is_file()
