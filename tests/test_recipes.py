"""The COCO recipes carry the reference's settings (megvii-research/LGD configs/Distillation/**, Base-*.yaml)."""
from pathlib import Path

import pytest
import torch

from lgd.config import load_config
from lgd.engine.summary import parameter_counts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DCN = [False, True, True, True]  # DEFORM_ON_PER_STAGE of every reference DCN v2 recipe
PLAIN = [False] * 4
MS = [640, 672, 704, 736, 768, 800]  # Base-RetinaNet / Base-RCNN-FPN MIN_SIZE_TRAIN
SGD_01, SGD_02, ADAMW = ("sgd", 0.01, 1e-4), ("sgd", 0.02, 1e-4), ("adamw", 1e-4, 0.05)
POST = 50000  # the post-distillation window of the X-101 DCN recipes (and FCOS R-101 DCN)
X2, X3 = (180000, [120000, 160000]), (270000, [210000, 250000])
RETINA, FRCNN, R50, R101, X101, SWIN = "retinanet", "fasterrcnn", "resnet50", "resnet101", "resnext101_32x8d", "swin_t"

# recipe: arch, backbone, deform stages, trainable trunk stages, (optimizer, LR, weight decay) of student and of
# teacher, context box, detach appearance, mask-guided, (max_iter, steps), post-distillation iterations, train sizes
REFERENCE = {
    "coco_retinanet_r50_2x_lgd.yaml": (RETINA, R50, PLAIN, 3, SGD_01, SGD_01, True, False, False, X2, 0, [800]),
    "coco_retinanet_r50_2x_ms_lgd.yaml": (RETINA, R50, PLAIN, 3, SGD_01, SGD_01, True, False, False, X2, 0, MS),
    "coco_retinanet_r101_2x_ms_lgd.yaml": (RETINA, R101, PLAIN, 3, SGD_01, SGD_01, True, False, False, X2, 0, MS),
    "coco_retinanet_r101dcn_2x_ms_lgd.yaml": (RETINA, R101, DCN, 3, SGD_01, SGD_01, True, False, False, X2, 0, MS),
    "coco_retinanet_x101dcn_2x_ms_lgd.yaml": (RETINA, X101, DCN, 3, SGD_01, SGD_01, True, False, False, X2, POST, MS),
    "coco_retinanet_swint_3x_ms_lgd.yaml": (RETINA, SWIN, PLAIN, 5, ADAMW, ADAMW, True, False, False, X3, 0, MS),
    "coco_fcos_r50_2x_ms_lgd.yaml": ("fcos", R50, PLAIN, 3, SGD_01, SGD_01, False, False, False, X2, 0, MS),
    "coco_fcos_r101_2x_ms_lgd.yaml": ("fcos", R101, PLAIN, 3, SGD_01, SGD_01, True, False, False, X2, 0, MS),
    "coco_fcos_r101dcn_2x_ms_lgd.yaml": ("fcos", R101, DCN, 3, SGD_01, SGD_01, True, False, False, X2, POST, MS),
    "coco_fcos_x101dcn_2x_ms_lgd.yaml": ("fcos", X101, DCN, 3, SGD_01, SGD_01, True, False, False, X2, POST, MS),
    "coco_fasterrcnn_r50_2x_ms_lgd.yaml": (FRCNN, R50, PLAIN, 3, SGD_02, SGD_02, False, True, False, X2, 0, MS),
    "coco_fasterrcnn_r101_2x_ms_lgd.yaml": (FRCNN, R101, PLAIN, 3, SGD_02, SGD_02, False, True, False, X2, 0, MS),
    "coco_fasterrcnn_r101dcn_2x_ms_lgd.yaml": (FRCNN, R101, DCN, 3, SGD_02, SGD_02, False, True, False, X2, 0, MS),
    "coco_fasterrcnn_x101dcn_2x_ms_lgd.yaml": (FRCNN, X101, DCN, 3, SGD_02, SGD_02, False, True, False, X2, POST, MS),
    "coco_maskrcnn_swint_3x_ms_lgd.yaml": ("maskrcnn", SWIN, PLAIN, 5, ADAMW, SGD_02, False, True, True, X3, 0, MS),
}
WEIGHTS = {R50: "ResNet50_Weights.IMAGENET1K_V1", R101: "ResNet101_Weights.IMAGENET1K_V1",
           X101: "ResNeXt101_32X8D_Weights.IMAGENET1K_V1", SWIN: "Swin_T_Weights.IMAGENET1K_V1"}


def test_every_coco_recipe_is_checked():
    assert {p.name for p in CONFIGS.glob("coco_*.yaml")} == set(REFERENCE)
    # the reference's 14 (configs/Distillation/**) plus the single-scale RetinaNet R-50 of the paper's ablations
    assert sum(name.endswith("_ms_lgd.yaml") for name in REFERENCE) == 14


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_coco_recipe_matches_the_reference(name):
    cfg = load_config(CONFIGS / name)
    arch, backbone, deform, trainable, student, teacher, context, detach, mask_guided, (max_iter, steps), post, \
        sizes = REFERENCE[name]
    m, s, g = cfg.model, cfg.solver, cfg.lgd
    assert (m.arch, m.backbone, m.depth, m.deform_stages, m.trainable_layers) == (arch, backbone, None, deform,
                                                                                  trainable)
    assert m.backbone_weights == WEIGHTS[backbone] and m.deform_mask_scale == 1.0  # detectron2's DCN v2 mask
    assert (m.min_size, m.max_size) == (sizes, 1333)
    assert (s.optimizer, s.base_lr, s.weight_decay) == student
    assert (g.teacher_optimizer, g.teacher_lr, g.teacher_weight_decay) == teacher
    assert (g.context_box, g.detach_appearance, g.mask_guided) == (context, detach, mask_guided)
    assert (s.max_iter, s.steps) == (max_iter, steps)
    # Every reference config: 30k pre-distillation, backbone body frozen for 20k.
    assert (g.pre_distill_iters, g.post_distill_iters, g.freeze_backbone_iters) == (30000, post, 20000)
    assert (s.warmup_iters, s.warmup_factor, s.momentum, s.gamma) == (1000, 0.001, 0.9, 0.1)
    assert g.teacher_momentum == 0.9
    assert (s.weight_decay_norm, s.weight_decay_bias) == (None, None)  # decay on every parameter
    assert (s.clip_type, s.clip_value) == ("value", 1.0)  # detectron2's CLIP_GRADIENTS defaults
    assert (g.class_format, g.attention, g.distill_weight, g.eval_teacher) == ("one_hot", "student_guided", 1.0, True)
    assert cfg.data.batch_size == 16 and m.fpn_channels == 256


# `lgd summary -c RECIPE --num-classes 80`: (student = deployed, teacher) parameters; the adapter is 1,770,240 in all
COUNTS = {
    "coco_retinanet_r50_2x_lgd.yaml": (33_786_804, 8_304_336),
    "coco_retinanet_r50_2x_ms_lgd.yaml": (33_786_804, 8_304_336),
    "coco_retinanet_r101_2x_ms_lgd.yaml": (52_726_708, 8_304_336),
    "coco_retinanet_r101dcn_2x_ms_lgd.yaml": (54_655_966, 8_304_336),
    "coco_retinanet_x101dcn_2x_ms_lgd.yaml": (104_585_950, 8_304_336),
    "coco_retinanet_swint_3x_ms_lgd.yaml": (37_278_958, 8_304_336),
    "coco_fcos_r50_2x_ms_lgd.yaml": (32_244_245, 8_238_544),  # no context box: no context Linear
    "coco_fcos_r101_2x_ms_lgd.yaml": (51_184_149, 8_304_336),
    "coco_fcos_r101dcn_2x_ms_lgd.yaml": (53_113_407, 8_304_336),
    "coco_fcos_x101dcn_2x_ms_lgd.yaml": (103_043_391, 8_304_336),
    "coco_fasterrcnn_r50_2x_ms_lgd.yaml": (41_704_036, 8_238_544),
    "coco_fasterrcnn_r101_2x_ms_lgd.yaml": (60_643_940, 8_238_544),
    "coco_fasterrcnn_r101dcn_2x_ms_lgd.yaml": (62_573_198, 8_238_544),
    "coco_fasterrcnn_x101dcn_2x_ms_lgd.yaml": (112_503_182, 8_238_544),
    "coco_maskrcnn_swint_3x_ms_lgd.yaml": (47_798_959, 10_977_497),  # mask-guided: 49 more descriptor entries
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_summary_counts_every_recipe(name):
    with torch.device("meta"):  # counts without allocating 100 M parameters
        report = parameter_counts(load_config(CONFIGS / name), 80)
    assert (report["student"], report["teacher"], report["adapter"]) == (*COUNTS[name], 1_770_240)
    assert report["deployed"] == report["student"] and report["backbone"] == REFERENCE[name][1]
