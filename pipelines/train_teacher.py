"""DVC stage `train_teacher`: train the multi-task teacher on general train, score it on general val and the
scenario test set. Runs single-process or under `torchrun --nproc_per_node N` (only rank 0 writes)."""

from __future__ import annotations

import argparse
import sys

from dataengine.config import load_params
from dataengine.engine.distributed import cleanup, is_main_process
from dataengine.io import atomic_write_json
from dataengine.stage import run_stage
from dataengine.teacher import train_teacher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data", default="data/prepared", help="prepared data root (from the prepare stage)")
    parser.add_argument("--out", default="models/teacher", help="checkpoint directory")
    parser.add_argument("--log-dir", default="dvclive/teacher", help="DVCLive directory (training curves)")
    parser.add_argument("--metrics", default="metrics/teacher.json", help="metrics JSON to write")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    args = parser.parse_args()

    params = load_params(args.params, ["teacher"])
    metrics = train_teacher(params.teacher, args.data, args.out, args.log_dir, resume=not args.no_resume)
    if is_main_process():
        atomic_write_json(args.metrics, metrics)
        print(f"train_teacher: general val AP50 {metrics['general_val'].get('AP50')}, "
              f"scenario test AP50 {metrics.get('scenario_test', {}).get('AP50')}; wrote {args.out}, {args.metrics}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("train_teacher", main))
