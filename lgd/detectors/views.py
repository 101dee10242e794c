"""One small view per torchvision detector family: what LGD needs to know of a detector, in one place.

LGD never subclasses or patches a detector. What differs between detectors — how to build one from the config,
whether it is one-stage and predicts masks, how to get the FPN features, how to run the head's loss (or inference)
on *other* features such as the teacher's — lives in a ``DetectorView`` here, so the teacher, the distiller, the
data and the training loop stay generic. ``VIEWS`` is the one registry, keyed by the ``model.arch`` names
(``lgd.choices.ARCHS``); ``view_of`` finds the view of a detector instance. Adding a detector is one view here and
its name in ``lgd.choices``.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead

from lgd.config import ModelConfig

Targets = list[dict[str, Tensor]]


@dataclass(frozen=True)
class DegenerateValue:
    """A loss value that means a branch has stopped learning, and what to tell the user about it."""

    value: float
    meaning: str
    advice: str


# torchvision's FCOS passes its box-regression outputs through a ReLU and decodes them as distances from each
# location; where every output is <= 0, each predicted box has zero size, its GIoU loss is exactly 1 and no gradient
# reaches the branch. From scratch the branch starts near that point (its outputs are ~0 at initialisation), and in
# LGD runs the teacher's loss through the shared head can push it there for hundreds of iterations (BENCHMARKS.md,
# "The dead box-regression branch").
_FCOS_BOX = DegenerateValue(
    1.0,
    "FCOS's box-regression branch predicts zero-size boxes (every output is <= 0 after its ReLU), so its GIoU "
    "loss is 1 and it gets no gradient: the detector is not learning where objects are",
    "runs often recover by themselves; if it lasts, try a longer or gentler warm-up (solver.warmup_iters, "
    "solver.warmup_factor), a lower solver.base_lr, or lgd.teacher_trains_head=false (the teacher's loss then "
    "no longer moves the shared head)",
)


class DetectorView:
    """The uniform view LGD needs of one torchvision detector family.

    ``reference`` holds the LGD reference defaults of the family (docs/method.md, section 8).
    """

    detector_type: type[nn.Module]  # the torchvision class a registered view serves (and its subclasses)
    one_stage: bool  # dense head on P3-P7 (RetinaNet, FCOS), or RPN and ROI heads on P2-P6 (R-CNNs)
    has_masks: bool = False  # predicts instance masks: its targets carry them, evaluation scores segm too
    label_offset: int = 0  # 1: class 0 is the background and the dataset's labels start at 1
    reference: dict[str, bool] = {}
    # loss term (also with the teacher/ prefix) -> the value at which its branch has stopped learning (lgd's warning)
    degenerate_losses: dict[str, DegenerateValue] = {}

    @classmethod
    def build(cls, cfg: ModelConfig, backbone: nn.Module, num_classes: int) -> nn.Module:
        """A new torchvision detector of this family on ``backbone`` for ``num_classes`` foreground classes."""
        raise NotImplementedError

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

    def training_inputs(self, images: list[Tensor], targets: Optional[Targets], method: str
                        ) -> tuple[ImageList, Targets, "OrderedDict[str, Tensor]"]:
        """What a distillation ``method`` (named in the error) starts its training forward from: the preprocessed
        batch, its targets in the padded frame and the student's FPN features.

        Raises:
            ValueError: no targets.
        """
        if targets is None:
            raise ValueError(f"{method} needs targets in training mode")
        image_list, targets = self.preprocess(images, targets)
        return image_list, targets, self.features(image_list)

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


def _sizes(cfg: ModelConfig) -> dict[str, Any]:
    """The resize and output-count arguments every torchvision detector takes."""
    return dict(min_size=tuple(cfg.min_size), max_size=cfg.max_size, detections_per_img=cfg.detections_per_img)


def retinanet_anchors(sizes: list[int]) -> AnchorGenerator:
    """RetinaNet's anchors: per FPN level, base size x 2^(0, 1/3, 2/3) and aspect ratios 0.5, 1, 2 (9 per location)."""
    octave = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    return AnchorGenerator(octave, ((0.5, 1.0, 2.0),) * len(octave))


def _frozen_call(module: nn.Module, *args):
    """``module(*args)`` with its parameters detached: gradients reach the inputs, never the parameters."""
    return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)


def _subset(image_list: ImageList, index: Tensor) -> ImageList:
    idx = index.tolist()
    return ImageList(image_list.tensors[index], [image_list.image_sizes[i] for i in idx])


class OneStageView(DetectorView):
    """RetinaNet and FCOS: the head is per-image (no batch statistics), so the student's and the
    teacher's features go through it as one batch and their outputs are split afterwards."""

    one_stage = True
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

    @classmethod
    def build(cls, cfg, backbone, num_classes):
        model = RetinaNet(backbone, num_classes, score_thresh=cfg.score_thresh,
                          anchor_generator=retinanet_anchors(cfg.anchor_sizes), **_sizes(cfg))
        if cfg.head_norm == "gn":
            model.head = RetinaNetHead(
                backbone.out_channels,
                model.anchor_generator.num_anchors_per_location()[0],
                num_classes,
                norm_layer=functools.partial(nn.GroupNorm, 32),
            )
        return model

    def _compute_loss(self, targets, outputs, anchors, features):
        return self.model.compute_loss(targets, outputs, anchors)


class FCOSView(OneStageView):
    detector_type = FCOS
    reference = {"context_box": False, "detach_appearance": False}
    degenerate_losses = {"bbox_regression": _FCOS_BOX}

    @classmethod
    def build(cls, cfg, backbone, num_classes):
        return FCOS(backbone, num_classes, score_thresh=cfg.score_thresh, **_sizes(cfg))

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

    one_stage = False
    label_offset = 1
    reference = {"context_box": False, "detach_appearance": True}

    @classmethod
    def build(cls, cfg, backbone, num_classes):
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
        return cls.detector_type(
            backbone, num_classes + cls.label_offset,
            box_score_thresh=cfg.score_thresh, rpn_anchor_generator=anchors, box_batch_size_per_image=cfg.roi_batch_size,
            rpn_pre_nms_top_n_train=cfg.rpn_proposals_train, rpn_post_nms_top_n_train=cfg.rpn_proposals_train,
            rpn_pre_nms_top_n_test=cfg.rpn_proposals_test, rpn_post_nms_top_n_test=cfg.rpn_proposals_test,
            **_sizes(cfg),
        )

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
    has_masks = True

    @classmethod
    def build(cls, cfg, backbone, num_classes):
        model = super().build(cfg, backbone, num_classes)
        m = cfg.mask_head_channels  # the mask head's width, which torchvision fixes at 256
        model.roi_heads.mask_head = MaskRCNNHeads(backbone.out_channels, (m,) * 4, 1)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(m, m, num_classes + cls.label_offset)
        return model


VIEWS: dict[str, type[DetectorView]] = {
    "retinanet": RetinaNetView,
    "fcos": FCOSView,
    "fasterrcnn": FasterRCNNView,
    "maskrcnn": MaskRCNNView,
}


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
