"""The synthetic demo dataset: coloured shapes in a plain *general* domain and a shifted *scenario* domain.

Built so that every part of the engine has something to do on a laptop CPU in minutes:

- **General ground truth** (``general/train.json``, ``general/val.json``): 1-4 shapes per image on flat,
  gradient or faintly textured backgrounds, with boxes, instance polygons and a semantic PNG (``semantic_file``).
  Five classes with a long tail (:data:`CLASS_SHARES`: the rarest, ``cross``, is about 3.5 % of instances).
  A class is defined by its **shape**; it also has a colour family (:data:`CLASS_HUES`) with jitter and some
  off-palette instances, so colour is a cue but not the whole story.
- **Scenario pool** (``scenario/pool/``): unlabelled images from a visibly different domain -- photographs and
  textures from scikit-image as backgrounds, darker/brighter light with colour casts, lower contrast, smaller
  objects, more clutter, about 10 % of images without any object, and **confusers**: shapes that resemble a class
  in its colour family but are not one (:data:`CONFUSER_OF`: an ellipse or hexagon next to the circle, a
  rectangle next to the square, ...). A teacher trained on the general domain fires on them: they are the hard
  negatives that mining should find. ``DemoParams.general_confuser_rate`` puts some in the general set too, as
  unlabelled background (``params.yaml``: 0.2 per image; the library default 0 keeps them scenario-only, the hardest
  case for a filter calibrated on general val). Files sit in
  nested folders with mixed-case extensions and some JPEGs (:data:`POOL_FOLDERS`), to exercise the scenario-folder
  contract. The true labels go to ``scenario/pool_hidden.json`` (with ``confusers`` metadata), read only by diagnostics.
- **Scenario test set** (``scenario/test.json``): same domain as the pool, disjoint images, fully labelled, with
  ``semantic_file`` and ``confusers`` metadata. Confusers are background: neither annotations nor mask pixels.

The domain gap is set by two :class:`DomainStyle` presets, :data:`GENERAL` and :data:`SCENARIO`; every knob that
changes difficulty (background mix, lighting, scale, clutter, confusers, empty images) is a field there.

Determinism: image ``i`` of split ``s`` draws from its own ``numpy`` generators seeded by
``SeedSequence(seed, spawn_key=(s, i))`` -- one stream for the layout (what is where) and one for the pixels --
so :func:`split_layouts` gives the labels without rendering, and the same seed writes byte-identical files.

Geometry: every shape is a polygon in pixel coordinates where pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``
(the pycocotools convention). The one polygon is the COCO ``segmentation``; its pycocotools mask gives the box
(the mask's tight box, in whole pixels), the ``area`` and the semantic mask; and it is drawn anti-aliased with the
shape's colour dominating (coverage >= 0.5) exactly the mask's pixels. Boxes, masks, semantic pixels and drawn
pixels therefore agree. Shapes keep a gap of at least :data:`MIN_GAP` pixels between their masks, so no object
hides another.

Example:
    >>> from dataengine.config import DemoParams
    >>> summary = generate_demo("/tmp/demo", DemoParams(n_train=8, n_val=4, n_pool=8, n_test=4))  # doctest: +SKIP
    >>> summary["splits"]["train"]["images"]  # doctest: +SKIP
    8
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import io
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy import ndimage
from tqdm import tqdm

from dataengine.config import DemoParams, ParamsError, from_dict
from dataengine.data.coco import CategoryMap, empty_coco, save_coco
from dataengine.data.layout import PreparedLayout
from dataengine.data.prepare import count_coco
from dataengine.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "CLASS_NAMES",
    "CLASS_SHARES",
    "CLASS_HUES",
    "CONFUSER_OF",
    "POOL_FOLDERS",
    "SPLITS",
    "DomainStyle",
    "GENERAL",
    "SCENARIO",
    "PlacedShape",
    "ImageLayout",
    "split_style",
    "sample_layout",
    "split_layouts",
    "render_image",
    "generate_demo",
    "demo_cli",
]

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")
"""Category names; COCO ids are ``1..5`` in this order."""

CLASS_SHARES = (0.39, 0.27, 0.18, 0.125, 0.035)
"""Expected share of instances per class (a long tail: ``cross``, the rare class, stays below 5 % of a
600-image split with high probability: 3.5 % +- 0.5 % standard deviation over ~1500 instances)."""

CLASS_HUES = {"circle": 0.0, "square": 215.0, "triangle": 125.0, "star": 50.0, "cross": 290.0}
"""Centre of each class's colour family, in HSV hue degrees (red, blue, green, yellow, purple)."""

CONFUSER_OF = {
    "ellipse": "circle",
    "hexagon": "circle",
    "rectangle": "square",
    "trapezoid": "triangle",
    "pentagon": "star",
    "tee": "cross",
}
"""Confuser shape -> the class it resembles (and whose colour family it is painted in)."""

POOL_FOLDERS = (("cam0", ".png"), ("cam1", ".PNG"), ("cam2", ".jpg"), ("cam3/dusk", ".JPG"))
"""Pool image ``i`` goes to ``POOL_FOLDERS[i % 4]``: nested folders, mixed-case extensions, some JPEGs."""

SPLITS = ("train", "val", "pool", "test")
"""Splits in generation order (this order also numbers image and annotation ids)."""

MIN_GAP = 2
"""Pixels kept free between any two shape masks: anti-aliased edges never blend, masks never overlap."""

_SUPERSAMPLE = 4  # anti-aliasing: 4x4 subpixels per pixel = 17 coverage levels
_JPEG_QUALITY = 95
_PNG_COMPRESS_LEVEL = 6  # fixed so that the bytes do not depend on PIL's default
_PLACEMENT_TRIES = 40
_ASPECT_JITTER = 0.08  # classes stay recognisable: a square is at most 8 % off square
_FULL_TURN_KINDS = frozenset({"circle", "ellipse", "hexagon", "star", "pentagon"})  # no "upright": any angle
_REFERENCE_SIZE = 128  # sizes and widths in DomainStyle are in pixels at this image size, scaled with it


@dataclass(frozen=True)
class DomainStyle:
    """Every knob that sets how a domain looks and how hard it is. Sizes are in pixels at 128 px images.

    Attributes:
        objects: Inclusive range of objects per non-empty image (fewer when they cannot be placed).
        empty_rate: Share of a split's images without any object (exactly ``round(empty_rate * n)`` images,
            chosen by seed; confusers and clutter may still appear on them).
        size_range: Object size range (log-uniform), in pixels at 128 px.
        class_shares: Probability of each class in :data:`CLASS_NAMES` order.
        background_mix: Probabilities of ``(flat colour, linear gradient, texture)`` backgrounds.
        texture_strength: Range of the blend weight of the texture over a flat colour (1 = the raw texture).
        brightness: Range of a global brightness gain.
        contrast: Range of a global contrast factor around the image mean.
        colour_cast: Maximum per-channel gain deviation (a colour cast of the light).
        noise_std: Range of Gaussian sensor-noise standard deviation, in 0..255 units.
        blur: Range of Gaussian blur sigma, in pixels at 128 px (below 0.1: no blur).
        clutter: Inclusive range of clutter items (lines, dots, scribbles) drawn under the objects.
        confuser_rate: Mean number of confusers per image (Poisson, at most 3).
        hue_jitter: Maximum hue deviation from the class colour family, in degrees.
        off_palette_rate: Probability that a shape gets a random hue instead of its family's.
        rotation: Maximum rotation, in degrees, of shapes that have an upright pose (square, triangle, cross).
        max_iou: Maximum box IoU between two shapes of one image (masks never overlap; see :data:`MIN_GAP`).
        min_contrast: Minimum RGB distance (0..1, per channel RMS) between a shape and the background under it;
            closer colours are re-drawn lighter or darker.
    """

    objects: tuple[int, int]
    empty_rate: float
    size_range: tuple[float, float]
    class_shares: tuple[float, ...] = CLASS_SHARES
    background_mix: tuple[float, float, float] = (0.45, 0.45, 0.10)
    texture_strength: tuple[float, float] = (0.15, 0.35)
    brightness: tuple[float, float] = (0.92, 1.08)
    contrast: tuple[float, float] = (0.9, 1.1)
    colour_cast: float = 0.03
    noise_std: tuple[float, float] = (0.0, 4.0)
    blur: tuple[float, float] = (0.0, 0.0)
    clutter: tuple[int, int] = (0, 1)
    confuser_rate: float = 0.0
    hue_jitter: float = 20.0
    off_palette_rate: float = 0.1
    rotation: float = 15.0
    max_iou: float = 0.15
    min_contrast: float = 0.2

    def __post_init__(self) -> None:
        if len(self.class_shares) != len(CLASS_NAMES) or not math.isclose(sum(self.class_shares), 1.0, abs_tol=1e-6):
            raise ValueError(f"class_shares must be {len(CLASS_NAMES)} probabilities summing to 1, "
                             f"got {self.class_shares}")
        if len(self.background_mix) != 3 or not math.isclose(sum(self.background_mix), 1.0, abs_tol=1e-6):
            raise ValueError(f"background_mix must be 3 probabilities summing to 1, got {self.background_mix}")
        if not 0 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects must be an inclusive range 0 <= lo <= hi, got {self.objects}")
        if not 0 < self.size_range[0] <= self.size_range[1]:
            raise ValueError(f"size_range must be 0 < lo <= hi, got {self.size_range}")


GENERAL = DomainStyle(objects=(1, 4), empty_rate=0.0, size_range=(14.0, 48.0))
"""The labelled domain: plain backgrounds, even light, larger objects, no confusers, little clutter."""

SCENARIO = DomainStyle(
    objects=(1, 6),
    empty_rate=0.1,
    size_range=(10.0, 36.0),
    background_mix=(0.05, 0.15, 0.80),
    texture_strength=(0.55, 0.9),
    brightness=(0.6, 1.3),
    contrast=(0.6, 0.95),
    colour_cast=0.12,
    noise_std=(2.0, 7.0),
    blur=(0.0, 0.7),
    clutter=(2, 7),
    confuser_rate=0.8,
    hue_jitter=25.0,
    rotation=25.0,
    min_contrast=0.15,
)
"""The deployment domain: photographic/texture backgrounds, uneven light, smaller objects, clutter, confusers,
about 10 % empty images."""


def split_style(split: str, general_confuser_rate: float = 0.0) -> DomainStyle:
    """The style of a split: :data:`GENERAL` for ``train``/``val``, :data:`SCENARIO` for ``pool``/``test``.

    ``general_confuser_rate`` (``DemoParams.general_confuser_rate``) replaces :data:`GENERAL`'s ``confuser_rate``:
    look-alikes in the general set, as unlabelled background (the scenario's styles are unchanged).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected one of {SPLITS}")
    if split in ("pool", "test"):
        return SCENARIO
    return replace(GENERAL, confuser_rate=general_confuser_rate) if general_confuser_rate else GENERAL


# --------------------------------------------------------------------------------------------------------------
# Layout: what is where (no pixels)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PlacedShape:
    """One shape of an image.

    Attributes:
        kind: Shape name: a class name (an object) or a key of :data:`CONFUSER_OF` (a confuser).
        category_id: COCO category id ``1..K`` for objects, ``0`` for confusers.
        polygon: ``[N, 2]`` absolute ``x, y`` vertices in pixels, rounded to 0.01 (exactly what COCO stores).
    """

    kind: str
    category_id: int
    polygon: np.ndarray

    @property
    def resembles(self) -> str:
        """The class this shape is (object) or looks like (confuser)."""
        return self.kind if self.category_id else CONFUSER_OF[self.kind]

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """Tight box of the polygon's vertices (absolute ``xyxy``); used for placement and drawing."""
        (x1, y1), (x2, y2) = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(x1), float(y1), float(x2), float(y2)

    def rle(self, size: int) -> dict[str, Any]:
        """The polygon rasterised by pycocotools on a ``size x size`` image, as any COCO reader will see it."""
        return mask_utils.frPyObjects([self.polygon.ravel().tolist()], size, size)[0]

    def mask(self, size: int) -> np.ndarray:
        """``[size, size]`` uint8 mask of the polygon."""
        return mask_utils.decode(self.rle(size))

    def coco_bbox(self, size: int) -> list[float]:
        """COCO ``[x, y, w, h]`` of the polygon's **mask** (whole pixels).

        The mask's box, not the vertices': a sharp tip thinner than half a pixel is not in the mask (and is drawn
        only faintly), so a vertex box would be up to 1.5 px larger than the mask it annotates.
        """
        return [float(v) for v in mask_utils.toBbox(self.rle(size))]


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """The objects and confusers of one square image of side ``size``."""

    size: int
    objects: tuple[PlacedShape, ...]
    confusers: tuple[PlacedShape, ...]


def _regular(n: int, radius: float, phase_deg: float = -90.0) -> np.ndarray:
    t = np.deg2rad(phase_deg) + np.arange(n) * (2 * np.pi / n)
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_shape(kind: str, rng: np.random.Generator) -> np.ndarray:
    """``[N, 2]`` vertices of a shape of nominal extent 1 centred near the origin (``y`` points down)."""
    if kind == "circle":
        return _regular(48, 0.5)
    if kind == "ellipse":
        return _regular(48, 0.5) * np.array([1.0, rng.uniform(0.5, 0.72)])
    if kind == "hexagon":
        return _regular(6, 0.5)
    if kind == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "rectangle":
        h = rng.uniform(0.45, 0.65) / 2
        return np.array([[-0.5, -h], [0.5, -h], [0.5, h], [-0.5, h]])
    if kind == "triangle":  # equilateral, base 1, apex up, centroid at the origin
        return np.array([[0.0, -1 / math.sqrt(3)], [0.5, 0.5 / math.sqrt(3)], [-0.5, 0.5 / math.sqrt(3)]])
    if kind == "trapezoid":  # a triangle with its apex cut off
        u = rng.uniform(0.12, 0.22)
        return np.array([[-u, -0.4], [u, -0.4], [0.5, 0.4], [-0.5, 0.4]])
    if kind in ("star", "pentagon"):
        if kind == "pentagon":
            return _regular(5, 0.5)
        radii = np.tile([0.5, 0.5 * rng.uniform(0.38, 0.5)], 5)
        return _regular(10, 1.0) * radii[:, None]
    if kind in ("cross", "tee"):
        t = rng.uniform(0.28, 0.38) / 2  # half the bar thickness
        if kind == "cross":
            return np.array([[-t, -0.5], [t, -0.5], [t, -t], [0.5, -t], [0.5, t], [t, t], [t, 0.5], [-t, 0.5],
                             [-t, t], [-0.5, t], [-0.5, -t], [-t, -t]])
        top = -0.5 + 2 * t
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, top], [t, top], [t, 0.5], [-t, 0.5], [-t, top],
                         [-0.5, top]])
    raise ValueError(f"unknown shape {kind!r}; known: {CLASS_NAMES + tuple(CONFUSER_OF)}")


def _shape_polygon(kind: str, image_size: int, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """A randomly sized, stretched, rotated and placed ``[N, 2]`` polygon that lies inside the image."""
    scale = image_size / _REFERENCE_SIZE
    lo, hi = style.size_range
    size = math.exp(rng.uniform(math.log(lo), math.log(hi))) * scale  # log-uniform: as many small as large
    pts = _unit_shape(kind, rng) * size
    if kind in CLASS_NAMES:
        pts[:, 0] *= 1.0 + rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER)
    angle = np.deg2rad(rng.uniform(-180, 180) if kind in _FULL_TURN_KINDS else rng.uniform(-1, 1) * style.rotation)
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    lo_xy, hi_xy = pts.min(axis=0), pts.max(axis=0)
    span = image_size - 2.0 - (hi_xy - lo_xy)  # keep a 1 px border
    offset = 1.0 - lo_xy + rng.uniform(0.0, 1.0, 2) * np.maximum(span, 0.0)
    return np.round(pts + offset, 2)


def _box_iou(box: tuple[float, ...], others: list[tuple[float, ...]]) -> float:
    """Largest IoU of one ``xyxy`` box against a few others (plain NumPy: no torch import for 4 numbers)."""
    if not others:
        return 0.0
    b, o = np.asarray(box), np.asarray(others)
    iw = np.clip(np.minimum(b[2], o[:, 2]) - np.maximum(b[0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(b[3], o[:, 3]) - np.maximum(b[1], o[:, 1]), 0, None)
    inter = iw * ih
    union = (b[2] - b[0]) * (b[3] - b[1]) + (o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1]) - inter
    return float((inter / union).max())


def sample_layout(rng: np.random.Generator, style: DomainStyle, image_size: int, *, empty: bool = False) -> ImageLayout:
    """Draw the objects and confusers of one image (rejection sampling; no pixels are rendered).

    Each shape is tried up to 40 times; it is dropped when it cannot be placed with a box IoU below
    ``style.max_iou`` and a mask gap of :data:`MIN_GAP` pixels to every shape already placed.

    Args:
        rng: The image's layout generator.
        style: The domain style.
        image_size: Side of the square image in pixels.
        empty: Draw no object (confusers still follow ``style.confuser_rate``).

    Returns:
        The layout; objects in drawing order, then confusers.

    Example:
        >>> layout = sample_layout(np.random.default_rng(0), GENERAL, 128)
        >>> 1 <= len(layout.objects) <= 4 and not layout.confusers
        True
    """
    n_objects = 0 if empty else int(rng.integers(style.objects[0], style.objects[1] + 1))
    n_confusers = min(int(rng.poisson(style.confuser_rate)), 3)
    labels = rng.choice(len(CLASS_NAMES), size=n_objects, p=np.asarray(style.class_shares))
    kinds = [CLASS_NAMES[k] for k in labels] + list(rng.choice(sorted(CONFUSER_OF), size=n_confusers))
    occupied = np.zeros((image_size, image_size), dtype=bool)
    boxes: list[tuple[float, ...]] = []
    objects: list[PlacedShape] = []
    confusers: list[PlacedShape] = []
    for i, kind in enumerate(kinds):
        category_id = CLASS_NAMES.index(kind) + 1 if i < n_objects else 0
        for _ in range(_PLACEMENT_TRIES):
            shape = PlacedShape(str(kind), category_id, _shape_polygon(str(kind), image_size, style, rng))
            if _box_iou(shape.xyxy, boxes) >= style.max_iou:
                continue
            mask = shape.mask(image_size).astype(bool)
            if (ndimage.binary_dilation(mask, iterations=MIN_GAP) & occupied).any():
                continue
            occupied |= mask
            boxes.append(shape.xyxy)
            (objects if category_id else confusers).append(shape)
            break
    return ImageLayout(image_size, tuple(objects), tuple(confusers))


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"demo seed must be >= 0 (numpy SeedSequence entropy), got {seed}")


def _image_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent ``(layout, render)`` generators of one image: labels never depend on how pixels are drawn."""
    _check_seed(seed)
    layout_seq, render_seq = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), index)).spawn(2)
    return np.random.default_rng(layout_seq), np.random.default_rng(render_seq)


def _empty_indices(seed: int, split: str, n: int) -> frozenset[int]:
    """Which images of a split have no object: exactly ``round(empty_rate * n)`` of them, so a 150-image test set
    has its 15 empty images rather than anywhere between 8 and 25."""
    _check_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),)))
    return frozenset(rng.permutation(n)[:round(split_style(split).empty_rate * n)].tolist())


def _layout(params: DemoParams, split: str, index: int,
            empty: frozenset[int]) -> tuple[ImageLayout, np.random.Generator]:
    """Layout of one image and its render generator."""
    layout_rng, render_rng = _image_rngs(params.seed, split, index)
    style = split_style(split, params.general_confuser_rate)
    return sample_layout(layout_rng, style, params.image_size, empty=index in empty), render_rng


def split_layouts(params: DemoParams, split: str) -> list[ImageLayout]:
    """The layouts of every image of a split, exactly as :func:`generate_demo` draws them, without rendering.

    Fast (1-2 ms per image at 128 px): use it to check label statistics on full-size parameters.

    Example:
        >>> layouts = split_layouts(DemoParams(n_train=3), "train")
        >>> len(layouts)
        3
    """
    n = getattr(params, f"n_{split}")
    empty = _empty_indices(params.seed, split, n)
    return [_layout(params, split, i, empty)[0] for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# Rendering: pixels from a layout
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _texture_sources() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photographs and textures (shipped in its wheel: no download), float32 in 0..1."""
    from skimage import data as skdata  # lazy: only the scenario needs it

    names = ("brick", "grass", "gravel", "camera", "moon", "coins", "coffee", "rocket", "chelsea", "astronaut",
             "immunohistochemistry")
    return tuple(np.asarray(getattr(skdata, name)(), dtype=np.float32) / 255.0 for name in names)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32)


def _plain_colour(rng: np.random.Generator) -> np.ndarray:
    """A background colour: any hue, low saturation, mid to high value."""
    return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.45, 0.95))


def _background(rng: np.random.Generator, style: DomainStyle, size: int) -> np.ndarray:
    """``[H, W, 3]`` float32 background: a flat colour, a linear gradient, or a texture over a flat colour."""
    kind = int(rng.choice(3, p=np.asarray(style.background_mix)))
    base = _plain_colour(rng)
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == 1:
        other = _plain_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return base * (1 - t[..., None]) + other * t[..., None]
    sources = _texture_sources()
    src = sources[int(rng.integers(len(sources)))]
    side = int(rng.uniform(0.25, 0.7) * min(src.shape[:2]))
    y0, x0 = int(rng.integers(src.shape[0] - side + 1)), int(rng.integers(src.shape[1] - side + 1))
    crop = src[y0:y0 + side, x0:x0 + side]
    if crop.ndim == 2:  # grey texture: tint it with a colour of the light
        crop = crop[..., None] * _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.4), 1.0)
    crop = crop[..., :3]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    resized = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., c])).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)  # mode F per channel: no 8-bit loss
    w = rng.uniform(*style.texture_strength)
    return (w * resized + (1 - w) * base).astype(np.float32)


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, style: DomainStyle) -> np.ndarray:
    """Lines, dots and scribbles of random colours, drawn under the shapes (they are background)."""
    n = int(rng.integers(style.clutter[0], style.clutter[1] + 1))
    if n == 0:
        return img
    size = img.shape[0]
    scale = size / _REFERENCE_SIZE
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(n):
        colour = tuple(int(v * 255) for v in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.8), rng.uniform(0.15, 1)))
        kind = int(rng.integers(3))
        if kind == 0:  # a long thin line
            pts = rng.uniform(0, size, (2, 2))
            draw.line([tuple(p) for p in pts], fill=colour, width=max(1, round(rng.uniform(1, 2.5) * scale)))
        elif kind == 1:  # a dot, smaller than any object
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(1, 3) * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:  # a scribble
            start = rng.uniform(0, size, 2)
            pts = start + np.cumsum(rng.uniform(-8, 8, (int(rng.integers(3, 6)), 2)) * scale, axis=0)
            draw.line([tuple(p) for p in pts], fill=colour, width=max(1, round(scale)))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _coverage(shape: PlacedShape, size: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage ``[h, w]`` in 0..1 of a shape over its bounding crop, and the crop's ``x0, y0``.

    The polygon is rasterised by pycocotools at 4x (pixel ``j`` covers ``[j, j+1)`` at any scale, so scaling the
    vertices is exact) and box-averaged. Two rasterisations of one polygon still disagree on a few edge pixels
    (pycocotools snaps to a 1/5-pixel grid), so coverage is then clamped to the 1x mask: ``>= 0.5`` exactly on
    mask pixels. "The shape's colour dominates this pixel" and "this pixel is in the mask" are then the same.
    """
    s = _SUPERSAMPLE
    x0, y0 = (max(int(math.floor(v)) - 1, 0) for v in shape.polygon.min(axis=0))
    x1, y1 = (min(int(math.ceil(v)) + 1, size) for v in shape.polygon.max(axis=0))
    w, h = x1 - x0, y1 - y0
    local = ((shape.polygon - [x0, y0]) * s).ravel().tolist()
    fine = mask_utils.decode(mask_utils.frPyObjects([local], h * s, w * s)[0])  # [h*s, w*s]
    cov = fine.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)  # [h, w]
    inside = shape.mask(size)[y0:y1, x0:x1].astype(bool)
    return np.where(inside, np.maximum(cov, 0.5), np.minimum(cov, 0.49)), x0, y0


def _shape_colour(rng: np.random.Generator, style: DomainStyle, shape: PlacedShape, under: np.ndarray) -> np.ndarray:
    """The fill colour: the class's colour family (or, sometimes, any hue), kept distinct from the background."""
    if rng.random() < style.off_palette_rate:
        hue = rng.uniform(0, 360)
    else:
        hue = CLASS_HUES[shape.resembles] + rng.uniform(-style.hue_jitter, style.hue_jitter)
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
    colour = _hsv(hue, sat, val)
    if float(np.sqrt(np.mean((colour - under) ** 2))) < style.min_contrast:
        val = rng.uniform(0.9, 1.0) if float(under.mean()) < 0.5 else rng.uniform(0.2, 0.4)
        colour = _hsv(hue, sat, val)
    return colour


def render_image(layout: ImageLayout, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Draw a layout: background, clutter, shapes (anti-aliased, shaded), then light, blur and noise.

    Args:
        layout: What to draw.
        style: The domain style (backgrounds, lighting, clutter, colours).
        rng: The image's render generator.

    Returns:
        ``[H, W, 3]`` uint8 RGB.

    Example:
        >>> layout = sample_layout(np.random.default_rng(0), GENERAL, 64)
        >>> render_image(layout, GENERAL, np.random.default_rng(1)).shape
        (64, 64, 3)
    """
    size = layout.size
    img = _draw_clutter(_background(rng, style, size), rng, style)  # [H, W, 3] float32
    for shape in layout.objects + layout.confusers:
        cov, x0, y0 = _coverage(shape, size)  # [h, w]
        h, w = cov.shape
        region = img[y0:y0 + h, x0:x0 + w]
        under = (region * cov[..., None]).sum(axis=(0, 1)) / max(float(cov.sum()), 1e-6)
        colour = _shape_colour(rng, style, shape, under)
        # Light from one side: a linear shading ramp across the shape makes it look less like a flat sticker.
        angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.3)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
        fill = colour * (1.0 + strength * ramp / max(h, w))[..., None]  # [h, w, 3]
        region[:] = cov[..., None] * fill + (1.0 - cov[..., None]) * region
    mean = img.mean()
    img = (img - mean) * rng.uniform(*style.contrast) + mean
    cast = 1.0 + rng.uniform(-style.colour_cast, style.colour_cast, 3)
    img = img * (rng.uniform(*style.brightness) * cast).astype(np.float32)
    sigma = rng.uniform(*style.blur) * size / _REFERENCE_SIZE
    if sigma >= 0.1:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))  # optics blur before sensor noise
    img = img + rng.normal(0.0, rng.uniform(*style.noise_std) / 255.0, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def _encode(pixels: np.ndarray, suffix: str) -> bytes:
    """PNG or JPEG bytes with fixed settings, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    if suffix.lower() == ".png":
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _file_names(split: str, index: int) -> tuple[str, str | None]:
    """``(image file, semantic file or None)`` relative to the split's image root."""
    if split == "pool":
        folder, ext = POOL_FOLDERS[index % len(POOL_FOLDERS)]
        return f"{folder}/{index:05d}{ext}", None
    if split == "test":
        return f"images/{index:05d}.png", f"semantic/{index:05d}.png"
    return f"{split}/{index:05d}.png", f"semantic/{split}/{index:05d}.png"


def _split_root(layout: PreparedLayout, split: str) -> Path:
    return {"train": layout.general_images, "val": layout.general_images, "pool": layout.pool_images,
            "test": layout.test_images}[split]


@dataclass
class _IdCounter:
    image: int = 0
    annotation: int = 0


def _add_image(coco: dict[str, Any], split: str, index: int, layout: ImageLayout, ids: _IdCounter) -> tuple[
        str, str | None, np.ndarray | None]:
    """Append an image and its annotations to ``coco``; return its file names and semantic mask (if any)."""
    file_name, semantic_name = _file_names(split, index)
    ids.image += 1
    entry: dict[str, Any] = {"id": ids.image, "file_name": file_name, "width": layout.size, "height": layout.size}
    semantic = np.zeros((layout.size, layout.size), dtype=np.uint8) if semantic_name else None
    if semantic_name:
        entry["semantic_file"] = semantic_name
    if split in ("pool", "test") or layout.confusers:  # general images only have them with general_confuser_rate
        entry["confusers"] = [c.coco_bbox(layout.size) for c in layout.confusers]
    coco["images"].append(entry)
    for obj in layout.objects:
        rle = obj.rle(layout.size)
        mask = mask_utils.decode(rle)
        if semantic is not None:
            semantic[mask.astype(bool)] = obj.category_id  # masks are disjoint (MIN_GAP): order does not matter
        ids.annotation += 1
        coco["annotations"].append({
            "id": ids.annotation, "image_id": ids.image, "category_id": obj.category_id,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)), "iscrowd": 0,
            "segmentation": [obj.polygon.ravel().tolist()],
        })
    return file_name, semantic_name, semantic


def _summary(cocos: dict[str, dict[str, Any]], params: DemoParams) -> dict[str, Any]:
    splits = {}
    for split, coco in cocos.items():
        counts = count_coco(coco)
        total = max(counts["instances"], 1)
        confusers = [box for img in coco["images"] for box in img.get("confusers", [])]
        splits[split] = {**counts, "share": {k: round(v / total, 4) for k, v in counts["per_class"].items()},
                         "confusers": len(confusers)}
    pool_folders = Counter(img["file_name"].rsplit("/", 1)[0] for img in cocos["pool"]["images"])
    return {"seed": params.seed, "image_size": params.image_size, "categories": list(CLASS_NAMES),
            "splits": splits, "pool_folders": dict(sorted(pool_folders.items())),
            "styles": {"general": asdict(split_style("train", params.general_confuser_rate)),
                       "scenario": asdict(SCENARIO)}}


def _preview(tiles: dict[str, list[tuple[np.ndarray, ImageLayout]]], tile: int = 160) -> bytes:
    """Two 4x4 grids (general train | scenario test): objects boxed in green with their name's first two letters,
    confusers in red marked ``x``."""
    grid, gap = 4 * tile, 16
    sheet = Image.new("RGB", (2 * grid + gap, grid), (255, 255, 255))
    for g, split in enumerate(("train", "test")):
        for k, (pixels, layout) in enumerate(tiles.get(split, [])[:16]):
            img = Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST)
            draw, f = ImageDraw.Draw(img), tile / layout.size
            for shape, colour in [(o, (0, 255, 0)) for o in layout.objects] + [(c, (255, 0, 0))
                                                                               for c in layout.confusers]:
                x1, y1, x2, y2 = (v * f for v in shape.xyxy)
                draw.rectangle([x1, y1, x2, y2], outline=colour)
                draw.text((x1 + 1, y1), shape.kind[:2] if shape.category_id else "x", fill=colour)
            sheet.paste(img, (g * (grid + gap) + (k % 4) * tile, (k // 4) * tile))
    return _encode(np.asarray(sheet), ".png")


def generate_demo(out_root: str | Path, params: DemoParams, *, progress: bool = True) -> dict[str, Any]:
    """Write the demo dataset in the :class:`~dataengine.data.layout.PreparedLayout` under ``out_root``.

    Also writes ``demo_summary.json`` (counts per split and class, instance shares, seed, styles) and
    ``preview.png`` (general train vs scenario test, boxes drawn). Files already under ``out_root`` with the same
    names are overwritten; nothing else there is touched. The same params give byte-identical files.

    Args:
        out_root: Root of the prepared layout.
        params: Seed, image size and image counts per split.
        progress: Show a tqdm progress bar.

    Returns:
        The summary written to ``demo_summary.json``.

    Raises:
        ValueError: ``params.seed`` is negative.

    Example:
        >>> s = generate_demo("/tmp/demo", DemoParams(n_train=8, n_val=4, n_pool=8, n_test=4))  # doctest: +SKIP
        >>> s["splits"]["pool"]["images"]  # doctest: +SKIP
        8
    """
    layout_root = PreparedLayout(out_root)
    cats = CategoryMap.from_names(CLASS_NAMES)
    ids = _IdCounter()
    cocos: dict[str, dict[str, Any]] = {}
    tiles: dict[str, list[tuple[np.ndarray, ImageLayout]]] = {"train": [], "test": []}
    total = sum(getattr(params, f"n_{s}") for s in SPLITS)
    with tqdm(total=total, desc="demo images", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            style, root = split_style(split, params.general_confuser_rate), _split_root(layout_root, split)
            coco = empty_coco(cats)
            coco["info"] = {"description": f"dataengine synthetic demo, split {split}", "seed": params.seed,
                            "image_size": params.image_size}
            n = getattr(params, f"n_{split}")
            empty = _empty_indices(params.seed, split, n)
            for index in range(n):
                layout, render_rng = _layout(params, split, index, empty)
                pixels = render_image(layout, style, render_rng)
                file_name, semantic_name, semantic = _add_image(coco, split, index, layout, ids)
                for name, array in ((file_name, pixels), (semantic_name, semantic)):
                    if name is not None:
                        # Plain writes: the prepare stage builds in <out>.partial and renames it when complete.
                        (root / name).parent.mkdir(parents=True, exist_ok=True)
                        (root / name).write_bytes(_encode(array, Path(name).suffix))
                if split in tiles and len(tiles[split]) < 16:
                    tiles[split].append((pixels, layout))
                bar.update()
            cocos[split] = coco
    save_coco(layout_root.general_train, cocos["train"])
    save_coco(layout_root.general_val, cocos["val"])
    save_coco(layout_root.pool_hidden, cocos["pool"])
    save_coco(layout_root.test_json, cocos["test"])
    summary = _summary(cocos, params)
    atomic_write_json(layout_root.root / "demo_summary.json", summary)
    atomic_write_bytes(layout_root.root / "preview.png", _preview(tiles))
    return summary


def demo_cli(argv: list[str] | None = None) -> int:
    """``dataengine demo OUT [--seed N] [--image-size PX] [--n-train N] [--n-val N] [--n-pool N] [--n-test N]
    [--general-confuser-rate R]``.

    Returns:
        0 on success, 2 for usage errors (an out-of-range value names the option and the allowed range).

    Example:
        >>> demo_cli(["/tmp/demo", "--seed", "1", "--n-train", "8"])  # doctest: +SKIP
        0
    """
    defaults = DemoParams()
    parser = argparse.ArgumentParser(prog="dataengine demo", description="Generate the synthetic demo dataset.")
    parser.add_argument("out", type=Path, help="output root (the prepared-data layout is written under it)")
    for name in ("seed", "image_size", "n_train", "n_val", "n_pool", "n_test"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(defaults, name))
    parser.add_argument("--general-confuser-rate", type=float, default=defaults.general_confuser_rate,
                        help="mean confusers (look-alikes, unlabelled) per general train/val image; 0: scenario-only")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    values = {k: v for k, v in vars(args).items() if k != "out"}
    try:
        params = from_dict(DemoParams, values, file="command line")
        if params.seed < 0:
            raise ParamsError(f"command line: key 'seed': expected an int >= 0, got {params.seed}")
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = generate_demo(args.out, params, progress=sys.stderr.isatty())
    counts = ", ".join(f"{s} {summary['splits'][s]['images']}" for s in SPLITS)
    print(f"wrote {args.out}: {counts} images (preview: {args.out / 'preview.png'})")
    return 0
