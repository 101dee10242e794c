from lgd.engine.loss_monitor import DegenerateLossMonitor


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
