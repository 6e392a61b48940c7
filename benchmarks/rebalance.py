"""Benchmark: the KL rebalancer against LVIS repeat-factor sampling, same box ``[1, max_repeat]``, same target.

For each case and ``max_repeat`` it reports ``KL(p || q)`` (nats, over classes with instances) before rebalancing,
after the solver of :mod:`dataengine.curation.rebalance`, and after LVIS repeat-factor sampling (Gupta et al. 2019)
at the paper's threshold ``t = 0.001`` and at its best ``t`` on a grid (tuned on the target: the baseline at its
best), clipped to the same ``max_repeat``. Also: the solver's certified gap, iterations and wall time, and the mean
repeat factor (epoch inflation) of both methods.

Cases: the demo data (general ground truth + curated scenario set, when present), a BCCD-like blood-cell set
(about 85 / 10 / 5 % RBC / WBC / platelets, many RBCs per image, the rare classes co-occurring with them), and
long-tailed Zipf sets (5 and 20 classes, a few instances per image, 10 % background images).

Usage:
    python benchmarks/rebalance.py                      # writes benchmarks/results/rebalance.json, prints a table
    python benchmarks/rebalance.py --large              # adds a 20 000-image, 80-class timing case
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataengine.curation.rebalance import (
    LVIS_THRESHOLD,
    count_matrix,
    kl_of_repeat_factors,
    lvis_best_threshold,
    lvis_repeat_factors,
    plan_repeat_factors,
    target_distribution,
)
from dataengine.data.coco import CategoryMap, load_coco
from dataengine.io import atomic_write_json


def demo_counts(general: Path, curated: Path) -> np.ndarray | None:
    if not (general.is_file() and curated.is_file()):
        return None
    cocos = [load_coco(general), load_coco(curated)]
    cats = CategoryMap.from_coco(cocos[0])
    return np.concatenate([count_matrix(c, cats) for c in cocos])


def bccd_like(n_images: int, seed: int) -> np.ndarray:
    """RBC ~ Poisson(12) + 1 per image, WBC 1 in 95 % of images, platelets ~ Poisson(0.6): ~85 / 8 / 5 %."""
    rng = np.random.default_rng(seed)
    rbc = rng.poisson(12, n_images) + 1
    wbc = (rng.random(n_images) < 0.95).astype(int)
    platelets = rng.poisson(0.6, n_images)
    return np.stack([rbc, wbc, platelets], axis=1)


def zipf_set(n_images: int, n_classes: int, seed: int, per_image: float = 2.0, background: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shares = 1.0 / np.arange(1, n_classes + 1) ** 1.2
    shares /= shares.sum()
    sizes = rng.poisson(per_image, n_images) + 1
    sizes[rng.random(n_images) < background] = 0
    return np.stack([rng.multinomial(s, shares) for s in sizes])


def run_case(name: str, counts: np.ndarray, target: str, max_repeat: float) -> dict[str, Any]:
    q = target_distribution(target, counts.sum(axis=0), tau=0.5)
    t0 = time.perf_counter()
    plan = plan_repeat_factors(counts, q, max_repeat)
    seconds = time.perf_counter() - t0
    t_best, lvis_kl = lvis_best_threshold(counts, q, max_repeat)
    r_lvis = lvis_repeat_factors(counts, t_best, max_repeat)
    shares = counts.sum(axis=0) / max(counts.sum(), 1)
    return {
        "case": name, "images": int(counts.shape[0]), "classes": int(counts.shape[1]), "target": target,
        "max_repeat": max_repeat, "class_shares": [round(float(s), 4) for s in shares],
        "kl_before": plan.kl_before, "kl_solver": plan.kl_after, "kl_lvis_best": lvis_kl,
        "lvis_best_threshold": t_best,
        "kl_lvis_paper": kl_of_repeat_factors(counts, lvis_repeat_factors(counts, LVIS_THRESHOLD, max_repeat), q),
        "solver_gap": plan.gap, "solver_iterations": plan.iterations, "solver_ms": round(1000 * seconds, 2),
        "mean_repeat_solver": round(float(plan.repeat_factors.mean()), 4),
        "mean_repeat_lvis_best": round(float(r_lvis.mean()), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--general", default="data/prepared/general/train.json")
    parser.add_argument("--curated", default="data/curated/scenario.json")
    parser.add_argument("--out", default="benchmarks/results/rebalance.json")
    parser.add_argument("--large", action="store_true", help="add a 20 000-image, 80-class timing case")
    args = parser.parse_args()

    sets: list[tuple[str, np.ndarray]] = []
    demo = demo_counts(Path(args.general), Path(args.curated))
    if demo is not None:
        sets.append(("demo (general + curated)", demo))
    else:
        print(f"demo data not found ({args.general}, {args.curated}): skipped", file=sys.stderr)
    sets += [("bccd-like 85/10/5", bccd_like(300, seed=0)), ("zipf 5 classes", zipf_set(1000, 5, seed=1)),
             ("zipf 20 classes", zipf_set(2000, 20, seed=2))]
    if args.large:
        sets.append(("zipf 80 classes (large)", zipf_set(20_000, 80, seed=3)))
    rows = [run_case(name, counts, target, max_repeat) for name, counts in sets
            for target in ("uniform", "tempered") for max_repeat in (2.0, 4.0, 10.0)]

    print("| case | target | max_repeat | KL before | KL solver | KL LVIS (best t) | KL LVIS (t=0.001) | gap | "
          "iters | ms | mean r solver / LVIS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['target']} | {r['max_repeat']:g} | {r['kl_before']:.4f} | {r['kl_solver']:.4f} | "
              f"{r['kl_lvis_best']:.4f} | {r['kl_lvis_paper']:.4f} | {r['solver_gap']:.0e} | "
              f"{r['solver_iterations']} | {r['solver_ms']:.1f} | {r['mean_repeat_solver']:.2f} / "
              f"{r['mean_repeat_lvis_best']:.2f} |")
    worse = [r for r in rows if r["kl_solver"] > r["kl_lvis_best"] + 1e-12]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__},
        "tau": 0.5,
        "solver_never_worse_than_lvis": not worse,
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"\nsolver KL <= LVIS best-t KL in {len(rows) - len(worse)}/{len(rows)} cases -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
