"""Calibration of the teacher's boxes on general val: ``(score, consistency) -> P(correct)`` and per-class thresholds.

The teacher's predictions on general val (``<pseudo>/val/predictions.json``, written by the ``pseudo_label`` stage)
are matched to the val ground truth (:func:`dataengine.evaluation.match_predictions`, class-aware, one-to-one,
``filter.match_iou``), which gives every val box a label *correct / incorrect*. Per class, a calibrator is fitted
that maps a box's raw ``score`` and TTA ``consistency`` (mean IoU of the views' boxes with the fused box) to the
probability that the box is correct.

**The calibrator** is a two-step model, chosen because each step fixes the other's weakness:

1. a logistic regression on ``[logit(score), consistency]`` (Platt scaling extended by one feature, Platt 1999)
   learns *how much* TTA agreement should count next to the score, but forces a sigmoid shape;
2. an isotonic regression (Zadrozny & Elkan 2002; ``IsotonicRegression(increasing=True, out_of_bounds="clip")``)
   on the logistic regression's linear output ``z = a * logit(score) + b * consistency + c`` then fits any monotone
   shape, which is what detector scores need (Niculescu-Mizil & Caruana 2005 find isotonic best once there are a
   few hundred samples). scikit-learn's isotonic regression is one-dimensional, hence step 1 as the projection.

The result is **monotone in the score** (and in the consistency): ``a`` and ``b`` are kept non-negative -- if the
fitted ``b`` is negative the regression is refitted on the score alone, if ``a`` is not positive ``z`` falls back to
``logit(score)`` -- and the isotonic step is non-decreasing. A class whose val boxes are all correct (or all wrong)
cannot be fitted by logistic regression: ``z = logit(score)`` and the isotonic step gives the constant rate.

**Pooled fallback**: a class with fewer than ``filter.min_calibration_boxes`` val boxes uses one calibrator fitted on
every class's val boxes (recorded as ``"pooled"`` in ``calibration.json`` and in the metrics).

**Thresholds**: per class, the *lowest* calibrated probability ``t`` (among the class's val boxes' values) such that
the boxes with ``p >= t`` reach ``filter.target_precision`` both in calibrated precision (the mean of their ``p``)
and in empirical precision (their fraction correct). For a per-class calibrator fitted on these very boxes the two
agree (isotonic regression is exactly calibrated on every union of its blocks); for a pooled one the empirical check
keeps a rare class from inheriting the common classes' precision. A class that never reaches the target, or has no
val box, gets no threshold (``None``): it accepts nothing and its boxes above ``filter.review_min_probability``
all go to review. The filter may raise a threshold further so that the *pool* boxes it accepts reach the target in
estimated precision too (:func:`dataengine.pseudo.filter.pool_thresholds`).

**Re-calibration on the reviewers' decisions** (:func:`recalibrate`): general val is another domain than the
scenario (on the demo, boxes calibrated at ``p >= 0.9`` on val are 0.76-0.97 precise on the pool: the teacher never
saw a confuser). The labels people decided on in the review tools are scenario evidence: each says whether the
teacher's box was right (:func:`dataengine.review.curate.teacher_verdicts`). A class is re-fitted on them -- the
val calibrator's projection ``z`` kept, its isotonic step re-fitted on the reviewed labels (:func:`refit_isotonic`),
and the same threshold rule (kind ``"reviewed"``) -- once it has right and wrong reviewed labels and at least
``filter.min_reviewed_accepted`` of them lie in its *val-accepted range* (``p_val >=`` its val threshold).
The second condition is what the filter's audit sample (a random sample of accepted labels per class,
:func:`dataengine.pseudo.filter.audit_sample`) is for: the review queue alone holds boxes *below* the threshold, and
a calibrator fitted on them would extrapolate its top value to every accepted box. The reviewed labels are not a
random sample of the pool (the queue is ranked by risk, the audit samples the accepted band), but both select on
the val-calibrated probability only, a function of ``(score, consistency)``; a calibrator of
``P(correct | score, consistency)`` fitted on them is unbiased under such a selection, within the range they cover.
That range is a narrow band of the val projection, which is why the projection is kept: a logistic re-fit inside
the band learnt a direction the band does not constrain (demo, one teacher seed: consistency weighted 44 to the
score's 0.3; 231 of 596 accepted squares scored below every reviewed one, down to 0.06, and the accepted squares
were 0.58 precise). Below the reviewed range a class accepts only what val accepts too
(:meth:`ClassCalibration.acceptable`).

**Reviewed labels may shrink a class's accepted band, and widen it only where they were looked at**
(:func:`widening_floor`). The filter first computes the band the class would accept without review (the val
threshold raised for the pool's mix, :meth:`Calibration.before_review`); the re-fit may accept less than that, and
more only down to where the reviewed labels *in the widened part*, on their own, number at least
``filter.min_reviewed_accepted`` and reach the target precision. Two failures on the demo called for it, both after a
simulated 60-per-class audit: (a) below the reviewed range, the re-fit lifted the band's mean ``p``, so the pool raise
stopped binding and the class fell back to its val threshold (teacher seed 1: 146 stars accepted instead of 41, 99
never reviewed; 0.774 precise); (b) *inside* the range, across a gap: the isotonic re-fit pooled 113 strong squares
(2 wrong) with the few reviewed at score 0.62 and rated every square between 0.62 and 0.85, where nobody had looked
and val said 0.17, at 0.976 (the `dvc repro` teacher on an Intel host: 521 squares accepted instead of 190, 0.835
precise). :func:`dataengine.pseudo.filter.pool_thresholds` then applies the pool's own mix to the re-fitted ``p``.

**Between two val blocks, the lower one's value** (:meth:`Calibrator.predict`). An isotonic fit is a step function
defined at the boxes it was fitted on; scikit-learn's ``predict`` interpolates linearly between the blocks. The filter
reads the steps from the left instead: a pool box whose ``z`` falls between the last val box of one block and the
first of the next gets the lower block's value, the only one monotonicity guarantees, since no val box lies there.
The interpolation priced boxes that general val says nothing about, and the pool raise then let them in on the
strength of the boxes above them: on the demo, a teacher's top star block held 43 val boxes, all right (``p = 1``),
the next one below 2 (``p = 0.5``); 69 pool stars fell between, were interpolated to 0.73 on average and accepted,
and were right 0.61 of the time (accepted stars 0.793 precise; read from the left, 119 accepted at 0.899).

The whole calibration serialises to JSON (:meth:`Calibration.to_dict`): logistic coefficients and the isotonic
``X``/``y`` thresholds, from which :meth:`Calibrator.predict` recomputes the step function exactly.

Example:
    >>> import numpy as np
    >>> from dataengine.config import FilterParams
    >>> rng = np.random.default_rng(0)
    >>> scores = rng.uniform(0.05, 1.0, 400)
    >>> val = ValBoxes(labels=np.zeros(400, dtype=np.int64), scores=scores, consistency=np.ones(400),
    ...                correct=rng.uniform(size=400) < scores)
    >>> cal = fit_calibration(val, ["cat"], FilterParams(target_precision=0.8))
    >>> cal.classes[0].kind, 0.5 < cal.classes[0].threshold < 0.9
    ('per-class', True)
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from dataengine.boxes import xyxy_to_coco
from dataengine.config import FilterParams
from dataengine.data.coco import CategoryMap
from dataengine.evaluation import match_predictions
from dataengine.io import atomic_write_bytes, read_json

__all__ = [
    "Calibrator",
    "ClassCalibration",
    "Calibration",
    "ValBoxes",
    "load_predictions",
    "match_val_predictions",
    "fit_calibrator",
    "refit_isotonic",
    "check_predictions",
    "select_threshold",
    "fit_calibration",
    "ReviewedEvidence",
    "recalibrate",
    "widening_floor",
    "ReliabilitySeries",
    "plot_reliability",
]

_EPS = 1e-6  # scores are clipped to [eps, 1 - eps] before the logit
_TOL = 1e-12  # precision comparisons: a mean of exactly 0.9 reaches a target of 0.9
_BOX_KEYS = ("file_name", "bbox", "label", "score", "consistency")


# ---------------------------------------------------------------------------------------------------------------
# Predictions files
# ---------------------------------------------------------------------------------------------------------------


def load_predictions(path: str | Path) -> dict[str, Any]:
    """Read and check a ``predictions.json`` of the ``pseudo_label`` stage.

    Checked: the top-level ``images``/``boxes``/``class_names`` lists, unique image file names, and every box's
    keys, ``file_name`` (one of the images), ``bbox`` (4 finite numbers, ``x2 >= x1``, ``y2 >= y1``), ``label``
    (``0..K-1``), ``score`` and ``consistency`` (in ``[0, 1]``).

    Args:
        path: The file.

    Returns:
        The parsed dict, unchanged.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A structural problem, naming the file, the box index and the key.

    Example:
        >>> load_predictions("data/pseudo/val/predictions.json")["class_names"]  # doctest: +SKIP
        ['circle', 'square', 'triangle', 'star', 'cross']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path} (run the pseudo_label stage first)")
    data = read_json(path)
    check_predictions(data, str(path))
    return data


def check_predictions(data: Any, where: str) -> None:
    """Raise ``ValueError`` if ``data`` is not a valid predictions dict (see :func:`load_predictions`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with images, boxes, class_names")
    for key in ("images", "boxes", "class_names"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{where}: key '{key}' must be a list")
    names = data["class_names"]
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: 'class_names' must be unique non-empty strings, got {names!r}")
    files = [img.get("file_name") if isinstance(img, dict) else None for img in data["images"]]
    if not all(isinstance(f, str) and f for f in files) or len(set(files)) != len(files):
        raise ValueError(f"{where}: every image needs a unique non-empty 'file_name'")
    known = set(files)
    for i, box in enumerate(data["boxes"]):
        if not isinstance(box, dict) or any(k not in box for k in _BOX_KEYS):
            raise ValueError(f"{where}: box {i}: expected keys {list(_BOX_KEYS)}, got {box!r}")
        bbox, label = box["bbox"], box["label"]
        if box["file_name"] not in known:
            raise ValueError(f"{where}: box {i}: file_name {box['file_name']!r} is not one of the images")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)
                and bbox[2] >= bbox[0] and bbox[3] >= bbox[1]):
            raise ValueError(f"{where}: box {i} ({box['file_name']}): 'bbox' must be [x1, y1, x2, y2] with "
                             f"x2 >= x1, y2 >= y1, got {bbox!r}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            raise ValueError(f"{where}: box {i} ({box['file_name']}): 'label' must be an int in 0..{len(names) - 1}, "
                             f"got {label!r}")
        for key in ("score", "consistency"):
            if not (_finite(box[key]) and 0.0 <= box[key] <= 1.0):
                raise ValueError(f"{where}: box {i} ({box['file_name']}): '{key}' must be in [0, 1], got {box[key]!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# Val boxes and their correctness
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValBoxes:
    """The teacher's val boxes as arrays, with whether each matched a ground-truth object.

    Attributes:
        labels: int64 ``[N]`` contiguous labels.
        scores: float ``[N]`` raw scores.
        consistency: float ``[N]`` TTA consistency.
        correct: bool ``[N]``.
    """

    labels: np.ndarray
    scores: np.ndarray
    consistency: np.ndarray
    correct: np.ndarray


def match_val_predictions(val_predictions: dict[str, Any], val_gt: dict[str, Any], match_iou: float, *,
                          split: str = "val") -> ValBoxes:
    """Match the teacher's val boxes to the val ground truth (class-aware, one-to-one, at ``match_iou``).

    The filter stage also matches the pool's boxes to the pool's hidden labels this way (``split="pool"``), for the
    reliability plot's diagnostic series only.

    Args:
        val_predictions: ``<pseudo>/val/predictions.json``; ``file_name`` relative to ``general/images``.
        val_gt: General val COCO (``general/val.json``); its categories, by ascending id, must carry the teacher's
            ``class_names`` in the same order.
        match_iou: IoU for a match.
        split: The split's name in error messages.

    Returns:
        The boxes in input order and their correctness.

    Raises:
        ValueError: Class names differ (both lists in the message), or a box's file is not a val image.

    Example:
        >>> gt = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "cat"}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
        >>> preds = {"images": [{"file_name": "a.png"}], "class_names": ["cat"], "boxes": [
        ...     {"file_name": "a.png", "bbox": [0, 0, 10, 10], "label": 0, "score": 0.9, "consistency": 1.0},
        ...     {"file_name": "a.png", "bbox": [50, 50, 60, 60], "label": 0, "score": 0.4, "consistency": 0.5}]}
        >>> match_val_predictions(preds, gt, 0.5).correct.tolist()
        [True, False]
    """
    check_predictions(val_predictions, f"{split} predictions")
    cats = CategoryMap.from_coco(val_gt)
    if list(cats.names) != list(val_predictions["class_names"]):
        raise ValueError(f"{split} ground truth classes {list(cats.names)} differ from the teacher's classes "
                         f"{val_predictions['class_names']} (the teacher must be trained on this data)")
    image_ids = {img["file_name"]: img["id"] for img in val_gt["images"]}
    boxes = val_predictions["boxes"]
    missing = sorted({b["file_name"] for b in boxes} - set(image_ids))
    if missing:
        raise ValueError(f"{split} predictions on files not in the {split} ground truth: {missing[:5]}"
                         f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
    results = [{"image_id": image_ids[b["file_name"]], "category_id": cats.ids[b["label"]],
                "bbox": xyxy_to_coco(b["bbox"]).tolist(), "score": float(b["score"])} for b in boxes]
    correct = match_predictions(val_gt, results, iou_threshold=match_iou)
    return ValBoxes(
        labels=np.array([b["label"] for b in boxes], dtype=np.int64),
        scores=np.array([b["score"] for b in boxes], dtype=np.float64),
        consistency=np.array([b["consistency"] for b in boxes], dtype=np.float64),
        correct=np.array(correct, dtype=bool),
    )


# ---------------------------------------------------------------------------------------------------------------
# One calibrator
# ---------------------------------------------------------------------------------------------------------------


def _logit(scores: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(s) - np.log1p(-s)


@dataclass(frozen=True)
class Calibrator:
    """``p = isotonic(a * logit(score) + b * consistency + c)``; see the module docstring.

    Attributes:
        coef_score: ``a`` (> 0: monotone in the score).
        coef_consistency: ``b`` (>= 0).
        intercept: ``c``.
        iso_x: Isotonic regression's ``X_thresholds_`` (ascending ``z`` values).
        iso_y: Isotonic regression's ``y_thresholds_`` (non-decreasing probabilities).
        n_boxes: Val boxes it was fitted on.
        n_correct: How many of them were correct.
    """

    coef_score: float
    coef_consistency: float
    intercept: float
    iso_x: tuple[float, ...]
    iso_y: tuple[float, ...]
    n_boxes: int
    n_correct: int

    def projection(self, scores: Sequence[float] | np.ndarray, consistency: Sequence[float] | np.ndarray) -> np.ndarray:
        """The logistic step's linear output ``z`` ``[N]`` (what the isotonic step maps to a probability)."""
        z = self.coef_score * _logit(scores) + self.coef_consistency * np.asarray(consistency, dtype=np.float64)
        return z + self.intercept

    def predict(self, scores: Sequence[float] | np.ndarray, consistency: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``[N]`` for ``scores`` ``[N]`` and ``consistency`` ``[N]``.

        The isotonic fit's step function read from the left: a box gets the value of the last fitted ``z`` at or
        below its own (the first one's value below them all). At the boxes it was fitted on this is exactly
        scikit-learn's ``predict``. Between two blocks of fitted boxes, where scikit-learn interpolates linearly, it
        is the lower block's value: no fitted box lies there, and monotonicity guarantees only that much (see "Between
        two val blocks" in the module docstring).

        Example:
            >>> cal = fit_calibrator(np.array([0.1, 0.3, 0.8, 0.9]), np.ones(4), np.array([0, 0, 1, 1]) > 0)
            >>> cal.predict(np.array([0.3, 0.5, 0.8]), np.ones(3)).tolist()  # IsotonicRegression.predict: 0, 0.38, 1
            [0.0, 0.0, 1.0]
        """
        z = self.projection(scores, consistency)
        x, y = np.asarray(self.iso_x), np.asarray(self.iso_y)
        return y[np.clip(np.searchsorted(x, z, side="right") - 1, 0, len(x) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"coef_logit_score": self.coef_score, "coef_consistency": self.coef_consistency,
                "intercept": self.intercept, "isotonic_x": list(self.iso_x), "isotonic_y": list(self.iso_y),
                "n_boxes": self.n_boxes, "n_correct": self.n_correct}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        return cls(float(d["coef_logit_score"]), float(d["coef_consistency"]), float(d["intercept"]),
                   tuple(float(v) for v in d["isotonic_x"]), tuple(float(v) for v in d["isotonic_y"]),
                   int(d["n_boxes"]), int(d["n_correct"]))


def _logistic(features: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, float]:
    """Logistic regression coefficients in the raw feature space (features standardised for the L2 penalty)."""
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant feature (one TTA view: consistency 1) gets coefficient ~0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable data: the direction is still right
        model = LogisticRegression(C=1.0, max_iter=1000).fit((features - mean) / std, correct)
    coef = model.coef_[0] / std
    return coef, float(model.intercept_[0] - (coef * mean).sum())


def fit_calibrator(scores: np.ndarray, consistency: np.ndarray, correct: np.ndarray) -> Calibrator:
    """Fit ``(score, consistency) -> P(correct)`` (logistic projection then isotonic; see the module docstring).

    Args:
        scores: ``[N]`` raw scores in ``[0, 1]``.
        consistency: ``[N]`` TTA consistency in ``[0, 1]``.
        correct: bool ``[N]``.

    Returns:
        The fitted calibrator.

    Raises:
        ValueError: No boxes, or arrays of different lengths.

    Example:
        >>> cal = fit_calibrator(np.array([0.2, 0.4, 0.6, 0.8]), np.ones(4), np.array([False, False, True, True]))
        >>> cal.predict([0.1, 0.9], [1.0, 1.0]).round(3).tolist()
        [0.0, 1.0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    consistency = np.asarray(consistency, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if not len(scores) == len(consistency) == len(correct):
        raise ValueError(f"scores, consistency and correct differ in length: {len(scores)}, {len(consistency)}, "
                         f"{len(correct)}")
    if len(scores) == 0:
        raise ValueError("cannot fit a calibrator on no boxes")
    x_score = _logit(scores)
    a, b, c = 1.0, 0.0, 0.0  # fallback: z = logit(score)
    if 0 < correct.sum() < len(correct):
        coef, c = _logistic(np.column_stack([x_score, consistency]), correct)
        a, b = float(coef[0]), float(coef[1])
        if b < 0:  # more agreement across views must never lower P(correct): drop the feature
            coef, c = _logistic(x_score[:, None], correct)
            a, b = float(coef[0]), 0.0
        if a <= 0:  # the score carries no usable signal here; keep the score order rather than invert it
            a, b, c = 1.0, 0.0, 0.0
    return _with_isotonic(a, b, c, x_score, consistency, correct)


def _with_isotonic(a: float, b: float, c: float, x_score: np.ndarray, consistency: np.ndarray,
                   correct: np.ndarray) -> Calibrator:
    z = a * x_score + b * consistency + c
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(z, correct.astype(float))
    return Calibrator(a, b, c, tuple(float(v) for v in iso.X_thresholds_), tuple(float(v) for v in iso.y_thresholds_),
                      int(len(correct)), int(correct.sum()))


def refit_isotonic(base: Calibrator, scores: np.ndarray, consistency: np.ndarray, correct: np.ndarray) -> Calibrator:
    """``base``'s projection ``z`` kept, its isotonic step re-fitted on other labelled boxes (the reviewed ones).

    Example:
        >>> base = fit_calibrator(np.array([0.2, 0.4, 0.6, 0.8]), np.ones(4), np.array([False, False, True, True]))
        >>> new = refit_isotonic(base, np.array([0.5, 0.7, 0.9]), np.ones(3), np.array([False, False, True]))
        >>> new.coef_score == base.coef_score, new.predict([0.6, 0.95], [1.0, 1.0]).round(3).tolist()
        (True, [0.0, 1.0])
    """
    scores = np.asarray(scores, dtype=np.float64)
    consistency = np.asarray(consistency, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if not len(scores) == len(consistency) == len(correct) or len(scores) == 0:
        raise ValueError(f"need one or more boxes with scores, consistency and correct of one length: {len(scores)}, "
                         f"{len(consistency)}, {len(correct)}")
    return _with_isotonic(base.coef_score, base.coef_consistency, base.intercept, _logit(scores), consistency, correct)


def select_threshold(probabilities: np.ndarray, correct: np.ndarray,
                     target_precision: float) -> tuple[float | None, float | None, float | None, int]:
    """The lowest ``t`` among ``probabilities`` whose set ``{p >= t}`` reaches the target precision.

    "Reaches" means both the calibrated precision (mean ``p`` of the set) and the empirical precision (fraction
    correct) are ``>= target_precision``.

    Args:
        probabilities: ``[N]`` calibrated probabilities of one class's val boxes.
        correct: bool ``[N]``.
        target_precision: The precision to reach.

    Returns:
        ``(threshold, calibrated_precision, empirical_precision, n_accepted)`` of the chosen set, or
        ``(None, None, None, 0)`` when no threshold reaches the target (or there are no boxes).

    Example:
        >>> p = np.array([0.95, 0.9, 0.85, 0.6])
        >>> select_threshold(p, np.array([True, True, True, False]), 0.85)
        (0.85, 0.9, 1.0, 3)
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    ends = _set_ends(p)
    n = ends + 1
    calibrated, empirical = np.cumsum(p)[ends] / n, np.cumsum(y)[ends] / n
    ok = np.flatnonzero((calibrated >= target_precision - _TOL) & (empirical >= target_precision - _TOL))
    if len(ok) == 0:
        return None, None, None, 0
    i = ok[-1]  # the largest such set: the lowest threshold
    return float(p[ends[i]]), float(calibrated[i]), float(empirical[i]), int(n[i])


def _set_ends(descending: np.ndarray) -> np.ndarray:
    """Indices ``[M]`` where the sets ``{v >= t}`` of a descending array end: the last occurrence of each value.

    Example:
        >>> _set_ends(np.array([0.9, 0.8, 0.8, 0.5])).tolist()
        [0, 2, 3]
    """
    return np.flatnonzero(np.append(descending[1:] != descending[:-1], True)) if len(descending) else np.zeros(0, int)


# ---------------------------------------------------------------------------------------------------------------
# Per-class calibration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewedEvidence:
    """What a class re-calibrated on the reviewers' decisions (kind ``"reviewed"``) was fitted on.

    Attributes:
        boxes: Reviewed labels of the class.
        correct: How many of them the teacher got right.
        in_accepted_range: How many lay at or above the val threshold (under the val calibrator).
        accepted: Reviewed labels at or above the new threshold.
        calibrated_precision: Mean ``p`` of those (``None`` without a threshold).
        empirical_precision: Fraction right of those (``None`` without a threshold).
        val_kind: The val calibration it replaced (``"per-class"`` or ``"pooled"``).
        val_threshold: That calibration's threshold.
    """

    boxes: int
    correct: int
    in_accepted_range: int
    accepted: int
    calibrated_precision: float | None
    empirical_precision: float | None
    val_kind: Literal["per-class", "pooled"]
    val_threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": self.boxes, "correct": self.correct, "in_accepted_range": self.in_accepted_range,
                "accepted": self.accepted, "calibrated_precision": self.calibrated_precision,
                "empirical_precision": self.empirical_precision, "val_kind": self.val_kind,
                "val_threshold": self.val_threshold}


@dataclass(frozen=True)
class ClassCalibration:
    """One class's calibrator, threshold and the val evidence behind them.

    Attributes:
        name: Class name.
        kind: ``"per-class"``, ``"pooled"`` (fewer than ``min_calibration_boxes`` val boxes) or ``"reviewed"``
            (re-fitted on the reviewers' decisions, :func:`recalibrate`).
        calibrator: The calibrator used for this class (the pooled one when ``kind == "pooled"``).
        threshold: Accept ``p >= threshold``; ``None``: accept nothing.
        val_boxes: The class's val boxes.
        val_correct: How many were correct.
        val_accepted: Val boxes at or above the threshold.
        val_calibrated_precision: Mean ``p`` of those (``None`` without a threshold).
        val_empirical_precision: Fraction correct of those (``None`` without a threshold).
        reviewed: The review evidence when ``kind == "reviewed"`` (the ``val_*`` fields still describe val).
        val_calibrator: When ``kind == "reviewed"``, the val calibrator it replaced, still used *below* the reviewed
            labels' range (:meth:`predict`, :meth:`acceptable`).
    """

    name: str
    kind: Literal["per-class", "pooled", "reviewed"]
    calibrator: Calibrator
    threshold: float | None
    val_boxes: int
    val_correct: int
    val_accepted: int
    val_calibrated_precision: float | None
    val_empirical_precision: float | None
    reviewed: ReviewedEvidence | None = None
    val_calibrator: Calibrator | None = None

    def predict(self, scores: np.ndarray, consistency: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``[N]`` of this class's boxes.

        A class re-fitted on reviewed labels knows nothing from them below their range (an isotonic fit is
        constant there: a class whose few wrong reviewed labels all score high would accept every weak box). There
        its probability is ``min(p_val, p at the bottom of the reviewed range)``: monotonicity bounds it by the
        latter, and the val calibrator is the only evidence left.
        """
        p = self.calibrator.predict(scores, consistency)
        if self.val_calibrator is not None:
            below = self._below_reviewed(scores, consistency)
            p[below] = np.minimum(self.val_calibrator.predict(scores[below], consistency[below]),
                                  self.calibrator.iso_y[0])
        return p

    def _below_reviewed(self, scores: np.ndarray, consistency: np.ndarray) -> np.ndarray:
        # The reviewed fit keeps the val projection (recalibrate), so "below" is in the variable the review selected on.
        return self.calibrator.projection(scores, consistency) < self.calibrator.iso_x[0]

    def acceptable(self, scores: np.ndarray, consistency: np.ndarray, floor: float | None = None) -> np.ndarray:
        """bool ``[N]``: boxes this class may accept at all (given ``p >= threshold``).

        Every box, except for a class re-fitted on reviewed labels:

        - below their range it accepts only what val accepts too (``p_val >=`` the val threshold). Its threshold is
          chosen among the reviewed labels and can lie at the bottom of their fit, where ``predict`` caps the boxes
          below; without this rule those boxes would all pass, however weak;
        - anywhere, ``p_val >= floor`` when a floor is given: the filter passes the band the class accepted before
          review, widened only as far as reviewed labels below it support (:func:`widening_floor`).

        Args:
            scores: ``[N]`` raw scores.
            consistency: ``[N]`` TTA consistency.
            floor: The lowest ``p_val`` (the val calibrator's probability) the class may accept; ``None``: no floor.
                Unused for a class that was not re-fitted.

        Example:
            >>> val = fit_calibrator(np.linspace(0.05, 1, 40), np.ones(40), np.linspace(0.05, 1, 40) > 0.3)
            >>> rev = refit_isotonic(val, np.array([0.8, 0.85, 0.9, 0.95]), np.ones(4), np.array([0, 1, 1, 1]) > 0)
            >>> ev = ReviewedEvidence(4, 3, 4, 4, 0.75, 0.75, "per-class", 0.9)
            >>> c = ClassCalibration("cat", "reviewed", rev, 0.0, 40, 28, 28, 0.95, 0.95, ev, val)
            >>> c.acceptable(np.array([0.1, 0.5, 0.9]), np.ones(3)).tolist()  # 0.1: below reviewed 0.8 and val 0.3
            [False, True, True]
        """
        scores = np.asarray(scores, dtype=np.float64)
        consistency = np.asarray(consistency, dtype=np.float64)
        ok = np.ones(len(scores), dtype=bool)
        if self.val_calibrator is None:
            return ok
        below = self._below_reviewed(scores, consistency)
        p_val = self.val_calibrator.predict(scores, consistency)
        val_threshold = None if self.reviewed is None else self.reviewed.val_threshold
        ok[below] = False if val_threshold is None else p_val[below] >= val_threshold
        if floor is not None:
            ok &= p_val >= floor
        return ok

    def before_review(self) -> ClassCalibration:
        """This class as general val calibrated it (itself when it was not re-fitted on reviewed labels)."""
        if self.reviewed is None or self.val_calibrator is None:
            return self
        return ClassCalibration(self.name, self.reviewed.val_kind, self.val_calibrator, self.reviewed.val_threshold,
                                self.val_boxes, self.val_correct, self.val_accepted, self.val_calibrated_precision,
                                self.val_empirical_precision)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "val_boxes": self.val_boxes,
                "val_correct": self.val_correct, "val_accepted": self.val_accepted,
                "val_calibrated_precision": self.val_calibrated_precision,
                "val_empirical_precision": self.val_empirical_precision,
                "calibrator": None if self.kind == "pooled" else self.calibrator.to_dict(),
                "reviewed": None if self.reviewed is None else self.reviewed.to_dict(),
                "val_calibrator": None if self.val_calibrator is None else self.val_calibrator.to_dict()}


@dataclass(frozen=True)
class Calibration:
    """Every class's calibration, plus the pooled calibrator; what ``calibration.json`` holds.

    Attributes:
        class_names: The teacher's classes, in label order.
        classes: One :class:`ClassCalibration` per class, in label order.
        pooled: The calibrator fitted on all classes' val boxes.
        target_precision: The target the thresholds were chosen for.
        match_iou: IoU used to decide correctness on val.
        min_calibration_boxes: Fewer val boxes than this: pooled calibrator.
    """

    class_names: tuple[str, ...]
    classes: tuple[ClassCalibration, ...]
    pooled: Calibrator
    target_precision: float
    match_iou: float
    min_calibration_boxes: int

    def probability(self, labels: np.ndarray, scores: np.ndarray, consistency: np.ndarray) -> np.ndarray:
        """Calibrated ``P(correct)`` ``[N]`` of boxes with contiguous ``labels`` ``[N]``."""
        labels = np.asarray(labels, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        consistency = np.asarray(consistency, dtype=np.float64)
        out = np.zeros(len(labels), dtype=np.float64)
        for label, cls in enumerate(self.classes):
            mask = labels == label
            if mask.any():
                out[mask] = cls.predict(scores[mask], consistency[mask])
        return out

    def acceptable(self, labels: np.ndarray, scores: np.ndarray, consistency: np.ndarray,
                   floors: np.ndarray | None = None) -> np.ndarray:
        """bool ``[N]``: boxes their class may accept at all (:meth:`ClassCalibration.acceptable`; ``floors``:
        ``[K]`` per-label floors on the val scale, ``inf`` for none accepted, or ``None``)."""
        labels = np.asarray(labels, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        consistency = np.asarray(consistency, dtype=np.float64)
        out = np.ones(len(labels), dtype=bool)
        for label, cls in enumerate(self.classes):
            mask = labels == label
            if mask.any():
                floor = None if floors is None else float(floors[label])
                out[mask] = cls.acceptable(scores[mask], consistency[mask], floor)
        return out

    def before_review(self) -> Calibration:
        """The general-val calibration this one was re-fitted from (:func:`recalibrate`); itself if none was."""
        return replace(self, classes=tuple(c.before_review() for c in self.classes))

    def thresholds(self) -> np.ndarray:
        """Per-label accept thresholds ``[K]``; ``inf`` for a class that accepts nothing."""
        return np.array([math.inf if c.threshold is None else c.threshold for c in self.classes], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "isotonic(a * logit(score) + b * consistency + c), see dataengine.pseudo.calibrate",
                "target_precision": self.target_precision, "match_iou": self.match_iou,
                "min_calibration_boxes": self.min_calibration_boxes, "class_names": list(self.class_names),
                "pooled": self.pooled.to_dict(), "classes": {c.name: c.to_dict() for c in self.classes}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Rebuild a calibration from :meth:`to_dict`'s output (e.g. ``calibration.json``)."""
        pooled = Calibrator.from_dict(d["pooled"])
        classes = []
        for name in d["class_names"]:
            c = d["classes"][name]
            calibrator = pooled if c["kind"] == "pooled" else Calibrator.from_dict(c["calibrator"])
            reviewed = ReviewedEvidence(**c["reviewed"]) if c.get("reviewed") else None
            val_calibrator = Calibrator.from_dict(c["val_calibrator"]) if c.get("val_calibrator") else None
            classes.append(ClassCalibration(name, c["kind"], calibrator, c["threshold"], c["val_boxes"],
                                            c["val_correct"], c["val_accepted"], c["val_calibrated_precision"],
                                            c["val_empirical_precision"], reviewed, val_calibrator))
        return cls(tuple(d["class_names"]), tuple(classes), pooled, float(d["target_precision"]),
                   float(d["match_iou"]), int(d["min_calibration_boxes"]))


def fit_calibration(val: ValBoxes, class_names: Sequence[str], params: FilterParams) -> Calibration:
    """Fit every class's calibrator (or the pooled one) and threshold on the val boxes.

    Args:
        val: The val boxes with correctness (:func:`match_val_predictions`).
        class_names: The teacher's classes, in label order.
        params: ``target_precision``, ``min_calibration_boxes`` and ``match_iou`` (recorded) are used.

    Returns:
        The calibration.

    Raises:
        ValueError: No val boxes at all (the teacher found nothing on val: nothing to calibrate on), or a label
            outside ``class_names``.

    Example:
        >>> val = ValBoxes(np.array([0, 0]), np.array([0.9, 0.2]), np.ones(2), np.array([True, False]))
        >>> cal = fit_calibration(val, ["cat", "dog"], FilterParams(min_calibration_boxes=1))
        >>> [c.kind for c in cal.classes], cal.classes[0].threshold, cal.classes[1].threshold
        (['per-class', 'pooled'], 1.0, None)
    """
    names = tuple(class_names)
    if len(val.labels) == 0:
        raise ValueError("the teacher has no box on general val: nothing to calibrate the filter on")
    if val.labels.min() < 0 or val.labels.max() >= len(names):
        raise ValueError(f"val box labels must be in 0..{len(names) - 1} for classes {list(names)}")
    pooled = fit_calibrator(val.scores, val.consistency, val.correct)
    classes = []
    for label, name in enumerate(names):
        mask = val.labels == label
        n = int(mask.sum())
        kind: Literal["per-class", "pooled"] = "per-class" if n >= params.min_calibration_boxes else "pooled"
        calibrator = fit_calibrator(val.scores[mask], val.consistency[mask], val.correct[mask]) \
            if kind == "per-class" else pooled
        p = calibrator.predict(val.scores[mask], val.consistency[mask])
        threshold, calibrated, empirical, accepted = select_threshold(p, val.correct[mask], params.target_precision)
        classes.append(ClassCalibration(name, kind, calibrator, threshold, n, int(val.correct[mask].sum()),
                                        accepted, calibrated, empirical))
    return Calibration(names, tuple(classes), pooled, params.target_precision, params.match_iou,
                       params.min_calibration_boxes)


def recalibrate(calibration: Calibration, reviewed: ValBoxes, min_reviewed_accepted: int) -> Calibration:
    """Re-fit the classes with enough review evidence on the reviewers' decisions (see the module docstring).

    Args:
        calibration: The val calibration (:func:`fit_calibration`).
        reviewed: The pool labels people decided on: labels, raw scores, consistency and whether the teacher was
            right (:func:`dataengine.review.curate.teacher_verdicts`).
        min_reviewed_accepted: Reviewed labels a class needs in its val-accepted range (``p_val >=`` val threshold);
            0 turns re-calibration off.

    Returns:
        A calibration whose qualifying classes have kind ``"reviewed"``: the val projection with its isotonic step
        and the threshold fitted on the reviewed labels (:func:`refit_isotonic`, :func:`select_threshold`; the val
        calibrator is kept for boxes below the reviewed range, :meth:`ClassCalibration.predict` and
        :meth:`ClassCalibration.acceptable`); the others are unchanged.

    Raises:
        ValueError: A reviewed label outside the calibration's classes.

    Example:
        >>> grid = np.linspace(0.05, 1, 40)
        >>> val = ValBoxes(np.zeros(40, dtype=int), grid, np.ones(40), grid > 0.3)
        >>> cal = fit_calibration(val, ["cat"], FilterParams(min_calibration_boxes=10))
        >>> scores = np.linspace(0.5, 1, 30)  # on the scenario, only the top third is right
        >>> rev = ValBoxes(np.zeros(30, dtype=int), scores, np.ones(30), scores > 0.83)
        >>> new = recalibrate(cal, rev, min_reviewed_accepted=20)
        >>> def lowest_accepted_score(c):  # thresholds are in each calibrator's own p: compare raw scores
        ...     grid = np.linspace(0, 1, 101)
        ...     return grid[c.classes[0].predict(grid, np.ones(101)) >= c.classes[0].threshold].min()
        >>> new.classes[0].kind, float(lowest_accepted_score(cal)), float(lowest_accepted_score(new))
        ('reviewed', 0.32, 0.85)
    """
    if len(reviewed.labels) and (reviewed.labels.min() < 0 or reviewed.labels.max() >= len(calibration.classes)):
        raise ValueError(f"reviewed label ids must be in 0..{len(calibration.classes) - 1} for classes "
                         f"{list(calibration.class_names)}")
    classes = []
    for label, cls in enumerate(calibration.classes):
        mask = reviewed.labels == label
        scores, consistency, correct = reviewed.scores[mask], reviewed.consistency[mask], reviewed.correct[mask]
        n, right = int(mask.sum()), int(correct.sum())
        p_val = cls.predict(scores, consistency)
        in_range = 0 if cls.threshold is None else int((p_val >= cls.threshold).sum())
        if min_reviewed_accepted == 0 or in_range < min_reviewed_accepted or right in (0, n):
            classes.append(cls)
            continue
        calibrator = refit_isotonic(cls.calibrator, scores, consistency, correct)
        p = calibrator.predict(scores, consistency)
        threshold, calibrated, empirical, accepted = select_threshold(p, correct, calibration.target_precision)
        evidence = ReviewedEvidence(n, right, in_range, accepted, calibrated, empirical, cls.kind, cls.threshold)
        classes.append(ClassCalibration(cls.name, "reviewed", calibrator, threshold, cls.val_boxes, cls.val_correct,
                                        cls.val_accepted, cls.val_calibrated_precision, cls.val_empirical_precision,
                                        evidence, cls.calibrator))
    return Calibration(calibration.class_names, tuple(classes), calibration.pooled, calibration.target_precision,
                       calibration.match_iou, calibration.min_calibration_boxes)


def widening_floor(cls: ClassCalibration, floor: float, reviewed: ValBoxes | None, label: int,
                   target_precision: float, min_reviewed: int) -> float:
    """How far below ``floor`` a re-fitted class may accept: the lowest ``p_val`` its reviewed labels support.

    ``floor`` is the band the class accepted before review, on the val calibrator's scale. Widening it means
    accepting boxes val rated lower; the re-fitted calibrator prices them by interpolating its reviewed labels, which
    may have none there. So the reviewed labels the re-fit would accept below ``floor`` are checked on their own:
    walking down their ``p_val`` values, the lowest ``w`` whose labels in ``[w, floor)`` number at least
    ``min_reviewed`` and are right at least ``target_precision`` of the time; ``floor`` itself when none is.

    Args:
        cls: A class calibration (unchanged ``floor`` unless its kind is ``"reviewed"``).
        floor: The pre-review threshold on the val scale (``inf``: it accepted nothing).
        reviewed: The reviewed pool labels (all classes); ``None``: none, so no widening.
        label: This class's label id.
        target_precision: The precision the widened part must reach.
        min_reviewed: Reviewed labels it needs (``filter.min_reviewed_accepted``).

    Returns:
        The floor to pass to :meth:`ClassCalibration.acceptable`, ``<= floor``.

    Example:
        >>> grid = np.round(np.linspace(0.01, 0.99, 99), 2)
        >>> val = Calibrator(1.0, 0.0, 0.0, tuple(_logit(grid)), tuple(grid), 100, 50)  # p_val == score
        >>> ev = ReviewedEvidence(30, 25, 30, 30, 0.9, 0.83, "per-class", 0.5)
        >>> c = ClassCalibration("cat", "reviewed", val, 0.5, 100, 50, 50, 0.9, 0.9, ev, val)
        >>> scores = np.array([0.65] * 25 + [0.6] * 5)  # below a pre-review band from 0.7: 25 right, then 5 wrong
        >>> rev = ValBoxes(np.zeros(30, dtype=int), scores, np.ones(30), np.arange(30) < 25)
        >>> round(widening_floor(c, 0.7, rev, 0, 0.9, 20), 2), widening_floor(c, 0.7, rev, 0, 0.9, 26)
        (0.65, 0.7)
    """
    if cls.val_calibrator is None or cls.threshold is None or reviewed is None:
        return floor
    mask = reviewed.labels == label
    scores, consistency, correct = reviewed.scores[mask], reviewed.consistency[mask], reviewed.correct[mask]
    p_val = cls.val_calibrator.predict(scores, consistency)
    # The reviewed labels in the widened part that the re-fit would accept.
    accepted = p_val < floor
    accepted &= cls.acceptable(scores, consistency) & (cls.predict(scores, consistency) >= cls.threshold)
    order = np.argsort(-p_val[accepted], kind="stable")
    p, right = p_val[accepted][order], correct[accepted][order].astype(np.float64)
    ends = _set_ends(p)
    n = ends + 1
    ok = np.flatnonzero((n >= min_reviewed) & (np.cumsum(right)[ends] / n >= target_precision - _TOL))
    return float(p[ends[ok[-1]]]) if len(ok) else floor


# ---------------------------------------------------------------------------------------------------------------
# Reliability plot
# ---------------------------------------------------------------------------------------------------------------


def _reliability(prob: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probability, accuracy and count per non-empty bin of ``[0, 1]``."""
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    mean_p = np.bincount(idx, weights=prob, minlength=bins)
    acc = np.bincount(idx, weights=correct.astype(float), minlength=bins)
    keep = count > 0
    return mean_p[keep] / count[keep], acc[keep] / count[keep], count[keep]


ReliabilitySeries = dict[str, dict[str, list[tuple[float, float, int]]]]
"""Per panel (class name, then ``"all classes"``), per series: ``(mean probability, fraction correct, boxes)`` of
every non-empty bin."""

_POOL_SERIES = (("pool, hidden labels", "tab:orange"), ("pool, reviewed labels", "tab:green"))


def plot_reliability(calibration: Calibration, val: ValBoxes, path: str | Path, *, bins: int = 10,
                     pool_truth: ValBoxes | None = None, reviewed: ValBoxes | None = None,
                     applied: dict[str, float | None] | None = None) -> ReliabilitySeries:
    """Write a reliability diagram PNG of the general-val calibration: per class (and all classes), the fraction
    of boxes that are correct against their calibrated ``p``, in bins; on val and, where known, on the pool.

    Each panel shows the diagonal, the class's val threshold (red line), the threshold the filter applied where it
    differs (dashed: raised for the pool's own mix) and these series (marker area ~ box count):

    - **val, calibrated p** (blue): the val boxes the calibrators were fitted on. In-sample, so they sit on the
      diagonal by construction; the raw score (grey) shows what calibration corrected.
    - **pool, hidden labels** (orange, ``pool_truth``): every pool box, matched to the pool's hidden labels as val
      is matched to its ground truth. A diagnostic where hidden labels exist (the demo, the BCCD profile). Below
      the diagonal, the calibration is optimistic on the scenario: the accepted band's estimated precision is too
      high.
    - **pool, reviewed labels** (green, ``reviewed``): the labels people decided on. The same question answered
      on real data, over the range of ``p`` the audit and the queue cover.

    Args:
        calibration: The calibration fitted on general val (not a re-calibrated one: the pool series measure how
            val's transfers).
        val: The val boxes it was fitted on.
        path: PNG to write (atomically).
        bins: Equal-width bins of ``[0, 1]``.
        pool_truth: Pool boxes with their correctness from hidden labels, or ``None``.
        reviewed: Reviewed pool labels (``correct`` = the teacher was right), or ``None``.
        applied: The threshold the filter applied per class name (``metrics["per_class"][name]["threshold"]``), on
            the same calibrated scale only where the class was not re-calibrated; ``None``: not drawn.

    Returns:
        The plotted points (:data:`ReliabilitySeries`) of the series with data, without the raw score.

    Example:
        >>> plot_reliability(cal, val, "data/filtered/reliability.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window from a pipeline stage
    import matplotlib.pyplot as plt

    k_classes = len(calibration.classes)
    names = [*(c.name for c in calibration.classes), "all classes"]
    subtitles = [*(f"{c.kind}, n={c.val_boxes}" for c in calibration.classes), f"n={len(val.labels)}"]
    thresholds = [*(c.threshold for c in calibration.classes), None]
    series = [(label, colour, boxes, calibration.probability(boxes.labels, boxes.scores, boxes.consistency))
              for (label, colour), boxes in zip((("val, calibrated p", "tab:blue"), *_POOL_SERIES),
                                                (val, pool_truth, reviewed))
              if boxes is not None and len(boxes.labels)]
    drawn: ReliabilitySeries = {name: {} for name in names}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes.flat, names)):
        ax.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1)
        for label, colour, boxes, prob in series:
            mask = boxes.labels == k if k < k_classes else np.ones(len(boxes.labels), dtype=bool)
            if not mask.any():
                continue
            if boxes is val:  # what calibration corrected
                x, acc, n = _reliability(val.scores[mask], val.correct[mask], bins)
                ax.scatter(x, acc, s=10 + 90 * n / n.max(), color="grey", alpha=0.6, label="val, raw score")
            x, acc, n = _reliability(prob[mask], boxes.correct[mask], bins)
            drawn[name][label] = [(float(a), float(b), int(c)) for a, b, c in zip(x, acc, n)]
            ax.plot(x, acc, color=colour, linewidth=1)
            ax.scatter(x, acc, s=10 + 90 * n / n.max(), color=colour, label=f"{label} ({int(mask.sum())})")
        if thresholds[k] is not None:
            ax.axvline(thresholds[k], color="tab:red", linewidth=1, label=f"val threshold {thresholds[k]:.2f}")
        used = (applied or {}).get(name)
        if used is not None and used != thresholds[k]:
            ax.axvline(used, color="tab:red", linewidth=1, linestyle="--", label=f"applied threshold {used:.2f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="calibrated probability (general val)", ylabel="fraction correct",
               title=f"{name} ({subtitles[k]})")
        if ax.get_legend_handles_labels()[0]:  # an empty panel (a class with no box) has nothing to label
            ax.legend(loc="upper left", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Reliability of the general-val calibration (match IoU {calibration.match_iou}, "
                 f"target precision {calibration.target_precision})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return drawn
