"""The ``review`` stage: apply the reviewers' decisions to the accepted pseudo-labels -> the curated set.

Deterministic: the output depends only on the filter's outputs and the versioned decisions file
(:mod:`dataengine.review.decisions`), never on a review tool being reachable. With no decision the accepted set
passes through unchanged.

Rules, per pool image (the filter's accepted band is the starting point):

- a label decision is applied to the label its id names, in any band (a reviewer may promote a *rejected* but
  confident box, or remove an *accepted* one):
  ``accept`` -> the label is in the curated set (promoted from review/rejected, or confirmed if it was accepted);
  ``reject`` -> it is not; ``correct`` -> the corrected box and class are, in place of the teacher's;
- **stale decisions**: a decision records the box and class the reviewer saw (``original``). If the label under
  that id is now a different box (the teacher or the filter changed since the review: ids are positions in the
  teacher's output), the decision is re-attached to the current label of the image with the same class and
  IoU >= 0.5 with the original (the best one); with none, an ``accept``/``correct`` still adds the person's box
  (a person verified it) and a ``reject`` has nothing to remove. Both cases are counted in the metrics;
- ``added`` boxes of an image are added;
- image flag ``negative``: a verified hard negative: every box is removed and the whole semantic mask is
  background, whatever the decisions on its labels (marked ``"negative": true`` on the image);
- image flag ``relabel``: the labels are not usable as they are: the image leaves the curated set (listed in the
  metrics) until someone relabels it;
- semantic masks: pixels of a rejected or corrected label's class inside its original box become 255 (ignored:
  the teacher's mask there is as doubtful as its box), except, for a **rejected** label, the pixels that no curated
  box of the image covers: the reviewer verified there is no object there, so they become background (0), and the
  ``mine`` stage finds them as hard negative pixels (the teacher said foreground); a negative's mask is all 0.

Annotations keep ``score``/``probability``/``pseudo_id`` where they come from the teacher and carry
``"source"``: ``"pseudo"`` (accepted by the filter, no person involved) or ``"review"`` (a person accepted, corrected
or drew it); images a person decided on carry ``"reviewed": true``.

Metrics (:func:`review_metrics`): counts per decision and flag, labels a person changed (reject + correct + added),
stale decisions, the curated set's size per class, and **the teacher's precision as the reviewers measured it**:
among the labels a person decided on, the share that was right (accepted, or corrected to the same class with
IoU >= 0.5 to the teacher's box), overall, per class and per filter band.

Example:
    >>> curated, stats = curate(accepted_coco, records_by_id, empty_decisions(), masks_in, masks_out)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from dataengine.boxes import xyxy_to_coco
from dataengine.data.coco import IGNORE_INDEX
from dataengine.io import atomic_write_bytes, safe_join

__all__ = ["curate", "review_metrics", "teacher_verdicts", "STALE_IOU", "CORRECT_IOU"]

STALE_IOU = 0.5  # a decision's original box re-attaches to a current box of the same class at this IoU
CORRECT_IOU = 0.5  # a correction this close to the teacher's box (same class) still counts the teacher as right


def _iou(a: list[float], b: list[float]) -> float:
    return float(box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0])


def _resolve(decision: Mapping[str, Any], lid: str, records: Mapping[str, Mapping[str, Any]],
             by_image: Mapping[str, list[str]]) -> tuple[str | None, bool]:
    """The id of the current label a decision applies to, and whether it had to be re-attached (stale)."""
    original = decision.get("original")
    record = records.get(lid)
    if record is not None and (original is None or (record["class_name"] == original["class_name"]
                                                     and _iou(record["bbox"], original["bbox"]) >= 0.99)):
        return lid, False
    if original is None:
        return None, True
    best, best_iou = None, STALE_IOU
    for other in by_image.get(decision["file_name"], []):
        cand = records[other]
        if cand["class_name"] == original["class_name"]:
            iou = _iou(cand["bbox"], original["bbox"])
            if iou >= best_iou:
                best, best_iou = other, iou
    return best, True


def curate(
    accepted_coco: dict[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    decisions: Mapping[str, Any],
    semantic_in: str | Path | None,
    semantic_out: str | Path | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build the curated COCO (and masks) from the accepted set and the decisions.

    Args:
        accepted_coco: The filter's ``accepted.json`` (not modified).
        records: Every label of the pool by id, all bands (accepted, review, rejected), as records
            (:mod:`dataengine.review.inputs`).
        decisions: A validated decisions document.
        semantic_in: Folder of the filtered masks (``accepted.json``'s ``semantic_root``), or ``None``.
        semantic_out: Folder to write the curated masks to (emptied first), or ``None`` for no masks.

    Returns:
        ``(curated_coco, stats)``; ``stats`` feeds :func:`review_metrics`.

    Raises:
        ValueError: A decision names a class or an image the pool does not have (the message names it).
    """
    categories = accepted_coco["categories"]
    cat_id = {c["name"]: c["id"] for c in categories}
    images = {img["file_name"]: img for img in accepted_coco["images"]}
    accepted_ids = {ann["pseudo_id"] for ann in accepted_coco["annotations"]}
    by_image: dict[str, list[str]] = defaultdict(list)
    for lid, rec in records.items():
        by_image[rec["file_name"]].append(lid)

    # Final label set per image: id -> (bbox xyxy, class name, source, teacher record or None)
    chosen: dict[str, dict[str, tuple[list[float], str, str, Mapping[str, Any] | None]]] = defaultdict(dict)
    for ann in accepted_coco["annotations"]:
        rec = records[ann["pseudo_id"]]
        chosen[rec["file_name"]][ann["pseudo_id"]] = (list(rec["bbox"]), rec["class_name"], "pseudo", rec)
    # image -> (box, class, rejected) of the labels whose pixels leave the masks (see the module's rules)
    removed: dict[str, list[tuple[list[float], str, bool]]] = defaultdict(list)
    stats: dict[str, Any] = {"decisions": Counter(), "stale": 0, "stale_unmatched": 0, "reviewed": [],
                             "flags": Counter(), "added": 0, "excluded_relabel": []}

    for lid in sorted(decisions.get("labels", {})):
        decision = decisions["labels"][lid]
        name = decision["file_name"]
        if name not in images:
            raise ValueError(f"decisions: label {lid!r} refers to image {name!r}, which is not in the pool")
        if decision["decision"] == "correct" and decision["class_name"] not in cat_id:
            raise ValueError(f"decisions: label {lid!r} is corrected to class {decision['class_name']!r}; "
                             f"known classes: {', '.join(cat_id)}")
        stats["decisions"][decision["decision"]] += 1
        target, stale = _resolve(decision, lid, records, by_image)
        stats["stale"] += int(stale)
        seen = records[target] if target is not None else None
        original = decision.get("original") or (
            {"bbox": seen["bbox"], "class_name": seen["class_name"]} if seen else None)
        if target is None:
            stats["stale_unmatched"] += 1
        else:
            band = "accepted" if target in accepted_ids else records[target].get("band", "review")
            stats["reviewed"].append({"band": band, "decision": decision, "teacher": dict(seen)})
            chosen[name].pop(target, None)
        key = target or lid
        if decision["decision"] == "accept" and original is not None:
            box = list(seen["bbox"]) if seen is not None else list(original["bbox"])
            cls = seen["class_name"] if seen is not None else original["class_name"]
            chosen[name][key] = (box, cls, "review", seen)
        elif decision["decision"] == "correct":
            chosen[name][key] = (list(decision["bbox"]), decision["class_name"], "review", seen)
            if original is not None:
                removed[name].append((list(original["bbox"]), original["class_name"], False))
        elif decision["decision"] == "reject" and original is not None:
            removed[name].append((list(original["bbox"]), original["class_name"], True))

    for name in sorted(decisions.get("images", {})):
        entry = decisions["images"][name]
        if name not in images:
            raise ValueError(f"decisions: image {name!r} is not in the pool")
        for j, box in enumerate(entry.get("added", [])):
            if box["class_name"] not in cat_id:
                raise ValueError(f"decisions: a box added to {name!r} has unknown class {box['class_name']!r}; "
                                 f"known classes: {', '.join(cat_id)}")
            chosen[name][f"{name}+added{j}"] = (list(box["bbox"]), box["class_name"], "review", None)
            stats["added"] += 1
        for flag in entry.get("flags", []):
            stats["flags"][flag] += 1

    flags = {name: set(e.get("flags", [])) for name, e in decisions.get("images", {}).items()}
    reviewed_images = {d["file_name"] for d in decisions.get("labels", {}).values()} | set(flags)
    out_images, out_anns = [], []
    if semantic_out is not None:
        semantic_out = Path(semantic_out)
        if semantic_out.exists():
            shutil.rmtree(semantic_out)
        semantic_out.mkdir(parents=True)
    for image_id, (name, img) in enumerate(sorted(images.items()), start=1):
        if "relabel" in flags.get(name, set()):
            stats["excluded_relabel"].append(name)
            continue
        negative = "negative" in flags.get(name, set())
        new_img = {"id": image_id, "file_name": name, "width": img["width"], "height": img["height"]}
        if negative:
            new_img["negative"] = True
        if name in reviewed_images:
            new_img["reviewed"] = True
        if img.get("semantic_file") and semantic_in is not None and semantic_out is not None:
            kept = [box for box, *_ in chosen.get(name, {}).values()]
            _write_mask(Path(semantic_in), semantic_out, img, removed.get(name, []), kept, cat_id, negative)
            new_img["semantic_file"] = img["semantic_file"]
        out_images.append(new_img)
        if negative:
            continue
        for key, (box, cls, source, rec) in sorted(chosen.get(name, {}).items()):
            x, y, w, h = (round(float(v), 2) for v in xyxy_to_coco([box])[0])
            ann = {"id": len(out_anns) + 1, "image_id": image_id, "category_id": cat_id[cls], "bbox": [x, y, w, h],
                   "area": round(w * h, 2), "iscrowd": 0, "source": source}
            if rec is not None:
                ann.update({"pseudo_id": rec["id"], "score": rec.get("score"), "probability": rec.get("probability")})
            out_anns.append(ann)
    curated = {
        "info": {"description": "dataengine curated scenario set: accepted pseudo-labels + reviewers' decisions"},
        "images": out_images,
        "annotations": out_anns,
        "categories": categories,
    }
    if semantic_out is not None:
        curated["semantic_root"] = semantic_out.name
    name_of = {cid: name for name, cid in cat_id.items()}
    stats["curated_per_class"] = Counter(name_of[a["category_id"]] for a in out_anns)
    stats["from_review"] = sum(a["source"] == "review" for a in out_anns)
    stats["negatives"] = sum(bool(i.get("negative")) for i in out_images)
    return curated, stats


def _box_slices(box: list[float], h: int, w: int) -> tuple[slice, slice]:
    """Rows and columns of every pixel a box ``xyxy`` touches (``floor`` / ``ceil``), clipped to the image."""
    x1, y1, x2, y2 = box
    return (slice(max(0, int(np.floor(y1))), min(h, int(np.ceil(y2)))),
            slice(max(0, int(np.floor(x1))), min(w, int(np.ceil(x2)))))


def _write_mask(root_in: Path, root_out: Path, img: Mapping[str, Any], removed: list[tuple[list[float], str, bool]],
                kept: list[list[float]], cat_id: Mapping[str, int], negative: bool) -> None:
    with Image.open(safe_join(root_in, img["semantic_file"])) as im:
        mask = np.array(im)
    if negative:
        mask[:] = 0
    h, w = mask.shape
    covered = np.zeros((h, w), dtype=bool)  # pixels some curated box of the image touches
    for box in kept:
        covered[_box_slices(box, h, w)] = True
    for box, cls, rejected in removed:
        ys, xs = _box_slices(box, h, w)
        region = mask[ys, xs]
        of_class = region == cat_id[cls]
        region[of_class & covered[ys, xs]] = IGNORE_INDEX
        region[of_class & ~covered[ys, xs]] = 0 if rejected else IGNORE_INDEX
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    atomic_write_bytes(safe_join(root_out, img["semantic_file"]), buf.getvalue(), fsync=False)


def _teacher_right(entry: Mapping[str, Any]) -> bool:
    decision, teacher = entry["decision"], entry["teacher"]
    if decision["decision"] == "accept":
        return True
    if decision["decision"] == "correct":
        return decision["class_name"] == teacher["class_name"] and _iou(decision["bbox"], teacher["bbox"]) >= CORRECT_IOU
    return False


def teacher_verdicts(decisions: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
    """Whether the teacher was right about each label a person decided on, by the label's *current* id.

    A decision is re-attached to the current label as :func:`curate` does (stale decisions by class and IoU);
    one that matches no current label says nothing about the teacher's current output and is left out. The
    teacher was right when the label was accepted, or corrected to the same class with IoU >= ``CORRECT_IOU``
    (as in :func:`review_metrics`). Image flags are not verdicts on single labels and are not read.

    Args:
        decisions: A validated decisions document.
        records: The teacher's current labels by id: ``{"file_name", "bbox" (xyxy), "class_name"}``.

    Returns:
        ``{label id: right}`` for every decided label that exists now.

    Example:
        >>> rec = {"a.png#0": {"file_name": "a.png", "bbox": [0, 0, 10, 10], "class_name": "cat"}}
        >>> teacher_verdicts({"labels": {"a.png#0": {"file_name": "a.png", "decision": "reject"}}}, rec)
        {'a.png#0': False}
    """
    by_image: dict[str, list[str]] = defaultdict(list)
    for lid, rec in records.items():
        by_image[rec["file_name"]].append(lid)
    out: dict[str, bool] = {}
    for lid in sorted(decisions.get("labels", {})):
        decision = decisions["labels"][lid]
        target, _ = _resolve(decision, lid, records, by_image)
        if target is not None:
            out[target] = _teacher_right({"decision": decision, "teacher": records[target]})
    return out


def review_metrics(stats: Mapping[str, Any], decisions: Mapping[str, Any], curated: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics/review.json``: what the people decided and what it says about the teacher (module docstring)."""
    def precision(entries: list[Mapping[str, Any]]) -> float | None:
        return round(sum(_teacher_right(e) for e in entries) / len(entries), 4) if entries else None

    reviewed = stats["reviewed"]
    per_class: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    per_band: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in reviewed:
        per_class[entry["teacher"]["class_name"]].append(entry)
        per_band[entry["band"]].append(entry)
    sources = Counter(e["source"] for section in ("labels", "images") for e in decisions.get(section, {}).values())
    decided = stats["decisions"]
    return {
        "decisions": {k: int(decided.get(k, 0)) for k in ("accept", "reject", "correct")}
        | {"added": int(stats["added"])} | {k: int(stats["flags"].get(k, 0)) for k in ("negative", "relabel")},
        "by_source": dict(sorted(sources.items())),
        "labels_changed_by_person": int(decided.get("reject", 0) + decided.get("correct", 0) + stats["added"]),
        "stale_decisions": int(stats["stale"]),
        "stale_unmatched": int(stats["stale_unmatched"]),
        "reviewed_labels": len(reviewed),
        "teacher_precision_reviewed": precision(reviewed),
        "teacher_precision_reviewed_per_class": {k: precision(v) for k, v in sorted(per_class.items())},
        "teacher_precision_reviewed_per_band": {k: {"labels": len(v), "precision": precision(v)}
                                                for k, v in sorted(per_band.items())},
        "curated": {
            "images": len(curated["images"]),
            "annotations": len(curated["annotations"]),
            "from_review": int(stats["from_review"]),
            "negatives": int(stats["negatives"]),
            "excluded_relabel": len(stats["excluded_relabel"]),
            "per_class": {c["name"]: int(stats["curated_per_class"].get(c["name"], 0)) for c in curated["categories"]},
        },
    }
