"""BCCD (real blood-cell images) as a semi-supervised problem in the :class:`PreparedLayout`.

Source layout (``root``): ``images/*.jpg`` and ``annotations/{train,val,test}.json`` (COCO, ``file_name``
relative to ``images/``; classes WBC, RBC, Platelets; 640x480). The protocol:

- a fixed, seeded **labelled fraction** of BCCD *train* images is the general ground truth, split again into
  general train/val (``val_fraction`` of it, at least one image each);
- the rest of BCCD train plus all of BCCD val is the unlabelled **scenario pool** (images copied to
  ``scenario/pool/``, their labels hidden in ``scenario/pool_hidden.json``);
- BCCD test is the **scenario test set**.

The labelled subset is the first ``n`` images of one seeded permutation of the sorted train image ids, so a larger
fraction's subset contains a smaller one's (:func:`select_labelled`): a learning curve over fractions compares
nested label sets. Detection only: no masks, no ``semantic_file``. The source is only read, never modified.

Example:
    >>> from dataengine.config import BccdParams
    >>> summary = prepare_bccd("../shared/data/bccd", "/tmp/bccd", BccdParams())  # doctest: +SKIP
    >>> summary["splits"]["scenario_test"]["images"]  # doctest: +SKIP
    72
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataengine.config import BccdParams
from dataengine.data.coco import load_coco, save_coco
from dataengine.data.layout import PreparedLayout
from dataengine.data.prepare import count_coco
from dataengine.io import atomic_write_json, safe_join

__all__ = ["BCCD_SPLITS", "select_labelled", "split_labelled", "prepare_bccd"]

BCCD_SPLITS = ("train", "val", "test")
"""The split files BCCD ships, under ``annotations/``."""


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"BCCD split seed must be >= 0 (numpy seeds are non-negative), got {seed}")


def select_labelled(image_ids: Iterable[int], fraction: float, seed: int) -> list[int]:
    """The labelled subset: the first ``n`` ids of a seeded permutation of the sorted ids (``n >= 2``).

    Nested by construction: for one seed, a larger fraction's subset contains a smaller one's.

    Args:
        image_ids: All candidate image ids (BCCD train); order does not matter.
        fraction: Share to label, in ``(0, 1]``; ``n = max(2, round(fraction * len(ids)))`` so that general train
            and val each get at least one image.
        seed: Permutation seed.

    Returns:
        The chosen ids, sorted.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]`` or fewer than two ids.

    Example:
        >>> select_labelled(range(10), 0.3, seed=0) == sorted(set(select_labelled(range(10), 0.5, seed=0))
        ...                                                     & set(select_labelled(range(10), 0.3, seed=0)))
        True
    """
    ids = sorted(image_ids)
    _check_seed(seed)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 images to form general train and val, got {len(ids)}")
    n = min(len(ids), max(2, round(fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


def split_labelled(labelled_ids: Iterable[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split labelled ids into general ``(train, val)``, seeded, with at least one image in each.

    Example:
        >>> split_labelled([1, 2, 3, 4, 5], 0.2, seed=0)
        ([1, 3, 4, 5], [2])
    """
    ids = sorted(labelled_ids)
    _check_seed(seed)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 labelled images to form general train and val, got {len(ids)}")
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    # A stream of its own (seed, 1): the val split does not shift the labelled subset's permutation.
    order = np.random.default_rng([seed, 1]).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(set(ids) - set(val)), val


def _subset(coco: dict[str, Any], image_ids: set[int], description: str) -> dict[str, Any]:
    """A new COCO dict with only ``image_ids`` and their annotations (the input is not modified)."""
    return {
        "info": {**coco.get("info", {}), "description": description},
        "images": [dict(img) for img in coco["images"] if img["id"] in image_ids],
        "annotations": [dict(ann) for ann in coco["annotations"] if ann["image_id"] in image_ids],
        "categories": [dict(cat) for cat in coco["categories"]],
    }


def _merge(parts: list[dict[str, Any]], description: str) -> dict[str, Any]:
    """Concatenate COCO dicts of the same categories whose image and annotation ids do not collide."""
    merged = {"info": {"description": description}, "images": [], "annotations": [],
              "categories": parts[0]["categories"]}
    for part in parts:
        merged["images"] += part["images"]
        merged["annotations"] += part["annotations"]
    for key in ("images", "annotations"):
        ids = [entry["id"] for entry in merged[key]]
        if len(ids) != len(set(ids)):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"BCCD {key} ids {dup} appear in more than one split file; expected unique ids")
    return merged


def _copy_images(coco: dict[str, Any], src_root: Path, dest_root: Path, bar: tqdm) -> None:
    for img in coco["images"]:
        source = safe_join(src_root, img["file_name"])
        if not source.is_file():
            raise FileNotFoundError(f"BCCD image {img['file_name']!r} (id {img['id']}) not found: {source}")
        dest = safe_join(dest_root, img["file_name"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)  # content only: the copy never shares permissions or times with the source
        bar.update()


def prepare_bccd(root: str | Path, out_root: str | Path, params: BccdParams, *,
                 progress: bool = True) -> dict[str, Any]:
    """Write BCCD's semi-supervised split in the :class:`PreparedLayout` under ``out_root``.

    Also writes ``bccd_summary.json`` (the returned summary) under ``out_root``.

    Args:
        root: The BCCD folder (``images/``, ``annotations/{train,val,test}.json``); only read.
        out_root: Root of the prepared layout.
        params: Labelled fraction, val fraction and seed (``params.root`` is not used: ``root`` is).
        progress: Show a tqdm progress bar over the copied images.

    Returns:
        ``{"seed", "labelled_fraction", "val_fraction", "labelled_image_ids", "splits": {name: counts}}`` with
        counts (images, instances, per class) for ``general_train``, ``general_val``, ``scenario_pool`` and
        ``scenario_test``.

    Raises:
        FileNotFoundError: ``root``, one of its annotation files, or an image it names is missing.
        ValueError: The split files disagree on categories or share image/annotation ids.

    Example:
        >>> s = prepare_bccd("../shared/data/bccd", "/tmp/bccd", BccdParams(labelled_fraction=0.1))  # doctest: +SKIP
        >>> s["splits"]["general_train"]["images"] + s["splits"]["general_val"]["images"]  # doctest: +SKIP
        20
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BCCD root not found: {root} (expected images/ and annotations/ in it; "
                                f"set data.bccd.root in params.yaml)")
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"BCCD image folder not found: {images}")
    source = {split: load_coco(root / "annotations" / f"{split}.json") for split in BCCD_SPLITS}
    categories = source["train"]["categories"]
    for split in ("val", "test"):
        if source[split]["categories"] != categories:
            raise ValueError(f"BCCD {split}.json categories {source[split]['categories']} differ from train.json's "
                             f"{categories}")

    train_ids = [img["id"] for img in source["train"]["images"]]
    labelled = select_labelled(train_ids, params.labelled_fraction, params.seed)
    general_train_ids, general_val_ids = split_labelled(labelled, params.val_fraction, params.seed)
    pool_train_ids = set(train_ids) - set(labelled)
    tag = f"BCCD semi-supervised split (fraction {params.labelled_fraction}, seed {params.seed})"
    outputs = {
        "general_train": _subset(source["train"], set(general_train_ids), f"{tag}: general train"),
        "general_val": _subset(source["train"], set(general_val_ids), f"{tag}: general val"),
        "scenario_pool": _merge([_subset(source["train"], pool_train_ids, "train remainder"),
                                 _subset(source["val"], {img["id"] for img in source["val"]["images"]}, "val")],
                                f"{tag}: scenario pool (hidden labels)"),
        "scenario_test": _subset(source["test"], {img["id"] for img in source["test"]["images"]},
                                 f"{tag}: scenario test"),
    }

    layout = PreparedLayout(out_root)
    targets = {"general_train": (layout.general_train, layout.general_images),
               "general_val": (layout.general_val, layout.general_images),
               "scenario_pool": (layout.pool_hidden, layout.pool_images),
               "scenario_test": (layout.test_json, layout.test_images)}
    total = sum(len(coco["images"]) for coco in outputs.values())
    with tqdm(total=total, desc="copy BCCD images", unit="img", disable=not progress) as bar:
        for name, coco in outputs.items():
            json_path, image_root = targets[name]
            _copy_images(coco, images, image_root, bar)
            save_coco(json_path, coco)

    summary = {"seed": params.seed, "labelled_fraction": params.labelled_fraction,
               "val_fraction": params.val_fraction, "labelled_image_ids": labelled,
               "splits": {name: count_coco(coco) for name, coco in outputs.items()}}
    atomic_write_json(layout.root / "bccd_summary.json", summary)
    return summary
