"""Benchmark (diagnostic, tried and not built): can the teacher's own features tell the filter which accepted
labels lie outside what general val vouches for?

The filter's calibration is fitted on general val, which holds none of the scenario's look-alikes, so it prices a
circle-coloured ellipse like a circle (README, "Pseudo-labels"). A common answer without scenario labels is a
**novelty gate**: accept a box only where its features lie inside the calibration data's support, and send the
rest to review. This script measures whether that would work here, with the deep nearest-neighbour score of Sun et
al. 2022 ("Out-of-distribution detection with deep nearest neighbors"): the cosine distance from a box's feature to
its ``k``-th nearest general-train ground-truth box of the same class. (``benchmarks/review_propagation.py`` ranked
boxes by a Mahalanobis distance before AdaBN; this script applies a gate, with the pool's statistics.)

- Features: the teacher's BiFPN outputs at the box (``torchvision.ops.roi_align``: P3 at 4x4 and P4 at 2x2 cells,
  concatenated), for general train with the teacher's own BatchNorm statistics, general val with val's and the
  pool's accepted labels with the pool's (``data/pseudo/{val,pool}/batchnorm.pt``, as ``pseudo_label`` labels them).
- Gate: per class, keep the accepted labels whose score is at most the ``--quantile`` of the class's general-val
  ground-truth boxes (95 %: a gate that sends 5 % of val's right boxes to review).
- Truth: the pool's hidden labels (IoU >= 0.5, same class; diagnostics only, never read by the pipeline).

Reported per class: the AUROC of the score for wrong vs right accepted labels (0.5 = no signal) and the accepted
labels' true precision before and after the gate.

Usage:
    python benchmarks/novelty_gate.py    # needs `dvc repro` up to `filter` on the demo; ~15 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from torchvision.ops import roi_align

from dataengine.boxes import coco_to_xyxy
from dataengine.data.coco import load_coco
from dataengine.data.images import read_image
from dataengine.engine.checkpoint import load_model
from dataengine.evaluation.detection import match_predictions
from dataengine.export import git_commit
from dataengine.io import atomic_write_json
from dataengine.models import create_model
from dataengine.pseudo.adapt import with_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import machine_info  # noqa: E402  (benchmarks/models.py)

LEVELS = ((0, 8, 4), (1, 16, 2))  # (BiFPN output, stride, roi_align cells per side): P3 4x4, P4 2x2


def box_features(model: torch.nn.Module, root: Path, coco: dict[str, Any], annotations: Sequence[dict[str, Any]],
                 batch_size: int = 32) -> np.ndarray:
    """``[len(annotations), D]`` neck features at each annotation's box (see :data:`LEVELS`), in their order.

    Images go to the network as they are, batched, so they must share one size (the demo's 128 px, its input size).
    """
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    by_image: dict[Any, list[int]] = {}
    for i, a in enumerate(annotations):
        by_image.setdefault(a["image_id"], []).append(i)
    out: list[np.ndarray | None] = [None] * len(annotations)
    images = list(by_image)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = torch.stack([torch.from_numpy(read_image(root / files[i])).permute(2, 0, 1) for i in chunk])
            feats = model(pixels.float() / 255)["features"]
            rois = [torch.as_tensor(coco_to_xyxy(np.asarray([annotations[j]["bbox"] for j in by_image[i]],
                                                            np.float32))).float() for i in chunk]
            pooled = torch.cat([roi_align(feats[level], rois, output_size=cells, spatial_scale=1 / stride,
                                          sampling_ratio=2, aligned=True).flatten(1)
                                for level, stride, cells in LEVELS], 1)
            for row, j in enumerate(j for i in chunk for j in by_image[i]):
                out[j] = pooled[row].numpy()
    return np.stack(out)


def knn_scores(reference: np.ndarray, ref_labels: np.ndarray, query: np.ndarray, labels: np.ndarray,
               k: int) -> np.ndarray:
    """Cosine distance of each query feature to its ``k``-th nearest reference feature of the same class.

    Example:
        >>> ref = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
        >>> knn_scores(ref, np.array([1, 1, 2]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 1]), 1).round(3)
        array([0. , 0.9])
    """
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    scores = np.zeros(len(query))
    for c in np.unique(labels):
        ref = unit(reference[ref_labels == c])
        dist, _ = NearestNeighbors(n_neighbors=min(k, len(ref))).fit(ref).kneighbors(unit(query[labels == c]))
        scores[labels == c] = dist[:, -1] ** 2 / 2  # squared chord / 2 = 1 - cosine similarity
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher/model.pt", type=Path)
    parser.add_argument("--data", default="data/prepared", type=Path)
    parser.add_argument("--pseudo", default="data/pseudo", type=Path, help="pseudo_label output (batchnorm.pt)")
    parser.add_argument("--filtered", default="data/filtered", type=Path, help="filter output (accepted.json)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--quantile", type=float, default=0.95)
    parser.add_argument("--out", default="benchmarks/results/novelty_gate.json")
    args = parser.parse_args()
    hidden_path = args.data / "scenario/pool_hidden.json"
    if not hidden_path.is_file():
        parser.error(f"{hidden_path} not found: this diagnostic needs the demo's hidden pool labels")
    teacher, _ = load_model(args.teacher, lambda config: create_model(**config))
    teacher.eval()
    general = args.data / "general"
    train, val = load_coco(general / "train.json"), load_coco(general / "val.json")
    accepted, hidden = load_coco(args.filtered / "accepted.json"), load_coco(hidden_path)

    f_train = box_features(teacher, general / "images", train, train["annotations"])
    f_val = box_features(with_batchnorm(teacher, args.pseudo / "val/batchnorm.pt"), general / "images", val,
                         val["annotations"])
    f_pool = box_features(with_batchnorm(teacher, args.pseudo / "pool/batchnorm.pt"), args.data / "scenario/pool",
                          accepted, accepted["annotations"])
    y_train, y_val, y_pool = (np.array([a["category_id"] for a in d["annotations"]]) for d in (train, val, accepted))
    s_val = knn_scores(f_train, y_train, f_val, y_val, args.k)
    s_pool = knn_scores(f_train, y_train, f_pool, y_pool, args.k)

    hidden_id = {im["file_name"]: im["id"] for im in hidden["images"]}
    accepted_file = {im["id"]: im["file_name"] for im in accepted["images"]}
    right = np.array(match_predictions(hidden, [{**a, "image_id": hidden_id[accepted_file[a["image_id"]]]}
                                                for a in accepted["annotations"]]))
    names = {c["id"]: c["name"] for c in accepted["categories"]}
    classes: dict[str, Any] = {}
    kept_all = np.zeros(len(right), bool)
    for c, name in names.items():
        m = y_pool == c
        if not m.any():
            continue
        threshold = float(np.quantile(s_val[y_val == c], args.quantile))
        kept = m & (s_pool <= threshold)
        kept_all |= kept
        classes[name] = {
            "accepted": int(m.sum()), "true_precision": round(float(right[m].mean()), 4),
            "auroc_wrong_vs_right": (round(float(roc_auc_score(~right[m], s_pool[m])), 4)
                                     if 0 < right[m].sum() < m.sum() else None),
            "gate": round(threshold, 4), "kept": int(kept.sum()),
            "kept_true_precision": round(float(right[kept].mean()), 4) if kept.any() else None}
        print(f"{name:9s} {m.sum():4d} accepted at {right[m].mean():.3f}; AUROC {classes[name]['auroc_wrong_vs_right']}"
              f"; gated: {kept.sum():4d} at {classes[name]['kept_true_precision']}", flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(), "commit": git_commit(Path(__file__).resolve().parents[1]), "k": args.k, "quantile": args.quantile,
           "features": "teacher BiFPN P3 4x4 + P4 2x2 roi_align", "reference": "general train ground truth",
           "auroc_wrong_vs_right": round(float(roc_auc_score(~right, s_pool)), 4),
           "accepted": len(right), "true_precision": round(float(right.mean()), 4),
           "kept": int(kept_all.sum()), "kept_true_precision": round(float(right[kept_all].mean()), 4),
           "classes": classes}
    print(f"overall: {len(right)} at {right.mean():.3f}, AUROC {doc['auroc_wrong_vs_right']}; gated: "
          f"{kept_all.sum()} at {doc['kept_true_precision']:.3f}")
    atomic_write_json(args.out, doc, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
