"""Evaluation: COCO detection metrics (pycocotools), pseudo-label precision/recall, confusers, segmentation IoU.

Every function returns a (possibly nested) dict whose undefined values are ``None``; :func:`flatten_metrics` turns
it into the flat ``{"a/b": float}`` JSON that ``dvc metrics`` reads.

Example:
    >>> flatten_metrics({"mAP": 0.5, "per_class_AP": {"cat": 0.25, "dog": None}, "num_images": 3})
    {'mAP': 0.5, 'per_class_AP/cat': 0.25, 'num_images': 3.0}
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from dataengine.evaluation.detection import (
    confuser_false_positives,
    confuser_false_positives_at_recall,
    evaluate_detection,
    match_predictions,
    precision_recall_at,
    precision_recall_curves,
)
from dataengine.evaluation.segmentation import SegmentationMeter

__all__ = [
    "evaluate_detection",
    "precision_recall_curves",
    "match_predictions",
    "precision_recall_at",
    "confuser_false_positives",
    "confuser_false_positives_at_recall",
    "SegmentationMeter",
    "flatten_metrics",
]


def flatten_metrics(d: Mapping[str, Any], sep: str = "/", *, prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts into ``{"outer/inner": float}`` for ``dvc metrics``; ``None`` values are dropped.

    Numbers (Python, NumPy, or 0-d tensors via ``.item()``) become ``float``; bools count as numbers (``1.0``/``0.0``).

    Args:
        d: Nested mapping of metrics; keys are joined with ``sep`` (non-string keys through ``str``).
        sep: Separator between nesting levels.
        prefix: Key prefix for the whole result (used by the recursion; also handy for ``"teacher"``/``"student"``).

    Returns:
        A flat dict of floats, in the input's key order.

    Raises:
        TypeError: A value that is neither a mapping, a number nor ``None`` (a list, a string...), naming its key;
            curves and other non-scalar outputs belong in plots files, not metrics.

    Example:
        >>> flatten_metrics({"seg": {"mIoU": 0.75, "per_class_IoU": {"background": 0.9}}}, prefix="student")
        {'student/seg/mIoU': 0.75, 'student/seg/per_class_IoU/background': 0.9}
    """
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, sep, prefix=name))
        elif isinstance(value, numbers.Number):
            out[name] = float(value)  # type: ignore[arg-type]
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy / torch scalars
            out[name] = float(value.item())
        else:
            raise TypeError(f"metric '{name}' is a {type(value).__name__}, expected a number, a dict or None")
    return out
