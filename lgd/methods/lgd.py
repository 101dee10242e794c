"""LGD around a torchvision detector: student + implicit teacher + adapter, the three losses, the schedule.

    lgd = LGD(torchvision_detector, num_classes=K)
    losses = lgd(images, targets)      # training: student, teacher/ and distillation terms
    detections = lgd.eval()(images)    # inference: exactly the wrapped detector

The teacher and the adapter exist only for training; ``lgd.student`` is the deployable model.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from lgd.choices import DISTILL_REGIONS
from lgd.config import LGDConfig
from lgd.detectors import DetectorView, Targets, view_of
from lgd.methods.trainable import Trainable
from lgd.methods.trainable import OptimizerGroup
from lgd.teacher import ImplicitTeacher, TeacherOutput


class FeatureAdapter(nn.Module):
    """The student-side adapter of the distillation loss, shared by all levels (docs/method.md, section 7).

    conv3x3, ReLU, conv3x3, ReLU, conv3x3 (C -> C, with bias): (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per image and channel over (H, W), no affine: F.instance_norm's maths, but defined for 1x1 maps
    (small images give 1x1 top levels, where F.instance_norm refuses to run in training)."""
    var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def distillation_loss(student: list[Tensor], teacher: list[Tensor], region: list[Tensor] | None = None) -> Tensor:
    """Mean squared error between instance-normalised features over all levels concatenated.

    ``student`` (adapted) and ``teacher`` levels are (B, C, H_l, W_l); the teacher is detached here, so the
    distillation loss never trains the teacher. ``region`` (the departure ``lgd.distill_region=objects``,
    docs/method.md section 10), per level (B, 1, H_l, W_l) bool, restricts the mean to those pixels (all
    channels); the normalisation stays over the whole map, as in the reference. No pixel in the region: 0.
    """
    squared, count = student[0].new_zeros(()), 0
    for level, (s, t) in enumerate(zip(student, teacher)):
        diff = (instance_norm(s) - instance_norm(t.detach())).pow(2)
        if region is None:
            squared, count = squared + diff.sum(), count + diff.numel()
        else:
            inside = region[level].to(diff.dtype)
            squared = squared + (diff * inside).sum()
            count = count + inside.sum() * diff.shape[1]
    if region is None:
        return squared / max(count, 1)
    return squared / count.clamp(min=1)


def _padded_masks(targets: Targets, size: tuple[int, int]) -> list[Tensor]:
    """Instance masks resized by the detector's transform, zero-padded to the batch frame: (N_i, H, W)."""
    out = []
    for t in targets:
        m = t["masks"]
        out.append(F.pad(m, (0, size[1] - m.shape[-1], 0, size[0] - m.shape[-2])))
    return out


class LGD(Trainable):
    """Label-guided self-distillation wrapped around a torchvision RetinaNet, FCOS, Faster or Mask R-CNN.

    Args:
        detector: the student, a torchvision detection model; it stays untouched and is what you deploy.
        num_classes: K foreground classes (targets' labels are the detector's own: 0..K-1 for one-stage
            detectors, 1..K for the R-CNNs); defaults to what the detector predicts.
        config: LGD settings; ``None`` fields take the detector family's reference defaults.
        max_iter: total training iterations, needed only for ``post_distill_iters``.
    """

    def __init__(
        self,
        detector: nn.Module,
        num_classes: Optional[int] = None,
        config: Optional[LGDConfig] = None,
        max_iter: int = 0,
    ) -> None:
        super().__init__()
        cfg = config or LGDConfig()
        self.student = detector
        self.view: DetectorView = view_of(detector)  # how LGD reaches into the student: features, heads
        self.view.teacher_trains_head = cfg.teacher_trains_head
        if num_classes is None:
            num_classes = _predicted_classes(detector) - self.view.label_offset
        ref = self.view.reference
        self.context_box = ref["context_box"] if cfg.context_box is None else cfg.context_box
        self.detach_appearance = ref["detach_appearance"] if cfg.detach_appearance is None else cfg.detach_appearance
        self.mask_guided = cfg.mask_guided
        self.teacher = ImplicitTeacher(
            num_classes,
            channels=self.view.channels,
            context_box=self.context_box,
            class_format=cfg.class_format,
            attention=cfg.attention,
            detach_appearance=self.detach_appearance,
            mask_guided=cfg.mask_guided,
            relation_residual=cfg.relation_residual,
            label_fusion=cfg.label_fusion,
        )
        if cfg.distill_region not in DISTILL_REGIONS:
            raise ValueError(f"distill_region must be one of {DISTILL_REGIONS}, got {cfg.distill_region!r}")
        self.distill_region = cfg.distill_region
        self.adapter = FeatureAdapter(self.view.channels)
        self.num_classes = num_classes
        self.distill_weight = cfg.distill_weight
        self.pre_distill_iters = cfg.pre_distill_iters
        self.post_distill_iters = cfg.post_distill_iters
        self.freeze_backbone_iters = cfg.freeze_backbone_iters
        self.max_iter = max_iter
        self.teacher_optimizer, self.teacher_lr, self.teacher_momentum = cfg.teacher_optimizer, cfg.teacher_lr, \
            cfg.teacher_momentum
        self.teacher_weight_decay = cfg.teacher_weight_decay
        self._body_trainable = [p for p in self.view.backbone_body.parameters() if p.requires_grad]
        self.iteration = 0

    def set_iteration(self, iteration: int) -> None:
        """Apply the schedule's windows for this iteration (call before each training step)."""
        self.iteration = iteration
        frozen = iteration < self.freeze_backbone_iters
        for p in self._body_trainable:
            p.requires_grad_(not frozen)

    @property
    def student_detached(self) -> bool:
        """True inside the windows where only the adapter learns from the distillation loss.

        The post-distillation window is ``iteration > max_iter - post_distill_iters``, as in the reference
        (megvii-research/LGD ``train.py``), so it holds ``post_distill_iters - 1`` of the 0-based iterations.
        """
        post = self.post_distill_iters and self.iteration > self.max_iter - self.post_distill_iters
        return self.iteration < self.pre_distill_iters or bool(post)

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """Two optimizers, as in the paper: the student's (detector and adapter, the solver's settings) and the
        teacher's (``lgd.teacher_optimizer``, ``teacher_lr``, ``teacher_momentum``, ``teacher_weight_decay``)."""
        return [OptimizerGroup([self.student, self.adapter]),
                OptimizerGroup([self.teacher], self.teacher_lr, self.teacher_momentum, self.teacher_weight_decay,
                               optimizer=self.teacher_optimizer)]

    has_teacher = True

    def describe(self) -> str:
        """LGD's training-only parts and when distillation reaches the student, for the training summary."""
        millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (self.teacher, self.adapter)]
        parts = (f"on: implicit teacher {millions[0]:.2f} M + adapter {millions[1]:.2f} M parameters, training only; "
                 f"the student learns from distillation after iteration {self.pre_distill_iters}")
        if self.max_iter and self.pre_distill_iters >= self.max_iter:
            parts += (f" — WARNING: this run ends at iteration {self.max_iter}, so the student never learns from "
                      f"distillation (shorten lgd.pre_distill_iters with solver.max_iter)")
        return parts

    def may_leave_parameters_unused(self, start: int, images_may_lack_objects: bool) -> bool:
        """LGD's frozen-backbone window still ahead, or a teacher without context box on a rank whose images may
        all lack objects. Everything else in the student, adapter and teacher takes part in every step's loss."""
        return start < self.freeze_backbone_iters or (not self.context_box and images_may_lack_objects)

    def student_parameters(self) -> list[nn.Parameter]:
        """What the student optimizer updates: the detector and the adapter."""
        return list(self.student.parameters()) + list(self.adapter.parameters())

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self.teacher.parameters())

    def forward(self, images: list[Tensor], targets: Optional[Targets] = None):
        if not self.training:
            return self.student(images)
        image_list, targets, features = self.view.training_inputs(images, targets, "LGD")
        # the labels show up in torch.profiler traces (benchmarks/profile_step.py)
        with record_function("lgd.teacher"):
            teacher = self.teach(image_list.tensors.shape[-2:], features, targets)
        index = teacher.has_objects.nonzero().flatten()
        t_feats = teacher.features if len(index) == len(targets) else [t[index] for t in teacher.features]
        region = None
        if self.distill_region == "objects":
            region = teacher.object_pixels if len(index) == len(targets) else [p[index] for p in teacher.object_pixels]
        with record_function("lgd.heads"):
            student_losses, teacher_losses = self.view.losses(
                image_list, targets, features, t_feats if len(index) else None, index
            )
        losses = dict(student_losses)
        losses.update({f"teacher/{k}": v for k, v in teacher_losses.items()})
        with record_function("lgd.distill"):
            losses["loss_distill"] = self.distill_weight * self._distill(list(features.values()), t_feats, index, region)
        return losses

    def teach(self, size: torch.Size, features: "OrderedDict[str, Tensor]", targets: Targets) -> TeacherOutput:
        """The implicit teacher's features for a batch already in the detector's padded frame."""
        classes = [t["labels"] - self.view.label_offset for t in targets]
        masks = _padded_masks(targets, tuple(size)) if self.mask_guided else None
        return self.teacher(list(features.values()), [t["boxes"] for t in targets], classes, tuple(size), masks)

    def _distill(
        self, student: list[Tensor], teacher: list[Tensor], index: Tensor, region: Optional[list[Tensor]] = None
    ) -> Tensor:
        if len(index) == 0:
            # keeps every adapter parameter in the graph (DDP) while contributing nothing
            return sum(p.sum() for p in self.adapter.parameters()) * 0.0
        if len(index) != student[0].shape[0]:
            student = [s[index] for s in student]
        if self.student_detached:
            student = [s.detach() for s in student]
        return distillation_loss([self.adapter(s) for s in student], teacher, region)

    @torch.no_grad()
    def teacher_detect(self, images: list[Tensor], targets: Targets) -> list[dict[str, Tensor]]:
        """The teacher diagnostic: the student's head run on the teacher's maps (needs the ground truth).

        Detections in the student's output format. An AP above the student's says the teacher has something to
        teach; below, distilling it pulls the student down (docs/method.md, section 9).
        """
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.view.preprocess(images, targets)
        features = self.view.features(image_list)
        teacher = self.teach(image_list.tensors.shape[-2:], features, targets)
        t_features = OrderedDict(zip(features.keys(), teacher.features))
        return self.view.detect(image_list, t_features, original_sizes)


def _predicted_classes(detector: nn.Module) -> int:
    head = getattr(detector, "head", None)
    if head is not None:
        return head.classification_head.num_classes
    return detector.roi_heads.box_predictor.cls_score.out_features

