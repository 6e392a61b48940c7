"""DVC stage `mine`: image-level and pixel-level hard negatives of general train and the curated scenario set.

Image level: teacher boxes at or above `mine.score_threshold` that no label box matches (IoU >= `mine.match_iou`,
any class) -- on the scenario set only those a person rejected, unless `mine.unreviewed_rejects` -- and every image a
reviewer flagged `negative`; pixel level: teacher foreground >= `mine.pixel_confidence`
where the label says background. Writes data/mined/hard_negatives.json, per-image maps data/mined/maps/ (bit 1 region,
bit 2 hard pixel) and metrics/mine.json (with `hidden_label_check`, where the scenario pool's hidden labels exist:
how many scenario regions sit on real objects; diagnostic only). Rules and why: dataengine/curation/mining.py."""

from __future__ import annotations

import argparse
import sys
import time

from dataengine.config import load_params
from dataengine.curation import (
    mine_hard_negatives,
    mining_metrics,
    mining_summary_lines,
    regions_against_hidden,
    write_mined,
)
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.layout import PreparedLayout
from dataengine.engine.checkpoint import load_model
from dataengine.io import atomic_write_json, read_json
from dataengine.models import create_model
from dataengine.review.decisions import load_decisions
from dataengine.stage import run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (section `mine`)")
    parser.add_argument("--teacher", default="models/teacher/model.pt", help="teacher checkpoint")
    parser.add_argument("--data", default="data/prepared", help="prepare stage output")
    parser.add_argument("--curated", default="data/curated/scenario.json", help="curated scenario set (COCO)")
    parser.add_argument("--pseudo", default="data/pseudo", help="pseudo_label stage output (pool/predictions.json)")
    parser.add_argument("--review-queue", default="data/filtered/review_queue.json",
                        help="filter stage review queue: boxes nobody decided yet are never negatives")
    parser.add_argument("--decisions", default="data/review/decisions.json", help="reviewer decisions file")
    parser.add_argument("--out", default="data/mined", help="output folder (hard_negatives.json, maps/)")
    parser.add_argument("--metrics", default="metrics/mine.json", help="metrics JSON to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()

    start = time.perf_counter()
    params = load_params(args.params, ["mine"]).mine
    layout = PreparedLayout(args.data)
    decisions = load_decisions(args.decisions)
    review_queue = read_json(args.review_queue)
    if not isinstance(review_queue, list):
        raise SystemExit(f"mine: {args.review_queue}: expected a list of review records (filter stage output)")
    teacher = None
    if "general" in params.sources:
        names = list(CategoryMap.from_coco(load_coco(layout.general_train)).names)
        teacher, _ = load_model(args.teacher, lambda c: create_model(**c), class_names=names)
    result = mine_hard_negatives(params, data_root=args.data, curated=args.curated, pseudo=args.pseudo,
                                 decisions=decisions, review_queue=review_queue, teacher=teacher,
                                 progress=not args.no_progress)
    write_mined(result, args.out)
    metrics = mining_metrics(result)
    hidden = layout.pool_hidden
    if hidden.is_file() and "scenario" in result.images:  # diagnostic only: written after every decision above
        metrics["hidden_label_check"] = regions_against_hidden(result.images["scenario"], load_coco(hidden))
        check = metrics["hidden_label_check"]
        print(f"mine scenario, by the pool's hidden labels: of {check['regions']} regions, "
              f"{check['on_object_of_its_class'] + check['on_object_of_another_class']} sit on a real object, "
              f"{check['on_confuser']} on a look-alike, {check['elsewhere']} elsewhere")
    atomic_write_json(args.metrics, metrics)
    print("\n".join(mining_summary_lines(metrics)))
    print(f"mine: wrote {args.out}/hard_negatives.json ({metrics['listed_images']} images, "
          f"{metrics['total']['maps']} maps) and {args.metrics} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("mine", main))
