"""Weighted box fusion of test-time-augmentation views, with per-box agreement measures.

Each TTA view (flip, scale) gives its own detections, already mapped back to the original image. Per class, boxes
of all views are clustered and each cluster becomes one box whose corners are the score-weighted mean of its
members' (weighted box fusion, Solovyev et al. 2021, "Weighted boxes fusion: ensembling boxes from different object
detection models", Algorithm 1; NMS would keep one view's box and throw the others' evidence away).

Hand-written rather than ``ensemble_boxes.weighted_boxes_fusion`` because the pseudo-label filter needs each
fused box's **members** (which view contributed which box), and that function returns only the fused boxes; it also
wants coordinates normalised to [0, 1]. Two deliberate differences from the paper:

- a cluster takes **at most one box per view** (the best-IoU cluster that has none from that view yet), so "the
  matching box of each view" is well defined (within a view, NMS already left at most one box per object);
- the fused score is ``sum(member scores) / T`` over the ``T`` views: the paper's average rescaled by
  ``min(T, n) / T`` (its ``conf_type='avg'``), i.e. a view that missed the object counts as score 0.

Agreement measures, over the ``T`` views (a view without a member counts 0 / score 0):

- ``consistency``: mean IoU between the fused box and each view's member: 1 when every view found the same box;
- ``score_std``: population standard deviation of the per-view scores;
- ``views``: how many views found the object.

Example:
    >>> import torch
    >>> a = ViewBoxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.8]), torch.tensor([0]))
    >>> b = ViewBoxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.4]), torch.tensor([0]))
    >>> fused = fuse_boxes([a, b], iou_threshold=0.55)
    >>> fused.boxes.tolist(), round(fused.scores.item(), 6), fused.consistency.tolist(), fused.views.tolist()
    ([[0.0, 0.0, 10.0, 10.0]], 0.6, [1.0], [2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FusedBoxes", "ViewBoxes", "fuse_boxes"]


@dataclass(frozen=True)
class ViewBoxes:
    """One view's detections in original image coordinates.

    Attributes:
        boxes: ``[M, 4]`` xyxy pixels.
        scores: ``[M]``.
        labels: int64 ``[M]``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class FusedBoxes:
    """Fused detections, sorted by score (descending), then label, then corners.

    Attributes:
        boxes: float64 ``[F, 4]`` xyxy pixels.
        scores: float64 ``[F]``, ``sum(member scores) / T``.
        labels: int64 ``[F]``.
        consistency: float64 ``[F]``, mean IoU of the fused box with each view's member (0 for a missing view).
        score_std: float64 ``[F]``, standard deviation of the ``T`` per-view scores (0 for a missing view).
        views: int64 ``[F]``, number of views with a member.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    consistency: torch.Tensor
    score_std: torch.Tensor
    views: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def fuse_boxes(views: Sequence[ViewBoxes], iou_threshold: float) -> FusedBoxes:
    """Weighted box fusion of the views' detections, per class (see the module docstring).

    Boxes join a cluster when their IoU with its current fused box is **above** ``iou_threshold`` (as in the paper),
    in order of decreasing score (ties: view order, then the view's own order), so the result is deterministic.

    Args:
        views: ``T >= 1`` views' detections, all in the same (original image) coordinates.
        iou_threshold: Minimum IoU (exclusive) with a cluster's fused box to join it.

    Returns:
        The fused boxes (float64).

    Raises:
        ValueError: No views, or a view whose tensors disagree in length.

    Example:
        >>> v = ViewBoxes(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([0.5]), torch.tensor([2]))
        >>> f = fuse_boxes([v, ViewBoxes(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))], 0.5)
        >>> f.scores.tolist(), f.consistency.tolist(), f.score_std.tolist(), f.views.tolist()
        ([0.25], [0.5], [0.25], [1])
    """
    if not views:
        raise ValueError("fuse_boxes needs at least one view")
    for i, v in enumerate(views):
        if not (v.boxes.shape[0] == v.scores.shape[0] == v.labels.shape[0]) or v.boxes.shape[-1:] != (4,):
            raise ValueError(f"view {i}: boxes {tuple(v.boxes.shape)}, scores {tuple(v.scores.shape)} and labels "
                             f"{tuple(v.labels.shape)} must be [M, 4], [M] and [M]")
    n_views = len(views)
    boxes = np.concatenate([v.boxes.detach().cpu().double().reshape(-1, 4).numpy() for v in views])  # [N, 4]
    scores = np.concatenate([v.scores.detach().cpu().double().reshape(-1).numpy() for v in views])  # [N]
    labels = np.concatenate([v.labels.detach().cpu().long().reshape(-1).numpy() for v in views])  # [N]
    view_ids = np.concatenate([np.full(v.labels.numel(), i, dtype=np.int64) for i, v in enumerate(views)])  # [N]
    # Stable sort: equal scores keep view order, then each view's own order.
    order = np.argsort(-scores, kind="stable")

    fused_parts, label_parts, member_parts = [], [], []
    for label in np.unique(labels).tolist():
        idx = order[labels[order] == label]  # this class's boxes, best first
        m = len(idx)
        fused = np.zeros((m, 4))  # [<=m, 4] current fused box per cluster
        weighted = np.zeros((m, 4))  # score-weighted corner sums (the paper's Eq. 2 numerator)
        weight = np.zeros(m)  # score sums
        member = np.full((m, n_views), -1, dtype=np.int64)  # [<=m, T] index of each view's box, -1 if none
        n = 0
        for i in idx.tolist():
            view, box = view_ids[i], boxes[i]
            best = -1
            if n:
                ious = _iou(box, fused[:n])  # [n]
                ious[member[:n, view] >= 0] = -1.0  # one box per view and cluster
                best = int(ious.argmax())
                best = best if ious[best] > iou_threshold else -1
            if best < 0:
                best, n = n, n + 1
                fused[best] = box  # kept as is if every member scores 0 (nothing to weight by)
            member[best, view] = i
            weighted[best] += scores[i] * box
            weight[best] += scores[i]
            if weight[best] > 0:
                fused[best] = weighted[best] / weight[best]
        fused_parts.append(fused[:n])
        label_parts.append(np.full(n, label, dtype=np.int64))
        member_parts.append(member[:n])

    fused_boxes = np.concatenate(fused_parts) if fused_parts else np.zeros((0, 4))  # [F, 4]
    member = np.concatenate(member_parts) if member_parts else np.zeros((0, n_views), dtype=np.int64)  # [F, T]
    present = member >= 0
    safe = np.where(present, member, 0)
    per_view_scores = np.where(present, scores[safe], 0.0)  # [F, T], 0 for a missing view
    per_view_iou = np.where(present, _iou(fused_boxes[:, None], boxes[safe]), 0.0)  # [F, T]
    result = FusedBoxes(
        boxes=torch.from_numpy(fused_boxes),
        scores=torch.from_numpy(per_view_scores.sum(1) / n_views),
        labels=torch.from_numpy(np.concatenate(label_parts) if label_parts else np.zeros(0, dtype=np.int64)),
        consistency=torch.from_numpy(per_view_iou.mean(1)),
        score_std=torch.from_numpy(per_view_scores.std(1)),  # population std (ddof 0) over the T views
        views=torch.from_numpy(present.sum(1).astype(np.int64)),
    )
    return _sorted(result)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of broadcastable xyxy boxes ``[..., 4]`` (0 where the union is empty).

    NumPy rather than ``torchvision.ops.box_iou``: that one is pairwise (all-vs-all), while fusion needs one box
    against a handful of clusters once per input box, where a torch call's fixed overhead is most of the cost.
    """
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    area_a = np.maximum(a[..., 2] - a[..., 0], 0.0) * np.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = np.maximum(b[..., 2] - b[..., 0], 0.0) * np.maximum(b[..., 3] - b[..., 1], 0.0)
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def _sorted(f: FusedBoxes) -> FusedBoxes:
    """Sort by score (descending), then label, then corners: one order whatever the clustering order was."""
    scores, labels, boxes = f.scores.tolist(), f.labels.tolist(), f.boxes.tolist()
    keys = sorted(range(len(f)), key=lambda i: (-scores[i], labels[i], *boxes[i]))
    idx = torch.tensor(keys, dtype=torch.int64)
    return FusedBoxes(f.boxes[idx], f.scores[idx], f.labels[idx], f.consistency[idx], f.score_std[idx], f.views[idx])
