"""DVC stage `filter`: calibrate the teacher on general val (and, per class, on the reviewers' decisions once there
are enough of them), split the pool's pseudo-labels into accepted / review / rejected, draw the audit sample, write
the filtered semantic masks, metrics/pseudo.json and the reliability plot (true quality, and the plot's pool series
from hidden labels, only where hidden labels exist)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataengine.config import load_params
from dataengine.data.coco import CategoryMap, load_coco, save_coco
from dataengine.data.layout import PreparedLayout
from dataengine.io import atomic_write_json, read_json
from dataengine.pseudo.calibrate import (
    fit_calibration,
    load_predictions,
    match_val_predictions,
    plot_reliability,
    recalibrate,
)
from dataengine.pseudo.filter import (
    audit_metrics,
    audit_sample,
    diagnostic_metrics,
    filter_pseudo_labels,
    pool_records,
    pseudo_metrics,
    reviewed_boxes,
    write_semantic_masks,
)
from dataengine.review.curate import teacher_verdicts
from dataengine.review.decisions import load_decisions
from dataengine.stage import run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--pseudo", default="data/pseudo", help="pseudo_label output (pool/, val/, stats.json)")
    parser.add_argument("--data", default="data/prepared", help="prepared data root (general val ground truth)")
    parser.add_argument("--decisions", default="data/review/decisions.json",
                        help="the reviewers' decisions: classes with enough of them are re-calibrated on them "
                             "(filter.min_reviewed_accepted); a missing file means none")
    parser.add_argument("--out", default="data/filtered", help="output directory")
    parser.add_argument("--metrics", default="metrics/pseudo.json", help="metrics JSON to write")
    args = parser.parse_args()

    params = load_params(args.params, ["filter"]).filter
    pseudo, out, layout = Path(args.pseudo), Path(args.out), PreparedLayout(args.data)
    pool = load_predictions(pseudo / "pool" / "predictions.json")
    val = match_val_predictions(load_predictions(pseudo / "val" / "predictions.json"), load_coco(layout.general_val),
                                params.match_iou)
    val_calibration = fit_calibration(val, pool["class_names"], params)
    records = pool_records(pool)
    verdicts = teacher_verdicts(load_decisions(args.decisions), records)
    reviewed = reviewed_boxes(records, verdicts)
    calibration = recalibrate(val_calibration, reviewed, params.min_reviewed_accepted)
    categories = CategoryMap.from_names(pool["class_names"])
    accepted, review, rejected, stats = filter_pseudo_labels(pool, calibration, params, categories, reviewed)
    audit = audit_sample(accepted, params.audit_per_class, params.audit_seed)

    write_semantic_masks(pool, pseudo / "pool", out, params.seg_confidence, categories)
    save_coco(out / "accepted.json", accepted)
    atomic_write_json(out / "review_queue.json", review, indent=1)
    atomic_write_json(out / "rejected.json", rejected, indent=None)
    atomic_write_json(out / "audit.json", audit, indent=1)
    atomic_write_json(out / "calibration.json", calibration.to_dict())

    # Speed of the labelling run that produced these predictions; a run that reused every chunk measured none.
    pseudo_stats = read_json(pseudo / "stats.json").get("pool", {}) if (pseudo / "stats.json").is_file() else {}
    speed = pseudo_stats.get("images_per_second") if pseudo_stats.get("labelled_this_run") else None
    metrics = pseudo_metrics(stats, accepted, calibration, speed)
    metrics["reviewed_labels"] = len(verdicts)
    metrics["audit"] = audit_metrics(audit, verdicts)
    pool_truth = None
    if layout.pool_hidden.is_file():  # diagnostic only: written after every decision above
        metrics.update(diagnostic_metrics(accepted, review, layout.pool_hidden, params.match_iou,
                                          metrics["estimated_precision"]))
        pool_truth = match_val_predictions(pool, load_coco(layout.pool_hidden), params.match_iou, split="pool")
    applied = {c.name: stats["per_class"][c.name]["threshold"] for c in calibration.classes if c.kind != "reviewed"}
    plot_reliability(val_calibration, val, out / "reliability.png", pool_truth=pool_truth, reviewed=reviewed,
                     applied=applied)  # a re-calibrated class's threshold is on another scale: not drawn
    atomic_write_json(args.metrics, metrics)
    refitted = [c.name for c in calibration.classes if c.kind == "reviewed"]
    print(f"filter: {stats['accepted']} accepted, {stats['review']} to review, {stats['rejected']} rejected "
          f"(estimated precision {metrics['estimated_precision']['overall']}, true "
          f"{metrics.get('true_precision', {}).get('overall', 'unknown')}); {len(verdicts)} reviewed labels, "
          f"re-calibrated on them: {', '.join(refitted) or 'none'}; audit sample {len(audit)} labels; "
          f"wrote {out}, {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("filter", main))
