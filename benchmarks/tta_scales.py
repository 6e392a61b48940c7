"""Benchmark (diagnostic): which test-time scales label the scenario best, and what does the filter make of them?

The demo's scenario objects are smaller than the general set's (median square root of the box area: 18 px on the
pool, 24 px in general train, a ratio of 1.33), so the teacher sees them below the scale it learnt.
``pseudo_label.tta_scales`` (default ``[1.25, 1.5]`` since 2026-11-25, ``[1.0, 1.25]`` before) sets the views it
labels at; the filter then calibrates on general val labelled with the same views. For each set of ``--scales`` this
script writes params that differ from ``--params`` in ``pseudo_label.tta_scales`` only. It runs the stage scripts
``pseudo_label`` (with the ``dvc repro`` teacher, ``models/teacher``) and ``filter`` (no decisions) into ``--work/scales<tag>/``. Then it plays the reviewer
of the audit sample (:func:`dataengine.review.oracle.simulate_review`, decisions from the pool's hidden labels, as
``benchmarks/recalibration.py`` does) and re-runs ``filter`` on those decisions.

Per scale set and class it records:

- ``pool_AP50``: pycocotools AP50 of the fused pool boxes (score >= ``pseudo_label.score_threshold``, at most 100 per
  image and class, as COCOeval keeps) against the hidden labels. It is threshold-free: how well the views rank the
  scenario's objects before any filtering.
- ``no_review``: the accepted band of ``metrics/pseudo.json`` (count, estimated and true precision, true recall) and
  the review band's true precision, i.e. the issue's "demo, default params" numbers for those scales.
- ``audit``: the accepted band after the filter re-calibrated on the simulated audit (count, true precision, recall).
- ``images_per_second`` of the pool (this machine, one run after another: compare within one results file).

The hidden labels are read for these diagnostics only, as in the pipeline.

Needs ``dvc repro`` up to ``prepare`` and ``train_teacher`` (``data/prepared`` with ``scenario/pool_hidden.json``,
``models/teacher/model.pt``).

``--teacher`` and ``--data`` take another teacher and the demo data it was trained on, e.g. a run of
``benchmarks/calibration_coverage.py`` (general set with look-alikes), to see how the scales combine with it.

Usage:
    python benchmarks/tta_scales.py                       # 3 scale sets: about 5 minutes on 2 CPU cores
    python benchmarks/tta_scales.py --scales 1,1.25 1.25,1.5 --reuse
    R=benchmarks/work/calibration_coverage/rate0.2
    python benchmarks/tta_scales.py --scales 1,1.25 1.25,1.5 --teacher $R/teacher --data $R/prepared \
        --params $R/params.yaml --work benchmarks/work/tta_scales_rate0.2 \
        --out benchmarks/results/tta_scales_rate0.2.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.boxes import xyxy_to_coco  # noqa: E402
from dataengine.config import load_params  # noqa: E402
from dataengine.data.layout import PreparedLayout  # noqa: E402
from dataengine.evaluation import evaluate_detection  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.io import atomic_write_json, read_json  # noqa: E402
from dataengine.profiles import merge  # noqa: E402
from dataengine.pseudo.tta import tta_views  # noqa: E402
from dataengine.review.decisions import empty_decisions, write_decisions  # noqa: E402
from dataengine.review.oracle import review_plan, simulate_review  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by file path (tests)
from models import machine_info  # noqa: E402  (benchmarks/models.py: the CPU; each CPU type trains its own teacher)
from scenario_calibration import issue_bar  # noqa: E402  (issue 4's bar)

TEACHER, DATA = Path("models/teacher"), Path("data/prepared")


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1.25,1.5"`` -> ``(1.25, 1.5)``; anything else stops with the value and what is expected.

    Example:
        >>> parse_scales("1, 1.25")
        (1.0, 1.25)
    """
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise SystemExit(f"--scales: {text!r} is not comma-separated numbers, e.g. 1.25,1.5") from None
    return scales


def scale_tag(scales: tuple[float, ...]) -> str:
    """Folder and results key of a scale set.

    Example:
        >>> scale_tag((1.0, 1.25))
        '1-1.25'
    """
    return "-".join(f"{s:g}" for s in scales)


def write_params(base: Path, scales: tuple[float, ...], out: Path) -> Path:
    """``base`` with ``pseudo_label.tta_scales: scales``, validated, written to ``out``."""
    params = merge(yaml.safe_load(base.read_text()), {"pseudo_label": {"tta_scales": list(scales)}})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(out, ["teacher", "pseudo_label"])
    # Bad scales (not positive, or two that round to one input size) stop here, naming the key, before any work.
    tta_views(loaded.teacher.model.input_size, loaded.pseudo_label.tta_scales, loaded.pseudo_label.tta_hflip)
    return out


def pseudo_label_command(params: Path, run: Path, teacher: Path = TEACHER, data: Path = DATA) -> list[str]:
    """The ``pseudo_label`` stage's command as in dvc.yaml, into ``run/pseudo``."""
    return [sys.executable, "pipelines/pseudo_label.py", "--params", str(params), "--teacher", str(teacher),
            "--data", str(data), "--out", str(run / "pseudo"), "--no-progress"]


def filter_command(params: Path, run: Path, decisions: Path, out: Path, data: Path = DATA) -> list[str]:
    """The ``filter`` stage's command as in dvc.yaml, on ``run/pseudo`` with ``decisions``, into ``out``."""
    return [sys.executable, "pipelines/filter.py", "--params", str(params), "--pseudo", str(run / "pseudo"),
            "--data", str(data), "--decisions", str(decisions), "--out", str(out / "filtered"),
            "--metrics", str(out / "pseudo.json")]


def pool_ap50(predictions: dict[str, Any], hidden: dict[str, Any]) -> dict[str, float | None]:
    """AP50 per class (and ``overall``) of ``predictions.json`` boxes against the hidden labels (pycocotools).

    Images are matched by file name and classes by name; boxes go from ``xyxy`` to COCO ``xywh``.

    Example:
        >>> hidden = {"images": [{"id": 5, "file_name": "a.png"}], "categories": [{"id": 1, "name": "star"}],
        ...           "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 10, 10],
        ...                            "area": 100, "iscrowd": 0}]}
        >>> predictions = {"class_names": ["star"],
        ...                "boxes": [{"file_name": "a.png", "bbox": [0, 0, 10, 10], "label": 0, "score": 0.9}]}
        >>> {k: round(v, 3) for k, v in pool_ap50(predictions, hidden).items()}
        {'star': 1.0, 'overall': 1.0}
    """
    image_id = {img["file_name"]: img["id"] for img in hidden["images"]}
    category_id = {c["name"]: c["id"] for c in hidden["categories"]}
    names = predictions["class_names"]
    missing = sorted(set(names) - set(category_id))
    if missing:
        raise ValueError(f"predicted classes {missing} are not among the hidden labels' {sorted(category_id)}")
    unknown = sorted({b["file_name"] for b in predictions["boxes"]} - set(image_id))
    if unknown:
        raise ValueError(f"predictions on images the hidden labels do not list: {unknown[:5]}")
    results = [{"image_id": image_id[b["file_name"]], "category_id": category_id[names[b["label"]]],
                "bbox": xyxy_to_coco(b["bbox"]).tolist(), "score": b["score"]} for b in predictions["boxes"]]
    metrics = evaluate_detection(hidden, results)
    return {**metrics["per_class_AP50"], "overall": metrics["AP50"]}


def accepted_band(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    """Accepted count, estimated and true precision, true recall and the review band's true precision of one class
    (or ``overall``) in a ``metrics/pseudo.json``."""
    n = metrics["accepted"] if name == "overall" else metrics["per_class"][name]["accepted"]
    return {"accepted": n, "estimated_precision": metrics["estimated_precision"][name],
            "true_precision": metrics["true_precision"][name], "true_recall": metrics["true_recall"][name],
            "review_true_precision": metrics["review_true_precision"][name]}


def run_scales(scales: tuple[float, ...], base_params: Path, work: Path, hidden: dict[str, Any],
               reuse: bool, teacher: Path = TEACHER, data: Path = DATA) -> dict[str, Any]:
    """Label, filter, audit and filter again with one scale set; its summary (see the module docstring)."""
    tag = scale_tag(scales)
    run = work / f"scales{tag}"
    params = write_params(base_params, scales, run / "params.yaml")
    none, audit = run / "none", run / "audit"
    write_decisions(none / "decisions.json", empty_decisions())

    def step(name: str, done: Path, cmd: list[str]) -> None:
        if reuse and done.exists():
            print(f"[tta_scales] {tag}: {name} reused ({done})", flush=True)
            return
        print(f"[tta_scales] {tag}: {name}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        print(f"[tta_scales] {tag}: {name} took {time.perf_counter() - t0:.0f} s", flush=True)

    step("pseudo_label", run / "pseudo" / "stats.json", pseudo_label_command(params, run, teacher, data))
    step("filter", none / "pseudo.json", filter_command(params, run, none / "decisions.json", none, data))
    filtered = none / "filtered"
    match_iou = read_json(filtered / "calibration.json")["match_iou"]
    records, n_images = review_plan(read_json(filtered / "review_queue.json"), read_json(filtered / "audit.json"), 0)
    decisions, _ = simulate_review(records, read_json(filtered / "accepted.json"),
                                   read_json(filtered / "rejected.json"), hidden, n_images=n_images,
                                   match_iou=match_iou)
    write_decisions(audit / "decisions.json", decisions)
    step("filter on the audit", audit / "pseudo.json",
         filter_command(params, run, audit / "decisions.json", audit, data))

    before, after = read_json(none / "pseudo.json"), read_json(audit / "pseudo.json")
    ap50 = pool_ap50(read_json(run / "pseudo" / "pool" / "predictions.json"), hidden)
    names = [*before["per_class"], "overall"]
    return {"scales": list(scales), "images_per_second": read_json(run / "pseudo" / "stats.json")["pool"][
                "images_per_second"],
            "audit_images": n_images, "audit_labels": after["reviewed_labels"],
            "per_class": {name: {"pool_AP50": ap50[name], "no_review": accepted_band(before, name),
                                 "audit": {k: v for k, v in accepted_band(after, name).items()
                                           if k in ("accepted", "true_precision", "true_recall")}}
                          for name in names}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", type=parse_scales, default=[(1.0, 1.25), (1.25, 1.5), (1.5, 2.0)],
                        metavar="S1,S2", help="scale sets to compare, each comma-separated (default: 1,1.25 "
                        "1.25,1.5 1.5,2)")
    parser.add_argument("--params", default="params.yaml", type=Path, help="base params (a demo params file)")
    parser.add_argument("--teacher", default=TEACHER, type=Path,
                        help="teacher folder (model.pt), e.g. from calibration_coverage.py (default: %(default)s)")
    parser.add_argument("--data", default=DATA, type=Path,
                        help="prepared demo data the teacher belongs to (default: %(default)s)")
    parser.add_argument("--work", default="benchmarks/work/tta_scales", type=Path, help="scratch folder")
    parser.add_argument("--reuse", action="store_true", help="skip a step whose output a previous run left")
    parser.add_argument("--out", default="benchmarks/results/tta_scales.json", type=Path)
    args = parser.parse_args()
    params = load_params(ROOT / args.params, ["filter", "pseudo_label"])
    layout = PreparedLayout(ROOT / args.data)
    if not layout.pool_hidden.is_file():
        raise SystemExit(f"{layout.pool_hidden} not found: this benchmark needs the demo's hidden pool labels")
    if not (ROOT / args.teacher / "model.pt").is_file():
        raise SystemExit(f"{args.teacher / 'model.pt'} not found: run `dvc repro train_teacher` first")
    hidden = read_json(layout.pool_hidden)

    results = {}
    for scales in args.scales:
        results[scale_tag(scales)] = summary = run_scales(scales, ROOT / args.params, ROOT / args.work, hidden,
                                                          args.reuse, args.teacher, args.data)
        line = ", ".join(f"{k} AP50 {v['pool_AP50']:.3f} P {v['no_review']['true_precision']:.3f} "
                         f"R {v['no_review']['true_recall']:.3f}" for k, v in summary["per_class"].items()
                         if v["no_review"]["true_precision"] is not None)
        print(f"[tta_scales] {scale_tag(scales)}: {line}", flush=True)
    target = params.filter.target_precision
    out = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "cpu": machine_info()["cpu"], "commit": git_commit(ROOT), "params": str(args.params),
                    "teacher": str(args.teacher), "data": str(args.data),
                    "default_scales": list(params.pseudo_label.tta_scales),
                    "target_precision": target, "bar": issue_bar(target)},
           "scales": results}
    atomic_write_json(ROOT / args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
