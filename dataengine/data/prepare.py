"""The ``prepare`` stage: bring any data source into the :class:`PreparedLayout`, validate it, count it.

Sources (``data.source``): ``demo`` (synthetic, generated), ``bccd`` (the real BCCD dataset, semi-supervised
split), ``coco`` (a user's COCO files plus a scenario image folder). Work happens in ``<out>.partial`` and is
renamed onto ``<out>`` only when complete and valid, so a killed stage never leaves a half-prepared dataset that
a later stage would take as complete; re-running starts again from scratch.

Bad entries: with ``data.on_bad: stop`` the stage fails with a report listing every bad entry (file, id,
reason); with ``skip`` they are removed from the prepared files, written to ``quarantine.json`` beside them,
and counted in the metrics -- never dropped silently.

Example:
    >>> from dataengine.config import DataParams, DemoParams
    >>> metrics = prepare_data(DataParams(demo=DemoParams(n_train=4, n_val=2, n_pool=4, n_test=2)),
    ...                        "/tmp/prep")  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from dataengine.config import CocoSourceParams, DataParams
from dataengine.data.coco import CategoryMap, load_coco, save_coco
from dataengine.data.images import list_images
from dataengine.data.layout import PreparedLayout
from dataengine.io import atomic_write_json, safe_join

__all__ = ["DataValidationError", "prepare_data", "count_coco"]


class DataValidationError(ValueError):
    """The prepared data has bad entries and ``data.on_bad`` is ``stop``. The message lists every one."""


def count_coco(coco: dict[str, Any]) -> dict[str, Any]:
    """Images, instances, instances per class and images without any object, for ``metrics/data.json``."""
    cats = CategoryMap.from_coco(coco)
    per_class = Counter(ann["category_id"] for ann in coco["annotations"])
    with_objects = {ann["image_id"] for ann in coco["annotations"]}
    return {
        "images": len(coco["images"]),
        "instances": len(coco["annotations"]),
        "empty_images": sum(1 for img in coco["images"] if img["id"] not in with_objects),
        "per_class": {name: per_class.get(cid, 0) for cid, name in zip(cats.ids, cats.names)},
    }


def _import_user_coco(src: CocoSourceParams, layout: PreparedLayout) -> None:
    """Copy a user's COCO data into the layout (images are copied so the prepared root is self-contained)."""
    for key in ("train_json", "val_json", "images", "scenario_dir"):
        if not getattr(src, key):
            raise ValueError(f"data.coco.{key} is empty: set it in params.yaml for data.source: coco")
    layout.general_images.mkdir(parents=True, exist_ok=True)
    for json_path, target in ((src.train_json, layout.general_train), (src.val_json, layout.general_val)):
        coco = load_coco(json_path)
        for img in coco["images"]:
            dest = layout.general_images / img["file_name"]
            source = safe_join(src.images, img["file_name"])
            if source.exists():  # missing files are reported by validation, not here
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
        save_coco(target, coco)
    shutil.copytree(src.scenario_dir, layout.pool_images, symlinks=True)
    if src.test_json:
        coco = load_coco(src.test_json)
        for img in coco["images"]:
            source = safe_join(src.test_images or Path(src.test_json).parent, img["file_name"])
            if source.exists():
                dest = layout.test_images / img["file_name"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
        save_coco(layout.test_json, coco)


def _validate_and_clean(layout: PreparedLayout, on_bad: str, progress: bool) -> dict[str, Any]:
    from dataengine.data.validate import split_bad, validate_coco, validate_image_folder

    splits = [("general_train", layout.general_train, layout.general_images),
              ("general_val", layout.general_val, layout.general_images)]
    if layout.test_json.exists():
        splits.append(("scenario_test", layout.test_json, layout.test_images))
    reports, quarantined = {}, []
    for name, json_path, root in splits:
        reports[name] = validate_coco(json_path, root, progress=progress)
    pool_files, pool_report = validate_image_folder(layout.pool_images)
    reports["scenario_pool"] = pool_report
    bad = {name: r for name, r in reports.items() if not r.ok}
    if bad and on_bad == "stop":
        lines = [f"{name}:\n{r.format()}" for name, r in bad.items()]
        raise DataValidationError(
            "bad entries in the prepared data (set data.on_bad: skip to quarantine them instead):\n" + "\n".join(lines)
        )
    for name, json_path, _ in splits:
        if name in bad:
            clean, entries = split_bad(load_coco(json_path), reports[name])
            save_coco(json_path, clean)
            quarantined += [{"split": name, **e} for e in entries]
    if "scenario_pool" in bad:
        # Bad pool images are moved out of the pool (the pseudo-labeller lists the folder), not deleted.
        for defect in pool_report.to_dict()["defects"]:
            source = layout.pool_images / defect["file"]
            if source.is_file() or source.is_symlink():
                target = layout.root / "quarantine" / "pool" / defect["file"]
                target.parent.mkdir(parents=True, exist_ok=True)
                source.replace(target)
            quarantined.append({"split": "scenario_pool", **defect})
    if quarantined:
        atomic_write_json(layout.root / "quarantine.json", quarantined)
    return {"bad_entries": sum(len(r.defects) for r in reports.values()), "quarantined": len(quarantined),
            "pool_files": pool_files}


def prepare_data(params: DataParams, out_root: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Build the prepared dataset at ``out_root`` and return the metrics for ``metrics/data.json``.

    Args:
        params: The ``data`` params section.
        out_root: Final location (replaced only when the new data is complete and valid).
        progress: Show progress bars.

    Returns:
        Flat-ish metrics: per split image/instance counts, per-class counts, bad and quarantined entries.

    Raises:
        DataValidationError: ``on_bad: stop`` and there are bad entries (nothing is written to ``out_root``).
    """
    out_root = Path(out_root)
    partial = out_root.with_name(out_root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a killed run: restart cleanly
    layout = PreparedLayout(partial)
    if params.source == "demo":
        from dataengine.data.demo import generate_demo

        generate_demo(partial, params.demo, progress=progress)
    elif params.source == "bccd":
        from dataengine.data.bccd import prepare_bccd

        prepare_bccd(params.bccd.root, partial, params.bccd, progress=progress)
    else:
        _import_user_coco(params.coco, layout)

    try:
        checks = _validate_and_clean(layout, params.on_bad, progress)
    except DataValidationError:
        shutil.rmtree(partial)  # nothing half-prepared is left behind; the report says what to fix
        raise
    metrics: dict[str, Any] = {"source": params.source}
    for name, path in (("general_train", layout.general_train), ("general_val", layout.general_val),
                       ("scenario_test", layout.test_json)):
        if path.exists():
            metrics[name] = count_coco(load_coco(path))
    metrics["scenario_pool"] = {"images": len(checks["pool_files"])}
    if layout.pool_hidden.exists():
        metrics["scenario_pool"]["hidden_labels"] = count_coco(load_coco(layout.pool_hidden))
    metrics["bad_entries"] = checks["bad_entries"]
    metrics["quarantined"] = checks["quarantined"]

    if out_root.exists():
        shutil.rmtree(out_root)
    partial.rename(out_root)
    return metrics
