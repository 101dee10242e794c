"""The files lgd writes: weights-only loadable, strict JSON, permissions from the umask; and the commands that
tell a user what is there (--version, config, summary offline)."""
import contextlib
import math
import os
import stat
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from helpers import strict_json
from lgd import __version__
from lgd.cli import main
from lgd.config import ModelConfig, config_from_dict, load_config, save_config
from lgd.detectors import build_detector
from lgd.engine.checkpoint import load_checkpoint
from lgd.engine.training import train
from lgd.errors import LGDError, WeightsError
from lgd.export import load_student
from lgd.utils.atomic import atomic_write_text, ensure_dir
from lgd.utils.files import atomic_save
from lgd.utils.files import to_json


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_to_json_writes_null_for_nan_and_infinity():
    text = to_json({"AP": math.nan, "values": [math.inf, -math.inf, 1.5, (2.0, math.nan)], "n": 3, "s": "NaN"})
    assert strict_json(text) == {"AP": None, "values": [None, None, 1.5, [2.0, None]], "n": 3, "s": "NaN"}


def test_atomic_writes_respect_the_umask(tmp_path):
    with umask(0o022):
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pth")
    with umask(0o077):
        atomic_write_text(tmp_path / "private.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.pth").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "a.txt", "private.txt"]  # no temporaries left


def test_ensure_dir_renames_a_complete_folder_into_place_and_leaves_nothing_after_a_failure(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise ValueError("interrupted")

    with pytest.raises(ValueError, match="interrupted"):
        ensure_dir(tmp_path / "data", fail)
    assert list(tmp_path.iterdir()) == []  # neither a finished-looking folder nor a temporary
    calls = []
    write = lambda folder: (calls.append(folder), (folder / "done.txt").write_text("ok"))
    assert ensure_dir(tmp_path / "data", write) == tmp_path / "data"
    assert ensure_dir(tmp_path / "data", write) == tmp_path / "data"  # cached: not written again
    assert len(calls) == 1 and (tmp_path / "data" / "done.txt").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_every_file_a_run_writes_loads_weights_only_parses_strictly_and_is_readable(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    with umask(0o022):
        train(cfg, progress=False)
        save_config(cfg, tmp_path / "cfg.yaml")
        assert main(["export", "-c", str(tmp_path / "cfg.yaml")]) == 0
    out = capsys.readouterr().out
    # what training said before it started
    for text in ("lgd 0.1.0: training", f"config    defaults output_dir={cfg.output_dir}", "device    cpu",
                 f"{cfg.data.train.ann}, images in {cfg.data.train.root}", "16 images, 116 objects, 8 classes",
                 "LGD       on: implicit teacher", f"output    {cfg.output_dir}"):
        assert text in out, text
    run = Path(cfg.output_dir)
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"last.pth", "model_0000002.pth", "model_0000004.pth", "model_final.pth", "student.pth",
            "metrics.jsonl", "detections_val.json", "config.yaml"} <= names
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # not mkstemp's 0600
        if path.suffix == ".pth":
            assert isinstance(torch.load(path, weights_only=True), dict), path
        elif path.suffix == ".json":
            strict_json(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                strict_json(line)
    ckpt = load_checkpoint(run / "last.pth")
    assert isinstance(ckpt["rng"][0]["numpy"]["state"]["key"], list)  # no numpy array inside
    assert ckpt["categories"]["names"] == load_student(run / "student.pth")[1]["class_names"]
    with pytest.raises(LGDError, match=r"model_final.pth is a training checkpoint, not an exported model: export "
                                       r"the student first with `lgd export -c .*config.yaml`"):
        load_student(run / "model_final.pth")


def test_an_onnx_file_given_as_the_exported_model_says_what_reads_it(tmp_path):
    (tmp_path / "student.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(LGDError, match=r"student.onnx is an ONNX graph: `lgd predict` and load_student read the .pth"):
        load_student(tmp_path / "student.onnx")


def test_the_teacher_leads_only_by_a_difference_that_shows():
    from lgd.evaluation import teacher_ahead

    assert teacher_ahead(5.0, 5.01) and not teacher_ahead(0.0, 3.6e-06) and not teacher_ahead(5.0, 4.0)


def test_files_that_need_more_than_weights_only_are_refused_with_what_they_hold(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(LGDError, match=r"checkpoint .*pickled.pth holds Python objects \(torch.nn.modules.linear."
                                       r"Linear.*weights_only=True"):
        load_checkpoint(tmp_path / "pickled.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(WeightsError, match=r"model.backbone_weights weights file .*module.pth holds Python objects"):
        build_detector(ModelConfig(depth=18, fpn_channels=32, backbone_weights=str(tmp_path / "module.pth")), 3)
    # an export of an older lgd: the whole pickled model
    torch.save({"format": "lgd-student/1", "model": torch.nn.Linear(2, 2)}, tmp_path / "old_student.pth")
    with pytest.raises(LGDError, match="exported model .*old_student.pth holds Python objects"):
        load_student(tmp_path / "old_student.pth")


def test_version_and_the_resolved_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == \
        f"lgd {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__})"

    assert main(["config", "-c", "configs/synthetic_retinanet_baseline.yaml", "solver.max_iter=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# resolved from: configs/synthetic_retinanet_baseline.yaml solver.max_iter=7\n")
    expected = load_config("configs/synthetic_retinanet_baseline.yaml", ["solver.max_iter=7"])
    assert config_from_dict(yaml.safe_load(out)) == expected
    assert expected.lgd.enabled is False and expected.model.depth == 18  # _base_ and the file both applied
    assert main(["config"]) == 0
    assert "solver.max_iter = 180000" in capsys.readouterr().out  # without -c: every key and its meaning


def test_summary_counts_parameters_offline_without_pretrained_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty weights cache

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    assert main(["summary", "-c", "configs/coco_retinanet_r50_2x_lgd.yaml", "--num-classes", "80"]) == 0
    report = strict_json(capsys.readouterr().out)
    assert report["num_classes"] == 80 and report["teacher"] == 8_304_336
    assert report["student"] == report["deployed"] > 30_000_000
