"""The values each string config key may take, and the other facts the config checks a run against.

A leaf: it imports nothing, so ``lgd.config`` knows its choices without loading torch, torchvision or pycocotools.
The modules that implement a choice import its tuple from here (the COCO converters ``FORMATS``, the evaluation
``METRICS``, the teacher its patterns); tests/test_config.py holds the registries (``VIEWS``, ``BACKBONES``) to the
names here.
"""

FORMATS = ("coco", "voc", "yolo", "crowdhuman", "csv")  # data.<split>.format
CROWDHUMAN_BOXES = ("full", "visible", "head")  # data.crowdhuman_box
METRICS = ("coco", "voc", "voc07", "crowdhuman")  # data.metric, besides auto

ARCHS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")  # model.arch: the keys of lgd.detectors.VIEWS
MASK_ARCHS = ("maskrcnn",)  # the archs whose detectors predict instance masks (DetectorView.has_masks)
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d",
                  "swin_t")  # model.backbone: the keys of lgd.detectors.backbones.BACKBONES
DEPTHS = (18, 34, 50, 101)  # model.depth, the older way to name resnet{depth}
NORMS = ("frozen_bn", "bn", "gn")  # model.norm
HEAD_NORMS = ("none", "gn")  # model.head_norm

OPTIMIZERS = ("sgd", "adamw")  # solver.optimizer, lgd.teacher_optimizer
SCHEDULES = ("multistep", "cosine")  # solver.schedule
CLIP_TYPES = ("value", "norm", "none")  # solver.clip_type
AMP_MODES = ("none", "bf16", "fp16")  # solver.amp
NAN_POLICIES = ("stop", "skip")  # solver.nan_policy
DIVERGENCE_POLICIES = ("warn", "stop")  # solver.divergence_policy

CLASS_FORMATS = ("one_hot", "norm_classes")  # lgd.class_format: the class part of the label descriptor
ATTENTION_PATTERNS = ("student_guided", "label_guided", "student_fill", "teacher_fill")  # lgd.attention
LABEL_FUSIONS = ("concat", "balanced")  # lgd.label_fusion
DISTILL_REGIONS = ("all", "objects")  # lgd.distill_region
DISTILL_METHODS = ("auto", "lgd", "fgfi", "none")  # distill.method
