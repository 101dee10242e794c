"""An optimiser per side: solver.optimizer for the student and adapter, lgd.teacher_optimizer for the teacher."""
import pytest
import torch
from torch import nn

from lgd.config import LGDConfig, load_config
from lgd.engine.solver import build_optimization, make_optimizer
from lgd.errors import ConfigError
from lgd.methods.lgd import LGD

from helpers import tiny_detector


def test_adamw_is_the_references():
    p = nn.Parameter(torch.ones(3))
    opt = make_optimizer([nn.ParameterList([p])], lr=0.1, momentum=0.9, weight_decay=0.05, optimizer="adamw")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    p.grad = torch.zeros(3)
    opt.step()
    # decoupled weight decay: with a zero gradient AdamW's update is only p <- p (1 - lr wd)
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 0.1 * 0.05))


def test_each_side_gets_its_own_optimizer_rate_and_decay():
    cfg = load_config(None, ["solver.optimizer=adamw", "solver.base_lr=0.0001", "solver.weight_decay=0.05",
                             "lgd.teacher_optimizer=sgd", "lgd.teacher_lr=0.02", "lgd.teacher_weight_decay=0.0001"])
    lgd = LGD(tiny_detector("fasterrcnn"), num_classes=3, config=cfg.lgd, max_iter=10)
    student, teacher = build_optimization(lgd.optimizer_groups(), cfg.solver).optimizers
    assert type(student) is torch.optim.AdamW and type(teacher) is torch.optim.SGD
    assert {g["lr"] for g in student.param_groups} == {0.0001 * cfg.solver.warmup_factor}  # warm-up at iteration 0
    assert {g["weight_decay"] for g in student.param_groups} == {0.05}
    assert {g["weight_decay"] for g in teacher.param_groups} == {0.0001}
    assert teacher.defaults["momentum"] == 0.9
    assert teacher.param_groups[0]["lr"] == pytest.approx(0.02 * cfg.solver.warmup_factor)
    owned = {id(p) for g in student.param_groups for p in g["params"]}
    assert {id(p) for p in lgd.adapter.parameters()} <= owned  # the adapter steps with the student
    assert not owned & {id(p) for g in teacher.param_groups for p in g["params"]}


def test_the_teacher_can_use_adamw_too():
    lgd = LGD(tiny_detector("retinanet"), num_classes=3, config=LGDConfig(teacher_optimizer="adamw"), max_iter=10)
    cfg = load_config(None, [])
    assert [type(o) for o in build_optimization(lgd.optimizer_groups(), cfg.solver).optimizers] == \
        [torch.optim.SGD, torch.optim.AdamW]


@pytest.mark.parametrize("key", ["solver.optimizer", "lgd.teacher_optimizer"])
def test_an_unknown_optimizer_is_a_config_error_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"'{key}' must be one of sgd, adamw; got 'adam'"):
        load_config(None, [f"{key}=adam"])
