"""Generalized Focal Loss (Li et al., NeurIPS 2020) for dense detection, ATSS assignment, and the segmentation loss.

Detection losses, as in GFL (mmdet's ``GFLHead``):

- **QFL** (Quality Focal Loss, GFL eq. 5): the class logit of a positive location is trained towards the IoU of its
  predicted box with its ground truth (0 for negatives), with a focal modulation ``|y - sigmoid(x)|^beta``. The
  score then ranks detections by localisation quality, which is what pseudo-label filtering and calibration need.
- **DFL** (Distribution Focal Loss, GFL eq. 6): each box side is a discrete distribution over ``reg_max + 1`` bins
  (in stride units); the loss puts mass on the two bins around the target distance.
- **GIoU** on the boxes decoded from the distributions' expectations (torchvision's ``generalized_box_iou_loss``).

QFL is summed over all locations and classes and divided by the number of positives (clamped to >= 1). GIoU and
DFL are averaged over positives weighted by their detached predicted score (GFL's ``weight_targets``); dividing
by the sum of weights (rather than GFL's ``clamp(sum, 1)``) keeps the box losses from being ~100x smaller at
initialisation, when every score is the 0.01 prior. The totals use GFL's loss weights (QFL 1, GIoU 2, DFL 0.25).

Assignment is **ATSS** (Zhang et al., CVPR 2020), GFL's own assigner: per level the ``topk`` locations whose
centres are nearest a ground-truth centre are candidates, and candidates whose "anchor" box (a square of
``8 * stride``) has IoU >= mean + std of the candidates' IoUs, with the centre inside the box, are positives.
It was chosen over FCOS's per-level size ranges because the thresholds adapt to the object statistics: FCOS's
ranges (0-64-128-... px) were tuned for 800 px inputs with P3-P7, and would need retuning for 128-px inputs with
only P3-P5. Two changes to ATSS: a location claimed by several objects goes to the smallest (FCOS's rule, so a
small object nested in a large one keeps its locations), and an object left without any location (a box too small
to contain a location centre, frequent at 128 px) gets its best-IoU candidate, so every object is learnt.

Example:
    >>> import torch
    >>> logits = torch.full((2, 3), -4.0)
    >>> quality_focal_loss(logits, torch.zeros(2, 3)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from dataengine.data.coco import IGNORE_INDEX

__all__ = [
    "DFL_WEIGHT",
    "GIOU_WEIGHT",
    "QFL_WEIGHT",
    "atss_assign",
    "box_to_distance",
    "distance_to_box",
    "distribution_focal_loss",
    "distribution_to_distance",
    "gfl_loss",
    "paired_iou",
    "quality_focal_loss",
    "semantic_loss",
]

# Loss weights of GFL's reference configuration (mmdet gfl_r50_fpn_1x: loss_cls 1.0, loss_bbox 2.0, loss_dfl 0.25).
QFL_WEIGHT, GIOU_WEIGHT, DFL_WEIGHT = 1.0, 2.0, 0.25


def quality_focal_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Element-wise QFL: ``BCE(logits, y) * |y - sigmoid(logits)|^beta`` with soft targets ``y`` in [0, 1].

    Also the loss to distil a teacher's sigmoid scores into a student (soft ``target``).

    Example:
        >>> x = torch.tensor([[0.0]])
        >>> round(float(quality_focal_loss(x, torch.tensor([[0.5]]))), 6)  # sigmoid(0) = 0.5 = y: no loss
        0.0
    """
    modulation = (target - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * modulation


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL: cross-entropy towards the two bins around each continuous ``target`` in ``[0, R)``.

    Args:
        logits: ``[M, R + 1]`` bin logits.
        target: ``[M]`` distances in bins, ``0 <= target < R``.

    Returns:
        ``[M]`` losses; minimal when the softmax puts ``(right - t)`` on bin ``left`` and ``(t - left)`` on ``right``.

    Example:
        >>> logits = torch.log(torch.tensor([[0.0, 0.25, 0.75]]) + 1e-12)
        >>> good, bad = distribution_focal_loss(logits.repeat(2, 1), torch.tensor([1.75, 0.5]))
        >>> bool(good < bad)
        True
    """
    left = target.floor().long()
    w_left = (left + 1).float() - target
    w_right = target - left.float()
    return (F.cross_entropy(logits, left, reduction="none") * w_left
            + F.cross_entropy(logits, left + 1, reduction="none") * w_right)


def distribution_to_distance(bbox_dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Expected ``l, t, r, b`` distances (in stride units) of ``[..., 4 * (reg_max + 1)]`` bin logits -> ``[..., 4]``.

    Example:
        >>> logits = torch.full((1, 4 * 8), -1e4)
        >>> logits[0, 3::8] = 0.0  # all mass on bin 3 for every side
        >>> distribution_to_distance(logits, 7).tolist()
        [[3.0, 3.0, 3.0, 3.0]]
    """
    prob = bbox_dist.unflatten(-1, (4, reg_max + 1)).softmax(-1)  # [..., 4, R+1]
    bins = torch.arange(reg_max + 1, dtype=prob.dtype, device=prob.device)
    return prob @ bins  # [..., 4]


def distance_to_box(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Points ``[..., 2]`` and distances ``[..., 4]`` (pixels) to ``xyxy`` boxes ``[..., 4]``.

    Example:
        >>> distance_to_box(torch.tensor([10.0, 20.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
        [9.0, 18.0, 13.0, 24.0]
    """
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def box_to_distance(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`distance_to_box`: ``xyxy`` boxes to ``l, t, r, b`` distances from ``points``.

    Example:
        >>> box_to_distance(torch.tensor([10.0, 20.0]), torch.tensor([9.0, 18.0, 13.0, 24.0])).tolist()
        [1.0, 2.0, 3.0, 4.0]
    """
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def paired_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``[N, 4]`` xyxy each) -> ``[N]``.

    Hand-written because torchvision's ``box_iou`` is all-pairs ``[N, N]``; we need only its diagonal.

    Example:
        >>> paired_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2]])).tolist()
        [0.3333333432674408]
    """
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)  # [N, 2]
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter + eps)


@torch.no_grad()
def atss_assign(
    points: torch.Tensor,
    strides: torch.Tensor,
    num_per_level: Sequence[int],
    gt_boxes: torch.Tensor,
    *,
    topk: int = 9,
    anchor_scale: float = 8.0,
) -> torch.Tensor:
    """ATSS: index of the ground truth each location is assigned to, ``-1`` for background.

    Args:
        points: ``[N, 2]`` location centres (pixels), level-major as the head's outputs.
        strides: ``[N]`` stride of each location.
        num_per_level: Locations per level (sums to ``N``).
        gt_boxes: ``[M, 4]`` xyxy ground-truth boxes (pixels).
        topk: Candidates per level and ground truth (ATSS default 9).
        anchor_scale: Side of each location's anchor box in strides (ATSS/GFL: 8).

    Returns:
        ``[N]`` int64 ground-truth indices, ``-1`` where negative. A location claimed by several ground truths goes
        to the smallest one (FCOS's rule); every ground truth gets at least one location.

    Example:
        >>> pts = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
        >>> atss_assign(pts, torch.tensor([8.0, 8.0]), [2], torch.tensor([[0.0, 0.0, 8.0, 8.0]])).tolist()
        [0, -1]
    """
    n, m = points.shape[0], gt_boxes.shape[0]
    if m == 0:
        return torch.full((n,), -1, dtype=torch.long, device=points.device)
    half = (strides * anchor_scale / 2)[:, None]  # [N, 1]
    ious = box_iou(torch.cat([points - half, points + half], 1), gt_boxes)  # [N, M]
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [M, 2]
    dist = torch.cdist(points, gt_centres)  # [N, M]
    candidates, start = [], 0
    for count in num_per_level:
        k = min(topk, count)
        idx = dist[start:start + count].topk(k, dim=0, largest=False).indices  # [k, M]
        candidates.append(idx + start)
        start += count
    cand = torch.cat(candidates, 0)  # [C, M]
    cand_iou = ious.gather(0, cand)  # [C, M]
    # ATSS §3.1: the IoU threshold of each ground truth is the mean + std of its candidates' IoUs.
    threshold = cand_iou.mean(0) + (cand_iou.std(0) if cand.shape[0] > 1 else 0.0)  # [M]
    cand_ltrb = box_to_distance(points[cand], gt_boxes[None].expand(cand.shape[0], m, 4))  # [C, M, 4]
    positive = (cand_iou >= threshold) & (cand_ltrb.min(-1).values > 0.01)  # [C, M]
    # A location claimed by several objects goes to the smallest (FCOS §3.1) rather than to the highest IoU (ATSS):
    # with the IoU rule an object nested in a larger one (a cup held by a person) can lose every location.
    gt_index = torch.arange(m, device=points.device).expand_as(cand)  # [C, M]
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # [M]
    cost = torch.full((n, m), math.inf, device=points.device)
    cost[cand[positive], gt_index[positive]] = areas[gt_index[positive]]
    best, assigned = cost.min(1)  # [N]
    assigned[best == math.inf] = -1
    # Our addition: an object left without locations (too small to hold a location centre, or outbid) gets its
    # best-IoU candidate, so every object is learnt.
    covered = torch.zeros(m, dtype=torch.bool, device=points.device)
    covered[assigned[assigned >= 0]] = True
    orphans = (~covered).nonzero().squeeze(1)  # [O]
    assigned[cand[cand_iou[:, orphans].argmax(0), orphans]] = orphans
    return assigned


def _plain(t: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # tv_tensors (BoundingBoxes, Mask) become plain tensors so no metadata rides along into the loss maths.
    t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor).to(device=device, dtype=dtype)


def gfl_loss(
    cls_logits: torch.Tensor,
    bbox_dist: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    num_per_level: Sequence[int],
    targets: Sequence[dict[str, Any]],
    reg_max: int,
) -> dict[str, torch.Tensor]:
    """GFL losses of a batch: ``{"qfl", "dfl", "giou"}`` (unweighted; see the module docstring for normalisation).

    Args:
        cls_logits: ``[B, N, K]`` class logits.
        bbox_dist: ``[B, N, 4 * (reg_max + 1)]`` side-distribution logits.
        points: ``[N, 2]`` location centres; ``strides``: ``[N]``; ``num_per_level``: locations per level.
        targets: Per image ``boxes`` ``[M, 4]`` xyxy pixels and ``labels`` int64 ``[M]`` in ``[0, K)``.
        reg_max: Last bin index.

    Raises:
        ValueError: Missing keys, mismatched boxes/labels, or labels outside ``[0, K)`` (with the image's index).

    Example:
        >>> pts = torch.tensor([[4.0, 4.0], [12.0, 4.0]]); st = torch.tensor([8.0, 8.0])
        >>> losses = gfl_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 32), pts, st, [2],
        ...                   [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([1])}], 7)
        >>> sorted(losses)
        ['dfl', 'giou', 'qfl']
    """
    batch, n, k = cls_logits.shape
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    device = cls_logits.device
    points, strides = points.to(device), strides.to(device)
    matched_boxes, matched_labels = [], []
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}] needs 'boxes' [M, 4] and 'labels' [M], got keys {sorted(target)}")
        boxes = _plain(target["boxes"], torch.float32, device).reshape(-1, 4)  # [M, 4]
        labels = _plain(target["labels"], torch.int64, device).reshape(-1)  # [M]
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{i}]: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"targets[{i}]: labels must be in [0, {k}), got {labels.unique().tolist()}")
        assigned = atss_assign(points, strides, num_per_level, boxes)  # [N]
        pos = assigned >= 0
        box_t = torch.zeros(n, 4, device=device)
        label_t = torch.full((n,), -1, dtype=torch.long, device=device)
        box_t[pos], label_t[pos] = boxes[assigned[pos]], labels[assigned[pos]]
        matched_boxes.append(box_t)
        matched_labels.append(label_t)
    box_t = torch.stack(matched_boxes)  # [B, N, 4]
    label_t = torch.stack(matched_labels)  # [B, N]
    pos = label_t >= 0  # [B, N]
    num_pos = pos.sum().clamp(min=1).float()

    dist_logits = bbox_dist[pos].float()  # [P, 4 * (R+1)]
    pos_points = points.expand(batch, n, 2)[pos]  # [P, 2]
    pos_strides = strides.expand(batch, n)[pos][:, None]  # [P, 1]
    pred_boxes = distance_to_box(pos_points, distribution_to_distance(dist_logits, reg_max) * pos_strides)  # [P, 4]
    gt_boxes = box_t[pos]  # [P, 4]

    b_idx, n_idx = pos.nonzero(as_tuple=True)  # [P] each, in the same order as the boolean indexing above
    quality = torch.zeros_like(cls_logits, dtype=torch.float32)  # [B, N, K]
    quality[b_idx, n_idx, label_t[b_idx, n_idx]] = paired_iou(pred_boxes.detach(), gt_boxes)
    qfl = quality_focal_loss(cls_logits.float(), quality).sum() / num_pos

    if not pos.any():
        zero = bbox_dist.sum() * 0.0  # keeps every parameter in the graph (DDP) with a finite zero
        return {"qfl": qfl, "dfl": zero, "giou": zero}
    weight = cls_logits[pos].detach().sigmoid().max(-1).values  # [P]; GFL's weight_targets
    weight_sum = weight.sum().clamp(min=1e-6)
    giou = (generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none") * weight).sum() / weight_sum
    target_ltrb = (box_to_distance(pos_points, gt_boxes) / pos_strides).clamp(0, reg_max - 0.01)  # [P, 4]
    dfl = distribution_focal_loss(dist_logits.reshape(-1, reg_max + 1), target_ltrb.reshape(-1))  # [P * 4]
    dfl = (dfl * weight.repeat_interleave(4)).sum() / (4 * weight_sum)
    return {"qfl": qfl, "dfl": dfl, "giou": giou}


def semantic_loss(seg_logits: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy at the target's resolution, ``255`` ignored, averaged over non-ignored pixels.

    Logits ``[B, K+1, h, w]`` are upsampled bilinearly to ``semantic`` ``[B, H, W]``. A batch whose pixels are all
    ignored (a dataset without masks) gives exactly 0, not NaN (``F.cross_entropy``'s mean would divide by 0).

    Example:
        >>> semantic_loss(torch.zeros(1, 3, 2, 2), torch.full((1, 8, 8), 255)).item()
        0.0
    """
    logits = F.interpolate(seg_logits.float(), size=semantic.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, semantic, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (semantic != IGNORE_INDEX).sum().clamp(min=1)
