"""LGD's implicit teacher (docs/method.md, sections 1-5): labels + student features -> teacher FPN maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lgd.choices import ATTENTION_PATTERNS, CLASS_FORMATS, LABEL_FUSIONS
from lgd.teacher.appearance import AppearanceEncoder
from lgd.teacher.descriptors import PaddedObjects, descriptor_dim, label_descriptors, pad_objects
from lgd.teacher.label_encoder import LabelEncoder
from lgd.teacher.mapper import IntraObjectKnowledgeMapper
from lgd.teacher.masks import inside_masks, mask_crops, resize_masks
from lgd.teacher.relation import InterObjectRelationAdapter

# Where the distillation loss is taken (lgd.distill_region): every pixel (reference) or object_pixels only.


@dataclass
class TeacherOutput:
    """What the implicit teacher gives the distiller.

    Attributes:
        features: per FPN level (B, C, H_l, W_l), exactly the shapes of the student's levels.
        has_objects: (B,) bool, True where the image had an object or a context box.
        object_pixels: per FPN level (B, 1, H_l, W_l) bool, the pixels inside at least one real object
            (the context box not counted): where the teacher paints object knowledge.
    """

    features: list[Tensor]
    has_objects: Tensor
    object_pixels: list[Tensor]


class ImplicitTeacher(nn.Module):
    """The implicit teacher: label encoder, appearance encoder, relation adapter, mapper.

    Built from the ground truth and the student's own FPN features; trained with the student
    and dropped at inference. Modules the chosen attention pattern never uses are not built
    (``student_fill`` has no label encoder, ``teacher_fill`` no appearance encoder), so every
    parameter gets a gradient. At K = 80, C = 256, one-hot classes and the context box on it
    has 8,304,336 parameters (``norm_classes``: 6,487,257; context off: 65,792 fewer).

    Args:
        num_classes: K, foreground classes; class ids are 0..K-1.
        channels: C, the FPN width.
        context_box: add one whole-image object per image (reference: RetinaNet on).
        class_format: ``"one_hot"`` (K entries) or ``"norm_classes"`` (one entry, id / K).
        attention: ``"student_guided"``, ``"label_guided"``, ``"student_fill"``, ``"teacher_fill"``.
        detach_appearance: detach the student features before the appearance encoder.
        mask_guided: use instance masks instead of boxes for inside masks, and append each
            object's 7x7 mask crop to its descriptor.
        relation_residual: a residual path around the relation adapter's attention (a departure,
            docs/method.md section 10).
        label_fusion: ``"concat"`` (reference) or ``"balanced"`` (a departure, docs/method.md section 10).

    Raises:
        ValueError: an unknown option, or channels the 8 attention heads cannot divide.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 256,
        context_box: bool = True,
        class_format: str = "one_hot",
        attention: str = "student_guided",
        detach_appearance: bool = False,
        mask_guided: bool = False,
        relation_residual: bool = False,
        label_fusion: str = "concat",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if class_format not in CLASS_FORMATS:
            raise ValueError(f"class_format must be one of {CLASS_FORMATS}, got {class_format!r}")
        if attention not in ATTENTION_PATTERNS:
            raise ValueError(f"attention must be one of {ATTENTION_PATTERNS}, got {attention!r}")
        if attention in ("student_guided", "label_guided") and channels % 8:
            raise ValueError(f"channels must be divisible by the 8 attention heads, got {channels}")
        self.num_classes = num_classes
        self.channels = channels
        self.context_box = context_box
        self.class_format = class_format
        self.mask_guided = mask_guided
        dim = descriptor_dim(num_classes, class_format, mask_guided)
        if label_fusion not in LABEL_FUSIONS:
            raise ValueError(f"label_fusion must be one of {LABEL_FUSIONS}, got {label_fusion!r}")
        self.label_encoder = LabelEncoder(dim, channels, label_fusion) if attention != "student_fill" else None
        self.appearance = AppearanceEncoder(channels, detach_appearance) if attention != "teacher_fill" else None
        self.relation = InterObjectRelationAdapter(channels, attention, residual=relation_residual)
        self.mapper = IntraObjectKnowledgeMapper(channels, context_box)

    def forward(
        self,
        features: list[Tensor],
        boxes: list[Tensor],
        classes: list[Tensor],
        image_size: tuple[int, int],
        masks: list[Tensor] | None = None,
    ) -> TeacherOutput:
        """Teacher features for one batch.

        Args:
            features: student FPN levels, each (B, C, H_l, W_l), finest first.
            boxes: B tensors (N_i, 4), float XYXY in the padded batch frame of size image_size.
            classes: B tensors (N_i,), int64 class ids 0..K-1. N_i may be 0.
            image_size: (H, W) of the padded batch.
            masks: B tensors (N_i, H, W) bool/uint8 instance masks at the padded size; required
                with ``mask_guided`` and ignored otherwise.

        Returns:
            :class:`TeacherOutput` with one (B, C, H_l, W_l) map per level.
        """
        image_size = (int(image_size[0]), int(image_size[1]))
        self._check_inputs(features, boxes, classes, image_size, masks)
        # Boxes and descriptors in the features' precision, never below float32: boxes of up to ~1333 px lose
        # whole pixels in bfloat16 under autocast.
        box_dtype = torch.promote_types(features[0].dtype, torch.float32)
        objects = pad_objects(boxes, classes, image_size, self.context_box, box_dtype)
        flat_masks = torch.cat(masks).to(objects.boxes.device) if self.mask_guided else None
        level_masks = [
            self._level_masks(objects, image_size, tuple(level.shape[-2:]), flat_masks) for level in features
        ]
        labels = None
        if self.label_encoder is not None:
            crops = None
            if flat_masks is not None:
                crops = objects.scatter(mask_crops(flat_masks, objects.gather(objects.boxes)), fill=1)
            descriptors = label_descriptors(objects, image_size, self.num_classes, self.class_format, crops)
            labels = self.label_encoder(descriptors.to(self.mapper.local.weight.dtype), objects.valid)
        appearance = self.appearance(features, level_masks) if self.appearance is not None else None
        knowledge = self.relation(labels, appearance, objects.valid, len(features))
        context = [level[:, -1] for level in knowledge] if self.context_box else None
        painted = objects.valid & ~objects.is_context
        maps = self.mapper(knowledge, level_masks, painted, context)
        object_pixels = [(masks & painted[..., None, None]).any(dim=1, keepdim=True) for masks in level_masks]
        return TeacherOutput(features=maps, has_objects=objects.valid.any(dim=1), object_pixels=object_pixels)

    @staticmethod
    def _level_masks(
        objects: PaddedObjects,
        image_size: tuple[int, int],
        level_size: tuple[int, int],
        flat_masks: Tensor | None,
    ) -> Tensor:
        """(B, N, H_l, W_l) bool: object masks, empty for padding, full for the context box."""
        if flat_masks is None:
            inside = inside_masks(objects.boxes, image_size, level_size) & objects.valid[..., None, None]
        else:
            inside = objects.scatter(resize_masks(flat_masks, level_size), fill=False)
        return inside | objects.is_context[..., None, None]

    def _check_inputs(
        self,
        features: list[Tensor],
        boxes: list[Tensor],
        classes: list[Tensor],
        image_size: tuple[int, int],
        masks: list[Tensor] | None,
    ) -> None:
        if not features:
            raise ValueError("features must hold at least one FPN level")
        batch = features[0].shape[0]
        for index, level in enumerate(features):
            if level.dim() != 4 or level.shape[0] != batch or level.shape[1] != self.channels:
                raise ValueError(
                    f"features[{index}] must be (B={batch}, C={self.channels}, H, W), got {tuple(level.shape)}"
                )
        if batch < 1:
            raise ValueError("the batch must hold at least one image")
        if min(image_size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {image_size}")
        if len(boxes) != batch or len(classes) != batch:
            raise ValueError(
                f"expected boxes and classes for {batch} images, got {len(boxes)} and {len(classes)}"
            )
        for index, (image_boxes, image_classes) in enumerate(zip(boxes, classes)):
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise ValueError(f"boxes[{index}] must be (N, 4), got {tuple(image_boxes.shape)}")
            if image_classes.shape != image_boxes.shape[:1]:
                raise ValueError(
                    f"classes[{index}] must be ({image_boxes.shape[0]},) to match its boxes, "
                    f"got {tuple(image_classes.shape)}"
                )
            if image_classes.is_floating_point() or image_classes.is_complex():
                raise ValueError(f"classes[{index}] must hold integer class ids, got {image_classes.dtype}")
        all_boxes = torch.cat(boxes)
        if not bool(torch.isfinite(all_boxes).all()):
            image = next(i for i, b in enumerate(boxes) if not bool(torch.isfinite(b).all()))
            raise ValueError(f"boxes[{image}] holds NaN or infinite coordinates; boxes must be finite XYXY "
                             "(degenerate, negative or out-of-image boxes are fine: they are clamped)")
        all_classes = torch.cat(classes)
        if all_classes.numel() and bool(((all_classes < 0) | (all_classes >= self.num_classes)).any()):
            raise ValueError(
                f"class ids must lie in 0..{self.num_classes - 1}, got values from "
                f"{int(all_classes.min())} to {int(all_classes.max())}"
            )
        if self.mask_guided:
            if masks is None or len(masks) != batch:
                raise ValueError(f"mask_guided needs one mask tensor per image ({batch})")
            for index, (image_masks, image_boxes) in enumerate(zip(masks, boxes)):
                if tuple(image_masks.shape) != (image_boxes.shape[0], *image_size):
                    raise ValueError(
                        f"masks[{index}] must be ({image_boxes.shape[0]}, {image_size[0]}, {image_size[1]}),"
                        f" got {tuple(image_masks.shape)}"
                    )
