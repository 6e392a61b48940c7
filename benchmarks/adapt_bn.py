"""Benchmark (diagnostic): what re-estimating the teacher's BatchNorm statistics on each image set does (AdaBN).

``pseudo_label.adapt_bn`` (default on) labels the scenario pool with a copy of the teacher whose BatchNorm running
mean and variance are re-estimated on the pool, and general val (the filter's calibration set) with a copy adapted
to val the same way (:mod:`dataengine.pseudo.adapt`). For each teacher in ``--runs`` this script writes params that
differ from ``--params`` in ``pseudo_label.adapt_bn`` only, and runs the stage scripts ``pseudo_label`` and
``filter`` (no decisions) with adaptation off and on, into ``--work/<name>/<off|on>/``.

Per teacher and setting it records:

- ``teacher_test``: the labelling network on the scenario test set (COCO mAP, AP50, per-class AP, confuser false
  positives per image at score >= 0.3): the teacher as trained (off) or with the pool's statistics (on, read from
  the stage's ``pool/batchnorm.pt``). The test images are not used to adapt: they measure whether the pool's
  statistics carry over to other images of the scenario.
- ``pool_AP50``: AP50 of the fused pool boxes against the pool's hidden labels (threshold-free).
- ``no_review``: the filter's accepted band per class (count, estimated and true precision, true recall) and the
  review band's true precision, i.e. the issue's "demo, default params" numbers with and without adaptation, and
  ``lowest``: the class with the lowest true precision among those with at least 20 accepted labels.
- ``images_per_second`` of the pool labelling, the adaptation pass included (one run after another on this machine).

The hidden labels are read for these diagnostics only, as in the pipeline.

Needs ``dvc repro`` up to ``train_teacher``. Other teachers come from ``benchmarks/calibration_coverage.py --seeds
0 1 2`` (``benchmarks/work/calibration_coverage/rate<r>[_seed<s>]/``): the default run list takes the seed-1 and seed-2
teachers of the params' demo (its look-alike rate) when they are there.

Usage:
    python benchmarks/adapt_bn.py                        # 3 teachers: about 6 minutes on 2 CPU cores
    C=benchmarks/work/calibration_coverage
    python benchmarks/adapt_bn.py --runs rate0.2=$C/rate0.2 --out benchmarks/results/adapt_bn_rate0.2.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.config import load_params  # noqa: E402
from dataengine.data.coco import CategoryMap, load_coco  # noqa: E402
from dataengine.data.layout import PreparedLayout  # noqa: E402
from dataengine.engine.checkpoint import load_model  # noqa: E402
from dataengine.evaluation import confuser_false_positives, evaluate_detection  # noqa: E402
from dataengine.evaluation.report import SCORE_THRESHOLD  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.inference import predict_coco  # noqa: E402
from dataengine.io import atomic_write_json, read_json  # noqa: E402
from dataengine.models import create_model  # noqa: E402
from dataengine.profiles import merge  # noqa: E402
from dataengine.pseudo.adapt import BATCHNORM_FILE, with_batchnorm  # noqa: E402
from dataengine.review.decisions import empty_decisions, write_decisions  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from calibration_coverage import run_dir  # noqa: E402
from tta_scales import accepted_band, filter_command, pool_ap50, pseudo_label_command  # noqa: E402

COVERAGE = Path("benchmarks/work/calibration_coverage")
MIN_ACCEPTED = 20  # the bar counts classes with at least this many accepted labels


def default_runs(params: Path) -> list[tuple[str, Path, Path]]:
    """``(name, teacher dir, prepared data)``: the ``dvc repro`` teacher, then the teachers of seeds 1 and 2 that
    ``calibration_coverage.py`` trained on the demo of ``params`` (its ``data.demo.general_confuser_rate``), where
    they exist."""
    loaded = load_params(params)
    rate, base_seed = loaded.data.demo.general_confuser_rate, loaded.teacher.train.seed
    runs = [(f"seed{base_seed}", Path("models/teacher"), Path("data/prepared"))]
    for seed in (1, 2):
        run = run_dir(COVERAGE, rate, seed, base_seed)
        if (run / "teacher" / "model.pt").is_file():
            runs.append((f"seed{seed}", run / "teacher", run / "prepared"))
    return runs


def parse_run(text: str) -> tuple[str, Path, Path]:
    """``NAME=DIR``: a ``calibration_coverage.py`` run folder (``teacher/``, ``prepared/``, ``params.yaml``)."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    run = Path(folder)
    for needed in (run / "teacher" / "model.pt", run / "prepared"):
        if not needed.exists():
            raise argparse.ArgumentTypeError(f"{text}: {needed} does not exist (a calibration_coverage.py run?)")
    return name, run / "teacher", run / "prepared"


def write_params(base: Path, adapt: bool, out: Path) -> Path:
    """``base`` with ``pseudo_label.adapt_bn: adapt``, validated, written to ``out``."""
    params = merge(yaml.safe_load(base.read_text()), {"pseudo_label": {"adapt_bn": adapt}})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(out, ["pseudo_label", "filter"])
    return out


def teacher_test(teacher: Path, data: Path, batchnorm: Path | None) -> dict[str, Any]:
    """The teacher (with ``batchnorm``'s statistics, if given) on the scenario test set."""
    layout = PreparedLayout(data)
    gt = load_coco(layout.test_json)
    model, ckpt = load_model(teacher / "model.pt", lambda c: create_model(**c),
                             class_names=list(CategoryMap.from_coco(gt).names))
    if batchnorm is not None:
        model = with_batchnorm(model, batchnorm)
    predictions, _ = predict_coco(model, gt, layout.test_images, input_size=int(ckpt["input_size"]))
    det = evaluate_detection(gt, predictions)
    fp = confuser_false_positives(gt, predictions, score_threshold=SCORE_THRESHOLD)["confuser_fp_per_image"]
    return {"mAP": det["mAP"], "AP50": det["AP50"], "per_class_AP": det["per_class_AP"],
            "confuser_fp_per_image": fp}


def no_review(metrics: dict[str, Any]) -> dict[str, Any]:
    """The accepted and review bands of a ``metrics/pseudo.json``, per class and overall, and the lowest class."""
    names = [*metrics["per_class"], "overall"]
    bands = {name: accepted_band(metrics, name) for name in names}
    counted = [(band["true_precision"], name) for name, band in bands.items()
               if name != "overall" and band["accepted"] >= MIN_ACCEPTED and band["true_precision"] is not None]
    lowest = min(counted) if counted else None
    return {"per_class": bands, "lowest": lowest and {"class": lowest[1], "true_precision": lowest[0]}}


def run_teacher(name: str, teacher: Path, data: Path, base: Path, work: Path, reuse: bool) -> dict[str, Any]:
    hidden = load_coco(PreparedLayout(data).pool_hidden)
    result: dict[str, Any] = {"teacher": str(teacher), "data": str(data)}
    for adapt in (False, True):
        tag = "on" if adapt else "off"
        run = work / name / tag
        params = write_params(base, adapt, run / "params.yaml")
        decisions = run / "none" / "decisions.json"
        write_decisions(decisions, empty_decisions())
        for step, done, cmd in (
                ("pseudo_label", run / "pseudo" / "stats.json", pseudo_label_command(params, run, teacher, data)),
                ("filter", run / "none" / "pseudo.json", filter_command(params, run, decisions, run / "none", data))):
            if reuse and done.exists():
                print(f"[adapt_bn] {name} {tag}: {step} reused", flush=True)
                continue
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True)
            print(f"[adapt_bn] {name} {tag}: {step} took {time.perf_counter() - t0:.0f} s", flush=True)
        stats = read_json(run / "pseudo" / "stats.json")["pool"]
        result[tag] = {
            "images_per_second": stats["images_per_second"], "adapt_bn": stats.get("adapt_bn"),
            "teacher_test": teacher_test(teacher, data, run / "pseudo" / "pool" / BATCHNORM_FILE if adapt else None),
            "pool_AP50": pool_ap50(read_json(run / "pseudo" / "pool" / "predictions.json"), hidden),
            "no_review": no_review(read_json(run / "none" / "pseudo.json"))}
        low = result[tag]["no_review"]["lowest"]
        print(f"[adapt_bn] {name} {tag}: test mAP {result[tag]['teacher_test']['mAP']:.3f}, accepted precision "
              f"{result[tag]['no_review']['per_class']['overall']['true_precision']:.3f}, lowest class "
              f"{low and low['class']} {low and round(low['true_precision'], 3)}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=parse_run, default=None, metavar="NAME=DIR",
                        help="calibration_coverage.py run folders (default: the dvc repro teacher and the seed-1 and "
                        "seed-2 teachers of the params' demo)")
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="base params: pseudo_label and filter as the pipeline runs them")
    parser.add_argument("--work", default="benchmarks/work/adapt_bn", type=Path, help="scratch folder")
    parser.add_argument("--reuse", action="store_true", help="skip a stage whose output a previous run left")
    parser.add_argument("--out", default="benchmarks/results/adapt_bn.json", type=Path)
    args = parser.parse_args()
    runs = args.runs or default_runs(args.params)
    results = {name: run_teacher(name, teacher, data, args.params, args.work, args.reuse)
               for name, teacher, data in runs}
    meta = {"date": datetime.date.today().isoformat(), "git_commit": git_commit(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "min_accepted": MIN_ACCEPTED}
    atomic_write_json(args.out, {"meta": meta, "runs": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
