"""Benchmark: does re-calibrating the filter on reviewers' decisions bring the accepted band to the target precision?

The filter calibrates the teacher on general val; on the demo's scenario pool the accepted band then misses
``target_precision - 0.05`` for circle, triangle and star (the teacher never saw a confuser). The filter re-fits a
class on the reviewers' decisions once enough of its reviewed labels lie in its accepted range
(:func:`dataengine.pseudo.calibrate.recalibrate`); the audit sample (``audit.json``) is what provides them. This
script plays the reviewer with :func:`dataengine.review.oracle.simulate_review` (decisions from the pool's hidden
labels, ``source: simulated``; the pipeline never reads the hidden labels) and re-runs the ``filter`` stage's script
on its decisions, for each review plan of ``--plans``:

- ``audit``: the images of the audit sample only (every label the reviewer sees there gets a decision);
- ``audit+queue<N>``: those plus the first ``N`` images of the review queue;
- ``queue<N>``: the queue only (no label in the accepted range: re-calibration should not kick in).

Per plan and class it records the filter's accepted band before (no decisions) and after: count, true precision and
recall (the stage's diagnostic metrics), the true precision of the accepted labels nobody reviewed, the calibration
kind, and the audit's own estimate (precision and Wilson interval from the decisions: what a user without hidden
labels sees). Writes ``benchmarks/results/recalibration.json``.

Needs ``dvc repro`` up to ``filter`` (``data/pseudo``, ``data/filtered``, ``data/prepared`` with
``scenario/pool_hidden.json``).

Usage:
    python benchmarks/recalibration.py                                  # about 1 minute on 2 CPU cores
    python benchmarks/recalibration.py --params params_audit30.yaml --plans audit \
        --out benchmarks/results/recalibration_audit30.json             # filter.audit_per_class: 30
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataengine.config import load_params  # noqa: E402
from dataengine.data.layout import PreparedLayout  # noqa: E402
from dataengine.export import git_commit  # noqa: E402
from dataengine.io import atomic_write_json, read_json  # noqa: E402
from dataengine.pseudo.filter import diagnostic_metrics  # noqa: E402
from dataengine.review.decisions import empty_decisions, write_decisions  # noqa: E402
from dataengine.review.oracle import review_plan, simulate_review  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by file path (tests)
from models import machine_info  # noqa: E402  (benchmarks/models.py: the CPU; each CPU type trains its own teacher)

PLAN = re.compile(r"^(audit)?(?:\+?queue(\d+))?$")


def run_filter(params: Path, decisions: Path, out: Path) -> dict[str, Any]:
    """Run the ``filter`` stage's script into ``out`` with ``decisions``; its metrics."""
    metrics = out / "pseudo.json"
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "filter.py"), "--params", str(params), "--pseudo",
                    "data/pseudo", "--data", "data/prepared", "--decisions", str(decisions), "--out",
                    str(out / "filtered"), "--metrics", str(metrics)], cwd=ROOT, check=True)
    return read_json(metrics)


def plan_records(plan: str, audit: list[dict[str, Any]], queue: list[dict[str, Any]]
                 ) -> tuple[list[Mapping[str, Any]], int]:
    """The records whose images the simulated reviewer goes through (audit images first), and how many images."""
    match = PLAN.match(plan)
    if not match or plan in ("", "+"):
        raise SystemExit(f"--plans: {plan!r} is not 'audit', 'queue<N>' or 'audit+queue<N>'")
    return review_plan(queue, audit if match.group(1) else [], int(match.group(2) or 0))


def unreviewed_precision(filtered: Path, hidden_path: Path, decisions: dict[str, Any],
                         match_iou: float) -> dict[str, Any]:
    """True precision of the accepted labels in images nobody reviewed (the part the review did not touch): the
    filter's own diagnostic (:func:`~dataengine.pseudo.filter.diagnostic_metrics`) on the unreviewed images only."""
    accepted = read_json(filtered / "accepted.json")
    reviewed = {d["file_name"] for d in decisions["labels"].values()} | set(decisions["images"])
    keep = {img["id"] for img in accepted["images"] if img["file_name"] not in reviewed}
    unreviewed = {**accepted, "images": [img for img in accepted["images"] if img["id"] in keep],
                  "annotations": [a for a in accepted["annotations"] if a["image_id"] in keep]}
    diagnostic = diagnostic_metrics(unreviewed, [], hidden_path, match_iou, {})
    return {**diagnostic["true_precision"], "labels": len(unreviewed["annotations"])}


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    per_class = metrics["per_class"]
    return {name: {"accepted": per_class[name]["accepted"], "calibration": per_class[name]["calibration"],
                   "true_precision": metrics["true_precision"][name], "true_recall": metrics["true_recall"][name],
                   "estimated_precision": metrics["estimated_precision"][name],
                   "audit": metrics["audit"].get(name)} for name in per_class} | {
        "overall": {"accepted": metrics["accepted"], "true_precision": metrics["true_precision"]["overall"],
                    "true_recall": metrics["true_recall"]["overall"],
                    "estimated_precision": metrics["estimated_precision"]["overall"],
                    "audit": metrics["audit"]["overall"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (its filter section is used)")
    parser.add_argument("--plans", nargs="+", default=["audit", "audit+queue432", "queue432"],
                        help="review plans: audit, queue<N>, audit+queue<N> (default: %(default)s)")
    parser.add_argument("--work", default="benchmarks/work/recalibration", help="scratch folder")
    parser.add_argument("--out", default="benchmarks/results/recalibration.json", help="results JSON")
    args = parser.parse_args()

    work, layout = ROOT / args.work, PreparedLayout(ROOT / "data" / "prepared")
    if not layout.pool_hidden.is_file():
        raise SystemExit(f"{layout.pool_hidden} not found: this benchmark needs the demo's hidden pool labels")
    hidden = read_json(layout.pool_hidden)
    empty = work / "none" / "decisions.json"
    write_decisions(empty, empty_decisions())
    before = run_filter(ROOT / args.params, empty, work / "none")
    filtered = work / "none" / "filtered"
    audit, queue = read_json(filtered / "audit.json"), read_json(filtered / "review_queue.json")
    accepted, rejected = read_json(filtered / "accepted.json"), read_json(filtered / "rejected.json")
    match_iou = read_json(filtered / "calibration.json")["match_iou"]

    results: dict[str, Any] = {}
    for plan in args.plans:
        records, n_images = plan_records(plan, audit, queue)
        decisions, stats = simulate_review(records, accepted, rejected, hidden, n_images=n_images,
                                           match_iou=match_iou)
        path = work / plan / "decisions.json"
        write_decisions(path, decisions)
        after = run_filter(ROOT / args.params, path, work / plan)
        results[plan] = {"reviewed_images": n_images, "reviewed_labels": after["reviewed_labels"],
                         "simulated_decisions": stats, "after": summarise(after),
                         "after_unreviewed_true_precision": unreviewed_precision(work / plan / "filtered",
                                                                                 layout.pool_hidden,
                                                                                 decisions, match_iou)}
        line = ", ".join(f"{k} {v['true_precision']:.3f} ({v['accepted']})" for k, v in results[plan]["after"].items()
                         if v["true_precision"] is not None)
        print(f"{plan}: {n_images} images reviewed; accepted true precision (count): {line}")

    filter_params = load_params(ROOT / args.params, ["filter"]).filter
    out = {"meta": {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                    "cpu": machine_info()["cpu"], "commit": git_commit(ROOT), "params": args.params,
                    "audit_per_class": filter_params.audit_per_class, "audit_seed": filter_params.audit_seed,
                    "min_reviewed_accepted": filter_params.min_reviewed_accepted,
                    "audit_labels": len(audit), "queue_labels": len(queue)},
           "before": summarise(before), "plans": results}
    atomic_write_json(ROOT / args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
