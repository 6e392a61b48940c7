"""Detection metrics: COCO mAP through pycocotools, per-prediction matching, pseudo-label precision/recall, confusers.

Inputs are always a ground-truth COCO dict (``images``/``annotations``/``categories``, images may have no
annotations; see :mod:`dataengine.data.coco`) and a list of COCO results
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``. Nothing here modifies its inputs: pycocotools'
``COCO``/``loadRes``/``COCOeval`` write into the dicts they are given (``id``, ``area``, ``ignore``...), so they only
ever see fresh minimal copies.

pycocotools computes precision as ``tp / (tp + fp + eps)``, so a perfect AP comes out as ``1 - 2e-16``, not ``1.0``:
compare with a tolerance.

Conventions shared by every function:

- Predictions on an image id absent from ``gt``, or with a category id absent from ``gt``, raise ``ValueError``
  naming the ids (a mapping bug, never silently dropped as pycocotools would).
- A category with **no ground-truth instance** in ``gt`` has no AP (``None``) and is left out of every mean, as
  COCOeval does (its false positives therefore cost nothing in mAP; they do count in :func:`precision_recall_at`).
- Crowd annotations (``iscrowd=1``) are handled by COCOeval as "ignore" regions in :func:`evaluate_detection`. The
  one-to-one matching of :func:`match_predictions` has no "ignored" outcome, so it leaves crowd regions out: they are
  neither objects to find nor matches for a prediction.
- COCO keeps at most 100 detections per image (the ``maxDets=100`` setting every COCO number is reported at).

Example:
    >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "cat"}],
    ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
    >>> preds = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6], "score": 0.9}]  # IoU 0.6
    >>> m = evaluate_detection(gt, preds)
    >>> round(m["AP50"], 6), round(m["mAP"], 6)
    (1.0, 0.3)
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from dataengine.boxes import coco_to_xyxy
from dataengine.data.coco import CategoryMap

__all__ = [
    "evaluate_detection",
    "precision_recall_curves",
    "match_predictions",
    "precision_recall_at",
    "confuser_false_positives",
    "confuser_false_positives_at_recall",
]

# Indices into COCOeval.stats, see COCOeval.summarize (_summarizeDets).
_STAT_AP, _STAT_AP50, _STAT_AP75, _STAT_AR100 = 0, 1, 2, 8
_MAX_SHOWN_IDS = 20


# ---------------------------------------------------------------------------------------------------------------
# Input checking and copies
# ---------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _show_ids(ids: set[Any]) -> str:
    shown = sorted(ids, key=lambda v: (type(v).__name__, v))[:_MAX_SHOWN_IDS]
    more = f" (+{len(ids) - len(shown)} more)" if len(ids) > len(shown) else ""
    return f"{shown}{more}"


def _check_gt(gt: dict[str, Any]) -> None:
    if not isinstance(gt, dict):
        raise ValueError(f"gt must be a COCO dict, got {type(gt).__name__}")
    for key in ("images", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"gt: key '{key}' must be a list")
    if not isinstance(gt.get("annotations", []), list):
        raise ValueError("gt: key 'annotations' must be a list")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    for ann in gt.get("annotations", []):
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise ValueError(f"gt annotation id={ann.get('id')}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        # COCOeval would silently skip these; here they are a broken gt file.
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"gt annotation id={ann.get('id')}: image_id {ann.get('image_id')!r} names no gt image")
        if ann.get("category_id") not in cat_ids:
            raise ValueError(f"gt annotation id={ann.get('id')}: category_id {ann.get('category_id')!r} not in "
                             f"categories {sorted(cat_ids)}")


def _check_predictions(gt: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` for malformed predictions or ids unknown to ``gt``."""
    if not isinstance(predictions, list):
        raise ValueError(f"predictions must be a list of COCO results, got {type(predictions).__name__}")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, dict) or not {"image_id", "category_id", "bbox", "score"} <= pred.keys():
            raise ValueError(f"prediction {i}: expected a dict with image_id, category_id, bbox, score; got {pred!r}")
        bbox = pred["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise ValueError(f"prediction {i}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        if not _is_number(pred["score"]) or math.isnan(pred["score"]):
            raise ValueError(f"prediction {i}: 'score' must be a number, got {pred['score']!r}")
    image_ids = {img["id"] for img in gt["images"]}
    unknown_images = {p["image_id"] for p in predictions} - image_ids
    if unknown_images:
        raise ValueError(f"predictions on image ids not in gt: {_show_ids(unknown_images)}")
    cat_ids = {cat["id"] for cat in gt["categories"]}
    unknown_cats = {p["category_id"] for p in predictions} - cat_ids
    if unknown_cats:
        known = sorted(cat_ids)
        raise ValueError(f"predictions with category ids not in gt: {_show_ids(unknown_cats)}; known: {known}")


def _class_names(gt: dict[str, Any], class_names: list[str] | None) -> tuple[CategoryMap, list[str]]:
    """Categories sorted by id (COCOeval's ``catIds`` order) and the names to report them under."""
    cats = CategoryMap.from_coco(gt)
    names = list(cats.names) if class_names is None else list(class_names)
    if len(names) != len(cats):
        raise ValueError(f"class_names has {len(names)} names but gt has {len(cats)} categories (ids {list(cats.ids)})")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique to key per-class metrics, got {names}")
    return cats, names


def _gt_copy(gt: dict[str, Any]) -> dict[str, Any]:
    """A minimal fresh COCO dict for pycocotools (bbox evaluation needs no segmentation).

    Annotation ids are renumbered from 1: COCOeval stores the matched GT id in ``dtm`` and tests it for truth
    (``np.logical_and(dtm, ...)`` in ``accumulate``), so a GT with id 0 would count as unmatched.
    """
    anns = []
    for new_id, ann in enumerate(gt.get("annotations", []), start=1):
        x, y, w, h = (float(v) for v in ann["bbox"])
        anns.append({
            "id": new_id,
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "bbox": [x, y, w, h],
            "area": float(ann.get("area", w * h)),
            "iscrowd": int(ann.get("iscrowd", 0)),
        })
    return {
        "images": [{"id": img["id"]} for img in gt["images"]],
        "annotations": anns,
        "categories": [{"id": cat["id"], "name": cat["name"]} for cat in gt["categories"]],
    }


def _run_cocoeval(
    gt: dict[str, Any], predictions: list[dict[str, Any]], iou_thresholds: list[float] | None = None
) -> COCOeval:
    """Evaluate + accumulate a bbox COCOeval on copies of the inputs, with pycocotools' printing silenced."""
    _check_gt(gt)
    _check_predictions(gt, predictions)
    results = [
        {
            "image_id": p["image_id"],
            "category_id": p["category_id"],
            "bbox": [float(v) for v in p["bbox"]],
            "score": float(p["score"]),
        }
        for p in predictions
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = _gt_copy(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            # loadRes indexes anns[0] and fails on an empty list: build the empty result set ourselves so that COCOeval
            # still scores every class with GT at precision 0 (and leaves classes without GT at -1).
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _none_if_missing(value: float) -> float | None:
    """COCOeval writes -1 where a value is undefined (no GT instance)."""
    return None if value < 0 else float(value)


# ---------------------------------------------------------------------------------------------------------------
# COCO metrics
# ---------------------------------------------------------------------------------------------------------------


def evaluate_detection(
    gt: dict[str, Any], predictions: list[dict[str, Any]], *, class_names: list[str] | None = None
) -> dict[str, Any]:
    """COCO bbox metrics of ``predictions`` against ``gt``, computed by pycocotools' ``COCOeval``.

    Args:
        gt: Ground-truth COCO dict. Images without annotations are allowed (their detections are false positives).
        predictions: COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
        class_names: Names to key per-class values by, one per ``gt`` category in ascending id order
            (default: the categories' own names).

    Returns:
        ``mAP`` (AP@[.50:.05:.95]), ``AP50``, ``AP75``, ``AR100`` (all areas, 100 detections per image), the
        per-class ``per_class_AP`` / ``per_class_AP50`` (``None`` for a class with no GT instance, which is left
        out of the means), ``num_images`` and ``num_predictions``. With no predictions every defined value is 0.0.
        The summary values are ``None`` only when ``gt`` holds no (non-crowd) instance at all.

    Raises:
        ValueError: Malformed input, predictions on image or category ids not in ``gt``, or ``class_names`` of the
            wrong length.

    Example:
        >>> gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 3, "name": "dog"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20]}]}
        >>> evaluate_detection(gt, [])["mAP"]
        0.0
    """
    cats, names = _class_names(gt, class_names)
    evaluator = _run_cocoeval(gt, predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    stats = evaluator.stats
    params = evaluator.params
    assert list(params.catIds) == list(cats.ids), "COCOeval orders categories by id, like CategoryMap"
    area_all = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    precision = evaluator.eval["precision"]  # [T, R, K, A, M], -1 where the class has no GT

    per_class_ap: dict[str, float | None] = {}
    per_class_ap50: dict[str, float | None] = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, area_all, max_dets]  # [T, R]
        # Same reduction as COCOeval._summarize: mean over IoU thresholds and the 101 recall points.
        per_class_ap[name] = float(p.mean()) if (p > -1).all() else None
        per_class_ap50[name] = float(p[iou50].mean()) if (p[iou50] > -1).all() else None
    return {
        "mAP": _none_if_missing(stats[_STAT_AP]),
        "AP50": _none_if_missing(stats[_STAT_AP50]),
        "AP75": _none_if_missing(stats[_STAT_AP75]),
        "AR100": _none_if_missing(stats[_STAT_AR100]),
        "per_class_AP": per_class_ap,
        "per_class_AP50": per_class_ap50,
        "num_images": len(gt["images"]),
        "num_predictions": len(predictions),
    }


def precision_recall_curves(
    gt: dict[str, Any], predictions: list[dict[str, Any]], iou: float = 0.5, *, class_names: list[str] | None = None
) -> dict[str, dict[str, list[float]]]:
    """Per-class interpolated precision-recall curves from COCOeval, for plots.

    Each curve has COCO's 101 recall points ``0, 0.01, ..., 1``: ``precision[i]`` is the interpolated precision at
    ``recall[i]`` and ``scores[i]`` the score threshold reaching it; both are 0 beyond the highest recall reached.
    Classes with no GT instance have no curve and are left out.

    Args:
        gt: Ground-truth COCO dict.
        predictions: COCO results.
        iou: IoU threshold for a true positive, in ``(0, 1]``.
        class_names: As in :func:`evaluate_detection`.

    Returns:
        ``{class_name: {"precision": [...], "recall": [...], "scores": [...]}}``.

    Example:
        >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
        >>> c = precision_recall_curves(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}])
        >>> round(c["cat"]["precision"][-1], 9), c["cat"]["recall"][-1], c["cat"]["scores"][-1]
        (1.0, 1.0, 0.8)
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    _, names = _class_names(gt, class_names)
    evaluator = _run_cocoeval(gt, predictions, iou_thresholds=[iou])
    area_all = evaluator.params.areaRngLbl.index("all")
    max_dets = evaluator.params.maxDets.index(100)
    recall = [float(r) for r in evaluator.params.recThrs]
    curves: dict[str, dict[str, list[float]]] = {}
    for k, name in enumerate(names):
        precision = evaluator.eval["precision"][0, :, k, area_all, max_dets]  # [R]
        if (precision < 0).any():  # no GT instance of this class
            continue
        scores = evaluator.eval["scores"][0, :, k, area_all, max_dets]  # [R]
        curves[name] = {"precision": precision.tolist(), "recall": list(recall), "scores": scores.tolist()}
    return curves


# ---------------------------------------------------------------------------------------------------------------
# One-to-one matching (pseudo-label precision/recall)
# ---------------------------------------------------------------------------------------------------------------


def _gt_boxes_by_key(gt: dict[str, Any]) -> dict[tuple[Any, Any], list[list[float]]]:
    """Non-crowd GT boxes (COCO xywh) grouped by ``(image_id, category_id)``."""
    out: dict[tuple[Any, Any], list[list[float]]] = defaultdict(list)
    for ann in gt.get("annotations", []):
        if not ann.get("iscrowd", 0):
            out[(ann["image_id"], ann["category_id"])].append([float(v) for v in ann["bbox"]])
    return out


def _iou_matrix(boxes_a: list[list[float]], boxes_b: list[list[float]]) -> torch.Tensor:
    """IoU of COCO xywh boxes, ``[len(a), len(b)]``; degenerate pairs (zero union) give 0, not NaN."""
    a = coco_to_xyxy(torch.tensor(boxes_a, dtype=torch.float64).reshape(-1, 4))  # [A, 4]
    b = coco_to_xyxy(torch.tensor(boxes_b, dtype=torch.float64).reshape(-1, 4))  # [B, 4]
    return torch.nan_to_num(box_iou(a, b), nan=0.0)  # [A, B]


def match_predictions(gt: dict[str, Any], predictions: list[dict[str, Any]], iou_threshold: float = 0.5) -> list[bool]:
    """Whether each prediction is a true positive under class-aware, one-to-one greedy matching.

    Within each (image, category), predictions are visited by descending score (ties in input order) and each takes
    the still-unmatched GT box of highest IoU if that IoU is ``>= iou_threshold`` -- the rule COCOeval applies per
    IoU threshold. A GT is matched at most once, so a duplicate detection is a false positive. Crowd GT is ignored
    (see the module docstring).

    Args:
        gt: Ground-truth COCO dict.
        predictions: COCO results.
        iou_threshold: Minimum IoU for a match.

    Returns:
        One bool per prediction, in input order.

    Example:
        >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
        >>> dup = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": s} for s in (0.5, 0.9)]
        >>> match_predictions(gt, dup)
        [False, True]
    """
    _check_gt(gt)
    _check_predictions(gt, predictions)
    gt_boxes = _gt_boxes_by_key(gt)
    groups: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    for i, pred in enumerate(predictions):
        groups[(pred["image_id"], pred["category_id"])].append(i)

    matched = [False] * len(predictions)
    for key, indices in groups.items():
        boxes = gt_boxes.get(key)
        if not boxes:
            continue
        order = sorted(indices, key=lambda i: -float(predictions[i]["score"]))  # stable: ties keep input order
        ious = _iou_matrix([predictions[i]["bbox"] for i in order], boxes)  # [P, G]
        taken = torch.zeros(len(boxes), dtype=torch.bool)  # [G]
        for row, i in enumerate(order):
            candidates = ious[row].masked_fill(taken, -1.0)  # [G]
            best = int(candidates.argmax())
            if candidates[best] >= iou_threshold:
                taken[best] = True
                matched[i] = True
    return matched


def _pr(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def precision_recall_at(
    gt: dict[str, Any], predictions: list[dict[str, Any]], iou: float = 0.5, *, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Precision and recall of a fixed set of predictions (e.g. pseudo-labels kept after filtering).

    No score threshold is applied here: filter ``predictions`` first. Matching is :func:`match_predictions`.
    ``precision`` is ``None`` when there are no predictions and ``recall`` is ``None`` when there is no (non-crowd)
    GT, rather than a made-up 0 or 1; the counts stay exact.

    Args:
        gt: Ground-truth COCO dict.
        predictions: COCO results.
        iou: IoU threshold for a true positive.
        class_names: As in :func:`evaluate_detection`.

    Returns:
        ``{"precision", "recall", "tp", "fp", "fn", "per_class": {name: {"precision", "recall", "tp", "fp", "fn"}}}``
        with every ``gt`` category in ``per_class``.

    Example:
        >>> gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
        >>> r = precision_recall_at(gt, [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "score": 0.9}])
        >>> r["precision"], r["recall"], r["fp"], r["fn"]
        (0.0, 0.0, 1, 1)
    """
    cats, names = _class_names(gt, class_names)
    matched = match_predictions(gt, predictions, iou_threshold=iou)
    tp = dict.fromkeys(cats.ids, 0)
    fp = dict.fromkeys(cats.ids, 0)
    n_gt = dict.fromkeys(cats.ids, 0)
    for pred, is_tp in zip(predictions, matched):
        (tp if is_tp else fp)[pred["category_id"]] += 1
    for ann in gt.get("annotations", []):
        if not ann.get("iscrowd", 0):
            n_gt[ann["category_id"]] += 1
    per_class = {name: _pr(tp[cid], fp[cid], n_gt[cid] - tp[cid]) for cid, name in zip(cats.ids, names)}
    total_tp, total_fp, total_gt = sum(tp.values()), sum(fp.values()), sum(n_gt.values())
    return {**_pr(total_tp, total_fp, total_gt - total_tp), "per_class": per_class}


# ---------------------------------------------------------------------------------------------------------------
# Confusers
# ---------------------------------------------------------------------------------------------------------------


def confuser_false_positives(
    gt: dict[str, Any],
    predictions: list[dict[str, Any]],
    *,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.3,
    match_iou: float = 0.5,
) -> dict[str, Any]:
    """Count confident detections fired on confusers: objects that resemble a class but are not one.

    ``gt`` images may carry ``"confusers": [[x, y, w, h], ...]`` (see :mod:`dataengine.data.coco`). A prediction is
    a confuser false positive when its score is ``>= score_threshold``, its box has IoU ``>= iou_threshold`` with a
    confuser box of its image, and it overlaps no GT object of its own class at IoU ``>= match_iou``. The GT test is
    overlap, not one-to-one matching, so a duplicate detection of a real object is not blamed on a nearby confuser.

    The rate is per image **with at least one confuser** (``images``): images without confusers cannot produce
    confuser false positives, and counting them would make the rate depend on how many plain images the test set has.

    Args:
        gt: Ground-truth COCO dict with optional per-image ``confusers``.
        predictions: COCO results.
        score_threshold: Minimum score of a prediction to count.
        iou_threshold: Minimum IoU with a confuser box.
        match_iou: IoU with a same-class GT object above which the prediction is a real detection.

    Returns:
        ``{"confuser_fp_per_image": confuser_fp / images (None when no image has confusers), "confuser_fp": int,
        "images": int}``.

    Raises:
        ValueError: Malformed ``confusers`` (naming the image id), or predictions on unknown image/category ids.

    Example:
        >>> gt = {"images": [{"id": 1, "confusers": [[0, 0, 10, 10]]}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": []}
        >>> confuser_false_positives(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}])
        {'confuser_fp_per_image': 1.0, 'confuser_fp': 1, 'images': 1}
    """
    _check_gt(gt)
    _check_predictions(gt, predictions)
    confusers: dict[Any, list[list[float]]] = {}
    for img in gt["images"]:
        boxes = img.get("confusers") or []
        if not isinstance(boxes, list) or not all(
            isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b) for b in boxes
        ):
            raise ValueError(f"gt image id={img['id']}: 'confusers' must be a list of [x, y, w, h], got {boxes!r}")
        if boxes:
            confusers[img["id"]] = [[float(v) for v in b] for b in boxes]
    gt_boxes = _gt_boxes_by_key(gt)

    count = 0
    for pred in predictions:
        boxes = confusers.get(pred["image_id"])
        if boxes is None or pred["score"] < score_threshold:
            continue
        if _iou_matrix([pred["bbox"]], boxes).max() < iou_threshold:
            continue
        same_class = gt_boxes.get((pred["image_id"], pred["category_id"]))
        if same_class and _iou_matrix([pred["bbox"]], same_class).max() >= match_iou:
            continue
        count += 1
    images = len(confusers)
    return {"confuser_fp_per_image": count / images if images else None, "confuser_fp": count, "images": images}


def confuser_false_positives_at_recall(
    gt: dict[str, Any],
    predictions: list[dict[str, Any]],
    recall: float,
    *,
    iou: float = 0.5,
    iou_threshold: float = 0.3,
    match_iou: float = 0.5,
) -> dict[str, Any]:
    """Confuser false positives at the operating point where the detector reaches a given recall of real objects.

    :func:`confuser_false_positives` counts at a fixed score threshold, so a model that lowers *every* score (a
    calibration shift) fires less on confusers there without telling them apart any better; it also finds fewer
    real objects. Here each model is read at its own threshold: the highest score at which its recall of the GT
    objects (class-aware one-to-one matching at ``iou``, :func:`match_predictions`) reaches ``recall``; the confuser
    count uses that threshold. Two models compared this way find the same share of real objects, so fewer confuser
    false positives means better discrimination, not lower confidence.

    Args:
        gt: Ground-truth COCO dict with per-image ``confusers``.
        predictions: COCO results.
        recall: Target recall of the GT objects, in ``(0, 1]``.
        iou: IoU for a prediction to match a GT object (recall).
        iou_threshold, match_iou: As in :func:`confuser_false_positives`.

    Returns:
        ``{"recall": target, "score_threshold": float | None, "recall_reached": float | None,
        "confuser_fp_per_image": float | None, "confuser_fp": int | None, "images": int, "max_recall": float}``;
        the threshold and counts are ``None`` when no threshold reaches ``recall`` (then ``max_recall`` says how far
        the model gets) or the GT has no object.

    Raises:
        ValueError: ``recall`` outside ``(0, 1]``, or what :func:`confuser_false_positives` refuses.

    Example:
        >>> gt = {"images": [{"id": 1, "confusers": [[50, 50, 10, 10]]}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
        >>> preds = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.4},
        ...          {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.6}]
        >>> r = confuser_false_positives_at_recall(gt, preds, 1.0)
        >>> r["score_threshold"], r["confuser_fp_per_image"]  # to find the object, the model must accept 0.4
        (0.4, 1.0)
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall!r}")
    matched = match_predictions(gt, predictions, iou_threshold=iou)
    n_gt = sum(1 for ann in gt.get("annotations", []) if not ann.get("iscrowd", 0))
    # Greedy matching by descending score makes the matches among predictions scoring >= t independent of the
    # predictions below t, so one matching gives the recall at every threshold.
    hits = sorted((float(p["score"]) for p, m in zip(predictions, matched) if m), reverse=True)
    max_recall = len(hits) / n_gt if n_gt else 0.0
    out: dict[str, Any] = {"recall": recall, "score_threshold": None, "recall_reached": None,
                           "confuser_fp_per_image": None, "confuser_fp": None, "images": None,
                           "max_recall": max_recall}
    needed = math.ceil(recall * n_gt - 1e-9)
    if not n_gt or needed > len(hits):
        out["images"] = confuser_false_positives(gt, [], iou_threshold=iou_threshold, match_iou=match_iou)["images"]
        return out
    threshold = hits[needed - 1]
    counted = confuser_false_positives(gt, predictions, score_threshold=threshold, iou_threshold=iou_threshold,
                                       match_iou=match_iou)
    return {**out, "score_threshold": threshold, "recall_reached": sum(s >= threshold for s in hits) / n_gt,
            **counted}
