"""Benchmark: peak memory of the pool scan and of the pseudo_label stage for a scenario pool of 100 vs 10,000 images.

Memory must stay flat in the size of the pool: a pool is read one batch at a time and written one chunk at a time,
so 100x more images may cost time, not memory. Each measurement runs in a fresh process (no allocator state carried
over) and its peak resident set size is the kernel's ``ru_maxrss`` of that process, from ``os.wait4`` (the stage
runs with ``num_workers: 0``, the repository default: everything happens in that one process).

Measured per pool size:

- ``scan``: ``dataengine validate <pool folder>``, the prepare stage's check of the pool (decodes every image).
- ``label``: ``pipelines/pseudo_label.py`` (the stage script, as ``dvc repro`` runs it) on a prepared layout whose
  pool holds N images of 32x32 (nested in 10 camera folders, PNG), with a tiny untrained teacher
  (``mobilenet_v3_small_gfl``, 64 px: memory, not speed, is measured) and two-scale TTA (flip x scales 1.0, 1.5:
  64 and 96 px, segmentation on). Its detection threshold is set low (0.005, at most 20 boxes per view, about 40
  per image after fusion) so that every image yields boxes and ``predictions.json`` is large per image.

Found with it: the merge into ``predictions.json`` built the whole merged dict first, 395,000 box records for
10,000 images (+295 MB, ratio 1.32); it now streams one chunk at a time.

Writes ``benchmarks/results/pool_memory.json``: ``{"images_small", "images_large", "peak_rss_mb_small",
"peak_rss_mb_large", "ratio", "date", "machine", ...}``; ``peak_rss_mb_*`` and ``ratio`` are those of the stage
(the larger of the two measurements), and ``runs`` has every measurement with its wall time and output size.

Usage:
    python benchmarks/pool_memory.py                      # 100 vs 10,000 (about 5 minutes on 2 cores)
    python benchmarks/pool_memory.py --large 2000 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIDE = 32
CAMERAS = 10
PARAMS = {"pseudo_label": {"batch_size": 16, "num_workers": 0, "tta_hflip": True, "tta_scales": [1.0, 1.5],
                           "score_threshold": 0.005, "max_detections": 20, "chunk_size": 64, "segmentation": True}}


def make_project(root: Path, n_images: int, *, input_size: int = 64, params: dict[str, Any] | None = None,
                 seed: int = 0) -> dict[str, Path]:
    """A prepared layout (tiny demo general val) whose scenario pool holds ``n_images`` random 32x32 PNGs, a tiny
    untrained teacher and a params file. Returns the paths the stage needs."""
    import torch

    from dataengine.config import DemoParams
    from dataengine.data.demo import CLASS_NAMES, generate_demo
    from dataengine.engine.checkpoint import save_checkpoint
    from dataengine.models import create_model

    data = root / "prepared"
    generate_demo(data, DemoParams(seed=seed, image_size=64, n_train=1, n_val=4, n_pool=1, n_test=1), progress=False)
    pool = data / "scenario" / "pool"
    shutil.rmtree(pool)
    rng = np.random.default_rng(seed)
    for cam in range(CAMERAS):
        (pool / f"cam{cam}").mkdir(parents=True)
    for i in range(n_images):
        pixels = rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pool / f"cam{i % CAMERAS}" / f"{i:06d}.png", compress_level=1)
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small_gfl", num_classes=len(CLASS_NAMES), input_size=input_size)
    save_checkpoint(root / "teacher" / "model.pt", model_state=model.state_dict(), model_config=model.config,
                    class_names=list(CLASS_NAMES), input_size=input_size, mean=[0.485, 0.456, 0.406],
                    std=[0.229, 0.224, 0.225])
    (root / "params.yaml").write_text(yaml.safe_dump(params or PARAMS))
    return {"data": data, "pool": pool, "teacher": root / "teacher", "params": root / "params.yaml",
            "out": root / "pseudo"}


def peak_rss_mb(cmd: list[str], *, timeout: float) -> tuple[float, float]:
    """Run ``cmd`` in a fresh process; return its peak RSS in MB (``ru_maxrss`` from ``wait4``) and wall seconds.

    Raises:
        RuntimeError: The command failed (its output tail is in the message).
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024.0, seconds  # ru_maxrss is in KB on Linux


def measure(n_images: int, work: Path, *, timeout: float = 1800.0, **project: Any) -> dict[str, Any]:
    """Build a project with ``n_images`` pool images under ``work`` (``project``: :func:`make_project`'s options)
    and measure the scan and the stage."""
    paths = make_project(work, n_images, **project)
    scan_mb, scan_s = peak_rss_mb([sys.executable, "-m", "dataengine.cli", "validate", str(paths["pool"])],
                                  timeout=timeout)
    label_mb, label_s = peak_rss_mb([sys.executable, str(ROOT / "pipelines" / "pseudo_label.py"), "--params",
                                     str(paths["params"]), "--teacher", str(paths["teacher"]), "--data",
                                     str(paths["data"]), "--out", str(paths["out"]), "--no-progress"], timeout=timeout)
    stats = json.loads((paths["out"] / "stats.json").read_text())["pool"]
    if stats["images"] != n_images:
        raise RuntimeError(f"the stage labelled {stats['images']} of {n_images} images")
    return {"images": n_images, "scan": {"peak_rss_mb": round(scan_mb, 1), "seconds": round(scan_s, 1)},
            "label": {"peak_rss_mb": round(label_mb, 1), "seconds": round(label_s, 1), "boxes": stats["boxes"],
                      "predictions_mb": round((paths["out"] / "pool" / "predictions.json").stat().st_size / 2**20, 2)}}


def compare(small: int, large: int, work: Path, *, input_size: int = 64, params: dict[str, Any] | None = None,
            timeout: float = 1800.0) -> dict[str, Any]:
    """Measure both sizes (each in folders of its own under ``work``) and summarise."""
    params = params or PARAMS
    runs = [measure(n, work / str(n), input_size=input_size, params=params, timeout=timeout) for n in (small, large)]
    peak = {n: max(run["scan"]["peak_rss_mb"], run["label"]["peak_rss_mb"]) for n, run in zip((small, large), runs)}
    return {
        "images_small": small,
        "images_large": large,
        "peak_rss_mb_small": peak[small],
        "peak_rss_mb_large": peak[large],
        "ratio": round(peak[large] / peak[small], 3),
        "growth_mb": round(peak[large] - peak[small], 1),
        "scan_ratio": round(runs[1]["scan"]["peak_rss_mb"] / runs[0]["scan"]["peak_rss_mb"], 3),
        "label_ratio": round(runs[1]["label"]["peak_rss_mb"] / runs[0]["label"]["peak_rss_mb"], 3),
        "runs": runs,
        "params": params["pseudo_label"],
        "teacher": f"mobilenet_v3_small_gfl, untrained, input {input_size} px",
        "image_side": IMAGE_SIDE,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100, help="images in the small pool")
    parser.add_argument("--large", type=int, default=10_000, help="images in the large pool")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/pool_memory.json"))
    parser.add_argument("--keep", action="store_true", help="keep the generated pools (the path is printed)")
    args = parser.parse_args()

    from dataengine.io import atomic_write_json

    work = Path(tempfile.mkdtemp(prefix="dataengine-pool-memory-"))
    try:
        result = compare(args.small, args.large, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(args.out, result)
    for run in result["runs"]:
        print(f"{run['images']:>6} images: scan {run['scan']['peak_rss_mb']:7.1f} MB ({run['scan']['seconds']} s), "
              f"pseudo_label {run['label']['peak_rss_mb']:7.1f} MB ({run['label']['seconds']} s, "
              f"{run['label']['boxes']} boxes, predictions.json {run['label']['predictions_mb']} MB)")
    print(f"peak RSS {result['peak_rss_mb_small']} MB -> {result['peak_rss_mb_large']} MB: ratio {result['ratio']} "
          f"(+{result['growth_mb']} MB); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
