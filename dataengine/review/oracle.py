"""A simulated reviewer: review decisions made from a pool's hidden labels, for benchmarks only.

The engine's mining and curation signal is what people decide in the review tools. To measure what that signal
is worth without a person, benchmarks (``benchmarks/distill_ablation.py --oracle-review N``) let this module play
the reviewer on data whose true labels are known but hidden from the pipeline (the demo pool's
``scenario/pool_hidden.json``, the BCCD pool). Its decisions carry ``"source": "simulated"`` so they can never be
mistaken for a person's, and the pipeline itself never calls it.

The simulated reviewer works like a careful person going down the review queue, image by image, highest risk first
(the order of ``review_queue.json``): for each of the first ``n_images`` images it looks at *every* pseudo-label
of the image (accepted, in review and rejected-but-confident, as the FiftyOne views show them) and

- ``accept``: the label matches a true object of its class (IoU >= ``match_iou``);
- ``correct``: it matches a true object of another class (the class and box are set to the true ones);
- ``reject``: it matches no true object (a confuser, a textured background, a duplicate);
- adds the true objects no label found (``added``);
- flags the image ``negative`` when it has no true object but the teacher put boxes on it.

Matching is greedy by score, one label per true object (a duplicate of a found object is rejected), as COCO
evaluation matches detections.

Example:
    >>> decisions, stats = simulate_review(queue, accepted, rejected, hidden, n_images=100)  # doctest: +SKIP
    >>> stats["rejected"]  # doctest: +SKIP
    87
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.ops import box_iou

from dataengine.boxes import coco_to_xyxy
from dataengine.review.decisions import empty_decisions, image_decision, label_decision, validate_decisions

__all__ = ["simulate_review", "reviewable_labels", "review_plan", "SIMULATED_SOURCE"]

SIMULATED_SOURCE = "simulated"
"""The ``source`` of every simulated decision (people's decisions say ``fiftyone`` or ``labelstudio``)."""


def reviewable_labels(accepted: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                      min_rejected_score: float) -> dict[str, list[dict[str, Any]]]:
    """Every pseudo-label a reviewer sees, per file: ``{"id", "bbox" (xyxy), "class_name", "score"}``."""
    names = {c["id"]: c["name"] for c in accepted["categories"]}
    files = {img["id"]: img["file_name"] for img in accepted["images"]}
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for ann in accepted["annotations"]:
        x, y, w, h = ann["bbox"]
        out[files[ann["image_id"]]][ann["pseudo_id"]] = {
            "id": ann["pseudo_id"], "bbox": [x, y, x + w, y + h], "class_name": names[ann["category_id"]],
            "score": float(ann.get("score", 1.0))}
    for rec in records:
        if rec.get("reason") is not None and float(rec["score"]) < min_rejected_score:
            continue  # a rejected record the views do not show (low score)
        out[rec["file_name"]].setdefault(rec["id"], {"id": rec["id"], "bbox": list(rec["bbox"]),
                                                      "class_name": rec["class_name"], "score": float(rec["score"])})
    return {name: sorted(labels.values(), key=lambda r: -r["score"]) for name, labels in out.items()}


def review_plan(queue: Sequence[Mapping[str, Any]], audit: Sequence[Mapping[str, Any]],
                queue_images: int) -> tuple[list[Mapping[str, Any]], int]:
    """What a reviewer goes through: the audit's images (if any), then the first ``queue_images`` queued images.

    Returns:
        ``(records, n_images)`` to pass to :func:`simulate_review` as ``queue`` and ``n_images``.

    Example:
        >>> queue = [{"file_name": "q1"}, {"file_name": "a1"}, {"file_name": "q2"}]
        >>> records, n = review_plan(queue, [{"file_name": "a1"}], queue_images=2)
        >>> [r["file_name"] for r in records], n
        (['a1', 'q1', 'a1'], 2)
    """
    images = list(dict.fromkeys(r["file_name"] for r in queue))[:queue_images]
    keep = set(images)
    records = [*audit, *(r for r in queue if r["file_name"] in keep)]
    return records, len({r["file_name"] for r in records})


def _truth_by_image(hidden: Mapping[str, Any]) -> dict[str, list[tuple[list[float], str]]]:
    names = {c["id"]: c["name"] for c in hidden["categories"]}
    by_id: dict[int, list[tuple[list[float], str]]] = defaultdict(list)
    for ann in hidden["annotations"]:
        by_id[ann["image_id"]].append(([float(v) for v in coco_to_xyxy(list(ann["bbox"]))],
                                       names[ann["category_id"]]))
    return {img["file_name"]: by_id.get(img["id"], []) for img in hidden["images"]}


def simulate_review(
    queue: Sequence[Mapping[str, Any]],
    accepted: Mapping[str, Any],
    rejected: Sequence[Mapping[str, Any]],
    hidden: Mapping[str, Any],
    *,
    n_images: int,
    match_iou: float = 0.5,
    min_rejected_score: float = 0.5,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Decisions of a simulated reviewer on the first ``n_images`` images of the review queue.

    Args:
        queue: ``review_queue.json`` (records ranked by risk; the image order is the order of first appearance).
        accepted: ``accepted.json`` (COCO with ``pseudo_id`` per annotation).
        rejected: ``rejected.json`` records; those scoring at least ``min_rejected_score`` are looked at too (the
            App's ``rejected_confident`` view).
        hidden: The pool's true labels (COCO, same ``file_name`` values).
        n_images: How many queued images the reviewer gets through.
        match_iou: IoU for a label to count as a true object.
        min_rejected_score: See ``rejected``.

    Returns:
        ``(decisions, stats)``: a valid decisions document (:mod:`dataengine.review.decisions`, every entry
        ``source="simulated"``) and counts ``images``, ``accepted``, ``rejected``, ``corrected``, ``added``,
        ``negative``.

    Raises:
        KeyError: A queued image is not in ``hidden`` (the hidden labels are for another pool).
    """
    order: list[str] = []
    for rec in queue:
        if rec["file_name"] not in order:
            order.append(rec["file_name"])
    labels = reviewable_labels(accepted, [*queue, *rejected], min_rejected_score)
    truth = _truth_by_image(hidden)
    doc = empty_decisions()
    stats = dict.fromkeys(("images", "accepted", "rejected", "corrected", "added", "negative"), 0)
    for file_name in order[:n_images]:
        if file_name not in truth:
            raise KeyError(f"queued image {file_name!r} is not in the hidden labels")
        objects, shown = truth[file_name], labels.get(file_name, [])
        stats["images"] += 1
        found = [False] * len(objects)
        iou = torch.zeros(len(shown), len(objects))  # [labels, objects]
        if objects and shown:
            iou = box_iou(torch.tensor([s["bbox"] for s in shown]), torch.tensor([b for b, _ in objects]))
        for i, label in enumerate(shown):
            best, best_iou = None, match_iou
            for j, (_, cls) in enumerate(objects):  # same class first, then any class
                if not found[j] and cls == label["class_name"] and float(iou[i, j]) >= best_iou:
                    best, best_iou = j, float(iou[i, j])
            if best is None:
                for j in range(len(objects)):
                    if not found[j] and float(iou[i, j]) >= best_iou:
                        best, best_iou = j, float(iou[i, j])
            original = {"bbox": label["bbox"], "class_name": label["class_name"]}
            if best is None:
                decision = label_decision(file_name, "reject", source=SIMULATED_SOURCE, original=original)
                stats["rejected"] += 1
            elif objects[best][1] == label["class_name"]:
                decision = label_decision(file_name, "accept", source=SIMULATED_SOURCE, original=original)
                stats["accepted"] += 1
            else:
                decision = label_decision(file_name, "correct", source=SIMULATED_SOURCE, bbox=objects[best][0],
                                          class_name=objects[best][1], original=original)
                stats["corrected"] += 1
            if best is not None:
                found[best] = True
            doc["labels"][label["id"]] = decision
        added = [{"bbox": box, "class_name": cls} for (box, cls), hit in zip(objects, found) if not hit]
        flags = ["negative"] if not objects and shown else []
        if added or flags:
            doc["images"][file_name] = image_decision(source=SIMULATED_SOURCE, flags=flags, added=added)
            stats["added"] += len(added)
            stats["negative"] += len(flags)
    return validate_decisions(doc), stats
