from pathlib import Path

import pytest

from lgd.engine.hooks import frozen_body_iters
from lgd.engine.loss_monitor import DegenerateLossMonitor, DivergenceMonitor
from lgd.engine.training import train
from lgd.errors import TrainingError
from lgd.plots import read_metrics


def test_a_dead_fcos_box_branch_is_reported_once_then_its_recovery():
    monitor = DegenerateLossMonitor("fcos", patience=5)
    messages = []
    for it in range(12):
        dead = 1.0 + (1e-4 if it % 2 else -1e-4)
        messages += monitor.update(it, {"classification": 1.0 / (it + 1), "teacher/bbox_regression": dead})
    assert len(messages) == 1
    assert "iteration 4" in messages[0] and "teacher/bbox_regression" in messages[0]
    assert "zero-size boxes" in messages[0] and "solver.warmup_iters" in messages[0]
    assert monitor.update(12, {"teacher/bbox_regression": 0.7}) == [
        "iteration 12: loss 'teacher/bbox_regression' has left its degenerate value (0.700): the branch is learning again."
    ]


def test_a_brief_visit_and_other_detectors_are_not_reported():
    monitor = DegenerateLossMonitor("fcos", patience=5)
    values = [1.0, 1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0]  # never 5 in a row
    assert not [m for it, v in enumerate(values) for m in monitor.update(it, {"bbox_regression": v})]
    retina = DegenerateLossMonitor("retinanet", patience=1)  # its bbox_regression is an L1 loss: 1.0 means nothing
    assert retina.update(0, {"bbox_regression": 1.0}) == []


def test_the_divergence_monitor_warns_once_above_three_times_the_early_loss():
    falling = DivergenceMonitor()
    assert not [m for it, loss in enumerate([3.0, 2.5, 2.0, 1.8, 1.5, 1.2, 1.0]) for m in falling.update(it, {"a": loss})]
    rising = DivergenceMonitor()
    messages = [m for it, loss in enumerate([1.0, 1.0, 1.0, 2.0, 4.0, 5.0, 9.0, 20.0])
                for m in rising.update(it, {"classification": loss / 2, "bbox_regression": loss / 2,
                                            "teacher/classification": 1.0, "loss_distill": 100.0 * it})]
    assert len(messages) == 1  # 2, 4, 5 average 3.67 > 3 x 1.0 at record 5; later records say nothing more
    assert messages[0].startswith("iteration 5: the loss is diverging: 3.667 (mean of the last 3 records) is more "
                                  "than 3x its early level 1 (mean of the first 3)")
    assert "lower solver.base_lr" in messages[0] and "solver.reference_batch_size" in messages[0]
    assert "freeze_backbone_iters" not in messages[0]  # no body freeze, no advice about it
    frozen = DivergenceMonitor(frozen_body_iters=167)
    advice = [m for it, loss in enumerate([1.0, 1.0, 1.0, 5.0, 5.0, 5.0]) for m in frozen.update(it, {"a": loss})]
    assert len(advice) == 1 and "first 167 iterations" in advice[0] and "lgd.freeze_backbone_iters=0" in advice[0]
    distillation_only = DivergenceMonitor()  # the teacher's terms and the distillation loss are not the student's
    assert not [m for it in range(9) for m in distillation_only.update(it, {"a": 1.0, "loss_distill": 10.0 ** it})]


def test_a_recipe_made_to_diverge_is_reported_in_the_log(tiny_config, capsys):
    cfg = tiny_config("lgd.enabled=false", "lgd.eval_teacher=false", "solver.base_lr=2", "solver.clip_type=none",
                      "solver.warmup_iters=1", "solver.steps=[]", "solver.max_iter=8", "checkpoint_period=100",
                      "solver.nan_policy=skip")
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "lgd: warning: iteration" in out and "the loss is diverging" in out
    assert "more than 3x its early level" in out and "What to try: a lower solver.base_lr" in out


def test_divergence_policy_stop_ends_the_run_with_the_warning_and_keeps_its_records(tiny_config):
    stopping = DivergenceMonitor(stop=True)
    for it, loss in enumerate([1.0, 1.0, 1.0, 1.0, 1.0]):
        assert stopping.update(it, {"a": loss}) == []
    with pytest.raises(TrainingError, match="the loss is diverging.*divergence_policy=stop"):
        for it, loss in enumerate([5.0, 5.0, 5.0], start=5):
            stopping.update(it, {"a": loss})
    cfg = tiny_config("lgd.enabled=false", "lgd.eval_teacher=false", "solver.base_lr=2", "solver.clip_type=none",
                      "solver.warmup_iters=1", "solver.steps=[]", "solver.max_iter=8", "checkpoint_period=100",
                      "solver.nan_policy=skip", "solver.divergence_policy=stop", "log_period=1")
    with pytest.raises(TrainingError, match="the loss is diverging") as stopped:
        train(cfg, progress=False)
    stopped_at = int(str(stopped.value).split()[1].rstrip(":"))
    records = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r["kind"] == "train"]
    assert stopped_at < cfg.solver.max_iter and records[-1]["iter"] == stopped_at


def test_only_an_lgd_run_with_a_body_freeze_gets_the_freeze_advice(tiny_config):
    assert frozen_body_iters(tiny_config("lgd.freeze_backbone_iters=5")) == 5
    assert frozen_body_iters(tiny_config("lgd.freeze_backbone_iters=5", "lgd.enabled=false")) == 0
