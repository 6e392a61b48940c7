"""DVC stage `rebalance`: per-image repeat factors over the curated training set (general ground truth + the
curated scenario set) whose expected class distribution is closest (KL) to the target in params `rebalance`.
Writes the sampling plan (data/rebalance/plan.json, read by the student's sampler), metrics/rebalance.json, a PNG
bar chart and a per-class CSV for `dvc plots`. Algorithm and edge cases: dataengine/curation/rebalance.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataengine.config import load_params
from dataengine.curation import (
    class_table_csv,
    plan_document,
    plot_rebalance,
    rebalance_coco,
    rebalance_metrics,
    summary_lines,
)
from dataengine.data.coco import load_coco
from dataengine.io import atomic_write_json, atomic_write_text
from dataengine.stage import run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (section `rebalance`)")
    parser.add_argument("--general", default="data/prepared/general/train.json", help="general ground truth (COCO)")
    parser.add_argument("--curated", default="data/curated/scenario.json", help="curated scenario set (COCO)")
    parser.add_argument("--out", default="data/rebalance", help="output folder (plan.json)")
    parser.add_argument("--metrics", default="metrics/rebalance.json", help="metrics JSON to write")
    parser.add_argument("--plot", default="plots/rebalance.png", help="bar chart PNG (before/after/target)")
    parser.add_argument("--table", default="plots/rebalance_classes.csv", help="per-class CSV for dvc plots")
    args = parser.parse_args()

    params = load_params(args.params, ["rebalance"]).rebalance
    paths = {"general": args.general, "scenario": args.curated}
    sources = {name: load_coco(paths[name]) for name in params.sources}
    if params.shares and params.target != "explicit":
        print(f"rebalance: note: shares are ignored with target {params.target!r} (they apply to 'explicit')")
    result = rebalance_coco(sources, params)

    out = Path(args.out)
    atomic_write_json(out / "plan.json", plan_document(result), indent=1)
    atomic_write_json(args.metrics, rebalance_metrics(result))
    atomic_write_text(args.table, class_table_csv(result))
    plot_rebalance(result, args.plot)
    print("\n".join(summary_lines(result)))
    print(f"rebalance: wrote {out / 'plan.json'}, {args.metrics}, {args.plot}, {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("rebalance", main))
