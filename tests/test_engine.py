import json
import shutil
from pathlib import Path

import pytest
import torch

from lgd.engine import checkpoint
from lgd.engine.checkpoint import CHECKPOINT, FINAL, load_checkpoint
from lgd.engine.solver import Optimization, lr_factor
from lgd.engine.training import train
from lgd.errors import LGDError, TrainingError
from lgd.methods.lgd import LGD


def _final_state(cfg):
    return load_checkpoint(Path(cfg.output_dir) / FINAL)["model"]


@pytest.mark.parametrize("lgd_enabled", [True, False])
def test_training_writes_outputs_and_logs_every_loss_term(tiny_config, lgd_enabled):
    cfg = tiny_config(f"lgd.enabled={str(lgd_enabled).lower()}")
    out = train(cfg, progress=False)
    run = Path(cfg.output_dir)
    for name in (CHECKPOINT, FINAL, "config.yaml", "metrics.jsonl", "loss.png", "detections_val.json", "eval_val.txt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["iter"] for r in train_records] == [1, 2, 3, 4]
    terms = set(train_records[-1]["losses"])
    assert ("loss_distill" in terms) == lgd_enabled
    assert any(t.startswith("teacher/") for t in terms) == lgd_enabled
    assert 0 <= out["metrics"]["bbox/AP"] <= 100


def _tensorboard_points(run: Path) -> set[tuple[str, int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    return {(tag, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


# the default SGD on both sides, and an AdamW student beside an SGD teacher (the reference's Swin-T Mask R-CNN):
# AdamW's moments and step counts must come back from the checkpoint too
@pytest.mark.parametrize("optimizers", [(), ("solver.optimizer=adamw", "solver.base_lr=0.001",
                                             "solver.weight_decay=0.05")], ids=["sgd", "adamw_student"])
def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch, optimizers):
    uninterrupted = tiny_config(f"output_dir={tmp_path / 'a'}", "eval_period=2", *optimizers)
    train(uninterrupted, progress=False)

    interrupted = tiny_config(f"output_dir={tmp_path / 'b'}", "eval_period=2", *optimizers)
    real_step = Optimization.step
    calls = {"n": 0}

    def crash_on_third(self, scaler=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, scaler)

    monkeypatch.setattr(Optimization, "step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, progress=False)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["iteration"] == 2
    if optimizers:  # this run resumes from its checkpoint as those written before 2026-12-03 spell the key
        ckpt = load_checkpoint(tmp_path / "b" / CHECKPOINT)
        ckpt["optimisation"] = ckpt.pop("optimization")
        torch.save(ckpt, tmp_path / "b" / CHECKPOINT)
    monkeypatch.setattr(Optimization, "step", real_step)
    train(interrupted, resume=True, progress=False)

    a, b = _final_state(uninterrupted), _final_state(interrupted)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    iters = [json.loads(line)["iter"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert iters == [1, 2, 3, 4]
    # TensorBoard too: the evaluation at the checkpoint's iteration survives the resume, nothing is doubled
    assert _tensorboard_points(tmp_path / "b") == _tensorboard_points(tmp_path / "a")
    assert ("val/bbox/AP", 2) in _tensorboard_points(tmp_path / "b")


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tiny_config, tmp_path):
    with pytest.raises(LGDError, match="no checkpoint"):
        train(tiny_config(f"output_dir={tmp_path / 'none'}"), resume=True, progress=False)
    cfg = tiny_config(f"output_dir={tmp_path / 'c'}", "solver.max_iter=2")
    train(cfg, progress=False)
    with pytest.raises(LGDError, match="config differs"):
        train(tiny_config(f"output_dir={tmp_path / 'c'}", "solver.max_iter=2", "solver.base_lr=0.5"),
              resume=True, progress=False)
    with pytest.raises(LGDError, match=r"in 1 key \(solver.max_iter was 2, now 3\).*cannot be extended.*"
                                       r"model.weights=.*model_final.pth"):
        train(tiny_config(f"output_dir={tmp_path / 'c'}", "solver.max_iter=3"), resume=True, progress=False)


def test_a_finished_run_resumes_from_a_copied_folder_without_doubling_its_records(tiny_config, tmp_path):
    from lgd.config import ModelConfig
    from lgd.detectors import build_detector

    train(tiny_config(f"output_dir={tmp_path / 'c'}", "solver.max_iter=2"), progress=False)
    with pytest.raises(TrainingError, match=r"output_dir .*c already holds a run \(last.pth\); continue it with "
                                            r"--resume"):
        train(tiny_config(f"output_dir={tmp_path / 'c'}", "solver.max_iter=2"), progress=False)  # forgot --resume
    shutil.copytree(tmp_path / "c", tmp_path / "copy")
    train(tiny_config(f"output_dir={tmp_path / 'copy'}", "solver.max_iter=2"), resume=True, progress=False)
    records = [json.loads(line) for line in (tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["split"]) for r in records if r["kind"] == "eval"] == [(2, "val"), (2, "val_teacher")]
    # an LGD run's checkpoint as whole-detector weights of a new run: the student's tensors
    cfg = tiny_config()
    student = build_detector(ModelConfig(**{**vars(cfg.model), "weights": str(tmp_path / "c" / FINAL)}), 8)
    trained = load_checkpoint(tmp_path / "c" / FINAL)["model"]
    for name, value in student.state_dict().items():
        assert torch.equal(value, trained[f"student.{name}"]), name


def test_a_nan_loss_stops_training_with_a_clear_message(tiny_config, monkeypatch):
    real = LGD.forward

    def poisoned(self, images, targets=None):
        losses = real(self, images, targets)
        losses["loss_distill"] = losses["loss_distill"] * float("nan")
        return losses

    monkeypatch.setattr(LGD, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"iteration 0: non-finite loss terms \['loss_distill'\]"):
        train(tiny_config(), progress=False)


def test_warmup_and_multistep_schedule():
    from lgd.config import SolverConfig

    s = SolverConfig(max_iter=100, warmup_iters=10, warmup_factor=0.001, steps=[50, 80], gamma=0.1)
    assert lr_factor(0, s) == pytest.approx(0.001)
    assert lr_factor(5, s) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, s) == 1 and lr_factor(49, s) == 1
    assert lr_factor(50, s) == pytest.approx(0.1) and lr_factor(80, s) == pytest.approx(0.01)
    cosine = SolverConfig(max_iter=100, warmup_iters=0, schedule="cosine")
    assert lr_factor(0, cosine) == 1 and lr_factor(50, cosine) == pytest.approx(0.5)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "ck.pth"
    checkpoint.atomic_save({"x": 1}, target)

    def broken_save(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"x": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]


@pytest.mark.parametrize("overrides, teacher_evals", [
    ((), [2, 4]),  # LGD: the teacher diagnostic beside every evaluation, the final one included
    (("lgd.eval_teacher=false",), []),
    (("lgd.enabled=false",), []),  # a baseline has no teacher
])
def test_the_teacher_is_evaluated_on_val_during_training(tiny_config, capsys, overrides, teacher_evals):
    cfg = tiny_config("eval_period=2", *overrides)
    train(cfg, progress=False)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = {split: [r["iter"] for r in records if r["kind"] == "eval" and r["split"] == split]
             for split in ("val", "val_teacher")}
    assert evals == {"val": [2, 4], "val_teacher": teacher_evals}
    printed = capsys.readouterr()
    assert ("teacher diagnostic" in printed.out + printed.err) == bool(teacher_evals)


def test_the_summary_warns_about_a_schedule_that_reaches_past_the_run(tiny_config):
    from lgd.data.build import build_dataset
    from lgd.engine.summary import training_summary
    from lgd.methods.build import build_model
    from lgd.utils.distributed import Context

    cfg = tiny_config("solver.max_iter=30", "solver.warmup_iters=100", "solver.steps=[20,40]")
    train_set = val_set = build_dataset(cfg, "val", train=False)
    text = training_summary(cfg, Context(device=torch.device("cpu")), train_set, val_set, build_model(cfg, 8), 0)
    assert ("WARNING: the warm-up (solver.warmup_iters=100) never reaches lr 0.01; solver.steps=[20, 40] reach past "
            "the last iteration: scale them with solver.max_iter") in text
    ok = tiny_config()
    assert "WARNING" not in training_summary(ok, Context(device=torch.device("cpu")), train_set, val_set,
                                             build_model(ok, 8), 0)
