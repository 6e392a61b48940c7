"""Benchmark (a negative result kept reproducible): can reviewers' rejections be propagated to unreviewed boxes?

Issue 6's confuser bar is missed because most wrong boxes in the accepted band sit on confusers, shapes of the
scenario that the general domain never shows the teacher, and only the reviewed images turn them into negatives.
One way to spread a review further is to reject unreviewed accepted boxes that look like boxes reviewers rejected.
This script measures whether the teacher's own features can tell them apart:

1. **What is wrong in the accepted band**: every accepted box against the pool's hidden labels, as ``ok`` (IoU
   >= 0.5 with a true object of its class), ``confuser`` (otherwise, IoU >= 0.3 with a confuser) or ``other``; per
   class, with score and TTA-consistency quartiles.
2. **Propagation**: a simulated reviewer (:func:`dataengine.review.oracle.simulate_review`) goes through the first
   ``--review`` queued images; every label it decided is an example (``reject`` -> 1, ``accept``/``correct`` -> 0).
   Features: the teacher's neck features P3 and P4 under each box (``torchvision.ops.roi_align``, 2x2, each level
   L2-normalised). A cosine k-nearest-neighbour classifier (scikit-learn) over the examples, of all classes or of
   the box's class only, scores every accepted box of the *unreviewed* images; a box is flagged above ``thr``.
   Counted: flagged ``confuser`` / ``ok`` / ``other`` boxes.
3. **Novelty** (no review needed): the Mahalanobis distance of each accepted box's features to its class under
   class-conditional Gaussians with one shared covariance (Lee et al. 2018, "A simple unified framework for detecting
   out-of-distribution samples"), fitted on the general-train ground-truth boxes (``sklearn.covariance.LedoitWolf``).
   Per class, the AUROC with which it ranks ``confuser`` boxes above ``ok`` boxes, next to the AUROC of the
   teacher's own score (low score = suspect): if the distance ranked confusers better than the score, the filter
   could route far-out boxes to review.

On the demo (2026-11-23, 14-epoch teacher, 150 reviewed images) no setting separates them: flagged confuser boxes
come with 2 to 5 times as many correct ones (at most 17 of 118 confusers, then with 64 of 839 correct boxes). The
teacher's features do not tell a confuser from its class (it never saw one), so the engine does not propagate
rejections this way. The novelty distance ranks confusers no better than the score does (see the README), so the
filter has no novelty gate either.

Needs the outputs of ``dvc repro`` up to ``filter`` (data/filtered, data/prepared with ``pool_hidden.json``,
models/teacher). Writes ``benchmarks/results/review_propagation.json``.

Usage:
    python benchmarks/review_propagation.py                    # about 1 minute on 2 CPU cores
    python benchmarks/review_propagation.py --review 432
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from torchvision.ops import box_iou, roi_align

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.boxes import coco_to_xyxy  # noqa: E402
from dataengine.data.images import read_image  # noqa: E402
from dataengine.engine.checkpoint import load_model  # noqa: E402
from dataengine.io import atomic_write_text  # noqa: E402
from dataengine.models import create_model  # noqa: E402
from dataengine.review.oracle import reviewable_labels, simulate_review  # noqa: E402

KINDS = ("ok", "confuser", "other")


def _xyxy(coco_box: list[float]) -> list[float]:
    return [float(v) for v in coco_to_xyxy(list(coco_box))]


def _max_iou(box: list[float], others: list[list[float]]) -> float:
    if not others:
        return 0.0
    return float(box_iou(torch.tensor([box]), torch.tensor(others)).max())


def accepted_truth(accepted: dict[str, Any], hidden: dict[str, Any]) -> list[dict[str, Any]]:
    """Every accepted box with its kind (``ok`` / ``confuser`` / ``other``) against the hidden labels."""
    names = {c["id"]: c["name"] for c in accepted["categories"]}
    truth_names = {c["id"]: c["name"] for c in hidden["categories"]}
    files = {img["id"]: img["file_name"] for img in accepted["images"]}
    hidden_images = {img["file_name"]: img for img in hidden["images"]}
    objects: dict[int, list[tuple[list[float], str]]] = defaultdict(list)
    for ann in hidden["annotations"]:
        objects[ann["image_id"]].append((_xyxy(ann["bbox"]), truth_names[ann["category_id"]]))
    rows = []
    for ann in accepted["annotations"]:
        image = hidden_images[files[ann["image_id"]]]
        box, cls = _xyxy(ann["bbox"]), names[ann["category_id"]]
        if _max_iou(box, [b for b, c in objects[image["id"]] if c == cls]) >= 0.5:
            kind = "ok"
        elif _max_iou(box, [_xyxy(c) for c in image.get("confusers") or []]) >= 0.3:
            kind = "confuser"
        else:
            kind = "other"
        rows.append({"id": ann["pseudo_id"], "file_name": image["file_name"], "bbox": box, "class_name": cls,
                     "score": float(ann["score"]), "consistency": float(ann["consistency"]), "kind": kind})
    return rows


def band_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    per_class = {cls: dict(Counter(r["kind"] for r in rows if r["class_name"] == cls))
                 for cls in sorted({r["class_name"] for r in rows})}
    quartiles = {kind: {key: np.percentile([r[key] for r in rows if r["kind"] == kind], [25, 50, 75]).round(3).tolist()
                        for key in ("score", "consistency")}
                 for kind in KINDS if any(r["kind"] == kind for r in rows)}
    return {"counts": dict(Counter(r["kind"] for r in rows)), "per_class": per_class, "quartiles": quartiles}


@torch.inference_mode()
def roi_features(model: torch.nn.Module, pool_root: Path, boxes: list[dict[str, Any]]) -> np.ndarray:
    """P3 and P4 features under each box (xyxy, original pixels = the teacher's input: the demo pool is 128 px)."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, box in enumerate(boxes):
        by_file[box["file_name"]].append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(boxes)
    for file_name, idx in by_file.items():
        pixels = torch.from_numpy(read_image(pool_root / file_name)).permute(2, 0, 1).float()[None] / 255
        features = model(pixels)["features"]
        rois = torch.tensor([[0.0, *boxes[i]["bbox"]] for i in idx])
        levels = [roi_align(features[level], rois, output_size=2, spatial_scale=1 / (8 * 2 ** level),
                            sampling_ratio=2, aligned=True).flatten(1) for level in (0, 1)]
        feats = torch.cat([torch.nn.functional.normalize(f, dim=1) for f in levels], 1).numpy()
        for row, i in enumerate(idx):
            out[i] = feats[row]
    return np.stack(out)


def novelty(model: torch.nn.Module, project: Path, truth: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class: AUROC of the Mahalanobis distance and of the negated score for ``confuser`` vs ``ok`` boxes."""
    general = json.loads((project / "data/prepared/general/train.json").read_text())
    names = {c["id"]: c["name"] for c in general["categories"]}
    files = {img["id"]: img["file_name"] for img in general["images"]}
    gt = [{"file_name": files[a["image_id"]], "bbox": _xyxy(a["bbox"]), "class_name": names[a["category_id"]]}
          for a in general["annotations"]]
    x_gt = roi_features(model, project / "data/prepared/general/images", gt)
    y_gt = np.array([g["class_name"] for g in gt])
    means = {cls: x_gt[y_gt == cls].mean(0) for cls in sorted(set(y_gt.tolist()))}
    precision = LedoitWolf().fit(x_gt - np.stack([means[c] for c in y_gt])).precision_
    rows = [r for r in truth if r["kind"] in ("ok", "confuser")]
    diff = roi_features(model, project / "data/prepared/scenario/pool", rows) - np.stack(
        [means[r["class_name"]] for r in rows])
    distance = np.einsum("ij,jk,ik->i", diff, precision, diff)
    out = {}
    for cls in sorted({r["class_name"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["class_name"] == cls]
        confuser = np.array([rows[i]["kind"] == "confuser" for i in idx])
        if confuser.all() or not confuser.any():
            continue  # AUROC needs both kinds
        out[cls] = {"ok": int((~confuser).sum()), "confuser": int(confuser.sum()),
                    "auroc_distance": round(float(roc_auc_score(confuser, distance[idx])), 3),
                    "auroc_low_score": round(float(roc_auc_score(confuser, [-rows[i]["score"] for i in idx])), 3)}
        print(f"novelty {cls}: {out[cls]}")
    return {"fitted_on": f"{len(gt)} general-train ground-truth boxes", "per_class": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default=str(ROOT), help="where dvc repro ran (default: this repository)")
    parser.add_argument("--review", type=int, default=150, help="queued images the simulated reviewer decides")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/review_propagation.json"))
    args = parser.parse_args(argv)
    project = Path(args.project)

    def read(rel: str) -> Any:
        return json.loads((project / rel).read_text())

    accepted, queue = read("data/filtered/accepted.json"), read("data/filtered/review_queue.json")
    rejected, hidden = read("data/filtered/rejected.json"), read("data/prepared/scenario/pool_hidden.json")
    decisions, stats = simulate_review(queue, accepted, rejected, hidden, n_images=args.review)
    reviewed = set(list(dict.fromkeys(r["file_name"] for r in queue))[:args.review])
    truth = accepted_truth(accepted, hidden)
    shown = {label["id"]: {**label, "file_name": name}
             for name, labels in reviewable_labels(accepted, [*queue, *rejected], 0.5).items() for label in labels}
    examples = [{**shown[pid], "rejected": d["decision"] == "reject"} for pid, d in decisions["labels"].items()]
    targets = [r for r in truth if r["file_name"] not in reviewed]
    print(f"reviewed {stats}; {len(examples)} examples, {len(targets)} unreviewed accepted boxes "
          f"{dict(Counter(r['kind'] for r in targets))}")

    model, _ = load_model(project / "models/teacher/model.pt", lambda config: create_model(**config))
    feats = roi_features(model, project / "data/prepared/scenario/pool", examples + targets)
    x_train, x_test = feats[:len(examples)], feats[len(examples):]
    y_train = np.array([e["rejected"] for e in examples])
    settings = []
    for same_class in (False, True):
        for k in (3, 5, 9):
            prob = np.zeros(len(targets))
            for cls in sorted({t["class_name"] for t in targets}) if same_class else [None]:
                train = [i for i, e in enumerate(examples) if cls is None or e["class_name"] == cls]
                test = [i for i, t in enumerate(targets) if cls is None or t["class_name"] == cls]
                if len(set(y_train[train].tolist())) < 2:
                    continue  # nothing rejected (or nothing kept) of this class: nothing to propagate
                knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine")
                prob[test] = knn.fit(x_train[train], y_train[train]).predict_proba(x_test[test])[:, 1]
            for thr in (0.5, 0.67):
                flagged = Counter(t["kind"] for t, p in zip(targets, prob) if p > thr)
                settings.append({"same_class": same_class, "k": k, "thr": thr,
                                 "flagged": {kind: flagged.get(kind, 0) for kind in KINDS}})
                print(f"same_class={same_class!s:5} k={k} thr={thr}: flagged {settings[-1]['flagged']}")
    result = {
        "accepted_band": band_summary(truth), "review_images": args.review, "review": stats,
        "examples": {"rejected": int(y_train.sum()), "kept": int((~y_train).sum())},
        "unreviewed_accepted": dict(Counter(r["kind"] for r in targets)), "settings": settings,
        "novelty": novelty(model, project, truth),
        "features": "teacher neck P3+P4, roi_align 2x2, L2 per level; cosine kNN (scikit-learn)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
