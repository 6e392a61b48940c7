"""Run a multi-task model over a labelled COCO set and score it: the evaluation path shared by every stage.

Predictions are mapped back from the letterboxed input to original image coordinates before scoring, so the
numbers are comparable across models with different input sizes. Semantic segmentation is scored at the
model's input resolution on the letterboxed target, whose padding is 255 (ignored).

Example:
    >>> metrics = evaluate_model(model, "data/prepared/general/val.json", "data/prepared/general/images",
    ...                          input_size=128)  # doctest: +SKIP
    >>> sorted(metrics)  # doctest: +SKIP
    ['AP50', 'AP75', 'mAP', 'mIoU', ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataengine.boxes import clip_xyxy, xyxy_to_coco
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate, stack_semantic
from dataengine.data.transforms import build_transforms, letterbox_params, unletterbox_boxes
from dataengine.evaluation import SegmentationMeter, evaluate_detection

__all__ = ["predict_coco", "evaluate_model"]


@torch.inference_mode()
def predict_coco(
    model: nn.Module,
    coco: dict[str, Any] | str | Path,
    image_root: str | Path,
    *,
    input_size: int,
    batch_size: int = 16,
    num_workers: int = 0,
    score_threshold: float = 0.05,
    max_detections: int = 100,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], SegmentationMeter | None]:
    """Predict every image of a COCO set.

    Returns:
        COCO results (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``), and a
        :class:`SegmentationMeter` filled with the semantic predictions (``None`` when the model has no
        segmentation head or the set has no masks).
    """
    coco = load_coco(coco) if not isinstance(coco, dict) else coco
    cats = CategoryMap.from_coco(coco)
    dataset = CocoDetectionSegDataset(coco, image_root, build_transforms(None, input_size, train=False), categories=cats)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    detection = getattr(model, "detection", True)
    meter = SegmentationMeter(len(cats) + 1, ["background", *cats.names]) if (
        getattr(model, "segmentation", False) and dataset.has_masks) else None
    results: list[dict[str, Any]] = []
    device = next(model.parameters()).device  # the trainer evaluates on its device (CUDA on a GPU machine)
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        outputs = model(images.to(device, non_blocking=True))
        if detection:
            dets = model.postprocess(outputs, score_threshold=score_threshold, max_detections=max_detections)
            for det, target in zip(dets, targets):
                h, w = (int(v) for v in target["orig_size"])
                scale, pad_x, pad_y = letterbox_params(h, w, input_size)
                xyxy = unletterbox_boxes(det["boxes"].float().cpu(), scale, pad_x, pad_y)
                boxes = clip_xyxy(xyxy, w, h)  # [M, 4]
                for box, score, label in zip(xyxy_to_coco(boxes).tolist(), det["scores"].tolist(),
                                             det["labels"].tolist()):
                    results.append({"image_id": int(target["image_id"]), "category_id": cats.ids[int(label)],
                                    "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
        if meter is not None:
            probs = model.semantic_probs(outputs, size=images.shape[-2:])  # [B, K+1, S, S]
            meter.update(probs.argmax(1).cpu(), stack_semantic(targets))
    model.train(was_training)
    return results, meter


def evaluate_model(
    model: nn.Module,
    coco: dict[str, Any] | str | Path,
    image_root: str | Path,
    *,
    input_size: int,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """COCO mAP/AP50/per-class AP (pycocotools) and mIoU of ``model`` on a labelled set."""
    coco = load_coco(coco) if not isinstance(coco, dict) else coco
    results, meter = predict_coco(model, coco, image_root, input_size=input_size, batch_size=batch_size,
                                  progress=progress)
    metrics: dict[str, Any] = {}
    if getattr(model, "detection", True):
        det = evaluate_detection(coco, results)
        metrics.update({k: det[k] for k in ("mAP", "AP50", "AP75", "per_class_AP")})
    if meter is not None:
        seg = meter.compute()
        metrics.update({"mIoU": seg["mIoU"], "per_class_IoU": seg["per_class_IoU"]})
    return metrics
