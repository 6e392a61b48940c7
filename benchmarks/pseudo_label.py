"""Benchmark: the batched pseudo-labeller against a naive one-image-at-a-time loop, same model, same TTA, same outputs.

Both paths label the same images with the same views, fuse the same way and write the same segmentation PNGs; the
naive loop reads an image, letterboxes it per view and runs one forward pass per view (batch 1) in the main process.
The machine's fp32 peak is measured in the same run with the kernels of ``benchmarks/models.py`` (the better of an
MKL matmul and a oneDNN channels_last 3x3 convolution), and the batched path's achieved GFLOP/s is
``FLOPs per image (all views) * images/s``, with FLOPs from ``torch.utils.flop_counter`` (convolutions and matmuls,
multiply-add = 2; see :mod:`dataengine.models.flops`). ``forward_ms_per_image`` gives the network time alone at batch
1 and batched: its ratio is the ceiling of the end-to-end speedup, which the per-image work both paths share (box
fusion, PNG encoding, JSON) dilutes.

The batched path is the stage's labeller as it runs: channels_last, BatchNorm folded into the convolutions
(:func:`~dataengine.models.fold_batchnorm`) and box fusion over the whole batch
(:func:`~dataengine.pseudo.fuse_boxes_batch`). The naive loop runs the model as loaded and fuses one image at a time
(the same floats). Two ablations of the batched path run in the same rounds: ``batched_contiguous`` (channels_last
off) and ``batched_unfolded`` (BatchNorm not folded).

The CPU may be shared with other jobs, so the two paths alternate over ``--rounds`` blocks of the images (B, N, B, N
...) and each path's rate is its images over its summed time: a load spike hits both. The load average before and
after is recorded with the result.

Usage:
    python benchmarks/pseudo_label.py --teacher models/teacher/model.pt --data data/prepared --images 200
    python benchmarks/pseudo_label.py --num-workers 0   # what the numbers in benchmarks/results were taken with
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou

from dataengine.config import PseudoLabelParams, load_params
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.images import list_images, read_image
from dataengine.data.layout import PreparedLayout
from dataengine.data.transforms import Letterbox
from dataengine.engine.checkpoint import load_model
from dataengine.io import atomic_write_json, safe_join
from dataengine.models import count_gflops, create_model, fold_batchnorm
from dataengine.pseudo import (
    ViewBoxes,
    adapt_batchnorm,
    flip_image_regions,
    fuse_boxes,
    label_images,
    tta_views,
    view_boxes_to_original,
    view_probs_to_original,
    write_segmentation,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import conv_peak_gflops, machine_info, matmul_peak_gflops  # noqa: E402  (benchmarks/models.py)


@torch.inference_mode()
def forward_ms_per_image(model: torch.nn.Module, views: list[Any], batch: int, channels_last: bool,
                         repeats: int = 3) -> float:
    """Network time alone (no data, no post-processing) per image over all views: the ceiling batching can reach.

    ``batch`` images per view size, mirrored copies in the same batch as the labeller does (``1``: the naive loop,
    one view per call). Median of ``repeats`` timings.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    total = 0.0
    for size in dict.fromkeys(v.size for v in views):
        n = batch * sum(v.size == size for v in views) if batch > 1 else 1
        x = torch.rand(n, 3, size, size)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
        per_view = sorted(times)[len(times) // 2] / n  # seconds per image-view
        total += per_view * sum(v.size == size for v in views)
    model.to(memory_format=torch.contiguous_format)
    return total * 1000


@torch.inference_mode()
def naive_label(model: torch.nn.Module, root: Path, files: list[str], params: PseudoLabelParams,
                out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """One image at a time, one forward per view: what a first version of the labeller would do."""
    views = tta_views(model.input_size, params.tta_scales, params.tta_hflip)
    letterboxes = {v.size: Letterbox(v.size) for v in views}
    boxes_out: dict[str, list[dict[str, Any]]] = {}
    for name in files:
        pixels = read_image(safe_join(root, name))  # [H, W, 3] uint8
        h, w = pixels.shape[:2]
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))  # [3, H, W]
        per_view, prob_sum = [], None
        for view in views:
            x = letterboxes[view.size](image).as_subclass(torch.Tensor)[None].float() / 255  # [1, 3, S, S]
            if view.flip:
                x = flip_image_regions(x, [(h, w)])
            outputs = model(x)
            det = model.postprocess(outputs, score_threshold=params.score_threshold, nms_iou=params.nms_iou,
                                    max_detections=params.max_detections, image_size=(view.size, view.size))[0]
            per_view.append(ViewBoxes(view_boxes_to_original(det["boxes"], view, h, w), det["scores"], det["labels"]))
            if params.segmentation:
                probs = model.semantic_probs(outputs, size=(view.size, view.size))[0]  # [K + 1, S, S]
                probs = view_probs_to_original(probs, view, h, w)  # [K + 1, h, w]
                prob_sum = probs if prob_sum is None else prob_sum + probs
        fused = fuse_boxes(per_view, params.fusion_iou)
        boxes_out[name] = [{"bbox": b, "label": lab, "score": s} for b, lab, s in
                           zip(fused.boxes.tolist(), fused.labels.tolist(), fused.scores.tolist())]
        if prob_sum is not None:
            write_segmentation(out_dir, name, prob_sum / len(views))
    atomic_write_json(out_dir / "boxes.json", boxes_out, indent=None)
    return boxes_out


def _agreement(batched_dir: Path, naive: dict[str, list[dict[str, Any]]], min_score: float = 0.3) -> dict[str, float]:
    """How closely the paths agree on the boxes that matter (score >= ``min_score`` on the naive side).

    They differ only by float rounding (a batch runs other kernels than a single image), which can reorder
    near-equal scores or move a box across a threshold, so boxes are matched by IoU, not compared by position.
    """
    pred = json.loads((batched_dir / "predictions.json").read_text())
    batched: dict[str, list[dict[str, Any]]] = {}
    for box in pred["boxes"]:
        batched.setdefault(box["file_name"], []).append(box)
    ious, score_diffs = [], []
    for name, boxes in naive.items():
        for box in (b for b in boxes if b["score"] >= min_score):
            same = [b for b in batched.get(name, []) if b["label"] == box["label"]]
            if not same:
                ious.append(0.0)
                continue
            overlaps = box_iou(torch.tensor([box["bbox"]]), torch.tensor([b["bbox"] for b in same]))[0]
            best = int(overlaps.argmax())
            ious.append(float(overlaps[best]))
            score_diffs.append(abs(same[best]["score"] - box["score"]))
    return {"boxes_compared": len(ious), "min_iou": round(min(ious, default=1.0), 4),
            "matched_at_iou_0.95": round(sum(i >= 0.95 for i in ious) / max(1, len(ious)), 4),
            "max_score_diff": round(max(score_diffs, default=0.0), 5)}


def _peaks() -> dict[str, float]:
    # The same two kernels as benchmarks/models.py, so both result files use one peak (see its docstring: on AMD CPUs
    # MKL's matmul may skip AVX-512 while oneDNN's convolution does not).
    return {"matmul": matmul_peak_gflops(), "conv3x3_channels_last": conv_peak_gflops()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher/model.pt")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--params", default="params.yaml", help="pseudo_label section (batch size, TTA)")
    parser.add_argument("--images", type=int, default=200, help="first N pool images (sorted)")
    parser.add_argument("--rounds", type=int, default=4, help="alternate the paths over this many blocks")
    parser.add_argument("--num-workers", type=int, default=None, help="override pseudo_label.num_workers")
    parser.add_argument("--out", default="benchmarks/results/pseudo_label.json")
    args = parser.parse_args()

    layout = PreparedLayout(args.data)
    params = load_params(args.params, ["pseudo_label"]).pseudo_label
    if args.num_workers is not None:
        params = dataclasses.replace(params, num_workers=args.num_workers)
    cats = CategoryMap.from_coco(load_coco(layout.general_val))
    model, _ = load_model(args.teacher, lambda c: create_model(**c), class_names=list(cats.names))
    files = list_images(layout.pool_images)[: args.images]
    if not files:
        sys.exit(f"no images under {layout.pool_images}")
    views = tta_views(model.input_size, params.tta_scales, params.tta_hflip)
    gflops_per_image = sum(count_gflops(model, v.size) for v in views)
    load_before = os.getloadavg()
    peaks = _peaks()
    adapt_seconds = None
    if params.adapt_bn:
        # Both paths label with one network: the teacher with its BatchNorm statistics adapted once, as the stage
        # does before it labels (timed apart: adapt_bn_seconds). Left on, label_images would re-adapt on every
        # block and the naive loop never, so the paths would neither run the same model nor do the same work.
        with tempfile.TemporaryDirectory() as tmp:
            model, info = adapt_batchnorm(model, layout.pool_images, files, views, out_dir=tmp,
                                          batch_size=params.batch_size, max_images=params.adapt_bn_images,
                                          progress=False)
        adapt_seconds = round(info["seconds"], 2) if info else None
        params = dataclasses.replace(params, adapt_bn=False)

    blocks = [files[i :: args.rounds] for i in range(args.rounds)]
    seconds = {"batched": 0.0, "batched_contiguous": 0.0, "batched_unfolded": 0.0, "naive": 0.0}
    agreement: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Untimed warm-up of both paths (allocator, oneDNN primitives for each input shape, page cache of the images).
        label_images(model, layout.pool_images, files[: params.batch_size], params, Path(tmp) / "warm-up",
                     categories=cats, progress=False)
        naive_label(model, layout.pool_images, files[:2], params, Path(tmp) / "warm-up-naive")
        for r, block in enumerate(blocks):
            for path in ("batched", "naive", "batched_contiguous", "batched_unfolded"):
                out = Path(tmp) / f"{path}-{r}"
                t = time.perf_counter()
                if path == "naive":
                    naive = naive_label(model, layout.pool_images, block, params, out)
                else:
                    label_images(model, layout.pool_images, block, params, out, categories=cats, progress=False,
                                 channels_last=path != "batched_contiguous", fold_bn=path != "batched_unfolded")
                seconds[path] += time.perf_counter() - t
                print(f"round {r}: {path} {len(block) / (time.perf_counter() - t):.2f} img/s", file=sys.stderr)
            agreement.append(_agreement(Path(tmp) / f"batched-{r}", naive))
    after = _peaks()  # once more after the runs: the best of two reads of a shared CPU
    peaks = {k: max(peaks[k], after[k]) for k in peaks}
    # The network alone, each setting timed once per round over 3 rounds (a load spike then hits one round of
    # each, not one setting): the median of its 3 round timings.
    folded = fold_batchnorm(model)[0]
    bs = params.batch_size
    settings = {"batch_1_contiguous": (model, 1, False), "batch_1_channels_last": (model, 1, True),
                f"batch_{bs}_contiguous": (model, bs, False), f"batch_{bs}_channels_last": (model, bs, True),
                f"batch_{bs}_channels_last_folded": (folded, bs, True)}
    timings: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(3):
        for key, (net, batch, channels_last) in settings.items():
            timings[key].append(forward_ms_per_image(net, views, batch, channels_last, repeats=1))
    forward = {k: sorted(v)[1] for k, v in timings.items()}

    n = len(files)
    rates = {k: n / v for k, v in seconds.items()}
    result = {
        "batched_images_per_second": round(rates["batched"], 3),
        "naive_images_per_second": round(rates["naive"], 3),
        "speedup": round(rates["batched"] / rates["naive"], 3),
        "gflops_per_second": round(gflops_per_image * rates["batched"], 2),
        "peak_gflops_per_second": round(max(peaks.values()), 2),
        "peak_gflops_per_second_by_backend": {k: round(v, 2) for k, v in peaks.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "batched_contiguous_images_per_second": round(rates["batched_contiguous"], 3),  # channels_last off
        "batched_unfolded_images_per_second": round(rates["batched_unfolded"], 3),  # BatchNorm not folded
        "images": n,
        "views": [{"size": v.size, "flip": v.flip} for v in views],
        "gflops_per_image": round(gflops_per_image, 4),
        "batch_size": params.batch_size,
        "num_workers": params.num_workers,
        "adapt_bn_seconds": adapt_seconds,  # the stage's BatchNorm pass over these images, before either path
        "model": model.config["name"],
        "forward_ms_per_image": {k: round(v, 2) for k, v in forward.items()},
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "agreement": {"boxes_compared": sum(a["boxes_compared"] for a in agreement),
                      "min_iou": min(a["min_iou"] for a in agreement),
                      "matched_at_iou_0.95": min(a["matched_at_iou_0.95"] for a in agreement),
                      "max_score_diff": max(a["max_score_diff"] for a in agreement)},
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
