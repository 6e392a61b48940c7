"""The pseudo-label filter: calibrated accept / review / reject bands, a ranked review queue and honest metrics.

Input: the pool's ``predictions.json`` of the ``pseudo_label`` stage (boxes in original pixels, ``xyxy``) and a
:class:`~dataengine.pseudo.calibrate.Calibration` fitted on general val. Every box gets its calibrated probability
``p`` of being correct, then, in this order:

1. **minimum size**: a box whose shorter side is below ``filter.min_box_size`` pixels is rejected (``"min_box_size"``);
2. **class-aware NMS** (``torchvision.ops.batched_nms`` at ``filter.nms_iou``, per image and class) by ``p``;
   suppressed boxes are rejected (``"nms"``);
3. **per-image cap**: the ``filter.max_per_image`` most probable boxes of an image stay, the rest are rejected
   (``"max_per_image"``);
4. **thresholds**: each class starts from its val threshold (:mod:`~dataengine.pseudo.calibrate`), which makes
   the *val* boxes above it reach ``target_precision``. The pool mixes its boxes differently (a scenario pool has
   more boxes just above a threshold than general val), so the threshold is then raised, if needed, to the lowest
   value at which the class's surviving *pool* boxes above it also reach the target in estimated precision (mean
   ``p``). This uses only the calibrated probabilities, never a pool label, and keeps the promise that the accepted
   band's estimated precision is at least the target for every class;
5. **bands**: ``p >= t_class`` -> accepted; ``review_min_probability <= p < t_class`` -> review;
   ``p < review_min_probability`` -> rejected (``"low_probability"``). A class without threshold accepts nothing.

Ties in ``p`` (isotonic calibration is a step function, so they are common) are broken by the raw score, then by the
box's order in ``predictions.json``, so the outputs never depend on a sort's stability.

**Stable box ids**: ``"<file_name>#<i>"``, ``i`` the box's index among its image's boxes in ``predictions.json``.
Review tools and the accepted annotations (``pseudo_id``) use them to refer to a box.

**Review risk score**, to review the most useful boxes first. For a review box of class ``k`` with probability ``p``
in an image of area ``A``::

    closeness  = (p - r) / (t_k - r)            in [0, 1]; r = review_min_probability,
                                                t_k = the class's applied threshold (step 4), 1 if it accepts nothing
    visibility = min(1, sqrt(box_area / A) / 0.1)
    risk       = closeness * visibility * (2 - consistency)

Why this order is "most useful first": a box just under its class's threshold (``closeness`` near 1) is the decision
a small calibration error would flip, and by its ``p`` the likeliest box of the band to be a real object the students
would otherwise miss: a confirmation turns it into training data, a rejection exposes a systematic error (a confuser,
a domain shift) exactly where the threshold sits. Boxes near the review floor are mostly wrong and cost review time
for little gain. Boxes smaller than about 1% of the image (side ratio 0.1) are down-weighted:
they are hard for a person to judge and weigh little in training. A box whose TTA views disagree (low
``consistency``) gets up to twice the priority: the teacher is unsure of its geometry, so a person's answer teaches
the most there, and calibration is least reliable for such boxes. Ties are broken by the id.

**Outputs** (:func:`filter_pseudo_labels`):

- accepted pseudo-labels as COCO (``file_name`` relative to the pool root; every pool image, also those with no
  accepted box -- they are candidate negatives; categories ``1..K`` named by the teacher's classes); annotations
  carry ``score`` (raw), ``probability`` (calibrated), ``consistency`` and ``pseudo_id``;
- the review queue: records (below) with ``risk`` and ``threshold``, ranked by decreasing risk;
- the rejected boxes: records with ``reason``.

A record is ``{"id", "file_name", "width", "height", "bbox": [x1, y1, x2, y2] (original pixels, as in
predictions.json), "label", "category_id", "class_name", "score", "probability", "consistency", "threshold"}``
(``threshold`` ``None`` for a class that accepts nothing).

**Audit sample** (:func:`audit_sample`, ``audit.json``): per class, ``filter.audit_per_class`` accepted labels
drawn at random (the labels with the smallest ``sha256("<audit_seed>:<id>")``, so a label keeps its place while it
stays accepted and a re-run draws the same sample), ranked round-robin over the classes so a reviewer who stops early
has checked every class about as often. The review queue holds only boxes *below* the thresholds; the audit is how
people measure the accepted band itself (:func:`audit_metrics`: precision with a Wilson 95 % interval per class, no
hidden labels needed) and what lets the filter re-calibrate a class on their decisions
(:func:`dataengine.pseudo.calibrate.recalibrate`; the stage reads ``data/review/decisions.json``).

**Filtered semantic masks** (:func:`write_semantic_masks`): per pool image with segmentation, a PNG of category ids
(0 background) where pixels whose stored confidence ``c / 255`` is below ``filter.seg_confidence`` are set to 255
(ignored by every loss and metric). They are written to ``<out>/semantic/<file_name>.png`` (the image's path plus
``.png``, so ``a.jpg`` and ``a.png`` cannot collide). The pool root is an input of the stage and the masks cannot
live there, so the accepted COCO file records where they are: a top-level ``"semantic_root": "semantic"``, relative
to the COCO file's own folder, and per image ``semantic_file`` relative to that root. A reader resolves
``Path(coco_path).parent / coco["semantic_root"] / image["semantic_file"]``.

**Metrics** (:func:`pseudo_metrics`): counts per band and class, thresholds, calibration kind and the estimated
precision of the accepted band (mean ``p``). The diagnostic section at the end of this module
(:func:`diagnostic_metrics`) alone reads the pool's hidden labels, to report the true precision and recall; nothing
the filter decides depends on it.

Example:
    >>> accepted, review, rejected, stats = filter_pseudo_labels(
    ...     pool_predictions, calibration, params, CategoryMap.from_names(calibration.class_names))  # doctest: +SKIP
    >>> stats["accepted"] + stats["review"] + stats["rejected"] == len(pool_predictions["boxes"])  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import io
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.stats import binomtest
from torchvision.ops import batched_nms

from dataengine.boxes import xyxy_to_coco
from dataengine.config import FilterParams
from dataengine.data.coco import IGNORE_INDEX, CategoryMap, load_coco
from dataengine.evaluation import precision_recall_at
from dataengine.io import atomic_write_bytes, safe_join
from dataengine.pseudo.calibrate import Calibration, ValBoxes, check_predictions, select_threshold, widening_floor
from dataengine.review.inputs import accepted_records

__all__ = [
    "SEMANTIC_ROOT",
    "REJECT_REASONS",
    "semantic_file_name",
    "review_risk",
    "pool_thresholds",
    "box_ids",
    "pool_records",
    "reviewed_boxes",
    "filter_pseudo_labels",
    "audit_sample",
    "audit_metrics",
    "filter_semantic",
    "write_semantic_masks",
    "pseudo_metrics",
    "diagnostic_metrics",
]

SEMANTIC_ROOT = "semantic"
"""Folder of the filtered semantic masks, relative to the filter output folder (and to ``accepted.json``)."""

REJECT_REASONS = ("min_box_size", "nms", "max_per_image", "low_probability")

# A box whose side ratio sqrt(box_area / image_area) is at least this counts as fully visible in the review risk.
_VISIBLE_SIDE_RATIO = 0.1


def semantic_file_name(file_name: str) -> str:
    """The filtered mask's path relative to :data:`SEMANTIC_ROOT` for a pool image.

    Example:
        >>> semantic_file_name("cam1/00001.JPG")
        'cam1/00001.JPG.png'
    """
    return f"{file_name}.png"


def review_risk(probability: np.ndarray, threshold: np.ndarray, review_min_probability: float,
                box_area: np.ndarray, image_area: np.ndarray, consistency: np.ndarray) -> np.ndarray:
    """The review risk score ``[N]`` of boxes (see the module docstring); higher = review first.

    Args:
        probability: ``[N]`` calibrated probabilities.
        threshold: ``[N]`` their class's accept threshold (``inf`` for a class that accepts nothing: taken as 1).
        review_min_probability: The review floor ``r``.
        box_area: ``[N]`` box areas in pixels.
        image_area: ``[N]`` their images' areas in pixels.
        consistency: ``[N]`` TTA consistency.

    Example:
        >>> review_risk(np.array([0.8, 0.5]), np.array([0.9, 0.9]), 0.2, np.array([100.0, 100.0]),
        ...             np.array([1e4, 1e4]), np.array([1.0, 0.5])).round(4).tolist()
        [0.8571, 0.6429]
    """
    t = np.where(np.isfinite(threshold), threshold, 1.0)
    span = np.maximum(t - review_min_probability, 1e-12)
    closeness = np.clip((probability - review_min_probability) / span, 0.0, 1.0)
    side_ratio = np.sqrt(np.clip(box_area, 0.0, None) / np.maximum(image_area, 1e-12))
    visibility = np.minimum(1.0, side_ratio / _VISIBLE_SIDE_RATIO)
    return closeness * visibility * (2.0 - np.clip(consistency, 0.0, 1.0))


def pool_thresholds(probability: np.ndarray, labels: np.ndarray, val_thresholds: np.ndarray,
                    target_precision: float) -> np.ndarray:
    """Raise each class's val threshold until its pool boxes above it reach the target in estimated precision.

    Args:
        probability: ``[N]`` calibrated probabilities of the pool boxes that can still be accepted (after size, NMS
            and cap).
        labels: ``[N]`` their labels.
        val_thresholds: ``[K]`` val thresholds (``inf``: accepts nothing).
        target_precision: The target.

    Returns:
        ``[K]`` thresholds: per class the lowest ``t >= val threshold`` (among the class's pool probabilities, or the
        val threshold itself) whose pool boxes with ``p >= t`` have mean ``p >= target_precision``; ``inf`` when
        none does or the class accepts nothing on val.

    Example:
        >>> pool_thresholds(np.array([0.95, 0.9, 0.85, 0.6, 0.55, 0.3]), np.array([0, 0, 0, 0, 0, 1]),
        ...                 np.array([0.5, 0.2]), 0.85).tolist()
        [0.85, inf]
    """
    out = np.asarray(val_thresholds, dtype=np.float64).copy()
    for k in range(len(out)):
        p = probability[(labels == k) & (probability >= out[k])]
        if np.isinf(out[k]) or len(p) == 0 or p.mean() >= target_precision:
            continue  # nothing to accept, or the val threshold already keeps its promise on the pool
        t = select_threshold(p, np.ones(len(p), dtype=bool), target_precision)[0]
        out[k] = math.inf if t is None else t
    return out


def box_ids(boxes: list[dict[str, Any]]) -> list[str]:
    """The stable ids ``"<file_name>#<i>"`` of a predictions file's boxes, in order (see the module docstring).

    Example:
        >>> box_ids([{"file_name": "a.png"}, {"file_name": "b.png"}, {"file_name": "a.png"}])
        ['a.png#0', 'b.png#0', 'a.png#1']
    """
    seen: Counter[str] = Counter()
    ids = []
    for b in boxes:
        ids.append(f"{b['file_name']}#{seen[b['file_name']]}")
        seen[b["file_name"]] += 1
    return ids


def pool_records(pool_predictions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every box of the pool's predictions by id: ``{"file_name", "bbox" (xyxy), "label", "class_name", "score",
    "consistency"}``, the form :func:`dataengine.review.curate.teacher_verdicts` reads."""
    names = pool_predictions["class_names"]
    return {lid: {"file_name": b["file_name"], "bbox": list(b["bbox"]), "label": b["label"],
                  "class_name": names[b["label"]], "score": b["score"], "consistency": b["consistency"]}
            for lid, b in zip(box_ids(pool_predictions["boxes"]), pool_predictions["boxes"])}


def reviewed_boxes(records: dict[str, dict[str, Any]], verdicts: dict[str, bool]) -> ValBoxes:
    """The labels people decided on, as calibration input (``correct`` = the teacher was right), sorted by id.

    Example:
        >>> rec = {"a#0": {"label": 1, "score": 0.9, "consistency": 0.8}}
        >>> reviewed_boxes(rec, {"a#0": False}).correct.tolist()
        [False]
    """
    ids = sorted(verdicts)
    return ValBoxes(labels=np.array([records[i]["label"] for i in ids], dtype=np.int64),
                    scores=np.array([records[i]["score"] for i in ids], dtype=np.float64),
                    consistency=np.array([records[i]["consistency"] for i in ids], dtype=np.float64),
                    correct=np.array([verdicts[i] for i in ids], dtype=bool))


def _check_pool(pool_predictions: dict[str, Any], calibration: Calibration, params: FilterParams,
                categories: CategoryMap) -> None:
    names = list(pool_predictions["class_names"])
    if names != list(calibration.class_names):
        raise ValueError(f"pool predictions classes {names} differ from the calibration's "
                         f"{list(calibration.class_names)} (pool and val must be labelled by the same teacher)")
    if params.target_precision != calibration.target_precision:
        raise ValueError(f"filter.target_precision is {params.target_precision} but the calibration's thresholds were "
                         f"chosen for {calibration.target_precision}: refit the calibration")
    if names != list(categories.names):
        raise ValueError(f"pool predictions classes {names} differ from the output categories {list(categories.names)}")
    if not all(0 < cid < IGNORE_INDEX for cid in categories.ids):
        raise ValueError(f"category ids must be in 1..254 to be written in semantic masks, got {list(categories.ids)}")
    for img in pool_predictions["images"]:
        if not all(isinstance(img.get(k), int) and img[k] > 0 for k in ("width", "height")):
            raise ValueError(f"pool predictions: image {img['file_name']!r} needs positive int 'width' and 'height', "
                             f"got {img.get('width')!r} x {img.get('height')!r}")


def filter_pseudo_labels(
    pool_predictions: dict[str, Any], calibration: Calibration, params: FilterParams, categories: CategoryMap,
    reviewed: ValBoxes | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Split the pool's boxes into accepted pseudo-labels, a ranked review queue and rejected boxes.

    Pure: no file is read or written and the inputs are not modified (the semantic masks are written by
    :func:`write_semantic_masks`; ``semantic_file`` entries point where it writes them).

    Args:
        pool_predictions: The pool's ``predictions.json`` (see :func:`~dataengine.pseudo.calibrate.load_predictions`).
        calibration: Calibrators and thresholds fitted on general val.
        params: The ``filter`` params.
        categories: The output categories; their names must be the teacher's classes in label order
            (normally ``CategoryMap.from_names(class_names)``: ids ``1..K``).
        reviewed: The reviewed pool labels ``calibration`` was re-fitted on (:func:`reviewed_boxes`); a re-fitted
            class may accept beyond its pre-review band only where they support it
            (:func:`~dataengine.pseudo.calibrate.widening_floor`). ``None``: no widening.

    Returns:
        ``(accepted_coco, review_queue, rejected, stats)``, see the module docstring; ``stats`` holds ``images``,
        ``boxes``, ``accepted``, ``review``, ``rejected``, ``rejected_by_reason``, ``images_with_accepted`` and
        ``per_class`` (``{name: {"accepted", "review", "rejected", "threshold"}}``, ``threshold`` the one applied,
        ``None`` for a class that accepts nothing).

    Raises:
        ValueError: Malformed predictions, classes that differ between predictions, calibration and categories, or
            a calibration made for another ``target_precision``.

    Example:
        >>> categories = CategoryMap.from_names(pool["class_names"])  # doctest: +SKIP
        >>> accepted, review, rejected, stats = filter_pseudo_labels(pool, calibration, FilterParams(),
        ...                                                          categories)  # doctest: +SKIP
    """
    check_predictions(pool_predictions, "pool predictions")
    _check_pool(pool_predictions, calibration, params, categories)
    names = list(categories.names)
    images = pool_predictions["images"]
    boxes = pool_predictions["boxes"]
    image_of = {img["file_name"]: i for i, img in enumerate(images)}
    ids = box_ids(boxes)

    n = len(boxes)
    xyxy = np.array([b["bbox"] for b in boxes], dtype=np.float64).reshape(n, 4)  # [N, 4]
    labels = np.array([b["label"] for b in boxes], dtype=np.int64)  # [N]
    scores = np.array([b["score"] for b in boxes], dtype=np.float64)  # [N]
    consistency = np.array([b["consistency"] for b in boxes], dtype=np.float64)  # [N]
    image_idx = np.array([image_of[b["file_name"]] for b in boxes], dtype=np.int64)  # [N]
    prob = calibration.probability(labels, scores, consistency)  # [N]

    reason: list[str | None] = [None] * n
    sides = np.minimum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1])  # [N]
    for i in np.flatnonzero(sides < params.min_box_size):
        reason[i] = "min_box_size"

    # Decreasing p, then raw score, then input order (np.lexsort sorts by its last key first).
    order = np.lexsort((np.arange(n), -scores, -prob))
    candidates = np.array([i for i in order if reason[i] is None], dtype=np.int64)  # [C]
    if len(candidates):
        # NMS ranks by a strictly decreasing stand-in for p, so equal p values cannot reorder (see docstring).
        rank = torch.arange(len(candidates), 0, -1, dtype=torch.float64)  # [C]
        groups = torch.from_numpy(image_idx[candidates] * len(names) + labels[candidates])  # [C] per image and class
        keep = batched_nms(torch.from_numpy(xyxy[candidates]), rank, groups, params.nms_iou)
        kept = np.sort(keep.numpy())  # positions in `candidates`, i.e. in decreasing p
        for i in np.setdiff1d(candidates, candidates[kept]):
            reason[i] = "nms"
        per_image: Counter[int] = Counter()
        for i in candidates[kept]:
            per_image[image_idx[i]] += 1
            if per_image[image_idx[i]] > params.max_per_image:
                reason[i] = "max_per_image"

    alive = np.array([r is None for r in reason], dtype=bool)  # [N]
    # A class re-fitted on reviewed labels accepts what it accepted before review (the val threshold raised for the
    # pool's mix), less where the re-fit says so, more only where reviewed labels below that band support it
    # (calibrate.widening_floor; the module docstring there has the two failures this prevents).
    floors = None
    if any(c.kind == "reviewed" for c in calibration.classes):
        val_only = calibration.before_review()
        before = pool_thresholds(val_only.probability(labels[alive], scores[alive], consistency[alive]),
                                 labels[alive], val_only.thresholds(), params.target_precision)  # [K]
        floors = np.array([widening_floor(c, before[k], reviewed, k, params.target_precision,
                                          params.min_reviewed_accepted) for k, c in enumerate(calibration.classes)])
    acceptable = calibration.acceptable(labels, scores, consistency, floors)  # [N]
    can_accept = alive & acceptable
    class_threshold = pool_thresholds(prob[can_accept], labels[can_accept], calibration.thresholds(),
                                      params.target_precision)
    threshold = class_threshold[labels]  # [N]
    band = ["rejected"] * n
    for i in range(n):
        if reason[i] is not None:
            continue
        if acceptable[i] and prob[i] >= threshold[i]:
            band[i] = "accepted"
        elif prob[i] >= params.review_min_probability:
            band[i] = "review"
        else:
            reason[i] = "low_probability"

    widths = np.array([images[j]["width"] for j in image_idx], dtype=np.float64)
    heights = np.array([images[j]["height"] for j in image_idx], dtype=np.float64)
    box_area = np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)
    risk = review_risk(prob, threshold, params.review_min_probability, box_area, widths * heights, consistency)

    def record(i: int) -> dict[str, Any]:
        img = images[image_idx[i]]
        return {"id": ids[i], "file_name": img["file_name"], "width": img["width"], "height": img["height"],
                "bbox": [float(v) for v in xyxy[i]], "label": int(labels[i]),
                "category_id": categories.ids[labels[i]], "class_name": names[labels[i]],
                "score": float(scores[i]), "probability": float(prob[i]), "consistency": float(consistency[i]),
                "threshold": None if math.isinf(threshold[i]) else float(threshold[i])}

    coco_images = []
    for j, img in enumerate(images):
        entry = {"id": j + 1, "file_name": img["file_name"], "width": img["width"], "height": img["height"]}
        if img.get("seg"):
            entry["semantic_file"] = semantic_file_name(img["file_name"])
        coco_images.append(entry)
    annotations = []
    for i in [i for i in range(n) if band[i] == "accepted"]:
        xywh = [float(v) for v in xyxy_to_coco(xyxy[i])]
        annotations.append({"id": len(annotations) + 1, "image_id": int(image_idx[i]) + 1,
                            "category_id": categories.ids[labels[i]], "bbox": xywh, "area": xywh[2] * xywh[3],
                            "iscrowd": 0, "score": float(scores[i]), "probability": float(prob[i]),
                            "consistency": float(consistency[i]), "pseudo_id": ids[i]})
    accepted_coco: dict[str, Any] = {
        "info": {"description": "dataengine pseudo-labels accepted by the filter stage",
                 "target_precision": calibration.target_precision},
        "images": coco_images, "annotations": annotations, "categories": categories.to_coco(),
    }
    if any("semantic_file" in img for img in coco_images):
        accepted_coco["semantic_root"] = SEMANTIC_ROOT

    review_idx = sorted((i for i in range(n) if band[i] == "review"), key=lambda i: (-risk[i], ids[i]))
    review_queue = [{**record(i), "risk": float(risk[i])} for i in review_idx]
    rejected = [{**record(i), "reason": reason[i]} for i in range(n) if band[i] == "rejected"]

    per_class = {name: {"accepted": 0, "review": 0, "rejected": 0,
                        "threshold": None if math.isinf(t) else float(t)} for name, t in zip(names, class_threshold)}
    for i in range(n):
        per_class[names[labels[i]]][band[i]] += 1
    stats = {
        "images": len(images),
        "boxes": n,
        "accepted": len(annotations),
        "review": len(review_queue),
        "rejected": len(rejected),
        "rejected_by_reason": {r: sum(1 for x in reason if x == r) for r in REJECT_REASONS},
        "images_with_accepted": len({a["image_id"] for a in annotations}),
        "per_class": per_class,
    }
    return accepted_coco, review_queue, rejected, stats


def _audit_key(seed: int, label_id: str) -> str:
    return hashlib.sha256(f"{seed}:{label_id}".encode()).hexdigest()


def audit_sample(accepted_coco: dict[str, Any], per_class: int, seed: int) -> list[dict[str, Any]]:
    """A random sample of accepted labels per class for people to check (see the module docstring).

    Args:
        accepted_coco: The accepted COCO dict (annotations with ``pseudo_id``, ``score``, ``probability``,
            ``consistency``).
        per_class: Labels drawn per class (all of a class's labels when it has fewer).
        seed: The sample's seed.

    Returns:
        Records (``{"id", "file_name", "width", "height", "bbox" (xyxy), "label", "category_id", "class_name",
        "score", "probability", "consistency", "audit_rank"}``) sorted by ``audit_rank`` (0 first).

    Example:
        >>> coco = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        ...         "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        ...         "annotations": [{"image_id": 1, "category_id": c, "bbox": [0, 0, 4, 4], "score": 0.9,
        ...                          "probability": 0.95, "consistency": 1.0, "pseudo_id": f"a.png#{i}"}
        ...                         for i, c in enumerate([1, 1, 1, 2])]}
        >>> [(r["class_name"], r["audit_rank"]) for r in audit_sample(coco, per_class=2, seed=0)]
        [('cat', 0), ('dog', 1), ('cat', 2)]
    """
    cats = CategoryMap.from_coco(accepted_coco)
    by_label: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rec in accepted_records(accepted_coco):
        label = cats.ids.index(rec["category_id"])
        by_label[label].append({**rec, "label": label})
    drawn = [sorted(by_label[k], key=lambda r: _audit_key(seed, r["id"]))[:per_class] for k in range(len(cats.ids))]
    round_robin = [d[j] for j in range(max((len(d) for d in drawn), default=0)) for d in drawn if len(d) > j]
    return [{**rec, "audit_rank": rank} for rank, rec in enumerate(round_robin)]


def audit_metrics(audit: list[dict[str, Any]], verdicts: dict[str, bool]) -> dict[str, Any]:
    """The accepted band's precision as people measured it on the audit sample, per class and overall.

    Args:
        audit: :func:`audit_sample`'s records.
        verdicts: Whether the teacher was right, by label id (:func:`dataengine.review.curate.teacher_verdicts`).

    Returns:
        ``{name: {"sampled", "checked", "right", "precision", "interval95"}, "overall": {...}}``; ``precision`` is
        ``right / checked`` and ``interval95`` its Wilson 95 % interval (``None`` for both with nothing checked).

    Example:
        >>> audit = [{"id": "a#0", "class_name": "cat"}, {"id": "a#1", "class_name": "cat"}]
        >>> audit_metrics(audit, {"a#0": True})["cat"]["precision"]
        1.0
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in audit:
        groups[rec["class_name"]].append(rec)
    groups["overall"] = list(audit)
    out = {}
    for name, recs in groups.items():
        checked = [verdicts[r["id"]] for r in recs if r["id"] in verdicts]
        right = sum(checked)
        interval = None
        if checked:
            ci = binomtest(right, len(checked)).proportion_ci(0.95, method="wilson")
            interval = [round(float(ci.low), 4), round(float(ci.high), 4)]
        out[name] = {"sampled": len(recs), "checked": len(checked), "right": right,
                     "precision": round(right / len(checked), 4) if checked else None, "interval95": interval}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Semantic masks
# ---------------------------------------------------------------------------------------------------------------


def filter_semantic(label: np.ndarray, confidence: np.ndarray, seg_confidence: float,
                    categories: CategoryMap) -> np.ndarray:
    """Semantic classes to a category-id mask whose low-confidence pixels are ignored.

    Args:
        label: uint8 ``[H, W]`` semantic classes (0 background, label + 1).
        confidence: uint8 ``[H, W]``: ``round(255 * max class probability)``.
        seg_confidence: Pixels with ``confidence / 255 < seg_confidence`` become 255.
        categories: Maps label ``k`` (pixel value ``k + 1``) to its category id.

    Returns:
        uint8 ``[H, W]`` of category ids (0 background, 255 ignore): the ``semantic_file`` convention of
        :mod:`dataengine.data.coco`.

    Raises:
        ValueError: Shapes differ, or a class value above ``K``.

    Example:
        >>> filter_semantic(np.array([[0, 1, 2]], np.uint8), np.array([[255, 100, 200]], np.uint8), 0.5,
        ...                 CategoryMap((3, 7), ("cat", "dog"))).tolist()
        [[0, 255, 7]]
    """
    if label.shape != confidence.shape:
        raise ValueError(f"label mask {label.shape} and confidence mask {confidence.shape} differ in shape")
    if label.size and int(label.max()) > len(categories):
        raise ValueError(f"label mask holds class {int(label.max())}, but there are {len(categories)} classes "
                         f"(values 0..{len(categories)})")
    lut = np.array([0, *categories.ids], dtype=np.uint8)
    out = lut[label]
    out[confidence.astype(np.float64) / 255.0 < seg_confidence] = IGNORE_INDEX
    return out


def _read_png(path: Path, width: int, height: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"segmentation PNG not found: {path}")
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2 or arr.dtype != np.uint8 or arr.shape != (height, width):
        raise ValueError(f"{path}: expected a single-channel uint8 PNG of {height}x{width}, got "
                         f"{arr.dtype} {arr.shape}")
    return arr


def write_semantic_masks(pool_predictions: dict[str, Any], predictions_dir: str | Path, out_dir: str | Path,
                         seg_confidence: float, categories: CategoryMap) -> int:
    """Write the filtered mask of every pool image with segmentation to ``<out_dir>/semantic/<file_name>.png``.

    A previous run's ``<out_dir>/semantic`` is removed first, so no mask of an image that left the pool stays.

    Args:
        pool_predictions: The pool's ``predictions.json``.
        predictions_dir: Its folder (the ``seg`` paths are relative to it).
        out_dir: The filter output folder.
        seg_confidence: See :func:`filter_semantic`.
        categories: The output categories.

    Returns:
        The number of masks written.

    Raises:
        FileNotFoundError: A segmentation PNG is missing (its path in the message).
        ValueError: A PNG of the wrong size or mode, or a path that escapes its folder.

    Example:
        >>> write_semantic_masks(pool, "data/pseudo/pool", "data/filtered", 0.7, categories)  # doctest: +SKIP
        600
    """
    predictions_dir, root = Path(predictions_dir), Path(out_dir) / SEMANTIC_ROOT
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    written = 0
    for img in pool_predictions["images"]:
        seg = img.get("seg")
        if not seg:
            continue
        w, h = int(img["width"]), int(img["height"])
        label = _read_png(safe_join(predictions_dir, seg["label"]), w, h)
        confidence = _read_png(safe_join(predictions_dir, seg["confidence"]), w, h)
        mask = filter_semantic(label, confidence, seg_confidence, categories)
        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, format="PNG")
        atomic_write_bytes(safe_join(root, semantic_file_name(img["file_name"])), buf.getvalue())
        written += 1
    return written


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def pseudo_metrics(stats: dict[str, Any], accepted_coco: dict[str, Any], calibration: Calibration,
                   images_per_second: float | None) -> dict[str, Any]:
    """The stage's metrics that need no hidden labels (``metrics/pseudo.json`` without the diagnostic keys).

    Args:
        stats: :func:`filter_pseudo_labels`'s stats.
        accepted_coco: Its accepted COCO dict.
        calibration: The calibration used.
        images_per_second: The ``pseudo_label`` stage's speed, if known.

    Returns:
        ``images``, ``images_per_second``, ``accepted``, ``review``, ``rejected``, ``rejected_by_reason``,
        ``per_class`` (``{name: {"accepted", "review", "rejected", "threshold" (applied), "val_threshold",
        "calibration" (kind), "val_boxes", "reviewed" (the review evidence of a re-calibrated class, else
        ``None``)}}``) and
        ``estimated_precision`` (``{name: mean p of its accepted boxes, "overall": ...}``, ``None`` without boxes).

    Example:
        >>> m = pseudo_metrics(stats, accepted, calibration, None)  # doctest: +SKIP
        >>> m["estimated_precision"]["overall"]  # doctest: +SKIP
        0.93
    """
    by_category: dict[int, list[float]] = defaultdict(list)
    for ann in accepted_coco["annotations"]:
        by_category[ann["category_id"]].append(float(ann["probability"]))
    cats = CategoryMap.from_coco(accepted_coco)
    estimated = {name: _mean_or_none(by_category[cid]) for cid, name in zip(cats.ids, cats.names)}
    estimated["overall"] = _mean_or_none([p for ps in by_category.values() for p in ps])
    per_class = {c.name: {**stats["per_class"][c.name],
                          "val_threshold": c.reviewed.val_threshold if c.reviewed else c.threshold,
                          "calibration": c.kind, "val_boxes": c.val_boxes,
                          "reviewed": c.reviewed.to_dict() if c.reviewed else None} for c in calibration.classes}
    return {
        "images": stats["images"],
        "images_per_second": images_per_second,
        "accepted": stats["accepted"],
        "review": stats["review"],
        "rejected": stats["rejected"],
        "rejected_by_reason": dict(stats["rejected_by_reason"]),
        "per_class": per_class,
        "estimated_precision": estimated,
    }


# ===============================================================================================================
# DIAGNOSTIC ONLY: reads the pool's hidden labels (scenario/pool_hidden.json, demo and BCCD profile).
# Nothing above depends on it; the pipeline calls it after every decision is written, only to report how honest
# the estimated precision was.
# ===============================================================================================================


def _per_class_and_overall(result: dict[str, Any], key: str) -> dict[str, float | None]:
    out = {name: v[key] for name, v in result["per_class"].items()}
    out["overall"] = result[key]
    return out


def diagnostic_metrics(accepted_coco: dict[str, Any], review_queue: list[dict[str, Any]], hidden_path: str | Path,
                       match_iou: float, estimated_precision: dict[str, float | None]) -> dict[str, Any]:
    """True quality of the accepted and review bands against the pool's hidden labels (diagnostic only).

    Matching is :func:`~dataengine.evaluation.precision_recall_at` (class-aware, one-to-one, at ``match_iou``),
    run separately for the accepted band and for the review band; hidden labels of images that were not labelled
    (skipped by the ``pseudo_label`` stage) are left out and counted.

    Args:
        accepted_coco: The accepted COCO dict.
        review_queue: The review records.
        hidden_path: ``scenario/pool_hidden.json`` (COCO, ``file_name`` relative to the pool root, the same class
            names).
        match_iou: IoU for a true positive (``filter.match_iou``, as in calibration).
        estimated_precision: :func:`pseudo_metrics`'s ``estimated_precision``.

    Returns:
        ``true_precision``, ``true_recall``, ``review_true_precision`` (each ``{name: v, "overall": v}``),
        ``precision_gap`` (estimated - true, ``None`` where either is undefined) and ``hidden_labels``
        (``{"images", "objects", "images_not_labelled"}``).

    Raises:
        ValueError: The hidden labels' class names differ from the accepted categories (both lists named).

    Example:
        >>> diagnostic_metrics(accepted, review, "data/prepared/scenario/pool_hidden.json", 0.5,
        ...                    metrics["estimated_precision"])["true_precision"]["overall"]  # doctest: +SKIP
        0.91
    """
    hidden = load_coco(hidden_path)
    cats = CategoryMap.from_coco(accepted_coco)
    hidden_cats = CategoryMap.from_coco(hidden)
    if sorted(hidden_cats.names) != sorted(cats.names):
        raise ValueError(f"{hidden_path}: classes {list(hidden_cats.names)} differ from the pseudo-labels' classes "
                         f"{list(cats.names)}")
    category_of = {hid: cats.ids[cats.names.index(name)] for hid, name in zip(hidden_cats.ids, hidden_cats.names)}
    image_of = {img["file_name"]: img["id"] for img in accepted_coco["images"]}
    hidden_files = {img["id"]: img["file_name"] for img in hidden["images"]}
    anns = [{"id": k, "image_id": image_of[hidden_files[a["image_id"]]], "category_id": category_of[a["category_id"]],
             "bbox": a["bbox"], "iscrowd": a.get("iscrowd", 0)}
            for k, a in enumerate(hidden["annotations"], start=1) if hidden_files.get(a["image_id"]) in image_of]
    gt = {"images": [{"id": img["id"]} for img in accepted_coco["images"]], "annotations": anns,
          "categories": [{"id": cid, "name": name} for cid, name in zip(cats.ids, cats.names)]}

    accepted = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": a["probability"]} for a in accepted_coco["annotations"]]
    review = [{"image_id": image_of[r["file_name"]], "category_id": r["category_id"],
               "bbox": [float(v) for v in xyxy_to_coco(r["bbox"])], "score": r["probability"]} for r in review_queue]
    acc = precision_recall_at(gt, accepted, iou=match_iou)
    rev = precision_recall_at(gt, review, iou=match_iou)
    true_precision = _per_class_and_overall(acc, "precision")
    gap = {k: (None if estimated_precision.get(k) is None or v is None else estimated_precision[k] - v)
           for k, v in true_precision.items()}
    return {
        "true_precision": true_precision,
        "true_recall": _per_class_and_overall(acc, "recall"),
        "review_true_precision": _per_class_and_overall(rev, "precision"),
        "precision_gap": gap,
        "hidden_labels": {"images": len(hidden["images"]), "objects": len(anns),
                          "images_not_labelled": sum(1 for f in hidden_files.values() if f not in image_of)},
    }
