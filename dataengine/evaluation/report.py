"""The final comparison: teacher, distilled students and supervised baselines on the labelled scenario test set.

Each model is run **once** over the test set (:func:`dataengine.inference.predict_coco`: letterboxed inference
mapped back to original pixels, plus the semantic confusion matrix), and that one pass gives every number:

- COCO ``mAP`` (AP@[.50:.05:.95]), ``AP50``, ``AP75`` and ``per_class_AP`` (pycocotools, maxDets 100);
- ``mIoU`` over background + classes at the model's input resolution (:class:`SegmentationMeter`);
- ``confuser_fp_per_image``: detections scoring ``>=`` :data:`SCORE_THRESHOLD` that sit on a confuser and on no
  object of their class, per image that has confusers (:func:`confuser_false_positives`);
- ``params_m`` and ``gflops`` (one forward pass at the checkpoint's own input size);
- for students, ``latency_ms`` / ``latency_ms_int8`` copied from the export stage's ``card.json`` (ONNX Runtime,
  1 thread, batch 1; not re-measured here, where other processes share the CPU), and the acceptance numbers:
  ``lift_AP50_vs_baseline`` (AP50 **points** over the baseline of the same name), ``AP50_ratio_to_teacher`` and
  ``gflops_ratio_to_teacher``.

A model's precision-recall curve is COCOeval's interpolated precision at IoU 0.5 (area all, maxDets 100) on its
101 recall points, averaged over the classes that have ground truth. COCO's AP50 is the mean of exactly these
values, so the curve's mean **is** the model's AP50 and the figure agrees with the table.

Inputs: a teacher checkpoint, ``<students>/<name>/model.pt`` (+ ``card.json``) and ``<baselines>/<name>/model.pt``,
a student and its baseline paired by ``<name>``. A missing folder, a student without a baseline or a card without
a latency is not an error: the numbers that cannot exist are ``None`` and a note says why. An unreadable or
incompatible checkpoint is: :class:`~dataengine.engine.checkpoint.CheckpointError` naming the file, raised before
any model is run.

Outputs (:func:`run_evaluation`): the summary JSON (``{"teacher": {...}, "baseline": {name: {...}},
"students": {name: {...}}}``, floats rounded to 4 decimals, lift to 2), ``summary.md`` + ``pr_curves.png`` +
``samples.png`` in the report folder, and ``pr_curves.csv`` (``recall`` then one precision column per model, for
``dvc plots``) in the plots folder. All writes are atomic and happen after every model has been scored.

Example:
    >>> run = run_evaluation("models/teacher/model.pt", "models/students", "models/baselines", "data/prepared",
    ...                      metrics="metrics/summary.json", report_dir="reports",
    ...                      plots_dir="plots/evaluate")  # doctest: +SKIP
    >>> run.summary["students"]["mobilenet_v3_small"]["lift_AP50_vs_baseline"]  # doctest: +SKIP
    6.83
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate
from dataengine.data.layout import PreparedLayout
from dataengine.data.transforms import build_transforms, letterbox_params, unletterbox_mask
from dataengine.engine.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_model
from dataengine.evaluation.detection import confuser_false_positives, evaluate_detection, precision_recall_curves
from dataengine.inference import predict_coco
from dataengine.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from dataengine.models import count_gflops, count_params_m, create_model

__all__ = [
    "NUM_SAMPLES",
    "SCORE_THRESHOLD",
    "EvaluationRun",
    "ModelResult",
    "ModelSpec",
    "choose_samples",
    "discover_models",
    "evaluate_checkpoint",
    "plot_pr_curves",
    "plot_samples",
    "pr_curves_csv",
    "predict_semantic",
    "read_latency",
    "report_markdown",
    "run_evaluation",
    "summarize",
    "summary_lines",
]

SCORE_THRESHOLD = 0.3
"""Score from which a detection counts as fired: confuser false positives and the boxes drawn in the samples."""

NUM_SAMPLES = 6
"""Scenario test images shown in ``samples.png``."""

ROLES = ("teacher", "student", "baseline")
LATENCY_KEYS = ("latency_ms", "latency_ms_int8")
_DIGITS = 4
_LIFT_DIGITS = 2  # points of AP50: 2 decimals are the 4 decimals of the AP itself
# Distinct on light and dark backgrounds; pink and grey are left for confusers and neutral marks.
_CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
_MODEL_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#bcbd22")
_SEG_ALPHA = 0.4


# ---------------------------------------------------------------------------------------------------------------
# Which models
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint to score.

    Attributes:
        role: ``"teacher"``, ``"student"`` or ``"baseline"``.
        name: ``"teacher"``, or the student's folder name (a student and its baseline share it).
        checkpoint: The ``model.pt`` file.
        card: The export stage's ``card.json`` (students only; may not exist).
    """

    role: str
    name: str
    checkpoint: Path
    card: Path | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"model role {self.role!r} is not one of {ROLES}")

    @property
    def label(self) -> str:
        """``teacher``, ``student/<name>`` or ``baseline/<name>``: the model's name in the figures and the CSV."""
        return "teacher" if self.role == "teacher" else f"{self.role}/{self.name}"


def discover_models(
    teacher: str | Path, students: str | Path | None, baselines: str | Path | None
) -> tuple[list[ModelSpec], list[str]]:
    """The teacher, then every ``<students>/<name>/model.pt`` and ``<baselines>/<name>/model.pt``, sorted by name.

    Args:
        teacher: The teacher checkpoint (required).
        students: Folder of student folders (``None`` or missing: no students, with a note).
        baselines: Folder of baseline folders (same).

    Returns:
        The models and the notes (missing folders, folders without ``model.pt``, unpaired students/baselines).

    Raises:
        FileNotFoundError: The teacher checkpoint does not exist.

    Example:
        >>> specs, notes = discover_models("models/teacher/model.pt", "models/students", None)  # doctest: +SKIP
        >>> [s.label for s in specs]  # doctest: +SKIP
        ['teacher', 'student/mobilenet_v3_small']
    """
    teacher = Path(teacher)
    if not teacher.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {teacher}")
    specs = [ModelSpec("teacher", "teacher", teacher)]
    notes: list[str] = []
    found: dict[str, list[str]] = {}
    for role, folder in (("student", students), ("baseline", baselines)):
        names: list[str] = []
        if folder is None or not Path(folder).is_dir():
            notes.append(f"no {role}s evaluated: folder {folder} does not exist")
        else:
            for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
                if not (sub / "model.pt").is_file():
                    notes.append(f"{sub} has no model.pt: skipped")
                    continue
                names.append(sub.name)
                specs.append(ModelSpec(role, sub.name, sub / "model.pt",
                                       sub / "card.json" if role == "student" else None))
            if not names:
                notes.append(f"no {role} checkpoint (<name>/model.pt) under {folder}")
        found[role] = names
    for name in found["student"]:
        if name not in found["baseline"]:
            notes.append(f"student {name} has no baseline ({baselines}/{name}/model.pt): its AP50 lift is null")
    for name in found["baseline"]:
        if name not in found["student"]:
            notes.append(f"baseline {name} has no student of that name: it is reported on its own")
    return specs, notes


def read_latency(card: str | Path | None) -> tuple[dict[str, float | None], list[str]]:
    """``latency_ms`` and ``latency_ms_int8`` from an export card; ``None`` with a note where one is missing.

    Args:
        card: The ``card.json`` written by the export stage.

    Returns:
        ``({"latency_ms": ..., "latency_ms_int8": ...}, notes)``.

    Raises:
        ValueError: The card is not valid JSON or a latency is neither a number nor null (naming the file).
        TypeError: The card is JSON but not an object.

    Example:
        >>> read_latency("/nonexistent/card.json")[0]
        {'latency_ms': None, 'latency_ms_int8': None}
    """
    latency: dict[str, float | None] = dict.fromkeys(LATENCY_KEYS)
    if card is None or not Path(card).is_file():
        return latency, [f"{card} not found: latency_ms and latency_ms_int8 are null (run the export stage)"]
    content = read_json(card)
    if not isinstance(content, dict):
        raise TypeError(f"{card}: expected a JSON object, got {type(content).__name__}")
    notes = []
    for key in LATENCY_KEYS:
        value = content.get(key)
        if value is None:
            notes.append(f"{card} has no {key!r}: {key} is null")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{card}: {key!r} must be a number of milliseconds, got {value!r}")
        else:
            latency[key] = float(value)
    return latency, notes


def choose_samples(gt: dict[str, Any], n: int = NUM_SAMPLES) -> list[int]:
    """Image ids to show: the same for every model and every run, half of them images with confusers.

    Up to ``ceil(n / 2)`` images with confusers, then images with objects and no confuser, then anything left;
    each group is sampled at evenly spaced positions in image-id order (no RNG), so the picks spread over the set.

    Example:
        >>> gt = {"images": [{"id": i, "confusers": [[0, 0, 4, 4]] if i % 3 == 0 else []} for i in range(1, 10)],
        ...       "annotations": [{"image_id": i, "bbox": [0, 0, 2, 2]} for i in range(1, 10)]}
        >>> choose_samples(gt, 4)
        [2, 3, 7, 9]
    """
    if n <= 0:
        return []
    objects = Counter(a["image_id"] for a in gt.get("annotations", []) if not a.get("iscrowd", 0))
    ids = sorted(img["id"] for img in gt["images"])
    confused = {img["id"] for img in gt["images"] if img.get("confusers")}
    picks = _spread([i for i in ids if i in confused], (n + 1) // 2)
    picks += _spread([i for i in ids if i not in confused and objects[i]], n - len(picks))
    taken = set(picks)
    picks += _spread([i for i in ids if i not in taken], n - len(picks))
    return sorted(picks)


def _spread(items: Sequence[int], k: int) -> list[int]:
    """``k`` items at evenly spaced positions (centres of ``k`` equal slices); distinct since ``k <= len``."""
    k = min(k, len(items))
    return [items[(2 * j + 1) * len(items) // (2 * k)] for j in range(k)] if k > 0 else []


# ---------------------------------------------------------------------------------------------------------------
# Scoring one model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelResult:
    """What one pass of a model over the test set gave.

    Attributes:
        spec: The model.
        metrics: Unrounded numbers (``None`` where undefined); :func:`run_evaluation` adds a student's latencies.
        recall: COCO's 101 recall points (empty when there is no curve).
        precision: Class-averaged interpolated precision at IoU 0.5 on ``recall`` (``None``: no detection head or
            no ground-truth instance).
        predictions: COCO results in original pixels.
        sample_semantic: Predicted semantic labels ``[H, W]`` (0 background, label + 1) of the sample images.
        seconds: Wall time of the pass (loading, prediction and scoring).
    """

    spec: ModelSpec
    metrics: dict[str, Any]
    recall: list[float]
    precision: list[float] | None
    predictions: list[dict[str, Any]]
    sample_semantic: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def _build(config: dict[str, Any]) -> nn.Module:
    return create_model(**config)


@contextlib.contextmanager
def _checkpoint_errors(path: Path) -> Iterator[None]:
    """Turn the load failures that escape :func:`load_checkpoint` into a :class:`CheckpointError` naming ``path``.

    Seen with torch 2.14: a file cut after its first ~10 kB makes torch's zip reader fail with ``OSError`` (EINVAL,
    no file name), and some non-checkpoint bytes make the weights-only unpickler raise ``KeyError`` (an opcode).
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, KeyError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from None


def evaluate_checkpoint(
    spec: ModelSpec,
    gt: dict[str, Any],
    image_root: str | Path,
    *,
    sample_ids: Sequence[int] = (),
    batch_size: int = 16,
    progress: bool = False,
) -> ModelResult:
    """Score one checkpoint on a labelled COCO set with a single prediction pass.

    Args:
        spec: The model (its checkpoint must be made for ``gt``'s classes, in order).
        gt: The labelled set (COCO dict with ``confusers`` per image where known).
        image_root: Folder of ``gt``'s ``file_name`` / ``semantic_file`` entries.
        sample_ids: Images whose predicted segmentation is kept for the samples figure (a forward pass over those
            few only; their detections come from the main pass).
        batch_size: Prediction batch size.
        progress: Show the prediction progress bar.

    Returns:
        A :class:`ModelResult`; ``metrics`` has ``mAP``, ``AP50``, ``AP75``, ``per_class_AP``, ``mIoU``,
        ``confuser_fp_per_image``, ``params_m``, ``gflops`` (a student's latencies are added by the caller from
        its card: :func:`read_latency`).

    Raises:
        CheckpointError: Unreadable checkpoint, or one made for other classes (naming the file).
    """
    start = time.perf_counter()
    cats = CategoryMap.from_coco(gt)
    with _checkpoint_errors(spec.checkpoint):
        model, ckpt = load_model(spec.checkpoint, _build, class_names=list(cats.names))
    size = int(ckpt["input_size"])
    predictions, meter = predict_coco(model, gt, image_root, input_size=size, batch_size=batch_size,
                                      progress=progress)
    metrics: dict[str, Any] = dict.fromkeys(("mAP", "AP50", "AP75", "per_class_AP", "mIoU", "confuser_fp_per_image"))
    recall: list[float] = []
    precision: list[float] | None = None
    if getattr(model, "detection", True):
        det = evaluate_detection(gt, predictions)
        metrics.update({k: det[k] for k in ("mAP", "AP50", "AP75", "per_class_AP")})
        metrics["confuser_fp_per_image"] = confuser_false_positives(
            gt, predictions, score_threshold=SCORE_THRESHOLD)["confuser_fp_per_image"]
        curves = precision_recall_curves(gt, predictions, iou=0.5)
        if curves:  # classes without GT have no curve and are left out of AP50's mean too
            recall = next(iter(curves.values()))["recall"]
            precision = np.mean([c["precision"] for c in curves.values()], axis=0).tolist()  # [101]
    if meter is not None:
        metrics["mIoU"] = meter.compute()["mIoU"]
    metrics["params_m"] = count_params_m(model)
    metrics["gflops"] = count_gflops(model, size)
    semantic = predict_semantic(model, gt, image_root, sample_ids, input_size=size)
    return ModelResult(spec, metrics, recall, precision, predictions, semantic, time.perf_counter() - start)


@torch.inference_mode()
def predict_semantic(
    model: nn.Module, gt: dict[str, Any], image_root: str | Path, image_ids: Sequence[int], *, input_size: int
) -> dict[int, np.ndarray]:
    """Predicted semantic labels at original resolution for a few images (empty without a segmentation head).

    The same letterbox as :func:`predict_coco`; the argmax is taken at the input resolution and mapped back with
    nearest-exact resizing (:func:`unletterbox_mask`), so labels stay labels.

    Returns:
        ``{image_id: uint8 [H, W]}`` with 0 = background and ``label + 1`` for objects.
    """
    wanted = set(image_ids)
    if not wanted or not getattr(model, "segmentation", False):
        return {}
    subset = {**gt, "images": [img for img in gt["images"] if img["id"] in wanted],
              "annotations": [a for a in gt.get("annotations", []) if a["image_id"] in wanted]}
    dataset = CocoDetectionSegDataset(subset, image_root, build_transforms(None, input_size, train=False),
                                      categories=CategoryMap.from_coco(gt))
    if len(dataset) == 0:
        return {}
    images, targets = collate([dataset[i] for i in range(len(dataset))])  # [B, 3, S, S]
    was_training = model.training
    model.eval()
    labels = model.semantic_probs(model(images), size=images.shape[-2:]).argmax(1)  # [B, S, S]
    model.train(was_training)
    out = {}
    for label_map, target in zip(labels, targets):
        h, w = (int(v) for v in target["orig_size"])
        scale, pad_x, pad_y = letterbox_params(h, w, input_size)
        out[int(target["image_id"])] = unletterbox_mask(label_map, h, w, scale, pad_x, pad_y).numpy().astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Summary, CSV, report
# ---------------------------------------------------------------------------------------------------------------


def _rounded(value: Any, digits: int = _DIGITS) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits)
    return value


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarize(results: Sequence[ModelResult]) -> dict[str, Any]:
    """The ``summary.json`` document: per-model numbers and, per student, its lift and ratios.

    ``lift_AP50_vs_baseline = 100 * (AP50 - baseline AP50)`` (points), ``AP50_ratio_to_teacher = AP50 / teacher
    AP50``, ``gflops_ratio_to_teacher = gflops / teacher gflops``: computed from the unrounded values, ``None``
    where an operand is missing or a denominator is 0.

    Raises:
        ValueError: Not exactly one teacher among ``results``.

    Example:
        >>> t = ModelResult(ModelSpec("teacher", "teacher", Path("t.pt")), {"AP50": 0.5, "gflops": 2.0}, [], None, [])
        >>> s = ModelResult(ModelSpec("student", "s", Path("s.pt")), {"AP50": 0.4, "gflops": 0.5}, [], None, [])
        >>> b = ModelResult(ModelSpec("baseline", "s", Path("b.pt")), {"AP50": 0.3, "gflops": 0.5}, [], None, [])
        >>> summary = summarize([t, s, b])["students"]["s"]
        >>> summary["lift_AP50_vs_baseline"], summary["AP50_ratio_to_teacher"], summary["gflops_ratio_to_teacher"]
        (10.0, 0.8, 0.25)
    """
    teachers = [r for r in results if r.spec.role == "teacher"]
    if len(teachers) != 1:
        raise ValueError(f"expected exactly one teacher result, got {len(teachers)}")
    teacher = teachers[0].metrics
    baselines = {r.spec.name: r.metrics for r in results if r.spec.role == "baseline"}
    students: dict[str, Any] = {}
    for r in results:
        if r.spec.role != "student":
            continue
        m, base = r.metrics, baselines.get(r.spec.name, {})
        lift = None if m.get("AP50") is None or base.get("AP50") is None else 100.0 * (m["AP50"] - base["AP50"])
        students[r.spec.name] = {
            **_rounded(m),
            "lift_AP50_vs_baseline": None if lift is None else round(lift, _LIFT_DIGITS),
            "AP50_ratio_to_teacher": _rounded(_ratio(m.get("AP50"), teacher.get("AP50"))),
            "gflops_ratio_to_teacher": _rounded(_ratio(m.get("gflops"), teacher.get("gflops"))),
        }
    return {"teacher": _rounded(teacher), "baseline": {k: _rounded(v) for k, v in baselines.items()},
            "students": students}


def pr_curves_csv(results: Sequence[ModelResult]) -> str:
    """Precision-recall curves as CSV: ``recall`` then one precision column per model (its label).

    Wide, not long: ``dvc plots`` colours lines by revision and tells series of one file apart only by their ``y``
    columns, so one column per model is what draws one line per model. Models without a curve have no column.

    Example:
        >>> r = ModelResult(ModelSpec("teacher", "teacher", Path("t.pt")), {}, [0.0, 1.0], [1.0, 0.5], [])
        >>> print(pr_curves_csv([r]), end="")
        recall,teacher
        0.00,1.0000
        1.00,0.5000
    """
    curves = [r for r in results if r.precision is not None]
    if not curves:
        return "recall\n"
    recall = curves[0].recall
    rows = [",".join(["recall", *(r.spec.label for r in curves)])]
    for i, x in enumerate(recall):
        rows.append(",".join([f"{x:.2f}", *(f"{r.precision[i]:.4f}" for r in curves)]))  # type: ignore[index]
    return "\n".join(rows) + "\n"


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report_markdown(
    summary: dict[str, Any], gt: dict[str, Any], *, test_json: str | Path, notes: Sequence[str] = (),
    figures: dict[str, str] | None = None, seconds: dict[str, float] | None = None,
) -> str:
    """``summary.md``: the table, the students' measured acceptance numbers, per-class AP, figures and notes.

    Args:
        summary: From :func:`summarize`.
        gt: The test set (for its size).
        test_json: Shown as the data source.
        notes: Lines for the Notes section.
        figures: ``{caption: relative link}`` of the PNGs.
        seconds: Evaluation wall time per model label.
    """
    rows: list[tuple[str, str, dict[str, Any]]] = [("teacher", "teacher", summary["teacher"])]
    for name in sorted(set(summary["students"]) | set(summary["baseline"])):
        if name in summary["students"]:
            rows.append((name, "student", summary["students"][name]))
        if name in summary["baseline"]:
            rows.append((name, "baseline", summary["baseline"][name]))
    n_confused = sum(1 for img in gt["images"] if img.get("confusers"))
    lines = [
        "# Scenario test evaluation",
        "",
        (f"Test set `{test_json}`: {len(gt['images'])} images ({n_confused} with confusers), "
         f"{sum(1 for a in gt.get('annotations', []) if not a.get('iscrowd', 0))} objects, "
         f"{len(gt['categories'])} classes. mAP = COCO AP@[.50:.95], AP50 at IoU 0.5 (pycocotools, maxDets 100); "
         "mIoU over background + classes at each model's input size; confuser FP/img = detections with score "
         f">= {SCORE_THRESHOLD} on a confuser and on no object of their class, per image with confusers. "
         "GFLOPs: one forward pass at the model's input size. Latency: the export stage's card.json "
         "(ONNX Runtime, 1 thread, batch 1, median)."),
        "",
        ("| model | role | mAP | AP50 | mIoU | confuser FP/img | params M | GFLOPs | latency FP32 ms "
         "| latency INT8 ms |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, role, m in rows:
        lines.append(f"| {name} | {role} | {_fmt(m.get('mAP'))} | {_fmt(m.get('AP50'))} | {_fmt(m.get('mIoU'))} | "
                     f"{_fmt(m.get('confuser_fp_per_image'), 2)} | {_fmt(m.get('params_m'), 2)} | "
                     f"{_fmt(m.get('gflops'), 3)} | {_fmt(m.get('latency_ms'), 2)} | "
                     f"{_fmt(m.get('latency_ms_int8'), 2)} |")
    lines += ["", "## Students: measured against their baseline and the teacher", ""]
    t = summary["teacher"]
    if not summary["students"]:
        lines.append("No student was evaluated.")
    for name, m in summary["students"].items():
        base = summary["baseline"].get(name)
        lift = m["lift_AP50_vs_baseline"]
        vs_base = (f"AP50 {_fmt(m.get('AP50'))} vs baseline {_fmt(base.get('AP50'))}: lift "
                   f"{'–' if lift is None else f'{lift:+.2f}'} AP50 points" if base is not None
                   else f"AP50 {_fmt(m.get('AP50'))}, no baseline: lift not measured")
        lines.append(
            f"- **{name}**: {vs_base}; AP50 = {_fmt(m['AP50_ratio_to_teacher'])} x teacher "
            f"({_fmt(t.get('AP50'))}); GFLOPs {_fmt(m.get('gflops'))} = {_fmt(m['gflops_ratio_to_teacher'])} x "
            f"teacher ({_fmt(t.get('gflops'))}); confuser FP/img {_fmt(m.get('confuser_fp_per_image'), 2)} "
            f"(teacher {_fmt(t.get('confuser_fp_per_image'), 2)}); {_latency_text(m)}.")
    classes = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    labels = [("teacher" if role == "teacher" else f"{role}/{name}", m) for name, role, m in rows]
    lines += ["", "## AP@[.50:.95] per class", "", "| class | " + " | ".join(lbl for lbl, _ in labels) + " |",
              "|---|" + "---:|" * len(labels)]
    for cls in classes:
        lines.append(f"| {cls} | " + " | ".join(_fmt((m.get("per_class_AP") or {}).get(cls)) for _, m in labels)
                     + " |")
    if figures:
        lines += ["", "## Figures", ""]
        for caption, link in figures.items():
            lines += [f"[{caption}]({link})", "", f"![{caption}]({link})", ""]
    if seconds:
        lines += ["", "Evaluation time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + "."]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines).rstrip("\n") + "\n"


def _latency_text(m: dict[str, Any]) -> str:
    if m.get("latency_ms") is None and m.get("latency_ms_int8") is None:
        return "latency not measured (no export card)"
    return f"latency {_fmt(m.get('latency_ms'), 2)} ms FP32, {_fmt(m.get('latency_ms_int8'), 2)} ms INT8"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """One console line per student (the acceptance numbers), for the stage's output."""
    teacher = summary["teacher"]
    out = [f"evaluate: teacher AP50 {_fmt(teacher.get('AP50'))}, mIoU {_fmt(teacher.get('mIoU'))}"]
    for name, m in summary["students"].items():
        lift = m["lift_AP50_vs_baseline"]
        out.append(f"evaluate: student {name}: AP50 {_fmt(m.get('AP50'))} (lift vs baseline "
                   f"{'–' if lift is None else f'{lift:+.2f}'} points, {_fmt(m['AP50_ratio_to_teacher'])} x "
                   f"teacher), GFLOPs {_fmt(m['gflops_ratio_to_teacher'])} x teacher, {_latency_text(m)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures (matplotlib imported here only: the library stays importable without it)
# ---------------------------------------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window from a pipeline stage
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: str | Path, dpi: int) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _line_styles(results: Sequence[ModelResult]) -> dict[str, dict[str, Any]]:
    """Teacher black; a student solid and its baseline dashed in the same colour."""
    names = sorted({r.spec.name for r in results if r.spec.role != "teacher"})
    colour = {n: _MODEL_COLOURS[i % len(_MODEL_COLOURS)] for i, n in enumerate(names)}
    styles = {}
    for r in results:
        if r.spec.role == "teacher":
            styles[r.spec.label] = {"color": "black", "linestyle": "-", "linewidth": 2.2}
        else:
            styles[r.spec.label] = {"color": colour[r.spec.name], "linewidth": 1.6,
                                    "linestyle": "-" if r.spec.role == "student" else "--"}
    return styles


def plot_pr_curves(results: Sequence[ModelResult], path: str | Path, *, title: str = "scenario test") -> None:
    """One precision-recall line per model (class-averaged, IoU 0.5), AP50 in the legend; PNG written atomically."""
    plt = _pyplot()
    styles = _line_styles(results)
    fig, ax = plt.subplots(figsize=(7.0, 5.2))
    for r in results:
        if r.precision is None:
            continue
        ax.plot(r.recall, r.precision, label=f"{r.spec.label} (AP50 {_fmt(r.metrics.get('AP50'))})",
                **styles[r.spec.label])
    if not any(r.precision is not None for r in results):
        ax.text(0.5, 0.5, "no precision-recall curve (no detection or no ground truth)", ha="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall",
           ylabel="interpolated precision (mean over classes)",
           title=f"Precision-recall at IoU 0.5, {title}\n(COCOeval, area all, maxDets 100; curve mean = AP50)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save_png(fig, path, dpi=110)


def _overlay(labels: np.ndarray | None, num_classes: int) -> np.ndarray | None:
    """RGBA ``[H, W, 4]``: class colours at :data:`_SEG_ALPHA` on object pixels, transparent elsewhere."""
    if labels is None:
        return None
    from matplotlib.colors import to_rgba

    lut = np.zeros((256, 4), dtype=np.float32)  # 0 background and 255 ignore stay transparent
    for k in range(num_classes):
        lut[k + 1] = (*to_rgba(_CLASS_COLOURS[k % len(_CLASS_COLOURS)])[:3], _SEG_ALPHA)
    return lut[labels.astype(np.int64).clip(0, 255)]


def _draw_box(ax: Any, xywh: Sequence[float], colour: str, text: str, *, image_height: int,
              dashed: bool = False) -> None:
    """A box and its label: above the box, or below it when the box touches the top (never over the object)."""
    from matplotlib.patches import Rectangle

    # Pixel (x, y) covers [x, x+1) in COCO and is centred on (x, y) by imshow: shift by half a pixel.
    x, y, w, h = (float(v) for v in xywh)
    x, y = x - 0.5, y - 0.5
    if dashed:  # black under white dashes: visible on any background
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="black", linewidth=2.0))
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=1.0, linestyle="--"))
    else:
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.4))
    if text:
        above = y >= 0.08 * image_height
        ax.text(x, y if above else y + h, text, fontsize=5.5, color="white", ha="left",
                va="bottom" if above else "top", clip_on=True,
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.6, "linewidth": 0})


def plot_samples(
    results: Sequence[ModelResult], gt: dict[str, Any], image_root: str | Path, sample_ids: Sequence[int],
    path: str | Path, *, score_threshold: float = SCORE_THRESHOLD,
) -> None:
    """A grid of the sample images: one column per model (teacher, students, baselines) and one of ground truth.

    Each cell shows the model's detections scoring ``>= score_threshold`` (class colour, name and score) over its
    predicted segmentation (light class colours); the ground-truth column shows the annotated boxes and semantic
    mask and the confusers as dashed black-and-white boxes.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cats = CategoryMap.from_coco(gt)
    colours = [_CLASS_COLOURS[k % len(_CLASS_COLOURS)] for k in range(len(cats))]
    order = {role: i for i, role in enumerate(ROLES)}
    models = sorted(results, key=lambda r: (order[r.spec.role], r.spec.name))
    wanted = set(sample_ids)
    subset = {**gt, "images": [img for img in gt["images"] if img["id"] in wanted],
              "annotations": [a for a in gt.get("annotations", []) if a["image_id"] in wanted]}
    dataset = CocoDetectionSegDataset(subset, image_root, None, categories=cats)  # original pixels and masks
    n_rows, n_cols = max(len(dataset), 1), len(models) + 1
    cell = 2.3
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 1.3), squeeze=False)
    for row in range(len(dataset)):
        image, target = dataset[row]
        info = dataset.images[row]
        image_id = int(target["image_id"])
        pixels = image.permute(1, 2, 0).numpy()  # [H, W, 3] in [0, 1]
        height = pixels.shape[0]
        for col in range(n_cols):
            ax = axes[row][col]
            ax.imshow(pixels, interpolation="nearest")
            if col < len(models):
                r = models[col]
                overlay = _overlay(r.sample_semantic.get(image_id), len(cats))
                dets = sorted((p for p in r.predictions if p["image_id"] == image_id and p["score"] >= score_threshold),
                              key=lambda p: p["score"])  # highest score drawn last, on top
                for p in dets:
                    k = cats.label(p["category_id"])
                    _draw_box(ax, p["bbox"], colours[k], f"{cats.names[k]} {p['score']:.2f}", image_height=height)
                if row == 0:
                    ax.set_title(f"{r.spec.role}\n{r.spec.name if r.spec.role != 'teacher' else ''}\n"
                                 f"AP50 {_fmt(r.metrics.get('AP50'))}", fontsize=8)
            else:
                semantic = target["semantic"].numpy() if target["has_semantic"] else None
                overlay = _overlay(semantic, len(cats))
                for box in info.get("confusers") or []:
                    _draw_box(ax, box, "white", "", image_height=height, dashed=True)  # named in the legend
                for xyxy, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                    x1, y1, x2, y2 = xyxy
                    _draw_box(ax, [x1, y1, x2 - x1, y2 - y1], colours[label], cats.names[label], image_height=height)
                if row == 0:
                    ax.set_title("ground truth\n\n(confusers dashed)", fontsize=8)
            if overlay is not None:
                ax.imshow(overlay, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                n_objects = len(target["labels"])
                n_confusers = len(info.get("confusers") or [])
                ax.set_ylabel(f"{Path(info['file_name']).name}\n{_count(n_objects, 'object')}, "
                              f"{_count(n_confusers, 'confuser')}", fontsize=7)
    if not len(dataset):
        axes[0][0].text(0.5, 0.5, "no sample image", ha="center")
    handles = [Patch(facecolor=c, edgecolor=c, label=n) for c, n in zip(colours, cats.names)]
    handles.append(Line2D([], [], color="black", linestyle="--", label="confuser (not an object)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(f"Scenario test samples: detections with score >= {score_threshold} (class, score), predicted "
                 "segmentation shaded", fontsize=10)
    fig.tight_layout(rect=(0, 0.4 / (cell * n_rows + 1.3), 1, 1))  # 0.4 inch at the bottom for the legend
    _save_png(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------------------------------
# The whole stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` computed and wrote."""

    summary: dict[str, Any]
    results: list[ModelResult]
    notes: list[str]
    sample_ids: list[int]
    outputs: dict[str, Path]
    seconds: float


def run_evaluation(
    teacher: str | Path,
    students: str | Path | None,
    baselines: str | Path | None,
    data_root: str | Path,
    *,
    metrics: str | Path,
    report_dir: str | Path,
    plots_dir: str | Path,
    num_samples: int = NUM_SAMPLES,
    batch_size: int = 16,
    progress: bool = True,
) -> EvaluationRun:
    """Score every model on ``<data_root>/scenario/test.json`` and write the summary, report, figures and CSV.

    Every checkpoint is opened and checked against the test set's classes before any model is run, so a bad file
    fails in seconds; nothing is written unless every model was scored.

    Args:
        teacher: Teacher checkpoint.
        students: Folder of ``<name>/model.pt`` + ``card.json`` (``None``/missing: none, with a note).
        baselines: Folder of ``<name>/model.pt``.
        data_root: Prepared-data root (:class:`~dataengine.data.layout.PreparedLayout`).
        metrics: Summary JSON to write.
        report_dir: Folder of ``summary.md``, ``pr_curves.png`` and ``samples.png``.
        plots_dir: Folder of ``pr_curves.csv``.
        num_samples: Images in ``samples.png``.
        batch_size: Prediction batch size.
        progress: tqdm bars (models, and batches within a model).

    Raises:
        FileNotFoundError: The teacher checkpoint or the test set is missing.
        CheckpointError: A checkpoint is unreadable or made for other classes (the message names the file).
    """
    start = time.perf_counter()
    layout = PreparedLayout(data_root)
    if not layout.test_json.is_file():
        raise FileNotFoundError(f"scenario test set not found: {layout.test_json}")
    specs, notes = discover_models(teacher, students, baselines)
    gt = load_coco(layout.test_json)
    class_names = list(CategoryMap.from_coco(gt).names)
    for spec in specs:  # fail fast, before minutes of inference
        with _checkpoint_errors(spec.checkpoint):
            check_compatible(load_checkpoint(spec.checkpoint), class_names=class_names, path=spec.checkpoint)
    latencies = {}
    for spec in specs:
        if spec.role == "student":
            latencies[spec.label], card_notes = read_latency(spec.card)
            notes += card_notes
    sample_ids = choose_samples(gt, num_samples)

    results = []
    bar = tqdm(specs, desc="evaluate models", unit="model", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.label)
        result = evaluate_checkpoint(spec, gt, layout.test_images, sample_ids=sample_ids, batch_size=batch_size,
                                     progress=progress)
        result.metrics.update(latencies.get(spec.label, {}))
        results.append(result)
    bar.close()

    summary = summarize(results)
    report_dir, plots_dir = Path(report_dir), Path(plots_dir)
    outputs = {"metrics": Path(metrics), "report": report_dir / "summary.md", "pr_png": report_dir / "pr_curves.png",
               "samples_png": report_dir / "samples.png", "pr_csv": plots_dir / "pr_curves.csv"}
    plot_pr_curves(results, outputs["pr_png"])
    plot_samples(results, gt, layout.test_images, sample_ids, outputs["samples_png"])
    atomic_write_text(outputs["pr_csv"], pr_curves_csv(results))
    seconds = {r.spec.label: r.seconds for r in results}
    figures = {"Precision-recall at IoU 0.5": outputs["pr_png"].name,
               f"{len(sample_ids)} scenario test images, every model": outputs["samples_png"].name}
    atomic_write_text(outputs["report"], report_markdown(summary, gt, test_json=layout.test_json, notes=notes,
                                                         figures=figures, seconds=seconds))
    atomic_write_json(outputs["metrics"], summary)
    return EvaluationRun(summary, results, notes, sample_ids, outputs, time.perf_counter() - start)
