"""Benchmark (a negative result kept reproducible): can a label-free prior-shift correction close the filter's gap?

The filter calibrates ``P(correct | score, consistency)`` on general val. On the demo pool, the accepted band's
estimated precision is 0.90-1.00, but its true precision is 0.76-0.97. The pool has wrong boxes on confusers that
val never shows (README, "Not yet good enough"). The textbook fix without labels is **prior-shift adaptation**
(Saerens, Latinne & Decaestecker 2002, "Adjusting the outputs of a classifier to new a priori probabilities").

It assumes ``p(score | correct)`` and ``p(score | wrong)`` are the same in both domains, so that only the share
``pi`` of right boxes changes. Per class, EM then finds the pool's ``pi``: posteriors rescaled by
``(pi / pi_val, (1 - pi) / (1 - pi_val))``, and ``pi`` set to their mean, until it converges. The EM population is the
boxes with ``p >= filter.review_min_probability``: on the pool, the filter's accepted and review bands (what a person
or the students see); on val, the teacher's val boxes in that range.

This script fits the stage's calibration and runs EM per class. It then runs the stage's own
:func:`~dataengine.pseudo.filter.filter_pseudo_labels` twice, with the val-calibrated probabilities and with the
rescaled ones (the class's val threshold rescaled with them), and scores both with the stage's diagnostic metrics.
``true_prior`` is the precision of that population (accepted + review) against the pool's hidden labels; it is read
for the diagnostic only.

On the demo (2026-11-24): the correction does not help. The assumption fails where it matters: a confuser scores
like an object, so a wrong box's score is distributed differently on the pool. See the README under "Tried and not
built".

Needs the outputs of ``dvc repro`` up to ``filter`` (``data/pseudo``, ``data/prepared`` with ``pool_hidden.json``).
Writes ``benchmarks/results/prior_shift.json``.

Usage:
    python benchmarks/prior_shift.py          # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from typing import Any

import numpy as np

from dataengine.boxes import xyxy_to_coco
from dataengine.config import load_params
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.layout import PreparedLayout
from dataengine.io import atomic_write_json
from dataengine.pseudo.calibrate import Calibration, fit_calibration, load_predictions, match_val_predictions
from dataengine.pseudo.filter import diagnostic_metrics, filter_pseudo_labels, pseudo_metrics


def em_prior(probability: np.ndarray, prior_val: float, iterations: int = 1000, tol: float = 1e-9) -> float | None:
    """The pool's share of right boxes by Saerens et al.'s EM, from val-calibrated ``probability`` ``[N]``.

    ``None`` when the val prior is 0 or 1 (the odds cannot be rescaled) or there are no boxes.

    Example:
        >>> round(em_prior(np.array([0.9, 0.9, 0.1, 0.1]), 0.5), 3)
        0.5
    """
    if len(probability) == 0 or not 0.0 < prior_val < 1.0:
        return None
    pi = prior_val
    for _ in range(iterations):
        new = float(rescale(probability, pi, prior_val).mean())
        if abs(new - pi) < tol:
            return new
        pi = new
    return pi


def rescale(probability: np.ndarray, prior: float, prior_val: float) -> np.ndarray:
    """Posteriors under the pool's ``prior`` (Saerens et al., eq. 2.4): the odds times the ratio of the priors' odds.

    Example:
        >>> rescale(np.array([0.5, 1.0]), 0.25, 0.5).round(3).tolist()
        [0.25, 1.0]
    """
    w1, w0 = prior / prior_val, (1.0 - prior) / (1.0 - prior_val)
    return w1 * probability / (w1 * probability + w0 * (1.0 - probability))


class Shifted:
    """A :class:`Calibration` whose probabilities (and val thresholds) are rescaled per class to the pool's prior.

    ``priors``: per class ``(pool prior, val prior)``, or ``None`` to leave the class as it is.
    """

    def __init__(self, base: Calibration, priors: list[tuple[float, float] | None]) -> None:
        self.base, self.priors = base, priors

    def _adjust(self, labels: np.ndarray, p: np.ndarray) -> np.ndarray:
        out = p.copy()
        for k, pair in enumerate(self.priors):
            mask = labels == k
            if pair is not None and mask.any():
                out[mask] = rescale(p[mask], *pair)
        return out

    def probability(self, labels: np.ndarray, scores: np.ndarray, consistency: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        return self._adjust(labels, self.base.probability(labels, scores, consistency))

    def thresholds(self) -> np.ndarray:
        t = self.base.thresholds()
        finite = np.isfinite(t)
        t[finite] = self._adjust(np.flatnonzero(finite), t[finite])  # rescaling is monotone: the same val set
        return t

    def __getattr__(self, name: str) -> Any:  # class_names, target_precision, ... as the base calibration
        return getattr(self.base, name)


def score_filter(pool: dict[str, Any], calibration: Any, params: Any,
                 hidden: Any) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The stage's bands under ``calibration``: a summary (per-class counts, the stage's estimated precision, true
    precision and recall), the accepted COCO dict and the review queue."""
    accepted, review, _, stats = filter_pseudo_labels(pool, calibration, params,
                                                      CategoryMap.from_names(pool["class_names"]))
    estimated = pseudo_metrics(stats, accepted, calibration, None)["estimated_precision"]
    truth = diagnostic_metrics(accepted, review, hidden, params.match_iou, estimated)
    summary = {"accepted": stats["accepted"], "review": stats["review"],
               "per_class": {name: {"accepted": stats["per_class"][name]["accepted"],
                                    "review": stats["per_class"][name]["review"],
                                    "estimated_precision": estimated[name],
                                    "true_precision": truth["true_precision"][name],
                                    "true_recall": truth["true_recall"][name]} for name in pool["class_names"]},
               "true_precision": truth["true_precision"]["overall"], "true_recall": truth["true_recall"]["overall"]}
    return summary, accepted, review


def true_prior(accepted: dict[str, Any], review: list[dict[str, Any]], hidden: Any,
               match_iou: float) -> dict[str, float | None]:
    """Per class, the true precision of the EM population (accepted + review boxes, matched together; diagnostic)."""
    image_id = {img["file_name"]: img["id"] for img in accepted["images"]}
    extra = [{"id": len(accepted["annotations"]) + i + 1, "image_id": image_id[r["file_name"]],
              "category_id": r["category_id"], "bbox": [float(v) for v in xyxy_to_coco(r["bbox"])],
              "probability": r["probability"]} for i, r in enumerate(review)]
    both = {**accepted, "annotations": accepted["annotations"] + extra}
    return diagnostic_metrics(both, [], hidden, match_iou, {})["true_precision"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pseudo", default="data/pseudo", help="pseudo_label output (pool/, val/)")
    parser.add_argument("--data", default="data/prepared", help="prepared data root (val ground truth, hidden labels)")
    parser.add_argument("--out", default="benchmarks/results/prior_shift.json")
    args = parser.parse_args()

    params = load_params(args.params, ["filter"]).filter
    layout = PreparedLayout(args.data)
    if not layout.pool_hidden.is_file():
        parser.error(f"{layout.pool_hidden} not found: this diagnostic needs the pool's hidden labels (the demo)")
    pool = load_predictions(f"{args.pseudo}/pool/predictions.json")
    val = match_val_predictions(load_predictions(f"{args.pseudo}/val/predictions.json"),
                                load_coco(layout.general_val), params.match_iou)
    calibration = fit_calibration(val, pool["class_names"], params)
    floor = params.review_min_probability
    p_val = calibration.probability(val.labels, val.scores, val.consistency)

    plain, accepted, review = score_filter(pool, calibration, params, layout.pool_hidden)
    truth = true_prior(accepted, review, layout.pool_hidden, params.match_iou)
    # The pool's EM population is the one true_prior scores: the accepted and review bands (p >= floor after the
    # filter's size, NMS and per-image cap).
    categories = CategoryMap.from_coco(accepted)
    classes, priors = {}, []
    for k, name in enumerate(pool["class_names"]):
        in_val = (val.labels == k) & (p_val >= floor)
        prior_val = float(p_val[in_val].mean()) if in_val.any() else None
        pool_p = np.array([a["probability"] for a in accepted["annotations"] if a["category_id"] == categories.ids[k]]
                          + [r["probability"] for r in review if r["label"] == k])
        prior = em_prior(pool_p, prior_val) if prior_val is not None else None
        priors.append(None if prior is None else (prior, prior_val))
        band = plain["per_class"][name]
        classes[name] = {"val_boxes": int(in_val.sum()), "val_prior": prior_val, "pool_boxes": len(pool_p),
                         "pool_mean_probability": float(pool_p.mean()) if len(pool_p) else None, "em_prior": prior,
                         "true_prior": truth[name]}
        print(f"{name}: val prior {prior_val} ({int(in_val.sum())} boxes), pool EM prior {prior}, true {truth[name]} "
              f"({len(pool_p)} boxes); accepted {band['accepted']} at true precision {band['true_precision']}")
    shifted, _, _ = score_filter(pool, Shifted(calibration, priors), params, layout.pool_hidden)
    for name in classes:
        print(f"{name}: accepted {plain['per_class'][name]['accepted']} -> {shifted['per_class'][name]['accepted']}, "
              f"true precision {plain['per_class'][name]['true_precision']} -> "
              f"{shifted['per_class'][name]['true_precision']}")
    result = {
        "benchmark": "prior_shift", "date": datetime.date.today().isoformat(), "platform": platform.platform(),
        "population": f"calibrated p >= filter.review_min_probability ({floor}): val boxes; pool accepted + review bands",
        "classes": classes, "val_calibrated": plain, "prior_shifted": shifted,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
