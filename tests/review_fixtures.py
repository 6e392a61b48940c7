"""A small, hand-built tree of pipeline outputs (prepare, pseudo_label, filter) for the review tests.

Three pool images of 64x48 (width != height, so a swapped axis in a percent or relative conversion shows), one in a
nested folder and one ``.jpg``; eight teacher boxes; every band populated::

    a.png      #0 accepted circle   #1 review square   #2 rejected circle (confident: score 0.6)
    sub/b.jpg  #0 accepted square   #1 review circle   #2 review square
    c.png      #0 review circle     (no accepted box: a candidate hard negative)   #1 rejected square (score 0.1)

Segmentation: every image has label / confidence / uncertainty PNGs and a filtered semantic mask. General ground
truth: one image with one circle. ``audit`` (accepted label ids, in rank order) also writes the filter's
``audit.json``; without it there is none, as in filter outputs older than the audit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["W", "H", "CLASSES", "BOXES", "make_review_tree"]

W, H = 64, 48
CLASSES = ["circle", "square"]
# file_name -> list of (bbox xyxy, class index, score, consistency, band, probability, risk)
BOXES: dict[str, list[tuple[list[float], int, float, float, str, float, float | None]]] = {
    "a.png": [
        ([4.0, 6.0, 20.0, 22.0], 0, 0.92, 0.97, "accepted", 0.95, None),
        ([30.0, 10.0, 50.0, 30.0], 1, 0.45, 0.70, "review", 0.55, 0.9),
        ([40.0, 30.0, 60.0, 46.0], 0, 0.60, 0.40, "rejected", 0.10, None),
    ],
    "sub/b.jpg": [
        ([10.0, 10.0, 30.0, 30.0], 1, 0.88, 0.95, "accepted", 0.93, None),
        ([34.0, 4.0, 54.0, 24.0], 0, 0.40, 0.60, "review", 0.45, 0.7),
        ([2.0, 28.0, 18.0, 44.0], 1, 0.35, 0.80, "review", 0.40, 0.5),
    ],
    "c.png": [
        ([20.0, 12.0, 44.0, 36.0], 0, 0.50, 0.90, "review", 0.50, 0.3),
        ([0.0, 0.0, 10.0, 10.0], 1, 0.10, 0.50, "rejected", 0.05, None),
    ],
}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_review_tree(root: str | Path, audit: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the tree under ``root``; returns ``{"filtered", "pseudo", "prepared", "decisions"}`` paths.

    Args:
        root: Where to write.
        audit: Label ids for ``filtered/audit.json``, ``audit_rank`` 0, 1, ... in this order; ``None``: no file.
    """
    root = Path(root)
    prepared, pseudo, filtered = root / "prepared", root / "pseudo", root / "filtered"
    pool = prepared / "scenario" / "pool"
    rng = np.random.default_rng(0)
    images, boxes, accepted_images, annotations, review, rejected = [], [], [], [], [], []
    records = {}
    for image_id, (name, items) in enumerate(BOXES.items(), start=1):
        pixels = (rng.random((H, W, 3)) * 255).astype(np.uint8)
        path = pool / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95) if name.endswith(".jpg") else _png(path, pixels)
        label = np.zeros((H, W), np.uint8)
        for bbox, cls, *_ in items[:1]:
            x1, y1, x2, y2 = (int(v) for v in bbox)
            label[y1:y2, x1:x2] = cls + 1
        seg = {k: f"seg/{name}.{k}.png" for k in ("label", "confidence", "uncertainty")}
        _png(pseudo / "pool" / seg["label"], label)
        _png(pseudo / "pool" / seg["confidence"], np.full((H, W), 230, np.uint8))
        _png(pseudo / "pool" / seg["uncertainty"], np.full((H, W), 40, np.uint8))
        semantic = label.copy()
        semantic[:2, :] = 255  # a strip of ignored (low-confidence) pixels
        _png(filtered / "semantic" / f"{name}.png", semantic)
        images.append({"file_name": name, "width": W, "height": H, "seg": seg})
        accepted_images.append({"id": image_id, "file_name": name, "width": W, "height": H,
                                "semantic_file": f"{name}.png"})
        for i, (bbox, cls, score, consistency, band, probability, risk) in enumerate(items):
            boxes.append({"file_name": name, "bbox": bbox, "label": cls, "category_id": cls + 1, "score": score,
                          "consistency": consistency, "score_std": 0.02, "views": 4})
            record = {"id": f"{name}#{i}", "file_name": name, "width": W, "height": H, "bbox": bbox, "label": cls,
                      "category_id": cls + 1, "class_name": CLASSES[cls], "score": score,
                      "probability": probability, "consistency": consistency, "threshold": 0.8}
            records[record["id"]] = record
            if band == "accepted":
                x1, y1, x2, y2 = bbox
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0, "score": score, "probability": probability,
                                    "consistency": consistency, "pseudo_id": f"{name}#{i}"})
            elif band == "review":
                review.append({**record, "risk": risk})
            else:
                rejected.append({**record, "reason": "low_probability"})
    review.sort(key=lambda r: -r["risk"])
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(CLASSES)]
    _json(pseudo / "pool" / "predictions.json", {
        "images": images, "boxes": boxes, "skipped": [], "class_names": CLASSES, "category_ids": [1, 2],
        "model": {"name": "tiny", "num_classes": 2}, "tta": {}, "fingerprint": "f" * 64})
    _json(filtered / "accepted.json", {"info": {"description": "fixture"}, "images": accepted_images,
                                       "annotations": annotations, "categories": categories,
                                       "semantic_root": "semantic"})
    _json(filtered / "review_queue.json", review)
    _json(filtered / "rejected.json", rejected)
    if audit is not None:
        _json(filtered / "audit.json", [{**records[lid], "audit_rank": rank} for rank, lid in enumerate(audit)])
    general = prepared / "general"
    _png(general / "images" / "g1.png", (rng.random((H, W, 3)) * 255).astype(np.uint8))
    gt = {"images": [{"id": 1, "file_name": "g1.png", "width": W, "height": H}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 20.0], "area": 400.0,
                           "iscrowd": 0}],
          "categories": categories}
    _json(general / "train.json", gt)
    _json(general / "val.json", {**gt, "annotations": []})
    return {"filtered": filtered, "pseudo": pseudo, "prepared": prepared,
            "decisions": root / "review" / "decisions.json"}


def _json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
