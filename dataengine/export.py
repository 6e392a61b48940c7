"""Deployment export: ONNX graphs with box decoding inside, INT8 static quantisation, and CPU latency.

The exported graph's contract (format ``dataengine-onnx-v1``):

- input ``images``: float32 ``[B, 3, S, S]``, RGB in ``[0, 1]``, letterboxed at the **top-left** of the square canvas
  with the ImageNet-mean fill (:func:`letterbox_input`, the evaluation letterbox of
  :mod:`dataengine.data.transforms`); the graph normalises with the model's own mean/std. ``B`` is dynamic, ``S``
  is fixed (the anchor grid is folded into the graph as a constant).
- outputs, each only when its head exists: ``boxes`` ``[B, N, 4]`` decoded ``xyxy`` in input pixels (expectation of
  the GFL side distributions, not clipped), ``scores`` ``[B, N, K]`` sigmoid scores, ``seg_probs``
  ``[B, K + 1, S/4, S/4]`` softmax over background + ``K`` classes.
- ``metadata_props``: ``format``, ``class_names`` (JSON), ``input_size``, ``mean``/``std`` (JSON), ``model_config``
  (JSON), ``outputs`` (JSON list), ``precision`` (``fp32`` | ``int8``), ``letterbox`` (``top-left``).

NMS is not in the graph: :func:`postprocess_dense` is the one implementation for ONNX outputs and for PyTorch
(:func:`dense_outputs`), with the semantics of :meth:`MultiTaskDetSeg.postprocess`. Keeping NMS out keeps every
output shape static (ONNX ``NonMaxSuppression`` returns a data-dependent number of indices, which mobile converters
handle unevenly) and lets a deployment use its runtime's own NMS with these semantics.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The torch.export-based exporter (the
default since torch 2.9) needs ``onnxscript``, takes ~10x longer, and emits opset 18 at least: asked for
``params.export.opset`` 17 it failed to down-convert this graph (ONNX version converter, ``axes`` input of
ReduceMean). The legacy exporter honours the opset; its tracer warnings about shape-dependent Python values are
expected, because ``S`` is fixed by design.

Example:
    >>> from dataengine.models import create_model
    >>> model = create_model("mobilenet_v3_small_gfl", num_classes=2, input_size=64).eval()
    >>> model.class_names = ["cat", "dog"]
    >>> export_onnx(model, "/tmp/m.onnx", input_size=64)  # doctest: +SKIP
    >>> read_onnx_metadata("/tmp/m.onnx")["class_names"]  # doctest: +SKIP
    ['cat', 'dog']
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import yaml
from google.protobuf.message import DecodeError
from PIL import Image, ImageOps
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import batched_nms
from torchvision.transforms import v2

from dataengine.config import ExportParams
from dataengine.data.images import read_image
from dataengine.data.transforms import IMAGE_FILL, Letterbox, letterbox_params
from dataengine.engine.checkpoint import CheckpointError
from dataengine.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "CARD_FORMAT",
    "INPUT_NAME",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "LetterboxInfo",
    "ParityError",
    "dense_outputs",
    "dvc_lock_versions",
    "export_onnx",
    "export_student",
    "git_commit",
    "letterbox_input",
    "load_rgb",
    "onnx_latency_ms",
    "parse_onnx_metadata",
    "postprocess_dense",
    "quantize_int8",
    "read_onnx_metadata",
    "semantic_labels",
    "sha256_file",
]

ONNX_FORMAT = "dataengine-onnx-v1"
"""``metadata_props["format"]`` of every exported graph; another value is refused rather than misread."""
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "seg_probs")

ImageInput = str | Path | Image.Image | np.ndarray
CalibrationMethod = Literal["minmax", "entropy", "percentile"]


# --------------------------------------------------------------------------------------------------------------
# Input contract: RGB uint8 -> top-left letterbox, float [0, 1]
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterboxInfo:
    """Where an image went in the letterbox: ``letterboxed = original * scale + pad``."""

    orig_h: int
    orig_w: int
    scale: float
    pad_x: int
    pad_y: int


def load_rgb(image: ImageInput) -> np.ndarray:
    """An image path, PIL image or ``[H, W, 3]`` uint8 array as ``[H, W, 3]`` uint8 RGB (EXIF orientation applied).

    Raises:
        dataengine.data.images.ImageReadError: An unreadable, missing or truncated file (names the file).
        ValueError: An array that is not ``[H, W, 3]`` uint8, or another type.

    Example:
        >>> load_rgb(np.zeros((2, 3, 3), np.uint8)).shape
        (2, 3, 3)
    """
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        img = ImageOps.exif_transpose(image)
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"expected an [H, W, 3] uint8 RGB array, got {image.dtype} {image.shape}")
        return image
    raise ValueError(f"expected an image path, a PIL image or an [H, W, 3] uint8 array, got {type(image).__name__}")


def letterbox_input(pixels: np.ndarray, input_size: int) -> tuple[torch.Tensor, LetterboxInfo]:
    """The exported model's input for one ``[H, W, 3]`` uint8 image: float32 ``[3, S, S]`` in [0, 1].

    The same transform as evaluation and pseudo-labelling (:class:`~dataengine.data.transforms.Letterbox`: longest
    side to ``S``, antialiased bilinear, top-left, ImageNet-mean fill), so exported and PyTorch numbers agree.

    Example:
        >>> x, info = letterbox_input(np.zeros((50, 100, 3), np.uint8), 64)
        >>> tuple(x.shape), info.scale
        ((3, 64, 64), 0.64)
    """
    h, w = pixels.shape[:2]
    scale, pad_x, pad_y = letterbox_params(h, w, input_size)
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):  # torch.from_numpy wants a writable array
        pixels = np.array(pixels, order="C")
    transform = v2.Compose([Letterbox(input_size), v2.ToDtype(torch.float32, scale=True)])
    image = transform(tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1)))
    return image.as_subclass(torch.Tensor), LetterboxInfo(h, w, scale, pad_x, pad_y)


# --------------------------------------------------------------------------------------------------------------
# Dense outputs (the graph) and their post-processing (outside the graph)
# --------------------------------------------------------------------------------------------------------------


def dense_outputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the exported graph computes: decoded boxes, sigmoid scores and softmax seg probabilities.

    Args:
        model: A :class:`~dataengine.models.MultiTaskDetSeg` (eval mode).
        images: Float ``[B, 3, S, S]`` in [0, 1].

    Returns:
        ``boxes`` ``[B, N, 4]`` xyxy input pixels and ``scores`` ``[B, N, K]`` with detection; ``seg_probs``
        ``[B, K + 1, S/4, S/4]`` with segmentation.
    """
    out = model(images)
    dense: dict[str, torch.Tensor] = {}
    if getattr(model, "detection", False):
        dense["boxes"] = model.decode_boxes(out)  # [B, N, 4]
        dense["scores"] = out["cls_logits"].float().sigmoid()  # [B, N, K]
    if getattr(model, "segmentation", False):
        dense["seg_probs"] = out["seg_logits"].float().softmax(1)  # [B, K+1, S/4, S/4]
    return dense


_MODEL_SCOPE = "model"  # attribute name of the wrapped network: the ONNX node-name scope of model.forward


class _DenseGraph(nn.Module):
    """:func:`dense_outputs` as a tuple in :data:`OUTPUT_NAMES` order, for tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # named _MODEL_SCOPE

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dense = dense_outputs(self.model, images)
        return tuple(dense[name] for name in OUTPUT_NAMES if name in dense)


@torch.no_grad()
def postprocess_dense(
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    *,
    score_threshold: float = 0.05,
    nms_iou: float = 0.6,
    max_detections: int = 100,
    pre_nms_topk: int = 1000,
    image_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Class-wise NMS over dense decoded boxes and scores: :meth:`MultiTaskDetSeg.postprocess` for any backend.

    Per image, the (location, class) pairs scoring above ``score_threshold`` are ranked, the best ``pre_nms_topk``
    enter torchvision's ``batched_nms`` (one NMS per class) and the best ``max_detections`` survivors are kept.

    Args:
        boxes: ``[B, N, 4]`` xyxy input pixels (ONNX ``boxes`` or :func:`dense_outputs`).
        scores: ``[B, N, K]`` sigmoid scores.
        score_threshold: Minimum score (strictly greater).
        nms_iou: IoU above which a lower-scored box of the same class is suppressed.
        max_detections: Boxes kept per image.
        pre_nms_topk: Candidates per image entering NMS.
        image_size: ``(H, W)`` to clip candidate boxes to before NMS (the model clips to its input); ``None``: no clip.

    Returns:
        Per image ``boxes`` float32 ``[M, 4]``, ``scores`` ``[M]`` sorted descending, ``labels`` int64 ``[M]`` in
        ``[0, K)``; NumPy arrays when ``boxes`` is a NumPy array, tensors otherwise.

    Raises:
        ValueError: Shapes that are not ``[B, N, 4]`` and ``[B, N, K]``.

    Example:
        >>> b = np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]], np.float32)
        >>> s = np.array([[[0.9], [0.8], [0.7]]], np.float32)
        >>> det = postprocess_dense(b, s, score_threshold=0.5)[0]  # box 1 overlaps box 0: suppressed
        >>> det["boxes"].tolist(), det["labels"].tolist()
        ([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]], [0, 0])
    """
    as_numpy = isinstance(boxes, np.ndarray)
    boxes_t = torch.as_tensor(boxes).float()
    scores_t = torch.as_tensor(scores).float()
    if boxes_t.ndim != 3 or boxes_t.shape[-1] != 4 or scores_t.ndim != 3 or scores_t.shape[:2] != boxes_t.shape[:2]:
        raise ValueError(f"expected boxes [B, N, 4] and scores [B, N, K], got {tuple(boxes_t.shape)} and "
                         f"{tuple(scores_t.shape)}")
    k = scores_t.shape[-1]
    results = []
    for image_scores, image_boxes in zip(scores_t, boxes_t):
        flat = image_scores.flatten()  # [N * K]
        keep = (flat > score_threshold).nonzero().squeeze(1)
        keep = keep[flat[keep].topk(min(pre_nms_topk, keep.numel())).indices]
        cand_boxes = image_boxes[keep // k]  # [C, 4] (a copy: clamped in place below)
        if image_size is not None:
            cand_boxes[:, 0::2] = cand_boxes[:, 0::2].clamp(0, image_size[1])
            cand_boxes[:, 1::2] = cand_boxes[:, 1::2].clamp(0, image_size[0])
        cand_scores, cand_labels = flat[keep], keep % k
        kept = batched_nms(cand_boxes, cand_scores, cand_labels, nms_iou)[:max_detections]
        det = {"boxes": cand_boxes[kept], "scores": cand_scores[kept], "labels": cand_labels[kept]}
        results.append({key: v.numpy() for key, v in det.items()} if as_numpy else det)
    return results


def semantic_labels(seg_probs: torch.Tensor | np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """Per-pixel classes ``[B, H, W]`` (uint8) from ``seg_probs`` ``[B, K + 1, h, w]`` bilinearly upsampled to ``size``.

    Interpolates log-probabilities: ``log softmax(z) = z - logsumexp(z)`` and bilinear interpolation is linear, so
    the argmax equals that of :meth:`MultiTaskDetSeg.semantic_probs` (which interpolates the logits) although the
    graph outputs probabilities.
    """
    h, w = (size, size) if isinstance(size, int) else size
    probs = torch.as_tensor(seg_probs).float()
    log_probs = probs.clamp_min(torch.finfo(torch.float32).tiny).log()
    log_probs = F.interpolate(log_probs, size=(h, w), mode="bilinear", align_corners=False)
    return log_probs.argmax(1).to(torch.uint8)


# --------------------------------------------------------------------------------------------------------------
# ONNX export and metadata
# --------------------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: int,
    opset: int = 17,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Export a :class:`~dataengine.models.MultiTaskDetSeg` to ONNX (decoding in the graph, no NMS), atomically.

    Args:
        model: The model; put in eval mode for the export and restored afterwards.
        path: Target ``.onnx`` file (written via a temporary file and a rename).
        input_size: Square input side ``S`` (fixed in the graph; the batch is dynamic).
        opset: ONNX opset (``params.export.opset``).
        class_names: Class names for the metadata; default ``model.class_names`` (set by checkpoint loaders).

    Returns:
        ``path``.

    Raises:
        ValueError: No class names, or a number of them that differs from the model's classes.

    Example:
        >>> export_onnx(model, "models/students/x/model.onnx", input_size=128)  # doctest: +SKIP
    """
    path = Path(path)
    names = list(class_names if class_names is not None else (getattr(model, "class_names", None) or []))
    if len(names) != model.num_classes:
        raise ValueError(f"export {path}: need {model.num_classes} class names for the ONNX metadata, got {names}")
    dummy = torch.rand(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    graph = _DenseGraph(model)
    outputs = [name for name in OUTPUT_NAMES if name in dense_outputs(model, dummy)]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # Expected: the deprecation notice of the TorchScript exporter (see the module docstring) and tracer
            # warnings about Python ints taken from shapes (S is fixed in the graph on purpose).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
            torch.onnx.export(graph, (dummy,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    props = {
        "format": ONNX_FORMAT,
        "class_names": json.dumps(names),
        "input_size": str(int(input_size)),
        "mean": json.dumps([float(v) for v in model.mean.flatten()]),
        "std": json.dumps([float(v) for v in model.std.flatten()]),
        "model_config": json.dumps(model.config),
        "outputs": json.dumps(outputs),
        "precision": "fp32",
        "letterbox": "top-left",
        "input_range": "[0, 1] RGB",
    }
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def parse_onnx_metadata(props: Mapping[str, str], path: str | Path = "<onnx>") -> dict[str, Any]:
    """Validate and decode an exported graph's ``metadata_props``.

    Returns:
        ``format``, ``class_names`` (list), ``input_size`` (int), ``mean``/``std`` (lists), ``model_config`` (dict),
        ``outputs`` (list), ``precision`` and the remaining keys as strings.

    Raises:
        CheckpointError: Not a dataengine export (missing or other ``format``) or undecodable values; names ``path``.
    """
    if props.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{path}: not a dataengine ONNX export (metadata format {props.get('format')!r}, "
                              f"expected {ONNX_FORMAT!r})")
    meta: dict[str, Any] = dict(props)
    try:
        for key in ("class_names", "mean", "std", "model_config", "outputs"):
            meta[key] = json.loads(props[key])
        meta["input_size"] = int(props["input_size"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: broken dataengine ONNX metadata ({type(err).__name__}: {err})") from None
    return meta


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """:func:`parse_onnx_metadata` of a file (weights are not needed and not loaded as data).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Not a readable ONNX file, or not a dataengine export.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or not an ONNX model ({err})") from None
    return parse_onnx_metadata({p.key: p.value for p in proto.metadata_props}, path)


# --------------------------------------------------------------------------------------------------------------
# INT8 static quantisation (ONNX Runtime)
# --------------------------------------------------------------------------------------------------------------


class _LetterboxReader:
    """ONNX Runtime ``CalibrationDataReader``: one letterboxed ``[1, 3, S, S]`` image per call, like inference."""

    def __init__(self, images: Sequence[ImageInput], input_size: int) -> None:
        self.images, self.input_size, self.index = list(images), input_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.images):
            return None
        pixels = load_rgb(self.images[self.index])
        self.index += 1
        return {INPUT_NAME: letterbox_input(pixels, self.input_size)[0][None].numpy()}

    def rewind(self) -> None:  # called by ORT between calibration passes on some versions
        self.index = 0


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: Sequence[ImageInput],
    *,
    input_size: int,
    method: CalibrationMethod = "minmax",
    per_channel: bool = True,
) -> Path:
    """Static INT8 quantisation (ONNX Runtime, QDQ format: uint8 activations, int8 weights), atomically.

    The graph first goes through ``quant_pre_process`` (ONNX shape inference + ORT graph optimisation, which
    folds BatchNorm and fuses patterns so that quantisation sees the runtime's ops). Activations are calibrated on
    ``calibration_images`` letterboxed exactly as at inference. Metadata is copied from the FP32 graph with
    ``precision`` = ``int8`` and the calibration settings.

    Whether INT8 is faster than FP32 depends on the CPU: with AVX512-VNNI / AVX-VNNI (this machine has both)
    ORT's u8s8 convolutions run on int8 dot-product instructions; without them the Q/DQ overhead around each
    convolution can make INT8 *slower*. Depthwise convolutions (MobileNets) gain less than dense ones, and the
    FP32 ops left between QDQ pairs (sigmoid, softmax, decoding) do not speed up at all: measure with
    :func:`onnx_latency_ms` rather than assume. Measured here (1 thread, 128 px, ORT 1.32): the ResNet-18 demo
    teacher 8.0 ms FP32 -> 2.4-2.6 ms INT8 at the same mAP (0.385; minmax, per-channel, 64 pool images);
    mobilenet_v2_gfl 2.1 -> 1.2 ms, mobilenet_v3_large_gfl 1.9 -> 1.6 ms, mobilenet_v3_small_gfl 1.1 -> 1.1 ms
    (0.08 GFLOPs: hard-swish, squeeze-excitation and depthwise layers dominate, not the int8 GEMMs). With ORT 1.32,
    ``entropy`` calibration produced exactly the scales of ``minmax`` on that graph; ``percentile`` differs.

    Args:
        fp32_path: A graph from :func:`export_onnx`.
        out_path: Target file (``model.int8.onnx``).
        calibration_images: Paths, PIL images or ``[H, W, 3]`` uint8 arrays (``params.export.calibration_images``
            scenario pool images).
        input_size: The graph's ``S``.
        method: ``minmax`` | ``entropy`` | ``percentile`` (ORT's ``CalibrationMethod``).
        per_channel: Per-output-channel weight scales (better accuracy for depthwise convolutions).

    Returns:
        ``out_path``.

    Raises:
        ValueError: No calibration images or an unknown method.
        CheckpointError: ``fp32_path`` is not a dataengine ONNX export.
    """
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": OrtMethod.MinMax, "entropy": OrtMethod.Entropy, "percentile": OrtMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(methods)}")
    if not calibration_images:
        raise ValueError(f"quantize {out_path}: no calibration images")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    meta = read_onnx_metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix="dataengine-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ORT's symbolic shape inference asserts on the batch-dynamic Reshape of the box decoding (a Reshape whose
        # shape input it cannot prove literal); ONNX's own shape inference handles every op here, so use that alone.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # The decoding after the network (softmax over the box bins, their expectation, sigmoid, seg softmax) stays
        # FP32: quantising the bin probabilities to 1/255 steps and the bin indices to int8 cost 1.7 mAP points
        # (AP75, not AP50) on the demo teacher, for no speed (a few element-wise ops). Those nodes are the ones
        # traced outside ``model.forward`` (see _DenseGraph), i.e. not under the "/model/" scope.
        tail = [node.name for node in onnx.load(str(prepared), load_external_data=False).graph.node
                if node.name and not node.name.startswith(f"/{_MODEL_SCOPE}/")]
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), _LetterboxReader(calibration_images, input_size),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method], nodes_to_exclude=tail)
        proto = onnx.load(str(quantized))
    props = {key: (value if isinstance(value, str) else json.dumps(value)) for key, value in meta.items()}
    props["input_size"] = str(meta["input_size"])
    props.update({"precision": "int8", "calibration_method": method, "per_channel": json.dumps(per_channel),
                  "calibration_images": str(len(calibration_images))})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    atomic_write_bytes(out_path, proto.SerializeToString())
    return out_path


# --------------------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------------------


def onnx_latency_ms(path: str | Path, *, input_size: int, runs: int = 100, warmup: int = 10) -> float:
    """Median wall time (ms) of one batch-1 inference with ONNX Runtime on one CPU thread, after warm-up.

    One intra-op and one inter-op thread, sequential execution, full graph optimisation: the setting of a phone
    core, and the one least disturbed by other processes on a shared machine. Decoding is included, NMS is not.

    Example:
        >>> onnx_latency_ms("models/students/mobilenet_v3_small/model.onnx", input_size=128)  # doctest: +SKIP
        3.1
    """
    import onnxruntime as ort

    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: np.random.default_rng(0).random((1, 3, input_size, input_size), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


# --------------------------------------------------------------------------------------------------------------
# The export stage: ONNX + INT8 + parity + model card
# --------------------------------------------------------------------------------------------------------------

CARD_FORMAT = "dataengine-model-card-v1"


class ParityError(ValueError):
    """The FP32 ONNX graph scores more than ``max_parity_map_drop`` mAP points below the PyTorch model."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dvc_lock_versions(lock_path: str | Path, stage: str) -> dict[str, Any]:
    """What DVC recorded for ``stage`` in ``dvc.lock``: dep and out md5s and the params it ran with.

    Returns:
        ``{"dvc_stage", "deps": {path: md5}, "outs": {path: md5}, "params": {file: {key: value}}}``; when the lock
        file or the stage is missing, the same keys set to ``None`` plus a ``note`` saying why.

    Example:
        >>> dvc_lock_versions("/nonexistent/dvc.lock", "distill@x")["note"]
        'no /nonexistent/dvc.lock'
    """
    empty = {"dvc_stage": None, "deps": None, "outs": None, "params": None}
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {**empty, "note": f"no {lock_path}"}
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        return {**empty, "note": f"{lock_path} is not valid YAML ({type(err).__name__})"}
    entry = (lock.get("stages") or {}).get(stage) if isinstance(lock, dict) else None
    if not isinstance(entry, dict):
        return {**empty, "note": f"{lock_path} has no stage {stage!r} (not run through `dvc repro` yet)"}

    def md5s(items: Any) -> dict[str, Any]:
        return {item["path"]: item.get("md5") for item in items or [] if isinstance(item, dict) and "path" in item}

    return {"dvc_stage": stage, "deps": md5s(entry.get("deps")), "outs": md5s(entry.get("outs")),
            "params": entry.get("params")}


def git_commit(cwd: str | Path = ".") -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (with ``-dirty`` when tracked files are modified), or ``None`` without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _points_drop(reference: float | None, other: float | None) -> float | None:
    return None if reference is None or other is None else round((reference - other) * 100.0, 3)


def export_student(
    student_dir: str | Path,
    *,
    teacher: str | Path,
    data_root: str | Path,
    params: ExportParams,
    lock_path: str | Path = "dvc.lock",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a trained student: ``model.onnx``, ``model.int8.onnx`` and ``card.json`` in ``student_dir``.

    Calibration uses the first ``params.calibration_images`` scenario pool images (sorted paths); metrics come from
    the labelled scenario test set for PyTorch (:func:`dataengine.inference.evaluate_model`), FP32 and INT8 ONNX
    (:func:`dataengine.predictor.evaluate_predictor`, the same protocol). The card is written even when parity
    fails, so the numbers can be inspected.

    Args:
        student_dir: ``models/students/<name>`` holding ``model.pt``.
        teacher: Teacher checkpoint (its SHA-256 goes in the card).
        data_root: Prepared data root (:class:`~dataengine.data.layout.PreparedLayout`).
        params: The ``export`` params section.
        lock_path: ``dvc.lock`` to read the ``distill@<name>`` stage's md5s from (missing: ``null`` + a note).
        log: Progress messages (e.g. ``print`` to stderr).

    Returns:
        The card.

    Raises:
        ParityError: FP32 ONNX mAP more than ``params.max_parity_map_drop`` points below PyTorch (after writing).
        CheckpointError: Unreadable student checkpoint, or classes that differ from the test set's.
        ValueError: No pool images to calibrate on.
    """
    from dataengine.data.coco import CategoryMap, load_coco
    from dataengine.data.images import list_images
    from dataengine.data.layout import PreparedLayout
    from dataengine.engine.checkpoint import load_model
    from dataengine.inference import evaluate_model
    from dataengine.models import count_gflops, count_params_m, create_model
    from dataengine.predictor import evaluate_predictor, load_student

    say = log or (lambda _: None)
    student_dir, layout = Path(student_dir), PreparedLayout(data_root)
    name = student_dir.name
    test = load_coco(layout.test_json)
    classes = list(CategoryMap.from_coco(test).names)
    model, ckpt = load_model(student_dir / "model.pt", lambda config: create_model(**config), class_names=classes)
    size = int(ckpt["input_size"])
    onnx_path, int8_path = student_dir / "model.onnx", student_dir / "model.int8.onnx"

    say(f"export: {name}: ONNX opset {params.opset} -> {onnx_path}")
    export_onnx(model, onnx_path, input_size=size, opset=params.opset, class_names=ckpt["class_names"])
    pool = list_images(layout.pool_images)[: params.calibration_images]
    if not pool:
        raise ValueError(f"no scenario pool images in {layout.pool_images} to calibrate INT8 on")
    say(f"export: {name}: INT8 ({params.calibration_method}, per_channel={params.per_channel}, {len(pool)} pool "
        f"images) -> {int8_path}")
    quantize_int8(onnx_path, int8_path, [layout.pool_images / p for p in pool], input_size=size,
                  method=params.calibration_method, per_channel=params.per_channel)

    say(f"export: {name}: evaluating PyTorch, FP32 and INT8 ONNX on {layout.test_json}")
    metrics = {"pytorch": evaluate_model(model, test, layout.test_images, input_size=size)}
    for key, path in (("onnx_fp32", onnx_path), ("onnx_int8", int8_path)):
        metrics[key] = evaluate_predictor(load_student(path, expected_classes=classes), test, layout.test_images)
    drop_fp32 = _points_drop(metrics["pytorch"].get("mAP"), metrics["onnx_fp32"].get("mAP"))
    drop_int8 = _points_drop(metrics["pytorch"].get("mAP"), metrics["onnx_int8"].get("mAP"))
    passed = drop_fp32 is None or drop_fp32 <= params.max_parity_map_drop

    say(f"export: {name}: latency ({params.latency_runs} runs after {params.latency_warmup}, 1 thread)")
    latency = {key: round(onnx_latency_ms(path, input_size=size, runs=params.latency_runs,
                                          warmup=params.latency_warmup), 3)
               for key, path in (("fp32", onnx_path), ("int8", int8_path))}
    card = {
        "format": CARD_FORMAT,
        "name": name,
        "classes": list(ckpt["class_names"]),
        "input_size": size,
        "normalisation": {"mean": ckpt["mean"], "std": ckpt["std"], "input_range": [0.0, 1.0], "color": "RGB",
                          "layout": "NCHW float32", "applied_inside_model": True,
                          "letterbox": f"longest side resized to {size} (antialiased bilinear), placed top-left, "
                                       f"padded right/bottom with RGB {list(IMAGE_FILL)}; boxes map back by "
                                       f"dividing by scale = {size} / max(h, w)"},
        "model_config": ckpt["model_config"],
        "outputs": {"boxes": "[B, N, 4] xyxy input pixels (decoded, not clipped)", "scores": "[B, N, K] sigmoid",
                    "seg_probs": "[B, K+1, S/4, S/4] softmax, class 0 = background",
                    "nms": "not in the graph: class-wise NMS as dataengine.export.postprocess_dense (IoU 0.6)"},
        "files": {key: {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
                  for key, path in (("pt", student_dir / "model.pt"), ("onnx", onnx_path), ("int8", int8_path))},
        "export": {"opset": params.opset, "calibration_images": len(pool), "calibration_source": "scenario/pool",
                   "calibration_method": params.calibration_method, "per_channel": params.per_channel,
                   "int8_format": "QDQ, uint8 activations, int8 weights; decoding kept FP32"},
        "metrics": {"test_set": str(layout.test_json), "num_images": len(test["images"]), **metrics},
        "parity": {"map_drop_fp32_points": drop_fp32, "map_drop_int8_points": drop_int8,
                   "max_map_drop_fp32_points": params.max_parity_map_drop, "passed": passed},
        "latency_ms": latency["fp32"],
        "latency_ms_int8": latency["int8"],
        "latency": {"runtime": "onnxruntime CPUExecutionProvider", "intra_op_threads": 1, "inter_op_threads": 1,
                    "batch": 1, "statistic": "median", "runs": params.latency_runs, "warmup": params.latency_warmup,
                    "includes": "the graph (decoding); not letterbox or NMS"},
        "params_m": round(count_params_m(model), 4),
        "gflops": round(count_gflops(model, size), 4),
        "teacher": {"path": str(teacher), "sha256": sha256_file(teacher)},
        "versions": {**dvc_lock_versions(lock_path, f"distill@{name}"), "git_commit": git_commit()},
    }
    atomic_write_json(student_dir / "card.json", card)
    if not passed:
        raise ParityError(f"{onnx_path}: FP32 ONNX mAP is {drop_fp32} points below PyTorch "
                          f"({metrics['onnx_fp32']['mAP']} vs {metrics['pytorch']['mAP']}), more than "
                          f"export.max_parity_map_drop = {params.max_parity_map_drop}; see {student_dir / 'card.json'}")
    return card
