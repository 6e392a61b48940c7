"""The ``distill`` and ``baseline`` stages: mobile students trained on the curated set with a teacher, and baselines.

A **student** (one per entry of ``params.distill.students``) trains on general ground truth + the curated scenario
set (accepted and reviewed pseudo-labels), drawn with the ``rebalance`` stage's plan, with the ``mine`` stage's
hard-negative regions and pixels weighted up, and learns from the teacher on every batch (outputs computed on the
fly: the augmentation changes every epoch, so cached outputs would not match). Its loss is::

    task (GFL detection + segmentation, with the configured negative mining / OHEM)
    + cls_kd  * dense class-score distillation  (QFL towards sigmoid(teacher_logits / T), x T^2)
    + box_kd  * localisation distillation (LD)  (KL of the per-side bin distributions at temperature T, x T^2)
    + feature * feature imitation               (MSE of 1x1-adapted student P3-P5 to the teacher's, per level)
    + seg_kd  * pixel-wise distillation         (per-pixel KL of the segmentation softmax at temperature T, x T^2)

Teacher and student share strides (8/16/32) and output layout, so location ``n`` of the student is location ``n``
of the teacher: the dense terms need no matching (seed 005's recipe; Zheng et al., "Localization Distillation",
CVPR 2022 for LD; Shu et al., "Channel-wise Knowledge Distillation", ICCV 2021 and Liu et al., "Structured KD",
CVPR 2019 for pixel-wise KD; FitNets (Romero et al. 2015) for the adapters).

Two details matter for the data engine:

- **Hard-negative regions silence the teacher.** Inside a mined hard-negative region (bit 1 of
  ``target["hard_negative"]``) the teacher fired on something that is not an object; distilling any of its outputs
  there would teach the student the very false alarm the mine stage found. Those locations get a class-KD target
  of 0 (the student is taught silence there), and they are left out of LD, of feature imitation (the teacher's
  features there are those of an object) and, pixel by pixel, of the segmentation KD; the task losses alone
  speak there.
- **Normalisation.** Class KD is summed over locations and classes and divided by the teacher's soft count of
  objects (sum over locations of the max class score, >= 1), as QFL divides by the number of positives; LD is a
  mean weighted by the teacher's max score (the "main distillation region" of LD, softly); feature imitation is
  divided by the teacher feature's variance so its weight does not depend on the feature scale.

A **baseline** is the same architecture and budget (``epochs x epoch_size`` images) trained on general ground
truth only, with the same task loss, and nothing of the engine: no pseudo-labels, no teacher, no rebalancing, no
mined negatives. It is what a student must beat.

Example:
    >>> from dataengine.config import load_params
    >>> p = load_params("params.yaml", ["distill", "mine"])  # doctest: +SKIP
    >>> train_student("mobilenet_v3_small", p.distill, p.mine, teacher="models/teacher/model.pt",
    ...               data_root="data/prepared", curated="data/curated/scenario.json", plan="data/rebalance/plan.json",
    ...               mined="data/mined", out_dir="models/students/mobilenet_v3_small",
    ...               log_dir="dvclive/students/mobilenet_v3_small")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

from dataengine.config import DistillLossParams, DistillParams, MineParams, StudentSpec
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate
from dataengine.data.layout import PreparedLayout
from dataengine.data.transforms import build_transforms
from dataengine.engine import Trainer
from dataengine.engine.checkpoint import load_model
from dataengine.engine.distributed import is_main_process
from dataengine.engine.seeding import seed_everything
from dataengine.inference import evaluate_model
from dataengine.io import read_json
from dataengine.models import create_model
from dataengine.models.losses import quality_focal_loss
from dataengine.models.multitask import HARD_REGION_BIT, MultiTaskDetSeg, _values_at
from dataengine.teacher import fit_resuming

__all__ = ["DistillLoss", "FeatureAdapters", "build_student", "distill_terms", "train_student"]

class FeatureAdapters(nn.Module):
    """One 1x1 convolution per pyramid level mapping student channels to teacher channels (FitNets' regressor)."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"student has {len(student_channels)} feature levels, teacher {len(teacher_channels)}")
        self.convs = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_channels, teacher_channels))
        # nn.Module has no ``config``; the Trainer stores this module's state in last.pt's ``extra`` only.

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.convs, features)]


def distill_terms(
    student: Mapping[str, Any],
    teacher: Mapping[str, Any],
    *,
    params: DistillLossParams,
    reg_max: int,
    adapted: Sequence[torch.Tensor] | None = None,
    silence: torch.Tensor | None = None,
    silence_pixels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The distillation terms between aligned student and teacher outputs (unweighted; zero-weight terms skipped).

    Args:
        student: The student's forward outputs (``cls_logits`` [B, N, K], ``bbox_dist`` [B, N, 4 (R+1)],
            ``seg_logits`` [B, K+1, h, w], ``features``).
        teacher: The teacher's, same layout (computed without gradients).
        params: Weights and temperatures.
        reg_max: Last bin of the box distributions (both models must agree).
        adapted: Student features after the 1x1 adapters (one per level), for feature imitation.
        silence: Bool ``[B, N]``: locations inside hard-negative regions: their class-KD target is forced to 0 and
            they are left out of LD and of feature imitation (``N`` is the levels' locations in order, as
            ``cls_logits``).
        silence_pixels: Bool ``[B, H, W]`` (any resolution; nearest-resized to the segmentation output): pixels left
            out of the segmentation KD.

    Returns:
        A subset of ``kd_cls``, ``kd_box``, ``kd_feat``, ``kd_seg`` (scalars).

    Example:
        >>> s = {"cls_logits": torch.zeros(1, 4, 2), "bbox_dist": torch.zeros(1, 4, 32)}
        >>> t = {"cls_logits": torch.zeros(1, 4, 2), "bbox_dist": torch.zeros(1, 4, 32)}
        >>> terms = distill_terms(s, t, params=DistillLossParams(feature=0.0, seg_kd=0.0), reg_max=7)
        >>> round(float(terms["kd_box"]), 6)  # identical distributions: no LD
        0.0
    """
    terms: dict[str, torch.Tensor] = {}
    if "cls_logits" in student and "cls_logits" in teacher:
        t_logits = teacher["cls_logits"].float().detach()
        s_logits = student["cls_logits"].float()
        if params.cls_kd > 0:
            temp = params.cls_temperature
            soft = (t_logits / temp).sigmoid()  # [B, N, K]
            if silence is not None:
                soft = soft.masked_fill(silence[..., None], 0.0)
            norm = t_logits.sigmoid().amax(-1).sum().clamp(min=1.0)
            terms["kd_cls"] = quality_focal_loss(s_logits / temp, soft).sum() * temp ** 2 / norm
        if params.box_kd > 0:
            temp = params.box_temperature
            bins = reg_max + 1
            t_dist = teacher["bbox_dist"].float().detach().unflatten(-1, (4, bins))  # [B, N, 4, R+1]
            s_dist = student["bbox_dist"].float().unflatten(-1, (4, bins))
            kl = F.kl_div(F.log_softmax(s_dist / temp, -1), F.log_softmax(t_dist / temp, -1), log_target=True,
                          reduction="none").sum(-1).mean(-1) * temp ** 2  # [B, N]
            weight = t_logits.sigmoid().amax(-1)  # [B, N]; where the teacher sees an object
            if silence is not None:
                weight = weight.masked_fill(silence, 0.0)
            terms["kd_box"] = (kl * weight).sum() / weight.sum().clamp(min=1e-6)
    if params.feature > 0 and adapted is not None:
        keep = _level_masks(~silence, [f.shape[-2:] for f in adapted]) if silence is not None else None
        losses = []
        for level, (s_feat, t_feat) in enumerate(zip(adapted, teacher["features"])):
            t_feat = t_feat.float().detach()
            sq = (s_feat.float() - t_feat).pow(2).mean(1)  # [B, h, w]
            mse = sq.mean() if keep is None else (sq * keep[level]).sum() / keep[level].sum().clamp(min=1.0)
            losses.append(mse / t_feat.var().clamp(min=1e-6))
        terms["kd_feat"] = torch.stack(losses).mean()
    if params.seg_kd > 0 and "seg_logits" in student and "seg_logits" in teacher:
        temp = params.seg_temperature
        t_seg = teacher["seg_logits"].float().detach()
        s_seg = student["seg_logits"].float()
        if t_seg.shape[-2:] != s_seg.shape[-2:]:
            t_seg = F.interpolate(t_seg, size=s_seg.shape[-2:], mode="bilinear", align_corners=False)
        kl = F.kl_div(F.log_softmax(s_seg / temp, 1), F.log_softmax(t_seg / temp, 1), log_target=True,
                      reduction="none").sum(1)  # [B, h, w]
        if silence_pixels is None:
            terms["kd_seg"] = kl.mean() * temp ** 2
        else:
            keep = ~F.interpolate(silence_pixels[:, None].float(), size=kl.shape[-2:], mode="nearest")[:, 0].bool()
            terms["kd_seg"] = (kl * keep).sum() / keep.sum().clamp(min=1) * temp ** 2
    return terms


def _level_masks(per_location: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``[B, N]`` values over the pyramid's locations (level by level, row-major) -> one ``[B, h, w]`` per level."""
    sizes = [int(h) * int(w) for h, w in shapes]
    if sum(sizes) != per_location.shape[1]:
        raise ValueError(f"{per_location.shape[1]} locations, but the feature levels {[list(s) for s in shapes]} "
                         f"hold {sum(sizes)}")
    return [part.unflatten(1, (int(h), int(w))).float()
            for part, (h, w) in zip(per_location.split(sizes, dim=1), shapes)]


class DistillLoss:
    """``loss_fn(net, images, targets)`` for :class:`~dataengine.engine.Trainer`: task loss + distillation.

    Args:
        teacher: The teacher (frozen, eval mode; moved to the images' device on first use).
        adapters: :class:`FeatureAdapters` (trained with the student, passed to the Trainer as ``extra_modules``),
            or ``None`` when feature imitation is off.
        params: The distill params (weights, task-loss options).
        negative_weight: Loss weight of detection negatives inside mined regions (``mine.negative_weight``).
        pixel_weight: Segmentation-loss weight of mined hard pixels (``mine.pixel_weight``).
        teacher_forward: Run the teacher (``False`` for the baseline and the "no distillation" ablation).
    """

    def __init__(self, teacher: nn.Module | None, adapters: FeatureAdapters | None, params: DistillParams, *,
                 negative_weight: float = 1.0, pixel_weight: float = 1.0) -> None:
        # The frozen teacher runs channels-last (NHWC, oneDNN's and cuDNN's native layout): its forward is about 45 %
        # of a distillation step on CPU and about 20 % faster this way, with outputs equal to ~1e-5 (tested).
        self.teacher = (teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)
                        if teacher is not None else None)
        self.adapters = adapters
        self.params = params
        self.negative_weight = negative_weight
        self.pixel_weight = pixel_weight
        self.weights = {"kd_cls": params.loss.cls_kd, "kd_box": params.loss.box_kd, "kd_feat": params.loss.feature,
                        "kd_seg": params.loss.seg_kd}

    def __call__(self, net: nn.Module, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        model = net.module if hasattr(net, "module") else net
        outputs = net(images)
        train = self.params.train
        terms = dict(model.loss(outputs, targets, det_weight=train.det_loss_weight, seg_weight=train.seg_loss_weight,
                                detection_loss=self.params.detection_loss,
                                segmentation_loss=self.params.segmentation_loss,
                                negative_weight=self.negative_weight, pixel_weight=self.pixel_weight))
        if self.teacher is None:
            return terms
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad():
            t_out = self.teacher(images.contiguous(memory_format=torch.channels_last))
        silence = silence_pixels = None
        hard = MultiTaskDetSeg._hard_negative_maps(targets)  # [B, H, W] or None
        if hard is not None:
            silence_pixels = (hard.to(images.device) & HARD_REGION_BIT) > 0
            points, _, _ = model._points_of(outputs)
            silence = _values_at(silence_pixels, points.to(images.device))
        adapted = self.adapters(outputs["features"]) if self.adapters is not None else None
        kd = distill_terms(outputs, t_out, params=self.params.loss, reg_max=model.reg_max, adapted=adapted,
                           silence=silence, silence_pixels=silence_pixels)
        total = terms["loss"]
        for key, value in kd.items():
            total = total + self.weights[key] * value
        terms.update(kd)
        terms["loss"] = total
        return terms


def build_student(spec: StudentSpec, num_classes: int, input_size: int, *, segmentation: bool) -> nn.Module:
    """The student architecture of one ``distill.students`` entry."""
    return create_model(spec.model, num_classes=num_classes, input_size=input_size, width_mult=spec.width_mult,
                        segmentation=segmentation)


def _mined_for(doc: Mapping[str, Any], mined: Path, source: str,
               coco: dict[str, Any]) -> tuple[dict[int, Path], set[int]]:
    """The mine stage's maps of one source (image id -> map path) and the ids of its images with a region."""
    from dataengine.curation.mining import hard_maps_for, region_image_ids  # the mine stage's reader of its output

    return hard_maps_for(doc, source, coco, mined), region_image_ids(doc, source, coco)


def oversample(weights: Sequence[float], hard: Sequence[bool], factor: float) -> tuple[list[float], float, float]:
    """Sampling weights with the ``hard`` images' multiplied by ``factor`` (``mine.image_repeat``).

    This is the image-level half of seed 001's "negative samples (pos-neg ratio)": the loss already weights the
    negatives inside a mined region up (``mine.negative_weight``), but at the demo's budget most mined images are
    drawn once or twice, too few exposures for a student to learn what a confuser looks like. Drawing them more
    often, within the same ``epoch_size``, gives it more. The other images keep their relative weights. Off by
    default (1): on the demo, 3 lowered the student's confidence without teaching it the difference (README).

    Returns:
        ``(weights, share_before, share_after)``: the new weights and the expected share of draws that are hard
        images before and after.

    Example:
        >>> oversample([1.0, 1.0, 2.0, 4.0], [True, False, False, False], 3.0)
        ([3.0, 1.0, 2.0, 4.0], 0.125, 0.3)
    """
    if len(weights) != len(hard):
        raise ValueError(f"{len(weights)} weights but {len(hard)} hard flags")
    out = [w * factor if h else float(w) for w, h in zip(weights, hard)]
    total_before, total_after = sum(weights), sum(out)
    share_before = sum(w for w, h in zip(weights, hard) if h) / total_before if total_before else 0.0
    share_after = sum(w for w, h in zip(out, hard) if h) / total_after if total_after else 0.0
    return out, share_before, share_after


def train_student(
    name: str,
    params: DistillParams,
    mine: MineParams | None,
    *,
    teacher: str | Path | None,
    data_root: str | Path,
    curated: str | Path | None,
    plan: str | Path | None,
    mined: str | Path | None,
    out_dir: str | Path,
    log_dir: str | Path,
    baseline: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train student ``name`` (or its baseline) and return its metrics (general val, budget, what it used).

    ``baseline=True`` ignores ``teacher``, ``curated``, ``plan`` and ``mined``. Otherwise the switches
    ``params.pseudo_labels``, ``params.rebalance`` and ``params.hard_negatives`` and the distillation weights
    decide what the student gets (the ablations of ``benchmarks/distill_ablation.py``).

    Raises:
        KeyError: ``name`` is not in ``params.students``.
        CheckpointError: The teacher checkpoint is unreadable or made for other classes.
    """
    if name not in params.students:
        raise KeyError(f"student {name!r} is not in params distill.students (have: {', '.join(params.students)})")
    spec = params.students[name]
    layout = PreparedLayout(data_root)
    general = load_coco(layout.general_train)
    cats = CategoryMap.from_coco(general)
    size = params.input_size
    train_tf = build_transforms(params.augment, size, True)
    use_pseudo = params.pseudo_labels and not baseline and curated is not None
    use_plan = params.rebalance and not baseline and plan is not None
    use_mined = params.hard_negatives and not baseline and mined is not None and mine is not None
    mined_dir = Path(mined) if use_mined else None
    mined_doc = read_json(mined_dir / "hard_negatives.json") if mined_dir else None

    sources: list[tuple[str, CocoDetectionSegDataset]] = []
    regions: dict[str, set[int]] = {}  # source -> ids of its images with a mined hard-negative region
    maps = None
    if mined_dir:
        maps, regions["general"] = _mined_for(mined_doc, mined_dir, "general", general)
    sources.append(("general", CocoDetectionSegDataset(general, layout.general_images, train_tf, categories=cats,
                                                       **({"hard_maps": maps} if maps is not None else {}))))
    if use_pseudo:
        scenario = load_coco(curated)
        if CategoryMap.from_coco(scenario).names != cats.names:
            raise ValueError(f"{curated}: classes {list(CategoryMap.from_coco(scenario).names)} differ from general "
                             f"train's {list(cats.names)}")
        maps = None
        if mined_dir:
            maps, regions["scenario"] = _mined_for(mined_doc, mined_dir, "scenario", scenario)
        sources.append(("scenario", CocoDetectionSegDataset(curated, layout.pool_images, train_tf, categories=cats,
                                                            **({"hard_maps": maps} if maps is not None else {}))))
    dataset = ConcatDataset([ds for _, ds in sources])
    if use_plan:
        from dataengine.curation.rebalance import plan_weights

        plan_doc = read_json(plan)
        weights = plan_weights(plan_doc, [(src, [im["id"] for im in ds.images]) for src, ds in sources])
    else:
        weights = [1.0] * len(dataset)
    hard = [im["id"] in regions.get(src, ()) for src, ds in sources for im in ds.images]
    repeat = mine.image_repeat if use_mined and mine is not None else 1.0
    weights, hard_share, hard_share_after = oversample(weights, hard, repeat)
    if repeat != 1.0:
        print(f"distill: {sum(hard)} images with a hard-negative region, drawn {repeat:g}x as often "
              f"(mine.image_repeat): {hard_share:.1%} -> {hard_share_after:.1%} of the draws", file=sys.stderr)
    segmentation = any(ds.has_masks for _, ds in sources)
    val_coco = load_coco(layout.general_val)
    t_model = None
    if not baseline and teacher is not None and _distils(params.loss):
        t_model, _ = load_model(teacher, lambda config: create_model(**config), class_names=list(cats.names))
        if getattr(t_model, "input_size", size) != size or t_model.strides != (8, 16, 32):
            print(f"distill: note: teacher input size {t_model.input_size}, student {size}; the dense terms align "
                  "by stride, so training runs at the student's size", file=sys.stderr)

    def evaluate(m: nn.Module) -> dict[str, float]:
        scores = evaluate_model(m, val_coco, layout.general_images, input_size=size)
        return {k: v for k, v in scores.items() if isinstance(v, float)}

    def make_trainer() -> Trainer:
        seed_everything(params.train.seed)
        student = build_student(spec, len(cats), size, segmentation=segmentation)
        adapters = None
        if t_model is not None and params.loss.feature > 0:
            adapters = FeatureAdapters([student.neck_channels] * 3, [t_model.neck_channels] * 3)
        loss_fn = DistillLoss(t_model, adapters, params,
                              negative_weight=mine.negative_weight if use_mined else 1.0,
                              pixel_weight=mine.pixel_weight if use_mined else 1.0)
        return Trainer(student, dataset, params.train, out_dir, collate_fn=collate, evaluate_fn=evaluate,
                       loss_fn=loss_fn, sampler_weights=weights, epoch_size=params.epoch_size,
                       extra_modules=adapters, class_names=list(cats.names), input_size=size, log_dir=log_dir,
                       progress=progress, build_fn=lambda config: create_model(**config))

    start = time.perf_counter()
    result = fit_resuming(make_trainer, out_dir, resume=resume)
    if not is_main_process():
        return {}
    if result.get("resumed_from_epoch") is not None:
        print(f"distill: {'baseline' if baseline else 'student'} {name}: resumed from the checkpoint of epoch "
              f"{result['resumed_from_epoch']}", file=sys.stderr)
    return {
        "role": "baseline" if baseline else "student",
        "model": spec.model,
        "width_mult": spec.width_mult,
        "general_val": result.get("metrics", {}),
        "train_seconds": round(float(result.get("train_seconds", time.perf_counter() - start)), 1),
        "epochs": result.get("epochs"),
        "steps": result.get("steps"),
        "images_seen": int(result.get("steps", 0)) * params.train.batch_size,
        "final_losses": {k: round(v, 5) for k, v in result.get("final_losses", {}).items()},
        "used": {"sources": [src for src, _ in sources], "images": len(dataset), "rebalance": use_plan,
                 "hard_negatives": use_mined, "hard_negative_images": sum(hard),
                 "hard_negative_draw_share": round(hard_share_after, 4), "teacher": t_model is not None,
                 "distill_weights": dataclasses.asdict(params.loss) if t_model is not None else None},
    }


def _distils(loss: DistillLossParams) -> bool:
    return any(w > 0 for w in (loss.cls_kd, loss.box_kd, loss.feature, loss.seg_kd))
