"""The benchmark scripts in quick mode, so they never rot. No timing is asserted."""
import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import pytest

from lgd.utils.files import to_json

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
    """Equal as result.json stores them: NaN as null, tuples as lists."""
    return to_json(a, sort_keys=True) == to_json(b, sort_keys=True)


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


# ----------------------------------------------------------------------------- the pretrained regime (issue 13)


def test_pretrained_backbone_is_deterministic_cached_and_loads_into_the_detector(tmp_path):
    import warnings

    import torch

    from lgd.config import ModelConfig
    from lgd.detectors import build_backbone

    pb = _load("pretrain_backbone")
    first = pb.pretrain(tmp_path / "a", pb.QUICK, progress=False)
    again = pb.pretrain(tmp_path / "b", pb.QUICK, progress=False)
    assert first["sha256"] == again["sha256"]  # same recipe, same bytes
    assert first["cost"]["wall_s"] > 0 and {"heldout_accuracy", "linear_probe"} <= set(first["checks"])
    probe = first["checks"]["linear_probe"]
    assert 0 <= probe["pretrained"] <= 1 and 0 <= probe["random_init"] <= 1 and probe["eval_crops"] > 0

    weights = pb.paths(tmp_path / "a", pb.QUICK)["weights"]
    state = torch.load(weights, map_location="cpu", weights_only=True)  # a plain state dict of tensors
    assert not any(k.startswith("fc.") for k in state) and "layer4.1.bn2.running_var" in state
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lgd warns when it skips tensors of other shapes
        body = build_backbone(ModelConfig(depth=18, norm="frozen_bn", backbone_weights=str(weights)), True).body
    own = body.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer3.1.bn2.bias"):
        assert torch.equal(own[key], state[key]), key

    mtime = weights.stat().st_mtime_ns
    assert pb.ensure_pretrained(tmp_path / "a", pb.QUICK, progress=False) == weights
    assert weights.stat().st_mtime_ns == mtime  # cached: not trained again
    with open(weights, "ab") as f:
        f.write(b"x")
    with pytest.warns(UserWarning, match="SHA-256"):
        pb.ensure_pretrained(tmp_path / "a", pb.QUICK, progress=False)
    assert pb.cached(tmp_path / "a", pb.QUICK)["sha256"] == first["sha256"]  # trained again, the same bytes
    other = dataclasses.replace(pb.QUICK, steps=4)
    assert pb.paths(tmp_path, other)["weights"] != weights  # another recipe, another file


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    pb = _load("pretrain_backbone")
    recipe = dataclasses.replace(pb.QUICK, steps=4)
    whole = pb.pretrain(tmp_path / "whole", recipe, progress=False)
    monkeypatch.setattr(pb, "CHECKPOINT_EVERY", 2)
    real, calls = pb.pretrain_batch, []

    def stop_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pb, "pretrain_batch", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pb.pretrain(tmp_path / "cut", recipe, progress=False)
    assert pb.paths(tmp_path / "cut", recipe)["partial"].is_file()
    monkeypatch.setattr(pb, "pretrain_batch", real)
    resumed = pb.pretrain(tmp_path / "cut", recipe, progress=False)
    assert resumed["sha256"] == whole["sha256"]
    assert "resuming at step 2" in pb.paths(tmp_path / "cut", recipe)["log"].read_text()
    assert not pb.paths(tmp_path / "cut", recipe)["partial"].exists()


def test_target_dataset_is_deterministic_coco_and_disjoint_from_pretraining(tmp_path):
    from lgd.data.coco import CocoDetection

    rd = _load("regime_data")
    params = dict(num_train=3, num_val=2, num_test=2, size=64, min_px=8, max_px=24, max_objects=4)
    a = rd.ensure_target_dataset(tmp_path / "a", **params)
    b = rd.ensure_target_dataset(tmp_path / "b", **params)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    for split in rd.SPLITS:
        doc = json.loads((a / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in doc["categories"]] == list(rd.TARGET_CLASSES)
        assert doc["annotations"]
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert 0 < ann["area"] <= w * h and w >= 1 and h >= 1
        assert len(CocoDetection(a / split, a / "annotations" / f"instances_{split}.json")) == len(doc["images"])
    licences = (a / "LICENSES.txt").read_text()
    assert all(name in licences for name, _ in rd.PHOTOS)
    assert not set(rd.TARGET_CLASSES) & set(rd.PRETRAIN_CLASSES)
    assert not set(rd.TARGET_TEXTURES) & set(rd.PRETRAIN_TEXTURES)
    with pytest.raises(ValueError, match="min_px"):
        rd.ensure_target_dataset(tmp_path / "c", size=64, min_px=2)
    with pytest.raises(TypeError, match="unknown"):
        rd.ensure_target_dataset(tmp_path / "c", num_classes=3)


def test_regime_recipes_scale_the_reference_schedule():
    from lgd.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for arch, lr in (("fcos", 0.01), ("retinanet", 0.01), ("fasterrcnn", 0.02)):
        cfg = load_config(configs / f"regime_{arch}_lgd.yaml")
        n = cfg.solver.max_iter
        assert cfg.model.arch == arch and (cfg.solver.base_lr, cfg.lgd.teacher_lr) == (lr, lr)
        assert cfg.solver.steps == [round(n * 2 / 3), round(n * 8 / 9)]  # reference 120k, 160k of 180k
        assert cfg.lgd.pre_distill_iters == round(n * 30 / 180) and cfg.lgd.freeze_backbone_iters == round(n * 20 / 180)
        assert cfg.model.norm == "frozen_bn" and cfg.model.backbone_weights and cfg.data.train.root
        assert cfg.solver.warmup_iters > 0 and (cfg.solver.clip_type, cfg.solver.clip_value) == ("value", 1.0)


def test_accuracy_benchmark_pretrained_regime_quick(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    args = ["--quick", "--regime", "pretrained", "--arch", "fcos", "--seeds", "0", "--parallel", "2",
            "--no-equal-time", "--out", str(tmp_path)]
    report = _load("accuracy").main(args)
    regime = report["pretrained_regime"]
    assert regime["pretraining_paid_here"] is True and regime["pretraining_cost"]["wall_s"] > 0
    assert Path(regime["weights"]).parent == tmp_path / "cache" / "regime"
    base, lgd = report["archs"]["fcos"]["equal_iterations"]["runs"][0]
    assert "bbox/AP" in lgd["teacher_test"]
    for run in (base, lgd):
        assert f"model.backbone_weights={regime['weights']}" in run["overrides"]
        assert f"data.test.root={Path(regime['dataset']) / 'test'}" in run["overrides"]
    # The runs trained from the pretrained body: the frozen stem ends exactly as pretrained.
    pretrained = torch.load(regime["weights"], map_location="cpu", weights_only=True)
    final = torch.load(tmp_path / "runs" / "fcos" / "lgd_s0" / "model_final.pth", map_location="cpu",
                       weights_only=False)["model"]
    stem = next(v for k, v in final.items() if k.endswith("backbone.body.conv1.weight"))
    assert torch.equal(stem, pretrained["conv1.weight"])
    assert "Pretrained regime:" in (tmp_path / "accuracy_fcos.md").read_text()
    # Each run records the body it began from; a folder begun from other bytes is refused, not paired.
    accuracy = _load("accuracy")
    run = tmp_path / "runs" / "fcos" / "lgd_s0"
    assert lgd["backbone_weights_sha256"] == regime["sha256"] == (run / accuracy.BODY_STAMP).read_text().strip()
    from lgd.config import load_config

    cfg = load_config(run / "config.yaml")
    assert accuracy.same_body(cfg) == regime["sha256"]
    (run / accuracy.BODY_STAMP).write_text("0" * 64 + "\n")  # as if the cache had been re-made on another CPU
    with pytest.raises(RuntimeError, match="began from backbone weights 0000.*give another --out"):
        accuracy.same_body(cfg)
    (run / accuracy.BODY_STAMP).unlink()  # a finished run from before the stamp
    with pytest.raises(RuntimeError, match="predates the stamp"):
        accuracy.same_body(cfg)
    again, overrides = _load("accuracy").prepare_pretrained_regime(quick=True)  # what a second invocation does first
    assert again["pretraining_paid_here"] is False and again["sha256"] == regime["sha256"]
    assert set(overrides) <= set(lgd["overrides"])


def test_attention_stats_measures_own_label_same_class_and_entropy():
    import torch

    stats = _load("teacher_probe").attention_stats
    # one image: two objects of class 0 and the context box; object 0 looks only at its own label, object 1
    # spreads its attention evenly over the three keys
    weights = torch.tensor([[[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]]])
    classes = torch.tensor([[0, 0, -1]])
    valid = torch.tensor([[True, True, True]])
    is_context = torch.tensor([[False, False, True]])
    got = stats(weights, classes, valid, is_context)
    assert got["objects"] == 2  # the context box is a key, never a query
    assert got["own"] == pytest.approx((1 + 1 / 3) / 2) and got["own_chance"] == pytest.approx(1 / 3)
    assert got["same_class"] == pytest.approx((1 + 2 / 3) / 2) and got["same_class_chance"] == pytest.approx(2 / 3)
    assert got["argmax_own"] == pytest.approx(0.5)  # object 1's largest weight (a tie) is not its own label
    assert got["entropy"] == pytest.approx(0.5)  # 0 for the one-hot row, 1 for the uniform one


@pytest.mark.parametrize("arch", ["fcos", "fasterrcnn"])
def test_teacher_probe_measures_a_trained_lgd_checkpoint(tiny_config, tmp_path, capsys, arch):
    from lgd.engine.training import train

    cfg = tiny_config(f"model.arch={arch}", "solver.max_iter=2", "threads=1")
    train(cfg, progress=False)
    run = Path(cfg.output_dir)
    out = tmp_path / "probe.jsonl"
    (record,) = _load("teacher_probe").main(["-c", str(run / "config.yaml"), "--checkpoints",
                                             str(run / "model_final.pth"), "--batches", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["iteration"] == 2
    levels = len(record["distill_per_level"])
    assert levels == len(record["attention"]) == 5
    for level in record["attention"]:
        assert 0 <= level["entropy"] <= 1 + 1e-6 and 0 <= level["own"] <= 1 and level["objects"] > 0
    grads = record["grad_norm"]
    assert grads["head"]["student"] > 0 and grads["head"]["teacher"] > 0  # the teacher's pass trains the head too
    assert grads["head"]["distill"] == 0  # distillation acts on features, never on the head
    assert grads["fpn"]["distill"] > 0  # past pre-distillation (1 iteration) the student learns from the teacher
    assert "loss_distill" in record["losses"] and any(k.startswith("teacher/") for k in record["losses"])
    transfer = record["transfer"]
    assert len(transfer["distill_inside_per_level"]) == len(transfer["distill_outside_per_level"]) == levels
    # a coarse level can lie wholly inside or wholly outside the objects (0 there); the finest holds both
    assert transfer["distill_inside_per_level"][0] > 0 and transfer["distill_outside_per_level"][0] > 0
    assert all(v >= 0 for v in transfer["distill_inside_per_level"] + transfer["distill_outside_per_level"])
    assert math.isfinite(transfer["head_gain"])
    projections = record["attention_projections"]
    assert projections["q_grad"] > 0 and projections["k_grad"] > 0 and projections["v_grad"] > 0
    assert 0.5 < projections["q_norm"] / projections["init_norm"] < 2  # two steps from xavier_uniform_
    assert 0 < projections["q_moved"] < 0.5  # the initial weights rebuilt from the seed: two small steps away
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith("| 2 | ") and table[-1].count("|") == table[-3].count("|") == 11


def test_accuracy_benchmark_takes_or_measures_the_equal_time_factor(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    common = ["--quick", "--seeds", "0", "--parallel", "2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        _load("accuracy").main(common + ["--step-ratio", "fcos=2"])  # not among --arch
    with pytest.raises(SystemExit):
        _load("accuracy").main(common + ["--step-ratio", "retinanet=-1"])
    given = _load("accuracy").main(common + ["--step-ratio", "retinanet=2.5"])["archs"]["retinanet"]
    assert given["equal_time"]["factor"] == 2.5
    assert given["equal_time"]["runs"][0][0]["max_iter"] == 10  # 4 iterations x 2.5
    assert given["step_time_ratio_source"].startswith("given")
    _load("accuracy").main(common + ["--no-equal-time", "--measure-step-ratio", "1"])
    measured = json.loads((tmp_path / "step_ratio_retinanet.json").read_text())
    assert len(measured["rounds_s_per_iter"]) == 1 and measured["ratio"] > 0


def _sleep_until_terminated() -> None:
    import time

    time.sleep(60)


def test_sigterm_to_the_accuracy_benchmark_stops_its_runs_too():
    """Killed alone, the benchmark would leave its pool's workers training on as orphans."""
    import multiprocessing

    worker = multiprocessing.get_context("spawn").Process(target=_sleep_until_terminated)
    worker.start()
    with pytest.raises(SystemExit) as stopped:
        _load("accuracy").stop_workers(15)
    worker.join(timeout=20)
    assert stopped.value.code == 143
    assert not worker.is_alive() and worker.exitcode == -15


def test_accuracy_benchmark_fgfi_trains_its_teacher_beside_the_pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    report = _load("accuracy").main(["--quick", "--seeds", "0", "--parallel", "2", "--no-equal-time", "--out",
                                     str(tmp_path), "--method", "lgd", "fgfi", "--teacher-factor", "2"])
    teacher = report["fgfi_teachers"]["retinanet"]
    assert teacher["iters"] == 8 and teacher["train_cpu_s"] > 0 and Path(teacher["file"]).is_file()
    methods = report["archs"]["retinanet"]["methods"]
    fgfi_run = json.loads((tmp_path / "runs" / "retinanet" / "fgfi_s0" / "result.json").read_text())
    assert f"fgfi.teacher={teacher['file']}" in fgfi_run["overrides"] and "distill.method=fgfi" in fgfi_run["overrides"]
    assert methods["fgfi"]["extra_cpu_s"] == pytest.approx(
        teacher["train_cpu_s"] + fgfi_run["train_cpu_s"] - methods["baseline"]["train_cpu_s"]["mean"])
    assert methods["lgd_over_fgfi_extra_cost"] == pytest.approx(methods["lgd"]["extra_cpu_s"]
                                                                / methods["fgfi"]["extra_cpu_s"])
    assert "FGFI" in (tmp_path / "accuracy_retinanet.md").read_text()
    # with the teacher at hand, the quiet pairs measure FGFI's step cost too
    _load("accuracy").main(["--quick", "--seeds", "0", "--no-equal-time", "--out", str(tmp_path), "--method", "lgd",
                            "fgfi", "--fgfi-teacher", teacher["file"], "--measure-step-ratio", "1", "--report-only"])
    measured = json.loads((tmp_path / "step_ratio_retinanet.json").read_text())
    assert len(measured["fgfi_rounds_s_per_iter"]) == 1 and measured["fgfi_ratio"] > 0
    assert measured["fgfi_teacher"] == teacher["file"]


def test_accuracy_benchmark_fgfi_can_distil_the_equal_time_baseline(tmp_path, monkeypatch):
    """--teacher-factor equal-time: the first seed's equal-time baseline is FGFI's teacher, trained once."""
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    common = ["--quick", "--seeds", "0", "--parallel", "2", "--out", str(tmp_path), "--method", "lgd", "fgfi",
              "--teacher-factor", "equal-time"]
    with pytest.raises(SystemExit):
        _load("accuracy").main(common + ["--no-equal-time"])
    with pytest.raises(SystemExit):
        _load("accuracy").main(common[:-1] + ["0"])
    report = _load("accuracy").main(common + ["--step-ratio", "retinanet=2"])
    teacher = report["fgfi_teachers"]["retinanet"]
    runs = tmp_path / "runs" / "retinanet"
    assert Path(teacher["file"]) == runs / "baseline_eqtime_s0" / "model_final.pth"
    assert teacher["iters"] == 8 and teacher["factor"] == "equal-time"
    assert not any(p.name.startswith("fgfi_teacher") for p in runs.iterdir())
    eqtime = report["archs"]["retinanet"]["equal_time"]["runs"][0][0]
    assert teacher["train_cpu_s"] == eqtime["train_cpu_s"]
    fgfi_run = json.loads((runs / "fgfi_s0" / "result.json").read_text())
    assert f"fgfi.teacher={teacher['file']}" in fgfi_run["overrides"]


def test_fgfi_cost_counts_only_runs_measured_whole():
    """A resumed run's CPU seconds are the last process's part, and an old record cannot show it was not resumed."""
    summary = _load("accuracy").methods_summary

    def run(ap, cpu, resumed):
        return {"test": {"bbox/AP": ap}, "train_cpu_s": cpu, **({} if resumed is None else {"resumed": resumed})}

    teacher = {"train_cpu_s": 1000.0}
    whole = summary([run(20, 100.0, False), run(22, 10.0, True)], [run(21, 150.0, False)],
                    [run(23, 120.0, False), run(24, 5.0, None)], teacher)
    assert whole["baseline"]["train_cpu_s"]["mean"] == 100.0 and whole["baseline"]["train_cpu_s"]["runs"] == 1
    assert whole["baseline"]["AP"]["mean"] == 21.0  # accuracy counts every run
    assert whole["lgd"]["extra_cpu_s"] == 50.0 and whole["fgfi"]["extra_cpu_s"] == 1020.0
    assert whole["lgd_over_fgfi_extra_cost"] == pytest.approx(50 / 1020)
    unknown = summary([run(20, 100.0, None)], [run(21, 150.0, False)], [run(23, 120.0, False)], teacher)
    assert unknown["baseline"]["train_cpu_s"] is None
    assert unknown["lgd"]["extra_cpu_s"] is None and unknown["lgd_over_fgfi_extra_cost"] is None


def test_accuracy_benchmark_report_only_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_CACHE", str(tmp_path / "cache"))
    common = ["--quick", "--parallel", "2", "--no-equal-time", "--out", str(tmp_path)]
    first = _load("accuracy").main(common + ["--seeds", "0"])
    report = _load("accuracy").main(common + ["--seeds", "0", "1", "--report-only"])
    runs = tmp_path / "runs" / "retinanet"
    assert sorted(p.name for p in runs.iterdir()) == ["baseline_s0", "lgd_s0"]  # seed 1 was not begun
    assert sorted(report["not_run"]) == [["retinanet", "baseline", 1], ["retinanet", "lgd", 1]]
    summary = report["archs"]["retinanet"]["equal_iterations"]
    assert summary["seeds"] == [0] and summary["summary"] == first["archs"]["retinanet"]["equal_iterations"]["summary"]
    assert "not finished (--report-only)" in (tmp_path / "accuracy_retinanet.md").read_text()
