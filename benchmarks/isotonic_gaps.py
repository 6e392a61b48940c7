"""Benchmark (diagnostic): what the filter accepts when a box between two val blocks is priced by interpolation.

The filter's calibrator ends in an isotonic regression fitted on general val. Its fit is a step function, defined at
the val boxes; scikit-learn's ``predict`` interpolates linearly between two blocks of them, where no val box lies.
Since 2026-12-07 :meth:`dataengine.pseudo.calibrate.Calibrator.predict` reads the steps from the left instead: such
a box gets the lower block's value, the only one monotonicity guarantees. This script measures what that changes.

For each ``--pseudo`` folder (a ``pseudo_label`` output: ``pool/`` and ``val/`` predictions of one teacher) it runs
the filter's own functions with no reviewed labels twice, once per reading of the isotonic steps:

- ``interpolate``: scikit-learn's ``IsotonicRegression.predict`` (``np.interp`` between the fitted points), the
  filter's reading before 2026-12-07;
- ``step``: the filter's reading now.

Per reading it records issue 4's bar (:func:`scenario_calibration.summarise`: per class the accepted count and true
precision, the lowest class with at least 20 accepted labels, overall precision and recall) and, per class, the
accepted labels that lie *between* two val blocks, where the readings differ (``in_gap``: count and how many are
right). Val boxes get the same probability under both readings, so the val thresholds are the same; the step reading
can only lower a pool box's probability, so it accepts a subset of what interpolation accepts.

The hidden pool labels are read for these diagnostics only, after every decision, as in the pipeline.

Needs ``dvc repro`` up to ``pseudo_label`` (``data/prepared`` of the demo or the BCCD profile, ``data/pseudo``).

Usage:
    python benchmarks/isotonic_gaps.py                              # the dvc repro teacher: about 1 min on 2 cores
    python benchmarks/isotonic_gaps.py --pseudo data/pseudo T1/pseudo T2/pseudo --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.config import FilterParams, load_params  # noqa: E402
from dataengine.data.coco import CategoryMap, load_coco  # noqa: E402
from dataengine.data.layout import PreparedLayout  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.io import atomic_write_json  # noqa: E402
from dataengine.pseudo.calibrate import (  # noqa: E402
    Calibration,
    Calibrator,
    fit_calibration,
    load_predictions,
    match_val_predictions,
)
from dataengine.pseudo.filter import diagnostic_metrics, filter_pseudo_labels, pseudo_metrics  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by file path (tests)
from models import machine_info  # noqa: E402  (benchmarks/models.py: the CPU)
from scenario_calibration import issue_bar, summarise  # noqa: E402  (issue 4's bar on one filter run)

READINGS = ("interpolate", "step")


def interpolated(cal: Calibrator, scores: np.ndarray, consistency: np.ndarray) -> np.ndarray:
    """scikit-learn's ``IsotonicRegression.predict`` (``out_of_bounds="clip"``) of ``cal``'s isotonic step.

    Example:
        >>> from dataengine.pseudo.calibrate import fit_calibrator
        >>> cal = fit_calibrator(np.array([0.1, 0.3, 0.8, 0.9]), np.ones(4), np.array([0, 0, 1, 1]) > 0)
        >>> interpolated(cal, np.array([0.3, 0.5, 0.8]), np.ones(3)).round(2).tolist()
        [0.0, 0.38, 1.0]
        >>> cal.predict(np.array([0.3, 0.5, 0.8]), np.ones(3)).tolist()
        [0.0, 0.0, 1.0]
    """
    return np.interp(cal.projection(scores, consistency), np.asarray(cal.iso_x), np.asarray(cal.iso_y))


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Within the block, :meth:`Calibrator.predict` reads the isotonic steps the ``name`` way (see the docstring)."""
    if name not in READINGS:
        raise ValueError(f"unknown reading {name!r}; expected one of {READINGS}")
    step = Calibrator.predict
    if name == "interpolate":
        Calibrator.predict = interpolated  # type: ignore[method-assign]
    try:
        yield
    finally:
        Calibrator.predict = step  # type: ignore[method-assign]


def run_pseudo(pseudo: Path, layout: PreparedLayout, params: FilterParams, bar: float) -> dict[str, Any]:
    """Both readings' accepted bands for one teacher's ``pseudo_label`` output (see the module docstring)."""
    pool = load_predictions(pseudo / "pool" / "predictions.json")
    val = match_val_predictions(load_predictions(pseudo / "val" / "predictions.json"),
                                load_coco(layout.general_val), params.match_iou)
    categories = CategoryMap.from_names(pool["class_names"])
    out: dict[str, Any] = {}
    for name in READINGS:
        with reading(name):
            calibration = fit_calibration(val, pool["class_names"], params)
            accepted, review, _, stats = filter_pseudo_labels(pool, calibration, params, categories)
            metrics = pseudo_metrics(stats, accepted, calibration, None)
        metrics.update(diagnostic_metrics(accepted, review, layout.pool_hidden, params.match_iou,
                                          metrics["estimated_precision"]))
        out[name] = {**summarise(metrics, bar), "accepted_in_gap": in_gap(accepted, calibration, layout, params)}
    return out


def in_gap(accepted: dict[str, Any], calibration: Calibration, layout: PreparedLayout,
           params: FilterParams) -> dict[str, dict[str, int]]:
    """Per class, the accepted labels whose two readings differ (between two val blocks) and how many are right.

    "Right" matches those labels on their own against the hidden labels, as
    :func:`~dataengine.pseudo.filter.diagnostic_metrics` matches a band.
    """
    out = {}
    ids = CategoryMap.from_coco(accepted).ids
    for cls, cid in zip(calibration.classes, ids):
        anns = [a for a in accepted["annotations"] if a["category_id"] == cid]
        s = np.array([a["score"] for a in anns], dtype=np.float64)
        c = np.array([a["consistency"] for a in anns], dtype=np.float64)
        gap = interpolated(cls.calibrator, s, c) != cls.calibrator.predict(s, c)
        subset = {**accepted, "annotations": [a for a, g in zip(anns, gap) if g]}
        right = 0
        if subset["annotations"]:
            m = diagnostic_metrics(subset, [], layout.pool_hidden, params.match_iou, {})
            right = round(m["true_precision"][cls.name] * len(subset["annotations"]))
        out[cls.name] = {"accepted": int(gap.sum()), "right": int(right)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pseudo", nargs="+", default=[Path("data/pseudo")], type=Path,
                        help="pseudo_label outputs of one or more teachers on the same data (default: %(default)s)")
    parser.add_argument("--data", default="data/prepared", type=Path, help="their prepared data (with hidden labels)")
    parser.add_argument("--params", default="params.yaml", type=Path, help="params (the filter section is used)")
    parser.add_argument("--out", default="benchmarks/results/isotonic_gaps.json", type=Path)
    args = parser.parse_args()
    params = load_params(ROOT / args.params, ["filter"]).filter
    layout = PreparedLayout(ROOT / args.data)
    bar = issue_bar(params.target_precision)
    if not layout.pool_hidden.is_file():
        raise SystemExit(f"{layout.pool_hidden} not found: this benchmark needs the pool's hidden labels (the demo "
                         "or the bccd profile, after `dvc repro prepare`)")
    results = {}
    for pseudo in args.pseudo:
        for split in ("pool", "val"):
            if not (ROOT / pseudo / split / "predictions.json").is_file():
                raise SystemExit(f"{pseudo / split / 'predictions.json'} not found: run `dvc repro pseudo_label`")
        results[str(pseudo)] = run = run_pseudo(ROOT / pseudo, layout, params, bar)
        for name in READINGS:
            r = run[name]
            print(f"[isotonic_gaps] {pseudo} {name}: lowest class {r['lowest_class']} {r['lowest']}, meets the bar: "
                  f"{r['meets_bar']}; {r['accepted']} accepted, precision {r['true_precision']}, recall "
                  f"{r['true_recall']}", flush=True)
    out = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "cpu": machine_info()["cpu"], "commit": git_commit(ROOT), "params": str(args.params),
                    "data": str(args.data), "bar": bar},
           "runs": results}
    atomic_write_json(ROOT / args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
