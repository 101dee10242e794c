"""The COCO recipes carry the reference's settings (megvii-research/LGD configs/Distillation/**, Base-*.yaml)."""
from pathlib import Path

import pytest

from lgd.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# recipe: (student LR, teacher LR, context box, detach appearance, mask-guided, max_iter, steps)
REFERENCE = {
    "coco_retinanet_r50_2x_lgd.yaml": (0.01, 0.01, True, False, False, 180000, [120000, 160000]),
    "coco_retinanet_r50_2x_ms_lgd.yaml": (0.01, 0.01, True, False, False, 180000, [120000, 160000]),
    "coco_fcos_r50_2x_ms_lgd.yaml": (0.01, 0.01, False, False, False, 180000, [120000, 160000]),
    "coco_fasterrcnn_r50_2x_ms_lgd.yaml": (0.02, 0.02, False, True, False, 180000, [120000, 160000]),
    "coco_maskrcnn_r50_3x_ms_lgd.yaml": (0.02, 0.02, False, True, True, 270000, [210000, 250000]),
}


def test_every_coco_recipe_is_checked():
    assert {p.name for p in CONFIGS.glob("coco_*.yaml")} == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_coco_recipe_matches_the_reference(name):
    cfg = load_config(CONFIGS / name)
    lr, teacher_lr, context, detach, mask_guided, max_iter, steps = REFERENCE[name]
    s, g = cfg.solver, cfg.lgd
    assert (s.base_lr, g.teacher_lr) == (lr, teacher_lr)
    assert (g.context_box, g.detach_appearance, g.mask_guided) == (context, detach, mask_guided)
    assert (s.max_iter, s.steps) == (max_iter, steps)
    # Every reference config: 30k pre-distillation, no post window, backbone body frozen for 20k.
    assert (g.pre_distill_iters, g.post_distill_iters, g.freeze_backbone_iters) == (30000, 0, 20000)
    assert (s.warmup_iters, s.warmup_factor, s.momentum, s.weight_decay) == (1000, 0.001, 0.9, 1e-4)
    assert (g.teacher_momentum, g.teacher_weight_decay) == (0.9, 1e-4)
    assert (s.weight_decay_norm, s.weight_decay_bias) == (None, None)  # decay on every parameter
    assert (s.clip_type, s.clip_value) == ("value", 1.0)  # detectron2's CLIP_GRADIENTS defaults
    assert (g.class_format, g.attention, g.distill_weight) == ("one_hot", "student_guided", 1.0)
    assert cfg.data.batch_size == 16
