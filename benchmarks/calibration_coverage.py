"""Benchmark (diagnostic): is the filter's calibration gap caused by look-alikes missing from the general set?

The filter calibrates ``P(correct | score, consistency)`` on general val. On the demo pool its accepted band's
estimated precision is 0.90-1.00, but the true precision of circle, triangle and star is 0.76-0.83: most wrong
accepted boxes sit on **confusers**, shapes that resemble a class, which the demo drew in the scenario only until
2026-11-25 (``general_confuser_rate: 0``, the hardest case; the default is 0.2 since).
The explanation given so far (README, "Not yet good enough") is that val has no confusers, so no calibration fitted
on it can price them in. This script tests that explanation by changing only that: it regenerates the demo with
``data.demo.general_confuser_rate`` = each of ``--rates`` (look-alikes per general train/val image, unlabelled
background; the scenario's files stay byte-identical), then runs the stages ``prepare``, ``train_teacher``,
``pseudo_label`` and ``filter`` with their own scripts and otherwise unchanged params, into
``--work/rate<r>/``.

Per rate and class it records the filter's accepted band (count, estimated and true precision, the gap, true
recall; the stage's ``metrics/pseudo.json``), the review band's true precision, how many wrong accepted boxes sit on
a confuser (the rule of :func:`dataengine.evaluation.confuser_false_positives`, at any score), and the teacher's AP50
on general val and the scenario test set. The hidden pool labels are read for these diagnostics only, as in the
pipeline.

The params' own rate (0.2 since 2026-11-25; 0 before) is the default demo: its numbers should equal the main
``dvc repro``'s (the teacher trains deterministically within its time budget).

``--seeds`` also trains the teacher with other ``teacher.train.seed`` values (same data, same params otherwise,
into ``--work/rate<r>_seed<s>/``): how far the per-class numbers move with the teacher's initialisation and sampling
order alone, i.e. which differences between rates are larger than that. The params' own seed keeps ``rate<r>/``.

Usage:
    python benchmarks/calibration_coverage.py                 # rates 0, 0.2, 0.8: about 20 minutes on 2 CPU cores
    python benchmarks/calibration_coverage.py --rates 0.4 --reuse
    python benchmarks/calibration_coverage.py --seeds 0 1 2 --reuse   # three teachers per rate: about 40 minutes
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.config import load_params  # noqa: E402
from dataengine.data.layout import PreparedLayout  # noqa: E402
from dataengine.evaluation import confuser_false_positives  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.io import atomic_write_json, read_json  # noqa: E402
from dataengine.profiles import merge  # noqa: E402
from dataengine.review.decisions import empty_decisions, write_decisions  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by file path (tests)
from scenario_calibration import issue_bar  # noqa: E402  (issue 4's bar)


def write_params(base: Path, rate: float, out: Path, seed: int | None = None) -> Path:
    """``base`` with ``data.demo.general_confuser_rate: rate`` (and ``teacher.train.seed: seed`` unless ``None``),
    validated, written to ``out``."""
    override: dict[str, Any] = {"data": {"demo": {"general_confuser_rate": rate}}}
    if seed is not None:
        override["teacher"] = {"train": {"seed": seed}}
    params = merge(yaml.safe_load(base.read_text()), override)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(out)  # a bad rate stops here, naming the key, before any work
    return out


def teacher_stage_commands(params: Path, data: Path, run: Path) -> list[tuple[str, Path, list[str]]]:
    """``(stage, output that marks it done, command)`` for ``train_teacher``, ``pseudo_label`` and ``filter`` (with
    ``run/decisions.json``), as in dvc.yaml, on the prepared ``data``, into ``run``; ``benchmarks/gpu_path.py``
    runs them too."""
    py, teacher = sys.executable, run / "teacher"
    return [
        ("train_teacher", run / "teacher.json",
         [py, "pipelines/train_teacher.py", "--params", str(params), "--data", str(data), "--out", str(teacher),
          "--log-dir", str(run / "dvclive"), "--metrics", str(run / "teacher.json")]),
        ("pseudo_label", run / "pseudo" / "stats.json",
         [py, "pipelines/pseudo_label.py", "--params", str(params), "--teacher", str(teacher), "--data", str(data),
          "--out", str(run / "pseudo")]),
        ("filter", run / "pseudo.json",
         [py, "pipelines/filter.py", "--params", str(params), "--pseudo", str(run / "pseudo"), "--data", str(data),
          "--decisions", str(run / "decisions.json"), "--out", str(run / "filtered"),
          "--metrics", str(run / "pseudo.json")]),
    ]


def stage_commands(params: Path, run: Path) -> list[tuple[str, Path, list[str]]]:
    """``(stage, output that marks it done, command)`` for the stages up to ``filter``, as in dvc.yaml, into ``run``
    (nobody reviewed: ``run/decisions.json`` is empty, the filter calibrates on general val alone)."""
    data = run / "prepared"
    prepare = [sys.executable, "pipelines/prepare.py", "--params", str(params), "--out", str(data),
               "--metrics", str(run / "data.json")]
    return [("prepare", run / "data.json", prepare), *teacher_stage_commands(params, data, run)]


def accepted_on_confusers(accepted: dict[str, Any], hidden: dict[str, Any]) -> dict[str, int]:
    """Per class (and ``overall``): accepted boxes on a confuser and on no real object of their class.

    The rule is :func:`~dataengine.evaluation.confuser_false_positives` at any score; accepted images are matched to
    the hidden labels by file name.

    Example:
        >>> hidden = {"images": [{"id": 7, "file_name": "a.png", "confusers": [[0, 0, 10, 10]]}],
        ...           "categories": [{"id": 1, "name": "circle"}], "annotations": []}
        >>> accepted = {"images": [{"id": 1, "file_name": "a.png"}], "categories": hidden["categories"],
        ...             "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.9}]}
        >>> accepted_on_confusers(accepted, hidden)
        {'circle': 1, 'overall': 1}
    """
    hidden_id = {img["file_name"]: img["id"] for img in hidden["images"]}
    file_of = {img["id"]: img["file_name"] for img in accepted["images"]}
    unknown = sorted({file_of[a["image_id"]] for a in accepted["annotations"]} - set(hidden_id))
    if unknown:
        raise ValueError(f"accepted labels on images the hidden labels do not list: {unknown[:5]}")
    # Classes are matched by name, as in the filter's diagnostic_metrics: the two files may number them differently.
    hidden_cat = {c["name"]: c["id"] for c in hidden["categories"]}
    name_of = {c["id"]: c["name"] for c in accepted["categories"]}
    missing = sorted(set(name_of.values()) - set(hidden_cat))
    if missing:
        raise ValueError(f"accepted classes {missing} are not among the hidden labels' {sorted(hidden_cat)}")
    predictions = [{**a, "image_id": hidden_id[file_of[a["image_id"]]],
                    "category_id": hidden_cat[name_of[a["category_id"]]]} for a in accepted["annotations"]]
    out = {}
    for name, cat_id in hidden_cat.items():
        own = [p for p in predictions if p["category_id"] == cat_id]
        out[name] = confuser_false_positives(hidden, own, score_threshold=0.0)["confuser_fp"]
    out["overall"] = sum(out.values())
    return out


def summarise(run: Path) -> dict[str, Any]:
    """The numbers of one rate's run (see the module docstring)."""
    pseudo, teacher = read_json(run / "pseudo.json"), read_json(run / "teacher.json")
    layout = PreparedLayout(run / "prepared")
    demo = read_json(layout.root / "demo_summary.json")
    accepted = read_json(run / "filtered" / "accepted.json")
    on_confusers = accepted_on_confusers(accepted, read_json(layout.pool_hidden))
    per_class: dict[str, Any] = {}
    for name in [*pseudo["per_class"], "overall"]:
        n = pseudo["accepted"] if name == "overall" else pseudo["per_class"][name]["accepted"]
        precision = pseudo["true_precision"][name]
        wrong = None if precision is None else round(n * (1 - precision))
        per_class[name] = {"accepted": n, "estimated_precision": pseudo["estimated_precision"][name],
                           "true_precision": precision, "gap": pseudo["precision_gap"][name],
                           "true_recall": pseudo["true_recall"][name],
                           "review_true_precision": pseudo["review_true_precision"][name],
                           "wrong": wrong, "wrong_on_confusers": on_confusers[name]}
    return {"general_confusers": {split: demo["splits"][split]["confusers"] for split in ("train", "val")},
            "teacher_AP50": {"general_val": teacher["general_val"]["AP50"],
                             "scenario_test": teacher["scenario_test"]["AP50"]},
            "teacher_train_seconds": teacher["train_seconds"],
            "review": pseudo["review"], "per_class": per_class}


def run_dir(work: Path, rate: float, seed: int, base_seed: int) -> Path:
    """``work/rate<r>`` for the params' own teacher seed, ``work/rate<r>_seed<s>`` for another one.

    Example:
        >>> [run_dir(Path("w"), 0.2, s, 0).as_posix() for s in (0, 1)]
        ['w/rate0.2', 'w/rate0.2_seed1']
    """
    return work / (f"rate{rate:g}" if seed == base_seed else f"rate{rate:g}_seed{seed}")


def run_rate(rate: float, base_params: Path, work: Path, reuse: bool, seed: int, base_seed: int) -> dict[str, Any]:
    run, tag = run_dir(work, rate, seed, base_seed), f"rate {rate:g}, teacher seed {seed}"
    params = write_params(base_params, rate, run / "params.yaml", None if seed == base_seed else seed)
    write_decisions(run / "decisions.json", empty_decisions())
    for stage, done, cmd in stage_commands(params, run):
        if reuse and done.exists():
            print(f"[coverage] {tag}: {stage} reused ({done})", flush=True)
            continue
        print(f"[coverage] {tag}: {stage}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        print(f"[coverage] {tag}: {stage} took {time.perf_counter() - t0:.0f} s", flush=True)
    return summarise(run)


def seed_spread(by_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per class (and ``overall``): the accepted band's true precision and true recall over the teacher seeds,
    ``[min, mean, max]`` (classes whose precision is undefined for some seed: over the others; none: ``None``).

    Example:
        >>> runs = {"0": {"per_class": {"star": {"true_precision": 0.7, "true_recall": 0.5}}},
        ...         "1": {"per_class": {"star": {"true_precision": 0.9, "true_recall": 0.3}}}}
        >>> seed_spread(runs)
        {'star': {'true_precision': [0.7, 0.8, 0.9], 'true_recall': [0.3, 0.4, 0.5]}}
    """
    out: dict[str, Any] = {}
    for name in next(iter(by_seed.values()))["per_class"]:
        out[name] = {}
        for key in ("true_precision", "true_recall"):
            values = [r["per_class"][name][key] for r in by_seed.values() if r["per_class"][name][key] is not None]
            out[name][key] = ([round(min(values), 4), round(sum(values) / len(values), 4), round(max(values), 4)]
                              if values else None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.8],
                        help="data.demo.general_confuser_rate values to run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="teacher.train.seed values to train per rate (default: the params' own seed only)")
    parser.add_argument("--params", default="params.yaml", type=Path, help="base params (a demo params file)")
    parser.add_argument("--work", default="benchmarks/work/calibration_coverage", type=Path, help="scratch folder")
    parser.add_argument("--reuse", action="store_true", help="skip a stage whose output a previous run left")
    parser.add_argument("--out", default="benchmarks/results/calibration_coverage.json", type=Path)
    args = parser.parse_args()
    params = load_params(ROOT / args.params, ["data", "teacher", "filter"])
    if params.data.source != "demo":
        raise SystemExit(f"{args.params}: data.source must be demo (the rates change the demo generator)")
    base_seed = params.teacher.train.seed
    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [base_seed]))
    if base_seed not in seeds:
        raise SystemExit(f"--seeds {seeds} must include the params' own teacher.train.seed {base_seed} "
                         f"(its run is the one the README's table and the rate comparison use)")

    results, by_seed = {}, {}
    for rate in args.rates:
        runs = {}
        for seed in seeds:
            runs[str(seed)] = summary = run_rate(rate, ROOT / args.params, ROOT / args.work, args.reuse, seed,
                                                 base_seed)
            line = ", ".join(f"{k} {v['true_precision']:.3f} (est {v['estimated_precision']:.3f})"
                             for k, v in summary["per_class"].items() if v["true_precision"] is not None)
            print(f"[coverage] rate {rate:g}, teacher seed {seed}: accepted true precision: {line}", flush=True)
        results[f"{rate:g}"] = runs[str(base_seed)]
        if len(seeds) > 1:
            by_seed[f"{rate:g}"] = {"runs": runs, "spread": seed_spread(runs)}
    target = params.filter.target_precision
    out = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "commit": git_commit(ROOT), "params": str(args.params), "target_precision": target,
                    "bar": issue_bar(target), "teacher_seed": base_seed},
           "rates": results}
    if by_seed:
        out["teacher_seeds"] = by_seed  # per rate: every seed's run ("runs") and [min, mean, max] per class
    atomic_write_json(ROOT / args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
