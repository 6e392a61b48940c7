"""Benchmark: `dvc repro` of the whole demo pipeline from a fresh clone, then a second `dvc repro` (a no-op).

Clones the current commit (``git clone`` of this repository) into a temporary folder, runs ``dvc repro`` there with
this environment's ``dvc`` (the install is not timed: ``scripts/quickstart.sh repro`` does both), times it, runs
``dvc repro`` again (it must do nothing), and records the peak resident memory of the largest process of the run
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the biggest child, not the sum).

Writes ``benchmarks/results/repro.json``: ``{"repro_seconds", "noop_seconds", "peak_rss_mb", "noop_ran_nothing",
"stage_seconds", ...}``. Run it on a quiet machine: the teacher trains for a fixed time budget
(``teacher.train.max_train_seconds``), so a loaded machine gets a weaker teacher and different numbers.

Usage:
    python benchmarks/repro.py [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataengine.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/repro.json"))
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()

    dvc = Path(sys.executable).parent / "dvc"
    tmp = Path(tempfile.mkdtemp(prefix="dataengine-repro-"))
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shared = ROOT.parent / "shared"
    if shared.exists() and not (tmp / "shared").exists():
        (tmp / "shared").symlink_to(shared)  # profiles read ../shared/data by path; the demo does not need it
    env = {**os.environ, "PATH": f"{dvc.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()

    t0 = time.perf_counter()
    log = clone / "repro.log"
    with log.open("w") as fh:
        proc = subprocess.run([str(dvc), "repro"], cwd=clone, env=env, stdout=fh, stderr=subprocess.STDOUT)
    repro_seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        print(f"dvc repro failed (exit {proc.returncode}); clone kept at {clone}", file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    noop = subprocess.run([str(dvc), "repro"], cwd=clone, env=env, capture_output=True, text=True)
    noop_seconds = time.perf_counter() - t1
    ran = re.findall(r"Running stage '([^']+)'", noop.stdout + noop.stderr)
    stage_starts = [(m.group(1), None) for m in re.finditer(r"Running stage '([^']+)'", log.read_text())]

    result = {
        "repro_seconds": round(repro_seconds, 1),
        "noop_seconds": round(noop_seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "noop_ran_nothing": not ran and noop.returncode == 0,
        "noop_ran": ran,
        "stages": [name for name, _ in stage_starts],
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_after": os.getloadavg()[0],
    }
    atomic_write_json(args.out, result, indent=1)
    print(result)
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
