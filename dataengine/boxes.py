"""Box conventions. Inside the library every box is absolute ``xyxy`` in pixels (float).

Every conversion to and from an outside format lives here and is round-trip tested:

- COCO: absolute ``[x, y, w, h]``;
- FiftyOne: relative ``[x, y, w, h]`` in ``[0, 1]``;
- Label Studio: percent ``x, y, width, height`` in ``[0, 100]``;
- YOLO: relative centre ``[cx, cy, w, h]``.

The functions accept a NumPy array, a torch tensor or a sequence of shape ``[..., 4]`` and return the same kind
(sequences come back as NumPy arrays). They never modify their input.

Example:
    >>> xyxy_to_coco([10, 20, 30, 60]).tolist()
    [10.0, 20.0, 20.0, 40.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "coco_to_xyxy",
    "xyxy_to_coco",
    "xyxy_to_relative_xywh",
    "relative_xywh_to_xyxy",
    "xyxy_to_percent_xywh",
    "percent_xywh_to_xyxy",
    "yolo_to_xyxy",
    "xyxy_to_yolo",
    "clip_xyxy",
    "box_area",
]


def _as_array(boxes: Any) -> Any:
    if isinstance(boxes, torch.Tensor):
        return boxes.to(torch.float32 if not boxes.is_floating_point() else boxes.dtype)
    return np.asarray(boxes, dtype=np.float64)


def _stack(parts: list[Any], like: Any) -> Any:
    if isinstance(like, torch.Tensor):
        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def coco_to_xyxy(boxes: Any) -> Any:
    """COCO ``[x, y, w, h]`` (absolute) to ``[x1, y1, x2, y2]``."""
    b = _as_array(boxes)
    x, y, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return _stack([x, y, x + w, y + h], b)


def xyxy_to_coco(boxes: Any) -> Any:
    """``[x1, y1, x2, y2]`` to COCO ``[x, y, w, h]`` (absolute)."""
    b = _as_array(boxes)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return _stack([x1, y1, x2 - x1, y2 - y1], b)


def xyxy_to_relative_xywh(boxes: Any, width: float, height: float) -> Any:
    """``xyxy`` pixels to FiftyOne's relative ``[x, y, w, h]``."""
    b = xyxy_to_coco(boxes)
    scale = [1.0 / width, 1.0 / height, 1.0 / width, 1.0 / height]
    return b * (torch.tensor(scale, dtype=b.dtype) if isinstance(b, torch.Tensor) else np.asarray(scale))


def relative_xywh_to_xyxy(boxes: Any, width: float, height: float) -> Any:
    """FiftyOne's relative ``[x, y, w, h]`` to ``xyxy`` pixels."""
    b = _as_array(boxes)
    scale = [width, height, width, height]
    b = b * (torch.tensor(scale, dtype=b.dtype) if isinstance(b, torch.Tensor) else np.asarray(scale))
    return coco_to_xyxy(b)


def xyxy_to_percent_xywh(boxes: Any, width: float, height: float) -> Any:
    """``xyxy`` pixels to Label Studio's percent ``[x, y, width, height]``."""
    return xyxy_to_relative_xywh(boxes, width, height) * 100.0


def percent_xywh_to_xyxy(boxes: Any, width: float, height: float) -> Any:
    """Label Studio's percent ``[x, y, width, height]`` to ``xyxy`` pixels."""
    return relative_xywh_to_xyxy(_as_array(boxes) / 100.0, width, height)


def yolo_to_xyxy(boxes: Any, width: float, height: float) -> Any:
    """YOLO relative ``[cx, cy, w, h]`` to ``xyxy`` pixels."""
    b = _as_array(boxes)
    cx, cy, w, h = b[..., 0] * width, b[..., 1] * height, b[..., 2] * width, b[..., 3] * height
    return _stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], b)


def xyxy_to_yolo(boxes: Any, width: float, height: float) -> Any:
    """``xyxy`` pixels to YOLO relative ``[cx, cy, w, h]``."""
    b = _as_array(boxes)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return _stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], b)


def clip_xyxy(boxes: Any, width: float, height: float) -> Any:
    """Clip ``xyxy`` boxes to the image ``[0, width] x [0, height]``."""
    b = _as_array(boxes)
    if isinstance(b, torch.Tensor):
        out = b.clone()
        out[..., 0::2] = out[..., 0::2].clamp(0, width)
        out[..., 1::2] = out[..., 1::2].clamp(0, height)
        return out
    out = b.copy()
    out[..., 0::2] = np.clip(out[..., 0::2], 0, width)
    out[..., 1::2] = np.clip(out[..., 1::2], 0, height)
    return out


def box_area(boxes: Any) -> Any:
    """Area of ``xyxy`` boxes (zero for inverted boxes)."""
    b = _as_array(boxes)
    if isinstance(b, torch.Tensor):
        return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
