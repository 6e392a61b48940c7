"""Curation of the training set after review: what the student trains on, and how often it sees each image.

:mod:`dataengine.curation.rebalance` plans per-image repeat factors whose expected instance class distribution is
closest (KL) to a target, with a certified optimality gap and LVIS repeat-factor sampling as the baseline.
:mod:`dataengine.curation.mining` finds the hard negatives (image-level regions, pixel-level maps) the student's
losses weight up. It needs torch (a teacher run), so its names are imported on first use: the ``rebalance`` stage
imports this package without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from dataengine.curation.rebalance import (
    Q_FLOOR,
    RebalancePlan,
    RebalanceResult,
    class_table_csv,
    count_matrix,
    kl_divergence,
    kl_of_repeat_factors,
    lvis_best_threshold,
    lvis_repeat_factors,
    make_sampler,
    plan_document,
    plan_repeat_factors,
    plot_rebalance,
    rebalance_coco,
    rebalance_metrics,
    summary_lines,
    target_distribution,
)

__all__ = [
    "ImageEvidence",
    "MinedImage",
    "MiningResult",
    "Q_FLOOR",
    "RebalancePlan",
    "RebalanceResult",
    "class_table_csv",
    "count_matrix",
    "hard_map",
    "hard_maps_for",
    "hard_pixel_mask",
    "kl_divergence",
    "kl_of_repeat_factors",
    "lvis_best_threshold",
    "lvis_repeat_factors",
    "make_sampler",
    "mine_hard_negatives",
    "mine_image",
    "mined_document",
    "mining_metrics",
    "mining_summary_lines",
    "plan_document",
    "plan_repeat_factors",
    "plot_rebalance",
    "rebalance_coco",
    "rebalance_metrics",
    "region_image_ids",
    "regions_against_hidden",
    "select_regions",
    "stored_foreground",
    "summary_lines",
    "target_distribution",
    "write_mined",
]

_MINING = (
    "ImageEvidence",
    "MinedImage",
    "MiningResult",
    "hard_map",
    "hard_maps_for",
    "hard_pixel_mask",
    "mine_hard_negatives",
    "mine_image",
    "mined_document",
    "mining_metrics",
    "mining_summary_lines",
    "region_image_ids",
    "regions_against_hidden",
    "select_regions",
    "stored_foreground",
    "write_mined",
)


def __getattr__(name: str) -> Any:  # PEP 562: the mining names, imported on first access
    if name in _MINING:
        return getattr(importlib.import_module("dataengine.curation.mining"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
