"""The deployable student: the plain torchvision detector, as weights plus the metadata that rebuilds it, or as
an ONNX graph for runtimes without Python.

``student.pth`` holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` and opening it runs no code::

    import torch, lgd.export
    exported = torch.load("student.pth", weights_only=True)
    model = lgd.export.build_student(exported)  # a plain torchvision detector, eval mode, test scale

``exported`` also holds "class_names" (label ``l`` is ``class_names[l - label_offset]``), "category_ids",
"label_offset", "arch" and "model_config" (backbone, FPN width, norms, anchor sizes, image sizes, ...).

``student.onnx`` takes one image, float32 (3, H, W) in [0, 1] RGB, any H and W, and returns "boxes" (N, 4)
XYXY in that image's pixels, "scores" (N,), "labels" (N,) int64 and, for Mask R-CNN, "masks" (N, 1, H, W)
probabilities; the class names are in the model's metadata. It is written with the TorchScript-based exporter
(``dynamo=False``): torchvision's detectors carry code paths for exactly that exporter (the transform's
resize and padding, top-k, mask pasting), and its NMS and RoIAlign have ONNX symbolics there, which is how
torchvision itself tests ONNX export; the dynamo exporter would also need the onnxscript package.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torchvision
from torch import Tensor, nn

from lgd.config import ModelConfig
from lgd.detectors import build_detector, set_test_size
from lgd.detectors.deform import has_deformable
from lgd.errors import LGDError
from lgd.utils.atomic import atomic_write
from lgd.utils.files import atomic_save
from lgd.utils.files import load_torch_file

FORMAT = "lgd-student/2"
ONNX_FORMAT = "lgd-student-onnx/1"
ONNX_OPSET = 17  # RoIAlign with aligned=True (R-CNNs) needs opset 16 or later
ONNX_TOLERANCE = 1e-3  # largest difference to PyTorch accepted for boxes (pixels), scores and mask probabilities


def deployable(student: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """A copy of the student on the CPU, in eval mode, at the test scale: what is exported."""
    model = copy.deepcopy(student).cpu().eval()
    set_test_size(model, model_cfg)
    return model


def export_student(
    student: nn.Module,
    model_cfg: ModelConfig,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    label_offset: int,
    out: Path,
) -> Path:
    """Write the student's weights and the metadata that rebuilds it (see the module docstring); returns ``out``."""
    architecture = dataclasses.replace(model_cfg, weights="", backbone_weights="")  # rebuilding loads no weights
    payload = {
        "format": FORMAT,
        "arch": model_cfg.arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "category_ids": [int(c) for c in category_ids],
        "label_offset": int(label_offset),
        "model_config": dataclasses.asdict(architecture),
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
    }
    atomic_save(payload, Path(out))
    return Path(out)


def build_student(exported: dict[str, Any]) -> nn.Module:
    """The plain torchvision detector an exported ``student.pth`` describes, with its weights, in eval mode at
    the test scale.

    Raises:
        LGDError: ``exported`` is not an lgd export this version can rebuild.
    """
    if not isinstance(exported, dict) or exported.get("format") != FORMAT:
        found = exported.get("format") if isinstance(exported, dict) else type(exported).__name__
        raise LGDError(f"not an lgd student export of format {FORMAT} (found {found!r}); export the run again "
                       "with `lgd export -c CONFIG`")
    try:
        model_cfg = ModelConfig(**exported["model_config"])
        model = build_detector(model_cfg, exported["num_classes"])
        model.load_state_dict(exported["state_dict"])
    except (TypeError, KeyError, RuntimeError) as e:  # a field this version lacks, or weights that do not fit
        raise LGDError(f"this lgd cannot rebuild the exported {exported.get('arch')} ({e}); export the run again "
                       "with this version: `lgd export -c CONFIG`") from None
    set_test_size(model, model_cfg)
    return model.eval()


def load_student(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported torchvision model (eval mode) and its metadata (everything in the file but the weights).

    Raises:
        LGDError: the file is missing or unreadable, or not an export this version can rebuild (files
            written by an older ``lgd export`` held a pickled model, which is not loaded).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        raise LGDError(f"{path} is an ONNX graph: `lgd predict` and load_student read the .pth export "
                       "(`lgd export -c CONFIG`); run ONNX files with onnxruntime (README, \"Evaluate, export, predict\")")
    payload = load_torch_file(path, "exported model")
    if isinstance(payload, dict) and "model" in payload and "format" not in payload:
        raise LGDError(f"{path} is a training checkpoint, not an exported model: export the student first with "
                       f"`lgd export -c {path.parent / 'config.yaml'}` (add `--weights {path}` for another "
                       f"checkpoint than model_final.pth) and pass the student.pth it writes")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise LGDError(f"{path} is not a student written by this version of `lgd export` (format {FORMAT}"
                       + (f", this file says {found}" if found else "") + "); export the run again with "
                       "`lgd export -c CONFIG`")
    try:
        model = build_student(payload)
    except LGDError as e:
        raise LGDError(f"{path}: {e}") from None
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


# ----------------------------------------------------------------------------- ONNX
class SingleImage(nn.Module):
    """A torchvision detector as one image in, plain tensors out: the interface an ONNX graph can have
    (the detector itself takes a list of images and returns a list of dicts)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.outputs = onnx_outputs(detector)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        """``image`` (3, H, W) float in [0, 1] -> boxes (N, 4), scores (N,), labels (N,)[, masks (N, 1, H, W)]."""
        detections = self.detector([image])[0]
        return tuple(detections[name] for name in self.outputs)


def onnx_outputs(detector: nn.Module) -> tuple[str, ...]:
    """Names of the ONNX graph's outputs, in order."""
    with_masks = getattr(getattr(detector, "roi_heads", None), "has_mask", lambda: False)()
    return ("boxes", "scores", "labels") + (("masks",) if with_masks else ())


@dataclass
class OnnxParity:
    """How onnxruntime's detections compare with PyTorch's on some images.

    Per image, each detection is paired with the other side's detection of the same label whose box is nearest
    (within ``PAIRING_RADIUS`` pixels), so that two near-equal scores ranked the other way round do not count.
    Differences are maxima over the pairs: boxes in pixels, scores and mask probabilities absolute. A detection
    without a partner is ``at_cut`` when its score is within the tolerance of the cut-off that left it out on the
    other side (the score threshold, or the lowest score kept when the other side kept the most it may): a
    near-tie decided either way by rounding. Any other is ``unmatched``: a real disagreement.
    """

    images: int = 0
    detections: int = 0
    unmatched: int = 0
    at_cut: int = 0
    boxes: float = 0.0
    scores: float = 0.0
    masks: float = 0.0

    def ok(self, tolerance: float = ONNX_TOLERANCE) -> bool:
        return self.unmatched == 0 and max(self.boxes, self.scores, self.masks) <= tolerance

    def __str__(self) -> str:
        text = (f"{self.images} images, {self.detections} detections: max |box difference| {self.boxes:.2g} px, "
                f"max |score difference| {self.scores:.2g}")
        text += f", max |mask difference| {self.masks:.2g}" if self.masks else ""
        text += f", {self.unmatched} detections without a partner" if self.unmatched else ", labels equal"
        text += f" ({self.at_cut} near-ties at the score cut-off differ)" if self.at_cut else ""
        return text + (" (nothing to compare: no detection above the score threshold)" if not self.detections else "")


PAIRING_RADIUS = 1.0  # pixels: boxes further apart than this are different detections, not one that moved


def export_onnx(
    student: nn.Module,
    model_cfg: ModelConfig,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    label_offset: int,
    images: Sequence[Tensor],
    out: Path,
) -> OnnxParity:
    """Write the student as an ONNX graph (see the module docstring), after checking it with onnxruntime.

    Args:
        images: (3, H, W) float images in [0, 1]; the first is traced, and all are run through PyTorch and
            onnxruntime, which must agree within ``ONNX_TOLERANCE``. Give two or more of different shapes.

    Returns:
        The comparison on ``images``.

    Raises:
        LGDError: the student has deformable convolutions (``model.deform_stages``: torchvision registers no
            ONNX symbolic for ``deform_conv2d``), onnx or onnxruntime is not installed, the export fails, or
            onnxruntime disagrees with PyTorch; nothing is written then.
    """
    if has_deformable(student):
        raise LGDError(f"ONNX export cannot express this student's deformable convolutions (model.deform_stages="
                       f"{model_cfg.deform_stages}): torchvision {torchvision.__version__} has no ONNX symbolic for "
                       "torchvision::deform_conv2d. Export the .pth (`lgd export` without --format onnx) and run it "
                       "with PyTorch")
    try:
        import onnx
        import onnxruntime  # noqa: F401  (used by onnx_parity; checked here so nothing is exported in vain)
    except ImportError as e:
        raise LGDError(f"`lgd export --format onnx` needs the onnx and onnxruntime packages ({e}); install them "
                       "with pip install -e \".[onnx]\" in the lgd checkout (or pip install onnx onnxruntime)") from None
    model = deployable(student, model_cfg)
    wrapped = SingleImage(model).eval()
    names = wrapped.outputs
    axes = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names}}
    if "masks" in names:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    # torch < 2.5 has no dynamo exporter and no ``dynamo`` argument
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    metadata = {
        "format": ONNX_FORMAT, "arch": model_cfg.arch, "class_names": json.dumps(list(class_names)),
        "category_ids": json.dumps([int(c) for c in category_ids]), "label_offset": str(int(label_offset)),
        "input": "image: float32 (3, H, W), RGB in [0, 1]",
        "outputs": "boxes (N, 4) XYXY pixels; scores (N,); labels (N,) int64, class_names[label - label_offset]"
                   + ("; masks (N, 1, H, W) probabilities" if "masks" in names else ""),
    }
    parity = OnnxParity()

    def write(tmp: str) -> None:
        nonlocal parity
        try:
            with warnings.catch_warnings():
                # The tracer's and exporter's notes (Python values frozen, constant folding, advanced indexing)
                # concern internals a user cannot act on; the check against PyTorch below tells whether the
                # graph is right.
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, (images[0],), tmp, input_names=["image"], output_names=list(names),
                                  dynamic_axes=axes, opset_version=ONNX_OPSET, **legacy)
        except Exception as e:  # the exporter's own error, with the detector it failed on
            raise LGDError(f"ONNX export of the {model_cfg.arch} student failed: {type(e).__name__}: {e}. "
                           "The weights export (lgd export --format pth) works for every detector") from None
        graph = onnx.load(tmp)
        onnx.helper.set_model_props(graph, metadata)
        onnx.save(graph, tmp)
        parity = onnx_parity(tmp, model, images)
        if not parity.ok():
            raise LGDError(f"the ONNX export of the {model_cfg.arch} student disagrees with PyTorch by more than "
                           f"{ONNX_TOLERANCE}: {parity}; nothing was written")

    atomic_write(Path(out), write)
    return parity


def onnx_parity(onnx_file: str | Path, model: nn.Module, images: Sequence[Tensor]) -> OnnxParity:
    """Run ``images`` through the ONNX graph (onnxruntime, CPU) and through ``model`` (PyTorch, eval mode) and
    compare the detections (see ``OnnxParity``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    # the cut-offs: RetinaNet and FCOS hold them themselves, the R-CNNs in their box head
    head = model if hasattr(model, "score_thresh") else model.roi_heads
    threshold, limit = float(head.score_thresh), int(head.detections_per_img)
    parity = OnnxParity()
    for image in images:
        with torch.no_grad():
            expected = model([image])[0]
        found = dict(zip(names, (torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()}))))
        compare_detections(expected, found, threshold, limit, parity)
        parity.images += 1
    return parity


def compare_detections(expected: dict[str, Tensor], found: dict[str, Tensor], threshold: float, limit: int,
             parity: OnnxParity) -> None:
    """Pair one image's ``found`` detections with the ``expected`` ones and record the differences; the model
    keeps detections scoring above ``threshold``, at most ``limit`` of them."""
    parity.detections += len(expected["boxes"])
    free = torch.ones(len(expected["boxes"]), dtype=torch.bool)
    alone = torch.zeros(len(found["boxes"]), dtype=torch.bool)
    for i in range(len(found["boxes"])):
        distance = (expected["boxes"] - found["boxes"][i]).abs().amax(dim=1)
        candidates = free & (expected["labels"] == found["labels"][i]) & (distance <= PAIRING_RADIUS)
        if not candidates.any():
            alone[i] = True
            continue
        j = int(torch.where(candidates, distance, torch.inf).argmin())
        free[j] = False
        parity.boxes = max(parity.boxes, float(distance[j]))
        parity.scores = max(parity.scores, float((expected["scores"][j] - found["scores"][i]).abs()))
        if "masks" in found:
            parity.masks = max(parity.masks, float((expected["masks"][j] - found["masks"][i]).abs().max()))
    for lone, other in ((found["scores"][alone], expected["scores"]), (expected["scores"][free], found["scores"])):
        # the other side left it out at a cut-off: below its threshold, or below its lowest kept score when full
        cut = float(other.min()) if len(other) == limit else threshold
        near_cut = lone <= cut + ONNX_TOLERANCE
        parity.at_cut += int(near_cut.sum())
        parity.unmatched += int((~near_cut).sum())
