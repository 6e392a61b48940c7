"""Typed params: every ``params.yaml`` section loads into a frozen dataclass.

A stage calls :func:`load_params` with the section names it reads. Unknown keys, wrong types and out-of-range
values raise :class:`ParamsError` naming the file, the dotted key and what is allowed, so a typo in
``params.yaml`` stops the stage before any work is done (detectron2's ``configurable`` and timm's pretrained
configs refuse unknown keys the same way).

Constraints live next to the field, in ``field(metadata=...)``:

- ``range=(lo, hi)``: inclusive numeric bounds (``None`` for an open end);
- ``choices=(...)``: allowed string values (``Literal`` annotations are also understood).

Example:
    >>> from dataengine.config import load_params
    >>> params = load_params("params.yaml", ["data"])  # doctest: +SKIP
    >>> params.data.on_bad  # doctest: +SKIP
    'stop'
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ParamsError",
    "DataParams",
    "DemoParams",
    "BccdParams",
    "CocoSourceParams",
    "ModelParams",
    "TrainParams",
    "AugmentParams",
    "TeacherParams",
    "PseudoLabelParams",
    "FilterParams",
    "LabelStudioParams",
    "ReviewParams",
    "RebalanceParams",
    "MineParams",
    "DetectionLossParams",
    "SegmentationLossParams",
    "DistillLossParams",
    "StudentSpec",
    "DistillParams",
    "ExportParams",
    "Params",
    "load_params",
    "from_dict",
    "SECTIONS",
]


class ParamsError(ValueError):
    """A params file has an unknown key, a value of the wrong type, or a value out of range."""


def _range(lo: float | None, hi: float | None, **kw: Any) -> Any:
    return field(metadata={"range": (lo, hi)}, **kw)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoParams:
    """Synthetic demo dataset (``dataengine demo``); see :mod:`dataengine.data.demo`."""

    seed: int = 0
    image_size: int = _range(64, 1024, default=128)
    n_train: int = _range(1, None, default=600)
    n_val: int = _range(1, None, default=150)
    n_pool: int = _range(1, None, default=600)
    n_test: int = _range(1, None, default=150)
    # Mean confusers (look-alikes, unlabelled background) per general train/val image; 0 keeps them scenario-only.
    general_confuser_rate: float = _range(0.0, 3.0, default=0.0)


@dataclass(frozen=True)
class BccdParams:
    """Semi-supervised split of the real BCCD dataset (read by path, never copied into git)."""

    root: str = "../shared/data/bccd"
    labelled_fraction: float = _range(0.01, 1.0, default=0.25)
    val_fraction: float = _range(0.0, 0.9, default=0.2)  # of the labelled part, held out as general val
    seed: int = 0


@dataclass(frozen=True)
class CocoSourceParams:
    """A user's own data: COCO general ground truth plus a folder of scenario images."""

    train_json: str = ""
    val_json: str = ""
    images: str = ""
    scenario_dir: str = ""
    test_json: str = ""
    test_images: str = ""


@dataclass(frozen=True)
class DataParams:
    """Where the data comes from and what to do with bad entries."""

    source: Literal["demo", "bccd", "coco"] = "demo"
    on_bad: Literal["stop", "skip"] = "stop"
    demo: DemoParams = DemoParams()
    bccd: BccdParams = BccdParams()
    coco: CocoSourceParams = CocoSourceParams()


@dataclass(frozen=True)
class ModelParams:
    """A registered model and its arguments (see :func:`dataengine.models.create_model`)."""

    name: str = "resnet18_bifpn_gfl"
    input_size: int = _range(32, 2048, default=128)
    width_mult: float | None = _range(0.1, 4.0, default=None)  # students only; None: the model's default
    neck_channels: int | None = _range(8, 1024, default=None)  # None: the model's default
    detection: bool = True
    segmentation: bool = True
    pretrained: bool = False


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation (torchvision.transforms.v2), applied jointly to image, boxes and masks."""

    preset: Literal["none", "light", "default", "strong"] = "default"
    hflip: float = _range(0.0, 1.0, default=0.5)
    scale_min: float = _range(0.1, 1.0, default=0.5)
    scale_max: float = _range(1.0, 4.0, default=1.5)
    photometric: float = _range(0.0, 1.0, default=0.8)


@dataclass(frozen=True)
class TrainParams:
    """One training engine for teacher, students and baselines."""

    epochs: int = _range(1, 10_000, default=30)
    batch_size: int = _range(1, 4096, default=16)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = _range(1e-7, 10.0, default=2e-3)
    weight_decay: float = _range(0.0, 1.0, default=0.05)
    momentum: float = _range(0.0, 0.999, default=0.9)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = _range(0.0, 1000.0, default=2.0)
    ema_decay: float = _range(0.0, 0.99999, default=0.999)
    grad_clip: float = _range(0.0, None, default=10.0)
    amp: bool = True  # bf16 autocast on CUDA only; ignored on CPU
    num_workers: int = _range(0, 64, default=2)
    seed: int = 0
    det_loss_weight: float = _range(0.0, 100.0, default=1.0)
    seg_loss_weight: float = _range(0.0, 100.0, default=1.0)
    eval_every: int = _range(1, 10_000, default=1)
    max_train_seconds: float = _range(0.0, None, default=0.0)  # 0 = no limit


@dataclass(frozen=True)
class TeacherParams:
    """The ``train_teacher`` stage.

    ``checkpoint``: when set (a path), the stage trains nothing and adopts that checkpoint as the teacher -- e.g. a
    distilled student, for the next round of the loop (noisy-student style; see the README, "Iterate").

    ``epoch_size``: images drawn per epoch, uniformly with replacement; 0 (default) = one pass over general train.
    Fixes the teacher's budget (``train.epochs x epoch_size``) when the labelled set changes size: with one pass per
    epoch, a 10 % split trains the teacher on 2.5x fewer images than a 25 % split at the same ``train.epochs``.
    """

    checkpoint: str = ""
    epoch_size: int = _range(0, None, default=0)  # images drawn per epoch (with replacement); 0 = one pass
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    augment: AugmentParams = AugmentParams()


@dataclass(frozen=True)
class PseudoLabelParams:
    """The ``pseudo_label`` stage: teacher inference with test-time augmentation over the scenario pool."""

    batch_size: int = _range(1, 1024, default=16)
    num_workers: int = _range(0, 64, default=1)
    tta_hflip: bool = True
    tta_scales: tuple[float, ...] = (1.0,)  # multiples of the model's input size (rounded to a multiple of 32)
    score_threshold: float = _range(0.0, 1.0, default=0.05)  # raw candidates kept before fusion
    nms_iou: float = _range(0.0, 1.0, default=0.6)
    fusion_iou: float = _range(0.0, 1.0, default=0.55)  # weighted box fusion across TTA views
    max_detections: int = _range(1, 10_000, default=100)
    chunk_size: int = _range(1, 100_000, default=64)  # images per atomically written output chunk (resume unit)
    segmentation: bool = True
    # Re-estimate the teacher's BatchNorm statistics on each image set before labelling it (AdaBN, pseudo.adapt),
    # from at most adapt_bn_images of its images.
    adapt_bn: bool = False
    adapt_bn_images: int = _range(1, None, default=1024)


@dataclass(frozen=True)
class FilterParams:
    """The ``filter`` stage: calibrated per-class thresholds and accept / review / reject bands."""

    target_precision: float = _range(0.0, 1.0, default=0.9)
    review_min_probability: float = _range(0.0, 1.0, default=0.2)  # below: reject
    match_iou: float = _range(0.0, 1.0, default=0.5)  # a val prediction is correct at this IoU with a GT box
    min_calibration_boxes: int = _range(1, None, default=30)  # fewer for a class: pooled calibration
    min_box_size: float = _range(0.0, None, default=4.0)  # pixels, shorter side
    max_per_image: int = _range(1, 10_000, default=50)
    nms_iou: float = _range(0.0, 1.0, default=0.6)  # class-aware NMS after fusion
    seg_confidence: float = _range(0.0, 1.0, default=0.7)  # pixels below get the ignore value 255
    audit_per_class: int = _range(0, None, default=60)  # accepted labels per class sampled for reviewers to check
    audit_seed: int = 0  # the audit sample's seed (a label keeps its place in the sample while it stays accepted)
    # A class is re-calibrated on the reviewers' decisions (instead of general val) once this many of its reviewed
    # labels lie in its val-accepted range and it has right and wrong ones; 0 = never (see pseudo.calibrate).
    min_reviewed_accepted: int = _range(0, None, default=20)


@dataclass(frozen=True)
class LabelStudioParams:
    """``review.labelstudio``: the Label Studio project the review queue goes to.

    The server URL and API key are *not* params: they come from ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``
    (a key in a params file ends up in git and in DVC's lock file).
    """

    project_title: str = "dataengine review"  # the project is found (or created) by this title
    max_tasks: int = _range(0, None, default=0)  # queue images pushed, highest risk first; 0 = all (audit: never cut)
    masks: bool = True  # send the soft segmentation as brushlabels predictions too


@dataclass(frozen=True)
class ReviewParams:
    """Human review in the FiftyOne App and Label Studio, and the ``review`` stage that applies the decisions."""

    dataset_name: str = "dataengine-review"  # the persistent FiftyOne dataset
    app_address: str = "127.0.0.1"  # the App binds here; 0.0.0.0 exposes it to the network
    app_port: int = _range(1024, 65535, default=5151)
    confident_reject_score: float = _range(0.0, 1.0, default=0.5)  # "rejected but confident" view: raw score >= this
    hard_negative_score: float = _range(0.0, 1.0, default=0.5)  # "likely hard negatives": no accepted box, teacher >= this
    labelstudio: LabelStudioParams = LabelStudioParams()


@dataclass(frozen=True)
class RebalanceParams:
    """The ``rebalance`` stage: per-image repeat factors whose expected class distribution is closest (KL) to a target.

    See :mod:`dataengine.curation.rebalance` for the algorithm and the edge cases.
    """

    target: Literal["uniform", "tempered", "explicit"] = "tempered"
    tau: float = _range(0.0, 1.0, default=0.5)  # tempered: q_k proportional to n_k ** tau (0 = uniform, 1 = as is)
    shares: dict[str, float] = _range(0.0, None, default_factory=dict)  # explicit: {class name: share}, sum 1
    max_repeat: float = _range(1.0, 1000.0, default=4.0)  # repeat factors lie in [1, max_repeat]
    epoch_size: int = _range(0, None, default=0)  # images drawn per epoch; 0 = the sum of the repeat factors
    sources: tuple[Literal["general", "scenario"], ...] = ("general", "scenario")


@dataclass(frozen=True)
class MineParams:
    """The ``mine`` stage: image-level and pixel-level hard negatives (see :mod:`dataengine.curation.mining`)."""

    sources: tuple[Literal["general", "scenario"], ...] = ("general", "scenario")
    score_threshold: float = _range(0.0, 1.0, default=0.5)  # teacher boxes at least this confident are "firings"
    match_iou: float = _range(0.0, 1.0, default=0.3)  # a firing overlapping a curated box this much is not a negative
    # scenario: also mine confident boxes that only the filter rejected, no person (off: on the demo most are objects)
    unreviewed_rejects: bool = False
    max_regions_per_image: int = _range(1, 1000, default=10)
    negative_weight: float = _range(1.0, 100.0, default=3.0)  # loss weight of negatives inside hard regions
    image_repeat: float = _range(1.0, 100.0, default=1.0)  # images with a hard region are drawn this x as often
    pixel_confidence: float = _range(0.5, 1.0, default=0.8)  # teacher foreground prob on a curated-background pixel
    pixel_weight: float = _range(1.0, 100.0, default=3.0)  # segmentation loss weight of hard negative pixels
    batch_size: int = _range(1, 1024, default=16)


@dataclass(frozen=True)
class DetectionLossParams:
    """How the student's detection loss treats negatives (seed 001: SSD keeps the hardest at 3:1)."""

    negatives: Literal["focal", "ssd"] = "focal"  # focal: QFL over all locations; ssd: hardest negatives only
    neg_pos_ratio: float = _range(0.0, 100.0, default=3.0)  # ssd: negatives kept per positive (per image)
    min_negatives: int = _range(0, None, default=16)  # ssd: at least this many negatives per image


@dataclass(frozen=True)
class SegmentationLossParams:
    """Online hard example mining (OHEM) in the student's segmentation loss."""

    ohem: bool = True
    ohem_threshold: float = _range(0.0, 1.0, default=0.7)  # keep pixels whose target-class probability is below
    ohem_min_kept: int = _range(0, None, default=4096)  # per batch, at least this many pixels are kept


@dataclass(frozen=True)
class DistillLossParams:
    """Distillation weights (0 disables a term) and temperatures."""

    cls_kd: float = _range(0.0, 100.0, default=1.0)  # dense class-score distillation (QFL towards teacher sigmoid/T)
    cls_temperature: float = _range(0.1, 100.0, default=2.0)
    box_kd: float = _range(0.0, 100.0, default=0.25)  # localisation distillation (LD: KL of the side distributions)
    box_temperature: float = _range(0.1, 100.0, default=10.0)
    feature: float = _range(0.0, 100.0, default=1.0)  # feature imitation through 1x1 adapters (MSE, P3-P5)
    seg_kd: float = _range(0.0, 100.0, default=1.0)  # per-pixel KL of the segmentation logits
    seg_temperature: float = _range(0.1, 100.0, default=1.0)


@dataclass(frozen=True)
class StudentSpec:
    """One student of the ``distill`` stage (DVC ``foreach`` runs one stage per entry)."""

    model: str = "mobilenet_v3_small_gfl"
    width_mult: float | None = _range(0.1, 4.0, default=None)


@dataclass(frozen=True)
class DistillParams:
    """The ``distill`` and ``baseline`` stages: mobile students trained on the curated set, and their baselines.

    The baseline of a student is the same architecture and optimisation budget on general ground truth only
    (no pseudo-labels, no distillation, no rebalancing, no mining): what the engine must beat.
    """

    students: dict[str, StudentSpec] = dataclasses.field(
        default_factory=lambda: {"mobilenet_v3_small": StudentSpec("mobilenet_v3_small_gfl", None)})
    input_size: int = _range(32, 2048, default=128)
    epoch_size: int = _range(1, None, default=1200)  # images drawn per epoch (students and baselines: same budget)
    train: TrainParams = TrainParams()
    augment: AugmentParams = AugmentParams()
    loss: DistillLossParams = DistillLossParams()
    detection_loss: DetectionLossParams = DetectionLossParams()
    segmentation_loss: SegmentationLossParams = SegmentationLossParams()
    pseudo_labels: bool = True  # train on the curated scenario set (accepted + reviewed pseudo-labels)
    rebalance: bool = True  # draw images with the rebalance stage's plan
    hard_negatives: bool = True  # weight the mine stage's hard regions and pixels


@dataclass(frozen=True)
class ExportParams:
    """The ``export`` stage: ONNX, INT8 static quantisation (ONNX Runtime), parity checks, model cards."""

    opset: int = _range(13, 23, default=17)
    calibration_images: int = _range(1, 100_000, default=64)  # scenario pool images for INT8 calibration
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    latency_runs: int = _range(50, 100_000, default=100)  # timed runs after warm-up (median reported)
    latency_warmup: int = _range(1, 10_000, default=10)
    max_parity_map_drop: float = _range(0.0, 100.0, default=0.5)  # FP32 ONNX vs PyTorch, mAP points


@dataclass(frozen=True)
class Params:
    """All sections a stage asked for; sections it did not ask for stay ``None``."""

    data: DataParams | None = None
    teacher: TeacherParams | None = None
    pseudo_label: PseudoLabelParams | None = None
    filter: FilterParams | None = None
    review: ReviewParams | None = None
    rebalance: RebalanceParams | None = None
    mine: MineParams | None = None
    distill: DistillParams | None = None
    export: ExportParams | None = None


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Params)[f.name].__args__[0] for f in dataclasses.fields(Params)}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, file: str, meta: typing.Mapping[str, Any]) -> Any:
    def fail(extra: str = "") -> typing.NoReturn:
        raise ParamsError(
            f"{file}: key '{key}': expected {_describe(tp)}{extra}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return from_dict(tp, value, file=file, prefix=key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, file, meta)
            except ParamsError as err:
                errors.append(err)
        if len(errors) == 1:  # Optional[X]: X's own message (it names the allowed range) is the useful one
            raise ParamsError(f"{errors[0]} (or null)")
        fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        (inner, *_) = typing.get_args(tp)
        items = [_convert(v, inner, f"{key}[{i}]", file, meta) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            fail()
        return {_convert(k, kt, key, file, {}): _convert(v, vt, f"{key}.{k}", file, meta) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        value = float(value)
        if value != value:  # NaN
            fail()
    elif tp is str:
        if not isinstance(value, str):
            fail()
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported params field type {tp!r} for key {key}")
    lo, hi = meta.get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        fail(" " + bounds)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        fail(f" among {list(choices)}")
    return value


def from_dict(cls: type, data: dict[str, Any], *, file: str = "<params>", prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from ``data``, refusing unknown keys and bad values.

    Args:
        cls: A dataclass type whose fields carry type hints (and optional ``range``/``choices`` metadata).
        data: The mapping read from YAML.
        file: File name used in error messages.
        prefix: Dotted key of ``data`` inside the file, used in error messages.

    Returns:
        An instance of ``cls``; missing keys take the field defaults.

    Raises:
        ParamsError: On an unknown key, a wrong type or an out-of-range value.

    Example:
        >>> from_dict(DemoParams, {"seed": 3}).seed
        3
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ParamsError(
            f"{file}: unknown key '{_join(prefix, unknown[0])}' in {where}; allowed keys: {', '.join(fields)}"
        )
    kwargs = {
        name: _convert(value, hints[name], _join(prefix, name), file, fields[name].metadata)
        for name, value in data.items()
    }
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def load_params(path: str | Path = "params.yaml", sections: typing.Iterable[str] | None = None) -> Params:
    """Load and validate the named sections of a params file.

    Args:
        path: The YAML file (normally ``params.yaml``, or a profile such as ``profiles/bccd.yaml``).
        sections: Section names to load; ``None`` loads every known section present in the file. Top-level
            keys that are not sections of :class:`Params` are refused.

    Returns:
        A :class:`Params` whose requested sections are filled in (defaults where the file omits them).

    Raises:
        ParamsError: The file is missing or not a mapping, or a key/value is invalid.
        FileNotFoundError: ``path`` does not exist.

    Example:
        >>> load_params("params.yaml", ["data"]).data.source  # doctest: +SKIP
        'demo'
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown key '{unknown[0]}' at the top level; allowed sections: {', '.join(SECTIONS)}")
    wanted = list(SECTIONS) if sections is None else list(sections)
    loaded: dict[str, Any] = {}
    for name in wanted:
        if name not in SECTIONS:
            raise ValueError(f"unknown params section {name!r}; known: {', '.join(SECTIONS)}")
        value = raw.get(name, {}) or {}
        if not isinstance(value, dict):
            raise ParamsError(f"{path}: key '{name}': expected a mapping, got {value!r} ({type(value).__name__})")
        loaded[name] = from_dict(SECTIONS[name], value, file=str(path), prefix=name)
    return Params(**loaded)
