"""Benchmark (diagnostic): does a larger general val make the filter's calibration hold on the pool?

The filter calibrates each class on the teacher's boxes on general val (150 images in the demo). A rare class rests
on few of them: with the `dvc repro` teacher of 2026-12-07 (AMD host), star's val threshold sat on 46 val boxes
scoring at least 0.5, and only 3 between 0.5 and 0.6, where the pool holds 60 stars (52 % right). Its accepted
stars read 0.901 estimated and 0.793 true. Is that the calibration set's size, or the scenario?

The demo generator draws every image from its own seed (:mod:`dataengine.data.demo`), so a demo generated with a
larger ``n_val`` and otherwise the same ``data.demo`` params starts with the very val images the teacher's data has
(checked byte for byte) and goes on with new ones. The teacher trains on general train only and selects nothing on
val, so it is the same teacher whatever the val size. For each of ``--sizes`` this script:

1. writes a val COCO file of the first N val images (by file name) of the extended set;
2. labels them with the teacher as the ``pseudo_label`` stage labels val (same views, AdaBN on those images, no
   masks);
3. runs the ``filter`` stage with no decisions on the pool predictions of ``--pseudo`` (not re-labelled: the pool
   is the same) and that val.

Per size it records the accepted band per class (``tta_scales.accepted_band``: count, estimated and true precision,
true recall, review band), each class's val boxes with a calibrated probability at or above its val threshold
(``val_accepted``: what the threshold rests on), and whether issue 4's bar holds: every class with at least 20
accepted labels at true precision >= ``target_precision - 0.05``. The hidden pool labels are read by the filter's
diagnostics only, as in the pipeline.

Needs ``dvc repro`` up to ``pseudo_label`` (``data/prepared`` of the demo, ``models/teacher``, ``data/pseudo``).

Usage:
    python benchmarks/calibration_val_size.py                         # 150 300 600: about 5 min on 2 CPU cores
    python benchmarks/calibration_val_size.py --teacher T/model.pt --pseudo T/pseudo --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.config import Params, load_params  # noqa: E402
from dataengine.data.coco import CategoryMap, load_coco  # noqa: E402
from dataengine.data.demo import generate_demo  # noqa: E402
from dataengine.data.layout import PreparedLayout  # noqa: E402
from dataengine.engine.checkpoint import load_model  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.io import atomic_write_json, read_json  # noqa: E402
from dataengine.models import create_model  # noqa: E402
from dataengine.pseudo import label_images  # noqa: E402
from dataengine.review.decisions import empty_decisions, write_decisions  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by file path (tests)
from models import machine_info  # noqa: E402  (benchmarks/models.py: the CPU)
from scenario_calibration import issue_bar, summarise  # noqa: E402  (issue 4's bar on one filter run)
from tta_scales import accepted_band, filter_command  # noqa: E402


def val_subset(val: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` images of a COCO dict by file name, with their annotations (other keys kept).

    Example:
        >>> coco = {"images": [{"id": 2, "file_name": "val/b.png"}, {"id": 1, "file_name": "val/a.png"}],
        ...         "annotations": [{"id": 7, "image_id": 2}, {"id": 8, "image_id": 1}], "categories": []}
        >>> sub = val_subset(coco, 1)
        >>> [im["file_name"] for im in sub["images"]], sub["annotations"]
        (['val/a.png'], [{'id': 8, 'image_id': 1}])
    """
    if not 1 <= n <= len(val["images"]):
        raise ValueError(f"val size {n}: the extended val holds {len(val['images'])} images (1 to that is allowed)")
    images = sorted(val["images"], key=lambda im: im["file_name"])[:n]
    ids = {im["id"] for im in images}
    return {**val, "images": images, "annotations": [a for a in val["annotations"] if a["image_id"] in ids]}


def check_same_prefix(original: Path, extended: Path, files: list[str]) -> None:
    """Stop unless every one of ``files`` is byte-identical under both image roots (names the first that is not)."""
    for name in files:
        if (original / name).read_bytes() != (extended / name).read_bytes():
            raise SystemExit(f"{extended / name} differs from {original / name}: the extended demo does not start "
                             "with the teacher's val images (are the data.demo params those the data was made with?)")


def _link(target: Path, link: Path) -> None:
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.resolve(), link)


def run_size(n: int, extended_val: dict[str, Any], extended_root: Path, layout: PreparedLayout, pseudo: Path,
             model: Any, params_path: Path, params: Params, bar: float, work: Path) -> dict[str, Any]:
    """Label the first ``n`` val images and filter the pool with them; the size's summary.

    ``params`` are ``params_path`` loaded (the filter stage reads the file itself); ``bar`` is issue 4's bar.
    """
    run = work / f"val{n}"
    prepared, out = run / "prepared", run / "none"
    (prepared / "general").mkdir(parents=True, exist_ok=True)
    _link(extended_root, prepared / "general" / "images")
    _link(layout.root / "scenario", prepared / "scenario")
    val = val_subset(extended_val, n)
    atomic_write_json(prepared / "general" / "val.json", val)
    _link(pseudo / "pool", run / "pseudo" / "pool")
    cats = CategoryMap.from_coco(val)
    # As pipelines/pseudo_label.py labels val: the stage's params without masks.
    stats = label_images(model, extended_root, [im["file_name"] for im in val["images"]],
                         dataclasses.replace(params.pseudo_label, segmentation=False), run / "pseudo" / "val",
                         categories=cats, progress=False)
    write_decisions(out / "decisions.json", empty_decisions())
    subprocess.run(filter_command(params_path, run, out / "decisions.json", out, prepared), cwd=ROOT, check=True)
    metrics = read_json(out / "pseudo.json")
    calibration = read_json(out / "filtered" / "calibration.json")["classes"]
    names = [*metrics["per_class"], "overall"]
    return {"val_images": n, "val_boxes": stats["boxes"],
            "bar": {k: v for k, v in summarise(metrics, bar).items() if k != "per_class"},
            "per_class": {name: {**accepted_band(metrics, name),
                                 **({"val_accepted": calibration[name].get("val_accepted"),
                                     "val_threshold": metrics["per_class"][name]["val_threshold"],
                                     "threshold": metrics["per_class"][name]["threshold"]}
                                    if name != "overall" else {})}
                          for name in names}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[150, 300, 600], help="val sizes (images)")
    parser.add_argument("--params", default="params.yaml", type=Path, help="the demo params the data was made with")
    parser.add_argument("--teacher", default="models/teacher/model.pt", type=Path, help="teacher checkpoint")
    parser.add_argument("--data", default="data/prepared", type=Path, help="the teacher's prepared demo data")
    parser.add_argument("--pseudo", default="data/pseudo", type=Path,
                        help="pseudo_label output of that teacher (its pool/ is filtered, not re-labelled)")
    parser.add_argument("--work", default="benchmarks/work/calibration_val_size", type=Path, help="scratch folder")
    parser.add_argument("--out", default="benchmarks/results/calibration_val_size.json", type=Path)
    args = parser.parse_args()
    params = load_params(ROOT / args.params, ["data", "pseudo_label", "filter"])
    layout, work = PreparedLayout(ROOT / args.data), ROOT / args.work
    bar = issue_bar(params.filter.target_precision)
    for path, what in ((layout.pool_hidden, "the demo's hidden pool labels"), (ROOT / args.teacher, "the teacher"),
                       (ROOT / args.pseudo / "pool" / "predictions.json", "the pool's predictions")):
        if not path.is_file():
            raise SystemExit(f"{path} not found: this benchmark needs {what} (run `dvc repro pseudo_label` first)")
    if params.data.source != "demo":
        raise SystemExit(f"{args.params}: data.source is {params.data.source!r}; only the demo can grow its val")

    demo = dataclasses.replace(params.data.demo, n_train=1, n_val=max(args.sizes), n_pool=1, n_test=1)
    extended = work / "demo"
    if not (extended / "general" / "val.json").is_file() or \
            len(read_json(extended / "general" / "val.json")["images"]) != demo.n_val:
        generate_demo(extended, demo, progress=False)
    extended_val = load_coco(extended / "general" / "val.json")
    original = load_coco(layout.general_val)
    check_same_prefix(layout.general_images, extended / "general" / "images",
                      [im["file_name"] for im in original["images"]])
    model, _ = load_model(ROOT / args.teacher, lambda c: create_model(**c),
                          class_names=list(CategoryMap.from_coco(original).names))

    results = {}
    for n in args.sizes:
        results[str(n)] = summary = run_size(n, extended_val, extended / "general" / "images", layout,
                                             ROOT / args.pseudo, model, ROOT / args.params, params, bar, work)
        b = summary["bar"]
        print(f"[calibration_val_size] val {n}: lowest class {b['lowest_class']} {b['lowest']}, "
              f"meets the bar: {b['meets_bar']}; overall {b['accepted']} accepted, precision {b['true_precision']}, "
              f"recall {b['true_recall']}", flush=True)
    out = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "cpu": machine_info()["cpu"], "commit": git_commit(ROOT), "params": str(args.params),
                    "teacher": str(args.teacher), "data": str(args.data), "pseudo": str(args.pseudo),
                    "original_val_images": len(original["images"]), "bar": bar},
           "sizes": results}
    atomic_write_json(ROOT / args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
