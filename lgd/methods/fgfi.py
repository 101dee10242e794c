"""FGFI around a torchvision detector: student + frozen teacher + imitation mask + adapter (docs/method.md,
section 12).

Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019; official code
twangnh/Distilling-Object-Detectors (``lib/model/rpn/anchor_target_layer.py``: the mask; ``trainval_net_sup.py``:
the adapter and the loss). The teacher-based method LGD is compared with (``distill.method=fgfi``)::

    fgfi = FGFI(student, teacher, teacher_sha256=sha, config=FGFIConfig(teacher="teacher.pth"))
    losses = fgfi(images, targets)     # training: the student's detection terms and loss_distill (imitation)
    detections = fgfi.eval()(images)   # inference: exactly the wrapped detector

The teacher is held outside this module's tree: it is never in ``state_dict()`` (so neither in checkpoints nor in
the export), gets no optimizer, and ``.train()`` leaves it in eval mode. Only its file's SHA-256 is saved, so a
resume with another teacher file is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from lgd.config import FGFIConfig, ModelConfig, config_from_dict
from lgd.detectors import DetectorView, Targets, build_detector, view_of
from lgd.detectors.views import retinanet_anchors
from lgd.detectors.weights import student_state
from lgd.errors import LGDError
from lgd.export import FORMAT, build_student
from lgd.methods.trainable import Trainable
from lgd.methods.trainable import OptimizerGroup
from lgd.utils.files import file_digest, load_torch_file


def load_teacher(path: Path) -> tuple[nn.Module, str]:
    """FGFI's teacher from a file lgd wrote: frozen (no parameter requires grad), in eval mode, on the CPU.

    Args:
        path: a training checkpoint (``model_final.pth``, ``last.pth``: its config rebuilds the detector) or an
            exported ``student.pth`` (``lgd export``).

    Returns:
        (the torchvision detector, the file's SHA-256 in hex).

    Raises:
        LGDError: the file is missing, unreadable or corrupt, neither kind of file, or its weights do not fit the
            detector its own config describes; the message names the file and ``fgfi.teacher``.
    """
    path = Path(path)
    payload = load_torch_file(path, "fgfi.teacher file")
    try:
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            detector = build_student(payload)
        elif isinstance(payload, dict) and {"model", "config", "categories"} <= payload.keys():
            model_cfg = config_from_dict(payload["config"]).model
            model_cfg.weights = model_cfg.backbone_weights = ""  # the checkpoint holds every weight
            detector = build_detector(model_cfg, len(payload["categories"]["ids"]))
            detector.load_state_dict(student_state(payload["model"]))
        else:
            raise LGDError("it is neither a training checkpoint nor an exported student that lgd wrote")
    except (LGDError, RuntimeError, KeyError, TypeError) as e:
        raise LGDError(f"fgfi.teacher={path}: cannot use it as the teacher ({e})") from None
    detector.eval().requires_grad_(False)
    return detector, file_digest(path)


def imitation_masks(anchors: list[Tensor], shapes: list[tuple[int, int]], boxes: Tensor, psi: float) -> list[Tensor]:
    """FGFI's imitation mask of one image, per FPN level (FGFI paper, section 3.1; official
    ``anchor_target_layer.py``).

    For each ground-truth box, the anchors whose IoU with it exceeds ``psi`` x the box's best IoU with any anchor
    (strictly greater; the best is over all levels' anchors together, as the official code's single level takes
    it over all its anchors); a location is imitated when any of its anchors is, for any box.

    Args:
        anchors: per level (H_l * W_l * A_l, 4) XYXY anchors in the padded frame, location-major with the A_l
            anchors of a location consecutive (torchvision's ``AnchorGenerator`` order).
        shapes: per level (H_l, W_l).
        boxes: (N, 4) XYXY ground-truth boxes in the same frame; N may be 0.
        psi: the factor, in (0, 1].

    Returns:
        Per level a (H_l, W_l) bool mask.
    """
    counts = [len(a) for a in anchors]
    if len(boxes) == 0:
        return [torch.zeros(s, dtype=torch.bool, device=boxes.device) for s in shapes]
    iou = box_iou(boxes.to(anchors[0]), torch.cat(anchors))  # (N, sum of anchors)
    best = iou.max(dim=1, keepdim=True).values
    hit = (iou > psi * best).any(dim=0)
    return [h.view(*shape, -1).any(dim=-1) for h, shape in zip(hit.split(counts), shapes)]


def imitation_loss(student: list[Tensor], teacher: list[Tensor], masks: list[Tensor]) -> Tensor:
    """Sum of squared differences over the masked locations (and channels), divided by 2 x the number of masked
    locations (FGFI paper, eq. 2-3; official ``trainval_net_sup.py``).

    Args:
        student: adapted student levels, (B, C, H_l, W_l); teacher: the teacher's, same shapes (detached here).
        masks: per level (B, H_l, W_l) bool.

    Returns:
        A scalar; 0 (still depending on ``student``, so every adapter parameter gets a gradient) without any
        masked location.
    """
    squared, count = student[0].new_zeros(()), 0
    for s, t, m in zip(student, teacher, masks):
        squared = squared + ((s - t.detach()).pow(2) * m[:, None]).sum()
        count += int(m.sum())
    return squared / (2 * count) if count else squared * 0.0


class ImitationAdapter(nn.Module):
    """FGFI's adapter on the student's features, shared by all FPN levels: conv3x3 + ReLU (the official code's),
    then a 1x1 projection where the teacher's FPN is wider or narrower: (B, C_s, H, W) -> (B, C_t, H, W).

    The 3x3 convolution's weights are drawn from N(0, ``std``) truncated at 2 ``std`` (the official code's
    ``normal_init(stu_feature_adap[0], 0, 0.0001, truncated=True)``), its bias is 0. The projection keeps PyTorch's
    default initialisation: two small-std layers in series would each get a gradient scaled by the other's tiny
    weights, and the adapter would barely learn.
    """

    def __init__(self, student_channels: int, teacher_channels: int, std: float) -> None:
        super().__init__()
        conv = nn.Conv2d(student_channels, student_channels, 3, padding=1)
        nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(conv.bias)
        layers: list[nn.Module] = [conv, nn.ReLU()]
        if teacher_channels != student_channels:
            layers.append(nn.Conv2d(student_channels, teacher_channels, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def mask_anchors(view: DetectorView, anchor_sizes: list[int]) -> nn.Module:
    """The anchors FGFI's mask is built from: the detector's own (RetinaNet's, the R-CNN RPN's), and for an
    anchor-free detector (FCOS) RetinaNet's anchors of ``anchor_sizes`` at the same levels (docs/method.md, 12)."""
    return view.anchor_generator or retinanet_anchors(anchor_sizes)


def batch_masks(anchors: nn.Module, image_list: ImageList, features: list[Tensor], targets: Targets,
                psi: float) -> list[Tensor]:
    """The imitation masks of a batch the detector preprocessed (``imitation_masks`` per image).

    Args:
        anchors: an ``AnchorGenerator`` (``mask_anchors``).
        image_list: the detector's padded batch; features: its FPN levels (B, C, H_l, W_l).
        targets: per image "boxes" (N_i, 4) XYXY in the padded frame.
        psi: ``fgfi.psi``.

    Returns:
        Per level a (B, H_l, W_l) bool mask.
    """
    every = anchors(image_list, features)[0]  # one padded frame: every image has the same anchors
    shapes = [tuple(f.shape[-2:]) for f in features]
    per_level = list(every.split([h * w * a for (h, w), a in zip(shapes, anchors.num_anchors_per_location())]))
    per_image = [imitation_masks(per_level, shapes, t["boxes"], psi) for t in targets]
    return [torch.stack(level) for level in zip(*per_image)]


class FGFI(Trainable):
    """Fine-grained feature imitation of a frozen teacher, around a torchvision RetinaNet, FCOS, Faster or Mask R-CNN.

    Args:
        detector: the student, a torchvision detection model; it stays untouched and is what you deploy.
        teacher: a torchvision detector whose FPN has the student's levels (any family, depth or width); it is
            frozen and put in eval mode here, and is not a submodule (see the module docstring).
        teacher_sha256: the teacher file's SHA-256 (``load_teacher``), saved as the buffer ``teacher_sha256``.
        config: FGFI's settings (``fgfi.*``).
        anchor_sizes: ``model.anchor_sizes``, for FCOS's mask only.
    """

    def __init__(self, detector: nn.Module, teacher: nn.Module, teacher_sha256: str,
                 config: Optional[FGFIConfig] = None, anchor_sizes: Optional[list[int]] = None) -> None:
        super().__init__()
        cfg = config or FGFIConfig()
        self.student = detector
        self.view: DetectorView = view_of(detector)
        # object.__setattr__ bypasses nn.Module's registration: the teacher stays out of state_dict, parameters()
        # (so out of every optimizer) and train(); _apply below moves it with the student.
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        object.__setattr__(self, "teacher_view", view_of(teacher))
        self.teacher_file = cfg.teacher
        self.adapter = ImitationAdapter(self.view.channels, self.teacher_view.channels, cfg.adapter_init_std)
        self.anchors = mask_anchors(self.view, anchor_sizes or ModelConfig().anchor_sizes)
        self.weight, self.psi, self.warmup_iters = cfg.weight, cfg.psi, cfg.warmup_iters
        self.register_buffer("teacher_sha256", torch.tensor(list(bytes.fromhex(teacher_sha256)), dtype=torch.uint8))
        self.iteration = 0

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "FGFI":
        self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def set_iteration(self, iteration: int) -> None:
        """Imitation starts after ``fgfi.warmup_iters``."""
        self.iteration = iteration

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """One optimizer, the solver's: the student and the adapter (the teacher never trains)."""
        return [OptimizerGroup([self.student, self.adapter])]

    def describe(self) -> str:
        """FGFI's teacher and adapter and when imitation starts, for the training summary (its "LGD" line)."""
        teacher = sum(p.numel() for p in self.teacher.parameters()) / 1e6
        adapter = sum(p.numel() for p in self.adapter.parameters()) / 1e6
        return (f"off; FGFI instead: frozen teacher {self.teacher_file} ({type(self.teacher).__name__}, {teacher:.2f} M "
                f"parameters, not trained, not saved) + adapter {adapter:.2f} M; imitation (weight {self.weight}, "
                f"psi {self.psi}) from iteration {self.warmup_iters}")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As nn.Module's, after checking that the state was trained with this teacher file.

        Raises:
            LGDError: the state's ``teacher_sha256`` differs from this model's teacher file's.
        """
        saved = state_dict.get("teacher_sha256")
        if saved is not None and not torch.equal(saved.cpu(), self.teacher_sha256.cpu()):
            raise LGDError(f"this FGFI state was trained with another teacher (SHA-256 {bytes(saved.tolist()).hex()}) "
                           f"than fgfi.teacher={self.teacher_file} (SHA-256 "
                           f"{bytes(self.teacher_sha256.tolist()).hex()}); give the teacher file the run started with")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, images: list[Tensor], targets: Optional[Targets] = None):
        """Training: the student's detection loss terms and ``loss_distill`` (the weighted imitation loss, 0 in
        the warm-up); eval: the student's detections. ``images`` are (3, H, W) floats in [0, 1].

        Raises:
            ValueError: training without targets.
            LGDError: the teacher's FPN levels differ from the student's.
        """
        if not self.training:
            return self.student(images)
        image_list, targets, features = self.view.training_inputs(images, targets, "FGFI")
        losses, _ = self.view.losses(image_list, targets, features)
        losses = dict(losses)
        student = list(features.values())
        if self.iteration < self.warmup_iters:
            # keeps every adapter parameter in the graph (DDP) while contributing nothing
            losses["loss_distill"] = sum(p.sum() for p in self.adapter.parameters()) * 0.0
            return losses
        with torch.no_grad():
            teacher = list(self.teacher_view.features(image_list).values())
        self._check_levels(student, teacher)
        masks = self.masks(image_list, student, targets)
        losses["loss_distill"] = self.weight * imitation_loss([self.adapter(s) for s in student], teacher, masks)
        return losses

    def masks(self, image_list: ImageList, features: list[Tensor], targets: Targets) -> list[Tensor]:
        """The imitation masks of a preprocessed batch (``batch_masks``): per level (B, H_l, W_l) bool."""
        return batch_masks(self.anchors, image_list, features, targets, self.psi)

    def _check_levels(self, student: list[Tensor], teacher: list[Tensor]) -> None:
        if [s.shape[-2:] for s in student] != [t.shape[-2:] for t in teacher]:
            raise LGDError(f"fgfi.teacher={self.teacher_file}: its FPN levels {[tuple(t.shape[-2:]) for t in teacher]} "
                           f"differ from the student's {[tuple(s.shape[-2:]) for s in student]}; a one-stage "
                           "student (RetinaNet, FCOS: P3-P7) needs a one-stage teacher, an R-CNN (P2-P6) an R-CNN")
