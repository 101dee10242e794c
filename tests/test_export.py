"""ONNX export: onnxruntime's detections match the PyTorch student's on the test images (CPU)."""
import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from helpers import ARCHS, tiny_detector
from lgd.cli import main
from lgd.config import ModelConfig, save_config
from lgd.engine.training import train
from lgd.export import ONNX_TOLERANCE, OnnxParity, compare_detections, deployable, export_onnx


def _test_images(synth_root: Path) -> list[torch.Tensor]:
    """The built-in test split's images, plus one cropped to another shape: the graph must follow the size."""
    images = [to_tensor(Image.open(p).convert("RGB")) for p in sorted((synth_root / "test").glob("*.png"))]
    return images + [images[0][:, :, :48]]


def _decisive(model: torch.nn.Module) -> torch.nn.Module:
    """A detector from scratch scores nearly every box alike (its classification prior), so that which boxes pass
    the score threshold and in what order would be decided by rounding; spread its class scores apart."""
    g = torch.Generator().manual_seed(0)
    head = (model.head.classification_head.cls_logits if hasattr(model, "head")
            else model.roi_heads.box_predictor.cls_score)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.3)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_matches_pytorch_on_the_test_images(arch, synth_root, tmp_path):
    # FPN width 64: FCOS's GroupNorm(32) needs 2+ values per group on the 1x1 P7 of a 64 px image
    cfg = ModelConfig(arch=arch, depth=18, fpn_channels=64, norm="bn", min_size=[64], max_size=128)
    student = _decisive(tiny_detector(arch, channels=64))
    images = _test_images(synth_root)
    offset = 1 if arch in ("fasterrcnn", "maskrcnn") else 0
    parity = export_onnx(student, cfg, ["a", "b", "c"], [1, 5, 7], offset, images, tmp_path / "s.onnx")
    assert parity.images == len(images) and parity.detections > 50 and parity.ok()

    # independently of lgd's pairing: the same number of detections, labels and (sorted) scores
    session = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "scores", "labels"] + (["masks"] if arch == "maskrcnn" else [])
    model = deployable(student, cfg)
    for image in images:
        with torch.no_grad():
            expected = model([image])[0]
        found = {k: torch.from_numpy(v) for k, v in zip(names, session.run(None, {"image": image.numpy()}))}
        assert len(found["boxes"]) == len(expected["boxes"]) > 0
        assert torch.equal(found["labels"].sort().values, expected["labels"].sort().values)
        torch.testing.assert_close(found["scores"].sort().values, expected["scores"].sort().values,
                                   atol=ONNX_TOLERANCE, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "s.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == ["a", "b", "c"] and meta["label_offset"] == str(offset)


def test_export_onnx_from_the_cli(tiny_config, tmp_path, capsys):
    cfg = tiny_config("model.arch=fasterrcnn", "solver.max_iter=1", "checkpoint_period=1")
    train(cfg, progress=False)
    save_config(cfg, tmp_path / "cfg.yaml")
    capsys.readouterr()
    assert main(["export", "-c", str(tmp_path / "cfg.yaml"), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    path = Path(cfg.output_dir) / "student.onnx"
    assert f"as ONNX to {path}" in out and "checked with onnxruntime against PyTorch on 3 images" in out
    assert "labels equal" in out
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["arch"] == "fasterrcnn" and len(json.loads(meta["class_names"])) == 8


def test_export_needs_the_checkpoint_not_the_training_images(tiny_config, tmp_path, capsys):
    cfg = tiny_config("solver.max_iter=1", "checkpoint_period=1")
    train(cfg, progress=False)
    cfg.data.train.root = str(tmp_path / "images-deleted-after-training")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["export", "-c", str(tmp_path / "cfg.yaml")]) == 0
    exported = torch.load(Path(cfg.output_dir) / "student.pth", weights_only=True)
    names = json.loads((Path(cfg.data.train.ann)).read_text())["categories"]
    assert exported["class_names"] == [c["name"] for c in sorted(names, key=lambda c: c["id"])]
    assert exported["category_ids"] == sorted(c["id"] for c in names) and exported["label_offset"] == 0


def _detections(*rows: tuple[float, int, float]) -> dict[str, torch.Tensor]:
    """(x offset of a 10 px box, label, score) per detection."""
    return {"boxes": torch.tensor([[x, 0.0, x + 10, 10] for x, _, _ in rows]).reshape(-1, 4),
            "labels": torch.tensor([label for _, label, _ in rows], dtype=torch.int64),
            "scores": torch.tensor([score for _, _, score in rows])}


def test_parity_pairs_detections_and_tells_near_ties_at_the_cut_off_from_disagreements():
    reference = _detections((0, 1, 0.9), (20, 2, 0.5), (40, 1, 0.5000001), (60, 1, 0.3))
    cases = [
        # the same detections, two near-equal scores ranked the other way round: no difference
        (_detections((0, 1, 0.9), (40, 1, 0.5000002), (20, 2, 0.5), (60, 1, 0.3)), 4, dict(), True),
        # full at 4: the last one differs by a near-tie at the lowest kept score
        (_detections((0, 1, 0.9), (20, 2, 0.5), (40, 1, 0.5000001), (80, 1, 0.2999999)), 4, dict(at_cut=2), True),
        # a detection well above every cut-off is missing
        (_detections((0, 1, 0.9), (40, 1, 0.5000001), (60, 1, 0.3)), 100, dict(unmatched=1), False),
        # a box 0.01 px off, a score 0.002 off
        (_detections((0.01, 1, 0.9), (20, 2, 0.502), (40, 1, 0.5000001), (60, 1, 0.3)), 4, dict(), False),
    ]
    for found, limit, counts, ok in cases:
        parity = OnnxParity()
        compare_detections(reference, found, 0.05, limit, parity)
        assert (parity.unmatched, parity.at_cut) == (counts.get("unmatched", 0), counts.get("at_cut", 0)), found
        assert parity.ok() == ok, found
    assert parity.boxes == pytest.approx(0.01, abs=1e-6) and parity.scores == pytest.approx(0.002, abs=1e-6)
