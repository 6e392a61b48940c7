"""Pseudo-labelling: a teacher labels an image folder with test-time augmentation, sharded and resumable.

For every image, each TTA view (:mod:`dataengine.pseudo.tta`: scales x horizontal flip) is predicted in batches,
its boxes are mapped back to original pixels and fused per class (:func:`~dataengine.pseudo.fusion.fuse_boxes_batch`),
and its per-pixel class probabilities are mapped back (unflipped, uncropped, resized) and averaged over the views.

Output directory::

    <out>/predictions.json                 merged result (written by rank 0 once every chunk exists)
    <out>/chunks/chunk-00012.json          one chunk: its images, unreadable files and boxes (as JSON text)
    <out>/seg/<file>.label.png             uint8, original size: argmax class (0 background, label + 1)
    <out>/seg/<file>.confidence.png        uint8: round(255 * max class probability)
    <out>/seg/<file>.uncertainty.png       uint8: round(255 * entropy / log(K + 1)) (normalised entropy)
    <out>/batchnorm.pt                     with ``adapt_bn``: the BatchNorm statistics of these images (a re-run's)

``<file>`` mirrors the image's path relative to the image root (``cam3/dusk/x.JPG`` ->
``seg/cam3/dusk/x.JPG.label.png``). ``predictions.json`` holds ``images`` (``file_name``, ``width``, ``height``,
``seg``: the three paths relative to ``<out>``, or ``null`` without segmentation), ``boxes`` (``file_name``,
``bbox`` xyxy original pixels, ``label``, ``category_id``, ``score``, ``consistency``, ``score_std``, ``views``; see
:mod:`~dataengine.pseudo.fusion`), ``skipped`` (``file_name``, ``reason``), ``class_names``, ``category_ids``,
``model`` (the model's config), ``tta``, ``adapt_bn`` (images and layers of the BatchNorm adaptation, or ``null``;
:mod:`~dataengine.pseudo.adapt`) and ``fingerprint``. Images follow the sorted file list; boxes follow their
images, then decreasing score.

Sharding and resume: the sorted file list is cut into chunks of ``chunk_size`` images; chunk ``i`` is labelled by
rank ``i % world_size``, in batches that never straddle two chunks, so every image is predicted in the same batch
whatever the number of ranks or restarts. A chunk's PNGs are written first, then its JSON (atomically), so an
existing chunk JSON means a finished chunk. A re-run skips the chunks whose JSON carries the same **fingerprint**
(a hash of the model's weights, BatchNorm statistics and config, the TTA and fusion settings, the classes and the
chunk's files); chunks of another model or setting are redone. Rank 0 then merges the chunks and removes what no
chunk refers to (chunks of a longer file list, PNGs of images no longer listed, temporary files of a killed write),
so a killed and re-run labelling leaves exactly the files an uninterrupted one does.

Example:
    >>> from dataengine.config import PseudoLabelParams
    >>> stats = label_images(model, "data/prepared/scenario/pool", files, PseudoLabelParams(),
    ...                      "data/pseudo/pool")  # doctest: +SKIP
    >>> sorted(stats)  # doctest: +SKIP
    ['boxes', 'chunks', 'images', 'images_per_second', 'labelled_this_run', 'reused_chunks', ...]
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataengine.config import PseudoLabelParams
from dataengine.data.coco import CategoryMap
from dataengine.engine.distributed import get_rank, get_world_size, is_distributed, is_main_process
from dataengine.io import atomic_write, atomic_write_bytes, atomic_write_json, read_json, safe_join
from dataengine.models.fold import fold_batchnorm
from dataengine.pseudo.adapt import BATCHNORM_FILE, adapt_batchnorm, hash_state
from dataengine.pseudo.fusion import FusedBoxes, ViewBoxes, fuse_boxes_batch
from dataengine.pseudo.tta import (
    TTADataset,
    TTAView,
    collate_views,
    flip_image_regions,
    tta_views,
    view_boxes_to_original,
    view_probs_to_original,
)

__all__ = [
    "CHUNK_FORMAT",
    "PREDICTIONS_FILE",
    "SEG_SUFFIXES",
    "encode_segmentation",
    "label_images",
    "predict_batch",
    "run_fingerprint",
    "write_segmentation",
]

PREDICTIONS_FILE = "predictions.json"
CHUNK_FORMAT = "dataengine-pseudo-chunk-v2"
SEG_SUFFIXES = {"label": ".label.png", "confidence": ".confidence.png", "uncertainty": ".uncertainty.png"}
"""File name suffixes of the three segmentation PNGs of an image."""


# --------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_batch(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    orig_sizes: Sequence[tuple[int, int]],
    views: Sequence[TTAView],
    params: PseudoLabelParams,
    *,
    segmentation: bool,
    channels_last: bool = False,
    budget_bytes: int = 64 * 2**20,
) -> Iterator[tuple[FusedBoxes, torch.Tensor | None]]:
    """TTA predictions of a batch, fused, in original image coordinates; yields one image at a time.

    Each view size runs one forward pass, the mirrored copies concatenated to the plain ones (a batch of ``2B``).
    Segmentation logits stay at the network's 1/4 resolution; probabilities are upsampled per view, mapped back and
    averaged for a run of same-size images at a time (:func:`_size_groups`), so memory holds the original-size maps
    of a few images (64 MB), not of a whole batch.

    Args:
        model: A :class:`~dataengine.models.MultiTaskDetSeg` (or anything with its ``forward``, ``postprocess`` and
            ``semantic_probs``, the last reading only ``outputs["seg_logits"]``), in eval mode, on its device.
        images: Per distinct view size, in the order of first appearance in ``views``: letterboxed images
            ``[B, 3, S, S]``, uint8 (0-255) or float in [0, 1].
        orig_sizes: ``(h, w)`` of each original image.
        views: The TTA views (:func:`~dataengine.pseudo.tta.tta_views`).
        params: Thresholds (``score_threshold``, ``nms_iou``, ``max_detections``, ``fusion_iou``).
        segmentation: Also give the view-averaged class probabilities.
        channels_last: Feed the network NHWC tensors (convert the model too).
        budget_bytes: Size of the float32 original-size maps mapped back at once (:func:`_size_groups`); an image
            whose own maps are larger is mapped back one class at a time.

    Yields:
        Per image, in order: the fused boxes and, with ``segmentation``, probabilities ``[K + 1, h, w]`` (else
        ``None``).

    Example:
        >>> views = tta_views(64, (1.0,), hflip=True)
        >>> [(fused, probs)] = predict_batch(model, [torch.rand(1, 3, 64, 64)], [(48, 64)], views,
        ...                                  PseudoLabelParams(), segmentation=True)  # doctest: +SKIP
        >>> probs.shape  # doctest: +SKIP
        torch.Size([6, 48, 64])
    """
    sizes = list(dict.fromkeys(v.size for v in views))
    if len(images) != len(sizes):
        raise ValueError(f"got images of {len(images)} view sizes, the views have {len(sizes)}: {sizes}")
    device = next(model.parameters()).device
    detection = getattr(model, "detection", True)
    n = len(orig_sizes)
    per_image: list[list[ViewBoxes | None]] = [[None] * len(views) for _ in range(n)]
    seg_outputs: list[dict[str, Any]] = [{} for _ in views]  # per view: the outputs rows of its B images
    for size, batch in zip(sizes, images):
        if tuple(batch.shape[1:]) != (3, size, size) or batch.shape[0] != n:
            raise ValueError(f"view size {size}: expected images [{n}, 3, {size}, {size}], got {tuple(batch.shape)}")
        x = batch.to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()  # [B, 3, S, S] in [0, 1]
        here = [k for k, v in enumerate(views) if v.size == size]  # view indices of this size
        copies = [flip_image_regions(x, orig_sizes) if views[k].flip else x for k in here]
        x = torch.cat(copies) if len(copies) > 1 else copies[0]  # [V * B, 3, S, S]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = model(x)
        dets = model.postprocess(outputs, score_threshold=params.score_threshold, nms_iou=params.nms_iou,
                                 max_detections=params.max_detections, image_size=(size, size)) if detection else None
        for j, k in enumerate(here):
            if dets is not None:
                for b, (h, w) in enumerate(orig_sizes):
                    det = dets[j * n + b]
                    boxes = view_boxes_to_original(det["boxes"], views[k], h, w)  # [M, 4]
                    per_image[b][k] = ViewBoxes(boxes.cpu(), det["scores"].cpu(), det["labels"].cpu())
            if segmentation:
                seg_outputs[k] = {"seg_logits": outputs["seg_logits"][j * n : (j + 1) * n]}  # [B, K + 1, S/4, S/4]
    empty = ViewBoxes(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    # All images at once: the fusion loop then runs once per box rank, not once per box (fuse_boxes_batch).
    fused_all = fuse_boxes_batch([[v if v is not None else empty for v in views_of] for views_of in per_image],
                                 params.fusion_iou)
    channels = getattr(model, "num_classes", 1) + 1
    for group in _size_groups(orig_sizes, channels, budget_bytes) if segmentation else [range(n)]:
        probs = None
        if segmentation:
            h, w = orig_sizes[group[0]]
            rows = slice(group[0], group[-1] + 1)
            canvas = [model.semantic_probs({"seg_logits": seg_outputs[k]["seg_logits"][rows]},  # [g, K + 1, S, S]
                                           size=(view.size, view.size)) for k, view in enumerate(views)]
            # An image whose maps alone exceed the budget (a 48 MP photo: 1.2 GB per view for 6 classes) is mapped
            # back one class at a time: the peak is its result plus one class plane, not several full copies.
            # Each class plane is resized and summed over the views exactly as in the batched call (bit-identical).
            step = 1 if channels * h * w * 4 > budget_bytes else channels
            for c in range(0, channels, step):
                summed = None
                for view, view_probs in zip(views, canvas):
                    mapped = view_probs_to_original(view_probs[:, c : c + step], view, h, w)  # [g, step, h, w]
                    summed = mapped if summed is None else summed.add_(mapped)
                if step == channels:
                    probs = summed
                else:
                    if probs is None:
                        probs = torch.empty((len(group), channels, h, w), dtype=summed.dtype, device=summed.device)
                    probs[:, c : c + step] = summed
                del summed, mapped
            probs /= len(views)  # [g, K + 1, h, w]
        for i, b in enumerate(group):
            yield fused_all[b], None if probs is None else probs[i]


def _size_groups(orig_sizes: Sequence[tuple[int, int]], channels: int,
                 budget_bytes: int = 64 * 2**20) -> list[range]:
    """Runs of consecutive images of one size whose float32 ``[g, C, h, w]`` maps fit in ``budget_bytes``.

    Segmentation maps are mapped back a run at a time: one call per view for a run (a camera pool is mostly one
    size), while a batch of large images still holds one image's maps at a time.
    """
    groups: list[range] = []
    start = 0
    for b in range(1, len(orig_sizes) + 1):
        h, w = orig_sizes[start]
        per_image = channels * h * w * 4
        if b == len(orig_sizes) or orig_sizes[b] != orig_sizes[start] or (b - start + 1) * per_image > budget_bytes:
            groups.append(range(start, b))
            start = b
    return groups


def encode_segmentation(probs: torch.Tensor, *, band_pixels: int = 2**20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact soft segmentation: argmax class, confidence and normalised entropy, as uint8 maps.

    Args:
        probs: ``[C, H, W]`` class probabilities (``C = K + 1``, class 0 background), summing to 1 per pixel.
        band_pixels: Pixels encoded at a time (whole rows); only memory depends on it.

    Returns:
        ``label`` (argmax, first class on ties), ``confidence`` = ``round(255 * max p)`` and ``uncertainty`` =
        ``round(255 * H(p) / log C)`` (0: certain, 255: uniform), each ``[H, W]`` uint8.

    Raises:
        ValueError: Fewer than 2 or more than 256 classes (labels must fit in uint8).

    Example:
        >>> label, conf, unc = encode_segmentation(torch.tensor([[[0.5, 1.0]], [[0.5, 0.0]]]))
        >>> label.tolist(), conf.tolist(), unc.tolist()
        ([[0, 0]], [[128, 255]], [[255, 0]])
    """
    c = probs.shape[0]
    if probs.ndim != 3 or not 2 <= c <= 256:
        raise ValueError(f"expected probabilities [C, H, W] with 2 <= C <= 256, got {tuple(probs.shape)}")
    h, w = probs.shape[1:]
    out = tuple(np.empty((h, w), np.uint8) for _ in range(3))
    to_u8 = lambda t: (t * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # noqa: E731
    # Every value is per pixel: bands of rows give the same bytes as the whole map, with temporaries of one band
    # (a 48 MP map of 6 classes needed 2 GB of them at once).
    rows = max(1, band_pixels // max(w, 1))
    for r0 in range(0, h, rows):
        band = probs[:, r0 : r0 + rows].float()  # [C, b, W]
        conf, label = band.max(0)  # [b, W] each
        entropy = -torch.special.xlogy(band, band).sum(0) / math.log(c)  # [b, W] in [0, 1]; 0 log 0 = 0
        for array, values in zip(out, (label.to(torch.uint8).cpu().numpy(), to_u8(conf), to_u8(entropy))):
            array[r0 : r0 + rows] = values
    return out


def write_segmentation(out_dir: str | Path, file_name: str, probs: torch.Tensor) -> dict[str, str]:
    """Write an image's soft segmentation as three uint8 PNGs (:func:`encode_segmentation`), each atomically.

    Args:
        out_dir: Output folder; the PNGs go to ``seg/<file_name>.{label,confidence,uncertainty}.png`` under it.
        file_name: The image's path relative to its root (nested folders are mirrored).
        probs: ``[K + 1, H, W]`` class probabilities at the image's original size.

    Returns:
        The three paths relative to ``out_dir``, by kind.

    Raises:
        PathEscapeError: ``file_name`` would write outside ``out_dir``.

    Example:
        >>> import tempfile
        >>> write_segmentation(tempfile.mkdtemp(), "cam0/x.jpg", torch.full((2, 3, 4), 0.5))["label"]
        'seg/cam0/x.jpg.label.png'
    """
    paths = {kind: f"seg/{file_name}{suffix}" for kind, suffix in SEG_SUFFIXES.items()}
    for kind, array in zip(("label", "confidence", "uncertainty"), encode_segmentation(probs)):
        buf = io.BytesIO()
        # zlib level 1: ~3x faster than the default 6, and these smooth maps still compress well.
        Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # [H, W] uint8: mode L
        # No fsync per PNG (~5 ms each): the chunk JSON written after them is fsynced, and a resumed run re-checks
        # that a finished chunk's PNGs are there (see _chunk_done), so a power cut costs a redone chunk.
        atomic_write_bytes(safe_join(out_dir, paths[kind]), buf.getvalue(), fsync=False)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Chunks, fingerprint, merge
# --------------------------------------------------------------------------------------------------------------


def run_fingerprint(model: nn.Module, views: Sequence[TTAView], params: PseudoLabelParams, categories: CategoryMap,
                    segmentation: bool) -> str:
    """SHA-256 of everything that decides a chunk's content: weights, model config, TTA/fusion settings, classes.

    ``batch_size``, ``num_workers`` and ``chunk_size`` are left out: they change speed, not predictions (a
    chunk's own file list is checked separately).

    Example:
        >>> len(run_fingerprint(model, views, PseudoLabelParams(), cats, True))  # doctest: +SKIP
        64
    """
    meta = {"format": CHUNK_FORMAT, "model": _model_config(model), "views": [[v.size, v.flip] for v in views],
            "score_threshold": params.score_threshold, "nms_iou": params.nms_iou, "fusion_iou": params.fusion_iou,
            "max_detections": params.max_detections, "segmentation": segmentation,
            "class_names": list(categories.names), "category_ids": list(categories.ids)}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    hash_state(digest, model)
    return digest.hexdigest()


def _model_config(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "config", {"name": type(model).__name__}))


def _chunk_path(out_dir: Path, index: int) -> Path:
    return out_dir / "chunks" / f"chunk-{index:05d}.json"


def _chunk_done(out_dir: Path, index: int, files: list[str], fingerprint: str) -> bool | None:
    """True: finished with this fingerprint and PNGs; False: missing; None: stale (another model, setting or file
    list) or a PNG lost since (a power cut after the unsynced PNG writes)."""
    path = _chunk_path(out_dir, index)
    if not path.is_file():
        return False
    try:
        chunk = read_json(path)
    except ValueError:  # not JSON: not ours (our writes are atomic), redo it
        return None
    ok = isinstance(chunk, dict) and chunk.get("fingerprint") == fingerprint and chunk.get("files") == files
    if ok:
        pngs = [out_dir / p for image in chunk["images"] if image["seg"] for p in image["seg"].values()]
        ok = all(p.is_file() and p.stat().st_size > 0 for p in pngs)
    return True if ok else None


def _box_records(name: str, fused: FusedBoxes, categories: CategoryMap) -> list[dict[str, Any]]:
    # Rounded in NumPy (a Python round() per number was 5% of the run): 2 decimals of a pixel, 5 of a score.
    boxes = np.round(fused.boxes.numpy(), 2).tolist()
    stats = np.round(torch.stack([fused.scores, fused.consistency, fused.score_std], 1).numpy(), 5).tolist()
    return [{"file_name": name, "bbox": box, "label": label, "category_id": categories.ids[label], "score": score,
             "consistency": cons, "score_std": std, "views": views}
            for box, label, (score, cons, std), views in zip(boxes, fused.labels.tolist(), stats, fused.views.tolist())]


def _merge(out_dir: Path, chunks: list[list[str]], fingerprint: str, header: dict[str, Any]) -> dict[str, Any]:
    """Concatenate the chunks into ``predictions.json`` and remove every file under ``out_dir`` no chunk refers to.

    The file is streamed one chunk at a time (boxes through a spool file), so memory does not grow with the pool:
    10,000 images held 395,000 box records at once (+295 MB) when the merged dict was built first. The bytes are
    those of ``json.dumps(predictions, indent=None)`` (tested).

    Returns:
        ``images`` and ``boxes`` (counts) and ``skipped`` (the skipped records, a short list).
    """
    for tmp in out_dir.glob(f".{PREDICTIONS_FILE}.*.tmp"):  # left by a run killed while writing the merge
        tmp.unlink()
    keep = {_chunk_path(out_dir, i) for i in range(len(chunks))}
    counts, skipped = {"images": 0, "boxes": 0}, []
    dumps = functools.partial(json.dumps, allow_nan=False)

    def read(index: int) -> dict[str, Any]:
        chunk = read_json(_chunk_path(out_dir, index))
        # Every rank has just finished its chunks and we are past the collective: a mismatch is a bug.
        assert chunk["fingerprint"] == fingerprint and chunk["files"] == chunks[index], \
            f"chunk {index} is stale after labelling"
        return chunk

    def items(records: list[dict[str, Any]]) -> str:  # ", ".join(map(dumps, records)) in one encoder call
        return dumps(records)[1:-1]

    # One read of each chunk: its images go to the file, its boxes (already JSON text) to an unnamed spool file (gone
    # with the process, even a killed one) that is copied in after the last image.
    with atomic_write(out_dir / PREDICTIONS_FILE, "w") as fh, \
            tempfile.TemporaryFile("w+", encoding="utf-8", dir=out_dir) as spool:
        fh.write(f"{{{dumps('images')}: [")
        for index in range(len(chunks)):
            chunk = read(index)
            for key, dest, text, count in (("images", fh, items(chunk["images"]), len(chunk["images"])),
                                           ("boxes", spool, chunk["boxes_json"][1:-1], chunk["box_count"])):
                if count:
                    dest.write(("" if counts[key] == 0 else ", ") + text)
                    counts[key] += count
            keep |= {out_dir / p for image in chunk["images"] if image["seg"] for p in image["seg"].values()}
            skipped += chunk["skipped"]
        fh.write(f"], {dumps('boxes')}: [")
        spool.seek(0)
        shutil.copyfileobj(spool, fh)
        fh.write("]")
        for key, value in {"skipped": skipped, **header, "fingerprint": fingerprint}.items():
            fh.write(f", {dumps(key)}: {dumps(value)}")
        fh.write("}\n")
    for sub in ("chunks", "seg"):
        for path in sorted((out_dir / sub).rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and path not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return {**counts, "skipped": skipped}


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def label_images(
    model: nn.Module,
    image_root: str | Path,
    files: Sequence[str],
    params: PseudoLabelParams,
    out_dir: str | Path,
    *,
    categories: CategoryMap | None = None,
    channels_last: bool | None = None,
    fold_bn: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Label ``files`` with the model and TTA into ``out_dir`` (see the module docstring for the layout).

    Every rank of a ``torchrun`` group calls it with the same arguments; each labels its chunks, then rank 0 merges
    them into ``predictions.json`` (the other ranks wait) and every rank gets the same stats back. Unreadable images
    are skipped with a warning on stderr, counted and listed (``stats["skipped_files"]`` and ``predictions.json``).

    Args:
        model: The teacher (:class:`~dataengine.models.MultiTaskDetSeg`), on the device to run on. A copy labels
            with ``fold_bn`` (the default) or ``params.adapt_bn`` (its BatchNorm statistics re-estimated on these
            images, :mod:`~dataengine.pseudo.adapt`), and ``model`` is left as it was; with neither, ``model``
            itself is put in eval mode and its memory format is restored afterwards.
        image_root: Folder the file names are relative to.
        files: Image paths relative to ``image_root`` (any order: they are sorted; duplicates are refused).
        params: The ``pseudo_label`` params; ``segmentation=False`` skips the masks (e.g. for calibration images).
        out_dir: Output folder (created; a previous run's finished chunks there are reused).
        categories: COCO ids and names of the model's labels; default ``1..K`` named by ``model.class_names``.
        channels_last: Run the network on NHWC tensors (default ``True``: oneDNN's and cuDNN's native layout; the
            demo teacher's batched forward is ~30% faster on this CPU, see ``benchmarks/pseudo_label.py``).
        fold_bn: Label with a copy whose BatchNorms are folded into their convolutions
            (:func:`~dataengine.models.fold_batchnorm`): the same network up to float rounding. On the demo
            teacher (2 CPU cores) the forward pass alone was 9-13 % faster in two of three timings and 2 % slower
            in the third; end to end the gain was within the host's noise (README, pseudo-label benchmark).
        progress: Show a progress bar (images/s) on rank 0.

    Returns:
        ``images`` (labelled, all chunks), ``skipped``, ``skipped_files``, ``boxes``, ``chunks``,
        ``reused_chunks``, ``labelled_this_run``, ``seconds`` and ``images_per_second`` (this run's images over its
        wall time, all ranks, the BatchNorm adaptation included), ``views``, ``world_size`` and ``adapt_bn``
        (:func:`~dataengine.pseudo.adapt.adapt_batchnorm`'s info, or ``None``).

    Raises:
        ValueError: Duplicate file names, TTA scales that collide, or categories that do not match the model.

    Example:
        >>> stats = label_images(model, "data/prepared/general/images", val_files,
        ...                      dataclasses.replace(params, segmentation=False), "data/pseudo/val")  # doctest: +SKIP
    """
    start = time.perf_counter()
    out_dir, image_root = Path(out_dir), Path(image_root)
    files = sorted(files)
    duplicates = sorted({f for f, g in zip(files, files[1:]) if f == g})
    if duplicates:
        raise ValueError(f"file list for {image_root} has duplicates: {duplicates[:5]}")
    num_classes = int(getattr(model, "num_classes"))
    if categories is None:
        names = getattr(model, "class_names", None) or [str(i) for i in range(num_classes)]
        categories = CategoryMap.from_names(list(names))
    if len(categories) != num_classes:
        raise ValueError(f"{len(categories)} categories {list(categories.names)} for a model of {num_classes} classes")
    segmentation = bool(params.segmentation)
    if segmentation and not getattr(model, "segmentation", False):
        print(f"warning: pseudo_label.segmentation is true but the model {_model_config(model).get('name')} has no "
              "segmentation head: no masks are written", file=sys.stderr)
        segmentation = False
    views = tta_views(int(getattr(model, "input_size")), params.tta_scales, params.tta_hflip)
    sizes = list(dict.fromkeys(v.size for v in views))
    adaptation = None
    if params.adapt_bn and files:  # label with a copy normalised by these images' own BatchNorm statistics
        model, adaptation = adapt_batchnorm(model, image_root, files, views, out_dir=out_dir,
                                            batch_size=params.batch_size, max_images=params.adapt_bn_images,
                                            num_workers=params.num_workers, progress=progress)
    elif is_main_process():
        (out_dir / BATCHNORM_FILE).unlink(missing_ok=True)  # an adapted run's statistics: not this run's
    if fold_bn:  # the network that labels, so the fingerprint below is of the weights that ran
        model, _ = fold_batchnorm(model)
    fingerprint = run_fingerprint(model, views, params, categories, segmentation)
    chunks = [files[i : i + params.chunk_size] for i in range(0, len(files), params.chunk_size)]
    rank, world = get_rank(), get_world_size()

    mine = [c for c in range(len(chunks)) if c % world == rank]
    state = {c: _chunk_done(out_dir, c, chunks[c], fingerprint) for c in mine}
    todo = [c for c in mine if not state[c]]
    stale = sum(1 for c in mine if state[c] is None)
    if stale:
        print(f"{out_dir}: redoing {stale} chunk(s) made by another model, setting or file list, or with missing "
              "PNGs", file=sys.stderr)

    channels_last = True if channels_last is None else channels_last
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    labelled = 0
    try:
        labelled = _label_chunks(model, image_root, chunks, todo, views, sizes, params, out_dir, categories,
                                 fingerprint, segmentation, channels_last, progress)
    finally:
        model.train(was_training)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    local = {"labelled": labelled, "seconds": time.perf_counter() - start, "reused": len(mine) - len(todo)}

    # The gather is a collective: rank 0 passes it only once every rank has written all of its chunks.
    if is_distributed():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    stats: dict[str, Any] | None = None
    if is_main_process():
        header = {"class_names": list(categories.names), "category_ids": list(categories.ids),
                  "model": _model_config(model),
                  "tta": {"hflip": params.tta_hflip, "scales": list(params.tta_scales),
                          "views": [{"size": v.size, "flip": v.flip} for v in views],
                          "score_threshold": params.score_threshold, "nms_iou": params.nms_iou,
                          "fusion_iou": params.fusion_iou, "max_detections": params.max_detections,
                          "segmentation": segmentation},
                  "adapt_bn": adaptation and {k: adaptation[k] for k in ("images", "layers")}}
        predictions = _merge(out_dir, chunks, fingerprint, header)
        labelled_all = sum(g["labelled"] for g in gathered)
        seconds = max(g["seconds"] for g in gathered)
        stats = {"images": predictions["images"], "skipped": len(predictions["skipped"]),
                 "skipped_files": predictions["skipped"], "boxes": predictions["boxes"],
                 "chunks": len(chunks), "reused_chunks": sum(g["reused"] for g in gathered),
                 "labelled_this_run": labelled_all, "seconds": round(seconds, 3),
                 "images_per_second": round(labelled_all / seconds, 3) if labelled_all else 0.0,
                 "views": len(views), "world_size": world, "adapt_bn": adaptation}
    if is_distributed():
        box = [stats]
        dist.broadcast_object_list(box, src=0)
        stats = box[0]
    assert stats is not None
    return stats


def _label_chunks(model: nn.Module, image_root: Path, chunks: list[list[str]], todo: list[int],
                  views: list[TTAView], sizes: list[int], params: PseudoLabelParams, out_dir: Path,
                  categories: CategoryMap, fingerprint: str, segmentation: bool, channels_last: bool,
                  progress: bool) -> int:
    """Label the chunks ``todo`` of this rank; returns the number of images processed (readable or not)."""
    if not todo:
        return 0
    pending = [name for c in todo for name in chunks[c]]
    chunk_of = [c for c in todo for _ in chunks[c]]
    # Batches never straddle chunks: an image's batch is the same whatever the ranks or restarts.
    batches, offset = [], 0
    for c in todo:
        n = len(chunks[c])
        step = params.batch_size
        batches += [list(range(offset + i, offset + min(i + step, n))) for i in range(0, n, step)]
        offset += n
    device = next(model.parameters()).device
    loader = DataLoader(TTADataset(image_root, pending, sizes), batch_sampler=batches,
                        num_workers=params.num_workers, collate_fn=collate_views, pin_memory=device.type == "cuda")
    remaining = {c: len(chunks[c]) for c in todo}
    done: dict[int, dict[str, Any]] = {c: {} for c in todo}  # chunk -> file name -> (image | skipped, boxes)
    bar = tqdm(total=len(pending), desc=f"pseudo-label {out_dir.name}", unit="img",
               disable=not (progress and is_main_process()), dynamic_ncols=True)
    with bar:
        for batch in loader:
            items = batch["items"]
            if items:
                results = predict_batch(model, batch["images"], [item["orig_size"] for item in items], views, params,
                                        segmentation=segmentation, channels_last=channels_last)
                for item, (fused, probs) in zip(items, results):
                    name, (h, w) = item["file_name"], item["orig_size"]
                    seg = write_segmentation(out_dir, name, probs) if probs is not None else None
                    image = {"file_name": name, "width": w, "height": h, "seg": seg}
                    done[chunk_of[item["index"]]][name] = ("image", image, _box_records(name, fused, categories))
            for skip in batch["skipped"]:
                print(f"warning: skipped unreadable image {skip['file_name']}: {skip['reason']}", file=sys.stderr)
                done[chunk_of[skip["index"]]][skip["file_name"]] = (
                    "skipped", {"file_name": skip["file_name"], "reason": skip["reason"]}, [])
            for index in [item["index"] for item in items] + [skip["index"] for skip in batch["skipped"]]:
                c = chunk_of[index]
                remaining[c] -= 1
                if remaining[c] == 0:
                    _write_chunk(out_dir, c, chunks[c], fingerprint, done.pop(c))
            bar.update(len(items) + len(batch["skipped"]))
    return len(pending)


def _write_chunk(out_dir: Path, index: int, files: list[str], fingerprint: str,
                 results: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]]) -> None:
    """Write a finished chunk atomically: its images and skipped files as records, its boxes as JSON text.

    ``boxes_json`` is ``json.dumps`` of the chunk's box records (``box_count`` of them), so the merge copies it into
    ``predictions.json`` without parsing it: decoding ~200 box records per image was most of the merge's time.
    """
    chunk: dict[str, Any] = {"format": CHUNK_FORMAT, "fingerprint": fingerprint, "chunk": index, "files": files,
                             "images": [], "skipped": []}
    boxes: list[dict[str, Any]] = []
    for name in files:  # file order, whatever order the batches came in
        kind, record, records = results[name]
        chunk["images" if kind == "image" else "skipped"].append(record)
        boxes += records
    chunk |= {"box_count": len(boxes), "boxes_json": json.dumps(boxes, allow_nan=False)}
    atomic_write_json(_chunk_path(out_dir, index), chunk, indent=None)
