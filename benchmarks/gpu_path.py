"""Benchmark (GPU path check): the teacher, the pseudo-labeller, the filter and a student, run on one CUDA device.

CI and the project's own machines have no GPU, so the CUDA code paths (bf16 autocast in the trainer, pinned-memory
loaders, inference on the device, ONNX Runtime's CUDA provider where it is installed) are exercised only when a
session is lent one. This script runs the stage scripts, exactly as ``dvc.yaml`` does, into ``--work/<case>/``:

- ``default``: ``--params`` unchanged: the CPU-sized teacher (``resnet18_bifpn_gfl``, 128 px, 14 epochs), then
  ``pseudo_label`` and ``filter`` (no review decisions), then the ``distill`` stage for ``--student`` on the
  ``dvc repro`` outputs it needs (``--curated``, ``--plan``, ``--mined``; skipped with a message when missing).
  Same data, same params as the CPU run: how close the numbers come is the check that the GPU path trains the same
  model (they cannot be equal: other kernels, bf16).
- ``large``: the README's GPU recipe for the teacher, ``resnet50_bifpn_gfl`` at
  ``--large-size`` px for ``--large-epochs`` epochs with ``--workers`` loader workers and no time budget, then
  ``pseudo_label`` and ``filter``. Whether a larger, longer-trained teacher closes issue 4's precision gap.

Per case and stage it records the wall seconds and the peak GPU memory in use (``nvidia-smi`` sampled every 0.5 s,
all processes on the device); per case the teacher's general-val and scenario-test mAP / AP50 / mIoU, the
pool's images/s, and per class the filter's accepted band (count, estimated and true precision, true recall) and the
review band's true precision (``metrics/pseudo.json``); for the student its general-val numbers.

Needs a CUDA device (it stops with a message otherwise) and ``data/prepared`` from ``dvc repro`` (or ``--data``).

Usage:
    python benchmarks/gpu_path.py                          # default case: about 3 minutes on one H100
    python benchmarks/gpu_path.py --cases large --large-size 256 --large-epochs 60 --reuse
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.calibration_coverage import teacher_stage_commands  # noqa: E402
from dataengine.config import load_params  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.io import atomic_write_json, read_json  # noqa: E402
from dataengine.profiles import merge  # noqa: E402
from dataengine.review.decisions import empty_decisions, write_decisions  # noqa: E402


def case_overrides(case: str, *, size: int, epochs: int, workers: int) -> dict[str, Any]:
    """The params a case changes (``default``: none).

    Example:
        >>> case_overrides("large", size=256, epochs=60, workers=8)["teacher"]["model"]
        {'name': 'resnet50_bifpn_gfl', 'input_size': 256}
    """
    if case == "default":
        return {}
    if case == "large":
        return {"teacher": {"model": {"name": "resnet50_bifpn_gfl", "input_size": size},
                            "train": {"epochs": epochs, "num_workers": workers, "max_train_seconds": 0}}}
    raise ValueError(f"unknown case {case!r}: expected 'default' or 'large'")


def write_params(base: Path, override: dict[str, Any], out: Path) -> Path:
    """``base`` merged with ``override``, validated (a bad value stops here, naming the key), written to ``out``."""
    params = merge(yaml.safe_load(base.read_text()), override)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(out)
    return out


class GpuMemorySampler:
    """Peak ``memory.used`` (MiB) of the device as ``nvidia-smi`` reports it, sampled every ``interval`` seconds
    while the ``with`` block runs; ``None`` when ``nvidia-smi`` is not on the PATH."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_mib = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return max(int(line) for line in out.split())

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self._read()
            if used is not None:
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def stage_commands(params: Path, data: Path, run: Path, *, student: str | None, curated: Path, plan: Path,
                   mined: Path) -> list[tuple[str, Path, list[str]]]:
    """``(stage, output that marks it done, command)`` as in dvc.yaml, into ``run``; ``distill`` only for a
    ``student``."""
    stages = teacher_stage_commands(params, data, run)
    if student:
        stages.append(
            ("distill", run / "student.json",
             [sys.executable, "pipelines/distill.py", "--student", student, "--params", str(params),
              "--teacher", str(run / "teacher" / "model.pt"), "--data", str(data), "--curated", str(curated),
              "--plan", str(plan), "--mined", str(mined), "--out", str(run / "student"),
              "--log-dir", str(run / "dvclive_student"), "--metrics", str(run / "student.json")]))
    return stages


def summarise(run: Path) -> dict[str, Any]:
    """The numbers of one case's run (see the module docstring)."""
    teacher, pseudo = read_json(run / "teacher.json"), read_json(run / "pseudo.json")
    keys = ("mAP", "AP50", "mIoU")
    out: dict[str, Any] = {
        "teacher": {"model": teacher["model"], "train_seconds": teacher["train_seconds"], "epochs": teacher["epochs"],
                    **{split: {k: teacher[split][k] for k in keys} for split in ("general_val", "scenario_test")}},
        "pool_images_per_second": read_json(run / "pseudo" / "stats.json")["pool"]["images_per_second"],
        "filter": {name: {"accepted": (pseudo["accepted"] if name == "overall"
                                       else pseudo["per_class"][name]["accepted"]),
                          "estimated_precision": pseudo["estimated_precision"][name],
                          "true_precision": pseudo["true_precision"][name],
                          "true_recall": pseudo["true_recall"][name],
                          "review_true_precision": pseudo["review_true_precision"][name]}
                   for name in [*pseudo["per_class"], "overall"]},
    }
    if (run / "student.json").exists():
        student = read_json(run / "student.json")
        out["student"] = {"model": student["model"], "train_seconds": student["train_seconds"],
                          "general_val": {k: student["general_val"][k] for k in keys}}
    return out


def run_case(case: str, params: Path, data: Path, run: Path, stages: list[tuple[str, Path, list[str]]],
             reuse: bool) -> dict[str, Any]:
    write_decisions(run / "decisions.json", empty_decisions())  # nobody reviewed: calibration on general val alone
    timings_file = run / "timings.json"  # kept with the outputs, so a --reuse'd stage keeps its measured time
    timings: dict[str, Any] = read_json(timings_file) if reuse and timings_file.exists() else {}
    for stage, done, cmd in stages:
        if reuse and done.exists():
            print(f"[gpu] {case}: {stage} reused ({done})", flush=True)
            continue
        print(f"[gpu] {case}: {stage}", flush=True)
        t0 = time.perf_counter()
        with GpuMemorySampler() as memory:
            subprocess.run(cmd, cwd=ROOT, check=True)
        timings[stage] = {"seconds": round(time.perf_counter() - t0, 1), "peak_gpu_memory_mib": memory.peak_mib}
        print(f"[gpu] {case}: {stage} took {timings[stage]['seconds']:.0f} s, "
              f"peak GPU memory {memory.peak_mib} MiB", flush=True)
        atomic_write_json(timings_file, timings)
    return {"params": str(params.relative_to(ROOT) if params.is_relative_to(ROOT) else params),
            "stages": timings, **summarise(run)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", type=Path, help="base params (a demo params file)")
    parser.add_argument("--data", default="data/prepared", type=Path, help="prepared data (dvc repro's prepare)")
    parser.add_argument("--student", default="mobilenet_v3_small",
                        help="a key of distill.students to distil in the default case ('' for none)")
    parser.add_argument("--curated", default="data/curated/scenario.json", type=Path)
    parser.add_argument("--plan", default="data/rebalance/plan.json", type=Path)
    parser.add_argument("--mined", default="data/mined", type=Path)
    parser.add_argument("--large-size", type=int, default=256, help="large teacher's input size (default 256)")
    parser.add_argument("--large-epochs", type=int, default=60, help="large teacher's epochs (default 60)")
    parser.add_argument("--workers", type=int, default=8, help="large teacher's loader workers (default 8)")
    parser.add_argument("--cases", nargs="+", default=["default"], choices=["default", "large"],
                        help="cases to run, in order (default: %(default)s)")
    parser.add_argument("--commit", default=None,
                        help="commit to record when the tree has no .git (a copy sent to a GPU machine)")
    parser.add_argument("--work", default="benchmarks/work/gpu_path", type=Path, help="scratch folder")
    parser.add_argument("--reuse", action="store_true", help="skip a stage whose output a previous run left")
    parser.add_argument("--out", default="benchmarks/results/gpu_path.json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark checks the GPU path (the CPU path is what dvc repro and "
                         "the other benchmarks measure)")
    data = ROOT / args.data
    if not (data / "general").is_dir():
        raise SystemExit(f"{args.data}: no prepared data (run `dvc repro prepare` or pass --data)")
    props = torch.cuda.get_device_properties(0)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "commit": git_commit(ROOT) or args.commit, "params": str(args.params)}
    results: dict[str, Any] = {}
    for case in dict.fromkeys(args.cases):
        run = ROOT / args.work / case
        override = case_overrides(case, size=args.large_size, epochs=args.large_epochs, workers=args.workers)
        params = write_params(ROOT / args.params, override, run / "params.yaml")
        student = args.student if case == "default" else None
        needs = [ROOT / args.curated, ROOT / args.plan, ROOT / args.mined]
        if student and not all(p.exists() for p in needs):
            print(f"[gpu] default: no distill ({', '.join(str(p) for p in needs if not p.exists())} missing: "
                  f"run dvc repro up to mine first)", flush=True)
            student = None
        stages = stage_commands(params, data, run, student=student, curated=ROOT / args.curated,
                                plan=ROOT / args.plan, mined=ROOT / args.mined)
        results[case] = {"overrides": override, **run_case(case, params, data, run, stages, args.reuse)}
        line = ", ".join(f"{k} {v['true_precision']:.3f}" for k, v in results[case]["filter"].items()
                         if v["true_precision"] is not None)
        print(f"[gpu] {case}: accepted true precision: {line}", flush=True)
        atomic_write_json(ROOT / args.out, {"meta": meta, "cases": results})  # after each case: a cut run keeps it
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
