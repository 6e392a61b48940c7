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

__all__ = ["FusedBoxes", "ViewBoxes", "fuse_boxes", "fuse_boxes_batch"]


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
    """Weighted box fusion of one image's views, per class (see the module docstring).

    Boxes join a cluster when their IoU with its current fused box is **above** ``iou_threshold`` (as in the paper),
    in order of decreasing score (ties: view order, then the view's own order), so the result is deterministic.
    :func:`fuse_boxes_batch` does the same for many images at once, with the same result per image.

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
    return fuse_boxes_batch([views], iou_threshold)[0]


def fuse_boxes_batch(images: Sequence[Sequence[ViewBoxes]], iou_threshold: float) -> list[FusedBoxes]:
    """:func:`fuse_boxes` of each image, computed for all of them at once; the results are bit-identical.

    Fusion is sequential within one (image, class) group: each box's cluster depends on the clusters the better
    boxes made. Groups are independent, so the ``k``-th box of every group is placed in one vectorised step: the
    Python loop runs as often as the largest group has boxes, not once per box (a batch of 16 demo images has ~5,000
    boxes in 80 groups of at most a few hundred). Every value is computed with the same float64 operations in the
    same order as one box at a time.

    Args:
        images: Per image, its ``T >= 1`` views (the same ``T`` for every image).
        iou_threshold: Minimum IoU (exclusive) with a cluster's fused box to join it.

    Returns:
        Per image, its fused boxes.

    Raises:
        ValueError: An image without views, images with different numbers of views, or a view whose tensors
            disagree in length.

    Example:
        >>> v = ViewBoxes(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([0.5]), torch.tensor([2]))
        >>> [len(f) for f in fuse_boxes_batch([[v, v], [v, v]], 0.5)]
        [1, 1]
    """
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"fusion IoU threshold must be in [0, 1), got {iou_threshold}")
    if not images:
        return []
    n_views = len(images[0])
    for b, views in enumerate(images):
        if not views:
            raise ValueError(f"fuse_boxes: image {b} has no views")
        if len(views) != n_views:
            raise ValueError(f"fuse_boxes_batch: image {b} has {len(views)} views, image 0 has {n_views}")
        for i, v in enumerate(views):
            if not (v.boxes.shape[0] == v.scores.shape[0] == v.labels.shape[0]) or v.boxes.shape[-1:] != (4,):
                raise ValueError(f"image {b}, view {i}: boxes {tuple(v.boxes.shape)}, scores {tuple(v.scores.shape)} "
                                 f"and labels {tuple(v.labels.shape)} must be [M, 4], [M] and [M]")
    flat = [v for views in images for v in views]
    boxes = np.concatenate([v.boxes.detach().cpu().double().reshape(-1, 4).numpy() for v in flat])  # [N, 4]
    scores = np.concatenate([v.scores.detach().cpu().double().reshape(-1).numpy() for v in flat])  # [N]
    labels = np.concatenate([v.labels.detach().cpu().long().reshape(-1).numpy() for v in flat])  # [N]
    counts = np.array([v.labels.numel() for v in flat], dtype=np.int64)
    view_ids = np.repeat(np.tile(np.arange(n_views), len(images)), counts)  # [N]
    image_ids = np.repeat(np.arange(len(images)).repeat(n_views), counts)  # [N]

    # Groups: (image, class), in image then class order. Within a group, boxes by decreasing score; a stable sort
    # keeps equal scores in view order, then each view's own order.
    low = int(labels.min()) if len(labels) else 0
    key = image_ids * (int(labels.max()) - low + 1 if len(labels) else 1) + (labels - low)  # (image, class) order
    _, group = np.unique(key, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((-scores, group))  # [N]: by group, then decreasing score
    n_groups = int(group.max()) + 1 if len(group) else 0
    sizes = np.bincount(group, minlength=n_groups)  # [G]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    m = int(sizes.max()) if n_groups else 0
    # Work on the groups largest first, so the groups that still have a k-th box are the first rows (slices, not
    # gathers); the rows go back to group order at the end.
    perm = np.argsort(-sizes, kind="stable")  # row -> group
    active = np.searchsorted(-sizes[perm], -np.arange(m), side="left")  # [m]: rows with a k-th box

    # Clusters not made yet hold an empty box (IoU 0 with anything), so a row needs no mask of its own cluster count.
    fused = np.tile(np.array([np.inf, np.inf, -np.inf, -np.inf]), (n_groups, m, 1))  # [G, m, 4] fused box
    weighted = np.zeros((n_groups, m, 4))  # score-weighted corner sums (the paper's Eq. 2 numerator)
    weight = np.zeros((n_groups, m))  # score sums
    member = np.full((n_groups, m, n_views), -1, dtype=np.int64)  # index of each view's box in a cluster, -1 if none
    n = np.zeros(n_groups, dtype=np.int64)  # clusters per row so far
    flat_fused, flat_weighted, flat_weight = fused.reshape(-1, 4), weighted.reshape(-1, 4), weight.reshape(-1)
    for k in range(m):
        a = int(active[k])
        rows = np.arange(a)
        i = order[starts[perm[:a]] + k]  # [A] each row's k-th best box
        box, view, score = boxes[i], view_ids[i], scores[i]  # [A, 4], [A], [A]
        width = int(n[:a].max())
        best = np.full(a, -1, dtype=np.int64)
        if width:
            ious = _iou(box[:, None], fused[:a, :width])  # [A, width]
            ious[member[rows, :width, view] >= 0] = -1.0  # one box per view and cluster: [A, width]
            top = ious.argmax(1)  # the first of equal IoUs, as one box at a time
            best = np.where(ious[rows, top] > iou_threshold, top, -1)
        new = best < 0
        best[new] = n[:a][new]
        n[:a] += new
        flat = rows * m + best  # [A] distinct cells of the [G, m] clusters
        flat_fused[flat[new]] = box[new]  # kept as is if every member scores 0 (nothing to weight by)
        member[rows, best, view] = i
        flat_weighted[flat] += score[:, None] * box
        flat_weight[flat] += score
        positive = flat[flat_weight[flat] > 0]
        flat_fused[positive] = flat_weighted[positive] / flat_weight[positive][:, None]
    back = np.argsort(perm)  # group -> row
    fused, member, n = fused[back], member[back], n[back]

    is_cluster = np.arange(m)[None] < n[:, None]  # [G, m]
    fused_boxes = fused[is_cluster]  # [F, 4], by group, then cluster
    member = member[is_cluster]  # [F, T]
    group_image = np.zeros(n_groups, dtype=np.int64)
    group_label = np.zeros(n_groups, dtype=np.int64)
    group_image[group] = image_ids
    group_label[group] = labels
    fused_image, fused_labels = np.repeat(group_image, n), np.repeat(group_label, n)  # [F] each
    present = member >= 0
    safe = np.where(present, member, 0)
    per_view_scores = np.where(present, scores[safe], 0.0)  # [F, T], 0 for a missing view
    per_view_iou = np.where(present, _iou(fused_boxes[:, None], boxes[safe]), 0.0)  # [F, T]
    fused_scores = per_view_scores.sum(1) / n_views
    consistency = per_view_iou.mean(1)
    score_std = per_view_scores.std(1)  # population std (ddof 0) over the T views
    views_found = present.sum(1).astype(np.int64)
    # One order whatever the clustering order was: image, then score (descending), label, corners.
    x1, y1, x2, y2 = fused_boxes.T if len(fused_boxes) else (np.zeros(0),) * 4
    rank = np.lexsort((y2, x2, y1, x1, fused_labels, -fused_scores, fused_image))
    bounds = np.searchsorted(fused_image[rank], np.arange(len(images) + 1))
    out = []
    for b in range(len(images)):
        r = rank[bounds[b] : bounds[b + 1]]
        out.append(FusedBoxes(
            boxes=torch.from_numpy(fused_boxes[r].reshape(-1, 4)),
            scores=torch.from_numpy(fused_scores[r]),
            labels=torch.from_numpy(fused_labels[r]),
            consistency=torch.from_numpy(consistency[r]),
            score_std=torch.from_numpy(score_std[r]),
            views=torch.from_numpy(views_found[r]),
        ))
    return out


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
