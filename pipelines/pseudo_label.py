"""DVC stage `pseudo_label`: the teacher labels the scenario pool (boxes with TTA agreement, soft segmentation) into
<out>/pool, and general val (boxes only, same TTA) into <out>/val for the filter stage's calibration. Runs
single-process or under `torchrun --nproc_per_node N` (chunks are shared out; rank 0 merges and writes
<out>/stats.json). A killed run re-run reuses the finished chunks."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from dataengine.config import load_params
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.data.images import list_images
from dataengine.data.layout import PreparedLayout
from dataengine.engine.checkpoint import load_model
from dataengine.engine.distributed import cleanup, init_distributed, is_main_process, process_device
from dataengine.io import atomic_write_json
from dataengine.models import create_model
from dataengine.pseudo import label_images
from dataengine.stage import run_stage


def _adaptation(pool: dict[str, Any], val: dict[str, Any]) -> str:
    """How the teacher's BatchNorm statistics were set, for the stage's summary line."""
    if pool["adapt_bn"] is None:
        return "BatchNorm statistics of general train (adapt_bn off, or no BatchNorm)"
    return (f"BatchNorm statistics re-estimated on {pool['adapt_bn']['images']} pool and "
            f"{val['adapt_bn']['images']} val images")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--teacher", default="models/teacher", help="teacher directory holding model.pt")
    parser.add_argument("--data", default="data/prepared", help="prepared data root (from the prepare stage)")
    parser.add_argument("--out", default="data/pseudo", help="output directory (pool/, val/, stats.json)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args()

    init_distributed()
    params = load_params(args.params, ["pseudo_label"]).pseudo_label
    layout, out = PreparedLayout(args.data), Path(args.out)
    val = load_coco(layout.general_val)
    cats = CategoryMap.from_coco(val)
    # The classes of the prepared data are the truth; a teacher trained on others stops here with both lists.
    model, _ = load_model(Path(args.teacher) / "model.pt", lambda c: create_model(**c), class_names=list(cats.names))
    model.to(process_device())
    pool_files = list_images(layout.pool_images)
    if not pool_files:
        sys.exit(f"pseudo_label: the scenario pool {layout.pool_images} holds no images (extensions "
                 ".jpg .jpeg .png .bmp .webp, nested folders allowed); nothing to label")

    progress = not args.no_progress
    pool = label_images(model, layout.pool_images, pool_files, params, out / "pool", categories=cats,
                        progress=progress)
    val_files = [image["file_name"] for image in val["images"]]
    calib = label_images(model, layout.general_images, val_files, dataclasses.replace(params, segmentation=False),
                         out / "val", categories=cats, progress=progress)
    if is_main_process():
        atomic_write_json(out / "stats.json", {"pool": pool, "val": calib})
        speed = (f"{pool['images_per_second']} img/s" if pool["labelled_this_run"]
                 else f"all {pool['reused_chunks']} chunks reused")
        print(f"pseudo_label: pool {pool['images']} images ({pool['skipped']} unreadable, skipped), {pool['boxes']} "
              f"boxes, {speed}; val {calib['images']} images, {calib['boxes']} boxes; "
              f"{_adaptation(pool, calib)}; wrote {out}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("pseudo_label", main))
