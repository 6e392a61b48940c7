"""Use a trained student: one ``Predictor`` for the PyTorch checkpoint, the FP32 ONNX graph and the INT8 graph.

Every backend runs the same pipeline: letterbox (:func:`dataengine.export.letterbox_input`) -> dense outputs
(decoded boxes, sigmoid scores, softmax seg probabilities: the exported graph, or
:func:`dataengine.export.dense_outputs` in PyTorch) -> :func:`dataengine.export.postprocess_dense` (class-wise NMS)
-> boxes and mask mapped back to the **original** image. So the three backends differ only by their numerics.

Checkpoints load only through :func:`dataengine.engine.checkpoint.load_model` (``torch.load(weights_only=True)``):
a ``.pt`` that holds pickled code is refused, never run. Problems with a model file are
:class:`~dataengine.engine.checkpoint.CheckpointError` (a ``ValueError``) naming the file and what was expected.

Example:
    >>> from dataengine import load_student
    >>> predictor = load_student("models/students/mobilenet_v3_small", backend="int8")  # doctest: +SKIP
    >>> pred = predictor.predict(["photo.jpg"], score_threshold=0.3)[0]  # doctest: +SKIP
    >>> pred["boxes"].shape, pred["class_names"][:1], pred["mask"].shape  # doctest: +SKIP
    ((3, 4), ['circle'], (480, 640))

Command line (COCO results JSON, RLE masks)::

    $ dataengine predict --model models/students/mobilenet_v3_small photos/ --out preds.json --backend onnx
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataengine.boxes import clip_xyxy, xyxy_to_coco
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.dataset import CocoDetectionSegDataset, collate, stack_semantic
from dataengine.data.images import IMAGE_EXTENSIONS, list_images
from dataengine.data.transforms import build_transforms, letterbox_params, unletterbox_boxes, unletterbox_mask
from dataengine.engine.checkpoint import CheckpointError, check_compatible, load_model
from dataengine.evaluation import SegmentationMeter, evaluate_detection
from dataengine.export import (
    INPUT_NAME,
    ImageInput,
    letterbox_input,
    load_rgb,
    parse_onnx_metadata,
    postprocess_dense,
    semantic_labels,
)
from dataengine.io import atomic_write_json

__all__ = [
    "BACKENDS",
    "ModelNotFoundError",
    "Predictor",
    "coco_results",
    "evaluate_predictor",
    "load_student",
    "predict_cli",
]

BACKENDS = {"pt": "model.pt", "onnx": "model.onnx", "int8": "model.int8.onnx"}
"""Backend name -> file name inside a student directory (``models/students/<name>/``)."""

_CHECKPOINT_SUFFIXES = (".pt", ".pth")


class ModelNotFoundError(FileNotFoundError, CheckpointError):
    """The model file (or the backend's file in a student directory) does not exist."""


DenseFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class Predictor:
    """A loaded student: letterbox, run, NMS, map back to the original image. Build it with :func:`load_student`.

    Attributes:
        path: The model file.
        backend: ``pt``, ``onnx`` or ``int8``.
        class_names: Label ``i`` is ``class_names[i]``.
        input_size: Square input side ``S``.
        mean, std: The model's normalisation (applied inside the model; inputs are RGB in [0, 1]).
        model_config: Architecture (``create_model(**model_config)``).
        detection, segmentation: Which heads exist.
    """

    def __init__(self, dense_fn: DenseFn, *, path: Path, backend: str, class_names: Sequence[str], input_size: int,
                 mean: Sequence[float], std: Sequence[float], model_config: dict[str, Any]) -> None:
        self._dense_fn = dense_fn
        self.path, self.backend = path, backend
        self.class_names, self.input_size = list(class_names), int(input_size)
        self.mean, self.std, self.model_config = list(mean), list(std), dict(model_config)
        self.detection = bool(model_config.get("detection", True))
        self.segmentation = bool(model_config.get("segmentation", True))

    def __repr__(self) -> str:
        return (f"Predictor({str(self.path)!r}, backend={self.backend!r}, classes={self.class_names}, "
                f"input_size={self.input_size})")

    def dense(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The exported graph's outputs (``boxes``, ``scores``, ``seg_probs``) for letterboxed ``[B, 3, S, S]``."""
        return self._dense_fn(images)

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        score_threshold: float = 0.3,
        batch_size: int = 8,
        nms_iou: float = 0.6,
        max_detections: int = 100,
    ) -> list[dict[str, Any]]:
        """Detections and semantic masks in original image coordinates.

        Args:
            images: Image paths, PIL images or ``[H, W, 3]`` uint8 RGB arrays (any mix, any sizes).
            score_threshold: Minimum detection score.
            batch_size: Images per forward pass.
            nms_iou: Class-wise NMS IoU.
            max_detections: Boxes kept per image.

        Returns:
            Per image: ``boxes`` float32 ``[M, 4]`` xyxy original pixels (clipped to the image), ``scores`` float32
            ``[M]`` (descending), ``labels`` int64 ``[M]`` (0-based), ``class_names`` (one per box), ``mask``
            uint8 ``[H, W]`` (0 background, ``label + 1``) or ``None`` without a segmentation head. ``M`` may be 0.

        Raises:
            dataengine.data.images.ImageReadError: An unreadable image (names the file).
            ValueError: An array that is not ``[H, W, 3]`` uint8, or ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            inputs = [letterbox_input(load_rgb(image), self.input_size) for image in images[start:start + batch_size]]
            dense = self.dense(torch.stack([x for x, _ in inputs]))  # [B, 3, S, S] in
            dets = (postprocess_dense(dense["boxes"], dense["scores"], score_threshold=score_threshold,
                                      nms_iou=nms_iou, max_detections=max_detections,
                                      image_size=(self.input_size, self.input_size))
                    if self.detection else [None] * len(inputs))
            labels_map = semantic_labels(dense["seg_probs"], self.input_size) if self.segmentation else None
            for i, ((_, info), det) in enumerate(zip(inputs, dets)):
                if det is None:
                    boxes, scores, labels = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
                else:
                    boxes = clip_xyxy(unletterbox_boxes(det["boxes"], info.scale, info.pad_x, info.pad_y),
                                      info.orig_w, info.orig_h)  # [M, 4]
                    scores, labels = det["scores"], det["labels"]
                mask = None
                if labels_map is not None:
                    mask = unletterbox_mask(labels_map[i], info.orig_h, info.orig_w, info.scale, info.pad_x,
                                            info.pad_y).numpy()  # [H, W]
                results.append({
                    "boxes": boxes.numpy().astype(np.float32),
                    "scores": scores.numpy().astype(np.float32),
                    "labels": labels.numpy().astype(np.int64),
                    "class_names": [self.class_names[int(label)] for label in labels],
                    "mask": mask,
                })
        return results


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _resolve(path: Path, backend: str | None) -> tuple[Path, str]:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if path.is_dir():
        file = path / BACKENDS[backend or "pt"]
        if not file.is_file():
            hint = " (run the export stage to create it)" if backend in ("onnx", "int8") else ""
            raise ModelNotFoundError(f"{file}: student directory {path} has no {backend or 'pt'} model "
                                     f"{BACKENDS[backend or 'pt']}{hint}")
        return file, backend or "pt"
    if not path.exists():
        raise ModelNotFoundError(f"model not found: {path} (expected a student directory, a .pt or a .onnx file)")
    suffix = path.suffix.lower()
    if suffix in _CHECKPOINT_SUFFIXES:
        kind = "pt"
    elif suffix == ".onnx":
        kind = "onnx"
    else:
        raise CheckpointError(f"{path}: unsupported model file suffix {path.suffix!r}; expected a .pt checkpoint, "
                              f"a .onnx export or a student directory")
    if backend is not None and (backend == "pt") != (kind == "pt"):
        raise ValueError(f"{path}: backend {backend!r} does not fit a {suffix} file")
    return path, kind


def _load_torch(path: Path, expected_classes: Sequence[str] | None, device: str) -> Predictor:
    from dataengine.export import dense_outputs
    from dataengine.models import create_model

    model, ckpt = load_model(path, lambda config: create_model(**config), class_names=expected_classes)
    model = model.to(device)

    @torch.inference_mode()
    def dense_fn(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in dense_outputs(model, images.to(device)).items()}

    return Predictor(dense_fn, path=path, backend="pt", class_names=ckpt["class_names"],
                     input_size=ckpt["input_size"], mean=ckpt["mean"], std=ckpt["std"],
                     model_config=ckpt["model_config"])


def _load_onnx(path: Path, expected_classes: Sequence[str] | None, device: str) -> Predictor:
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.Fail) as err:
        raise CheckpointError(f"{path}: corrupt, truncated or not an ONNX model ({str(err).strip()})") from None
    meta = parse_onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
    check_compatible(meta, class_names=expected_classes, path=path)
    names = [o.name for o in session.get_outputs()]

    def dense_fn(images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = session.run(names, {INPUT_NAME: images.numpy().astype(np.float32, copy=False)})
        return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}

    return Predictor(dense_fn, path=path, backend="int8" if meta.get("precision") == "int8" else "onnx",
                     class_names=meta["class_names"], input_size=meta["input_size"], mean=meta["mean"],
                     std=meta["std"], model_config=meta["model_config"])


def load_student(
    path: str | Path,
    *,
    backend: str | None = None,
    expected_classes: Sequence[str] | None = None,
    device: str = "cpu",
) -> Predictor:
    """Load a student (or any dataengine model) for prediction.

    Args:
        path: A student directory (``models/students/<name>/``) or a ``.pt`` / ``.onnx`` file.
        backend: In a directory, which file: ``pt`` (default) -> ``model.pt``, ``onnx`` -> ``model.onnx``,
            ``int8`` -> ``model.int8.onnx``. With a file it may be given but must fit its suffix.
        expected_classes: Refuse a model made for other classes (names in label order).
        device: PyTorch device for ``pt``; ONNX uses the CPU (CUDA when onnxruntime-gpu is installed and
            ``device`` is ``cuda``).

    Returns:
        A :class:`Predictor`.

    Raises:
        ModelNotFoundError: The file does not exist (a ``FileNotFoundError`` and a ``CheckpointError``).
        CheckpointError: Corrupt or truncated file, pickled code in a ``.pt``, an ONNX file that is not a dataengine
            export, a wrong suffix, or other classes than ``expected_classes``; the message names the file.
        ValueError: An unknown backend, or one that does not fit the file.

    Example:
        >>> p = load_student("models/students/mobilenet_v3_small", expected_classes=["a", "b"])  # doctest: +SKIP
    """
    file, kind = _resolve(Path(path), backend)
    if kind == "pt":
        return _load_torch(file, expected_classes, device)
    return _load_onnx(file, expected_classes, device)


# --------------------------------------------------------------------------------------------------------------
# Evaluation (the same numbers as dataengine.inference.evaluate_model, for any backend)
# --------------------------------------------------------------------------------------------------------------


def evaluate_predictor(
    predictor: Predictor,
    coco: dict[str, Any] | str | Path,
    image_root: str | Path,
    *,
    batch_size: int = 16,
    score_threshold: float = 0.05,
    max_detections: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """COCO mAP/AP50/AP75/per-class AP and mIoU of any backend, computed exactly as ``evaluate_model`` does.

    The same dataset transform (evaluation letterbox), thresholds, original-coordinate boxes for pycocotools and
    mIoU at input resolution on the letterboxed target: with the ``pt`` backend the numbers equal
    :func:`dataengine.inference.evaluate_model`'s, so a difference between backends is their numerics alone.

    Raises:
        CheckpointError: The predictor's classes differ from the set's categories.
    """
    coco = load_coco(coco) if not isinstance(coco, dict) else coco
    cats = CategoryMap.from_coco(coco)
    check_compatible({"class_names": predictor.class_names}, class_names=list(cats.names), path=predictor.path)
    size = predictor.input_size
    dataset = CocoDetectionSegDataset(coco, image_root, build_transforms(None, size, train=False), categories=cats)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    meter = SegmentationMeter(len(cats) + 1, ["background", *cats.names]) if (
        predictor.segmentation and dataset.has_masks) else None
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc=f"evaluate {predictor.backend}", unit="batch", disable=not progress,
                                leave=False):
        dense = predictor.dense(images)
        if predictor.detection:
            dets = postprocess_dense(dense["boxes"], dense["scores"], score_threshold=score_threshold,
                                     max_detections=max_detections, image_size=(size, size))
            for det, target in zip(dets, targets):
                h, w = (int(v) for v in target["orig_size"])
                scale, pad_x, pad_y = letterbox_params(h, w, size)
                boxes = clip_xyxy(unletterbox_boxes(det["boxes"], scale, pad_x, pad_y), w, h)  # [M, 4]
                for box, score, label in zip(xyxy_to_coco(boxes).tolist(), det["scores"].tolist(),
                                             det["labels"].tolist()):
                    results.append({"image_id": int(target["image_id"]), "category_id": cats.ids[int(label)],
                                    "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
        if meter is not None:
            meter.update(semantic_labels(dense["seg_probs"], size), stack_semantic(targets))
    metrics: dict[str, Any] = {}
    if predictor.detection:
        det_metrics = evaluate_detection(coco, results)
        metrics.update({k: det_metrics[k] for k in ("mAP", "AP50", "AP75", "per_class_AP")})
    if meter is not None:
        seg = meter.compute()
        metrics.update({"mIoU": seg["mIoU"], "per_class_IoU": seg["per_class_IoU"]})
    return metrics


# --------------------------------------------------------------------------------------------------------------
# `dataengine predict`
# --------------------------------------------------------------------------------------------------------------


def _expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files as given, folders expanded to their images (recursive, sorted); missing paths refused."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend((path / name).as_posix() for name in list_images(path))
        elif path.exists():
            files.append(item)  # whatever its suffix: read_image refuses it by name if it is not an image
        else:
            raise FileNotFoundError(f"image not found: {item}")
    if not files:
        raise ValueError(f"no images in {', '.join(inputs)} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files


def coco_results(predictions: Sequence[dict[str, Any]], file_names: Sequence[str]) -> list[dict[str, Any]]:
    """:meth:`Predictor.predict` output as COCO results: one entry per box, one RLE entry per image and class.

    ``image_id`` is the 1-based position in ``file_names``; ``category_id`` is ``label + 1`` (1-based by class
    order, as the mask values). Box entries: ``bbox`` xywh original pixels and ``score``. Mask entries:
    ``segmentation`` = COCO RLE (``counts`` a str) of the pixels of that class. pycocotools keeps detection and
    segmentation results apart: ``loadRes`` the entries with ``bbox`` and those with ``segmentation`` separately.
    """
    from pycocotools import mask as mask_utils

    entries: list[dict[str, Any]] = []
    for image_id, (pred, name) in enumerate(zip(predictions, file_names), start=1):
        for box, score, label in zip(xyxy_to_coco(pred["boxes"]).tolist(), pred["scores"].tolist(),
                                     pred["labels"].tolist()):
            entries.append({"image_id": image_id, "file_name": name, "category_id": int(label) + 1,
                            "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
        mask = pred["mask"]
        if mask is None:
            continue
        for value in np.unique(mask).tolist():
            if value == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray((mask == value).astype(np.uint8)))
            entries.append({"image_id": image_id, "file_name": name, "category_id": int(value),
                            "segmentation": {"size": [int(s) for s in rle["size"]],
                                             "counts": rle["counts"].decode("ascii")}})
    return entries


def predict_cli(argv: Sequence[str]) -> int:
    """``dataengine predict``: run a student over images and write COCO results JSON; 1 on a bad model or image."""
    parser = argparse.ArgumentParser(
        prog="dataengine predict",
        description="Run a trained student (PyTorch checkpoint, FP32 ONNX or INT8 ONNX) over images and write COCO "
        "results JSON: one entry per box {image_id, file_name, category_id, bbox [x, y, w, h] in original pixels, "
        "score} and, with a segmentation head, one entry per image and present class {image_id, file_name, "
        "category_id, segmentation: COCO RLE}. image_id is the 1-based position in the input order; category_id "
        "is 1-based in the model's class order. Every backend gives the same format.",
        epilog="Example: dataengine predict --model models/students/mobilenet_v3_small photos/ --out preds.json "
        "--backend int8",
    )
    parser.add_argument("--model", required=True, metavar="DIR_OR_FILE",
                        help="student directory (models/students/<name>) or a .pt / .onnx file")
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS",
                        help="image files and/or folders (searched recursively, sorted)")
    parser.add_argument("--out", required=True, help="results JSON to write (atomically)")
    parser.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="in a student directory: pt = model.pt (default), onnx = model.onnx, "
                        "int8 = model.int8.onnx")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="minimum detection score (default 0.3)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))
    try:
        predictor = load_student(args.model, backend=args.backend)
        files = _expand_inputs(args.images)
        predictions: list[dict[str, Any]] = []
        with tqdm(total=len(files), desc="predict", unit="img", disable=args.no_progress) as bar:
            for start in range(0, len(files), args.batch_size):
                chunk = files[start:start + args.batch_size]
                predictions.extend(predictor.predict(chunk, score_threshold=args.score_threshold,
                                                     batch_size=args.batch_size))
                bar.update(len(chunk))
        entries = coco_results(predictions, files)
        atomic_write_json(args.out, entries, indent=None)
    except (ValueError, OSError) as err:  # CheckpointError, ImageReadError, missing files, unwritable output
        print(f"dataengine predict: error: {err}", file=sys.stderr)
        return 1
    boxes = sum(len(p["boxes"]) for p in predictions)
    print(f"dataengine predict: {len(files)} images, {boxes} boxes ({predictor.backend}); wrote {args.out}",
          file=sys.stderr)
    return 0
