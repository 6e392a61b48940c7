"""Hard-negative mining in the losses: SSD-style negatives and region weights in QFL, OHEM and pixel weights in the
segmentation loss, and their wiring in ``MultiTaskDetSeg.loss`` (``hard_negative`` maps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from dataengine.config import DetectionLossParams, SegmentationLossParams
from dataengine.models import create_model
from dataengine.models.losses import (
    _hardest_negatives,
    atss_assign,
    distance_to_box,
    distribution_to_distance,
    gfl_loss,
    paired_iou,
    quality_focal_loss,
    semantic_loss,
)
from dataengine.models.multitask import HARD_PIXEL_BIT, HARD_REGION_BIT

REG_MAX = 7
GRID = 8  # one level of 8 x 8 locations at stride 8: a 64 px image
STRIDE = 8.0
K = 2
S = 64


def grid() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    points = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * STRIDE  # [64, 2]
    return points, torch.full((GRID * GRID,), STRIDE), [GRID * GRID]


def det_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Two images: one box on the first, none on the second; distinct random logits."""
    g = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(2, GRID * GRID, K, generator=g) * 2
    bbox_dist = torch.randn(2, GRID * GRID, 4 * (REG_MAX + 1), generator=g)
    targets = [{"boxes": torch.tensor([[16.0, 16.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return cls_logits, bbox_dist, targets


def old_qfl_terms(cls_logits: torch.Tensor, bbox_dist: torch.Tensor, targets: list[dict]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The QFL of GFL as before mining (element terms ``[B, N, K]`` and the positives mask ``[B, N]``)."""
    points, strides, counts = grid()
    quality = torch.zeros_like(cls_logits)
    pos = torch.zeros(cls_logits.shape[:2], dtype=torch.bool)
    for i, t in enumerate(targets):
        assigned = atss_assign(points, strides, counts, t["boxes"])
        for loc in (assigned >= 0).nonzero().squeeze(1).tolist():
            ltrb = distribution_to_distance(bbox_dist[i, loc], REG_MAX) * strides[loc]
            box = distance_to_box(points[loc], ltrb)
            quality[i, loc, t["labels"][assigned[loc]]] = paired_iou(box[None], t["boxes"][assigned[loc]][None])[0]
            pos[i, loc] = True
    return quality_focal_loss(cls_logits, quality), pos


def run_gfl(cls_logits: torch.Tensor, bbox_dist: torch.Tensor, targets: list[dict], **kwargs) -> dict:
    points, strides, counts = grid()
    return gfl_loss(cls_logits, bbox_dist, points, strides, counts, targets, REG_MAX, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Detection: QFL negatives
# ------------------------------------------------------------------------------------------------------------------


def test_focal_default_is_the_old_qfl_exactly() -> None:
    cls_logits, bbox_dist, targets = det_case()
    terms, pos = old_qfl_terms(cls_logits, bbox_dist, targets)
    losses = run_gfl(cls_logits, bbox_dist, targets)
    assert torch.equal(losses["qfl"], terms.sum() / pos.sum().clamp(min=1).float())
    # an explicit all-ones weight changes nothing either (x * 1.0 is exact)
    ones = run_gfl(cls_logits, bbox_dist, targets, negative_weight=torch.ones(2, GRID * GRID))
    assert torch.equal(ones["qfl"], losses["qfl"])
    assert losses["neg_kept"].item() == (~pos).sum().item() / 2
    assert losses["hard_locations"].item() == 0.0
    assert not any(v.requires_grad for k, v in losses.items() if k in ("neg_kept", "hard_locations"))


@pytest.mark.parametrize(("ratio", "minimum"), [(3.0, 0), (0.5, 20), (3.0, 16), (100.0, 0), (0.3, 0)])
def test_ssd_keeps_the_quota_of_highest_loss_negatives(ratio: float, minimum: int) -> None:
    cls_logits, bbox_dist, targets = det_case()
    terms, pos = old_qfl_terms(cls_logits, bbox_dist, targets)
    loc_loss = terms.sum(-1)  # [B, N]
    cls_logits.requires_grad_(True)
    losses = run_gfl(cls_logits, bbox_dist, targets, negatives="ssd", neg_pos_ratio=ratio, min_negatives=minimum)
    losses["qfl"].backward()
    touched = cls_logits.grad.abs().sum(-1) > 0  # [B, N]: the locations that entered the loss
    expected_total, kept_counts = 0.0, []
    for i in range(2):
        p, n_neg = int(pos[i].sum()), int((~pos[i]).sum())
        quota = min(max(math.ceil(round(ratio * p, 6)), minimum), n_neg)
        hardest = loc_loss[i].masked_fill(pos[i], -1.0).topk(quota).indices
        expected = pos[i].clone()
        expected[hardest] = True
        assert torch.equal(touched[i], expected), i  # exactly the positives and the hardest `quota` negatives
        expected_total += loc_loss[i][expected].sum().item()
        kept_counts.append(quota)
    assert losses["neg_kept"].item() == sum(kept_counts) / 2
    assert losses["qfl"].item() == pytest.approx(expected_total / pos.sum().item(), rel=1e-5)


def test_ssd_quota_is_not_rounded_up_by_floating_point() -> None:
    pos = torch.zeros(1, 40, dtype=torch.bool)
    pos[0, :10] = True
    loc_loss = torch.arange(40.0)[None]
    kept = _hardest_negatives(loc_loss, pos, 1.1, 0)  # 1.1 * 10 = 11.000000000000002 in float64: 11, not 12
    assert kept.sum().item() == 11 and torch.equal(kept[0].nonzero().squeeze(1), torch.arange(29, 40))


def test_ssd_image_without_objects_keeps_min_negatives() -> None:
    cls_logits, bbox_dist, targets = det_case()
    losses = run_gfl(cls_logits[1:], bbox_dist[1:], targets[1:], negatives="ssd", min_negatives=5)
    loc_loss = old_qfl_terms(cls_logits[1:], bbox_dist[1:], targets[1:])[0].sum(-1)[0]
    assert losses["neg_kept"].item() == 5.0
    assert losses["qfl"].item() == pytest.approx(loc_loss.topk(5).values.sum().item(), rel=1e-6)  # / max(P, 1) = 1
    assert losses["dfl"].item() == 0.0 and losses["giou"].item() == 0.0


def test_ssd_more_negatives_per_positive_never_lowers_the_loss_and_all_is_focal() -> None:
    cls_logits, bbox_dist, targets = det_case()
    runs = [run_gfl(cls_logits, bbox_dist, targets, negatives="ssd", neg_pos_ratio=r, min_negatives=0)
            for r in (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 1000.0)]
    qfl = [r["qfl"].item() for r in runs]
    kept = [r["neg_kept"].item() for r in runs]
    assert all(a < b for a, b in zip(qfl, qfl[1:-1]))  # strictly: each step keeps more negatives
    assert qfl[-2] <= qfl[-1] and all(a <= b for a, b in zip(kept, kept[1:]))
    assert kept[0] == 0.0  # ratio 0: positives only (and the empty image contributes nothing)
    assert kept[-1] == (GRID * GRID - 9) / 2  # image 0: all its negatives; image 1 (no positive): none
    focal = run_gfl(cls_logits, bbox_dist, targets)
    everything = run_gfl(cls_logits, bbox_dist, targets, negatives="ssd", min_negatives=10_000)  # quota capped
    assert everything["neg_kept"].item() == focal["neg_kept"].item()
    assert everything["qfl"].item() == pytest.approx(focal["qfl"].item(), rel=1e-6)
    for r in runs:  # box losses do not depend on the negatives
        assert torch.equal(r["dfl"], focal["dfl"]) and torch.equal(r["giou"], focal["giou"])


def test_negative_weight_multiplies_a_negative_location_only() -> None:
    cls_logits, bbox_dist, targets = det_case()
    terms, pos = old_qfl_terms(cls_logits, bbox_dist, targets)
    num_pos = pos.sum().item()
    neg_loc = int((~pos[0]).nonzero()[0])
    pos_loc = int(pos[0].nonzero()[0])
    weight = torch.ones(2, GRID * GRID)
    weight[0, neg_loc] = 3.0
    plain = run_gfl(cls_logits, bbox_dist, targets)
    weighted = run_gfl(cls_logits, bbox_dist, targets, negative_weight=weight)
    expected = (terms.sum() + 2.0 * terms[0, neg_loc].sum()) / num_pos
    assert weighted["qfl"].item() == pytest.approx(expected.item(), rel=1e-6) and weighted["qfl"] > plain["qfl"]
    assert weighted["hard_locations"].item() == 0.5  # one location on one of two images
    weight[0, pos_loc] = 5.0  # positives always weigh 1
    assert torch.equal(run_gfl(cls_logits, bbox_dist, targets, negative_weight=weight)["qfl"], weighted["qfl"])

    grads = []
    for w in (None, weight):
        logits = cls_logits.clone().requires_grad_(True)
        run_gfl(logits, bbox_dist, targets, negative_weight=w)["qfl"].backward()
        grads.append(logits.grad)
    assert torch.allclose(grads[1][0, neg_loc], 3.0 * grads[0][0, neg_loc], rtol=1e-6)
    others = torch.ones(2, GRID * GRID, dtype=torch.bool)
    others[0, neg_loc] = False
    assert torch.equal(grads[1][others], grads[0][others])


def test_ssd_ranks_negatives_by_weighted_loss() -> None:
    cls_logits, bbox_dist, targets = det_case()
    terms, pos = old_qfl_terms(cls_logits, bbox_dist, targets)
    loc_loss = terms.sum(-1)
    easiest = int(loc_loss[0].masked_fill(pos[0], math.inf).argmin())
    weight = torch.ones(2, GRID * GRID)
    weight[0, easiest] = 1e6
    for w, kept in ((None, False), (weight, True)):
        logits = cls_logits.clone().requires_grad_(True)
        losses = run_gfl(logits, bbox_dist, targets, negatives="ssd", min_negatives=0, negative_weight=w)
        losses["qfl"].backward()
        assert bool(logits.grad[0, easiest].abs().sum() > 0) == kept
        assert losses["neg_kept"].item() == math.ceil(3 * pos[0].sum().item()) / 2  # the count does not change


def test_bad_detection_arguments() -> None:
    cls_logits, bbox_dist, targets = det_case()
    with pytest.raises(ValueError, match=r"negatives must be one of \['focal', 'ssd'\], got 'hard'"):
        run_gfl(cls_logits, bbox_dist, targets, negatives="hard")
    with pytest.raises(ValueError, match=r"negative_weight must be \[B, N\] = \[2, 64\].*\[64\]"):
        run_gfl(cls_logits, bbox_dist, targets, negative_weight=torch.ones(64))
    with pytest.raises(ValueError, match="finite and >= 0"):
        run_gfl(cls_logits, bbox_dist, targets, negative_weight=-torch.ones(2, 64))
    with pytest.raises(ValueError, match="neg_pos_ratio and min_negatives must be >= 0"):
        run_gfl(cls_logits, bbox_dist, targets, negatives="ssd", neg_pos_ratio=-1.0)


# ------------------------------------------------------------------------------------------------------------------
# Segmentation: OHEM and pixel weights
# ------------------------------------------------------------------------------------------------------------------

PROBS = [0.1, 0.3, 0.5, 0.8, 0.9]  # target-class probabilities of five valid pixels; a sixth is ignored


def seg_case(probs: list[float] = PROBS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[1, 2, 1, 6]`` (class-1 probability ``probs``), targets class 1 with the last pixel ignored."""
    p = torch.tensor(probs + [0.5], dtype=torch.float64)
    logits = torch.zeros(1, 2, 1, 6)
    logits[0, 1, 0] = torch.log(p / (1 - p)).float()
    semantic = torch.tensor([[[1, 1, 1, 1, 1, 255]]])
    ce = -torch.log_softmax(logits, 1)[0, 1, 0, :5]  # [5] cross-entropy of the valid pixels
    return logits, semantic, ce


@pytest.mark.parametrize(("threshold", "min_kept", "kept"), [
    (0.7, 0, [0, 1, 2]),  # below the threshold
    (0.7, 2, [0, 1, 2]),  # min_kept already met
    (0.7, 4, [0, 1, 2, 3]),  # min_kept overrides the threshold: the 4 least probable
    (0.7, 10, [0, 1, 2, 3, 4]),  # more than available: all valid pixels
    (0.0, 2, [0, 1]),
    (0.85, 0, [0, 1, 2, 3]),
])
def test_ohem_keeps_the_expected_pixels(threshold: float, min_kept: int, kept: list[int]) -> None:
    logits, semantic, ce = seg_case()
    loss, stats = semantic_loss(logits, semantic, ohem_threshold=threshold, ohem_min_kept=min_kept, return_stats=True)
    assert stats["ohem_kept_share"].item() == pytest.approx(len(kept) / 5)
    assert loss.item() == pytest.approx(ce[kept].mean().item(), rel=1e-6)
    assert stats["hard_pixel_share"].item() == 0.0


def test_ohem_min_kept_holds_with_ties_and_nothing_kept_is_zero() -> None:
    logits, semantic, ce = seg_case([0.5] * 5)
    loss, stats = semantic_loss(logits, semantic, ohem_threshold=0.2, ohem_min_kept=3, return_stats=True)
    assert stats["ohem_kept_share"].item() == pytest.approx(3 / 5)  # mmseg's strict "<" would keep none here
    assert loss.item() == pytest.approx(ce[0].item(), rel=1e-6)
    logits, semantic, _ = seg_case()
    loss = semantic_loss(logits.requires_grad_(True), semantic, ohem_threshold=0.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ohem_threshold_one_is_the_plain_loss_unless_a_pixel_saturates() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    semantic = torch.randint(0, 3, (2, 32, 32), generator=g)
    semantic[0, :4] = 255
    plain = semantic_loss(logits, semantic)
    assert torch.equal(plain, F.cross_entropy(F.interpolate(logits, size=(32, 32), mode="bilinear"), semantic,
                                              ignore_index=255, reduction="sum") / (semantic != 255).sum())
    loss, stats = semantic_loss(logits, semantic, ohem_threshold=1.0, return_stats=True)
    assert stats["ohem_kept_share"].item() == 1.0
    assert torch.equal(loss, plain)  # same pixels, same cross_entropy call: bit-identical
    # a saturated pixel (p == 1.0 in float32) is not "< 1.0": OHEM drops it and the mean changes
    logits[0, 0] = -50.0
    logits[0, 1] = 50.0
    semantic[0, 4:] = 1
    loss, stats = semantic_loss(logits, semantic, ohem_threshold=1.0, return_stats=True)
    assert stats["ohem_kept_share"].item() < 1.0 and loss.item() > semantic_loss(logits, semantic).item()


def test_pixel_weights_and_ohem_together() -> None:
    logits, semantic, ce = seg_case()
    weight = torch.tensor([[[1.0, 3.0, 1.0, 2.0, 1.0, 100.0]]])  # the ignored pixel's weight does not matter
    loss, stats = semantic_loss(logits, semantic, pixel_weight=weight, return_stats=True)
    w = weight[0, 0, :5]
    assert loss.item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-6)
    assert stats["hard_pixel_share"].item() == pytest.approx(2 / 5)
    assert stats["ohem_kept_share"].item() == 1.0
    loss = semantic_loss(logits, semantic, pixel_weight=weight, ohem_threshold=0.7)
    assert loss.item() == pytest.approx(((w[:3] * ce[:3]).sum() / w[:3].sum()).item(), rel=1e-6)
    ones = semantic_loss(logits, semantic, pixel_weight=torch.ones(1, 1, 6))
    assert ones.item() == pytest.approx(semantic_loss(logits, semantic).item(), rel=1e-6)


def test_all_ignored_or_zero_weight_gives_exactly_zero() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    semantic = torch.full((2, 16, 16), 255)
    loss, stats = semantic_loss(logits, semantic, pixel_weight=torch.full((2, 16, 16), 3.0), ohem_threshold=0.7,
                                ohem_min_kept=100, return_stats=True)
    assert loss.item() == 0.0 and {k: v.item() for k, v in stats.items()} == {"ohem_kept_share": 0.0,
                                                                               "hard_pixel_share": 0.0}
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    semantic[:] = 1
    loss = semantic_loss(logits, semantic, pixel_weight=torch.zeros(2, 16, 16))
    assert loss.item() == 0.0 and torch.isfinite(torch.autograd.grad(loss, logits)[0]).all()


def test_bad_segmentation_arguments() -> None:
    logits, semantic, _ = seg_case()
    with pytest.raises(ValueError, match=r"pixel_weight must be shaped like semantic \[1, 1, 6\], got \[1, 6\]"):
        semantic_loss(logits, semantic, pixel_weight=torch.ones(1, 6))
    with pytest.raises(ValueError, match="finite and >= 0"):
        semantic_loss(logits, semantic, pixel_weight=-torch.ones(1, 1, 6))
    with pytest.raises(ValueError, match=r"ohem_threshold must be a probability in \[0, 1\].*1.5"):
        semantic_loss(logits, semantic, ohem_threshold=1.5)
    with pytest.raises(ValueError, match="needs an ohem_threshold"):
        semantic_loss(logits, semantic, ohem_min_kept=10)


# ------------------------------------------------------------------------------------------------------------------
# MultiTaskDetSeg.loss with hard_negative maps
# ------------------------------------------------------------------------------------------------------------------

REGION = (slice(40, 64), slice(0, 24))  # rows, columns of a hard-negative region far from the boxes


def model_targets() -> list[dict]:
    targets = []
    for i in range(2):
        semantic = torch.zeros(S, S, dtype=torch.int64)
        semantic[8:32, 8:32] = 1
        semantic[0, :] = 255
        targets.append({"boxes": torch.tensor([[8.0, 8.0, 32.0, 32.0], [36.0, 4.0, 60.0, 30.0]]),
                        "labels": torch.tensor([0, i % K]), "semantic": semantic})
    hard = torch.zeros(S, S, dtype=torch.uint8)
    hard[REGION] = HARD_REGION_BIT
    hard[50:60, 16:40] |= HARD_PIXEL_BIT  # background pixels, half inside the region (value 3)
    hard[0, :] = HARD_PIXEL_BIT  # ignored pixels: not counted
    targets[0]["hard_negative"] = tv_tensors.Mask(hard)  # the second image has no map: all zero
    return targets


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)


def test_model_defaults_are_the_old_losses_exactly(tiny: torch.nn.Module) -> None:
    out = tiny(torch.rand(2, 3, S, S))
    targets = model_targets()
    losses = tiny.loss(out, targets)  # the maps are present but unused by default
    assert set(losses) == {"loss", "qfl", "dfl", "giou", "seg"}
    points, strides, counts = tiny._points_of(out)
    quality = torch.zeros_like(out["cls_logits"])
    num_pos = 0
    for i, t in enumerate(targets):
        assigned = atss_assign(points, strides, counts, t["boxes"])
        pos = (assigned >= 0).nonzero().squeeze(1)
        ltrb = distribution_to_distance(out["bbox_dist"][i, pos].detach(), tiny.reg_max) * strides[pos, None]
        iou = paired_iou(distance_to_box(points[pos], ltrb), t["boxes"][assigned[pos]])
        quality[i, pos, t["labels"][assigned[pos]]] = iou
        num_pos += pos.numel()
    assert torch.equal(losses["qfl"], quality_focal_loss(out["cls_logits"], quality).sum() / num_pos)
    semantic = torch.stack([t["semantic"] for t in targets])
    seg_logits = F.interpolate(out["seg_logits"], size=(S, S), mode="bilinear")
    assert torch.equal(losses["seg"], F.cross_entropy(seg_logits, semantic, ignore_index=255, reduction="sum")
                       / (semantic != 255).sum())
    assert torch.equal(losses["loss"], losses["qfl"] + 2 * losses["giou"] + 0.25 * losses["dfl"] + losses["seg"])
    # the params dataclasses with mining off change no number, only add the statistics
    off = tiny.loss(out, targets, detection_loss=DetectionLossParams(),
                    segmentation_loss=SegmentationLossParams(ohem=False))
    assert set(off) == set(losses) | {"neg_kept", "hard_locations", "ohem_kept_share", "hard_pixel_share"}
    assert all(torch.equal(off[k], losses[k]) for k in losses)
    assert off["hard_locations"].item() == 0.0 and off["ohem_kept_share"].item() == 1.0


@pytest.mark.parametrize("negatives", ["focal", "ssd"])
def test_model_loss_with_hard_negative_maps_backprops(tiny: torch.nn.Module, negatives: str) -> None:
    tiny.zero_grad(set_to_none=True)
    out = tiny(torch.rand(2, 3, S, S))
    targets = model_targets()
    det = DetectionLossParams(negatives=negatives)
    seg = SegmentationLossParams(ohem=True, ohem_threshold=0.7, ohem_min_kept=256)
    losses = tiny.loss(out, targets, detection_loss=det, segmentation_loss=seg, negative_weight=3.0,
                       pixel_weight=3.0)
    assert set(losses) == {"loss", "qfl", "dfl", "giou", "seg", "neg_kept", "hard_locations", "ohem_kept_share",
                           "hard_pixel_share"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    points, _ = tiny.anchor_points(S)
    x, y = points[:, 0], points[:, 1]
    in_region = (y >= 40) & (x < 24)  # no box covers the region: all its locations are negatives
    assert losses["hard_locations"].item() == in_region.sum().item() / 2
    assert losses["hard_pixel_share"].item() == pytest.approx(10 * 24 / (2 * (S - 1) * S))
    assert 0.0 < losses["ohem_kept_share"].item() <= 1.0
    if negatives == "ssd":
        assert losses["neg_kept"].item() < len(points) - 2  # far fewer than all negatives
    # the maps become exactly these weights: region locations x3 (detection), bit-2 pixels x3 (segmentation)
    points, strides, counts = tiny._points_of(out)
    weight = torch.ones(2, len(points))
    weight[0, in_region] = 3.0
    direct = gfl_loss(out["cls_logits"], out["bbox_dist"], points, strides, counts, targets, tiny.reg_max,
                      negatives=negatives, negative_weight=weight)
    assert all(torch.equal(losses[k], direct[k]) for k in direct)
    pixel_weight = torch.ones(2, S, S)
    pixel_weight[0, 50:60, 16:40] = 3.0
    pixel_weight[0, 0, :] = 3.0
    semantic = torch.stack([t["semantic"] for t in targets])
    assert torch.equal(losses["seg"], semantic_loss(out["seg_logits"], semantic, pixel_weight=pixel_weight,
                                                    ohem_threshold=0.7, ohem_min_kept=256))
    plain = tiny.loss(out, targets, detection_loss=det, segmentation_loss=seg)
    assert losses["qfl"] > plain["qfl"] and not torch.equal(losses["seg"], plain["seg"])
    losses["loss"].backward()
    grads = [p.grad for p in tiny.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert tiny.det_head.cls_out.bias.grad.abs().sum() > 0


def test_model_rejects_bad_hard_negative_maps(tiny: torch.nn.Module) -> None:
    out = tiny(torch.rand(2, 3, S, S))
    targets = model_targets()
    targets[0]["hard_negative"] = torch.zeros(S // 2, S // 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at the network's input resolution"):
        tiny.loss(out, targets, negative_weight=3.0)
    with pytest.raises(ValueError, match="same size"):
        tiny.loss(out, targets, pixel_weight=3.0)
    targets[1]["hard_negative"] = torch.zeros(S, S, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"share a size within a batch"):
        tiny.loss(out, targets, negative_weight=3.0)
    targets[0]["hard_negative"] = torch.zeros(1, S, S, dtype=torch.uint8)
    targets[1]["hard_negative"] = torch.zeros(1, S, S, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"must be \[H, W\]"):
        tiny.loss(out, targets, negative_weight=3.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        tiny.loss(out, model_targets(), pixel_weight=-1.0)
