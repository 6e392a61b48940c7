"""Test-time augmentation views (scale x horizontal flip) and their exact maps back to original image coordinates.

A view is the evaluation letterbox (:mod:`dataengine.data.transforms`: longest side resized to the view's input
size ``S``, image at the top-left, padding right/bottom) at one of several sizes, optionally mirrored. The mirror
flips only the **image region** of the letterboxed canvas (its first ``new_w`` columns), not the padding, so a
flipped view still has its padding on the right and bottom as in training (``RandomHorizontalFlip`` runs before
``Letterbox`` there). Its inverse is therefore ``x -> new_w - x`` in canvas pixels, followed by the letterbox inverse
(:func:`~dataengine.data.transforms.unletterbox_boxes` / ``unletterbox_mask``).

View sizes are ``scale * input_size`` rounded to a multiple of 32 (the stride of P5, so every pyramid level tiles
the input exactly). The multi-task models are fully convolutional and take their anchor points from the feature
maps' shapes (:meth:`~dataengine.models.MultiTaskDetSeg.anchor_points`), so any such size decodes correctly.

Example:
    >>> [(v.size, v.flip) for v in tta_views(128, (1.0, 1.25), hflip=True)]
    [(128, False), (128, True), (160, False), (160, True)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from dataengine.boxes import clip_xyxy
from dataengine.config import ParamsError
from dataengine.data.images import ImageReadError, read_image
from dataengine.data.transforms import (
    Letterbox,
    letterbox_params,
    letterbox_size,
    unletterbox_boxes,
    unletterbox_mask,
)
from dataengine.io import safe_join

__all__ = [
    "TTADataset",
    "TTAView",
    "collate_views",
    "flip_image_regions",
    "tta_views",
    "view_boxes_to_original",
    "view_probs_to_original",
]

SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class TTAView:
    """One test-time view: letterbox to ``size`` x ``size``, mirrored when ``flip``."""

    size: int
    flip: bool


def tta_views(input_size: int, scales: Sequence[float], hflip: bool) -> list[TTAView]:
    """The views of a TTA setting, scale-major (each scale unflipped, then flipped).

    Args:
        input_size: The model's input side.
        scales: Multiples of ``input_size``; each gives ``max(32, round(scale * input_size / 32) * 32)``.
        hflip: Add a mirrored view of every scale.

    Raises:
        ParamsError: (a ``ValueError``) No scales, a scale that is not positive, or two scales that round to the same
            size: a bad ``pseudo_label.tta_scales``, reported by the stage in one line.

    Example:
        >>> [v.size for v in tta_views(64, (0.5, 1.5), hflip=False)]
        [32, 96]
    """
    if not scales:
        raise ParamsError("pseudo_label.tta_scales is empty; give at least one scale (1.0 = the model's input size)")
    sizes = []
    for scale in scales:
        if not scale > 0:
            raise ParamsError(f"pseudo_label.tta_scales: {scale} is not a positive multiple of the input size")
        sizes.append(max(SIZE_MULTIPLE, round(scale * input_size / SIZE_MULTIPLE) * SIZE_MULTIPLE))
    if len(set(sizes)) != len(sizes):
        raise ParamsError(f"pseudo_label.tta_scales {list(scales)} give input sizes {sizes} for a model input of "
                         f"{input_size} (multiples of {SIZE_MULTIPLE}); each scale must give a different size")
    return [TTAView(size, flip) for size in sizes for flip in ((False, True) if hflip else (False,))]


def _region_width(orig_h: int, orig_w: int, size: int) -> int:
    scale, _, _ = letterbox_params(orig_h, orig_w, size)
    return letterbox_size(orig_h, orig_w, scale)[1]


def flip_image_regions(images: torch.Tensor, orig_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mirror the image region of each letterboxed image (padding stays right/bottom); returns a new tensor.

    Args:
        images: ``[B, C, S, S]`` letterboxed images (or per-pixel maps) of one view size.
        orig_sizes: ``(h, w)`` of each original image.

    Example:
        >>> flip_image_regions(torch.tensor([[[[1, 2, 3, 0]]]]), [(4, 3)]).tolist()  # a 4x3 image: 3 columns of 4
        [[[[3, 2, 1, 0]]]]
    """
    if images.shape[0] != len(orig_sizes):
        raise ValueError(f"{images.shape[0]} images but {len(orig_sizes)} original sizes")
    size = images.shape[-1]
    out = images.clone()
    for i, (h, w) in enumerate(orig_sizes):
        new_w = _region_width(h, w, size)
        out[i, ..., :new_w] = images[i, ..., :new_w].flip(-1)
    return out


def view_boxes_to_original(boxes: torch.Tensor, view: TTAView, orig_h: int, orig_w: int) -> torch.Tensor:
    """Map ``xyxy`` boxes predicted on a view back to the original image, clipped to it.

    Args:
        boxes: ``[M, 4]`` xyxy in the view's canvas pixels.
        view: The view they were predicted on.
        orig_h: Original image height.
        orig_w: Original image width.

    Returns:
        ``[M, 4]`` xyxy original pixels (float).

    Example:
        >>> b = torch.tensor([[0.0, 0.0, 16.0, 8.0]])  # on a 64 px view of a 100 x 50 (w x h) image: scale 0.64
        >>> view_boxes_to_original(b, TTAView(64, flip=True), 50, 100).tolist()
        [[75.0, 0.0, 100.0, 12.5]]
    """
    scale, pad_x, pad_y = letterbox_params(orig_h, orig_w, view.size)
    boxes = boxes.float() if not boxes.is_floating_point() else boxes
    if view.flip:
        new_w = letterbox_size(orig_h, orig_w, scale)[1]
        boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)  # [M, 4]
    return clip_xyxy(unletterbox_boxes(boxes, scale, pad_x, pad_y), orig_w, orig_h)


def view_probs_to_original(probs: torch.Tensor, view: TTAView, orig_h: int, orig_w: int) -> torch.Tensor:
    """Map per-pixel class probabilities of a view back to the original image (crop, resize, unflip).

    The mirror is undone after resizing, on the original-size map: resizing commutes with a horizontal flip, and
    flipping there avoids copying the canvas.

    Args:
        probs: ``[..., C, S, S]`` probabilities on the view's canvas (e.g. a batch of images of one original size).
        view: The view they were predicted on.
        orig_h: Original image height.
        orig_w: Original image width.

    Returns:
        ``[..., C, orig_h, orig_w]`` probabilities (bilinear, antialiased when shrinking).

    Example:
        >>> p = torch.zeros(2, 4, 4); p[1, :2, :1] = 1.0  # a 2 x 4 image on a 4 x 4 canvas, column 0 is class 1
        >>> view_probs_to_original(p, TTAView(4, flip=True), 2, 4)[1].tolist()
        [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """
    scale, pad_x, pad_y = letterbox_params(orig_h, orig_w, view.size)
    out = unletterbox_mask(probs, orig_h, orig_w, scale, pad_x, pad_y)
    return out.flip(-1) if view.flip else out


class TTADataset(Dataset[dict[str, Any]]):
    """Reads each image once and letterboxes it to every view size (uint8, so workers send 4x fewer bytes).

    An unreadable image yields ``{"index", "file_name", "error"}`` instead of raising, so one bad file neither stops
    the run nor is silently dropped.
    """

    def __init__(self, root: Path, files: Sequence[str], sizes: Sequence[int]) -> None:
        self.root, self.files, self.sizes = root, list(files), list(sizes)
        self.letterboxes = [Letterbox(size) for size in self.sizes]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.files[index]
        try:
            pixels = read_image(safe_join(self.root, name))  # [H, W, 3] uint8
        except ImageReadError as err:
            return {"index": index, "file_name": name, "error": str(err)}
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))  # [3, H, W]
        return {"index": index, "file_name": name, "orig_size": (int(pixels.shape[0]), int(pixels.shape[1])),
                "views": [lb(image).as_subclass(torch.Tensor) for lb in self.letterboxes]}  # [3, S, S] each


def collate_views(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`TTADataset` items: the readable ones stacked per view size, the unreadable ones listed."""
    ok = [item for item in items if "error" not in item]
    images = [torch.stack([item["views"][j] for item in ok]) for j in range(len(ok[0]["views"]))] if ok else []
    return {"items": [{k: v for k, v in item.items() if k != "views"} for item in ok],
            "images": images,  # per view size: uint8 [B, 3, S, S]
            "skipped": [{"file_name": item["file_name"], "reason": item["error"], "index": item["index"]}
                        for item in items if "error" in item]}
