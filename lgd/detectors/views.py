"""One small view per torchvision detector family: what LGD needs to know of a detector, in one place.

LGD never subclasses or patches a detector. What differs between detectors — how to get the FPN features, how to
run the head's loss (or inference) on *other* features such as the teacher's — lives in a ``DetectorView`` here,
so the teacher, the distiller and the training loop stay generic. ``VIEWS`` is the one registry, keyed by the
``model.arch`` names; ``view_of`` finds the view of a detector instance.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

Targets = list[dict[str, Tensor]]


class DetectorView:
    """The uniform view LGD needs of one torchvision detector family.

    ``reference`` holds the LGD reference defaults of the family (docs/method.md, section 8).
    """

    detector_type: type[nn.Module]  # the torchvision class a registered view serves (and its subclasses)
    label_offset: int = 0
    reference: dict[str, bool] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # False: the teacher's pass runs the heads with detached parameters (lgd.teacher_trains_head)
        self.teacher_trains_head = True

    @property
    def channels(self) -> int:
        return self.model.backbone.out_channels

    @property
    def anchor_generator(self) -> Optional[nn.Module]:
        """The detector's own anchors (RetinaNet's, the R-CNN RPN's), or None for an anchor-free detector (FCOS)."""
        return self.model.anchor_generator

    @property
    def backbone_body(self) -> nn.Module:
        return self.model.backbone.body

    def preprocess(self, images: list[Tensor], targets: Optional[Targets]) -> tuple[ImageList, Optional[Targets]]:
        """The detector's own resize/normalise/pad; boxes (and masks) follow into the padded frame."""
        return self.model.transform(images, targets)

    def features(self, image_list: ImageList) -> "OrderedDict[str, Tensor]":
        """FPN levels, finest first, each (B, C, H_l, W_l)."""
        feats = self.model.backbone(image_list.tensors)
        return feats if isinstance(feats, OrderedDict) else OrderedDict(feats)

    def losses(
        self,
        image_list: ImageList,
        targets: Targets,
        features: "OrderedDict[str, Tensor]",
        teacher: Optional[list[Tensor]] = None,
        teacher_index: Optional[Tensor] = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Head losses of the student features and, with the same targets, of the teacher features.

        ``teacher`` levels hold the images ``teacher_index`` (a subset of the batch) in that order.
        Returns (student losses, teacher losses), named as the detector names them.
        """
        raise NotImplementedError

    def detect(
        self, image_list: ImageList, features: "OrderedDict[str, Tensor]", original_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Inference from given features (the student's, or the teacher's for the diagnostic)."""
        raise NotImplementedError


def _frozen_call(module: nn.Module, *args):
    """``module(*args)`` with its parameters detached: gradients reach the inputs, never the parameters."""
    return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)


def _subset(image_list: ImageList, index: Tensor) -> ImageList:
    idx = index.tolist()
    return ImageList(image_list.tensors[index], [image_list.image_sizes[i] for i in idx])


class OneStageView(DetectorView):
    """RetinaNet and FCOS: the head is per-image (no batch statistics), so the student's and the
    teacher's features go through it as one batch and their outputs are split afterwards."""

    label_offset = 0

    def _compute_loss(self, targets: Targets, outputs: dict[str, Tensor], anchors: list[Tensor],
                      features: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def losses(self, image_list, targets, features, teacher=None, teacher_index=None):
        student = list(features.values())
        b = len(targets)
        anchors = self.model.anchor_generator(image_list, student)
        if teacher is not None and not self.teacher_trains_head:
            outputs = self.model.head(student)
            t_outputs = _frozen_call(self.model.head, teacher)
        else:
            both = student if teacher is None else [torch.cat([s, t]) for s, t in zip(student, teacher)]
            outputs = self.model.head(both)
            t_outputs = {k: v[b:] for k, v in outputs.items()}
        student_losses = self._compute_loss(targets, {k: v[:b] for k, v in outputs.items()}, anchors, student)
        if teacher is None:
            return student_losses, {}
        t_targets = [targets[i] for i in teacher_index.tolist()]
        return student_losses, self._compute_loss(t_targets, t_outputs, anchors[: len(t_targets)], student)

    def detect(self, image_list, features, original_sizes):
        feats = list(features.values())
        outputs = self.model.head(feats)
        anchors = self.model.anchor_generator(image_list, feats)
        per_level = [x.size(2) * x.size(3) for x in feats]
        per_location = outputs["cls_logits"].size(1) // sum(per_level)
        split = [n * per_location for n in per_level]
        split_outputs = {k: list(v.split(split, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(split)) for a in anchors]
        detections = self.model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        return self.model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


class RetinaNetView(OneStageView):
    detector_type = RetinaNet
    reference = {"context_box": True, "detach_appearance": False}

    def _compute_loss(self, targets, outputs, anchors, features):
        return self.model.compute_loss(targets, outputs, anchors)


class FCOSView(OneStageView):
    detector_type = FCOS
    reference = {"context_box": False, "detach_appearance": False}

    @property
    def anchor_generator(self) -> None:
        # FCOS's "anchors" are one stride-sized point per location, not boxes to match objects against
        return None

    def _compute_loss(self, targets, outputs, anchors, features):
        per_level = [x.size(2) * x.size(3) for x in features]
        return self.model.compute_loss(targets, outputs, anchors, per_level)


class TwoStageView(DetectorView):
    """Faster and Mask R-CNN: RPN and ROI heads run on the teacher features as a second pass
    (their proposal sampling and loss normalisation span the whole batch, so no shared pass)."""

    label_offset = 1
    reference = {"context_box": False, "detach_appearance": True}

    @property
    def anchor_generator(self) -> nn.Module:
        return self.model.rpn.anchor_generator

    def _heads(self, image_list: ImageList, features: "OrderedDict[str, Tensor]", targets: Targets,
               frozen: bool = False) -> dict[str, Tensor]:
        call = _frozen_call if frozen else lambda module, *args: module(*args)
        proposals, rpn_losses = call(self.model.rpn, image_list, features, targets)
        _, roi_losses = call(self.model.roi_heads, features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    def losses(self, image_list, targets, features, teacher=None, teacher_index=None):
        student_losses = self._heads(image_list, features, targets)
        if teacher is None:
            return student_losses, {}
        t_features = OrderedDict(zip(features.keys(), teacher))
        t_targets = [targets[i] for i in teacher_index.tolist()]
        return student_losses, self._heads(_subset(image_list, teacher_index), t_features, t_targets,
                                           frozen=not self.teacher_trains_head)

    def detect(self, image_list, features, original_sizes):
        proposals, _ = self.model.rpn(image_list, features)
        detections, _ = self.model.roi_heads(features, proposals, image_list.image_sizes)
        return self.model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


class FasterRCNNView(TwoStageView):
    detector_type = FasterRCNN


class MaskRCNNView(TwoStageView):
    detector_type = MaskRCNN


VIEWS: dict[str, type[DetectorView]] = {
    "retinanet": RetinaNetView,
    "fcos": FCOSView,
    "fasterrcnn": FasterRCNNView,
    "maskrcnn": MaskRCNNView,
}
ARCHS = tuple(VIEWS)  # the model.arch choices


def view_of(model: nn.Module) -> DetectorView:
    """The view of a torchvision detector instance (a MaskRCNN is found before its parent class FasterRCNN).

    Raises TypeError for a model of no family in ``VIEWS``.
    """
    for cls in type(model).__mro__:
        for view in VIEWS.values():
            if view.detector_type is cls:
                return view(model)
    raise TypeError(
        f"LGD supports torchvision RetinaNet, FCOS, FasterRCNN and MaskRCNN; got {type(model).__name__}"
    )
