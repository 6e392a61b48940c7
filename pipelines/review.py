"""DVC stage `review`: apply the reviewers' versioned decisions (data/review/decisions.json) to the accepted
pseudo-labels -> the curated scenario set (COCO + semantic masks) and metrics/review.json. Without a decisions file
(or an empty one) the accepted set passes through. Decisions are pulled from the review tools by hand:
`dataengine review pull` (FiftyOne) and `dataengine review labelstudio pull`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataengine.data.coco import save_coco
from dataengine.io import atomic_write_json, read_json
from dataengine.review.curate import curate, review_metrics
from dataengine.review.decisions import load_decisions
from dataengine.review.inputs import load_review_inputs
from dataengine.stage import run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filtered", default="data/filtered", help="filter stage output (accepted.json, ...)")
    parser.add_argument("--pseudo", default="data/pseudo", help="pseudo_label stage output")
    parser.add_argument("--data", default="data/prepared", help="prepared data root")
    parser.add_argument("--decisions", default="data/review/decisions.json", help="the reviewers' decisions")
    parser.add_argument("--out", default="data/curated", help="output folder (scenario.json, semantic/)")
    parser.add_argument("--metrics", default="metrics/review.json", help="metrics JSON to write")
    args = parser.parse_args()

    inputs = load_review_inputs(args.filtered, args.pseudo, args.data)
    decisions = load_decisions(args.decisions)
    accepted = read_json(Path(args.filtered) / "accepted.json")
    out = Path(args.out)
    curated, stats = curate(accepted, inputs.records_by_id(), decisions, inputs.semantic_root, out / "semantic")
    save_coco(out / "scenario.json", curated)
    metrics = review_metrics(stats, decisions, curated)
    atomic_write_json(args.metrics, metrics)
    d = metrics["decisions"]
    print(f"review: {d['accept']} accepted, {d['reject']} rejected, {d['correct']} corrected, {d['added']} added, "
          f"{d['negative']} negatives, {d['relabel']} to relabel ({metrics['stale_decisions']} stale); curated set "
          f"{metrics['curated']['images']} images, {metrics['curated']['annotations']} boxes -> {out}, {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("review", main))
