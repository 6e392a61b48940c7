"""Curation of the training set after review: what the student trains on, and how often it sees each image.

:mod:`dataengine.curation.rebalance` plans per-image repeat factors whose expected instance class distribution is
closest (KL) to a target, with a certified optimality gap and LVIS repeat-factor sampling as the baseline.
"""

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
    "Q_FLOOR",
    "RebalancePlan",
    "RebalanceResult",
    "class_table_csv",
    "count_matrix",
    "kl_divergence",
    "kl_of_repeat_factors",
    "lvis_best_threshold",
    "lvis_repeat_factors",
    "make_sampler",
    "plan_document",
    "plan_repeat_factors",
    "plot_rebalance",
    "rebalance_coco",
    "rebalance_metrics",
    "summary_lines",
    "target_distribution",
]
