from pathlib import Path

import pytest
import yaml

from lgd.config import Config, all_keys, describe, load_config, save_config, to_dict
from lgd.errors import ConfigError


def test_defaults_are_the_reference_schedule():
    cfg = Config()
    assert cfg.solver.max_iter == 180000 and cfg.solver.steps == [120000, 160000]
    assert cfg.solver.base_lr == 0.01 and cfg.solver.warmup_iters == 1000 and cfg.solver.warmup_factor == 0.001
    assert cfg.lgd.pre_distill_iters == 30000 and cfg.lgd.distill_weight == 1.0
    assert cfg.lgd.class_format == "one_hot" and cfg.lgd.attention == "student_guided"
    assert cfg.lgd.context_box is None and cfg.lgd.detach_appearance is None  # per-detector reference defaults


def test_overrides_are_typed():
    cfg = load_config(None, ["solver.max_iter=200", "data.train.root=/x", "data.train.ann=/x.json",
                             "model.min_size=[96,128]", "lgd.enabled=false", "lgd.context_box=null",
                             "solver.base_lr=0.02"])
    assert cfg.solver.max_iter == 200 and isinstance(cfg.solver.max_iter, int)
    assert cfg.data.train.root == "/x"
    assert cfg.model.min_size == [96, 128]
    assert cfg.lgd.enabled is False and cfg.lgd.context_box is None
    assert cfg.solver.base_lr == 0.02


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'solver.max_iters'.*'solver.max_iter'"):
        load_config(None, ["solver.max_iters=5"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lgd:\n  distil_weight: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'lgd.distil_weight'.*'lgd.distill_weight'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("solver.max_iter=abc", "expects an integer"),
    ("lgd.enabled=maybe", "expects true or false"),
    ("model.arch=yolo", "must be one of"),
    ("solver.max_iter=0", "must be positive"),
    ("model.depth=42", "model.depth"),
    ("noequals", "not of the form key=value"),
    ("data.train.root=/only/root", "give both root and ann"),
    ("lgd.mask_guided=true", "maskrcnn"),
    ("model.roi_batch_size=0", "model.roi_batch_size must be positive"),
])
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_base_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("solver:\n  max_iter: 50\n  base_lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsolver:\n  max_iter: 70\n")
    cfg = load_config(tmp_path / "child.yaml", ["solver.base_lr=0.25"])
    assert cfg.solver.max_iter == 70 and cfg.solver.base_lr == 0.25


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("solver: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["solver.max_iter=33", "model.arch=fcos"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["solver"]["max_iter"] == 33


def test_every_key_is_documented():
    text = describe()
    for key, f in all_keys().items():
        assert f.metadata["help"], key
        assert key in text


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_demo_baseline_is_the_demo_recipe_without_lgd():
    """The README puts the two demo numbers side by side: nothing but LGD may differ between them."""
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    demo, baseline = (to_dict(load_config(configs / f"demo_fcos_{name}.yaml")) for name in ("lgd", "baseline"))
    assert demo["lgd"].pop("enabled") and not baseline["lgd"].pop("enabled")
    assert demo.pop("output_dir") != baseline.pop("output_dir")
    assert demo == baseline


def test_importing_the_config_loads_no_torch_torchvision_or_pycocotools():
    import subprocess
    import sys

    code = ("import lgd.config, sys; heavy = [m for m in ('torch', 'torchvision', 'pycocotools') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_choices_name_what_the_registries_hold():
    from lgd import choices
    from lgd.detectors import VIEWS
    from lgd.detectors.backbones import BACKBONES

    assert tuple(VIEWS) == choices.ARCHS
    assert tuple(a for a, view in VIEWS.items() if view.has_masks) == choices.MASK_ARCHS
    assert tuple(BACKBONES) == choices.BACKBONE_NAMES


def test_runtime_keys_are_where_and_how_fast_a_run_runs():
    from lgd.config import runtime_keys

    assert runtime_keys() == {"output_dir", "device", "threads", "data.workers", "keep_checkpoints",
                              "checkpoint_period", "log_period", "eval_period", "solver.nan_policy",
                              "solver.divergence_policy", "fgfi.teacher"}


def test_overriding_only_max_iter_scales_the_recipes_schedule(tmp_path):
    """The README's own-data example: 20x the iterations of a 1,000-iteration recipe, whose LR steps [800, 930]
    cut the rate 100x by iteration 930 unless they follow (issue 26)."""
    recipe = Path(__file__).parent.parent / "configs" / "synthetic_retinanet_lgd.yaml"
    cfg = load_config(recipe, ["solver.max_iter=20000"])
    assert cfg.solver.steps == [16000, 18600]
    assert (cfg.solver.warmup_iters, cfg.lgd.pre_distill_iters, cfg.fgfi.warmup_iters) == (2000, 3400, 8000)
    assert cfg.checkpoint_period == load_config(recipe).checkpoint_period  # periods are not the schedule
    assert cfg.scaled.startswith("solver.steps [800, 930] -> [16000, 18600], solver.warmup_iters 100 -> 2000")
    pinned = load_config(recipe, ["solver.max_iter=20000", "solver.steps=[900]"])
    assert pinned.solver.steps == [900] and pinned.solver.warmup_iters == 2000  # an explicit override is kept
    kept = load_config(recipe, ["solver.max_iter=20000", "solver.scale_schedule=false"])
    assert kept.solver.steps == [800, 930] and kept.scaled == ""
    assert load_config(None, ["solver.max_iter=20000"]).solver.steps == [120000, 160000]  # no file: defaults kept
    assert load_config(recipe, ["solver.max_iter=1000"]).scaled == ""  # the recipe's own length


def test_the_summary_says_what_was_scaled_and_warns_of_an_early_last_step(tiny_config, tmp_path):
    import torch

    from lgd.data.build import build_dataset
    from lgd.engine.summary import training_summary
    from lgd.methods.build import build_model
    from lgd.utils.distributed import Context

    recipe = tmp_path / "recipe.yaml"
    save_config(tiny_config("solver.max_iter=10", "solver.steps=[8]", "solver.warmup_iters=2"), recipe)
    cpu = Context(device=torch.device("cpu"))
    scaled = load_config(recipe, ["solver.max_iter=20"])
    val = build_dataset(scaled, "val", train=False)
    model = build_model(scaled, val.num_classes)
    text = training_summary(scaled, cpu, val, val, model, 0)
    assert "scaled    with solver.max_iter=20 (solver.scale_schedule=false keeps the file's): solver.steps [8] -> " \
           "[16], solver.warmup_iters 2 -> 4" in text
    early = load_config(recipe, ["solver.max_iter=20", "solver.steps=[8]"])
    assert "WARNING: the last of solver.steps=[8] falls before half the run, which then trains at 0.1 x the " \
           "learning rate" in training_summary(early, cpu, val, val, model, 0)
