"""DVC stage `evaluate`: the teacher, every distilled student and every supervised baseline on the labelled scenario
test set, one prediction pass each. Writes metrics/summary.json (per model: mAP, AP50, AP75, per-class AP, mIoU,
confuser FP/image, params, GFLOPs; per student also the card's latencies, the AP50 lift over its baseline and its
AP50 and GFLOPs ratios to the teacher), reports/summary.md with reports/pr_curves.png and reports/samples.png, and
the PR curves as plots/evaluate/pr_curves.csv for `dvc plots`. Logic: dataengine/evaluation/report.py."""

from __future__ import annotations

import argparse
import sys

from dataengine.engine.checkpoint import CheckpointError
from dataengine.evaluation.report import run_evaluation, summary_lines
from dataengine.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default="models/teacher/model.pt", help="teacher checkpoint")
    parser.add_argument("--students", default="models/students", help="folder of <name>/model.pt + card.json")
    parser.add_argument("--baselines", default="models/baselines", help="folder of <name>/model.pt")
    parser.add_argument("--data", default="data/prepared", help="prepared data root (scenario/test.json)")
    parser.add_argument("--metrics", default="metrics/summary.json", help="summary JSON to write")
    parser.add_argument("--report", default="reports", help="folder of summary.md, pr_curves.png, samples.png")
    parser.add_argument("--plots", default="plots/evaluate", help="folder of pr_curves.csv (dvc plots)")
    args = parser.parse_args(argv)

    try:
        run = run_evaluation(args.teacher, args.students, args.baselines, args.data, metrics=args.metrics,
                             report_dir=args.report, plots_dir=args.plots, progress=sys.stderr.isatty())
    except (CheckpointError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    for note in run.notes:
        print(f"evaluate: note: {note}")
    print("\n".join(summary_lines(run.summary)))
    print(f"evaluate: {len(run.results)} models in {run.seconds:.1f} s; wrote "
          + ", ".join(str(p) for p in run.outputs.values()))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", main))
