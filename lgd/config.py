"""The one typed config: every knob with its default and a one-line meaning.

YAML files under ``configs/`` and ``key.sub=value`` overrides on the command line only fill these dataclasses.
Each field's ``metadata["help"]`` is its meaning; ``lgd config`` prints them all.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from lgd import choices
from lgd.data.difficulty import Difficulty
from lgd.errors import ConfigError
from lgd.utils.atomic import atomic_write_text


def _f(default: Any, help: str, runtime: bool = False) -> Any:
    """A field with a default (copied if mutable) and its one-line meaning; ``runtime``: the key says where and how
    fast a run runs, not what it computes, so it may change on ``--resume`` (``runtime_keys``)."""
    metadata = {"help": help, "runtime": runtime}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SplitConfig:
    format: str = _f("coco", "annotation format: coco | voc | yolo | crowdhuman | csv (others are converted once to "
                             "cached COCO JSON)")
    root: str = _f("", "image folder (VOC: the VOC2007/VOC2012 folder, or the folder of a labelImg split's images); "
                       "empty with ann empty = the built-in dataset's split")
    ann: str = _f("", "COCO: instances JSON; VOC: ImageSets/Main split name (e.g. trainval), split .txt, or a folder "
                      "of XML files (labelImg); YOLO: labels folder; CrowdHuman: .odgt file; CSV: the "
                      "image_path,xmin,ymin,xmax,ymax,label file; empty = the built-in dataset's split")


@dataclass
class SynthConfig:
    seed: int = _f(0, "seed of the built-in dataset (splits use seeds derived from it)")
    num_train: int = _f(800, "training images of the built-in dataset")
    num_val: int = _f(200, "validation images of the built-in dataset")
    num_test: int = _f(200, "test images of the built-in dataset (report numbers on these only)")
    size: int = _f(128, "side of the built-in dataset's square images in pixels")
    num_classes: int = _f(Difficulty.num_classes, "shape classes of the built-in dataset: the first N of circle, square, triangle, star, "
                             "cross, ring, hexagon, diamond (fewer = easier; the defaults here give the benchmark dataset)")
    min_object_px: float = _f(Difficulty.min_object_px, "smallest object (and distractor) diameter in pixels of the built-in dataset")
    max_objects: int = _f(Difficulty.max_objects, "an ordinary built-in image has 1 to this many objects")
    crowded_prob: float = _f(Difficulty.crowded_prob, "share of crowded built-in images: 20-30 objects of at most size/5 px")
    clutter: bool = _f(Difficulty.clutter, "unannotated distractors in the built-in images: blobs, bars, lines, scribbles, lines over objects")
    cache_dir: str = _f("", "where the built-in dataset is generated once and converted VOC/YOLO/CrowdHuman splits are "
                            "cached; empty = $LGD_CACHE or ~/.cache/lgd")


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig, metadata={"help": "training split"})
    val: SplitConfig = field(default_factory=SplitConfig, metadata={"help": "validation split (periodic eval)"})
    test: SplitConfig = field(default_factory=SplitConfig, metadata={"help": "test split (benchmarks report on it)"})
    synth: SynthConfig = field(default_factory=SynthConfig, metadata={"help": "the built-in dataset"})
    names_file: str = _f("", "class names, one per line, or a YOLO data.yaml with 'names' (YOLO: required; VOC: "
                             "default the 20 VOC classes)")
    crowdhuman_box: str = _f("full", "CrowdHuman box type trained and evaluated: full | visible | head")
    metric: str = _f("auto", "evaluation metric: auto (coco; voc07 for a VOC2007 folder, voc for other VOC; crowdhuman "
                             "for CrowdHuman) | coco | voc (AP50, area) | voc07 (AP50, 11-point) | crowdhuman (AP50, MR-2)")
    filter_empty: bool = _f(True, "drop training images without annotations (evaluation always keeps them)")
    hflip_prob: float = _f(0.5, "probability of a horizontal flip in training")
    batch_size: int = _f(8, "training images per iteration (all processes together)")
    eval_batch_size: int = _f(8, "images per evaluation batch")
    workers: int = _f(2, "data-loading worker processes (0 = load in the main process)", runtime=True)
    aspect_ratio_grouping: bool = _f(True, "batch landscape and portrait images separately")
    class_map: dict = _f({}, "class renames applied to every split in every format, e.g. {Alive: Tree, Dead: Tree} "
                             "(classes mapped to one name become one; to null: dropped with their objects)")


@dataclass
class ModelConfig:
    arch: str = _f("retinanet", "detector: retinanet | fcos | fasterrcnn | maskrcnn")
    backbone: str = _f("", "backbone trunk: resnet18 | resnet34 | resnet50 | resnet101 | resnext50_32x4d | "
                           "resnext101_32x8d | swin_t (torchvision's); empty = resnet<model.depth>")
    depth: Optional[int] = _f(None, "older name for model.backbone=resnet<depth>: 18 | 34 | 50 | 101; null = "
                                    "model.backbone decides (resnet50 if that is empty too)")
    deform_stages: list = _f([False, False, False, False], "DCN v2 per stage res2..res5 (detectron2's "
                             "DEFORM_ON_PER_STAGE): every bottleneck 3x3 conv of a true stage becomes a modulated "
                             "deformable conv (reference DCN recipes: [false, true, true, true])")
    deform_mask_scale: float = _f(1.0, "DCN v2 modulation mask = this x sigmoid(logit): 1 = detectron2 (0.5 at "
                                       "initialisation); 2 = the layer starts as exactly the plain conv")
    fpn_channels: int = _f(256, "FPN width C (the paper uses 256)")
    norm: str = _f("frozen_bn", "backbone normalisation: frozen_bn | bn | gn (use bn or gn when training from scratch)")
    head_norm: str = _f("none", "detection-head normalisation for RetinaNet: none | gn (FCOS always uses GN)")
    sync_bn: bool = _f(False, "with model.norm=bn and several CUDA processes: batch statistics over all processes (SyncBatchNorm)")
    weights: str = _f("", "whole-detector weights: a torchvision weight name (e.g. RetinaNet_ResNet50_FPN_Weights.COCO_V1) or a .pth file")
    backbone_weights: str = _f("", "backbone weights: a torchvision name (e.g. ResNet50_Weights.IMAGENET1K_V1) or a .pth file; empty = from scratch")
    trainable_layers: int = _f(5, "ResNet stages that train (0-5); 5 = all, as needed from scratch")
    anchor_sizes: list = _f([32, 64, 128, 256, 512], "anchor base size per FPN level (RetinaNet: x3 scales per octave; R-CNN RPN); FCOS ignores it")
    min_size: list = _f([800], "shorter image side after resizing; several values = multi-scale training (one drawn per batch)")
    max_size: int = _f(1333, "longer image side cap after resizing")
    test_min_size: int = _f(0, "shorter side at evaluation; 0 = the largest of min_size")
    score_thresh: float = _f(0.05, "minimum score of a returned detection")
    detections_per_img: int = _f(100, "detections kept per image")
    rpn_proposals_train: int = _f(2000, "R-CNN: RPN proposals kept per image in training, before and after NMS")
    rpn_proposals_test: int = _f(1000, "R-CNN: RPN proposals kept per image at inference, before and after NMS")
    roi_batch_size: int = _f(512, "R-CNN: proposals sampled per image for the box (and mask) head losses")
    mask_head_channels: int = _f(256, "Mask R-CNN: width of the mask head's four convolutions and its deconvolution")


@dataclass
class SolverConfig:
    max_iter: int = _f(180000, "training iterations")
    scale_schedule: bool = _f(True, "when an override changes the max_iter of a config file, the iteration counts "
                                    "the override leaves alone (solver.steps, solver.warmup_iters, "
                                    "lgd.pre_distill_iters, lgd.post_distill_iters, lgd.freeze_backbone_iters, "
                                    "fgfi.warmup_iters) scale with it; false keeps the file's")
    optimizer: str = _f("sgd", "student (and adapter) optimiser: sgd | adamw (torch.optim.AdamW, betas 0.9/0.999, "
                               "as the reference's Swin-T recipes)")
    base_lr: float = _f(0.01, "student learning rate at solver.reference_batch_size images per iteration")
    reference_batch_size: int = _f(0, "the batch base_lr and lgd.teacher_lr are tuned for: both follow "
                                      "data.batch_size (the global batch of all processes) by the linear scaling "
                                      "rule, lr x data.batch_size / this (detectron2's REFERENCE_WORLD_SIZE); every "
                                      "config in configs/ states its own batch, so the factor is 1 there; 0 = off")
    momentum: float = _f(0.9, "SGD momentum (AdamW ignores it)")
    weight_decay: float = _f(1e-4, "student weight decay (AdamW: decoupled), on every parameter unless the two keys "
                                   "below say otherwise (reference)")
    weight_decay_norm: Optional[float] = _f(None, "weight decay of normalisation-layer parameters; null = weight_decay "
                                                  "(reference); 0 = exclude them (detectron2's default)")
    weight_decay_bias: Optional[float] = _f(None, "weight decay of biases; null = weight_decay (reference)")
    schedule: str = _f("multistep", "learning-rate decay: multistep | cosine")
    steps: list = _f([120000, 160000], "iterations where multistep multiplies the rate by gamma")
    gamma: float = _f(0.1, "multistep decay factor")
    warmup_iters: int = _f(1000, "linear warm-up iterations")
    warmup_factor: float = _f(0.001, "learning-rate multiplier at iteration 0 of the warm-up")
    clip_type: str = _f("value", "gradient clipping, in each optimiser separately: value (clamp every gradient element "
                                 "to [-clip_value, clip_value], the reference) | norm (scale the optimiser's gradients to "
                                 "global L2 norm <= clip_value) | none")
    clip_value: float = _f(1.0, "the bound of solver.clip_type (reference: 1.0)")
    amp: str = _f("none", "mixed precision: none (fp32) | bf16 (CUDA, or CPU autocast) | fp16 (CUDA, with a gradient scaler)")
    accumulate: int = _f(1, "micro-batches per step: each process's share of data.batch_size is split in this many, gradients add up (same global batch, less memory)")
    nan_policy: str = _f("stop", "on a NaN/infinite loss or gradient: stop (message + debug checkpoint nan_debug_*.pth) | skip (the step, logged)", runtime=True)
    divergence_policy: str = _f("warn", "when the logged loss rises above 3x its early level (a diverging run): warn and train on | stop (message; the last checkpoint stays intact)", runtime=True)


@dataclass
class LGDConfig:
    enabled: bool = _f(True, "train with LGD; false = the plain baseline with the identical recipe")
    context_box: Optional[bool] = _f(None, "add a whole-image context object; null = detector's reference default (RetinaNet on, others off)")
    detach_appearance: Optional[bool] = _f(None, "detach student features in the appearance encoder; null = reference default (R-CNNs on, one-stage off)")
    class_format: str = _f("one_hot", "class part of the label descriptor: one_hot | norm_classes")
    attention: str = _f("student_guided", "inter-object relation pattern: student_guided | label_guided | student_fill | teacher_fill")
    relation_residual: bool = _f(False, "departure (docs/method.md 10): add each object's own projected label embedding "
                                        "to its attention output, a residual path around the relation adapter")
    label_fusion: str = _f("concat", "departure (docs/method.md 10): concat (reference) | balanced: normalise the "
                                     "label encoder's per-object and image-wide parts separately, at equal norm")
    distill_region: str = _f("all", "departure (docs/method.md 10): all (reference: every pixel of every level) | "
                                    "objects: the distillation loss only inside the ground-truth objects")
    mask_guided: bool = _f(False, "Mask R-CNN only: instance masks instead of boxes for inside masks, plus a 7x7 mask crop in the descriptor")
    distill_weight: float = _f(1.0, "lambda, the weight of the distillation loss")
    teacher_trains_head: bool = _f(True, "the teacher's detection loss also updates the shared head (reference); false = "
                                         "the head runs frozen on the teacher's features and only the teacher learns "
                                         "from that loss (see BENCHMARKS.md)")
    pre_distill_iters: int = _f(30000, "first iterations where only the adapter learns from the distillation loss")
    post_distill_iters: int = _f(0, "last iterations where only the adapter learns from the distillation loss")
    freeze_backbone_iters: int = _f(0, "first iterations where the backbone body gets no update (20000 in the reference with ImageNet weights)")
    eval_teacher: bool = _f(True, "at every evaluation in training, also score the teacher diagnostic on val (the "
                                  "student's head on the teacher's features; logged as split val_teacher, drawn in "
                                  "ap.png beside the student), as the reference's EVAL_TEACHER; costs about one more "
                                  "evaluation each time")
    teacher_optimizer: str = _f("sgd", "teacher optimiser: sgd | adamw (the reference's Swin-T RetinaNet: adamw; "
                                       "its Swin-T Mask R-CNN: sgd beside an adamw student)")
    teacher_lr: float = _f(0.01, "teacher learning rate (same schedule shape as the student's)")
    teacher_momentum: float = _f(0.9, "teacher SGD momentum (AdamW ignores it)")
    teacher_weight_decay: float = _f(1e-4, "teacher weight decay")



@dataclass
class DistillConfig:
    method: str = _f("auto", "what the student learns from besides its own loss: auto (lgd, or none with "
                             "lgd.enabled=false) | lgd (label-guided self-distillation, no teacher to train) | fgfi "
                             "(imitation of a frozen, pretrained teacher: fgfi.*) | none (the plain baseline)")


@dataclass
class FGFIConfig:
    teacher: str = _f("", "FGFI's frozen teacher: a training checkpoint (model_final.pth) or an exported student.pth "
                          "that lgd wrote; any detector family and depth whose FPN has the student's levels", runtime=True)
    weight: float = _f(0.01, "weight of the imitation loss (FGFI paper: 0.01)")
    psi: float = _f(0.5, "imitation-mask factor: an anchor is imitated where its IoU with a box exceeds psi x that "
                         "box's best anchor IoU (FGFI paper: 0.5)")
    warmup_iters: int = _f(400, "first iterations without imitation, while the student's features settle (official code: 400)")
    adapter_init_std: float = _f(1e-4, "standard deviation of the adapter convolutions' normal initialisation, truncated at "
                                          "2 std (official code: 1e-4)")


@dataclass
class Config:
    output_dir: str = _f("outputs/run", "where checkpoints, metrics, plots and the resolved config go", runtime=True)
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", runtime=True)
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)", runtime=True)
    eval_period: int = _f(0, "evaluate on val every this many iterations (0 = only at the end)", runtime=True)
    checkpoint_period: int = _f(1000, "write a checkpoint every this many iterations (and at the end)", runtime=True)
    keep_checkpoints: int = _f(3, "numbered checkpoints model_NNNNNNN.pth kept (the newest); last.pth is always the newest", runtime=True)
    log_period: int = _f(20, "iterations between metrics.jsonl / TensorBoard records; without a progress bar (a log file, --no-progress) a loss line is printed every 5 x log_period", runtime=True)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets and loading"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the detector (the student)"})
    solver: SolverConfig = field(default_factory=SolverConfig, metadata={"help": "student optimisation"})
    lgd: LGDConfig = field(default_factory=LGDConfig, metadata={"help": "label-guided self-distillation"})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "which distillation method"})
    fgfi: FGFIConfig = field(default_factory=FGFIConfig, metadata={"help": "fine-grained feature imitation (FGFI)"})

    # Where load_config read this config ("FILE KEY=VALUE ..."), for messages. Not a field: never saved in
    # config.yaml nor compared on --resume.
    source: ClassVar[str] = "defaults"
    # What load_config scaled with solver.max_iter ("" when nothing), for the training summary; not a field either.
    scaled: ClassVar[str] = ""


# The values a string key may take: the tuples of lgd.choices, which the implementations import too.
CHOICES: dict[str, tuple[str, ...]] = {
    **{f"data.{split}.format": choices.FORMATS for split in ("train", "val", "test")},
    "data.crowdhuman_box": choices.CROWDHUMAN_BOXES,
    "data.metric": ("auto", *choices.METRICS),
    "model.arch": choices.ARCHS,
    "model.norm": choices.NORMS,
    "model.head_norm": choices.HEAD_NORMS,
    "solver.optimizer": choices.OPTIMIZERS,
    "lgd.teacher_optimizer": choices.OPTIMIZERS,
    "solver.schedule": choices.SCHEDULES,
    "solver.clip_type": choices.CLIP_TYPES,
    "solver.amp": choices.AMP_MODES,
    "solver.nan_policy": choices.NAN_POLICIES,
    "solver.divergence_policy": choices.DIVERGENCE_POLICIES,
    "lgd.class_format": choices.CLASS_FORMATS,
    "lgd.attention": choices.ATTENTION_PATTERNS,
    "lgd.label_fusion": choices.LABEL_FUSIONS,
    "lgd.distill_region": choices.DISTILL_REGIONS,
    "distill.method": choices.DISTILL_METHODS,
}


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key in dotted form, mapped to its dataclass field."""
    out: dict[str, dataclasses.Field] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        key = prefix + f.name
        if is_dataclass(hints[f.name]):
            out.update(all_keys(hints[f.name], key + "."))
        else:
            out[key] = f
    return out


def runtime_keys() -> frozenset[str]:
    """The keys that may change between a run and its ``--resume`` (fields marked ``runtime``): where and how fast
    it runs, not what it computes. The FGFI teacher may move: the checkpoint's teacher_sha256 decides whether it is
    the same file (lgd/methods/fgfi.py)."""
    return frozenset(k for k, f in all_keys().items() if f.metadata["runtime"])


# Keys that were replaced, with what to write instead: a config from an older version gets told, not guessed at.
REPLACED: dict[str, str] = {
    "solver.clip_grad_norm": "solver.clip_type=norm solver.clip_value=<the old value> (0 = solver.clip_type=none); "
                             "the default is now the reference's element-wise clipping, solver.clip_type=value",
}


def _unknown(key: str) -> ConfigError:
    if key in REPLACED:
        return ConfigError(f"config key '{key}' was replaced: use {REPLACED[key]}")
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (run `lgd config` to list every key)")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = get_origin(annotation)
    if origin is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, inner[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects {'an integer' if annotation is int else 'a number'}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        value = "" if value is None else str(value)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}; got '{value}'")
        return value
    if annotation is dict or origin is dict:
        return _class_map(key, _yaml_value(key, value) if isinstance(value, str) else value)
    if annotation is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_scalar(key, v) for v in value]
    raise ConfigError(f"config key '{key}' has an unsupported type")


def _yaml_value(key: str, text: str) -> Any:
    """The value YAML reads in ``text``, given for config key ``key``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or e
        raise ConfigError(f"config key '{key}': {text!r} is not valid YAML ({reason})") from None


def _class_map(key: str, value: Any) -> dict[str, Optional[str]]:
    """A mapping of class names to class names or None, as ``data.class_map`` takes it (YAML, e.g. {a: b, c: null})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' expects a mapping {{old name: new name or null}}, e.g. "
                          f"{{Alive: Tree, Dead: Tree}}; got {value!r}")
    for old, new in value.items():
        if new is not None and (not isinstance(new, (str, int)) or isinstance(new, bool) or not str(new).strip()):
            raise ConfigError(f"config key '{key}': '{old}' maps to {new!r}; give a class name, or null to drop it")
    return {str(old): None if new is None else str(new) for old, new in value.items()}


def _scalar(key: str, v: Any) -> Any:
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a list of integers, got element {v!r}") from None
    return v


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config tree as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in all_keys():
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key, checking that it exists and coercing the value to its type."""
    keys = all_keys()
    if key not in keys:
        raise _unknown(key)
    *path, leaf = key.split(".")
    node: Any = cfg
    for p in path:
        node = getattr(node, p)
    annotation = get_type_hints(type(node))[leaf]
    setattr(node, leaf, _coerce(key, value, annotation))


# The iteration counts that shape a schedule, scaled with solver.max_iter (solver.scale_schedule). The periods
# (checkpoint_period, eval_period, log_period) are left out: they set how often a run costs time or saves its
# state, not where its phases fall.
SCHEDULE_KEYS = ("solver.steps", "solver.warmup_iters", "lgd.pre_distill_iters", "lgd.post_distill_iters",
                 "lgd.freeze_backbone_iters", "fgfi.warmup_iters")


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key such as ``solver.max_iter``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides, in that order.

    A YAML file may name a ``_base_`` file (relative to itself) whose values it extends. When the overrides change
    the file's ``solver.max_iter`` (and ``solver.scale_schedule`` is on), every key of ``SCHEDULE_KEYS`` they do not
    set themselves is multiplied by new / old max_iter, rounded, so the recipe's phases keep their place in the
    longer or shorter run (detectron2 scales its schedule the same way with the batch); ``Config.scaled`` says what
    changed. Without a file the defaults are kept as they are.

    Raises:
        ConfigError: a missing or malformed file, an unknown key, a value of the wrong type, or a failed
            cross-field check (``validate``).
    """
    cfg = Config()
    if path:
        for key, value in _read_yaml(Path(path)).items():
            set_key(cfg, key, value)
    recipe_iters = cfg.solver.max_iter
    given: set[str] = set()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. solver.max_iter=200)")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), _yaml_value(key.strip(), value) if value.strip() else "")
        given.add(key.strip())
    if path and cfg.solver.scale_schedule and cfg.solver.max_iter != recipe_iters:
        cfg.scaled = _scale_schedule(cfg, cfg.solver.max_iter / recipe_iters, given)
    validate(cfg)
    cfg.source = " ".join([str(path) if path else "defaults", *(overrides or [])])
    return cfg


def _scale_schedule(cfg: Config, factor: float, given: set[str]) -> str:
    """Multiplies the iteration counts of ``SCHEDULE_KEYS`` not in ``given`` by ``factor``; what changed, as
    "key old -> new" items (empty when nothing did)."""
    changes = []
    for key in SCHEDULE_KEYS:
        if key in given:
            continue
        old = get_key(cfg, key)
        new = [round(v * factor) for v in old] if isinstance(old, list) else round(old * factor)
        if new != old:
            set_key(cfg, key, new)
            changes.append(f"{key} {old} -> {new}")
    return ", ".join(changes)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(tree).__name__}")
    flat: dict[str, Any] = {}
    base = tree.pop("_base_", None)
    if base:
        flat.update(_read_yaml(path.parent / base))
    flat.update(flatten(tree))
    for key in flat:
        if key not in all_keys():
            raise ConfigError(f"in {path}: {_unknown(key)}")
    return flat


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    if cfg.solver.max_iter <= 0:
        raise ConfigError("solver.max_iter must be positive")
    if cfg.solver.accumulate < 1 or cfg.data.batch_size % cfg.solver.accumulate:
        raise ConfigError(f"solver.accumulate must be a positive divisor of data.batch_size={cfg.data.batch_size}; "
                          f"got {cfg.solver.accumulate}")
    if cfg.solver.reference_batch_size < 0:
        raise ConfigError(f"solver.reference_batch_size must be positive, or 0 to turn the linear scaling rule off; "
                          f"got {cfg.solver.reference_batch_size}")
    if cfg.solver.clip_type != "none" and cfg.solver.clip_value <= 0:
        raise ConfigError(f"solver.clip_value must be positive with solver.clip_type={cfg.solver.clip_type}; got "
                          f"{cfg.solver.clip_value} (solver.clip_type=none turns clipping off)")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be at least 1; got {cfg.keep_checkpoints}")
    if cfg.data.batch_size <= 0 or cfg.data.eval_batch_size <= 0:
        raise ConfigError("data.batch_size and data.eval_batch_size must be positive")
    if cfg.model.depth is not None and cfg.model.depth not in choices.DEPTHS:
        raise ConfigError(f"model.depth must be one of {', '.join(map(str, choices.DEPTHS))}; got {cfg.model.depth}")
    backbone_name(cfg.model)
    if not 0 <= cfg.model.trainable_layers <= 5:
        raise ConfigError(f"model.trainable_layers must be in 0..5, got {cfg.model.trainable_layers}")
    if len(cfg.model.deform_stages) != 4 or not all(isinstance(v, bool) for v in cfg.model.deform_stages):
        raise ConfigError(f"model.deform_stages must be 4 true/false values, one per stage res2..res5; got "
                          f"{cfg.model.deform_stages}")
    if cfg.model.deform_mask_scale <= 0:
        raise ConfigError(f"model.deform_mask_scale must be positive; got {cfg.model.deform_mask_scale}")
    if len(cfg.model.anchor_sizes) != 5 or any(s <= 0 for s in cfg.model.anchor_sizes):
        raise ConfigError("model.anchor_sizes must be 5 positive sizes, one per FPN level")
    if not cfg.model.min_size or any(s <= 0 for s in cfg.model.min_size):
        raise ConfigError("model.min_size must be a non-empty list of positive sizes")
    for key in ("rpn_proposals_train", "rpn_proposals_test", "roi_batch_size", "mask_head_channels"):
        if getattr(cfg.model, key) <= 0:
            raise ConfigError(f"model.{key} must be positive; got {getattr(cfg.model, key)}")
    if cfg.lgd.mask_guided and cfg.model.arch not in choices.MASK_ARCHS:
        raise ConfigError(f"lgd.mask_guided needs instance masks: set model.arch={' or '.join(choices.MASK_ARCHS)} "
                          f"or lgd.mask_guided=false")
    method = distill_method(cfg)
    if method == "fgfi":
        if not cfg.fgfi.teacher:
            raise ConfigError("distill.method=fgfi needs fgfi.teacher: a model_final.pth or student.pth that lgd wrote")
        if cfg.fgfi.weight < 0 or not 0 < cfg.fgfi.psi <= 1 or cfg.fgfi.warmup_iters < 0 \
                or cfg.fgfi.adapter_init_std <= 0:
            raise ConfigError(f"fgfi: weight must be >= 0, psi in (0, 1], warmup_iters >= 0 and adapter_init_std > 0; "
                              f"got weight={cfg.fgfi.weight}, psi={cfg.fgfi.psi}, warmup_iters={cfg.fgfi.warmup_iters},"
                              f" adapter_init_std={cfg.fgfi.adapter_init_std}")
    try:
        Difficulty.of(cfg.data.synth)
    except ValueError as e:
        raise ConfigError(f"data.synth: {e}") from None
    for split in ("train", "val", "test"):
        s = getattr(cfg.data, split)
        if bool(s.root) != bool(s.ann):
            raise ConfigError(f"data.{split}: give both root and ann (or neither, for the built-in dataset)")
        if s.format != "coco" and not s.root:
            raise ConfigError(f"data.{split}.format={s.format} needs data.{split}.root and data.{split}.ann")
        if s.format in ("yolo", "csv") and not cfg.data.names_file:
            raise ConfigError(f"data.{split}.format={s.format} needs data.names_file (class names, one per line, or "
                              f"data.yaml)")


def backbone_name(cfg: ModelConfig) -> str:
    """The backbone the config asks for: ``model.backbone``, else ``resnet{model.depth}``, else resnet50.

    Raises:
        ConfigError: both keys are set and disagree, or the name is not one of ``lgd.choices.BACKBONE_NAMES``.
    """
    name = cfg.backbone or f"resnet{cfg.depth or 50}"
    if cfg.backbone and cfg.depth is not None and cfg.backbone != f"resnet{cfg.depth}":
        raise ConfigError(f"model.depth={cfg.depth} and model.backbone={cfg.backbone} disagree: set only "
                          f"model.backbone (model.depth is the older name for model.backbone=resnet<depth>)")
    if name not in choices.BACKBONE_NAMES:
        raise ConfigError(f"model.backbone must be one of {', '.join(choices.BACKBONE_NAMES)}; got '{name}'")
    return name


def distill_method(cfg: Config) -> str:
    """The method a run trains with: ``distill.method``, where ``auto`` follows ``lgd.enabled`` (lgd, or none when
    false). ``lgd.enabled`` is the older switch and says only whether LGD runs under ``auto`` or ``lgd``.

    Raises:
        ConfigError: ``distill.method=lgd`` with ``lgd.enabled=false``, which contradict each other.
    """
    method = cfg.distill.method
    if method == "auto":
        return "lgd" if cfg.lgd.enabled else "none"
    if method == "lgd" and not cfg.lgd.enabled:
        raise ConfigError("distill.method=lgd contradicts lgd.enabled=false; drop one of them (distill.method=none "
                          "trains the plain baseline)")
    return method


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML: every key, as ``config.yaml`` holds it."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), dump_config(cfg))


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in flatten(tree).items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def describe() -> str:
    """Every key with its default and meaning, for ``lgd config``."""
    defaults = flatten(to_dict(Config()))
    lines = []
    for key, f in all_keys().items():
        lines.append(f"{key} = {defaults[key]!r}\n    {f.metadata['help']}")
    return "\n".join(lines)

