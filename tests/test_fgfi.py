"""FGFI, the teacher-based comparison: the imitation mask, the loss, the frozen teacher, training end to end."""
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from helpers import batch, tiny_detector
from lgd.cli import main
from lgd.config import FGFIConfig, ModelConfig, SolverConfig, load_config, save_config, to_dict
from lgd.data.build import build_dataset
from lgd.engine.checkpoint import CHECKPOINT, FINAL, load_checkpoint
from lgd.engine.solver import Optimization, build_optimization
from lgd.engine.training import train
from lgd.errors import ConfigError, LGDError
from lgd.export import export_student
from lgd.feature_maps import DPI, PANEL_INCHES, fgfi_mask_maps
from lgd.methods.build import build_model
from lgd.methods.fgfi import FGFI, ImitationAdapter, imitation_loss, imitation_masks, load_teacher


def _one_level_anchors(sizes: tuple[int, ...]):
    """Anchors of a 64x64 image on one 8x8 level (stride 8), as torchvision generates them."""
    generator = AnchorGenerator((sizes,), ((1.0,),))
    feature = torch.zeros(1, 4, 8, 8)
    return generator(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), [feature])[0]


def _locations(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(rc) for rc in mask.nonzero().tolist()}


@pytest.mark.parametrize("psi, expected", [
    # the 16 px anchor at (3, 3) is the box (IoU 1); its 4 neighbours have IoU 1/3, the diagonals 1/7; the 32 px
    # anchors of the 3 x 3 block around it contain the box (IoU 1/4)
    (0.5, {(3, 3)}),
    (0.3, {(3, 3), (2, 3), (4, 3), (3, 2), (3, 4)}),
    (0.2, {(r, c) for r in (2, 3, 4) for c in (2, 3, 4)}),
])
def test_the_mask_of_one_box_is_the_locations_of_its_near_best_anchors(psi, expected):
    anchors = _one_level_anchors((16, 32))
    box = torch.tensor([[16.0, 16.0, 32.0, 32.0]])
    (mask,) = imitation_masks([anchors], [(8, 8)], box, psi)
    assert mask.shape == (8, 8)
    assert _locations(mask) == expected


def test_the_best_iou_is_over_all_levels_and_no_box_gives_no_mask():
    fine, coarse = _one_level_anchors((16,)), _one_level_anchors((64,))
    box = torch.tensor([[16.0, 16.0, 32.0, 32.0]])
    masks = imitation_masks([fine, coarse], [(8, 8), (8, 8)], box, 0.5)
    assert _locations(masks[0]) == {(3, 3)}
    assert not masks[1].any()  # a 64 px anchor reaches IoU 1/16 at most, below half the best (1)
    assert not any(m.any() for m in imitation_masks([fine], [(8, 8)], torch.zeros(0, 4), 0.5))


def test_the_loss_is_the_masked_squared_error_over_twice_the_masked_locations():
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    with torch.no_grad():
        student[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # squared distance 25 to the zero teacher
        student[0, :, 1, 1] = torch.tensor([10.0, 10.0])  # not masked: must not count
    teacher = torch.zeros(1, 2, 2, 2)
    one = torch.tensor([[[True, False], [False, False]]])
    two = torch.tensor([[[True, True], [False, False]]])
    assert imitation_loss([student], [teacher], [one]).item() == pytest.approx(25 / 2)
    assert imitation_loss([student], [teacher], [two]).item() == pytest.approx(25 / 4)
    empty = imitation_loss([student], [teacher], [torch.zeros(1, 2, 2, dtype=torch.bool)])
    assert empty.item() == 0
    empty.backward()
    assert student.grad is not None  # still in the graph (DDP needs every parameter used)


def _teacher_file(tmp_path: Path, arch: str = "retinanet", channels: int = 32) -> Path:
    teacher = tiny_detector(arch, channels=channels)
    cfg = ModelConfig(arch=arch, depth=18, fpn_channels=channels, norm="bn", min_size=[64], max_size=128)
    return export_student(teacher, cfg, ["a", "b", "c"], [1, 2, 3], 0, tmp_path / f"{arch}_{channels}.pth")


def _fgfi(tmp_path: Path, arch: str = "retinanet", teacher_arch: str = "retinanet", channels: int = 32) -> FGFI:
    path = _teacher_file(tmp_path, teacher_arch, channels)
    teacher, sha = load_teacher(path)
    return FGFI(tiny_detector(arch), teacher, sha, FGFIConfig(teacher=str(path), warmup_iters=0))


def test_the_teacher_gets_no_gradient_no_optimizer_and_is_not_saved(tmp_path):
    model = _fgfi(tmp_path)
    model.train()
    assert not model.teacher.training
    images, targets = batch("retinanet")
    losses = model(images, targets)
    assert losses["loss_distill"] > 0
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    optimized = {id(p) for o in build_optimization(model.optimizer_groups(), SolverConfig()).optimizers
                 for g in o.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.adapter.parameters()} <= optimized
    keys = model.state_dict().keys()
    assert not any(k.startswith("teacher.") for k in keys) and "teacher_sha256" in keys
    assert model.eval()(images)[0].keys() == {"boxes", "scores", "labels"}


def test_teacher_of_another_width_is_projected_and_of_other_levels_is_refused(tmp_path):
    wide = _fgfi(tmp_path, channels=64)
    assert wide.adapter.layers[-1].out_channels == 64
    assert wide.train()(*batch("retinanet"))["loss_distill"] > 0
    fcos = _fgfi(tmp_path, arch="fcos")  # anchor-free student: RetinaNet's 9 anchors per location for the mask
    assert fcos.anchors.num_anchors_per_location() == [9] * 5
    assert fcos.train()(*batch("fcos"))["loss_distill"] > 0
    two_stage = _fgfi(tmp_path, teacher_arch="fasterrcnn")
    with pytest.raises(LGDError, match="fgfi.teacher=.*FPN levels"):
        two_stage.train()(*batch("retinanet"))


def test_a_training_checkpoint_is_a_teacher(tmp_path):
    teacher = tiny_detector("fcos", num_classes=2)
    cfg = load_config(None, ["model.arch=fcos", "model.depth=18", "model.fpn_channels=32", "model.norm=bn"])
    torch.save({"model": {f"student.{k}": v for k, v in teacher.state_dict().items()}, "config": to_dict(cfg),
                "categories": {"ids": [1, 2], "names": ["a", "b"]}}, tmp_path / FINAL)
    loaded, sha = load_teacher(tmp_path / FINAL)
    assert len(sha) == 64 and not loaded.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_missing_corrupt_or_other_teacher_is_refused_by_name(tmp_path):
    with pytest.raises(LGDError, match="fgfi.teacher file not found"):
        load_teacher(tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(LGDError, match="fgfi.teacher file .*bad.pth"):
        load_teacher(tmp_path / "bad.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(LGDError, match="fgfi.teacher=.*other.pth: cannot use it"):
        load_teacher(tmp_path / "other.pth")
    model = _fgfi(tmp_path)
    state = model.state_dict()
    state["teacher_sha256"] = torch.zeros(32, dtype=torch.uint8)
    with pytest.raises(LGDError, match="another teacher"):
        model.load_state_dict(state)


def test_config_method_and_lgd_enabled(tiny_config):
    assert tiny_config("lgd.enabled=false").distill.method == "auto"
    with pytest.raises(ConfigError, match="contradicts lgd.enabled=false"):
        tiny_config("lgd.enabled=false", "distill.method=lgd")
    with pytest.raises(ConfigError, match="needs fgfi.teacher"):
        tiny_config("distill.method=fgfi")


def test_fgfi_trains_evaluates_exports_and_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    # 3 iterations, a checkpoint at 2: the resumed run imitates on both sides of the checkpoint
    fgfi = [f"fgfi.teacher={_teacher_file(tmp_path)}", "distill.method=fgfi", "fgfi.warmup_iters=1",
            "solver.max_iter=3", "solver.steps=[2]"]

    uninterrupted = tiny_config(f"output_dir={tmp_path / 'a'}", *fgfi)
    save_config(uninterrupted, tmp_path / "a.yaml")
    assert main(["train", "-c", str(tmp_path / "a.yaml"), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all("loss_distill" in r["losses"] for r in train_records)
    assert not any(t.startswith("teacher/") for r in train_records for t in r["losses"])
    assert (tmp_path / "a" / "eval_val.txt").is_file()
    assert main(["export", "-c", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "student.pth")]) == 0
    exported = torch.load(tmp_path / "student.pth", weights_only=True)["state_dict"]
    assert exported.keys() == tiny_detector("retinanet").state_dict().keys()  # the plain detector, nothing of FGFI

    interrupted = tiny_config(f"output_dir={tmp_path / 'b'}", *fgfi)
    real_step = Optimization.step
    calls = {"n": 0}

    def crash_on_third(self, scaler=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, scaler)

    monkeypatch.setattr(Optimization, "step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, progress=False)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["iteration"] == 2
    monkeypatch.setattr(Optimization, "step", real_step)
    interrupted.fgfi.teacher = str(_teacher_file(tmp_path, channels=16))
    with pytest.raises(LGDError, match="another teacher"):
        train(interrupted, resume=True, progress=False)
    moved = tmp_path / "moved" / "teacher.pth"  # the same teacher elsewhere: its SHA-256 says it is the same
    moved.parent.mkdir()
    shutil.copy(fgfi[0].split("=", 1)[1], moved)
    interrupted.fgfi.teacher = str(moved)
    train(interrupted, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "a" / FINAL)["model"]
    b = load_checkpoint(tmp_path / "b" / FINAL)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_the_fgfi_mask_is_drawn_over_an_image(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    student = tiny_detector("retinanet").eval()
    student.transform.min_size = (64,)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    energy, mask = fgfi_mask_maps(student, torch.rand(3, 48, 64), target, cfg)  # resized to 64 x 85
    assert [m.shape for m in mask] == [e.shape for e in energy]
    assert mask[0].shape == (8, 11) and set(mask[0].unique().tolist()) == {0.0, 1.0}
    rows, cols = mask[0].nonzero().unbind(1)
    # the box is (10.7, 10.7)-(53.3, 53.3) in the resized frame: its P3 (stride 8) locations lie about it
    assert 0 <= int(rows.min()) and int(rows.max()) <= 7 and int(cols.max()) <= 7

    dataset = build_dataset(cfg, "val", train=False)
    torch.save({"model": build_model(cfg, dataset.num_classes).state_dict()}, tmp_path / "w.pth")
    save_config(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "mask.png"
    assert main(["visualize", "-c", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "w.pth"),
                 "--fgfi-mask", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * PANEL_INCHES * DPI, 6 * PANEL_INCHES * DPI)


def test_the_benchmark_counts_the_teacher_in_fgfi_extra_cost():
    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    accuracy = importlib.import_module("accuracy")

    def run(ap: float, cpu: float) -> dict:
        return {"test": {"bbox/AP": ap}, "train_cpu_s": cpu, "resumed": False}

    summary = accuracy.methods_summary([run(10, 100), run(12, 120)], [run(11, 150), run(13, 170)],
                                       [run(12, 130), run(12, 150)], {"file": "t.pth", "train_cpu_s": 300})
    assert summary["lgd"]["extra_cpu_s"] == pytest.approx(50)  # 160 - 110
    assert summary["fgfi"]["extra_cpu_s"] == pytest.approx(330)  # 300 + 140 - 110
    assert summary["lgd_over_fgfi_extra_cost"] == pytest.approx(50 / 330)
    assert summary["baseline"]["AP"]["mean"] == 11 and summary["fgfi"]["AP"]["std"] == 0
    assert "| FGFI | 12.00 ± 0.00 | 140 (2 runs) | 330.00 |" in accuracy.methods_table("t", summary)


def test_only_the_adapter_conv_is_small_so_a_projected_adapter_still_learns():
    std = 1e-4
    projected = ImitationAdapter(32, 64, std)
    conv, projection = projected.layers[0], projected.layers[-1]
    assert conv.weight.abs().max() <= 2 * std and not conv.bias.any()
    assert projection.weight.std() > 100 * std  # PyTorch's default, not the official small init
