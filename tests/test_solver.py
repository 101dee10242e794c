"""The reference's optimization: element-wise gradient clipping per optimizer, weight decay on every parameter."""
import pytest
import torch
from torch import nn

from pathlib import Path

from lgd.config import load_config
from lgd.data.build import build_dataset
from lgd.engine.solver import Optimization, build_optimization, linear_lr_scale, make_optimizer
from lgd.engine.summary import training_summary
from lgd.errors import ConfigError
from lgd.methods.build import build_model
from lgd.utils.distributed import Context

from helpers import tiny_detector, tiny_lgd


def _optimization(params: list[nn.Parameter], clip_type: str, clip_value: float = 1.0) -> Optimization:
    opt = torch.optim.SGD(params, lr=1.0)
    return Optimization([opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)], clip_type, clip_value)


@pytest.mark.parametrize("clip_type, expected", [
    ("value", [-1.0, 0.5, 1.0, -0.25]),  # each element clamped to [-1, 1], the others untouched (reference)
    ("norm", [-3.0 / 5.0, 0.5 / 5.0, 4.0 / 5.0, -0.25 / 5.0]),  # global L2 norm sqrt(9+.25+16+.0625) ~ 5.03 -> 1
    ("none", [-3.0, 0.5, 4.0, -0.25]),
])
def test_gradient_clipping_types(clip_type, expected):
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([-3.0, 0.5, 4.0, -0.25])
    norm = float(torch.linalg.vector_norm(p.grad))
    _optimization([p], clip_type).step()
    step = -p.detach()  # SGD with lr 1 and no momentum moves by exactly minus the (clipped) gradient
    if clip_type == "norm":
        expected = [v * 5.0 / norm for v in expected]
    assert torch.allclose(step, torch.tensor(expected), atol=1e-6)


def test_value_clipping_leaves_a_large_gradient_of_small_elements_alone():
    """The reference's clip is per element: a gradient of norm 50 made of elements below 1 is not rescaled."""
    p = nn.Parameter(torch.zeros(10_000))
    p.grad = torch.full((10_000,), 0.5)
    _optimization([p], "value").step()
    assert torch.equal(-p.detach(), torch.full((10_000,), 0.5))


def test_each_optimizer_is_clipped_on_its_own():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0]), torch.tensor([0.3, 0.4])
    opts = [torch.optim.SGD([a], lr=1.0), torch.optim.SGD([b], lr=1.0)]
    Optimization(opts, [torch.optim.lr_scheduler.LambdaLR(o, lambda it: 1.0) for o in opts], "norm", 1.0).step()
    assert torch.allclose(-a.detach(), torch.tensor([0.6, 0.8]))
    assert torch.allclose(-b.detach(), torch.tensor([0.3, 0.4]))  # norm 0.5: untouched by a's large gradient


def _decay_of(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_weight_decay_reaches_every_parameter_by_default():
    model = tiny_detector("fcos", norm="gn")  # GroupNorm in backbone and head: affine parameters
    norms = [p for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters(recurse=False)]
    assert norms
    decay = _decay_of(make_optimizer([model], 0.01, 0.9, 1e-4))
    assert len(decay) == sum(1 for p in model.parameters() if p.requires_grad)
    assert set(decay.values()) == {1e-4}


def test_weight_decay_of_norms_and_biases_is_an_option():
    model = tiny_detector("fcos", norm="gn")
    decay = _decay_of(make_optimizer([model], 0.01, 0.9, 1e-4, weight_decay_norm=0.0, weight_decay_bias=0.5))
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, nn.GroupNorm):
                assert decay[id(p)] == 0.0
            elif name == "bias":
                assert decay[id(p)] == 0.5
            elif p.requires_grad:
                assert decay[id(p)] == 1e-4


def test_lgd_run_builds_two_clipped_optimizers_from_the_config(tiny_config):
    cfg = tiny_config()
    assert (cfg.solver.clip_type, cfg.solver.clip_value) == ("value", 1.0)
    model = tiny_lgd("retinanet")
    optimization = build_optimization(model.optimizer_groups(), cfg.solver)
    assert len(optimization.optimizers) == 2
    assert (optimization.clip_type, optimization.clip_value) == ("value", 1.0)
    teacher = {id(p) for p in model.teacher_parameters()}
    assert teacher == set(_decay_of(optimization.optimizers[1]))


def test_the_replaced_norm_clipping_key_says_what_to_write(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("solver:\n  clip_grad_norm: 1.0\n")
    with pytest.raises(ConfigError, match="solver.clip_type=norm"):
        load_config(path)


CONFIGS = Path(__file__).parent.parent / "configs"


def test_every_recipe_states_its_own_batch_as_the_reference():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.solver.reference_batch_size == cfg.data.batch_size, path.name
    assert load_config(None).solver.reference_batch_size == 0  # the defaults keep the rule off


def test_a_smaller_batch_scales_both_learning_rates_and_the_summary_says_so(tiny_config):
    cfg = tiny_config("solver.reference_batch_size=8", "solver.base_lr=0.02", "lgd.teacher_lr=0.04")
    model = build_model(cfg, 8)
    scale = linear_lr_scale(cfg.data.batch_size, cfg.solver.reference_batch_size)
    assert scale == 0.25  # the global batch 2 of the reference 8
    optimization = build_optimization(model.optimizer_groups(), cfg.solver, scale)
    assert [o.param_groups[0]["initial_lr"] for o in optimization.optimizers] == pytest.approx([0.005, 0.01])
    val = build_dataset(cfg, "val", train=False)
    cpu = Context(device=torch.device("cpu"))
    text = training_summary(cfg, cpu, val, val, model, 0)
    assert "sgd lr 0.005 = solver.base_lr 0.02 x 2 / 8 (linear scaling rule" in text
    assert "solver.reference_batch_size=0 turns it off" in text
    off = tiny_config()
    assert linear_lr_scale(off.data.batch_size, 0) == 1.0
    assert "sgd lr 0.01 (linear scaling rule off" in training_summary(off, cpu, val, val, model, 0)
    with pytest.raises(ConfigError, match="solver.reference_batch_size must be positive, or 0"):
        tiny_config("solver.reference_batch_size=-1")
