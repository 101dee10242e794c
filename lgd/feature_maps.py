"""The picture of the method: the student's FPN features beside the implicit teacher's instructive knowledge.

For one image, each FPN level of the student and the teacher is reduced to its energy — the L2 norm
over the C channels at each position, (H_l, W_l) — and drawn as a heatmap with the ground-truth boxes
on top. The teacher paints each object's knowledge into its box on every level, so its maps show
where the labels put information; the student's maps show what the backbone sees. For FGFI (an FGFI run, or
``lgd visualize --fgfi-mask``) the right column is instead FGFI's imitation mask: where the student imitates
its teacher.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from lgd.config import Config, distill_method
from lgd.data import CocoDetection
from lgd.data.build import to_device
from lgd.detectors import set_test_size, view_of
from lgd.draw import class_color
from lgd.errors import DatasetError, LGDError
from lgd.methods.fgfi import batch_masks, mask_anchors
from lgd.methods.lgd import LGD
from lgd.methods.trainable import Trainable

PANEL_INCHES = 3.0
DPI = 100


@torch.no_grad()
def feature_energies(model: LGD, image: Tensor, target: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Student and teacher energy per FPN level for one image, cropped to the image (padding removed).

    Args:
        model: an LGD model in eval mode, the detector's test size already set.
        image: (3, H, W) float in [0, 1]; target: "boxes" (N, 4) XYXY in image pixels, "labels" (N,)
            in the detector's convention, plain tensors on the model's device.

    Returns:
        (student, teacher): lists over levels of (h_l, w_l) float CPU tensors, the channel-wise L2 norm.
    """
    image_list, targets = model.view.preprocess([image], [dict(target)])
    features = model.view.features(image_list)
    teacher = model.teach(image_list.tensors.shape[-2:], features, targets).features
    return (_cropped([s[0].norm(dim=0) for s in features.values()], image_list),
            _cropped([t[0].norm(dim=0) for t in teacher], image_list))


@torch.no_grad()
def fgfi_mask_maps(student: nn.Module, image: Tensor, target: dict[str, Tensor], cfg: Config
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """Student energy and FGFI's imitation mask (``fgfi.psi``) per FPN level for one image, cropped to the image.

    Args:
        student: the torchvision detector, in eval mode, the test size set; image and target as in
            ``feature_energies``.

    Returns:
        (student, mask): lists over levels of (h_l, w_l) float CPU tensors; the mask is 1 where FGFI imitates.
    """
    view = view_of(student)
    image_list, targets = view.preprocess([image], [dict(target)])
    features = list(view.features(image_list).values())
    masks = batch_masks(mask_anchors(view, cfg.model.anchor_sizes), image_list, features, targets, cfg.fgfi.psi)
    return (_cropped([s[0].norm(dim=0) for s in features], image_list),
            _cropped([m[0].float() for m in masks], image_list))


def _cropped(maps: list[Tensor], image_list: ImageList) -> list[Tensor]:
    """Per-level (H_l, W_l) maps of the padded frame cut to the image's part, on the CPU."""
    padded = image_list.tensors.shape[-2:]
    h, w = image_list.image_sizes[0]
    return [m[:math.ceil(h * m.shape[-2] / padded[0]), :math.ceil(w * m.shape[-1] / padded[1])].cpu() for m in maps]


def level_names(model: Trainable, count: int) -> list[str]:
    """P3.. for RetinaNet / FCOS, P2.. for the R-CNNs."""
    first = 3 if view_of(model.student).one_stage else 2
    return [f"P{first + i}" for i in range(count)]


def _draw_boxes(axes, boxes: Tensor, classes: Sequence[int], names: Sequence[str], labels: bool) -> None:
    for (x1, y1, x2, y2), c in zip(boxes.tolist(), classes):
        color = tuple(v / 255 for v in class_color(c))
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))
        if labels:
            axes.text(x1, y1, names[c], color="white", fontsize="x-small", va="bottom",
                      bbox={"facecolor": color, "edgecolor": "none", "pad": 1})


def render_feature_maps(
    image: Tensor,
    boxes: Tensor,
    classes: Sequence[int],
    class_names: Sequence[str],
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    names: Sequence[str],
    out: Path,
    title: str,
    columns: tuple[str, str] = ("student FPN", "teacher knowledge"),
) -> Path:
    """Write the PNG: the image with its boxes on top, then one row per level (student | teacher).

    Args:
        image: (3, H, W) float in [0, 1]; boxes: (N, 4) XYXY in its pixels; classes: (N,) indices 0..K-1.
        student, teacher: per level (h_l, w_l) energies covering the image; each panel has its own colour
            scale (the two feature spaces are not on one scale).
        names: level names; columns: the two columns' titles; out: the PNG, ``2 * PANEL_INCHES * DPI`` wide and ``(1 + levels)`` panels high.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    height, width = image.shape[-2:]
    extent = (0, width, height, 0)  # every map stretched over the image, so boxes use image pixels
    figure = Figure(figsize=(2 * PANEL_INCHES, (1 + len(names)) * PANEL_INCHES), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1 + len(names), 2)
    top = figure.add_subplot(grid[0, :])
    top.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), extent=extent)
    _draw_boxes(top, boxes, classes, class_names, labels=True)
    top.set_title(title, fontsize="small")
    top.axis("off")
    for row, (name, s, t) in enumerate(zip(names, student, teacher), start=1):
        for col, (energy, who) in enumerate(zip((s, t), columns)):
            axes = figure.add_subplot(grid[row, col])
            shown = axes.imshow(energy.numpy(), extent=extent, cmap="viridis", interpolation="nearest")
            figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
            _draw_boxes(axes, boxes, classes, class_names, labels=False)
            axes.set_title(f"{who} {name} ({energy.shape[0]}x{energy.shape[1]})", fontsize="x-small")
            axes.set_xticks([])
            axes.set_yticks([])
    figure.savefig(out, dpi=DPI)
    return out


def find_image(dataset: CocoDetection, image: str | None) -> int:
    """Sample index of ``image``: an image id, a ``file_name`` or its last part; None = the first image with objects."""
    for idx in range(len(dataset)):
        info = dataset.image_info(idx)
        if image is None:
            if dataset[idx][1]["boxes"].shape[0]:
                return idx
        elif image in (str(info["id"]), info["file_name"], Path(info["file_name"]).name):
            return idx
    if image is None:
        raise DatasetError(f"{dataset.ann_file}: no image has an object to show")
    raise DatasetError(f"{dataset.ann_file}: no image with id or file name '{image}'")


def visualize_features(model: Trainable, dataset: CocoDetection, index: int, cfg: Config,
                       device: torch.device, out: Path, fgfi_mask: bool = False) -> Path:
    """Write the PNG of sample ``index`` of an evaluation dataset: the student beside LGD's teacher knowledge, or
    beside FGFI's imitation mask (``fgfi_mask``, and always for an FGFI run, whose teacher is not part of it).

    Raises:
        LGDError: the teacher's maps asked of a model without LGD's teacher.
    """
    fgfi_mask = fgfi_mask or distill_method(cfg) == "fgfi"
    if not fgfi_mask and not isinstance(model, LGD):
        raise LGDError("the teacher's maps need an LGD model (this run has distill.method="
                       f"{distill_method(cfg)}); --fgfi-mask draws FGFI's imitation mask instead")
    model.eval()
    set_test_size(model.student, cfg.model)
    image, target = dataset[index]
    images, targets = to_device([image], [target], device)
    tensors = {k: v for k, v in targets[0].items() if isinstance(v, Tensor)}  # boxes, labels (masks)
    if fgfi_mask:
        student, right = fgfi_mask_maps(model.student, images[0], tensors, cfg)
        columns = ("student FPN", f"FGFI imitation mask (psi {cfg.fgfi.psi})")
    else:
        student, right = feature_energies(model, images[0], tensors)
        columns = ("student FPN", "teacher knowledge")
    info = dataset.image_info(index)
    classes = (targets[0]["labels"] - view_of(model.student).label_offset).tolist()
    return render_feature_maps(
        image.as_subclass(Tensor), targets[0]["boxes"].cpu(), classes, dataset.class_names, student, right,
        level_names(model, len(student)), out, f"{info['file_name']} (image id {info['id']}): ground truth", columns,
    )
