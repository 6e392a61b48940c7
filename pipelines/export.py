"""DVC stage `export` (one per student): FP32 ONNX, INT8 ONNX (static quantisation calibrated on scenario pool images)
and a model card (card.json: classes, preprocessing, metrics of all three on the scenario test set, parity, latency,
size, provenance) written into the student directory. Exits 1 when FP32 ONNX loses more than
export.max_parity_map_drop mAP points against PyTorch (the card is still written, with parity.passed = false)."""

from __future__ import annotations

import argparse
import sys

from dataengine.config import load_params
from dataengine.engine.checkpoint import CheckpointError
from dataengine.export import ParityError, export_student
from dataengine.stage import run_stage


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-dir", required=True, help="models/students/<name> holding model.pt")
    parser.add_argument("--teacher", default="models/teacher/model.pt", help="teacher checkpoint (hashed in the card)")
    parser.add_argument("--data", default="data/prepared", help="prepared data root (scenario pool and test set)")
    parser.add_argument("--params", default="params.yaml", help="params file (section export)")
    parser.add_argument("--lock", default="dvc.lock", help="dvc.lock to read the distill@<name> md5s from")
    args = parser.parse_args()

    params = load_params(args.params, ["export"]).export
    try:
        card = export_student(args.student_dir, teacher=args.teacher, data_root=args.data, params=params,
                              lock_path=args.lock, log=_log)
    except (ParityError, CheckpointError, FileNotFoundError) as err:
        _log(f"export: error: {err}")
        return 1
    metrics = card["metrics"]
    _log(f"export: {card['name']}: mAP PyTorch {metrics['pytorch'].get('mAP')}, FP32 ONNX "
         f"{metrics['onnx_fp32'].get('mAP')}, INT8 {metrics['onnx_int8'].get('mAP')}; latency "
         f"{card['latency_ms']} ms FP32, {card['latency_ms_int8']} ms INT8; wrote model.onnx, model.int8.onnx, "
         f"card.json in {args.student_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("export", main))
