"""The multi-task detector + semantic segmenter used for teachers and students, and its registered variants.

``MultiTaskDetSeg`` = torchvision backbone -> BiFPN neck (P3-P5, strides 8/16/32) -> dense GFL detection head and
SPP/LR-ASPP segmentation head (seed 000: detection + segmentation on one backbone is more accurate than detection
alone, for ~10% more time). Teachers and students share the same strides and output layout, so a teacher's
per-location outputs align one-to-one with a student's: dense distillation needs no matching step.

Why GFL (Li et al. 2020), anchor-free with a distribution box head: SSD-style anchors as in seed 001 were
considered; they need per-dataset anchor scales/aspect ratios (seed 001 spent slides tuning them) and 3:1 hard
negative mining, and their class scores say nothing about box quality. GFL's Quality Focal Loss trains the score
to be the IoU of the predicted box, so scores rank detections by localisation quality (what pseudo-label
filtering and calibration threshold on), and its box is a discrete distribution over ``reg_max + 1`` bins per
side, whose softened bins a teacher can distil into a student (Localization Distillation, Zheng et al. 2022)
and whose flatness measures box uncertainty. See :mod:`dataengine.models.losses` for the assigner (ATSS) and the
normalisation of the losses.

Conventions: input images are float ``[B, 3, S, S]`` in ``[0, 1]``; the model normalises them with its ``mean`` /
``std`` buffers, so checkpoints carry their preprocessing. Boxes are absolute ``xyxy`` input pixels. Detection
labels are ``0..K-1``; semantic classes ``0`` = background, ``1..K``, 255 = ignore.

Example:
    >>> import torch
    >>> from dataengine.models import create_model
    >>> model = create_model("mobilenet_v3_small_gfl", num_classes=3, input_size=64).eval()
    >>> out = model(torch.rand(2, 3, 64, 64))
    >>> tuple(out["cls_logits"].shape), tuple(out["seg_logits"].shape)
    ((2, 84, 3), (2, 4, 16, 16))
    >>> sorted(model.postprocess(out)[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from dataengine.models.backbones import build_backbone
from dataengine.models.heads import GFLHead, SegmentationHead
from dataengine.models.losses import (
    DFL_WEIGHT,
    GIOU_WEIGHT,
    QFL_WEIGHT,
    distance_to_box,
    distribution_to_distance,
    gfl_loss,
    semantic_loss,
)
from dataengine.models.necks import BiFPN
from dataengine.models.registry import register_model

if TYPE_CHECKING:  # annotations only: the library takes the params dataclasses but does not need config at runtime
    from dataengine.config import DetectionLossParams, SegmentationLossParams

__all__ = [
    "HARD_PIXEL_BIT",
    "HARD_REGION_BIT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiTaskDetSeg",
    "mobilenet_v2_gfl",
    "mobilenet_v3_large_gfl",
    "mobilenet_v3_small_gfl",
    "resnet18_bifpn_gfl",
    "resnet50_bifpn_gfl",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (8, 16, 32)

HARD_REGION_BIT = 1
"""Bit of ``target["hard_negative"]``: the pixel lies in an image-level hard-negative region (a confuser)."""
HARD_PIXEL_BIT = 2
"""Bit of ``target["hard_negative"]``: a hard negative pixel (teacher confidently foreground, label background)."""

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _values_at(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values ``[B, N]`` of maps ``[B, H, W]`` at the pixels holding the location centres ``points`` ``[N, 2]`` (x, y),
    clamped to the map (a location of a padded last row or column reads the map's edge)."""
    h, w = maps.shape[-2:]
    x = points[:, 0].long().clamp(0, w - 1)
    y = points[:, 1].long().clamp(0, h - 1)
    return maps[:, y, x]


class MultiTaskDetSeg(nn.Module):
    """Backbone -> BiFPN -> GFL detection head (P3-P5) + semantic segmentation head; either head can be off.

    Build it through :func:`dataengine.models.create_model`; ``create_model(**model.config)`` rebuilds it.

    Args:
        name: Registered name (recorded in :attr:`config`).
        arch: torchvision backbone (see :func:`dataengine.models.backbones.build_backbone`).
        num_classes: ``K`` object classes.
        input_size: Training/inference square input side (metadata and the default of :meth:`anchor_points`; the
            network itself accepts any size).
        width_mult: Backbone width multiplier (MobileNets).
        neck_channels: BiFPN width.
        neck_repeats: BiFPN layers.
        head_convs: Convs per detection tower.
        depthwise_head: Depthwise-separable detection towers (students) instead of plain 3x3 (teachers).
        detection: Build the detection head.
        segmentation: Build the segmentation head.
        reg_max: Last bin of the box side distributions (GFL default 7: sides up to 7 strides).
        pretrained: Load ImageNet backbone weights from the local torch hub cache (never downloads).
        mean: Normalisation mean (RGB, [0, 1] images).
        std: Normalisation std.

    Attributes:
        class_names: Optional class names a caller may attach (saved by the training engine with the checkpoint).
    """

    def __init__(
        self,
        *,
        name: str,
        arch: str,
        num_classes: int,
        input_size: int = 128,
        width_mult: float = 1.0,
        neck_channels: int = 64,
        neck_repeats: int = 1,
        head_convs: int = 2,
        depthwise_head: bool = True,
        detection: bool = True,
        segmentation: bool = True,
        reg_max: int = 7,
        pretrained: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"{name}: num_classes must be an int >= 1, got {num_classes!r}")
        if not (detection or segmentation):
            raise ValueError(f"{name}: detection and segmentation are both off; enable at least one")
        if input_size < 32:
            raise ValueError(f"{name}: input_size must be >= 32 (the stride of P5), got {input_size}")
        if reg_max < 1 or head_convs < 0:
            raise ValueError(f"{name}: need reg_max >= 1 and head_convs >= 0, got {reg_max} and {head_convs}")
        self.name, self.arch, self.num_classes = name, arch, num_classes
        self.input_size, self.width_mult, self.reg_max = int(input_size), float(width_mult), int(reg_max)
        self.neck_channels, self.neck_repeats, self.head_convs = int(neck_channels), int(neck_repeats), int(head_convs)
        self.detection, self.segmentation = bool(detection), bool(segmentation)
        self.strides = STRIDES
        self.class_names: list[str] | None = None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        self.backbone = build_backbone(arch, width_mult=width_mult, pretrained=pretrained)
        self.neck = BiFPN(self.backbone.channels[1:], neck_channels, neck_repeats)
        self.det_head = GFLHead(neck_channels, num_classes, reg_max, head_convs, depthwise=depthwise_head,
                                num_levels=len(STRIDES)) if detection else None
        self.seg_head = SegmentationHead(self.backbone.channels[0], neck_channels,
                                         num_classes + 1) if segmentation else None
        self._grids: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able architecture description; ``create_model(**model.config)`` rebuilds the same network.

        ``pretrained`` is not recorded: a rebuilt model gets its weights from the checkpoint's state dict.
        """
        return {"name": self.name, "num_classes": self.num_classes, "input_size": self.input_size,
                "width_mult": self.width_mult, "neck_channels": self.neck_channels,
                "neck_repeats": self.neck_repeats, "head_convs": self.head_convs, "detection": self.detection,
                "segmentation": self.segmentation, "reg_max": self.reg_max}

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """Run the network.

        Args:
            images: Float ``[B, 3, H, W]`` in ``[0, 1]`` (RGB).

        Returns:
            ``features``: neck outputs ``[P3, P4, P5]`` (``[B, C, ceil(H/s), ceil(W/s)]``);
            ``cls_logits`` ``[B, N, K]`` and ``bbox_dist`` ``[B, N, 4 * (reg_max + 1)]`` with detection, where ``N``
            runs over the locations of :meth:`anchor_points`; ``seg_logits`` ``[B, K + 1, H/4, W/4]`` with
            segmentation.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"{self.name}: expected float images [B, 3, H, W] in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = (images - self.mean) / self.std
        c2, c3, c4, c5 = self.backbone(x)
        feats = self.neck([c3, c4, c5])
        out: dict[str, Any] = {"features": feats}
        if self.det_head is not None:
            out["cls_logits"], out["bbox_dist"] = self.det_head(feats)
        if self.seg_head is not None:
            out["seg_logits"] = self.seg_head(c2, feats[0], feats[2])
        return out

    def anchor_points(self, input_size: Size | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres (pixels) and strides of the ``N`` detection locations for an input size (cached).

        Location ``(x, y)`` of the level with stride ``s`` is centred at ``((x + 0.5) s, (y + 0.5) s)``; levels are
        P3, P4, P5 in order, row-major inside a level (the order of ``cls_logits`` and ``bbox_dist``). Every
        backbone here maps a side ``S`` to ``ceil(S / s)`` at stride ``s``.

        Args:
            input_size: ``S`` or ``(H, W)``; defaults to the model's ``input_size``.

        Returns:
            ``points`` float ``[N, 2]`` (x, y) and ``strides`` float ``[N]``, on the CPU.

        Example:
            >>> from dataengine.models import create_model
            >>> points, strides = create_model("mobilenet_v2_gfl", num_classes=1).anchor_points(64)
            >>> points.shape[0], points[0].tolist(), strides.unique().tolist()
            (84, [4.0, 4.0], [8.0, 16.0, 32.0])
        """
        h, w = _hw(self.input_size if input_size is None else input_size)
        return self._grid(tuple((math.ceil(h / s), math.ceil(w / s)) for s in self.strides))

    def _grid(self, shapes: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if shapes not in self._grids:
            points, strides = [], []
            for (h, w), s in zip(shapes, self.strides):
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # [h, w] each
                points.append((torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * s)  # [hw, 2]
                strides.append(torch.full((h * w,), float(s)))
            self._grids[shapes] = (torch.cat(points), torch.cat(strides))
        return self._grids[shapes]

    def _points_of(self, outputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        shapes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in outputs["features"])
        points, strides = self._grid(shapes)
        return points, strides, [h * w for h, w in shapes]

    def decode_boxes(self, outputs: dict[str, Any]) -> torch.Tensor:
        """Boxes ``[B, N, 4]`` xyxy (input pixels) from the expectation of each side's distribution.

        Example:
            >>> import torch
            >>> from dataengine.models import create_model
            >>> m = create_model("mobilenet_v3_small_gfl", num_classes=2, segmentation=False).eval()
            >>> m.decode_boxes(m(torch.rand(1, 3, 64, 64))).shape
            torch.Size([1, 84, 4])
        """
        self._require("detection", "decode_boxes")
        points, strides, _ = self._points_of(outputs)
        dist = outputs["bbox_dist"]
        ltrb = distribution_to_distance(dist.float(), self.reg_max) * strides.to(dist.device)[:, None]  # [B, N, 4]
        return distance_to_box(points.to(dist.device), ltrb)

    def loss(
        self,
        outputs: dict[str, Any],
        targets: Sequence[dict[str, Any]],
        *,
        det_weight: float = 1.0,
        seg_weight: float = 1.0,
        detection_loss: DetectionLossParams | None = None,
        segmentation_loss: SegmentationLossParams | None = None,
        negative_weight: float = 1.0,
        pixel_weight: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Training losses; ``loss`` is ``det_weight * (qfl + 2 giou + 0.25 dfl) + seg_weight * seg``.

        With the defaults this is the plain GFL + cross-entropy loss (the teacher's), number for number. The student
        adds hard-negative handling (see :func:`~dataengine.models.losses.gfl_loss` and
        :func:`~dataengine.models.losses.semantic_loss`): ``detection_loss`` picks how negatives enter QFL (all, or
        SSD's hardest), ``segmentation_loss`` turns on OHEM, and the mine stage's maps in ``target["hard_negative"]``
        weight the detection negatives inside hard-negative regions by ``negative_weight`` and the hard negative
        pixels by ``pixel_weight``.

        Args:
            outputs: :meth:`forward`'s output.
            targets: One dict per image: ``boxes`` ``[M, 4]`` xyxy input pixels (tensor or ``tv_tensors``),
                ``labels`` int64 ``[M]``, and with segmentation ``semantic`` int64 ``[H, W]`` (255 = ignore; all 255
                for images without masks, which contribute nothing). ``M`` may be 0. Optionally ``hard_negative``
                uint8 ``[H, W]`` at the input resolution (tensor or ``tv_tensors.Mask``): bit
                :data:`HARD_REGION_BIT` (1) inside a mined hard-negative region, bit :data:`HARD_PIXEL_BIT` (2) on a
                hard negative pixel; an image without it has none.
            det_weight: Weight of the detection terms.
            seg_weight: Weight of the segmentation term.
            detection_loss: ``negatives`` (``"focal"`` / ``"ssd"``), ``neg_pos_ratio``, ``min_negatives``;
                ``None`` = all negatives (``"focal"``).
            segmentation_loss: ``ohem``, ``ohem_threshold``, ``ohem_min_kept``; ``None`` = no OHEM.
            negative_weight: QFL weight of a negative location whose centre pixel has :data:`HARD_REGION_BIT` set.
            pixel_weight: Cross-entropy weight of a pixel with :data:`HARD_PIXEL_BIT` set.

        Returns:
            Scalar tensors: ``loss`` and the unweighted parts ``qfl``, ``dfl``, ``giou`` (detection) and ``seg``. With
            ``detection_loss`` given or ``negative_weight != 1`` also the detached detection statistics
            ``neg_kept`` and ``hard_locations``; with ``segmentation_loss`` given or ``pixel_weight != 1`` also
            ``ohem_kept_share`` and ``hard_pixel_share`` (the Trainer logs every key; only ``loss`` is
            back-propagated).

        Raises:
            ValueError: A target misses a key of an enabled task, or has labels/classes out of range; a
                ``hard_negative`` map that is not ``[H, W]`` at the input resolution; a negative weight.

        Example:
            >>> import torch
            >>> from dataengine.config import DetectionLossParams, SegmentationLossParams
            >>> from dataengine.models import create_model
            >>> m = create_model("mobilenet_v3_small_gfl", num_classes=2)
            >>> targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
            ...             "semantic": torch.full((64, 64), 255)}]
            >>> out = m(torch.rand(1, 3, 64, 64))
            >>> sorted(m.loss(out, targets))
            ['dfl', 'giou', 'loss', 'qfl', 'seg']
            >>> targets[0]["hard_negative"] = torch.zeros(64, 64, dtype=torch.uint8)
            >>> targets[0]["hard_negative"][40:, 40:] = HARD_REGION_BIT
            >>> losses = m.loss(out, targets, detection_loss=DetectionLossParams(negatives="ssd"),
            ...                 segmentation_loss=SegmentationLossParams(), negative_weight=3.0, pixel_weight=3.0)
            >>> losses["hard_locations"].item()  # centres in [40, 64)^2: 3 x 3 at stride 8, 2 x 2 at 16, 1 at 32
            14.0
        """
        if negative_weight < 0 or pixel_weight < 0:
            raise ValueError(f"negative_weight and pixel_weight must be >= 0, got {negative_weight} and {pixel_weight}")
        # [B, H, W] uint8, or None when no image has one or no weight would use it (the defaults never read the maps)
        hard = self._hard_negative_maps(targets) if negative_weight != 1.0 or pixel_weight != 1.0 else None
        losses: dict[str, torch.Tensor] = {}
        total = None
        if self.det_head is not None:
            points, strides, counts = self._points_of(outputs)
            weights = None
            if hard is not None and negative_weight != 1.0:
                p3 = outputs["features"][0]
                if tuple(math.ceil(side / self.strides[0]) for side in hard.shape[-2:]) != tuple(p3.shape[-2:]):
                    raise ValueError(f"hard_negative maps {list(hard.shape[-2:])} do not match the input size "
                                     f"(stride-{self.strides[0]} grid {list(p3.shape[-2:])}); pass them at the "
                                     f"network's input resolution")
                hard = hard.to(p3.device)
                in_region = (_values_at(hard, points.to(hard.device)) & HARD_REGION_BIT) > 0  # [B, N]
                weights = torch.where(in_region, float(negative_weight), 1.0)  # [B, N]
            det = {} if detection_loss is None else {"negatives": detection_loss.negatives,
                                                     "neg_pos_ratio": detection_loss.neg_pos_ratio,
                                                     "min_negatives": detection_loss.min_negatives}
            terms = gfl_loss(outputs["cls_logits"], outputs["bbox_dist"], points, strides, counts, targets,
                             self.reg_max, negative_weight=weights, **det)
            if detection_loss is None and negative_weight == 1.0:  # the plain loss: the teacher logs no statistics
                terms = {key: terms[key] for key in ("qfl", "dfl", "giou")}
            losses.update(terms)
            total = det_weight * (QFL_WEIGHT * losses["qfl"] + GIOU_WEIGHT * losses["giou"]
                                  + DFL_WEIGHT * losses["dfl"])
        if self.seg_head is not None:
            semantic = self._semantic_targets(outputs, targets)  # [B, H, W]
            weights = None
            if hard is not None and pixel_weight != 1.0:
                if hard.shape != semantic.shape:
                    raise ValueError(f"hard_negative maps {list(hard.shape[-2:])} and semantic masks "
                                     f"{list(semantic.shape[-2:])} must have the same size (the input's)")
                hard = hard.to(semantic.device)
                weights = torch.where((hard & HARD_PIXEL_BIT) > 0, float(pixel_weight), 1.0)  # [B, H, W]
            ohem = {} if segmentation_loss is None or not segmentation_loss.ohem else {
                "ohem_threshold": segmentation_loss.ohem_threshold, "ohem_min_kept": segmentation_loss.ohem_min_kept}
            if segmentation_loss is None and pixel_weight == 1.0:  # the plain loss: no statistics
                losses["seg"] = semantic_loss(outputs["seg_logits"], semantic)
            else:
                losses["seg"], stats = semantic_loss(outputs["seg_logits"], semantic, pixel_weight=weights,
                                                     return_stats=True, **ohem)
                losses.update(stats)
            total = seg_weight * losses["seg"] if total is None else total + seg_weight * losses["seg"]
        assert total is not None  # the constructor refuses a model without heads
        return {"loss": total, **losses}

    @staticmethod
    def _hard_negative_maps(targets: Sequence[dict[str, Any]]) -> torch.Tensor | None:
        # ``hard_negative`` maps stacked to [B, H, W] uint8, all-zero for images without one; None if no image has one.
        maps = {i: t["hard_negative"] for i, t in enumerate(targets) if t.get("hard_negative") is not None}
        if not maps:
            return None
        plain = {i: torch.as_tensor(m).as_subclass(torch.Tensor) for i, m in maps.items()}
        shapes = {tuple(m.shape) for m in plain.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"hard_negative maps must be [H, W] and share a size within a batch, got {sorted(shapes)}")
        first = next(iter(plain.values()))
        zeros = torch.zeros(first.shape, dtype=torch.uint8, device=first.device)
        return torch.stack([plain[i].to(device=first.device, dtype=torch.uint8) if i in plain else zeros
                            for i in range(len(targets))])

    def _semantic_targets(self, outputs: dict[str, Any], targets: Sequence[dict[str, Any]]) -> torch.Tensor:
        logits = outputs["seg_logits"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} images")
        masks = []
        for i, target in enumerate(targets):
            if "semantic" not in target:
                raise ValueError(f"targets[{i}] has no 'semantic' [H, W] mask; pass an all-255 mask for images "
                                 f"without segmentation labels (or build the model with segmentation=False)")
            masks.append(torch.as_tensor(target["semantic"]).as_subclass(torch.Tensor).to(logits.device, torch.int64))
        if len({m.shape for m in masks}) != 1:
            raise ValueError(f"semantic masks of one batch must share a size, got {sorted({m.shape for m in masks})}")
        semantic = torch.stack(masks)  # [B, H, W]
        bad = (semantic > self.num_classes) & (semantic != 255) | (semantic < 0)
        if bad.any():
            image = int(bad.flatten(1).any(1).nonzero()[0])
            raise ValueError(f"targets[{image}]: semantic values must be in [0, {self.num_classes}] or 255, got "
                             f"{semantic[image][bad[image]].unique().tolist()}")
        return semantic

    @torch.no_grad()
    def postprocess(self, outputs: dict[str, Any], *, score_threshold: float = 0.05, nms_iou: float = 0.6,
                    max_detections: int = 100, pre_nms_topk: int = 1000,
                    image_size: tuple[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections per image: class-wise NMS over the (location, class) pairs scoring above the threshold.

        Args:
            outputs: :meth:`forward`'s output.
            score_threshold: Minimum ``sigmoid(cls_logits)`` (QFL scores: estimated IoU with an object).
            nms_iou: IoU above which a lower-scored box of the same class is suppressed.
            max_detections: Boxes kept per image after NMS.
            pre_nms_topk: Highest-scoring candidates per image entering NMS.
            image_size: ``(H, W)`` to clip boxes to; defaults to the extent of the stride-8 grid (the input size when
                it is a multiple of 8).

        Returns:
            Per image ``boxes`` float ``[M, 4]`` xyxy input pixels, ``scores`` ``[M]`` in (0, 1], sorted
            descending, ``labels`` int64 ``[M]`` in ``[0, K)``.
        """
        self._require("detection", "postprocess")
        scores_all = outputs["cls_logits"].float().sigmoid()  # [B, N, K]
        boxes_all = self.decode_boxes(outputs)  # [B, N, 4]
        if image_size is None:
            p3 = outputs["features"][0]
            image_size = (p3.shape[-2] * self.strides[0], p3.shape[-1] * self.strides[0])
        k = scores_all.shape[-1]
        results = []
        for scores, boxes in zip(scores_all, boxes_all):
            flat = scores.flatten()  # [N * K]
            keep = (flat > score_threshold).nonzero().squeeze(1)
            top = flat[keep].topk(min(pre_nms_topk, keep.numel())).indices
            keep = keep[top]
            cand_boxes = boxes[keep // k]  # [C, 4]
            cand_boxes[:, 0::2] = cand_boxes[:, 0::2].clamp(0, image_size[1])
            cand_boxes[:, 1::2] = cand_boxes[:, 1::2].clamp(0, image_size[0])
            cand_scores, cand_labels = flat[keep], keep % k
            kept = batched_nms(cand_boxes, cand_scores, cand_labels, nms_iou)[:max_detections]
            results.append({"boxes": cand_boxes[kept], "scores": cand_scores[kept], "labels": cand_labels[kept]})
        return results

    @torch.no_grad()
    def semantic_probs(self, outputs: dict[str, Any], size: Size | None = None) -> torch.Tensor:
        """Per-pixel class probabilities ``[B, K + 1, H, W]`` (softmax), bilinearly resized to ``size``.

        Args:
            outputs: :meth:`forward`'s output.
            size: Output ``(H, W)`` or side; defaults to 4x the logits' size (the input size when divisible by 4).
        """
        self._require("segmentation", "semantic_probs")
        logits = outputs["seg_logits"].float()
        h, w = _hw(size) if size is not None else (logits.shape[-2] * 4, logits.shape[-1] * 4)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.softmax(1)

    def _require(self, task: str, what: str) -> None:
        if not getattr(self, task):
            raise RuntimeError(f"{self.name} was built with {task}=False: {what}() is not available")


def _build(name: str, arch: str, num_classes: int, defaults: dict[str, Any], depthwise_head: bool,
           **kwargs: Any) -> MultiTaskDetSeg:
    # ``None`` means "the variant's default", so a caller may pass every key of the config unchanged.
    args = {**defaults, **{key: value for key, value in kwargs.items() if value is not None}}
    return MultiTaskDetSeg(name=name, arch=arch, num_classes=num_classes, depthwise_head=depthwise_head, **args)


_COMMON = {"input_size": 128, "width_mult": 1.0, "detection": True, "segmentation": True, "pretrained": False,
           "reg_max": 7}


@register_model
def resnet50_bifpn_gfl(num_classes: int, *, input_size: int | None = None, width_mult: float | None = None,
                       neck_channels: int | None = None, neck_repeats: int | None = None,
                       head_convs: int | None = None, detection: bool | None = None, segmentation: bool | None = None,
                       pretrained: bool | None = None, reg_max: int | None = None) -> MultiTaskDetSeg:
    """Large teacher: ResNet-50, BiFPN 3 x 160 ch (EfficientDet-D3 width), 3 plain 3x3 convs per head tower.

    Example:
        >>> resnet50_bifpn_gfl(num_classes=80).config["neck_channels"]
        160
    """
    return _build("resnet50_bifpn_gfl", "resnet50", num_classes,
                  {**_COMMON, "neck_channels": 160, "neck_repeats": 3, "head_convs": 3}, False,
                  input_size=input_size, width_mult=width_mult, neck_channels=neck_channels, neck_repeats=neck_repeats,
                  head_convs=head_convs, detection=detection, segmentation=segmentation, pretrained=pretrained,
                  reg_max=reg_max)


@register_model
def resnet18_bifpn_gfl(num_classes: int, *, input_size: int | None = None, width_mult: float | None = None,
                       neck_channels: int | None = None, neck_repeats: int | None = None,
                       head_convs: int | None = None, detection: bool | None = None, segmentation: bool | None = None,
                       pretrained: bool | None = None, reg_max: int | None = None) -> MultiTaskDetSeg:
    """CPU demo teacher: ResNet-18, BiFPN 2 x 64 ch, 2 plain 3x3 convs per head tower (trains fast at 128 px).

    Example:
        >>> resnet18_bifpn_gfl(num_classes=3).config["neck_repeats"]
        2
    """
    return _build("resnet18_bifpn_gfl", "resnet18", num_classes,
                  {**_COMMON, "neck_channels": 64, "neck_repeats": 2, "head_convs": 2}, False,
                  input_size=input_size, width_mult=width_mult, neck_channels=neck_channels, neck_repeats=neck_repeats,
                  head_convs=head_convs, detection=detection, segmentation=segmentation, pretrained=pretrained,
                  reg_max=reg_max)


_STUDENT = {**_COMMON, "neck_channels": 64, "neck_repeats": 1, "head_convs": 2}


@register_model
def mobilenet_v3_small_gfl(num_classes: int, *, input_size: int | None = None, width_mult: float | None = None,
                           neck_channels: int | None = None, neck_repeats: int | None = None,
                           head_convs: int | None = None, detection: bool | None = None,
                           segmentation: bool | None = None, pretrained: bool | None = None,
                           reg_max: int | None = None) -> MultiTaskDetSeg:
    """Smallest student: MobileNetV3-Small, one BiFPN layer of 64 ch, 2 depthwise-separable convs per tower.

    Example:
        >>> mobilenet_v3_small_gfl(num_classes=3, width_mult=0.75).config["width_mult"]
        0.75
    """
    return _build("mobilenet_v3_small_gfl", "mobilenet_v3_small", num_classes, _STUDENT, True,
                  input_size=input_size, width_mult=width_mult, neck_channels=neck_channels, neck_repeats=neck_repeats,
                  head_convs=head_convs, detection=detection, segmentation=segmentation, pretrained=pretrained,
                  reg_max=reg_max)


@register_model
def mobilenet_v3_large_gfl(num_classes: int, *, input_size: int | None = None, width_mult: float | None = None,
                           neck_channels: int | None = None, neck_repeats: int | None = None,
                           head_convs: int | None = None, detection: bool | None = None,
                           segmentation: bool | None = None, pretrained: bool | None = None,
                           reg_max: int | None = None) -> MultiTaskDetSeg:
    """Student: MobileNetV3-Large, one BiFPN layer of 64 ch, 2 depthwise-separable convs per tower.

    Example:
        >>> mobilenet_v3_large_gfl(num_classes=3).config["name"]
        'mobilenet_v3_large_gfl'
    """
    return _build("mobilenet_v3_large_gfl", "mobilenet_v3_large", num_classes, _STUDENT, True,
                  input_size=input_size, width_mult=width_mult, neck_channels=neck_channels, neck_repeats=neck_repeats,
                  head_convs=head_convs, detection=detection, segmentation=segmentation, pretrained=pretrained,
                  reg_max=reg_max)


@register_model
def mobilenet_v2_gfl(num_classes: int, *, input_size: int | None = None, width_mult: float | None = None,
                     neck_channels: int | None = None, neck_repeats: int | None = None,
                     head_convs: int | None = None, detection: bool | None = None, segmentation: bool | None = None,
                     pretrained: bool | None = None, reg_max: int | None = None) -> MultiTaskDetSeg:
    """Student: MobileNetV2 (seed 000's mobile multi-task backbone), one BiFPN layer of 64 ch, depthwise towers.

    Example:
        >>> mobilenet_v2_gfl(num_classes=3, detection=False).det_head is None
        True
    """
    return _build("mobilenet_v2_gfl", "mobilenet_v2", num_classes, _STUDENT, True,
                  input_size=input_size, width_mult=width_mult, neck_channels=neck_channels, neck_repeats=neck_repeats,
                  head_convs=head_convs, detection=detection, segmentation=segmentation, pretrained=pretrained,
                  reg_max=reg_max)
