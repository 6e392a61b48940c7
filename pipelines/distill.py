"""DVC stages `distill` and `baseline` (one per student in params `distill.students`, via `foreach`).

distill: train a mobile student on general ground truth + the curated scenario set, drawn with the rebalance plan,
with the mined hard negatives weighted, distilling the teacher (dense class scores, box distributions, features,
segmentation). --baseline: the same architecture and budget on general ground truth only, nothing else: what the
student must beat. Runs single-process or under `torchrun --nproc_per_node N` (only rank 0 writes)."""

from __future__ import annotations

import argparse
import sys

from dataengine.config import load_params
from dataengine.distill import train_student
from dataengine.engine.distributed import cleanup, is_main_process
from dataengine.io import atomic_write_json
from dataengine.stage import run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="a key of params distill.students, e.g. mobilenet_v3_small")
    parser.add_argument("--params", default="params.yaml", help="params file (sections distill, mine)")
    parser.add_argument("--baseline", action="store_true", help="train the supervised baseline instead")
    parser.add_argument("--teacher", default="models/teacher/model.pt", help="teacher checkpoint")
    parser.add_argument("--data", default="data/prepared", help="prepared data root")
    parser.add_argument("--curated", default="data/curated/scenario.json", help="curated scenario set (COCO)")
    parser.add_argument("--plan", default="data/rebalance/plan.json", help="rebalance plan")
    parser.add_argument("--mined", default="data/mined", help="mine stage output folder")
    parser.add_argument("--out", required=True, help="checkpoint directory (model.pt, last.pt)")
    parser.add_argument("--log-dir", required=True, help="DVCLive directory (training curves)")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if last.pt exists")
    args = parser.parse_args()

    params = load_params(args.params, ["distill", "mine"])
    metrics = train_student(args.student, params.distill, params.mine, teacher=args.teacher, data_root=args.data,
                            curated=args.curated, plan=args.plan, mined=args.mined, out_dir=args.out,
                            log_dir=args.log_dir, baseline=args.baseline, resume=not args.no_resume)
    if is_main_process():
        atomic_write_json(args.metrics, metrics)
        role = "baseline" if args.baseline else "student"
        print(f"distill: {role} {args.student}: general val AP50 {metrics['general_val'].get('AP50')} after "
              f"{metrics['epochs']} epochs ({metrics['train_seconds']} s); wrote {args.out}, {args.metrics}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("distill", main))
