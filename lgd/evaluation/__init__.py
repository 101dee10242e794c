"""Evaluation: COCO AP via pycocotools."""

from lgd.evaluation.coco import EvalResult, detections_to_coco, evaluate_coco, save_results

__all__ = ["EvalResult", "detections_to_coco", "evaluate_coco", "save_results"]
