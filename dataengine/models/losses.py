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

Hard negatives (the student's losses, see :func:`gfl_loss` and :func:`semantic_loss`): QFL's negatives can be
weighted per location (mined hard-negative regions) and, instead of all of them, only the hardest
``neg_pos_ratio`` per positive can be kept (SSD's hard negative mining, seed 001); the segmentation loss can keep
only the badly classified pixels (OHEM, as mmsegmentation's ``OHEMPixelSampler``) and weight pixels. With the
defaults both losses are exactly the plain ones above.

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
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from dataengine.data.coco import IGNORE_INDEX

__all__ = [
    "DFL_WEIGHT",
    "GIOU_WEIGHT",
    "NEGATIVE_MODES",
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

NEGATIVE_MODES = ("focal", "ssd")
"""Values of ``gfl_loss(negatives=...)``: QFL over every negative, or SSD's hardest negatives only."""


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


def _negative_weight(weight: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = torch.as_tensor(weight)
    if tuple(weight.shape) != shape:
        raise ValueError(f"negative_weight must be [B, N] = {list(shape)} (one weight per image and location), got "
                         f"{list(weight.shape)}")
    weight = weight.to(device=device, dtype=torch.float32)
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError(f"negative_weight must be finite and >= 0, got values in [{weight.min().item()}, "
                         f"{weight.max().item()}]")
    return weight


def _hardest_negatives(loc_loss: torch.Tensor, pos: torch.Tensor, neg_pos_ratio: float,
                       min_negatives: int) -> torch.Tensor:
    """Bool ``[B, N]``: per image the ``max(ceil(ratio * P_i), min_negatives)`` negatives of highest ``loc_loss``."""
    batch, n = loc_loss.shape
    num_neg = (~pos).sum(1)  # [B]
    # float64 and a 1e-9 slack: 1.1 * 10 is 11.000000000000002 in floating point, which must not round up to 12.
    quota = torch.ceil(pos.sum(1).double() * neg_pos_ratio - 1e-9).long().clamp(min=min_negatives)  # [B]
    quota = torch.minimum(quota, num_neg)
    score = loc_loss.masked_fill(pos, -math.inf)  # positives sort last and are never within the quota
    order = score.argsort(dim=1, descending=True, stable=True)  # [B, N]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    return ~pos & (rank < quota[:, None])


def gfl_loss(
    cls_logits: torch.Tensor,
    bbox_dist: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    num_per_level: Sequence[int],
    targets: Sequence[dict[str, Any]],
    reg_max: int,
    *,
    negatives: str = "focal",
    neg_pos_ratio: float = 3.0,
    min_negatives: int = 16,
    negative_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """GFL losses of a batch: ``{"qfl", "dfl", "giou"}`` (unweighted; see the module docstring) and mining statistics.

    Negatives (locations assigned to no object) enter QFL in one of two ways:

    - ``"focal"``: every negative location and class, as GFL does (QFL's focal modulation already down-weights
      the many easy negatives). With ``negative_weight=None`` the value is exactly the plain GFL loss.
    - ``"ssd"``: hard negative mining as in SSD (Liu et al. 2016, §2.2; seed 001): per image only the
      ``max(ceil(neg_pos_ratio * P), min_negatives)`` negatives (at most all of them) with the highest loss are
      kept, ``P`` the image's positives; ``min_negatives`` keeps images without objects (and images with one tiny
      object) learning to stay quiet. SSD ranks negatives by their softmax background confidence; our heads are
      sigmoid/QFL with no background class, so a negative is ranked by its (detached, weighted) QFL summed over
      the ``K`` classes: the natural "how wrong is this location", large exactly where some class fires.

    Either way QFL is the sum over positives and kept negatives divided by the batch's number of positives
    (clamped to >= 1), and ``negative_weight`` multiplies the terms of negative locations (positives always weigh 1;
    with ``"ssd"`` the ranking uses the weighted loss, so a weighted location is more likely kept). DFL and GIoU
    (positives only) do not depend on these options.

    Args:
        cls_logits: ``[B, N, K]`` class logits.
        bbox_dist: ``[B, N, 4 * (reg_max + 1)]`` side-distribution logits.
        points: ``[N, 2]`` location centres; ``strides``: ``[N]``; ``num_per_level``: locations per level.
        targets: Per image ``boxes`` ``[M, 4]`` xyxy pixels and ``labels`` int64 ``[M]`` in ``[0, K)``.
        reg_max: Last bin index.
        negatives: ``"focal"`` or ``"ssd"`` (see above).
        neg_pos_ratio: ``"ssd"``: negatives kept per positive, per image (SSD: 3).
        min_negatives: ``"ssd"``: negatives kept at least, per image.
        negative_weight: Float ``[B, N]`` >= 0: weight of each location's QFL terms where it is negative (e.g. the
            mined hard-negative regions); ``None`` = 1 everywhere.

    Returns:
        Scalars ``qfl``, ``dfl``, ``giou`` (differentiable) and the detached statistics ``neg_kept`` (mean number of
        negative locations per image entering QFL: all of them with ``"focal"``) and ``hard_locations`` (mean
        number per image of negative locations with ``negative_weight > 1``).

    Raises:
        ValueError: Missing keys, mismatched boxes/labels, or labels outside ``[0, K)`` (with the image's index); an
            unknown ``negatives``, a negative ratio or minimum, or a ``negative_weight`` of the wrong shape.

    Example:
        >>> pts = torch.tensor([[4.0, 4.0], [12.0, 4.0]]); st = torch.tensor([8.0, 8.0])
        >>> targets = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([1])}]
        >>> losses = gfl_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 32), pts, st, [2], targets, 7)
        >>> sorted(losses)
        ['dfl', 'giou', 'hard_locations', 'neg_kept', 'qfl']
        >>> ssd = gfl_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 32), pts, st, [2], targets, 7,
        ...                negatives="ssd", neg_pos_ratio=0.0, min_negatives=0)
        >>> ssd["neg_kept"].item(), bool(ssd["qfl"] < losses["qfl"])  # only the positive location is left
        (0.0, True)
    """
    batch, n, k = cls_logits.shape
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {list(NEGATIVE_MODES)}, got {negatives!r}")
    if neg_pos_ratio < 0 or min_negatives < 0:
        raise ValueError(f"neg_pos_ratio and min_negatives must be >= 0, got {neg_pos_ratio} and {min_negatives}")
    device = cls_logits.device
    neg_weight = _negative_weight(negative_weight, (batch, n), device)  # [B, N] or None
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
    qfl_terms = quality_focal_loss(cls_logits.float(), quality)  # [B, N, K]
    loc_weight = None if neg_weight is None else torch.where(pos, 1.0, neg_weight)  # [B, N]
    with torch.no_grad():
        hard = (~pos & (neg_weight > 1)) if neg_weight is not None else torch.zeros_like(pos)  # [B, N]
        stats = {"hard_locations": hard.sum(1).float().mean()}
    if negatives == "focal":
        # The plain GFL sum when unweighted (the teacher's loss: no extra operation, bit-identical numbers).
        qfl = (qfl_terms if loc_weight is None else qfl_terms * loc_weight[..., None]).sum() / num_pos
        stats["neg_kept"] = (~pos).sum(1).float().mean()
    else:
        loc_loss = qfl_terms.sum(-1)  # [B, N]
        if loc_weight is not None:
            loc_loss = loc_loss * loc_weight
        kept_neg = _hardest_negatives(loc_loss.detach(), pos, neg_pos_ratio, min_negatives)  # [B, N]
        qfl = torch.where(pos | kept_neg, loc_loss, 0.0).sum() / num_pos
        stats["neg_kept"] = kept_neg.sum(1).float().mean()

    if not pos.any():
        zero = bbox_dist.sum() * 0.0  # keeps every parameter in the graph (DDP) with a finite zero
        return {"qfl": qfl, "dfl": zero, "giou": zero, **stats}
    weight = cls_logits[pos].detach().sigmoid().max(-1).values  # [P]; GFL's weight_targets
    weight_sum = weight.sum().clamp(min=1e-6)
    giou = (generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none") * weight).sum() / weight_sum
    target_ltrb = (box_to_distance(pos_points, gt_boxes) / pos_strides).clamp(0, reg_max - 0.01)  # [P, 4]
    dfl = distribution_focal_loss(dist_logits.reshape(-1, reg_max + 1), target_ltrb.reshape(-1))  # [P * 4]
    dfl = (dfl * weight.repeat_interleave(4)).sum() / (4 * weight_sum)
    return {"qfl": qfl, "dfl": dfl, "giou": giou, **stats}


def _ohem_keep(logits: torch.Tensor, semantic: torch.Tensor, valid: torch.Tensor, threshold: float,
               min_kept: int) -> torch.Tensor:
    """Bool ``[B, H, W]``: valid pixels whose target-class probability is below ``threshold``, plus the ``min_kept``
    least probable valid pixels (all of them when fewer)."""
    target = semantic.masked_fill(~valid, 0)  # any class index: ignored pixels are masked out below
    prob = logits.softmax(1).gather(1, target[:, None]).squeeze(1)  # [B, H, W]
    keep = valid & (prob < threshold)
    count = min(min_kept, int(valid.sum()))
    if count > 0:
        valid_index = valid.flatten().nonzero().squeeze(1)  # [V]
        lowest = valid_index[prob.flatten()[valid_index].topk(count, largest=False).indices]  # [count]
        keep = keep.flatten().index_fill(0, lowest, True).view_as(keep)
    return keep


@overload
def semantic_loss(seg_logits: torch.Tensor, semantic: torch.Tensor, *, pixel_weight: torch.Tensor | None = None,
                  ohem_threshold: float | None = None, ohem_min_kept: int = 0,
                  return_stats: Literal[False] = False) -> torch.Tensor: ...


@overload
def semantic_loss(seg_logits: torch.Tensor, semantic: torch.Tensor, *, pixel_weight: torch.Tensor | None = None,
                  ohem_threshold: float | None = None, ohem_min_kept: int = 0,
                  return_stats: Literal[True]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def semantic_loss(
    seg_logits: torch.Tensor,
    semantic: torch.Tensor,
    *,
    pixel_weight: torch.Tensor | None = None,
    ohem_threshold: float | None = None,
    ohem_min_kept: int = 0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel cross-entropy at the target's resolution, ``255`` ignored, optionally with OHEM and pixel weights.

    Logits ``[B, K+1, h, w]`` are upsampled bilinearly to ``semantic`` ``[B, H, W]``. Without OHEM and weights the
    loss is the mean over non-ignored pixels, exactly as ``F.cross_entropy(..., ignore_index=255)``.

    OHEM (online hard example mining, Shrivastava et al. 2016; the pixel version of mmsegmentation's
    ``OHEMPixelSampler``) keeps the valid pixels whose (detached) softmax probability of the target class is below
    ``max(ohem_threshold, p_min_kept)``, ``p_min_kept`` the ``ohem_min_kept``-th smallest such probability in the
    batch: the badly classified pixels, and at least the ``ohem_min_kept`` worst so a well-fitted batch still
    trains. Two deliberate differences to mmseg: exactly the ``ohem_min_kept`` least probable pixels are kept
    whatever the ties (mmseg's strict ``<`` can keep fewer), and when the batch has no more valid pixels than
    ``ohem_min_kept`` all are kept (mmseg drops the most probable one). ``ohem_min_kept`` counts per batch
    (mmseg: per image). Note that ``ohem_threshold=1.0`` keeps every pixel except those whose probability is
    exactly 1.0 in float32 (saturated logits), so it equals the plain loss only when no pixel saturates.

    The loss is the weighted mean of the kept pixels' cross-entropy: ``sum(w * ce) / sum(w)`` over kept pixels.

    Args:
        seg_logits: ``[B, K+1, h, w]`` logits.
        semantic: Int64 ``[B, H, W]`` classes, 255 = ignore.
        pixel_weight: Float ``[B, H, W]`` >= 0 per-pixel weights (e.g. mined hard negative pixels); ``None`` = 1.
        ohem_threshold: Probability in ``[0, 1]`` below which a pixel is kept; ``None`` disables OHEM.
        ohem_min_kept: With OHEM, pixels kept at least (per batch).
        return_stats: Also return the detached statistics ``ohem_kept_share`` (kept / valid pixels; 1 without OHEM)
            and ``hard_pixel_share`` (share of valid pixels with ``pixel_weight > 1``), 0 without valid pixels.

    Returns:
        The scalar loss, or ``(loss, stats)`` with ``return_stats``. A batch whose pixels are all ignored (a dataset
        without masks) gives exactly 0, not NaN (``F.cross_entropy``'s mean would divide by 0).

    Raises:
        ValueError: ``pixel_weight`` not shaped like ``semantic`` or negative, ``ohem_threshold`` outside
            ``[0, 1]``, a negative ``ohem_min_kept``, or ``ohem_min_kept > 0`` without a threshold.

    Example:
        >>> semantic_loss(torch.zeros(1, 3, 2, 2), torch.full((1, 8, 8), 255)).item()
        0.0
        >>> logits = torch.zeros(1, 2, 1, 4); logits[0, 1] = torch.tensor([-2.0, 0.0, 2.0, 4.0])
        >>> loss, stats = semantic_loss(logits, torch.ones(1, 1, 4, dtype=torch.long), ohem_threshold=0.7,
        ...                             return_stats=True)  # p(class 1) = 0.12, 0.5, 0.88, 0.98: two kept
        >>> stats["ohem_kept_share"].item()
        0.5
    """
    if ohem_threshold is not None and not 0.0 <= ohem_threshold <= 1.0:
        raise ValueError(f"ohem_threshold must be a probability in [0, 1] (or None: no OHEM), got {ohem_threshold}")
    if ohem_min_kept < 0 or (ohem_min_kept > 0 and ohem_threshold is None):
        raise ValueError(f"ohem_min_kept must be >= 0 and needs an ohem_threshold, got {ohem_min_kept} with "
                         f"threshold {ohem_threshold}")
    if pixel_weight is not None:
        if tuple(pixel_weight.shape) != tuple(semantic.shape):
            raise ValueError(f"pixel_weight must be shaped like semantic {list(semantic.shape)}, got "
                             f"{list(pixel_weight.shape)}")
        pixel_weight = pixel_weight.to(device=seg_logits.device, dtype=torch.float32)
        if not torch.isfinite(pixel_weight).all() or (pixel_weight < 0).any():
            raise ValueError(f"pixel_weight must be finite and >= 0, got values in [{pixel_weight.min().item()}, "
                             f"{pixel_weight.max().item()}]")
    logits = F.interpolate(seg_logits.float(), size=semantic.shape[-2:], mode="bilinear", align_corners=False)
    valid = semantic != IGNORE_INDEX  # [B, H, W]
    keep = valid
    if ohem_threshold is not None:
        with torch.no_grad():
            keep = _ohem_keep(logits, semantic, valid, ohem_threshold, ohem_min_kept)
    # Dropped pixels become "ignored", so without weights this is the very call of the plain loss.
    target = semantic if keep is valid else semantic.masked_fill(~keep, IGNORE_INDEX)
    if pixel_weight is None:
        total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = total / keep.sum().clamp(min=1)
    else:
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")  # [B, H, W], 0 if dropped
        weight = torch.where(keep, pixel_weight, 0.0)
        # All weights 0 (nothing kept) means a 0 numerator: 0 / tiny = 0, with finite gradients.
        loss = (ce * weight).sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)
    if not return_stats:
        return loss
    with torch.no_grad():
        num_valid = valid.sum().clamp(min=1).float()
        hard = valid & (pixel_weight > 1) if pixel_weight is not None else torch.zeros_like(valid)
        stats = {"ohem_kept_share": keep.sum().float() / num_valid, "hard_pixel_share": hard.sum().float() / num_valid}
    return loss, stats


