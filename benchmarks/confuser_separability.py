"""Benchmark (diagnostic): can a model tell the scenario's confusers from real objects, and could any model?

Issue 6 asks mining to cut confuser false positives. Whether a student *can* learn that depends on two things this
script measures on the demo, with the pool's hidden labels (read here for diagnostics only, never by the pipeline):

1. **Separability of a detector's scores.** For every real object, the detector's best same-class score on it (IoU
   >= 0.5); for every confuser, its best score on it (IoU >= 0.3, not matching a real object of that class at 0.5,
   the rule of :func:`dataengine.evaluation.confuser_false_positives`; 0 when it does not fire). The AUROC of
   objects vs confusers is read on the pool (the images the students train on, where mining marked the confusers)
   and on the labelled scenario test set. 0.5 = no separation; a model that only lowers every score keeps its AUROC.
2. **An upper bound from the pixels.** A small CNN (3 conv layers) trained on ``--crop-size`` crops of the pool's
   hidden objects and confusers (the box plus 25 % context on every side), tested on crops of the test set.
   If it separates them and a detector does not, the information is in the images and the detector did not learn
   it; if it does not, no student could.

Usage:
    python benchmarks/confuser_separability.py --checkpoints models/teacher/model.pt \\
        models/students/mobilenet_v3_small/model.pt [...] --out benchmarks/results/confuser_separability.json

Needs the prepared demo data (``data/prepared``, with ``scenario/pool_hidden.json``). About 15 s per checkpoint and
1 min for the crop classifier on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.ops import box_convert, box_iou

from dataengine.data.coco import load_coco
from dataengine.engine.checkpoint import load_model
from dataengine.inference import predict_coco
from dataengine.io import atomic_write_json
from dataengine.models import create_model

OBJECT_IOU = 0.5  # a prediction on a real object (same class)
CONFUSER_IOU = 0.3  # a prediction on a confuser (any class), as in confuser_false_positives
SCORE = 0.3  # the fixed threshold of the confuser FP/img metric


def _xyxy(boxes: list[list[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")


def object_and_confuser_scores(gt: dict[str, Any], predictions: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Best score of the predictions on each GT object and on each confuser (0 where none fires); see the docstring.

    Example:
        >>> gt = {"images": [{"id": 1, "confusers": [[50, 50, 10, 10]]}],
        ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
        >>> preds = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
        ...          {"image_id": 1, "category_id": 1, "bbox": [51, 50, 10, 10], "score": 0.4}]
        >>> object_and_confuser_scores(gt, preds)
        (array([0.8]), array([0.4]))
    """
    preds: dict[Any, list[dict[str, Any]]] = {}
    for p in predictions:
        preds.setdefault(p["image_id"], []).append(p)
    anns: dict[Any, list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    objects: list[float] = []
    confusers: list[float] = []
    for img in gt["images"]:
        ps, gts = preds.get(img["id"], []), anns.get(img["id"], [])
        if gts:
            labels = torch.tensor([a["category_id"] for a in gts])
            if ps:
                iou = box_iou(_xyxy([a["bbox"] for a in gts]), _xyxy([p["bbox"] for p in ps]))  # [G, P]
                same = labels[:, None] == torch.tensor([p["category_id"] for p in ps])[None, :]
                scores = torch.tensor([p["score"] for p in ps], dtype=torch.float64)[None, :].expand_as(iou)
                best = torch.where((iou >= OBJECT_IOU) & same, scores, 0.0).max(1).values
                objects.extend(best.tolist())
            else:
                objects.extend([0.0] * len(gts))
        for box in img.get("confusers") or []:
            best_c = 0.0
            for p in ps:
                if box_iou(_xyxy([p["bbox"]]), _xyxy([box]))[0, 0] < CONFUSER_IOU:
                    continue
                own = [a["bbox"] for a in gts if a["category_id"] == p["category_id"]]
                if own and box_iou(_xyxy([p["bbox"]]), _xyxy(own)).max() >= OBJECT_IOU:
                    continue  # a detection of a real object next to the confuser
                best_c = max(best_c, float(p["score"]))
            confusers.append(best_c)
    return np.asarray(objects), np.asarray(confusers)


def separation(objects: np.ndarray, confusers: np.ndarray) -> dict[str, Any]:
    """AUROC of objects (positive) vs confusers, and both sides' medians and shares at the FP metric's threshold."""
    y = np.r_[np.ones(len(objects)), np.zeros(len(confusers))]
    return {"auroc": round(float(roc_auc_score(y, np.r_[objects, confusers])), 4),
            "objects": len(objects), "confusers": len(confusers),
            "median_object_score": round(float(np.median(objects)), 4),
            "median_confuser_score": round(float(np.median(confusers)), 4),
            f"objects_scoring_{SCORE}": round(float((objects >= SCORE).mean()), 4),
            f"confusers_scoring_{SCORE}": round(float((confusers >= SCORE).mean()), 4)}


def score_checkpoint(checkpoint: Path, sets: dict[str, tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    model, ckpt = load_model(checkpoint, lambda config: create_model(**config))
    out: dict[str, Any] = {"model": ckpt["model_config"].get("name")}
    for name, (gt, root) in sets.items():
        predictions, _ = predict_coco(model, gt, root, input_size=int(ckpt["input_size"]))
        out[name] = separation(*object_and_confuser_scores(gt, predictions))
    return out


def crops(gt: dict[str, Any], root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, 3, size, size]`` crops of every object and confuser (square, 25 % context) and labels (1 = object)."""
    anns: dict[Any, list[list[float]]] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a["bbox"])
    images, labels = [], []
    for img in gt["images"]:
        items = [(b, 1) for b in anns.get(img["id"], [])] + [(b, 0) for b in img.get("confusers") or []]
        if not items:
            continue
        with Image.open(root / img["file_name"]) as f:
            pixels = f.convert("RGB")
        for (x, y, w, h), label in items:
            side = 1.5 * max(w, h)
            cx, cy = x + w / 2, y + h / 2
            crop = pixels.crop((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
            images.append(np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255)
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.float32)


def crop_classifier_bound(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
                          epochs: int, seed: int = 0) -> dict[str, Any]:
    """Train a 3-layer CNN on ``train`` crops (object vs confuser, classes balanced by weight); AUROC on both sets."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 1))
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.05)
    x, y = train
    pos_weight = (y == 0).sum() / (y == 1).sum()  # objects outnumber confusers about 4:1
    curve = []
    for epoch in range(epochs):
        net.train()
        for batch in torch.randperm(len(y)).split(64):
            xb = x[batch].flip(3) if torch.rand(()) < 0.5 else x[batch]
            loss = F.binary_cross_entropy_with_logits(net(xb).squeeze(1), y[batch], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            net.eval()
            with torch.no_grad():
                aurocs = [roc_auc_score(t[1].numpy(), net(t[0]).squeeze(1).numpy()) for t in (train, test)]
            curve.append({"epoch": epoch + 1, "train_auroc": round(float(aurocs[0]), 4),
                          "test_auroc": round(float(aurocs[1]), 4)})
    return {"epochs": epochs, "train_crops": len(y), "train_confusers": int((y == 0).sum()),
            "test_crops": len(test[1]), "test_confusers": int((test[1] == 0).sum()), "curve": curve,
            "train_auroc": curve[-1]["train_auroc"], "test_auroc": curve[-1]["test_auroc"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="*", default=[], type=Path, help="detectors to score (any of ours)")
    parser.add_argument("--data", default="data/prepared", type=Path)
    parser.add_argument("--crop-size", type=int, default=16, help="crop side in pixels (demo objects: 8-40 px)")
    parser.add_argument("--crop-epochs", type=int, default=30, help="0 skips the crop classifier")
    parser.add_argument("--out", default="benchmarks/results/confuser_separability.json")
    args = parser.parse_args()
    hidden = args.data / "scenario/pool_hidden.json"
    if not hidden.is_file():
        parser.error(f"{hidden} not found: this diagnostic needs the demo's hidden pool labels (data.source: demo)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sets = {"pool": (load_coco(hidden), args.data / "scenario/pool"),
            "test": (load_coco(args.data / "scenario/test.json"), args.data / "scenario/test")}
    doc: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "definition": f"AUROC of each real object's best same-class score (IoU >= {OBJECT_IOU}) vs each confuser's "
                      f"best score (IoU >= {CONFUSER_IOU}); 0 where nothing fires", "models": {}}
    for checkpoint in args.checkpoints:
        doc["models"][str(checkpoint)] = row = score_checkpoint(checkpoint, sets)
        print(f"{checkpoint}: pool AUROC {row['pool']['auroc']:.3f}, test AUROC {row['test']['auroc']:.3f} "
              f"(test: objects >= {SCORE} {row['test'][f'objects_scoring_{SCORE}']:.2f}, confusers >= {SCORE} "
              f"{row['test'][f'confusers_scoring_{SCORE}']:.2f})", flush=True)
    if args.crop_epochs:
        bound = crop_classifier_bound(crops(*sets["pool"], args.crop_size), crops(*sets["test"], args.crop_size),
                                      epochs=args.crop_epochs)
        doc["crop_classifier"] = {"crop_size": args.crop_size, **bound}
        print(f"crop classifier ({args.crop_size} px, trained on the pool's hidden labels): test AUROC "
              f"{bound['test_auroc']:.3f} after {bound['epochs']} epochs", flush=True)
    atomic_write_json(args.out, doc, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
