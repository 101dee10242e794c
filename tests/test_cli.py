import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import strict_json
from lgd.cli import build_parser, main
from lgd.config import save_config
from lgd.engine.checkpoint import load_model_weights
from lgd.engine.training import train
from lgd.errors import LGDError
from lgd.export import build_student, load_student
from lgd.methods.build import build_model


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"], ["export", "--help"],
                 ["summary", "--help"], ["data", "synth", "--help"], ["data", "tile", "--help"], ["config", "--help"]):
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
                 ["data", "convert", "--from", "voc", "--root", "r", "--ann", "a", "--out", "o.json"],
                 ["data", "tile", "--root", "r", "--ann", "a.json", "--out", "o"]):
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
    # the README's loader: tensors, numbers and strings only, rebuilt as a plain torchvision model
    exported = torch.load(tmp_path / "student.pth", weights_only=True)
    model = build_student(exported)
    assert type(model).__module__.startswith("torchvision.")
    categories = sorted((c["id"], c["name"]) for c in json.loads(Path(cfg.data.train.ann).read_text())["categories"])
    assert exported["class_names"] == [n for _, n in categories]
    assert exported["category_ids"] == [i for i, _ in categories]
    assert exported["model_config"]["fpn_channels"] == 32 and exported["model_config"]["anchor_sizes"]
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
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        record = strict_json(line)
    assert record["kind"] == "eval" and record["metrics"]["bbox/APl"] is None  # 64 px images: no large objects
    save_config(cfg, tmp_path / "cfg.yaml")
    capsys.readouterr()
    assert main(["eval", "-c", str(tmp_path / "cfg.yaml"), "--split", "test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # one scale: every summary number in percent and marked so (pycocotools' own 0-1 print never shows)
    summary = [line for line in out.splitlines() if line.startswith(" Average")]
    assert len(summary) == 12 and all(line.endswith((" %", "n/a")) for line in summary)
    assert re.search(r"category +\| +AP %", out)
    report = strict_json(out.splitlines()[-2])
    assert report["model"] == "student" and report["unit"] == "percent" and report["bbox/APl"] is None
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'run' / 'detections_test_student.json'}"
    strict_json((tmp_path / "run" / "detections_test_student.json").read_text())

    assert main(["eval", "-c", str(tmp_path / "cfg.yaml"), "--teacher", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TEACHER DIAGNOSTIC" in out and "upper bound" not in out
    lines = out.splitlines()
    assert "(student) |" in lines[-5] and "(teacher diagnostic)" in lines[-5]  # beside the student's AP
    student, teacher = strict_json(lines[-3]), strict_json(lines[-2])
    above = teacher["bbox/AP"] > student["bbox/AP"]
    assert lines[-4].startswith("The teacher is above the student") == above
    assert ("so it has something to teach" in lines[-4]) == above and "not a model to deploy" in lines[-4]
    assert student["model"] == "student" and teacher["model"] == "teacher"
    for name in ("student", "teacher"):
        assert str(tmp_path / "run" / f"detections_val_{name}.json") in lines[-1]
        assert (tmp_path / "run" / f"detections_val_{name}.json").is_file()


def test_evaluation_refuses_other_categories_and_never_uses_the_builtin_split(tiny_config, tmp_path, capsys):
    cfg = tiny_config("solver.max_iter=1", "checkpoint_period=1")
    train(cfg, progress=False)
    save_config(cfg, tmp_path / "cfg.yaml")
    data = json.loads(Path(cfg.data.val.ann).read_text())
    renamed = {**data, "categories": [{**c, "name": "cat" if i == 0 else c["name"]}
                                      for i, c in enumerate(data["categories"])]}
    fewer = {**data, "categories": data["categories"][:2],
             "annotations": [a for a in data["annotations"] if a["category_id"] in
                             {c["id"] for c in data["categories"][:2]}]}
    for name, variant in (("renamed", renamed), ("fewer", fewer)):
        (tmp_path / f"{name}.json").write_text(json.dumps(variant))
        capsys.readouterr()
        assert main(["eval", "-c", str(tmp_path / "cfg.yaml"), f"data.val.ann={tmp_path / name}.json"]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name}.json" in err and "model_final.pth" in err and "categories" in err, err
        # training refuses such a val split before its first step
        with pytest.raises(LGDError, match=f"val split {tmp_path / name}.json has .* categories"):
            train(tiny_config(f"data.val.ann={tmp_path / name}.json", f"output_dir={tmp_path / 'o'}"), progress=False)
    assert not (tmp_path / "o").exists()  # refused before it wrote anything: no empty folder left behind
    # a checkpoint written before categories were stored in it: compared with the config's training split
    old = torch.load(Path(cfg.output_dir) / "model_final.pth", weights_only=True)
    del old["categories"]
    torch.save(old, tmp_path / "old.pth")
    assert main(["eval", "-c", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "old.pth"),
                 f"data.val.ann={tmp_path / 'renamed.json'}"]) == 2
    assert "old.pth" in capsys.readouterr().err

    # the training split is the user's and there is no val split: an error, never the built-in dataset
    cache = tmp_path / "cache"
    own = tiny_config("data.val.root=", "data.val.ann=", f"data.synth.cache_dir={cache}",
                      f"output_dir={tmp_path / 'n'}")
    with pytest.raises(LGDError, match="data.val is not set.*never uses the built-in synthetic val split"):
        train(own, progress=False)
    assert not cache.exists() and not (tmp_path / "n").exists()


def test_missing_dataset_file_is_reported(tmp_path, capsys):
    code = main(["train", f"data.train.root={tmp_path}", f"data.train.ann={tmp_path / 'missing.json'}",
                 f"data.val.root={tmp_path}", f"data.val.ann={tmp_path / 'missing.json'}",
                 f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "missing.json" in capsys.readouterr().err
