import pytest

from lgd.config import load_config
from lgd.data.synthetic import write_synthetic

from helpers import tiny_overrides


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
        return load_config(None, tiny_overrides(synth_root, tmp_path / "run") + list(overrides))

    return make
