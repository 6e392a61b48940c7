"""Hard-negative mining at image level and pixel level: where the teacher is confidently wrong (seed 004).

A student distilled from a teacher inherits its false alarms unless it is told where they are. The ``mine`` stage
finds them with two rules, both against the labels a student trains on (general ground truth, the curated
scenario set), and writes them as per-image maps that the student's losses weight up
(:mod:`dataengine.distill`, ``mine.negative_weight`` / ``mine.pixel_weight``; SSD's hard negative mining at 3:1
(Liu et al. 2016, §2.2) is the same idea at the scale of anchors).

**Image level: regions.** In an image, a teacher box is a *hard-negative region* when

- it is confident, ``score >= mine.score_threshold``, and
- no label box of the image overlaps it by ``IoU >= mine.match_iou``, whatever the classes (a confident box on a real
  object of another class is a classification error, not a negative: the region would tell the student "nothing
  here" where there is an object);

the image then gets the reason ``teacher_fp`` (the scenario's confusers and textured backgrounds, found by nobody
but the teacher). On the **scenario** set, whose curated labels are incomplete by design (the filter accepts a third
to a half of the objects), the confident box must also be one **a person said is wrong** (a ``reject``, or a
``correct`` that moved it or changed its class: :func:`~dataengine.review.curate.teacher_verdicts`): a box that only
the filter rejected is unknown, not negative. Measured on the demo (``metrics/mine.json``, ``hidden_label_check``):
of the confident boxes the filter alone rejected, more than half sit on real objects -- 163 of 289 regions on an
object of the box's class with the 2026-11-25 defaults, 45 of 74 with the previous ones (Intel host), because the
calibrator fitted on general val prices many of the pool's squares at 0.01-0.20. ``mine.unreviewed_rejects: true``
restores the filter-only rule (the ``reviewed`` profile's measurement used it). On general train the labels are
complete ground truth, and any confident unmatched box counts. An image a reviewer flagged ``negative`` in the
decisions file (a person verified: no object) gets the reason ``reviewer_negative`` whether or not the teacher was
confident there, and *every* teacher box of it is a region (there is nothing to match: any firing is false). Regions
are kept highest score first (ties by class, then box), at most ``mine.max_regions_per_image`` per image: beyond
ten, the boxes are mostly fragments of the same confusers. Scores are compared as stored (5 decimals), the same for
both sources.

**Pixel level: hard pixels.** A pixel is a hard negative when the teacher says foreground,
``1 - p(background) >= mine.pixel_confidence``, and the label says background (0; 255 = ignored is never counted,
nor is any labelled class). Its class (``hard_pixels_by_class``) is the teacher's argmax over the foreground classes.

**Where the teacher's outputs come from.**

- ``general`` (general train ground truth): the teacher is run here, one letterboxed view per image (batched,
  ``torch.inference_mode``), boxes and probabilities mapped back to original pixels as in
  :mod:`dataengine.inference`.
- ``scenario`` (the curated set of the ``review`` stage): the ``pseudo_label`` stage's TTA output is reused (its
  boxes are in original pixels), which keeps the stage fast and mines exactly the outputs the curated set was
  derived from. Its segmentation is stored as the argmax ``label`` and the top probability ``c`` (PNG, ``/255``),
  not the full softmax, so ``1 - p(background)`` is exact where the argmax is background (``1 - c``) and only
  bounded below elsewhere: ``>= max(c, 1 - c)`` (``c`` is one foreground class's probability, and ``p(background)
  <= c``). A pixel is hard when the exact value or the lower bound reaches the threshold; pixels whose bound stays
  below it are *undecided* and not marked (counted as ``undecided_pixels``: never a silent skip). Note that the
  curated mask keeps a background pixel only where the teacher said background with ``c >= filter.seg_confidence``,
  so on the scenario set hard pixels appear where a person overrode the teacher (``negative`` images are all
  background), by construction.

**Outputs** (:func:`write_mined`)::

    <out>/hard_negatives.json            {"version": 1, "params": {...}, "images": [entry, ...]}
    <out>/maps/<source>/<file_name>.png  uint8, original image size: bit 1 in a region, bit 2 on a hard pixel

An entry is ``{"source", "file_name", "image_id", "reasons", "regions": [{"bbox": [x1, y1, x2, y2] original
pixels, "class_name", "score"}], "hard_pixels", "map": "maps/<source>/<file_name>.png" | null}``, for every image
with a reason or a hard pixel (``reasons`` is empty for an image with hard pixels only), sorted by source then file
name. A map is written only for an image that has a region or a hard pixel. Region pixels cover every pixel a box
touches (``floor`` / ``ceil``, as the curated masks treat boxes). Re-running on the same inputs writes the same
bytes. :func:`hard_maps_for` turns the entries of one source into ``{image id: map path}`` for
:class:`~dataengine.data.dataset.CocoDetectionSegDataset`.

Example:
    >>> from dataengine.config import MineParams
    >>> boxes = [{"bbox": [0, 0, 10, 10], "class_name": "a", "score": 0.9},
    ...          {"bbox": [20, 20, 30, 30], "class_name": "a", "score": 0.8}]
    >>> regions, fired, dropped = select_regions(boxes, [[21, 21, 30, 30]], score_threshold=0.5, match_iou=0.3,
    ...                                          max_regions=10)
    >>> [r["bbox"] for r in regions], fired, dropped
    ([[0.0, 0.0, 10.0, 10.0]], True, 0)
"""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from dataengine.boxes import clip_xyxy, coco_to_xyxy
from dataengine.config import MineParams
from dataengine.data.coco import CategoryMap, annotations_by_image, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate, read_semantic_file
from dataengine.data.layout import PreparedLayout
from dataengine.data.transforms import Letterbox, letterbox_params, unletterbox_boxes, unletterbox_mask
from dataengine.io import atomic_write_bytes, atomic_write_json, read_json, safe_join
from dataengine.models.multitask import HARD_PIXEL_BIT, HARD_REGION_BIT
from dataengine.pseudo.filter import box_ids
from dataengine.review.curate import teacher_verdicts

__all__ = [
    "MAPS_DIR",
    "MINED_FILE",
    "MINED_VERSION",
    "REASONS",
    "ImageEvidence",
    "MinedImage",
    "MiningResult",
    "general_evidence",
    "hard_map",
    "hard_maps_for",
    "hard_pixel_mask",
    "map_path",
    "mine_hard_negatives",
    "mine_image",
    "mined_document",
    "mining_metrics",
    "mining_summary_lines",
    "region_image_ids",
    "regions_against_hidden",
    "scenario_evidence",
    "select_regions",
    "stored_foreground",
    "write_mined",
]

MINED_VERSION = 1
MINED_FILE = "hard_negatives.json"
MAPS_DIR = "maps"
REASONS = ("teacher_fp", "reviewer_negative")
"""Image-level reasons, in the order an entry lists them."""
UNKNOWN_CLASS = "unknown"
"""Class of a hard pixel whose stored argmax is background (the foreground argmax was not stored)."""
SCORE_DECIMALS = 5  # as predictions.json stores scores; the threshold is applied to the stored value
BOX_DECIMALS = 2


# --------------------------------------------------------------------------------------------------------------
# The rules (pure)
# --------------------------------------------------------------------------------------------------------------


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of xyxy boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]`` (0 where a union is empty)."""
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)  # [N]
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)  # [M]
    w = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    h = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0)
    inter = w * h  # [N, M]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _region(box: Mapping[str, Any]) -> dict[str, Any]:
    return {"bbox": [round(float(v), BOX_DECIMALS) for v in box["bbox"]], "class_name": str(box["class_name"]),
            "score": round(float(box["score"]), SCORE_DECIMALS)}


def select_regions(
    teacher_boxes: Sequence[Mapping[str, Any]],
    label_boxes: Sequence[Sequence[float]] | np.ndarray,
    *,
    score_threshold: float,
    match_iou: float,
    max_regions: int,
    negative: bool = False,
) -> tuple[list[dict[str, Any]], bool, int]:
    """The hard-negative regions of one image (see the module docstring for the rule and why).

    Args:
        teacher_boxes: ``{"bbox": [x1, y1, x2, y2], "class_name", "score"}`` in original pixels (not modified).
        label_boxes: The image's label boxes, xyxy ``[M, 4]`` (any class; ``M`` may be 0).
        score_threshold: A teacher box is confident at ``score >= score_threshold``.
        match_iou: A confident box overlapping a label box at ``IoU >= match_iou`` is matched (not a negative).
        max_regions: At most this many regions, highest score first.
        negative: The image is a verified negative: every teacher box is a region.

    Returns:
        ``(regions, fired, dropped)``: the regions (``bbox`` rounded to 0.01 px, ``score`` to 1e-5), whether a
        confident box was unmatched (reason ``teacher_fp``), and how many regions the cap dropped.

    Example:
        >>> b = [{"bbox": [0, 0, 4, 4], "class_name": "a", "score": 0.2}]
        >>> select_regions(b, [], score_threshold=0.5, match_iou=0.3, max_regions=5, negative=True)[:2]
        ([{'bbox': [0.0, 0.0, 4.0, 4.0], 'class_name': 'a', 'score': 0.2}], False)
    """
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    boxes = [_region(b) for b in teacher_boxes]
    confident = [b for b in boxes if b["score"] >= score_threshold]
    labels = np.asarray(label_boxes, dtype=np.float64).reshape(-1, 4)
    if confident and len(labels):
        best = _iou(np.asarray([b["bbox"] for b in confident], dtype=np.float64), labels).max(1)  # [C]
        unmatched = [b for b, iou in zip(confident, best) if iou < match_iou]
    else:
        unmatched = confident
    chosen = boxes if negative else unmatched
    chosen = sorted(chosen, key=lambda r: (-r["score"], r["class_name"], r["bbox"]))
    return chosen[:max_regions], bool(unmatched), max(0, len(chosen) - max_regions)


EDGE_BAND = 2
"""Pixels within this many pixels of a labelled object are never hard: the teacher's 1/4-resolution segmentation,
upsampled, bleeds over object edges (on the demo 96 % of the "hard" pixels of general train were within 2 px of an
object), and weighting those up would teach the student thinner objects, not fewer false alarms."""


def hard_pixel_mask(foreground: np.ndarray, label: np.ndarray, pixel_confidence: float,
                    edge_band: int = EDGE_BAND) -> np.ndarray:
    """Hard negative pixels: teacher foreground probability ``>= pixel_confidence`` where the label is 0, farther
    than ``edge_band`` pixels from any labelled object (see :data:`EDGE_BAND`).

    Args:
        foreground: ``[H, W]`` teacher ``1 - p(background)`` (or a lower bound of it).
        label: ``[H, W]`` label (0 background, classes, 255 ignored: never hard).
        pixel_confidence: The threshold.

    Returns:
        Bool ``[H, W]``.

    Example:
        >>> hard_pixel_mask(np.array([[0.9, 0.9, 0.9, 0.5]]), np.array([[0, 1, 255, 0]]), 0.8, edge_band=0).tolist()
        [[True, False, False, False]]
        >>> hard_pixel_mask(np.full((1, 5), 0.9), np.array([[1, 0, 0, 0, 0]]), 0.8).tolist()  # 2 px band
        [[False, False, False, True, True]]
    """
    if foreground.shape != label.shape:
        raise ValueError(f"foreground map {foreground.shape} and label {label.shape} differ in size")
    hard = (foreground >= pixel_confidence) & (label == 0)
    objects = (label != 0) & (label != 255)
    if edge_band > 0 and objects.any() and hard.any():
        from scipy.ndimage import binary_dilation

        hard &= ~binary_dilation(objects, structure=np.ones((3, 3), bool), iterations=edge_band)
    return hard


def stored_foreground(label: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``1 - p(background)`` from the stored argmax and top-probability PNGs of the ``pseudo_label`` stage.

    Args:
        label: uint8 ``[H, W]``: argmax (0 background, label + 1).
        confidence: uint8 ``[H, W]``: ``round(255 * max probability)``.

    Returns:
        ``(foreground, exact)``: float32 ``[H, W]``, exact where the argmax is background (``1 - c``) and a lower
        bound ``max(c, 1 - c)`` elsewhere; bool ``[H, W]``, where it is exact.

    Example:
        >>> fg, exact = stored_foreground(np.array([[0, 2]], np.uint8), np.array([[204, 153]], np.uint8))
        >>> [round(float(v), 2) for v in fg[0]], exact.tolist()
        ([0.2, 0.6], [[True, False]])
    """
    c = confidence.astype(np.float32) / 255.0
    exact = label == 0
    return np.where(exact, 1.0 - c, np.maximum(c, 1.0 - c)).astype(np.float32), exact


def hard_map(regions: Sequence[Mapping[str, Any]], hard: np.ndarray) -> np.ndarray:
    """The per-image map: bit :data:`HARD_REGION_BIT` on every pixel a region touches, :data:`HARD_PIXEL_BIT` on
    hard pixels.

    Args:
        regions: Regions with ``bbox`` xyxy in original pixels.
        hard: Bool ``[H, W]`` hard pixels (the image's size).

    Returns:
        uint8 ``[H, W]`` in 0..3.

    Example:
        >>> hard_map([{"bbox": [0.5, 0, 2, 1]}], np.array([[False, True, True]])).tolist()
        [[1, 3, 2]]
    """
    h, w = hard.shape
    bits = np.where(hard, HARD_PIXEL_BIT, 0).astype(np.uint8)
    for region in regions:
        x1, y1, x2, y2 = (float(v) for v in region["bbox"])
        xs = slice(max(0, math.floor(x1)), max(0, min(w, math.ceil(x2))))
        ys = slice(max(0, math.floor(y1)), max(0, min(h, math.ceil(y2))))
        bits[ys, xs] |= HARD_REGION_BIT
    return bits


def map_path(source: str, file_name: str) -> str:
    """Where an image's map goes, relative to the output folder (``a/b.jpg`` -> ``maps/<source>/a/b.jpg.png``)."""
    return f"{MAPS_DIR}/{source}/{file_name}.png"


@dataclass
class ImageEvidence:
    """What the rules look at for one image (original pixels throughout).

    ``foreground`` / ``pixel_class`` / ``label`` are ``None`` where that image has no segmentation or no mask (the
    pixel rule is then not applied, and the image counted in ``images_without_segmentation``).
    """

    source: str
    file_name: str
    image_id: int
    height: int
    width: int
    teacher_boxes: list[dict[str, Any]]  # {"bbox", "class_name", "score"}
    label_boxes: np.ndarray  # [M, 4] xyxy
    negative: bool = False
    foreground: np.ndarray | None = None  # [H, W] float: 1 - p(background), or its lower bound
    exact: np.ndarray | None = None  # [H, W] bool: where foreground is exact (None: everywhere)
    pixel_class: np.ndarray | None = None  # [H, W] int: the teacher's foreground class, label + 1 (0 unknown)
    label: np.ndarray | None = None  # [H, W] uint8: 0 background, classes, 255 ignored


@dataclass
class MinedImage:
    """One image's result; ``png`` holds its encoded map (``None``: nothing to map)."""

    source: str
    file_name: str
    image_id: int
    reasons: list[str]
    regions: list[dict[str, Any]]
    dropped_regions: int = 0
    hard_pixels: int = 0
    background_pixels: int = 0
    undecided_pixels: int = 0
    pixel_classes: dict[str, int] = field(default_factory=dict)
    has_segmentation: bool = False
    png: bytes | None = None

    @property
    def listed(self) -> bool:
        """Whether the image is an entry of ``hard_negatives.json`` (a reason or a hard pixel)."""
        return bool(self.reasons) or self.hard_pixels > 0

    def entry(self) -> dict[str, Any]:
        return {"source": self.source, "file_name": self.file_name, "image_id": self.image_id,
                "reasons": list(self.reasons), "regions": list(self.regions), "hard_pixels": self.hard_pixels,
                "map": map_path(self.source, self.file_name) if self.png is not None else None}


def _encode_png(bits: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(bits).save(buf, format="PNG")  # PIL's encoder is deterministic: same bits, same bytes
    return buf.getvalue()


def mine_image(evidence: ImageEvidence, params: MineParams, class_names: Sequence[str]) -> MinedImage:
    """Apply both rules to one image.

    Args:
        evidence: The image's teacher outputs and labels.
        params: ``score_threshold``, ``match_iou``, ``max_regions_per_image``, ``pixel_confidence``.
        class_names: Class of ``pixel_class`` value ``i`` is ``class_names[i - 1]``.
    """
    regions, fired, dropped = select_regions(evidence.teacher_boxes, evidence.label_boxes,
                                             score_threshold=params.score_threshold, match_iou=params.match_iou,
                                             max_regions=params.max_regions_per_image, negative=evidence.negative)
    reasons = [r for r, on in zip(REASONS, (fired, evidence.negative)) if on]
    out = MinedImage(evidence.source, evidence.file_name, evidence.image_id, reasons, regions, dropped)
    hard = np.zeros((evidence.height, evidence.width), dtype=bool)
    if evidence.foreground is not None and evidence.label is not None:
        for name, arr in (("foreground", evidence.foreground), ("label", evidence.label)):
            if arr.shape != hard.shape:
                raise ValueError(f"{evidence.source} image {evidence.file_name!r}: {name} map is {arr.shape}, the "
                                 f"image is {hard.shape}")
        out.has_segmentation = True
        background = evidence.label == 0
        out.background_pixels = int(background.sum())
        hard = hard_pixel_mask(evidence.foreground, evidence.label, params.pixel_confidence)
        if evidence.exact is not None:
            out.undecided_pixels = int((background & ~evidence.exact & ~hard).sum())
        out.hard_pixels = int(hard.sum())
        if out.hard_pixels:
            ids, counts = np.unique(evidence.pixel_class[hard] if evidence.pixel_class is not None
                                    else np.zeros(out.hard_pixels, np.int64), return_counts=True)
            out.pixel_classes = {(class_names[i - 1] if 0 < i <= len(class_names) else UNKNOWN_CLASS): int(n)
                                 for i, n in zip(ids.tolist(), counts.tolist())}
    if regions or out.hard_pixels:
        out.png = _encode_png(hard_map(regions, hard))
    return out


# --------------------------------------------------------------------------------------------------------------
# Evidence: scenario (stored teacher outputs) and general (a teacher run)
# --------------------------------------------------------------------------------------------------------------


def _read_gray(path: Path, height: int, width: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: unreadable {what} ({err})") from None
    if arr.shape != (height, width):
        raise ValueError(f"{path}: {what} is {'x'.join(map(str, arr.shape))}, its image is {height}x{width}")
    return arr


def _negatives(decisions: Mapping[str, Any]) -> set[str]:
    return {name for name, e in decisions.get("images", {}).items() if "negative" in e.get("flags", [])}


def scenario_evidence(
    curated_path: str | Path,
    predictions_path: str | Path,
    decisions: Mapping[str, Any],
    *,
    review_queue: Sequence[Mapping[str, Any]] = (),
    unreviewed_rejects: bool = False,
    skipped: Counter[str] | None = None,
) -> tuple[list[str], Iterator[ImageEvidence]]:
    """Evidence for every image of the curated scenario set, from the ``pseudo_label`` stage's stored output.

    The "label boxes" a teacher box is matched against are the curated boxes **and the review-queue boxes no reviewer
    has decided yet**: an undecided box is unknown, not negative. (Without this, on the demo 238 of 307 regions sat
    on real objects -- mostly squares in the review band -- and the student was taught to miss them.) The teacher
    boxes that may become regions are those a person said are wrong (module docstring); with ``unreviewed_rejects``
    also those only the calibrated filter rejected. On an image flagged ``negative`` every teacher box may.

    Args:
        curated_path: The curated COCO (``review`` stage; ``semantic_root`` + per-image ``semantic_file``).
        predictions_path: The pool's ``predictions.json`` (boxes in original pixels, ``seg`` PNG paths relative
            to its folder).
        decisions: The validated decisions document (:func:`dataengine.review.decisions.load_decisions`).
        review_queue: The ``filter`` stage's ``review_queue.json`` records (``id``, ``file_name``, ``bbox`` xyxy).
        unreviewed_rejects: Also offer the boxes no person decided on (``mine.unreviewed_rejects``).
        skipped: Counter to add ``negative_not_curated`` to (a ``negative`` image not in the curated set, i.e.
            also flagged ``relabel``).

    Returns:
        ``(class_names, evidence iterator)``.

    Raises:
        FileNotFoundError: A file is missing (named).
        ValueError: A file is malformed, the classes differ, or a curated image has no teacher output (named).
    """
    curated_path, predictions_path = Path(curated_path), Path(predictions_path)
    curated = load_coco(curated_path)
    if not predictions_path.is_file():
        raise FileNotFoundError(f"teacher predictions not found: {predictions_path}")
    preds = read_json(predictions_path)
    for key in ("images", "boxes", "class_names"):
        if not isinstance(preds, dict) or not isinstance(preds.get(key), list):
            raise ValueError(f"{predictions_path}: key {key!r} must be a list (a pseudo_label stage output)")
    cats = CategoryMap.from_coco(curated)
    class_names = [str(n) for n in preds["class_names"]]
    if list(cats.names) != class_names:
        raise ValueError(f"{curated_path}: classes {list(cats.names)} differ from the teacher's {class_names} in "
                         f"{predictions_path}")
    pred_images = {img["file_name"]: img for img in preds["images"]}
    boxes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    records: dict[str, dict[str, Any]] = {}  # by the filter's label id, as the review stage reads decisions
    for i, (lid, box) in enumerate(zip(box_ids(preds["boxes"]), preds["boxes"])):
        try:
            record = {"file_name": box["file_name"], "bbox": [float(v) for v in box["bbox"]],
                      "class_name": class_names[int(box["label"])], "score": box["score"], "id": lid}
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"{predictions_path}: boxes[{i}] is not a box record (file_name, bbox, label, score) "
                             f"of a known class: {box!r}") from None
        boxes[record["file_name"]].append(record)
        records[lid] = record
    judged_wrong = {lid for lid, right in teacher_verdicts(decisions, records).items() if not right}
    negatives = _negatives(decisions)
    names = {img["file_name"] for img in curated["images"]}
    if skipped is not None:
        skipped["negative_not_curated"] += len(negatives - names)
    anns = annotations_by_image(curated)
    decided = set(decisions.get("labels", {}))
    pending: dict[str, list[list[float]]] = defaultdict(list)
    for record in review_queue:
        if record["id"] not in decided:
            pending[record["file_name"]].append([float(v) for v in record["bbox"]])
    semantic_root = safe_join(curated_path.parent, curated["semantic_root"]) if curated.get("semantic_root") else None
    lut = cats.semantic_lut()
    pred_root = predictions_path.parent

    def generate() -> Iterator[ImageEvidence]:
        for img in sorted(curated["images"], key=lambda i: i["file_name"]):
            name, h, w = img["file_name"], int(img["height"]), int(img["width"])
            pred = pred_images.get(name)
            if pred is None:
                raise ValueError(f"{curated_path}: image {name!r} has no teacher output in {predictions_path}")
            if (int(pred["height"]), int(pred["width"])) != (h, w):
                raise ValueError(f"{curated_path}: image {name!r} is {h}x{w}, {predictions_path} says "
                                 f"{pred['height']}x{pred['width']}")
            curated_boxes = coco_to_xyxy(np.asarray([a["bbox"] for a in anns[img["id"]]],
                                                    dtype=np.float64).reshape(-1, 4))
            label_boxes = np.concatenate([curated_boxes, np.asarray(pending.get(name, []),
                                                                    dtype=np.float64).reshape(-1, 4)])
            offered = boxes.get(name, [])
            if not unreviewed_rejects and name not in negatives:
                offered = [b for b in offered if b["id"] in judged_wrong]
            ev = ImageEvidence("scenario", name, int(img["id"]), h, w, offered, label_boxes,
                               negative=name in negatives)
            seg = pred.get("seg")
            if seg and img.get("semantic_file") and semantic_root is not None:
                label = _read_gray(safe_join(pred_root, seg["label"]), h, w, "teacher label PNG")
                conf = _read_gray(safe_join(pred_root, seg["confidence"]), h, w, "teacher confidence PNG")
                ev.foreground, ev.exact = stored_foreground(label, conf)
                ev.pixel_class = label.astype(np.int64)
                ev.label = read_semantic_file(safe_join(semantic_root, img["semantic_file"]), h, w, lut)
            yield ev

    return class_names, generate()


class _LetterboxImage:
    """Joint-transform stand-in: letterbox the image for the teacher, leave the target at the original size."""

    def __init__(self, size: int) -> None:
        self.transform = v2.Compose([Letterbox(size), v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.transform(image), target


@torch.inference_mode()
def general_evidence(
    model: nn.Module,
    coco: dict[str, Any] | str | Path,
    image_root: str | Path,
    *,
    input_size: int,
    batch_size: int,
    score_threshold: float,
    progress: bool = False,
) -> Iterator[ImageEvidence]:
    """Run the teacher over a labelled COCO set (one letterboxed view per image) and yield the evidence.

    Boxes and probabilities are mapped back to original pixels (:func:`unletterbox_boxes`, bilinear
    :func:`unletterbox_mask`); the label is the set's semantic target at the original size (``None`` for a set
    without masks). Only boxes that can reach ``score_threshold`` once rounded are kept.

    Args:
        model: The teacher (its labels are the COCO's contiguous labels); put in eval mode, restored after.
        coco: The labelled set (a dict, not modified, or its path: needed if it has a ``semantic_root``).
        image_root: Its image folder.
        input_size: The teacher's input side.
        batch_size: Images per forward pass.
        score_threshold: ``mine.score_threshold``.
        progress: Show a tqdm bar.
    """
    dataset = CocoDetectionSegDataset(coco, image_root, _LetterboxImage(input_size))
    coco, cats = dataset.coco, dataset.categories
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate)
    anns = annotations_by_image(coco)
    detection = getattr(model, "detection", True)
    segmentation = getattr(model, "segmentation", False)
    # postprocess keeps scores strictly above its threshold; the rule is >= on the score rounded to 5 decimals
    floor = max(0.0, score_threshold - 0.5 * 10 ** -SCORE_DECIMALS)
    was_training = model.training
    model.eval()
    index = 0
    try:
        for images, targets in tqdm(loader, desc="mine general", unit="batch", disable=not progress, leave=False):
            outputs = model(images)
            dets = model.postprocess(outputs, score_threshold=floor) if detection else [None] * len(targets)
            probs = model.semantic_probs(outputs, size=images.shape[-2:]) if segmentation else None  # [B, K+1, S, S]
            for b, (det, target) in enumerate(zip(dets, targets)):
                info = dataset.images[index]
                index += 1
                h, w = (int(v) for v in target["orig_size"])
                scale, pad_x, pad_y = letterbox_params(h, w, input_size)
                teacher_boxes = []
                if det is not None:
                    xyxy = clip_xyxy(unletterbox_boxes(det["boxes"].float(), scale, pad_x, pad_y), w, h)  # [M, 4]
                    teacher_boxes = [{"bbox": box, "class_name": cats.names[int(label)], "score": float(score)}
                                     for box, score, label in zip(xyxy.tolist(), det["scores"].tolist(),
                                                                  det["labels"].tolist())]
                ev = ImageEvidence("general", info["file_name"], int(info["id"]), h, w, teacher_boxes,
                                   coco_to_xyxy(np.asarray([a["bbox"] for a in anns[int(info["id"])]],
                                                           dtype=np.float64).reshape(-1, 4)))
                if probs is not None and target["has_semantic"]:
                    p = unletterbox_mask(probs[b], h, w, scale, pad_x, pad_y)  # [K+1, H, W]
                    ev.foreground = (1.0 - p[0]).numpy()
                    ev.pixel_class = (p[1:].argmax(0) + 1).numpy()
                    ev.label = target["semantic"].numpy().astype(np.uint8)
                yield ev
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MiningResult:
    """Every scanned image's result per source (also the images with nothing mined, for the metrics)."""

    params: MineParams
    images: dict[str, list[MinedImage]]  # source -> results, sorted by file name
    skipped: dict[str, int] = field(default_factory=dict)

    def listed(self) -> list[MinedImage]:
        """The entries of ``hard_negatives.json``: sorted by source, then file name."""
        return [m for source in sorted(self.images) for m in self.images[source] if m.listed]


def mine_hard_negatives(
    params: MineParams,
    *,
    data_root: str | Path,
    curated: str | Path,
    pseudo: str | Path,
    decisions: Mapping[str, Any],
    review_queue: Sequence[Mapping[str, Any]] = (),
    teacher: nn.Module | None = None,
    input_size: int | None = None,
    progress: bool = False,
) -> MiningResult:
    """Mine every source of ``params.sources``.

    Args:
        params: The ``mine`` params.
        data_root: The prepared-data root (:class:`~dataengine.data.layout.PreparedLayout`).
        curated: The curated scenario COCO (``review`` stage).
        pseudo: The ``pseudo_label`` stage's folder (``<pseudo>/pool/predictions.json``).
        decisions: The validated decisions document.
        review_queue: The ``filter`` stage's review queue (undecided boxes there are never negatives).
        teacher: The teacher, needed for the ``general`` source.
        input_size: The teacher's input side (default: ``teacher.input_size``).
        progress: Show a progress bar for the teacher run.

    Raises:
        ValueError: ``general`` is a source but no teacher was given; or a bad input (see the evidence functions).
    """
    layout = PreparedLayout(data_root)
    skipped: Counter[str] = Counter()
    results: dict[str, list[MinedImage]] = {}
    for source in params.sources:
        if source == "general":
            if teacher is None:
                raise ValueError("mine: source 'general' needs the teacher (pass teacher=)")
            names = list(CategoryMap.from_coco(load_coco(layout.general_train)).names)
            size = int(input_size if input_size is not None else teacher.input_size)
            evidence: Iterable[ImageEvidence] = general_evidence(
                teacher, layout.general_train, layout.general_images, input_size=size, batch_size=params.batch_size,
                score_threshold=params.score_threshold, progress=progress)
        elif source == "scenario":
            names, evidence = scenario_evidence(curated, Path(pseudo) / "pool" / "predictions.json", decisions,
                                                review_queue=review_queue,
                                                unreviewed_rejects=params.unreviewed_rejects, skipped=skipped)
        else:
            raise ValueError(f"mine: unknown source {source!r}; valid sources: general, scenario")
        mined = [mine_image(ev, params, names) for ev in evidence]
        results[source] = sorted(mined, key=lambda m: m.file_name)
    return MiningResult(params, results, dict(sorted(skipped.items())))


def _params_dict(params: MineParams) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def mined_document(result: MiningResult) -> dict[str, Any]:
    """The ``hard_negatives.json`` document (see the module docstring)."""
    return {"version": MINED_VERSION, "params": _params_dict(result.params),
            "images": [m.entry() for m in result.listed()]}


def write_mined(result: MiningResult, out_dir: str | Path) -> dict[str, Any]:
    """Write the maps and ``hard_negatives.json`` under ``out_dir`` (atomically; old maps removed first).

    Returns:
        The document written.
    """
    out = Path(out_dir)
    maps = out / MAPS_DIR
    if maps.exists():
        shutil.rmtree(maps)  # maps of images no longer mined must not linger
    for m in result.listed():
        if m.png is not None:
            # fsync off: hundreds of small files; the JSON that refers to them is written (and fsynced) last
            atomic_write_bytes(safe_join(out, map_path(m.source, m.file_name)), m.png, fsync=False)
    doc = mined_document(result)
    atomic_write_json(out / MINED_FILE, doc, indent=1)
    return doc


def _sorted_counts(counter: Mapping[str, int]) -> dict[str, int]:
    return {k: int(counter[k]) for k in sorted(counter)}


def _source_metrics(images: Sequence[MinedImage]) -> dict[str, Any]:
    by_reason = Counter(r for m in images for r in m.reasons)
    region_classes = Counter(r["class_name"] for m in images for r in m.regions)
    pixel_classes: Counter[str] = Counter()
    for m in images:
        pixel_classes.update(m.pixel_classes)
    hard = sum(m.hard_pixels for m in images)
    background = sum(m.background_pixels for m in images)
    return {
        "images_scanned": len(images),
        "hard_negative_images": sum(bool(m.reasons) for m in images),
        "by_reason": {r: int(by_reason[r]) for r in REASONS},
        "regions": sum(len(m.regions) for m in images),
        "regions_dropped": sum(m.dropped_regions for m in images),
        "regions_by_class": _sorted_counts(region_classes),
        "images_with_hard_pixels": sum(m.hard_pixels > 0 for m in images),
        "hard_pixels": hard,
        "background_pixels": background,
        "hard_pixel_share": round(hard / background, 6) if background else 0.0,
        "hard_pixels_by_class": _sorted_counts(pixel_classes),
        "undecided_pixels": sum(m.undecided_pixels for m in images),
        "images_without_segmentation": sum(not m.has_segmentation for m in images),
        "maps": sum(m.png is not None for m in images),
    }


def mining_metrics(result: MiningResult) -> dict[str, Any]:
    """``metrics/mine.json``: per source and in total (see :func:`_source_metrics` for the keys); deterministic."""
    per_source = {source: _source_metrics(images) for source, images in sorted(result.images.items())}
    total = _source_metrics([m for images in result.images.values() for m in images])
    return {"sources": per_source, "total": total, "skipped": dict(result.skipped),
            "listed_images": len(result.listed())}


# --------------------------------------------------------------------------------------------------------------
# DIAGNOSTIC ONLY: reads the pool's hidden labels (scenario/pool_hidden.json, demo and BCCD profile); no rule does
# --------------------------------------------------------------------------------------------------------------

HIDDEN_OBJECT_IOU = 0.5  # a region this close to a hidden object sits on that object
HIDDEN_CONFUSER_IOU = 0.3  # as confuser_false_positives counts a box on a look-alike


def regions_against_hidden(images: Sequence[MinedImage], hidden: Mapping[str, Any]) -> dict[str, int]:
    """Where the scenario's regions fall, by the pool's hidden labels: what a region tells the student ("nothing
    here") is wrong on a real object.

    A region is counted once, in the first of: ``on_object_of_its_class`` (IoU >= :data:`HIDDEN_OBJECT_IOU` with a
    hidden object of its class), ``on_object_of_another_class``, ``on_confuser`` (IoU >= :data:`HIDDEN_CONFUSER_IOU`
    with a look-alike of the image's ``confusers`` metadata), ``elsewhere`` (background, textures); ``not_in_hidden``
    for an image the hidden labels do not have.

    Args:
        images: The ``scenario`` results of :func:`mine_hard_negatives`.
        hidden: The pool's hidden labels (COCO; ``file_name`` as in the curated set; optional ``confusers``
            ``[[x, y, w, h], ...]`` per image).

    Returns:
        ``{"regions", "on_object_of_its_class", "on_object_of_another_class", "on_confuser", "elsewhere",
        "not_in_hidden"}``.

    Example:
        >>> hidden = {"images": [{"id": 1, "file_name": "a.png", "confusers": [[20, 0, 10, 10]]}],
        ...           "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}],
        ...           "categories": [{"id": 1, "name": "cat"}]}
        >>> mined = [MinedImage("scenario", "a.png", 1, ["teacher_fp"], [
        ...     {"bbox": [0, 0, 10, 10], "class_name": "cat"}, {"bbox": [20, 0, 30, 10], "class_name": "cat"}])]
        >>> check = regions_against_hidden(mined, hidden)
        >>> check["on_object_of_its_class"], check["on_confuser"]
        (1, 1)
    """
    names = {c["id"]: c["name"] for c in hidden["categories"]}
    by_name = {img["file_name"]: img for img in hidden["images"]}
    anns = annotations_by_image(hidden)
    counts = dict.fromkeys(("regions", "on_object_of_its_class", "on_object_of_another_class", "on_confuser",
                            "elsewhere", "not_in_hidden"), 0)
    for mined in images:
        if not mined.regions:
            continue
        counts["regions"] += len(mined.regions)
        img = by_name.get(mined.file_name)
        if img is None:
            counts["not_in_hidden"] += len(mined.regions)
            continue
        objects = anns[img["id"]]
        object_boxes = coco_to_xyxy(np.asarray([a["bbox"] for a in objects], np.float64).reshape(-1, 4))
        confusers = coco_to_xyxy(np.asarray(img.get("confusers", []), np.float64).reshape(-1, 4))
        regions = np.asarray([r["bbox"] for r in mined.regions], np.float64).reshape(-1, 4)
        on_object = _iou(regions, object_boxes) >= HIDDEN_OBJECT_IOU  # [R, O]
        on_confuser = (_iou(regions, confusers) >= HIDDEN_CONFUSER_IOU).any(1)  # [R]
        for r, region in enumerate(mined.regions):
            classes = {names[objects[o]["category_id"]] for o in np.flatnonzero(on_object[r])}
            key = ("on_object_of_its_class" if region["class_name"] in classes else
                   "on_object_of_another_class" if classes else "on_confuser" if on_confuser[r] else "elsewhere")
            counts[key] += 1
    return counts


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def mining_summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """Human-readable lines of :func:`mining_metrics`: counts, share of hard pixels, classes involved."""
    lines = []
    for source, m in [*metrics["sources"].items(), ("total", metrics["total"])]:
        reasons = ", ".join(f"{r} {m['by_reason'][r]}" for r in REASONS)
        lines.append(f"mine {source}: {m['images_scanned']} images scanned, {m['hard_negative_images']} hard-negative "
                     f"images ({reasons}), {m['regions']} regions ({m['regions_dropped']} over the per-image cap) "
                     f"by class: {_counts_text(m['regions_by_class'])}")
        lines.append(f"mine {source}: {m['hard_pixels']} hard pixels in {m['images_with_hard_pixels']} images = "
                     f"{100 * m['hard_pixel_share']:.3f}% of {m['background_pixels']} labelled background pixels, by "
                     f"class: {_counts_text(m['hard_pixels_by_class'])}; undecided {m['undecided_pixels']}, images "
                     f"without segmentation {m['images_without_segmentation']}; {m['maps']} maps")
    for what, n in metrics["skipped"].items():
        if n:
            lines.append(f"mine: skipped {n} x {what}")
    return lines


def _listed_entries(mined_doc: Mapping[str, Any], source: str,
                    coco: Mapping[str, Any]) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """``(image id of coco, entry)`` for the ``hard_negatives.json`` entries of ``source`` (validated)."""
    if not isinstance(mined_doc, Mapping) or mined_doc.get("version") != MINED_VERSION \
            or not isinstance(mined_doc.get("images"), list):
        raise ValueError(f"{MINED_FILE}: expected a version-{MINED_VERSION} document with an 'images' list")
    ids = {img["file_name"]: int(img["id"]) for img in coco["images"]}
    for entry in mined_doc["images"]:
        if entry.get("source") != source:
            continue
        if entry["file_name"] not in ids:
            raise ValueError(f"{MINED_FILE} lists {source} image {entry['file_name']!r}, which is not in the COCO "
                             f"set it is applied to (a stale mine stage output?)")
        yield ids[entry["file_name"]], entry


def hard_maps_for(mined_doc: Mapping[str, Any], source: str, coco: Mapping[str, Any],
                  root: str | Path) -> dict[int, Path]:
    """Image id (of ``coco``) -> map path, for the ``hard_negatives.json`` entries of ``source`` that have a map.

    Args:
        mined_doc: The parsed ``hard_negatives.json``.
        source: ``"general"`` or ``"scenario"``.
        coco: The COCO dict the dataset reads (images matched by ``file_name``).
        root: The mine stage's output folder (map paths are relative to it).

    Raises:
        ValueError: Not a version-1 document, or a listed image is not in ``coco`` (named).

    Example:
        >>> entry = {"source": "general", "file_name": "a.png", "map": "maps/general/a.png.png"}
        >>> hard_maps_for({"version": 1, "images": [entry]}, "general", {"images": [{"id": 7, "file_name": "a.png"}]},
        ...               "data/mined")
        {7: PosixPath('data/mined/maps/general/a.png.png')}
    """
    return {image_id: safe_join(root, entry["map"])
            for image_id, entry in _listed_entries(mined_doc, source, coco) if entry.get("map")}


def region_image_ids(mined_doc: Mapping[str, Any], source: str, coco: Mapping[str, Any]) -> set[int]:
    """Image ids (of ``coco``) of the ``source`` entries with at least one hard-negative region.

    These are the image-level hard negatives that ``mine.image_repeat`` draws more often (an image with hard pixels
    only is not one). Raises as :func:`hard_maps_for`.

    Example:
        >>> a = {"source": "general", "file_name": "a.png", "regions": [{"bbox": [0, 0, 4, 4]}]}
        >>> b = {"source": "general", "file_name": "b.png", "regions": []}  # hard pixels only
        >>> coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}]}
        >>> region_image_ids({"version": 1, "images": [a, b]}, "general", coco)
        {7}
    """
    return {image_id for image_id, entry in _listed_entries(mined_doc, source, coco) if entry.get("regions")}
