"""Benchmark: the engine on real data, BCCD semi-supervised, at several labelled fractions.

For each labelled fraction (default 0.10, 0.25, 0.50) this clones the current commit (``git clone``) into
``benchmarks/work/bccd_ssl/<fraction>/``, writes ``params.yaml`` = ``params.yaml`` + ``profiles/bccd.yaml`` +
``data.bccd.labelled_fraction=<fraction>`` (the same merge and validation as ``dataengine profile bccd``), and runs
``dvc repro evaluate``: prepare -> teacher -> pseudo_label -> filter -> review -> rebalance -> mine -> distill and
baseline for each student -> evaluate (export is not needed for these numbers). The seeded labelled subsets are
nested (10 % is inside 25 %, inside 50 %; :func:`dataengine.data.bccd.select_labelled`).

It then reads what the pipeline wrote: ``metrics/summary.json`` (teacher, baseline and student on BCCD test: AP50,
mAP, per-class AP) and ``metrics/pseudo.json`` (the accepted pseudo-labels' true precision and recall against the
pool's hidden labels, computed by evaluation code that makes no decision). Writes
``benchmarks/results/bccd_ssl.json``: ``{"<fraction>": {"teacher": {...}, "baseline": {...}, "student": {...},
"pseudo_true_precision", "pseudo_true_recall", "stage_seconds", "repro_seconds"}, "date", "machine", ...}``.

Usage:
    python benchmarks/bccd_ssl.py                                   # 0.1, 0.25, 0.5 (about 30 min each, 2 cores)
    python benchmarks/bccd_ssl.py --fractions 0.25 --set teacher.train.epochs=2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dataengine.config import load_params
from dataengine.io import atomic_write_json
from dataengine.profiles import merge

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd"

sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by file path (tests)
from models import machine_info  # noqa: E402  (benchmarks/models.py: the CPU; each CPU type trains its own teacher)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(t, "a.b", 1)`` sets ``t["a"]["b"] = 1``."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def run_params(fraction: float, overrides: list[str]) -> dict[str, Any]:
    """params.yaml + profiles/bccd.yaml + the fraction (+ ``key=value`` overrides), BCCD read from its real path."""
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   yaml.safe_load((ROOT / "profiles/bccd.yaml").read_text()))
    set_dotted(params, "data.bccd.labelled_fraction", fraction)
    set_dotted(params, "data.bccd.root", str(BCCD))
    for item in overrides:
        key, _, value = item.partition("=")
        set_dotted(params, key, yaml.safe_load(value))
    return params


def model_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics.get(key) for key in ("AP50", "mAP", "per_class_AP")}


def run_fraction(fraction: float, overrides: list[str], work: Path) -> dict[str, Any]:
    clone = work / f"{fraction:g}"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    params_path = clone / "params.yaml"
    params_path.write_text(yaml.safe_dump(run_params(fraction, overrides), sort_keys=False))
    load_params(params_path)  # refuse a bad override before any work
    dvc = Path(sys.executable).parent / "dvc"
    # PYTHONPATH: the stages import the clone's dataengine, not an editable install of another checkout
    env = {**os.environ, "PATH": f"{dvc.parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(clone)}
    log = clone / "repro.log"
    print(f"[bccd] fraction {fraction:g}: dvc repro evaluate in {clone} (log: {log})", flush=True)
    t0 = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    with log.open("w") as fh:
        proc = subprocess.Popen([str(dvc), "repro", "evaluate"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        current, started = None, t0
        for line in proc.stdout:
            fh.write(line)
            match = re.search(r"Running stage '([^']+)'", line)
            if match:
                now = time.perf_counter()
                if current:
                    stage_seconds[current] = round(now - started, 1)
                current, started = match.group(1), now
                print(f"[bccd] {fraction:g}: {current} (t={now - t0:.0f} s)", flush=True)
        proc.wait()
    if current:
        stage_seconds[current] = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro failed for fraction {fraction:g} (exit {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    summary = json.loads((clone / "metrics/summary.json").read_text())
    pseudo = json.loads((clone / "metrics/pseudo.json").read_text())
    data = json.loads((clone / "metrics/data.json").read_text())
    name, student = next(iter(summary["students"].items()))  # the profile's (first) student
    return {
        "labelled_images": data["general_train"]["images"] + data["general_val"]["images"],
        "pool_images": data["scenario_pool"]["images"],
        "student_model": name,
        "teacher": model_numbers(summary["teacher"]),
        "baseline": model_numbers(summary["baseline"][name]),
        "student": model_numbers(student),
        "lift_AP50_points": round(100 * (student["AP50"] - summary["baseline"][name]["AP50"]), 2),
        "pseudo_true_precision": pseudo["true_precision"].get("overall"),
        "pseudo_true_recall": pseudo["true_recall"].get("overall"),
        "pseudo_true_precision_per_class": {k: v for k, v in pseudo["true_precision"].items() if k != "overall"},
        "pseudo_true_recall_per_class": {k: v for k, v in pseudo["true_recall"].items() if k != "overall"},
        "pseudo_accepted": pseudo.get("accepted"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                                 text=True).stdout.strip(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "stage_seconds": stage_seconds,
        "repro_seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra params override on top of the profile (repeatable), e.g. distill.train.epochs=2")
    parser.add_argument("--work", default=str(ROOT / "benchmarks/work/bccd_ssl"), help="where the clones go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/bccd_ssl.json"))
    args = parser.parse_args()
    if not (BCCD / "annotations").is_dir():
        print(f"BCCD not found at {BCCD} (expected annotations/ and images/)", file=sys.stderr)
        return 2
    out_path = Path(args.out)
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    for fraction in args.fractions:
        result[f"{fraction:g}"] = run_fraction(fraction, args.overrides, Path(args.work))
        result.update({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {machine_info()['cpu']}",
            "overrides": args.overrides,
        })
        atomic_write_json(out_path, result, indent=1)  # after every fraction: a long run keeps what it finished
        print(json.dumps(result[f"{fraction:g}"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
