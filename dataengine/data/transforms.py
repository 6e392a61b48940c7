"""Joint augmentations and the letterbox geometry (torchvision.transforms.v2 on tv_tensors).

Every transform applies to one sample ``(image, target)`` jointly: ``tv_tensors.Image`` uint8 ``[3, H, W]``,
``target["boxes"]`` (``tv_tensors.BoundingBoxes`` XYXY), ``target["labels"]``, ``target["masks"]`` (instance
``tv_tensors.Mask`` ``[N, H, W]``), ``target["semantic"]`` (:class:`SemanticMask` ``[H, W]``: 0 background,
1..K classes, 255 ignore) and optionally ``target["hard_negative"]`` (:class:`HardNegativeMask` ``[H, W]``: the mine
stage's bits, 0 where nothing is mined). Masks are always resampled with nearest neighbours, so the ignore value is
never blended into a class and the bits are never blended into each other.

Padding and zoom-out areas are not real image: they are 255 (ignore) in the semantic mask so that the segmentation
head is never taught that padding is background, but 0 in instance masks (no object there). v2 chooses a fill value
by the exact tv_tensor type of each input (``transforms.v2._utils._get_fill`` looks up ``type(inpt)``) while its
kernels dispatch along the MRO, so a subclass ``SemanticMask(tv_tensors.Mask)`` gets every Mask kernel unchanged
(nearest resize, crop, flip, pad) and its own fill. The one v2 transform that treats masks by shape rather than by
type is ``SanitizeBoundingBoxes`` (it indexes any Mask with the ``[N]`` validity vector, which silently picks rows
of an ``[H, W]`` semantic mask when ``N == H``), so :class:`SanitizeBoxesKeepSemantic` passes SemanticMask (and the
per-pixel :class:`HardNegativeMask`, padded with 0: padding is no mined negative) through.
The alternatives were worse: a validity mask carried beside the semantic mask doubles the work and can drift, and
filling with 0 then re-marking would need the padded geometry of every random transform.

Letterbox (evaluation, pseudo-labelling): the longest side is resized to ``input_size`` and the image is placed at
the **top-left** of the square canvas (padding right/bottom, as torchvision's detection ``GeneralizedRCNNTransform``
batches images), so ``pad_x = pad_y = 0`` and a prediction maps back by a single division
(:func:`unletterbox_boxes`). The image fill is the ImageNet mean in uint8, which normalises to about 0.

Example:
    >>> import torch
    >>> from torchvision import tv_tensors
    >>> t = build_transforms(None, 64, train=False)
    >>> img = tv_tensors.Image(torch.zeros(3, 32, 48, dtype=torch.uint8))
    >>> boxes = tv_tensors.BoundingBoxes([[0.0, 0.0, 24.0, 12.0]], format="XYXY", canvas_size=(32, 48))
    >>> out, tgt = t(img, {"boxes": boxes, "labels": torch.tensor([0])})
    >>> out.shape, out.dtype, tgt["boxes"].tolist()
    (torch.Size([3, 64, 64]), torch.float32, [[0.0, 0.0, 32.0, 16.0]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from dataengine.config import AugmentParams
from dataengine.data.coco import IGNORE_INDEX

__all__ = [
    "FILL",
    "IMAGE_FILL",
    "HardNegativeMask",
    "PRESETS",
    "Letterbox",
    "SanitizeBoxesKeepSemantic",
    "SemanticMask",
    "build_transforms",
    "letterbox_params",
    "letterbox_size",
    "unletterbox_boxes",
    "unletterbox_mask",
]

IMAGE_FILL = (124, 116, 104)
"""Image padding colour: the ImageNet mean in uint8, so padding normalises to about 0 like a zero-padded batch."""


class SemanticMask(tv_tensors.Mask):
    """A semantic segmentation mask ``[H, W]`` (0 background, 1..K classes, 255 ignore).

    Behaves exactly like ``tv_tensors.Mask`` in every v2 kernel (they dispatch along the MRO); it exists so that
    fills can differ (255 here, 0 for instance masks) and so that box sanitisation leaves it alone.
    """


class HardNegativeMask(tv_tensors.Mask):
    """A per-pixel map ``[H, W]`` of the mine stage's hard-negative bits (uint8, 0 = nothing mined).

    Like :class:`SemanticMask` it is one map per image, not one mask per box, so box sanitisation leaves it alone;
    unlike it, padding is 0: the canvas outside the image is neither a mined region nor a hard pixel.
    """


FILL: dict[Any, Any] = {tv_tensors.Image: IMAGE_FILL, SemanticMask: IGNORE_INDEX, HardNegativeMask: 0,
                        tv_tensors.Mask: 0, "others": 0}
"""Per-type fill for every padding / zoom-out transform (v2 looks the fill up by exact type)."""


class SanitizeBoxesKeepSemantic(v2.SanitizeBoundingBoxes):
    """``v2.SanitizeBoundingBoxes`` that drops degenerate boxes with their labels and instance masks, but never
    touches a per-image map, :class:`SemanticMask` or :class:`HardNegativeMask` (the base class would index it with
    the per-box validity vector)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (SemanticMask, HardNegativeMask)):
            return inpt
        return super().transform(inpt, params)


def letterbox_params(orig_h: int, orig_w: int, input_size: int) -> tuple[float, int, int]:
    """Geometry of the evaluation letterbox: ``letterboxed = original * scale + pad``.

    Args:
        orig_h: Original image height in pixels.
        orig_w: Original image width in pixels.
        input_size: Side of the square model input.

    Returns:
        ``(scale, pad_x, pad_y)``; the image sits at the top-left, so both pads are 0.

    Raises:
        ValueError: A size is not positive.

    Example:
        >>> letterbox_params(50, 100, 64)
        (0.64, 0, 0)
    """
    if orig_h <= 0 or orig_w <= 0 or input_size <= 0:
        raise ValueError(
            f"letterbox needs positive sizes, got orig_h={orig_h}, orig_w={orig_w}, input_size={input_size}"
        )
    return input_size / max(orig_h, orig_w), 0, 0


def letterbox_size(orig_h: int, orig_w: int, scale: float) -> tuple[int, int]:
    """Size ``(new_h, new_w)`` of the resized image inside the letterbox (the rest of the canvas is padding).

    Example:
        >>> letterbox_size(50, 100, 0.64)
        (32, 64)
    """
    return max(1, round(orig_h * scale)), max(1, round(orig_w * scale))


class Letterbox(v2.Transform):
    """Resize the longest side to ``size`` and pad to a ``size x size`` square (image at the top-left).

    Images are resized bilinearly with antialiasing, masks with nearest-exact (pixel-centre aligned, the mode
    :func:`unletterbox_mask` inverts with). Boxes are mapped with exactly ``box * scale + pad`` from
    :func:`letterbox_params` rather than v2's per-axis pixel ratio, so that :func:`unletterbox_boxes` inverts them
    exactly; the image's short side is rounded to whole pixels, a stretch of at most half a pixel.

    Args:
        size: Side of the square output.
        fill: Per-type fill (default :data:`FILL`: image mean colour, 255 semantic, 0 instance masks).

    Example:
        >>> import torch
        >>> Letterbox(8)(SemanticMask(torch.ones(2, 4, dtype=torch.uint8)))[:, 0].tolist()
        [1, 1, 1, 1, 255, 255, 255, 255]
    """

    def __init__(self, size: int, fill: dict[Any, Any] | None = None) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"Letterbox size must be positive, got {size}")
        self.size = size
        self.fill = dict(FILL if fill is None else fill)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        orig_h, orig_w = v2.query_size(flat_inputs)
        scale, pad_x, pad_y = letterbox_params(orig_h, orig_w, self.size)
        new_h, new_w = letterbox_size(orig_h, orig_w, scale)
        padding = [pad_x, pad_y, self.size - new_w - pad_x, self.size - new_h - pad_y]  # left, top, right, bottom
        return {"scale": scale, "pad_x": pad_x, "pad_y": pad_y, "new_hw": [new_h, new_w], "padding": padding}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            return self._boxes(inpt, params)
        if isinstance(inpt, tv_tensors.Mask):
            out = F.resize(inpt, params["new_hw"], interpolation=InterpolationMode.NEAREST_EXACT)
        elif isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)):
            out = F.resize(inpt, params["new_hw"], interpolation=InterpolationMode.BILINEAR, antialias=True)
        else:
            return inpt
        fill = self.fill.get(type(inpt), self.fill.get("others", 0))
        return F.pad(out, padding=params["padding"], fill=fill)

    def _boxes(self, boxes: tv_tensors.BoundingBoxes, params: dict[str, Any]) -> tv_tensors.BoundingBoxes:
        xyxy_format = tv_tensors.BoundingBoxFormat.XYXY
        xyxy = F.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), boxes.format, xyxy_format)  # [N, 4]
        shift = torch.tensor([params["pad_x"], params["pad_y"]] * 2, dtype=xyxy.dtype)
        out = F.convert_bounding_box_format(xyxy * params["scale"] + shift, xyxy_format, boxes.format)
        return tv_tensors.wrap(out, like=boxes, canvas_size=(self.size, self.size))


def unletterbox_boxes(boxes_xyxy: Any, scale: float, pad_x: float, pad_y: float) -> Any:
    """Map ``xyxy`` boxes from letterboxed input coordinates back to the original image (inverse of the letterbox).

    Boxes are not clipped: clip with :func:`dataengine.boxes.clip_xyxy` and the original size if needed.

    Args:
        boxes_xyxy: ``[..., 4]`` tensor or array (a tensor comes back as a tensor, anything else as NumPy).
        scale: From :func:`letterbox_params`.
        pad_x: From :func:`letterbox_params`.
        pad_y: From :func:`letterbox_params`.

    Example:
        >>> unletterbox_boxes([[0.0, 0.0, 32.0, 16.0]], 0.64, 0, 0).tolist()
        [[0.0, 0.0, 50.0, 25.0]]
    """
    shift = [pad_x, pad_y, pad_x, pad_y]
    if isinstance(boxes_xyxy, torch.Tensor):
        b = boxes_xyxy if boxes_xyxy.is_floating_point() else boxes_xyxy.float()
        return (b - torch.tensor(shift, dtype=b.dtype, device=b.device)) / scale
    return (np.asarray(boxes_xyxy, dtype=np.float64) - np.asarray(shift, dtype=np.float64)) / scale


def unletterbox_mask(
    mask_or_probs: torch.Tensor, orig_h: int, orig_w: int, scale: float, pad_x: int, pad_y: int
) -> torch.Tensor:
    """Crop the letterbox padding off a per-pixel map and resize it to the original image size.

    Floating tensors are probabilities or logits and are resized bilinearly (antialiased when shrinking); integer
    and bool tensors are labels and are resized with nearest-exact, so 255 (ignore) and class ids stay exact.

    Args:
        mask_or_probs: ``[..., S, S]`` (e.g. labels ``[S, S]``, probabilities ``[C, S, S]`` or ``[B, C, S, S]``).
        orig_h: Original image height.
        orig_w: Original image width.
        scale: From :func:`letterbox_params`.
        pad_x: From :func:`letterbox_params`.
        pad_y: From :func:`letterbox_params`.

    Returns:
        ``[..., orig_h, orig_w]``, same dtype.

    Raises:
        ValueError: The map is smaller than the letterboxed image it should contain.

    Example:
        >>> import torch
        >>> unletterbox_mask(torch.tensor([[1, 2], [255, 255]]), 1, 4, 0.5, 0, 0).tolist()
        [[1, 1, 2, 2]]
    """
    new_h, new_w = letterbox_size(orig_h, orig_w, scale)
    h, w = mask_or_probs.shape[-2:]
    if h < pad_y + new_h or w < pad_x + new_w:
        raise ValueError(
            f"map of size {h}x{w} cannot hold a {orig_h}x{orig_w} image letterboxed at scale {scale} "
            f"(needs {pad_y + new_h}x{pad_x + new_w})"
        )
    crop = mask_or_probs[..., pad_y : pad_y + new_h, pad_x : pad_x + new_w]  # [..., new_h, new_w]
    if mask_or_probs.is_floating_point():
        return F.resize_image(crop, [orig_h, orig_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.resize_mask(crop, [orig_h, orig_w], interpolation=InterpolationMode.NEAREST_EXACT)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


def _head() -> list[v2.Transform]:
    # uint8 from here on, so that IMAGE_FILL is in the image's range whatever the caller passed in.
    return [v2.ToImage(), v2.ToDtype({tv_tensors.Image: torch.uint8, "others": None}, scale=True)]


def _tail() -> list[v2.Transform]:
    # Clamp before sanitising: boxes partly outside the crop are kept (clipped), only degenerate ones are dropped
    # (torchvision's SanitizeBoundingBoxes documentation recommends this order).
    return [
        v2.ClampBoundingBoxes(),
        SanitizeBoxesKeepSemantic(),
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
    ]


def _scale_jitter_letterbox(aug: AugmentParams, size: int) -> list[v2.Transform]:
    # Large-scale jitter (Ghiasi et al., "Simple Copy-Paste", 2021): resize so the image fits in size * s for
    # s ~ U[scale_min, scale_max], then crop / pad to size x size at a random place. At s = 1 it is a letterbox with
    # a random offset; s < 1 adds padding (255 in the semantic mask), s > 1 crops.
    return [
        v2.ScaleJitter((size, size), scale_range=(aug.scale_min, aug.scale_max), antialias=True),
        v2.RandomCrop(size, pad_if_needed=True, fill=FILL),
    ]


def _preset_none(aug: AugmentParams, size: int) -> list[v2.Transform]:
    return [Letterbox(size)]


def _preset_light(aug: AugmentParams, size: int) -> list[v2.Transform]:
    return [v2.RandomHorizontalFlip(aug.hflip), Letterbox(size)]


def _preset_default(aug: AugmentParams, size: int) -> list[v2.Transform]:
    # Colour jitter is mild and leaves hue alone: colour separates classes in stained microscopy (BCCD), and
    # RandomPhotometricDistort's channel permutation would swap stains. Hue is also the costly part (one CPU thread,
    # 256 px: 3.8 ms with hue=0.02, 0.6 ms without). It runs last, on the S x S result rather than the full photo
    # (640 px: 6.2 ms); padding gets jittered too, harmlessly: it is ignore in the semantic mask and holds no object.
    return [
        *_scale_jitter_letterbox(aug, size),
        v2.RandomHorizontalFlip(aug.hflip),
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)], p=aug.photometric),
    ]


def _preset_strong(aug: AugmentParams, size: int) -> list[v2.Transform]:
    # SSD's expand + IoU crop (Liu et al. 2016, §2.2 "Data augmentation"), then the default scale jitter. Without
    # boxes RandomIoUCrop draws options until its "keep as is" one, so zero-box images pass unchanged.
    return [
        v2.RandomZoomOut(fill=FILL, side_range=(1.0, 2.0), p=0.5),
        v2.RandomIoUCrop(),
        *_scale_jitter_letterbox(aug, size),
        v2.RandomHorizontalFlip(aug.hflip),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.04)], p=aug.photometric),
        v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.5))], p=0.2 * aug.photometric),
    ]


PRESETS: dict[str, Callable[[AugmentParams, int], list[v2.Transform]]] = {
    "none": _preset_none,
    "light": _preset_light,
    "default": _preset_default,
    "strong": _preset_strong,
}
"""Augmentation presets by name (``augment.preset`` in params.yaml)."""


def build_transforms(augment: AugmentParams | None, input_size: int, train: bool) -> v2.Transform:
    """The joint transform for one sample ``(image, target)``, ending in a float32 ``[3, S, S]`` image in [0, 1].

    Args:
        augment: Augmentation params; ``None`` means no augmentation (the evaluation letterbox), as does
            ``train=False`` or ``preset="none"``.
        input_size: Side ``S`` of the square output.
        train: Whether to apply the random augmentations of ``augment.preset``.

    Returns:
        A ``v2.Compose`` taking ``image`` (uint8 or float ``tv_tensors.Image``) and a target dict with
        ``boxes``/``labels`` and optionally ``masks`` (instance) and ``semantic`` (:class:`SemanticMask`). Degenerate
        boxes are dropped with their labels and instance masks.

    Raises:
        ValueError: Unknown preset (the message lists the valid ones) or non-positive ``input_size``.

    Example:
        >>> from dataengine.config import AugmentParams
        >>> t = build_transforms(AugmentParams(preset="light"), 128, train=True)
        >>> type(t).__name__
        'Compose'
    """
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    aug = augment if augment is not None else AugmentParams(preset="none")
    if aug.preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {aug.preset!r}; valid presets: {', '.join(PRESETS)}")
    body = PRESETS[aug.preset if train else "none"](aug, input_size)
    return v2.Compose([*_head(), *body, *_tail()])
