"""The evaluator: run a model over a dataset (split over the processes) and score its detections with the split's
metric (COCO AP, VOC AP50 or CrowdHuman AP50 / MR^-2); also the teacher diagnostic."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from lgd.config import Config
from lgd.data import CocoDetection, build_eval_loader
from lgd.data.build import to_device
from lgd.detectors import VIEWS, set_test_size
from lgd.evaluation import (EvalResult, auto_metric, detections_to_coco, evaluate_detections, save_results,
                            warn_dense_images)
from lgd.methods.trainable import Trainable
from lgd.utils import distributed
from lgd.utils.distributed import Context


def split_metric(cfg: Config, split: str) -> str:
    """The metric a split is evaluated with: ``data.metric``, or when "auto" the one its format is reported with."""
    s = getattr(cfg.data, split)
    return auto_metric(s.format, s.root) if cfg.data.metric == "auto" else cfg.data.metric


@torch.no_grad()
def evaluate(
    model: Trainable,
    dataset: CocoDetection,
    cfg: Config,
    device: torch.device,
    teacher: bool = False,
    out_file: Optional[Path] = None,
    progress: bool = True,
    desc: str = "eval",
    ctx: Optional[Context] = None,
    split: str = "val",
) -> Optional[EvalResult]:
    """AP of the student (or, with ``teacher``, of the head on the teacher's features: a diagnostic).

    The metric is ``split_metric(cfg, split)``: COCO AP, VOC AP50 or CrowdHuman AP50 / MR^-2, against the
    dataset's validated ground truth (``dataset.coco``); COCO scores up to ``model.detections_per_img`` detections
    per image, and a warning names images with more objects than that.

    With a distributed ``ctx`` every rank runs its share of the images and rank 0 gathers the detections,
    scores them and writes ``out_file``; the other ranks return ``None``. Raises LGDError for the teacher
    diagnostic of a model without a teacher (Baseline).
    """
    ctx = ctx or Context(device=device)
    student = model.student
    was_training = model.training
    model.eval()
    set_test_size(student, cfg.model)
    shard = Subset(dataset, distributed.shard_indices(ctx, len(dataset))) if ctx.distributed else dataset
    loader = build_eval_loader(shard, cfg.data.eval_batch_size, cfg.data.workers)
    outputs, ids = [], []
    bar = not progress or not ctx.is_main
    for images, targets in tqdm(loader, desc=desc, disable=bar, leave=False, dynamic_ncols=True):
        images, targets = to_device(images, targets, device)
        dets = model.teacher_detect(images, targets) if teacher else student(images)
        outputs.extend({k: v.cpu() for k, v in d.items()} for d in dets)
        ids.extend(t["image_id"] for t in targets)
    student.transform.min_size = tuple(cfg.model.min_size)
    model.train(was_training)
    gathered = distributed.gather_lists(ctx, list(zip(outputs, ids)))
    if gathered is None:
        return None
    outputs, ids = [o for o, _ in gathered], [i for _, i in gathered]
    # From the config, not the instance: a stand-in student (tests' perfect detector) has no view.
    with_masks = VIEWS[cfg.model.arch].has_masks
    results = detections_to_coco(outputs, ids, dataset.label_to_category_id, with_masks=with_masks)
    if out_file is not None:
        save_results(results, out_file)
    warn_dense_images(dataset.coco, dataset.ids, cfg.model.detections_per_img)
    return evaluate_detections(
        split_metric(cfg, split),
        dataset.coco,
        results,
        iou_types=("bbox", "segm") if with_masks else ("bbox",),
        class_names=dataset.class_names,
        cat_ids=dataset.cat_ids,
        image_ids=dataset.ids,
        max_dets=cfg.model.detections_per_img,
    )
