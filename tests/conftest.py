import pytest

from lgd.config import load_config
from lgd.data.synthetic import write_synthetic


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny built-in dataset shared by the end-to-end tests."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, seed=0, num_train=16, num_val=6, num_test=4, size=64, progress=False)
    return root


@pytest.fixture
def tiny_config(synth_root, tmp_path):
    """A config that trains a tiny detector for a few iterations on the tiny dataset."""

    def make(*overrides: str):
        splits = [f"data.{s}.root={synth_root / s}" for s in ("train", "val", "test")]
        anns = [f"data.{s}.ann={synth_root / 'annotations' / f'instances_{s}.json'}" for s in ("train", "val", "test")]
        base = [
            f"output_dir={tmp_path / 'run'}", "model.depth=18", "model.fpn_channels=32", "model.norm=bn",
            "model.min_size=[64]", "model.max_size=128", "data.batch_size=2", "data.eval_batch_size=4",
            "data.workers=0", "solver.max_iter=4", "solver.warmup_iters=2", "solver.steps=[3]",
            "checkpoint_period=2", "log_period=1", "lgd.pre_distill_iters=1",
        ]
        return load_config(None, base + splits + anns + list(overrides))

    return make
