"""Benchmark: what each part of the engine adds to a student, on the labelled scenario test set.

Trains the same student (``--student``, default the first of ``params.distill.students``) with the same budget
(``distill.train.epochs x distill.epoch_size`` images) in cumulative variants:

    baseline         general ground truth only (the ``baseline`` stage)
    pseudo           + the curated scenario set (accepted and reviewed pseudo-labels); no teacher at train time
    distill          + distillation from the teacher (every KD weight of params)
    rebalance        + the rebalance stage's sampling plan
    hard_negatives   + the mine stage's hard regions and pixels, and segmentation OHEM (= the ``distill`` stage)

and scores each on the scenario test set: mAP, AP50, per-class AP, mIoU, confuser false positives per image
(score >= :data:`FP_SCORE` 0.3, see :func:`dataengine.evaluation.confuser_false_positives`) with the recall of the
test objects at that score, and confuser false positives at matched
recall (:data:`MATCHED_RECALL` of the test objects, each model at its own threshold,
:func:`dataengine.evaluation.confuser_false_positives_at_recall`: a model that is merely less confident everywhere
gains nothing there). Variants before ``hard_negatives`` run
with OHEM off, so the last step measures image-level + pixel-level mining together (issue 6's ablation).

Writes ``benchmarks/results/distill_ablation.json`` (every variant) and ``benchmarks/results/curation_ablation.json``
(issue 6's keys: the rarest class's AP without/with rebalancing, i.e. ``distill`` vs ``rebalance``, and confuser
false positives and AP50 without/with mining, i.e. ``rebalance`` vs ``hard_negatives``).

Needs the outputs of ``dvc repro`` up to the mine stage (data/curated, data/rebalance, data/mined, the teacher).

``--oracle-review N`` measures the same variants with review input: a simulated reviewer
(:mod:`dataengine.review.oracle`, decisions from the pool's hidden labels, ``source: simulated``) goes through the
first N images of the review queue (with ``--oracle-audit``, the filter's audit sample first); the filter, review,
rebalance and mine stage scripts then re-run on those decisions into ``<work>/[audit_]review<N>/``, as ``dvc repro``
does after a pull (the filter re-calibrates classes on the decisions), and the variants train on that curated set,
plan and mined negatives. Results go to ``distill_ablation_[audit_]review<N>.json`` and under ``"simulated_review"``
in ``curation_ablation.json``. Runs made before 2026-11-24 did not re-run the filter: ``filter.min_reviewed_accepted:
0`` in ``--params`` reproduces them. ``--oracle-review 0`` re-runs the four stages with no decisions: the plain
pipeline under ``--params``. Without ``--oracle-review`` the variants train on ``data/``, made by ``dvc repro`` with
``params.yaml``, so a ``--params`` with other ``filter``, ``rebalance`` or ``mine`` settings needs ``--oracle-review
0`` to take effect.

``--oracle-mining`` (with ``--oracle-review``) is a diagnostic of the mining's ceiling: every confuser of the pool
(hidden labels) is added as a region to the mine stage's output (:func:`oracle_mined`, ``<work>/review<N>/
mined_oracle/``) before training, i.e. perfect image-level mining. Results go to
``distill_ablation_review<N>_oracle_mining.json``; ``curation_ablation.json`` is not touched.

``--pseudo DIR --filtered DIR`` (with ``--oracle-review``) swap the labels: the simulated reviewer goes through
``--filtered``'s audit and queue, and filter, review and mine re-run on ``--pseudo``. With a scale set of
``benchmarks/tta_scales.py`` (``<its work>/scales<tag>/pseudo`` and ``.../none/filtered``, and its ``params.yaml``
as ``--params``) it trains the students on the labels of other test-time scales.

``--epochs E`` gives every variant a larger budget (``E x distill.epoch_size`` images instead of the default 6 x 1,200,
which is set by the 15-minute demo). Results go to ``..._epochs<E>.json`` and ``curation_ablation.json`` under
``"simulated_review_epochs<E>"`` (with ``--oracle-review``) or ``"default_run_epochs<E>"``.

Usage:
    python benchmarks/distill_ablation.py                       # all variants, ~2-3 min each on 2 CPU cores
    python benchmarks/distill_ablation.py --variants distill rebalance --seeds 0 1
    python benchmarks/distill_ablation.py --oracle-review 150 --variants rebalance hard_negatives
    python benchmarks/distill_ablation.py --oracle-review 432 --variants rebalance hard_negatives --seeds 0 1 2 3 --reuse
    python benchmarks/distill_ablation.py --oracle-review 432 --oracle-mining --variants hard_negatives --seeds 0 1 2 3
    python benchmarks/distill_ablation.py --oracle-review 432 --epochs 18 --variants rebalance hard_negatives --seeds 0 1 2 3
    python benchmarks/distill_ablation.py --oracle-review 432 --oracle-audit --variants rebalance hard_negatives
    S=benchmarks/work/tta_scales/scales1.25-1.5; python benchmarks/distill_ablation.py --oracle-review 0
        --oracle-audit --variants hard_negatives --seeds 0 1 --params $S/params.yaml --pseudo $S/pseudo
        --filtered $S/none/filtered --work $S/distill --out $S/distill.json --curation-out $S/curation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dataengine.config import DistillLossParams, DistillParams, load_params
from dataengine.curation.mining import MINED_FILE, hard_map, map_path
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.distill import train_student
from dataengine.engine.checkpoint import load_model
from dataengine.evaluation import (
    SegmentationMeter,
    confuser_false_positives,
    confuser_false_positives_at_recall,
    evaluate_detection,
    precision_recall_at,
)
from dataengine.inference import predict_coco
from dataengine.io import atomic_write_json
from dataengine.models import create_model
from dataengine.review.oracle import review_plan, simulate_review
from dataengine.review.decisions import write_decisions

VARIANTS = ("baseline", "pseudo", "distill", "rebalance", "hard_negatives")
MATCHED_RECALL = 0.75  # confuser FPs are also read where each model finds 75 % of the test objects (see score())
FP_SCORE = 0.3  # the fixed score threshold of the confuser FP count; the recall of real objects there is reported too
NO_KD = DistillLossParams(cls_kd=0.0, box_kd=0.0, feature=0.0, seg_kd=0.0)


def variant_params(base: DistillParams, variant: str, seed: int) -> tuple[DistillParams, bool]:
    """Params of one cumulative variant, and whether it is the baseline."""
    no_ohem = dataclasses.replace(base.segmentation_loss, ohem=False)
    train = dataclasses.replace(base.train, seed=seed)
    steps = {
        "baseline": dict(pseudo_labels=False, rebalance=False, hard_negatives=False, loss=NO_KD),
        "pseudo": dict(pseudo_labels=True, rebalance=False, hard_negatives=False, loss=NO_KD,
                       segmentation_loss=no_ohem),
        "distill": dict(pseudo_labels=True, rebalance=False, hard_negatives=False, segmentation_loss=no_ohem),
        "rebalance": dict(pseudo_labels=True, rebalance=True, hard_negatives=False, segmentation_loss=no_ohem),
        "hard_negatives": dict(pseudo_labels=True, rebalance=True, hard_negatives=True),
    }
    return dataclasses.replace(base, train=train, **steps[variant]), variant == "baseline"


def with_epochs(base: DistillParams, epochs: int) -> DistillParams:
    """``base`` with a budget of ``epochs x epoch_size`` images (``--epochs``), evaluated on general val once, after
    the last epoch (the ablation scores only the final checkpoint; each evaluation also draws from the global RNG, so
    ``eval_every`` is part of what makes a run reproducible); nothing else changes."""
    train = dataclasses.replace(base.train, epochs=epochs, eval_every=epochs)
    return dataclasses.replace(base, train=train)


def score(checkpoint: Path, data: Path) -> dict[str, Any]:
    """Scenario-test metrics of a checkpoint (one prediction pass)."""
    test = load_coco(data / "scenario/test.json")
    model, ckpt = load_model(checkpoint, lambda config: create_model(**config))
    results, meter = predict_coco(model, test, data / "scenario/test", input_size=int(ckpt["input_size"]))
    det = evaluate_detection(test, results)
    out = {k: det[k] for k in ("mAP", "AP50", "per_class_AP")}
    out["confuser_fp_per_image"] = confuser_false_positives(test, results, score_threshold=FP_SCORE)[
        "confuser_fp_per_image"]
    # What the fixed threshold costs in real objects: a less confident model also finds fewer of them there.
    recall = precision_recall_at(test, [p for p in results if p["score"] >= FP_SCORE])["recall"]
    out["recall_at_fp_score"] = round(recall, 4) if recall is not None else None
    at = confuser_false_positives_at_recall(test, results, MATCHED_RECALL)
    out["confuser_fp_at_recall"] = at["confuser_fp_per_image"]
    out["score_threshold_at_recall"] = at["score_threshold"]
    out["mIoU"] = meter.compute()["mIoU"] if isinstance(meter, SegmentationMeter) else None
    return out


def rarest_class(general: Path, curated: Path) -> str:
    """The class with the fewest instances in the training set (general ground truth + curated scenario)."""
    cocos = [load_coco(general), load_coco(curated)]
    cats = CategoryMap.from_coco(cocos[0])
    counts = {name: 0 for name in cats.names}
    for coco in cocos:
        for ann in coco["annotations"]:
            counts[cats.names[cats.label(int(ann["category_id"]))]] += 1
    return min(counts, key=lambda name: (counts[name], name))


def simulated_review_inputs(n_images: int, audit: bool, params: str, data: Path, out: Path, *,
                            pseudo: Path = Path("data/pseudo"), filtered0: Path = Path("data/filtered")
                            ) -> dict[str, Any]:
    """Simulated decisions on the audit's images (``audit``) and the first ``n_images`` queued images of
    ``filtered0`` (the filter's output without decisions, on ``pseudo``); then filter, review, rebalance and mine
    re-run on them and on ``pseudo``, as ``dvc repro`` does after a pull.

    The filter re-calibrates classes on the decisions (``filter.min_reviewed_accepted``; 0 in ``params`` keeps the
    val calibration, the protocol of the runs made before the filter read decisions).

    Returns ``{"curated", "plan", "mined", "review_stats", "mine", "pseudo"}`` (paths under ``out`` and what happened).
    """
    out.mkdir(parents=True, exist_ok=True)
    read = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    audit_records = read(filtered0 / "audit.json") if audit else []
    records, n_total = review_plan(read(filtered0 / "review_queue.json"), audit_records, n_images)
    decisions, stats = simulate_review(records, read(filtered0 / "accepted.json"), read(filtered0 / "rejected.json"),
                                       read(data / "scenario/pool_hidden.json"), n_images=n_total)
    write_decisions(out / "decisions.json", decisions)
    print(f"simulated review of {n_total} images ({'the audit and ' if audit else ''}{n_images} queued): {stats}",
          flush=True)
    py = sys.executable
    filtered = out / "filtered"
    steps = [
        [py, "pipelines/filter.py", "--params", params, "--pseudo", str(pseudo), "--data", str(data),
         "--decisions", str(out / "decisions.json"), "--out", str(filtered), "--metrics", str(out / "pseudo.json")],
        [py, "pipelines/review.py", "--filtered", str(filtered), "--pseudo", str(pseudo), "--data", str(data),
         "--decisions", str(out / "decisions.json"), "--out", str(out / "curated"), "--metrics",
         str(out / "review.json")],
        [py, "pipelines/rebalance.py", "--params", params, "--general", str(data / "general/train.json"),
         "--curated", str(out / "curated/scenario.json"), "--out", str(out / "rebalance"), "--metrics",
         str(out / "rebalance.json"), "--plot", str(out / "rebalance.png"), "--table", str(out / "rebalance.csv")],
        [py, "pipelines/mine.py", "--params", params, "--teacher", "models/teacher/model.pt", "--data", str(data),
         "--curated", str(out / "curated/scenario.json"), "--pseudo", str(pseudo), "--review-queue",
         str(filtered / "review_queue.json"), "--decisions", str(out / "decisions.json"), "--out", str(out / "mined"),
         "--metrics", str(out / "mine.json")],
    ]
    for cmd in steps:
        subprocess.run(cmd, check=True)
    pseudo = read(out / "pseudo.json")
    return {"curated": out / "curated/scenario.json", "plan": out / "rebalance/plan.json", "mined": out / "mined",
            "review_stats": {**stats, "images": n_total}, "mine": read(out / "mine.json"),
            "pseudo": {k: pseudo.get(k) for k in ("accepted", "review", "reviewed_labels", "true_precision",
                                                  "true_recall")}
            | {"calibration": {k: v["calibration"] for k, v in pseudo["per_class"].items()}}}


def oracle_mined(mined: Path, out: Path, curated: Path, hidden: Path) -> dict[str, int]:
    """Copy the mine stage's output to ``out`` and add every confuser of ``hidden`` as a region (perfect mining).

    A region's bits are OR-ed into the image's map (:func:`dataengine.curation.mining.hard_map`); an image with
    confusers and no entry gets one. Only images of the curated set are touched (the student trains on no other).
    """
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(mined, out)
    doc = json.loads((out / MINED_FILE).read_text())
    ids = {img["file_name"]: int(img["id"]) for img in load_coco(curated)["images"]}
    entries = {(e["source"], e["file_name"]): e for e in doc["images"]}
    added = images = 0
    for img in load_coco(hidden)["images"]:
        name = img["file_name"]
        if not img.get("confusers") or name not in ids:
            continue
        entry = entries.setdefault(("scenario", name), {"source": "scenario", "file_name": name, "image_id": ids[name],
                                                        "reasons": ["teacher_fp"], "regions": [], "hard_pixels": 0,
                                                        "map": None})
        regions = [{"bbox": [x, y, x + w, y + h], "class_name": "confuser", "score": 1.0}
                   for x, y, w, h in img["confusers"]]
        bits = np.array(Image.open(out / entry["map"])) if entry["map"] else \
            np.zeros((int(img["height"]), int(img["width"])), np.uint8)
        bits |= hard_map(regions, np.zeros(bits.shape, bool))
        entry["map"] = map_path("scenario", name)
        (out / entry["map"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(bits).save(out / entry["map"])
        entry["regions"] += regions
        added, images = added + len(regions), images + 1
    doc["images"] = sorted(entries.values(), key=lambda e: (e["source"], e["file_name"]))
    atomic_write_json(out / MINED_FILE, doc)
    return {"confuser_regions_added": added, "images": images}


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("mAP", "AP50", "mIoU", "confuser_fp_per_image", "recall_at_fp_score", "confuser_fp_at_recall",
                "score_threshold_at_recall", "train_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.fmean(values), 4) if values else None
        if len(values) > 1:
            out[key + "_std"] = round(statistics.stdev(values), 4)
    out["per_class_AP"] = {c: round(statistics.fmean(r["per_class_AP"][c] for r in runs), 4)
                           for c in runs[0]["per_class_AP"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--student", default=None, help="a key of distill.students (default: the first)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--work", default="benchmarks/work/distill_ablation", help="checkpoints (gitignored)")
    parser.add_argument("--out", default="benchmarks/results/distill_ablation.json")
    parser.add_argument("--curation-out", default="benchmarks/results/curation_ablation.json")
    parser.add_argument("--oracle-review", type=int, default=None, metavar="N",
                        help="simulate a reviewer on the first N queued images first, then re-run review, rebalance "
                             "and mine with --params (0: no decisions; see the module docstring)")
    parser.add_argument("--oracle-audit", action="store_true",
                        help="with --oracle-review: the simulated reviewer checks the filter's audit sample first")
    parser.add_argument("--pseudo", type=Path, default=Path("data/pseudo"),
                        help="with --oracle-review: the pseudo_label output to filter, review and mine (e.g. one of "
                             "benchmarks/tta_scales.py's scale sets; default: %(default)s)")
    parser.add_argument("--filtered", type=Path, default=Path("data/filtered"),
                        help="with --oracle-review: the filter's output on --pseudo without decisions, whose audit "
                             "and queue the simulated reviewer goes through (default: %(default)s)")
    parser.add_argument("--oracle-mining", action="store_true",
                        help="with --oracle-review: add every pool confuser as a mined region (the mining's ceiling)")
    parser.add_argument("--epochs", type=int, default=0, metavar="E",
                        help="train every variant for E epochs of distill.epoch_size images instead of "
                             "distill.train.epochs (a larger budget than the 15-minute demo's); results get the suffix "
                             "_epochs<E> and go under their own key of curation_ablation.json")
    parser.add_argument("--reuse", action="store_true",
                        help="score the checkpoints a previous run left in --work instead of training again (to read "
                             "old runs with a new metric; train_seconds is then null); a missing one is trained")
    args = parser.parse_args()
    if args.oracle_review is not None and args.oracle_review < 0:
        parser.error(f"--oracle-review must be >= 0 queued images, got {args.oracle_review}")
    if args.oracle_mining and args.oracle_review is None:
        parser.error("--oracle-mining needs --oracle-review N")
    if (args.pseudo, args.filtered) != (Path("data/pseudo"), Path("data/filtered")) and args.oracle_review is None:
        parser.error("--pseudo and --filtered need --oracle-review N (0: no decisions): without it the variants "
                     "train on data/, made by dvc repro")
    if args.oracle_audit and args.oracle_review is None:
        parser.error("--oracle-audit needs --oracle-review N (0: the audit only)")
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 1 (or left out for distill.train.epochs), got {args.epochs}")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    params = load_params(args.params, ["distill", "mine"])
    if args.epochs:
        params = dataclasses.replace(params, distill=with_epochs(params.distill, args.epochs))
    student = args.student or next(iter(params.distill.students))
    data, work = Path(args.data), Path(args.work)
    inputs: dict[str, Any] = {"curated": Path("data/curated/scenario.json"), "plan": Path("data/rebalance/plan.json"),
                              "mined": Path("data/mined")}
    if args.oracle_review is not None:
        tag = f"{'audit_' if args.oracle_audit else ''}review{args.oracle_review}"
        inputs = simulated_review_inputs(args.oracle_review, args.oracle_audit, args.params, data, work / tag,
                                         pseudo=args.pseudo, filtered0=args.filtered)
        work = work / tag
        args.out = args.out.replace(".json", f"_{tag}.json")
        if args.oracle_mining:
            inputs["oracle_mining"] = oracle_mined(Path(inputs["mined"]), work / "mined_oracle", Path(inputs["curated"]),
                                                   data / "scenario/pool_hidden.json")
            inputs["mined"] = work / "mined_oracle"
            args.out = args.out.replace(".json", "_oracle_mining.json")
            print(f"oracle mining: {inputs['oracle_mining']}", flush=True)
    if args.epochs:
        args.out = args.out.replace(".json", f"_epochs{args.epochs}.json")
    rare = rarest_class(data / "general/train.json", Path(inputs["curated"]))
    results: dict[str, Any] = {}
    for variant in args.variants:
        runs = []
        for seed in args.seeds:
            vp, baseline = variant_params(params.distill, variant, seed)
            out_dir = work / f"{variant}_seed{seed}"
            t0 = time.perf_counter()
            reused = args.reuse and (out_dir / "model.pt").is_file()
            if not reused:
                train_student(student, vp, params.mine, teacher="models/teacher/model.pt", data_root=data,
                              curated=inputs["curated"], plan=inputs["plan"], mined=inputs["mined"],
                              out_dir=out_dir, log_dir=out_dir / "dvclive", baseline=baseline, resume=False,
                              progress=False)
            run = score(out_dir / "model.pt", data)
            run["train_seconds"] = None if reused else round(time.perf_counter() - t0, 1)
            runs.append(run)
            print(f"{variant:15s} seed {seed}: AP50 {run['AP50']:.4f} mAP {run['mAP']:.4f} {rare} AP "
                  f"{run['per_class_AP'][rare]:.4f} confuser FP/img {run['confuser_fp_per_image']} "
                  f"(at recall {MATCHED_RECALL}: {run['confuser_fp_at_recall']}) "
                  f"({run['train_seconds']} s)", flush=True)
        results[variant] = {**mean_over_seeds(runs), "runs": runs}

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "student": student,
            "seeds": args.seeds, "budget_images": params.distill.train.epochs * params.distill.epoch_size,
            "test_set": str(data / "scenario/test.json"), "params": str(args.params),
            "mine": dataclasses.asdict(params.mine)}
    if args.oracle_review is not None:
        meta["simulated_review"] = {"images": args.oracle_review, "audit": args.oracle_audit,
                                    "pseudo": str(args.pseudo), "filtered": str(args.filtered),
                                    "decisions": inputs["review_stats"], "filter": inputs["pseudo"],
                                    "mined": {k: inputs["mine"]["total"][k] for k in
                                              ("hard_negative_images", "by_reason", "regions", "regions_by_class",
                                               "hard_pixels", "hard_pixels_by_class")}}
        if args.oracle_mining:
            meta["oracle_mining"] = inputs["oracle_mining"]
    atomic_write_json(args.out, {**meta, "variants": results}, indent=1)
    curation: dict[str, Any] = {}
    if {"distill", "rebalance"} <= set(results):
        curation.update({"rarest_class": rare, "rare_AP_without": results["distill"]["per_class_AP"][rare],
                         "rare_AP_with": results["rebalance"]["per_class_AP"][rare]})
    if {"rebalance", "hard_negatives"} <= set(results):
        without = results["rebalance"]["confuser_fp_per_image"]
        with_ = results["hard_negatives"]["confuser_fp_per_image"]
        at_without = results["rebalance"]["confuser_fp_at_recall"]
        at_with = results["hard_negatives"]["confuser_fp_at_recall"]
        curation.update({"confuser_fp_without": without, "confuser_fp_with": with_,
                         "matched_recall": MATCHED_RECALL, "confuser_fp_at_recall_without": at_without,
                         "confuser_fp_at_recall_with": at_with,
                         "confuser_fp_at_recall_reduction": round(1 - at_with / at_without, 4) if at_without else None,
                         "AP50_without": results["rebalance"]["AP50"], "AP50_with": results["hard_negatives"]["AP50"],
                         "recall_at_fp_score_without": results["rebalance"].get("recall_at_fp_score"),
                         "recall_at_fp_score_with": results["hard_negatives"].get("recall_at_fp_score"),
                         "confuser_fp_reduction": round(1 - with_ / without, 4) if without else None})
    if curation and not args.oracle_mining:
        curation.update({"comparison": {"rebalancing": "variant 'distill' (without) vs 'rebalance' (with)",
                                        "mining": "variant 'rebalance' (without) vs 'hard_negatives' (with: mined "
                                                  "regions and pixels + OHEM)"}, **meta})
        path = Path(args.curation_out)
        doc = json.loads(path.read_text()) if path.exists() else {}
        if args.epochs:  # another budget: its own key, the top-level keys stay the default budget's
            key = f"{'simulated_review' if args.oracle_review else 'default_run'}_epochs{args.epochs}"
            doc[key] = {**doc.get(key, {}), **curation}
        elif args.oracle_review:  # nested: the top-level keys stay the plain pipeline's (no review decisions)
            doc["simulated_review"] = {**doc.get("simulated_review", {}), **curation}
        else:
            doc.update(curation)
        atomic_write_json(path, doc, indent=1)
        print(json.dumps({k: v for k, v in curation.items() if k not in meta and k != "comparison"}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
