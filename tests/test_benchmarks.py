"""The benchmark scripts in quick mode, so they never rot. No timing is asserted."""
import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name: str):
    """Import a benchmark script by its plain name (spawned worker processes must import it the same way)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


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
    report = _load("accuracy").main(["--quick", "--seeds", "0", "--parallel", "2", "--out", str(tmp_path),
                                     "--ablation", "no_distill:lgd.distill_weight=0"])
    retinanet = report["archs"]["retinanet"]
    base, lgd = retinanet["equal_iterations"]["runs"][0]
    assert set(base["test"]) >= {"bbox/AP", "bbox/AP50", "bbox/AP75"}
    assert "bbox/AP" in lgd["teacher_test"] and "teacher_test" not in base
    assert retinanet["equal_time"]["factor"] > 0
    eq_base, _ = retinanet["equal_time"]["runs"][0]
    assert eq_base["max_iter"] == round(4 * retinanet["equal_time"]["factor"])
    assert [a["name"] for a in retinanet["ablations"]] == ["LGD (default)", "no_distill"]
    assert (tmp_path / "runs" / "retinanet" / "ablation_no_distill_s0" / "result.json").is_file()
    assert (tmp_path / "accuracy_retinanet.md").is_file()
    assert (tmp_path / "ap_vs_iter_retinanet.png").is_file()


def _same(a, b) -> bool:
    """Equal as JSON: NaN equals NaN, tuples equal lists."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_accuracy_benchmark_keeps_finished_runs_and_resumes_unfinished_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    args = ["--quick", "--seeds", "0", "--parallel", "1", "--out", str(tmp_path), "--no-equal-time"]
    first = _load("accuracy").main(args)["archs"]["retinanet"]["equal_iterations"]["runs"][0]
    runs = tmp_path / "runs" / "retinanet"
    (runs / "lgd_s0" / "result.json").unlink()  # as if LGD had been stopped after its last checkpoint
    baseline_result = (runs / "baseline_s0" / "result.json").stat().st_mtime_ns
    second = _load("accuracy").main(args)["archs"]["retinanet"]["equal_iterations"]["runs"][0]
    assert (runs / "baseline_s0" / "result.json").stat().st_mtime_ns == baseline_result  # not trained again
    assert _same(second[0], first[0])
    assert _same(second[1]["test"], first[1]["test"])  # resumed from the final checkpoint: the same model


def test_accuracy_benchmark_budget_chooses_a_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    report = _load("accuracy").main(["--quick", "--seeds", "0", "--parallel", "2", "--out", str(tmp_path),
                                     "--no-equal-time", "--budget", "600", "--iters", "4", "6", "100000"])
    assert report["calibration_s_per_iter"]["retinanet"]["lgd"] > 0
    assert report["chosen_iters"] == {"retinanet": 6}
    assert report["archs"]["retinanet"]["equal_iterations"]["runs"][0][1]["max_iter"] == 6


def test_profile_step_quick(capsys):
    _load("profile_step").main(["--quick", "--rows", "5"])
    out = capsys.readouterr().out
    assert "=== baseline" in out and "=== LGD" in out
    assert "aten::" in out


def test_scaling_benchmark_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    report = _load("scaling").main(["--quick", "--out", str(tmp_path)])
    assert set(report["runs"]) == {"1 process, fp32", "2 processes (torchrun, gloo), fp32", "1 process, bf16 autocast"}
    assert report["runs"]["2 processes (torchrun, gloo), fp32"]["processes"] == 2
    assert all(r["images_per_s"] > 0 and r["global_batch"] == 2 for r in report["runs"].values())
    assert report["two_process_speedup"] > 0 and report["bf16_speedup"] > 0
    assert json.loads((tmp_path / "scaling.json").read_text())["command"].endswith("--quick")
    assert (tmp_path / "scaling.md").read_text().count("|") > 10
