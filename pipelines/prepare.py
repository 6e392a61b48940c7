"""DVC stage `prepare`: demo generation / BCCD split / COCO import, then validation and counts."""

from __future__ import annotations

import argparse
import sys

from dataengine.config import load_params
from dataengine.data.prepare import DataValidationError, prepare_data
from dataengine.io import atomic_write_json
from dataengine.stage import run_stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", default="data/prepared", help="prepared data root")
    parser.add_argument("--metrics", default="metrics/data.json", help="metrics JSON to write")
    args = parser.parse_args()

    params = load_params(args.params, ["data"])
    try:
        metrics = prepare_data(params.data, args.out)
    except DataValidationError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 1
    atomic_write_json(args.metrics, metrics)
    print(f"prepare: wrote {args.out} and {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("prepare", main))
