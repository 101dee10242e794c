import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgd.builders import build_model
from lgd.checkpoint import load_model_weights
from lgd.cli import build_parser, main
from lgd.config import save_config
from lgd.export import load_student
from lgd.training import train


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"], ["export", "--help"],
                 ["summary", "--help"], ["data", "synth", "--help"], ["config", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: lgd" in capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions:
        assert action.help, action.dest


def test_every_subcommand_accepts_no_progress():
    parser = build_parser()
    for argv in (["train"], ["eval"], ["predict", "in", "--model", "m.pth"], ["export"], ["summary"], ["config"],
                 ["data", "synth", "--out", "o"], ["data", "stats"], ["visualize"],
                 ["data", "convert", "--from", "voc", "--root", "r", "--ann", "a", "--out", "o.json"]):
        assert parser.parse_args([*argv, "--no-progress"]).no_progress, argv


def test_console_script_reports_config_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "lgd.cli", "train", "solver.max_iters=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key 'solver.max_iters'" in proc.stderr and "solver.max_iter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_summary_gives_the_reference_parameter_counts(capsys):
    assert main(["summary", "--num-classes", "80", "model.arch=retinanet", "model.fpn_channels=256"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["teacher"] == 8_304_336
    assert report["adapter"] == 1_770_240
    assert report["deployed"] == report["student"]
    assert main(["summary", "--num-classes", "80", "lgd.class_format=norm_classes"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher"] == 6_487_257


def test_export_loads_as_plain_torchvision_and_matches_the_student(tiny_config, tmp_path, capsys):
    cfg = tiny_config("solver.max_iter=2")
    train(cfg, progress=False)
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["export", "-c", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "student.pth")]) == 0
    exported = torch.load(tmp_path / "student.pth", weights_only=False)
    model = exported["model"]
    assert type(model).__module__.startswith("torchvision.")
    assert not any("lgd" in type(m).__module__ for m in model.modules())

    trained = build_model(cfg, len(exported["class_names"]))
    load_model_weights(trained, tmp_path / "run" / "model_final.pth")
    student = trained.student.eval()
    student.transform.min_size = (64,)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    with torch.no_grad():
        a, b = student(images), model.eval()(images)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in student.parameters())

    loaded, meta = load_student(tmp_path / "student.pth")
    assert meta["label_offset"] == 0 and len(meta["category_ids"]) == len(meta["class_names"])

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name, source in zip(("a.png", "b.png"), sorted(Path(cfg.data.val.root).glob("*.png"))):
        shutil.copy(source, image_dir / name)
    assert main(["predict", str(image_dir), "--model", str(tmp_path / "student.pth"),
                 "--out", str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    records = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert [r["file"].split("/")[-1] for r in records] == ["a.png", "b.png"]
    assert (tmp_path / "pred" / "a.png").is_file()


def test_eval_and_teacher_diagnostic_from_the_cli(tiny_config, tmp_path, capsys):
    cfg = tiny_config("solver.max_iter=2")
    train(cfg, progress=False)
    save_config(cfg, tmp_path / "cfg.yaml")
    capsys.readouterr()
    assert main(["eval", "-c", str(tmp_path / "cfg.yaml"), "--split", "test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Average Precision" in out and '"model": "student"' in out
    assert main(["eval", "-c", str(tmp_path / "cfg.yaml"), "--teacher", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TEACHER DIAGNOSTIC" in out and "upper bound" in out
    assert (tmp_path / "run" / "detections_val_teacher.json").is_file()


def test_missing_dataset_file_is_reported(tmp_path, capsys):
    code = main(["train", f"data.train.root={tmp_path}", f"data.train.ann={tmp_path / 'missing.json'}",
                 f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "missing.json" in capsys.readouterr().err
