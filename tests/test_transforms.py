"""Joint augmentations keep image, boxes, instance masks and semantic mask aligned; the letterbox inverts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from dataengine.config import AugmentParams
from dataengine.data.transforms import (
    IMAGE_FILL,
    SanitizeBoxesKeepSemantic,
    SemanticMask,
    build_transforms,
    letterbox_params,
    unletterbox_boxes,
    unletterbox_mask,
)

OBJ_RGB = (200, 40, 40)
BG_RGB = (30, 90, 160)


def make_sample(h: int, w: int, rect: tuple[int, int, int, int] | None, ignore_cols: int = 0) -> tuple:
    """An image with one filled rectangle ``(x1, y1, x2, y2)`` whose box, instance mask and semantic mask coincide."""
    img = torch.tensor(BG_RGB, dtype=torch.uint8)[:, None, None].repeat(1, h, w)  # [3, H, W]
    sem = torch.zeros(h, w, dtype=torch.uint8)
    masks = torch.zeros(0 if rect is None else 1, h, w, dtype=torch.uint8)
    boxes = torch.zeros(0, 4)
    if rect is not None:
        x1, y1, x2, y2 = rect
        img[:, y1:y2, x1:x2] = torch.tensor(OBJ_RGB, dtype=torch.uint8)[:, None, None]
        sem[y1:y2, x1:x2] = 1
        masks[0, y1:y2, x1:x2] = 1
        boxes = torch.tensor([rect], dtype=torch.float32)
    sem[:, :ignore_cols] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.zeros(len(boxes), dtype=torch.int64),
        "masks": tv_tensors.Mask(masks),
        "semantic": SemanticMask(sem),
    }
    return tv_tensors.Image(img), target


def mask_bbox(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


@pytest.mark.parametrize("preset", ["default", "strong"])
def test_random_train_transforms_keep_everything_aligned(preset: str) -> None:
    torch.manual_seed(0)
    aug = AugmentParams(preset=preset, photometric=0.0, scale_min=0.5, scale_max=1.5)
    transform = build_transforms(aug, 48, train=True)
    fill = torch.tensor(IMAGE_FILL, dtype=torch.float32)[:, None] / 255
    obj = torch.tensor(OBJ_RGB, dtype=torch.float32)[:, None] / 255
    n_kept = n_padded = 0
    for _ in range(40):
        image, target = transform(*make_sample(40, 56, (14, 8, 34, 30)))
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        sem, masks, boxes = target["semantic"], target["masks"], target["boxes"]
        assert sem.shape == (48, 48) and set(sem.unique().tolist()) <= {0, 1, 255}
        assert masks.shape[0] == boxes.shape[0] == target["labels"].shape[0]
        pad = sem == 255  # the source has no ignore pixels: every 255 is padding / zoom-out
        n_padded += int(pad.any())
        assert not masks[:, pad].any()
        if preset == "default":  # no resampling after padding: padding pixels are exactly the fill colour
            torch.testing.assert_close(image[:, pad], fill.expand(3, int(pad.sum())), atol=1e-6, rtol=0)
        if len(boxes) == 0:
            continue
        n_kept += 1
        # Both masks went through the same nearest-neighbour kernels: identical pixels.
        assert torch.equal(masks[0].bool(), sem == 1)
        assert boxes[0].tolist() == pytest.approx(mask_bbox(masks[0]), abs=1.5)
        outside = torch.nn.functional.pad(1.0 - masks[0][None].float(), (2, 2, 2, 2), value=1.0)
        inner = torch.nn.functional.max_pool2d(outside, 5, 1)[0] == 0  # eroded by 2 px, image border included
        if inner.any():
            torch.testing.assert_close(image[:, inner], obj.expand(3, int(inner.sum())), atol=2 / 255, rtol=0)
    assert n_kept >= 20 and n_padded >= 10  # the loop exercised both cases


def test_ignore_and_padding_exact_through_resize_and_flip() -> None:
    # 16x32 -> 64: scale exactly 2 (nearest-exact = pixel repeat), image on the top 32 rows, flipped.
    image, target = make_sample(16, 32, (10, 4, 20, 12), ignore_cols=5)
    sem_src = target["semantic"].clone()
    out, tgt = build_transforms(AugmentParams(preset="light", hflip=1.0), 64, train=True)(image, target)
    expected = torch.full((64, 64), 255, dtype=torch.uint8)
    expected[:32] = sem_src.repeat_interleave(2, 0).repeat_interleave(2, 1).flip(-1)
    assert torch.equal(tgt["semantic"], expected)
    assert (tgt["semantic"][:32, -10:] == 255).all()  # the ignore stripe moved to the right
    assert not tgt["masks"][:, 32:].any()  # padding is 0 in instance masks
    assert tgt["boxes"].tolist() == [[64 - 40, 8, 64 - 20, 24]]
    assert torch.equal(tgt["masks"][0].bool(), expected == 1)
    torch.testing.assert_close(out[:, 40, 5], torch.tensor(IMAGE_FILL) / 255)


def test_flip_moves_box_exactly() -> None:
    image, target = make_sample(64, 64, (10, 20, 30, 44))
    _, tgt = build_transforms(AugmentParams(preset="light", hflip=1.0), 64, train=True)(image, target)
    assert tgt["boxes"].tolist() == [[34.0, 20.0, 54.0, 44.0]]
    assert mask_bbox(tgt["masks"][0]) == [34.0, 20.0, 54.0, 44.0]


@pytest.mark.parametrize(("h", "w"), [(37, 53), (53, 37), (64, 64), (20, 100)])
def test_letterbox_round_trip_of_boxes(h: int, w: int) -> None:
    gen = torch.Generator().manual_seed(h * w)
    xy = torch.rand(6, 2, generator=gen) * torch.tensor([w - 8.0, h - 8.0])
    boxes = torch.cat([xy, xy + 1 + torch.rand(6, 2, generator=gen) * 6], dim=1)  # [6, 4]
    image, target = make_sample(h, w, None)
    target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    target["labels"] = torch.arange(6)
    del target["masks"]
    _, tgt = build_transforms(None, 96, train=False)(image, target)
    scale, px, py = letterbox_params(h, w, 96)
    assert scale == 96 / max(h, w) and (px, py) == (0, 0)
    back = unletterbox_boxes(tgt["boxes"].as_subclass(torch.Tensor), scale, px, py)
    torch.testing.assert_close(back, boxes, atol=1e-4, rtol=0)
    np.testing.assert_allclose(unletterbox_boxes(tgt["boxes"].numpy(), scale, px, py), boxes.numpy(), atol=1e-4)


def test_unletterbox_mask_labels_exact_and_probs_resized() -> None:
    image, target = make_sample(16, 32, (3, 2, 11, 9), ignore_cols=2)
    sem_src = target["semantic"].to(torch.int64)
    _, tgt = build_transforms(None, 64, train=False)(image, target)
    scale, px, py = letterbox_params(16, 32, 64)
    back = unletterbox_mask(tgt["semantic"].as_subclass(torch.Tensor).to(torch.int64), 16, 32, scale, px, py)
    assert back.dtype == torch.int64 and torch.equal(back, sem_src)
    probs = torch.rand(2, 3, 64, 64)
    assert unletterbox_mask(probs, 16, 32, scale, px, py).shape == (2, 3, 16, 32)
    const = torch.full((3, 64, 64), 0.25)
    torch.testing.assert_close(unletterbox_mask(const, 100, 50, 0.64, 0, 0), torch.full((3, 100, 50), 0.25))
    with pytest.raises(ValueError, match="cannot hold"):
        unletterbox_mask(torch.zeros(32, 32), 16, 32, scale, px, py)


@pytest.mark.parametrize(
    ("preset", "train"), [("default", True), ("strong", True), ("light", True), ("default", False)]
)
def test_zero_box_image(preset: str, train: bool) -> None:
    torch.manual_seed(1)
    image, target = make_sample(30, 50, None)
    out, tgt = build_transforms(AugmentParams(preset=preset), 32, train=train)(image, target)
    assert out.shape == (3, 32, 32)
    assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,) and tgt["masks"].shape == (0, 32, 32)
    assert tgt["semantic"].shape == (32, 32)


def test_eval_is_deterministic_and_float_input_accepted() -> None:
    image, target = make_sample(30, 50, (5, 5, 20, 20))
    t = build_transforms(AugmentParams(), 32, train=False)
    a, ta = t(image, dict(target))
    b, _ = t(tv_tensors.Image(image.float() / 255), dict(target))
    torch.testing.assert_close(a, b, atol=1 / 255, rtol=0)
    assert torch.equal(a, t(image, dict(target))[0])
    assert ta["boxes"][0].tolist() == pytest.approx([3.2, 3.2, 12.8, 12.8])


def test_sanitize_drops_masks_with_boxes_but_keeps_semantic_even_when_n_equals_h() -> None:
    h, w = 3, 5  # three boxes on a 3-row image: the base class would index the [H, W] semantic mask by box
    boxes = tv_tensors.BoundingBoxes([[0, 0, 2, 2], [1, 1, 1, 3], [2, 0, 5, 3]], format="XYXY", canvas_size=(h, w))
    sem = SemanticMask(torch.arange(15, dtype=torch.uint8).reshape(h, w))
    masks = tv_tensors.Mask(torch.stack([torch.full((h, w), i, dtype=torch.uint8) for i in range(3)]))
    sample = {"boxes": boxes, "labels": torch.tensor([4, 5, 6]), "masks": masks, "semantic": sem}
    out = SanitizeBoxesKeepSemantic()(sample)
    assert out["labels"].tolist() == [4, 6]
    assert out["masks"][:, 0, 0].tolist() == [0, 2]
    assert torch.equal(out["semantic"], sem) and isinstance(out["semantic"], SemanticMask)


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid presets: none, light, default, strong"):
        build_transforms(AugmentParams(preset="wild"), 32, train=True)  # type: ignore[arg-type]


def test_letterbox_masks_sample_pixel_centres() -> None:
    # 96 -> 32 keeps every third column; nearest-exact picks the centre one (1, 4, 7, ...), as the bilinear image
    # and unletterbox_mask do, where legacy nearest would pick 0, 3, 6, ... (a one-pixel shift at this scale).
    image, target = make_sample(96, 96, None)
    target["semantic"] = SemanticMask(torch.arange(96, dtype=torch.uint8).repeat(96, 1))
    _, tgt = build_transforms(None, 32, train=False)(image, target)
    assert tgt["semantic"][0].tolist() == list(range(1, 96, 3))
