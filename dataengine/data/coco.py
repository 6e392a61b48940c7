"""COCO JSON: the one on-disk form of labelled data in dataengine.

General ground truth, pseudo-labels (with ``score``), the curated set and the scenario test set are all COCO
files whose ``file_name`` is relative to an image root. dataengine adds a few optional keys, all ignored by
other COCO tools:

- ``images[i]["semantic_file"]``: a PNG of per-pixel **category ids** (0 = background, 255 = ignore), relative
  to the image root. Without it, the semantic mask is rasterised from the instance masks.
- ``images[i]["confusers"]``: ``[[x, y, w, h], ...]`` boxes of objects that resemble a class but are not one
  (scenario test set metadata, used only by evaluation to count confuser false positives).
- ``annotations[j]["score"]``: confidence of a pseudo-label.

Contiguous labels: detection labels are ``0..K-1`` in the order of ``categories`` sorted by id; semantic
classes are ``0 = background`` and ``1..K`` (label + 1), with 255 = ignore.

Example:
    >>> coco = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "cat"}]}
    >>> CategoryMap.from_coco(coco).names
    ('cat',)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dataengine.io import atomic_write_json, read_json

__all__ = [
    "IGNORE_INDEX",
    "CocoFormatError",
    "CategoryMap",
    "load_coco",
    "save_coco",
    "annotations_by_image",
    "annotation_to_mask",
    "semantic_from_instances",
    "empty_coco",
]

IGNORE_INDEX = 255
"""Value of ignored pixels in semantic masks (never trained on, never scored)."""


class CocoFormatError(ValueError):
    """A COCO file is structurally unusable (not JSON, or missing ``images``/``annotations``/``categories``)."""


@dataclass(frozen=True)
class CategoryMap:
    """Mapping between COCO category ids and contiguous labels.

    Attributes:
        ids: Category ids sorted ascending; ``ids[label]`` is the COCO id of a contiguous label.
        names: Category names in the same order.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, coco: dict[str, Any]) -> CategoryMap:
        cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
        return cls(ids=tuple(int(c["id"]) for c in cats), names=tuple(str(c["name"]) for c in cats))

    @classmethod
    def from_names(cls, names: list[str] | tuple[str, ...]) -> CategoryMap:
        """Categories numbered ``1..K`` in the given order."""
        return cls(ids=tuple(range(1, len(names) + 1)), names=tuple(names))

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, category_id: int) -> int:
        """Contiguous label of a COCO category id (``KeyError`` naming the id if unknown)."""
        try:
            return self._id_to_label[category_id]
        except KeyError:
            raise KeyError(f"unknown category id {category_id}; known ids: {list(self.ids)}") from None

    @property
    def _id_to_label(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.ids)}

    def to_coco(self) -> list[dict[str, Any]]:
        return [{"id": cid, "name": name, "supercategory": "object"} for cid, name in zip(self.ids, self.names)]

    def semantic_lut(self) -> np.ndarray:
        """A 256-entry lookup table from category-id pixels to semantic classes (0 bg, label + 1, 255 ignore).

        Unknown ids map to 255 so that they are never trained on.
        """
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[0] = 0
        for label, cid in enumerate(self.ids):
            if 0 < cid < 255:
                lut[cid] = label + 1
        return lut


def empty_coco(categories: CategoryMap | list[dict[str, Any]]) -> dict[str, Any]:
    """A COCO dict with no images, for the given categories."""
    cats = categories.to_coco() if isinstance(categories, CategoryMap) else list(categories)
    return {"info": {"description": "dataengine"}, "images": [], "annotations": [], "categories": cats}


def load_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO JSON file and check its top-level structure (not its contents: see ``validate``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CocoFormatError: Not JSON, or ``images``/``annotations``/``categories`` missing or not lists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO file not found: {path}")
    try:
        coco = read_json(path)
    except ValueError as err:
        raise CocoFormatError(str(err)) from None
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key, [] if key == "annotations" else None), list):
            raise CocoFormatError(f"{path}: key '{key}' must be a list")
    coco.setdefault("annotations", [])
    return coco


def save_coco(path: str | Path, coco: dict[str, Any]) -> None:
    """Write a COCO dict atomically (compact: these files can be large)."""
    atomic_write_json(path, coco, indent=None)


def annotations_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Group annotations by ``image_id`` (every image present, possibly with an empty list)."""
    out: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] in out:
            out[ann["image_id"]].append(ann)
    return out


def annotation_to_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """Rasterise an annotation's ``segmentation`` (polygons, RLE or uncompressed RLE) to a ``[H, W]`` uint8 mask.

    Returns ``None`` when the annotation has no segmentation.
    """
    seg = ann.get("segmentation")
    if not seg:
        return None
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(np.uint8)


def semantic_from_instances(anns: list[dict[str, Any]], height: int, width: int, cats: CategoryMap) -> np.ndarray:
    """Semantic mask (0 bg, label + 1) from instance masks; crowd regions become ignore (255).

    Larger instances are painted first so that small objects on top stay visible.
    """
    sem = np.zeros((height, width), dtype=np.uint8)
    order = sorted(anns, key=lambda a: -float(a.get("area", 0.0)))
    for ann in order:
        m = annotation_to_mask(ann, height, width)
        if m is None:
            continue
        value = IGNORE_INDEX if ann.get("iscrowd", 0) else cats.label(ann["category_id"]) + 1
        sem[m.astype(bool)] = value
    return sem
