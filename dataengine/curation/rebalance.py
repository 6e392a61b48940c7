"""KL rebalancing: per-image repeat factors whose expected class distribution is closest to a target.

The problem. A training set of ``N`` images has instance counts ``n[i, k]`` (image ``i``, class ``k``). A sampler
that draws image ``i`` with probability proportional to a repeat factor ``r_i`` sees, per epoch, expected class
counts ``c_k = sum_i r_i n[i, k]`` (up to the epoch size), i.e. the class distribution ``p(r) = c / sum(c)``. We want
the ``r`` in the box ``[1, R]^N`` (``R = max_repeat``) whose ``p(r)`` minimises ``KL(p || q)`` to a target ``q``
(uniform; tempered ``q_k ~ n_k ** tau``; or explicit shares). Instances are counted, not images: a detector's
classification loss sees instances.

Why the box ``[1, R]`` and no lower bound below 1: ``p`` depends only on the ratios of the ``r_i``, so a box
``[m, M]`` reaches exactly the distributions of ``[1, M / m]``; down-sampling is the epoch size's job
(``epoch_size`` below ``sum(r)``), not a second parameter.

Algorithm (exact up to a certified gap):

1. The problem is convex in disguise. With ``y = r / sum_i r_i a_i`` (``a_i`` = instances of image ``i``),
   ``p = n^T y`` is linear in ``y`` and the box becomes the polyhedron ``{y : a^T y = 1, t <= y_i <= R t}``;
   ``KL(n^T y || q)`` is convex there, so every stationary point in ``r`` is a global minimum.
2. Solver: projected exponentiated gradient on ``u = log r`` in ``[0, log R]``, starting at ``r = 1`` (the plain
   sampler, so the answer stays close to it): ``u <- clip(u - eta * d)``, ``d_i = sum_k n[i, k] (log(p_k / q_k) - KL)``
   (image ``i``'s instances' total excess log-ratio: an image of over-represented classes goes down, one of
   under-represented classes up). A step is accepted only if it satisfies Armijo's condition (so KL never
   increases, also in floating point: the reported KL after is the accepted value); ``eta`` doubles after an
   accepted step and halves after a refused one. Deterministic, no RNG.
3. Certificate: Frank-Wolfe's duality gap in the ``y`` form, ``gap = KL(p) - min_{r in box} (g^T r) / (a^T r)``
   with ``g_i = sum_k n[i, k] log(p_k / q_k)``; the minimum of this linear-fractional function over the box is at
   a vertex found by sorting ``g_i / a_i`` (the ``m`` smallest at ``R``, the rest at 1, best ``m`` by prefix sums).
   By convexity ``KL(p) - KL* <= gap``. Stopping rule: ``gap <= tol`` (default 1e-9 nats), no projected step
   left, or ``max_iter`` iterations; the gap is reported with the result, so the optimality claim is auditable.

Edge cases, all explicit:

- **Background images** (no instance): they do not move ``p``; their ``r`` stays 1 (they still take their share of
  the epoch: hard negatives keep their weight).
- **Classes with no instance** cannot be raised by any ``r``: listed in ``unreachable``, left out of the KL, and
  ``q`` is renormalised over the reachable classes (their expected counts are 0, never a division by zero).
- **A zero share** for a reachable class (explicit targets): ``q_k = 0`` would make every KL infinite (``r >= 1``
  keeps ``p_k > 0``); it is floored at ``Q_FLOOR`` (1e-6, then renormalised), which makes the solver push that
  class as low as the box allows. Listed in ``zero_target``. If every reachable class has share 0 the floor makes
  ``q`` uniform over them.
- **Nothing reachable** (all background, or no image): KL is 0 by definition, ``r`` is all 1.

Baseline: LVIS repeat-factor sampling (Gupta et al., "LVIS", CVPR 2019, §5 and detectron2's
``RepeatFactorTrainingSampler``): ``r_i = max_{c in image i} max(1, sqrt(t / f_c))`` with ``f_c`` the fraction of
images containing class ``c``. It targets no distribution and ignores co-occurrence, so at the same ``max_repeat`` its
KL is never below this solver's (same box); :func:`lvis_best_threshold` tunes its ``t`` on the target, to compare
against its best case.

Example:
    >>> counts = np.array([[3, 0], [0, 1]])  # image 0: three of class 0; image 1: one of class 1
    >>> plan = plan_repeat_factors(counts, np.array([0.5, 0.5]), max_repeat=4.0)
    >>> np.round(plan.repeat_factors, 6).tolist(), round(plan.kl_after, 9)
    ([1.0, 3.0], 0.0)
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataengine.config import RebalanceParams
from dataengine.data.coco import CategoryMap
from dataengine.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "Q_FLOOR",
    "RebalancePlan",
    "RebalanceResult",
    "kl_divergence",
    "target_distribution",
    "plan_repeat_factors",
    "lvis_repeat_factors",
    "lvis_best_threshold",
    "kl_of_repeat_factors",
    "count_matrix",
    "rebalance_coco",
    "plan_document",
    "rebalance_metrics",
    "class_table_csv",
    "plot_rebalance",
    "summary_lines",
    "make_sampler",
]

Q_FLOOR = 1e-6  # a zero target share of a class that has instances (KL would be infinite otherwise)
LVIS_THRESHOLD = 0.001  # the LVIS paper's t


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p || q) = sum_k p_k log(p_k / q_k)`` in nats, with ``0 log 0 = 0``.

    Raises:
        ValueError: ``q_k = 0`` where ``p_k > 0`` (the divergence would be infinite).

    Example:
        >>> round(kl_divergence(np.array([0.5, 0.5]), np.array([0.25, 0.75])), 6)
        0.143841
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = p > 0
    if np.any(q[m] <= 0):
        raise ValueError(f"KL(p || q) is infinite: q is 0 where p > 0 (p={p.tolist()}, q={q.tolist()})")
    return max(0.0, float(np.sum(p[m] * np.log(p[m] / q[m]))))  # >= 0; rounding can give -1e-17


def target_distribution(kind: str, class_counts: np.ndarray, *, tau: float = 0.5,
                        shares: Mapping[str, float] | None = None, names: Sequence[str] = ()) -> np.ndarray:
    """The requested target ``q`` (before :func:`plan_repeat_factors` drops unreachable classes).

    Args:
        kind: ``"uniform"``, ``"tempered"`` (``q_k ~ n_k ** tau``; ``tau = 0`` is uniform, 1 the original
            distribution) or ``"explicit"`` (``shares``).
        class_counts: ``[K]`` instance counts of the training set.
        tau: Temperature of ``"tempered"``, in ``[0, 1]``.
        shares: ``{class name: share}`` for ``"explicit"``: every class of ``names``, non-negative, summing to 1
            (within 1e-3; the rest is renormalised away).
        names: Class names, in label order (``"explicit"`` only).

    Returns:
        ``[K]`` float64, summing to 1 (a tempered target of an all-zero count vector is uniform).

    Raises:
        ValueError: Unknown kind, ``tau`` out of range, or shares naming unknown classes, missing a class, negative,
            or not summing to 1; the message names the offending value.

    Example:
        >>> target_distribution("tempered", np.array([81, 9, 1]), tau=0.5).round(3).tolist()
        [0.692, 0.231, 0.077]
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    k = counts.shape[0]
    if kind == "uniform":
        return np.full(k, 1.0 / k) if k else counts.copy()
    if kind == "tempered":
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        q = np.where(counts > 0, counts, 0.0) ** tau if tau > 0 else np.ones(k)
        return q / q.sum() if q.sum() > 0 else np.full(k, 1.0 / max(k, 1))
    if kind == "explicit":
        shares = dict(shares or {})
        if len(names) != k:
            raise ValueError(f"explicit shares need the {k} class names, got {list(names)}")
        unknown = sorted(set(shares) - set(names))
        if unknown:
            raise ValueError(f"rebalance.shares: unknown class {unknown[0]!r}; known classes: {', '.join(names)}")
        missing = [n for n in names if n not in shares]
        if missing:
            raise ValueError(f"rebalance.shares must give every class a share (0 is allowed); missing: "
                             f"{', '.join(missing)}")
        q = np.array([float(shares[n]) for n in names])
        if np.any(~np.isfinite(q)) or np.any(q < 0):
            raise ValueError(f"rebalance.shares must be finite and >= 0, got {dict(shares)}")
        if abs(q.sum() - 1.0) > 1e-3:
            raise ValueError(f"rebalance.shares must sum to 1, they sum to {q.sum():.6g}: {dict(shares)}")
        return q / q.sum()
    raise ValueError(f"unknown rebalance target {kind!r}; valid: uniform, tempered, explicit")


@dataclass(frozen=True)
class RebalancePlan:
    """The solver's result (all arrays float64; ``[N]`` per image, ``[K]`` per class).

    Attributes:
        repeat_factors: ``[N]`` in ``[1, max_repeat]``; 1 for background images.
        target: ``[K]`` the effective ``q``: renormalised over the reachable classes (0 on unreachable ones).
        counts_before: ``[K]`` instances with ``r = 1`` (the data as it is).
        counts_after: ``[K]`` ``sum_i r_i n[i, k]`` (scale to an epoch with ``epoch_size / sum(r)``).
        p_before: ``[K]`` class distribution with ``r = 1``.
        p_after: ``[K]`` class distribution with ``r``.
        kl_before: ``KL(p_before || target)`` over the reachable classes.
        kl_after: ``KL(p_after || target)``; never above ``kl_before``.
        gap: Frank-Wolfe duality gap at ``r``: ``kl_after - KL* <= gap``.
        iterations: Accepted-or-refused solver iterations.
        converged: ``gap <= tol`` (or no projected step was left).
        unreachable: Classes with no instance (not in the KL).
        zero_target: Reachable classes whose requested share was 0 (floored at :data:`Q_FLOOR`).
        max_repeat: The upper bound used.
    """

    repeat_factors: np.ndarray
    target: np.ndarray
    counts_before: np.ndarray
    counts_after: np.ndarray
    p_before: np.ndarray
    p_after: np.ndarray
    kl_before: float
    kl_after: float
    gap: float
    iterations: int
    converged: bool
    unreachable: tuple[int, ...]
    zero_target: tuple[int, ...]
    max_repeat: float


def _kl_of(a: np.ndarray, r: np.ndarray, q: np.ndarray) -> tuple[float, np.ndarray]:
    """KL and ``p`` of the reachable columns ``a`` [N, K'] under repeat factors ``r`` [N]."""
    c = a.T @ r  # [K']
    total = c.sum()
    if total <= 0:
        return 0.0, np.zeros_like(c)
    p = c / total
    return kl_divergence(p, q), p


def _fw_gap(a: np.ndarray, p: np.ndarray, kl: float, q: np.ndarray, max_repeat: float) -> float:
    """Frank-Wolfe duality gap ``KL(p) - min_{r in [1,R]^N} (g^T r) / (s^T r)`` (``s`` = instances per image)."""
    s = a.sum(axis=1)  # [N]
    keep = s > 0
    if not np.any(keep):
        return 0.0
    g = a[keep] @ np.log(p / q)  # [N'], every reachable p_k > 0
    s = s[keep]
    order = np.argsort(g / s, kind="stable")
    cg = np.concatenate([[0.0], np.cumsum(g[order])])  # the m lowest-ratio images at R, the others at 1
    cs = np.concatenate([[0.0], np.cumsum(s[order])])
    ratio = (max_repeat * cg + (cg[-1] - cg)) / (max_repeat * cs + (cs[-1] - cs))
    return max(0.0, kl - float(ratio.min()))


def plan_repeat_factors(counts: np.ndarray, target: np.ndarray, max_repeat: float, *, max_iter: int = 1000,
                        tol: float = 1e-9) -> RebalancePlan:
    """Repeat factors in ``[1, max_repeat]`` minimising ``KL(p || target)`` (algorithm: see the module docstring).

    Args:
        counts: ``[N, K]`` non-negative instance counts per image and class.
        target: ``[K]`` non-negative target shares (renormalised over the reachable classes).
        max_repeat: Upper bound ``R >= 1`` of every repeat factor.
        max_iter: Iteration cap of the solver.
        tol: Stop when the certified gap ``KL - KL*`` is at most this (nats).

    Returns:
        A :class:`RebalancePlan`; ``kl_after <= kl_before`` always.

    Raises:
        ValueError: Shapes disagree, negative or non-finite counts or target, ``max_repeat < 1``.

    Example:
        >>> plan = plan_repeat_factors(np.array([[1, 0], [1, 1]]), np.array([0.5, 0.5]), 3.0)
        >>> plan.repeat_factors.tolist()  # raise the image with the rare class as far as allowed
        [1.0, 3.0]
    """
    n = np.asarray(counts, dtype=np.float64)
    q_req = np.asarray(target, dtype=np.float64)
    if n.ndim != 2 or q_req.shape != (n.shape[1],):
        raise ValueError(f"counts must be [N, K] and target [K], got {n.shape} and {q_req.shape}")
    if not (np.all(np.isfinite(n)) and np.all(n >= 0)):
        raise ValueError("counts must be finite and >= 0")
    if not (np.all(np.isfinite(q_req)) and np.all(q_req >= 0)):
        raise ValueError(f"target must be finite and >= 0, got {q_req.tolist()}")
    if not (math.isfinite(max_repeat) and max_repeat >= 1.0):
        raise ValueError(f"max_repeat must be a finite number >= 1, got {max_repeat}")
    num_images, num_classes = n.shape
    reach, q = _effective_target(n, q_req)
    unreachable = tuple(int(k) for k in np.flatnonzero(~reach))
    zero_target = tuple(int(k) for k in np.flatnonzero(reach & (q_req <= 0)))
    a, qa = n[:, reach], q[reach]  # [N, K'], [K']

    r = np.ones(num_images)
    kl0, p0 = _kl_of(a, r, qa)
    kl, p = kl0, p0
    u, log_r_max = np.zeros(num_images), math.log(max_repeat)
    eta, iterations, gap = 1.0, 0, _fw_gap(a, p, kl, qa, max_repeat) if a.size else 0.0
    converged = gap <= tol
    while not converged and iterations < max_iter:
        iterations += 1
        d = a @ (np.log(p / qa) - kl)  # [N] excess log-ratio of each image's instances (EG direction)
        grad_u = d * r / (a.T @ r).sum()  # [N] true gradient of KL in u = log r, for Armijo
        u_new = np.clip(u - eta * d, 0.0, log_r_max)
        step = u_new - u
        if not np.any(step):  # projected direction is zero: a KKT point, the global optimum (module docstring)
            converged = True
            break
        r_new = np.clip(np.exp(u_new), 1.0, max_repeat)  # clip: exp(log R) may round above R
        kl_new, p_new = _kl_of(a, r_new, qa)
        if kl_new <= kl + 1e-4 * float(grad_u @ step) and kl_new <= kl:
            u, r, kl, p = u_new, r_new, kl_new, p_new
            eta = min(eta * 2.0, 1e6)
            gap = _fw_gap(a, p, kl, qa, max_repeat)
            converged = gap <= tol
        else:
            eta *= 0.5
            if eta < 1e-12:  # no descent left at floating-point resolution
                break
    # Canonical scale: p only sees ratios, so shift log r until the smallest factor of an image with instances is 1
    # (the least epoch inflation, and background images keep their share). Kept only if KL did not move up.
    has = a.sum(axis=1) > 0
    if np.any(has) and u[has].min() > 0:
        r_c = np.clip(np.exp(np.where(has, u - u[has].min(), 0.0)), 1.0, max_repeat)
        kl_c, p_c = _kl_of(a, r_c, qa)
        if kl_c <= kl:
            r, kl, p = r_c, kl_c, p_c
            gap = _fw_gap(a, p, kl, qa, max_repeat)
    # kl is the value computed for the returned r (background rows have d_i = 0, so their r stayed exactly 1)
    assert kl <= kl0 and np.all((r >= 1.0) & (r <= max_repeat)), "solver invariant"
    p_before, p_after = np.zeros(num_classes), np.zeros(num_classes)
    p_before[reach], p_after[reach] = p0, p
    return RebalancePlan(
        repeat_factors=r, target=q, counts_before=n.sum(axis=0), counts_after=n.T @ r, p_before=p_before,
        p_after=p_after, kl_before=kl0, kl_after=kl, gap=gap, iterations=iterations, converged=bool(converged),
        unreachable=unreachable, zero_target=zero_target, max_repeat=float(max_repeat))


def lvis_repeat_factors(counts: np.ndarray, threshold: float = LVIS_THRESHOLD,
                        max_repeat: float | None = None) -> np.ndarray:
    """LVIS repeat-factor sampling: ``r_i = max_{c in i} max(1, sqrt(t / f_c))``, optionally clipped.

    ``f_c`` is the fraction of images containing class ``c`` (Gupta et al. 2019; detectron2's
    ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency``). Background images get 1.

    Example:
        >>> lvis_repeat_factors(np.array([[1, 0], [1, 0], [1, 0], [1, 1]]), threshold=1.0).tolist()
        [1.0, 1.0, 1.0, 2.0]
    """
    present = np.asarray(counts) > 0  # [N, K]
    num_images = present.shape[0]
    f = present.sum(axis=0) / max(num_images, 1)  # [K]
    with np.errstate(divide="ignore"):
        rc = np.where(f > 0, np.maximum(1.0, np.sqrt(threshold / np.where(f > 0, f, 1.0))), 1.0)  # [K]
    r = np.where(present, rc[None, :], 1.0).max(axis=1, initial=1.0)  # [N]
    return np.minimum(r, max_repeat) if max_repeat is not None else r


def lvis_best_threshold(counts: np.ndarray, target: np.ndarray, max_repeat: float,
                        thresholds: Sequence[float] | None = None) -> tuple[float, float]:
    """LVIS's ``t`` (on a grid) with the lowest KL to ``target`` at ``max_repeat``: the baseline at its best.

    Returns:
        ``(threshold, kl)``; the KL is over the reachable classes with ``target`` renormalised, as in
        :func:`plan_repeat_factors`.
    """
    n = np.asarray(counts, dtype=np.float64)
    if thresholds is None:  # from "repeats nothing" to "everything at max_repeat"
        thresholds = [LVIS_THRESHOLD, *np.geomspace(1e-4, max(max_repeat, 1.0) ** 2, 161).tolist()]
    best = (float(thresholds[0]), math.inf)
    for t in thresholds:
        kl = kl_of_repeat_factors(n, lvis_repeat_factors(n, t, max_repeat), target)
        if kl < best[1] - 1e-15:
            best = (float(t), kl)
    return best


def _effective_target(n: np.ndarray, q_req: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reachable classes ``[K]`` bool and ``q`` renormalised over them, zeros floored (module docstring)."""
    reach = n.sum(axis=0) > 0  # [K]
    q = np.zeros(n.shape[1])
    if np.any(reach):
        qr = q_req[reach] / q_req[reach].sum() if q_req[reach].sum() > 0 else np.ones(int(reach.sum()))
        qr = np.maximum(qr, Q_FLOOR)
        q[reach] = qr / qr.sum()
    return reach, q


def kl_of_repeat_factors(counts: np.ndarray, r: np.ndarray, target: np.ndarray) -> float:
    """``KL(p(r) || q)`` of any repeat factors (LVIS's, hand-made), with the conventions of :func:`plan_repeat_factors`.

    Example:
        >>> kl_of_repeat_factors(np.array([[3, 0], [0, 1]]), np.array([1.0, 3.0]), np.array([0.5, 0.5]))
        0.0
    """
    n = np.asarray(counts, dtype=np.float64)
    reach, q = _effective_target(n, np.asarray(target, dtype=np.float64))
    return _kl_of(n[:, reach], np.asarray(r, dtype=np.float64), q[reach])[0]


# --------------------------------------------------------------------------------------------------------------
# COCO sources -> plan, metrics, plot, sampler
# --------------------------------------------------------------------------------------------------------------


def count_matrix(coco: Mapping[str, Any], categories: CategoryMap) -> np.ndarray:
    """``[N, K]`` instance counts of a COCO dict, images in file order; crowd regions are not instances.

    Raises:
        ValueError: An annotation names an image or a category the file does not have.
    """
    row = {img["id"]: i for i, img in enumerate(coco["images"])}
    counts = np.zeros((len(row), len(categories)), dtype=np.int64)
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann["image_id"] not in row:
            raise ValueError(f"annotation {ann.get('id')} refers to image id {ann['image_id']}, which is not listed")
        counts[row[ann["image_id"]], categories.label(ann["category_id"])] += 1
    return counts


@dataclass(frozen=True)
class RebalanceResult:
    """A plan over named COCO sources: the solver's result plus what is needed to write and use it."""

    plan: RebalancePlan
    classes: tuple[str, ...]
    images: tuple[tuple[str, str, int], ...]  # (source, file_name, image_id), in plan order
    counts: np.ndarray  # [N, K]
    requested_target: np.ndarray  # [K] q as asked for (before dropping unreachable classes)
    epoch_size: int
    params: RebalanceParams
    lvis_threshold: float
    lvis_kl: float
    lvis_kl_paper: float  # at the paper's t = 0.001


def rebalance_coco(sources: Mapping[str, Mapping[str, Any]], params: RebalanceParams) -> RebalanceResult:
    """Plan repeat factors over COCO sources (``{"general": coco, "scenario": coco}``) with the stage's params.

    Images are taken in the order of ``params.sources``, then by ``image_id``; the sources must share their
    categories (same ids and names).

    Raises:
        ValueError: A source of ``params.sources`` is missing or listed twice, the categories differ, there is no
            image at all, or the target is invalid (see :func:`target_distribution`).
    """
    names = list(params.sources)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"rebalance.sources must list distinct sources, got {names}")
    missing = [s for s in names if s not in sources]
    if missing:
        raise ValueError(f"rebalance: source {missing[0]!r} was not given; given: {', '.join(sources)}")
    cats = CategoryMap.from_coco(sources[names[0]])
    for s in names[1:]:
        other = CategoryMap.from_coco(sources[s])
        if other != cats:
            raise ValueError(f"rebalance: sources {names[0]!r} and {s!r} have different categories: "
                             f"{list(zip(cats.ids, cats.names))} vs {list(zip(other.ids, other.names))}")
    blocks, images = [], []
    for s in names:
        coco = sources[s]
        order = sorted(range(len(coco["images"])), key=lambda i: coco["images"][i]["id"])
        blocks.append(count_matrix(coco, cats)[order])
        images += [(s, str(coco["images"][i]["file_name"]), int(coco["images"][i]["id"])) for i in order]
    if not images:
        raise ValueError(f"rebalance: no image in sources {', '.join(names)}: nothing to sample")
    counts = np.concatenate(blocks, axis=0)
    requested = target_distribution(params.target, counts.sum(axis=0), tau=params.tau, shares=params.shares,
                                    names=cats.names)
    plan = plan_repeat_factors(counts, requested, params.max_repeat)
    epoch = params.epoch_size or max(1, int(round(float(plan.repeat_factors.sum()))))
    t_best, kl_best = lvis_best_threshold(counts, requested, params.max_repeat)
    kl_paper = kl_of_repeat_factors(counts, lvis_repeat_factors(counts, LVIS_THRESHOLD, params.max_repeat), requested)
    return RebalanceResult(plan=plan, classes=cats.names, images=tuple(images), counts=counts,
                           requested_target=requested, epoch_size=epoch, params=params, lvis_threshold=t_best,
                           lvis_kl=kl_best, lvis_kl_paper=kl_paper)


def _per_epoch(result: RebalanceResult) -> np.ndarray:
    """``[K]`` expected instances per epoch of ``epoch_size`` draws with probability ``r_i / sum(r)``."""
    r = result.plan.repeat_factors
    return result.epoch_size * (result.counts.T @ r) / r.sum()


def plan_document(result: RebalanceResult) -> dict[str, Any]:
    """The ``plan.json`` the student's sampler reads (see :func:`make_sampler`)."""
    r = result.plan.repeat_factors
    weights = r / r.sum()
    p = result.params
    return {
        "version": 1,
        "sampler": "torch WeightedRandomSampler(weights, num_samples=epoch_size, replacement=True) over "
                   "ConcatDataset(sources in this order); see dataengine.curation.make_sampler",
        "sources": list(p.sources),
        "epoch_size": result.epoch_size,
        "max_repeat": p.max_repeat,
        "target": {"kind": p.target, "tau": p.tau, "shares": dict(p.shares),
                   "effective": _by_class(result, result.plan.target)},
        "classes": list(result.classes),
        "unreachable_classes": [result.classes[k] for k in result.plan.unreachable],
        "images": [{"source": s, "file_name": f, "image_id": i, "repeat_factor": round(float(rf), 6),
                    "weight": float(w)} for (s, f, i), rf, w in zip(result.images, r, weights)],
    }


def _by_class(result: RebalanceResult, values: np.ndarray, digits: int = 6) -> dict[str, float]:
    return {name: round(float(v), digits) for name, v in zip(result.classes, values)}


def rebalance_metrics(result: RebalanceResult) -> dict[str, Any]:
    """``metrics/rebalance.json``: KL before/after, expected instances per class per epoch, and the audit trail.

    ``class_counts_before`` is a plain epoch (every image once); ``class_counts_after`` an epoch of ``epoch_size``
    draws of the plan. KLs are over the reachable classes (``unreachable_classes`` have no instance).
    """
    plan = result.plan
    r = plan.repeat_factors
    raised = [result.classes[k] for k in np.flatnonzero(plan.p_after > plan.p_before + 1e-12)]
    return {
        "kl_before": round(plan.kl_before, 9),
        "kl_after": round(plan.kl_after, 9),
        "class_counts_before": _by_class(result, plan.counts_before, 3),
        "class_counts_after": _by_class(result, _per_epoch(result), 3),
        "target": _by_class(result, plan.target),
        "share_before": _by_class(result, plan.p_before),
        "share_after": _by_class(result, plan.p_after),
        "classes_raised": raised,
        "unreachable_classes": [result.classes[k] for k in plan.unreachable],
        "zero_target_classes": [result.classes[k] for k in plan.zero_target],
        "kl_note": "KL(p || q) in nats over classes with at least one instance, q renormalised over them",
        "images": len(result.images),
        "background_images": int((result.counts.sum(axis=1) == 0).sum()),
        "epoch_size": result.epoch_size,
        "max_repeat": plan.max_repeat,
        "max_repeat_used": round(float(r.max()), 6),
        "mean_repeat": round(float(r.mean()), 6),
        "share_images_repeated": round(float((r > 1.0 + 1e-9).mean()), 6),
        "solver": {"iterations": plan.iterations, "gap": plan.gap, "converged": plan.converged},
        "lvis": {"threshold": result.lvis_threshold, "kl": round(result.lvis_kl, 9),
                 "kl_paper_threshold": round(result.lvis_kl_paper, 9), "paper_threshold": LVIS_THRESHOLD},
    }


def class_table_csv(result: RebalanceResult) -> str:
    """Per-class CSV for ``dvc plots`` (template ``bar_horizontal``, ``x: share``, ``y: label``), long form.

    One row per class and series (``before``, ``after``, ``target``): ``label`` (``"circle: after"``), ``class``,
    ``series``, ``share`` of instances and expected ``instances`` per epoch (the target's at the plan's epoch).
    DVC's bar templates take one numeric field, hence one row per bar.
    """
    plan, per_epoch = result.plan, _per_epoch(result)
    series = {"before": (plan.p_before, plan.counts_before), "after": (plan.p_after, per_epoch),
              "target": (plan.target, plan.target * per_epoch.sum())}
    rows = ["label,class,series,share,instances"]
    for k, name in enumerate(result.classes):
        for s, (share, inst) in series.items():
            rows.append(f"{name}: {s},{name},{s},{share[k]:.6f},{inst[k]:.3f}")
    return "\n".join(rows) + "\n"


def plot_rebalance(result: RebalanceResult, path: str | Path) -> None:
    """Bar chart (PNG) of the class shares before, after and the target, with KLs in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, k = result.plan, len(result.classes)
    x = np.arange(k)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * k + 2.0), 3.6), dpi=120)
    ax.bar(x - 0.27, plan.p_before, 0.27, label=f"before (KL {plan.kl_before:.4f})", color="#9e9e9e")
    ax.bar(x, plan.p_after, 0.27, label=f"after (KL {plan.kl_after:.4f})", color="#1f77b4")
    ax.bar(x + 0.27, plan.target, 0.27, label="target", color="none", edgecolor="#d62728", hatch="//")
    labels = [n + ("\n(no instance)" if i in plan.unreachable else "") for i, n in enumerate(result.classes)]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("share of instances")
    ax.set_title(f"rebalance: target {result.params.target}, max_repeat {plan.max_repeat:g}; "
                 f"LVIS best KL {result.lvis_kl:.4f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def summary_lines(result: RebalanceResult) -> list[str]:
    """A short human log: per-class counts before/after, raised classes, KLs."""
    m = rebalance_metrics(result)
    lines = [f"rebalance: {m['images']} images ({m['background_images']} background) from "
             f"{', '.join(result.params.sources)}, target {result.params.target}, max_repeat {m['max_repeat']:g}, "
             f"epoch {m['epoch_size']} draws"]
    for name in result.classes:
        lines.append(f"  {name:>16}: {m['class_counts_before'][name]:10.1f} -> {m['class_counts_after'][name]:10.1f} "
                     f"instances/epoch, share {m['share_before'][name]:.3f} -> {m['share_after'][name]:.3f} "
                     f"(target {m['target'][name]:.3f})")
    lines.append(f"  raised: {', '.join(m['classes_raised']) or 'none'}; unreachable (no instance): "
                 f"{', '.join(m['unreachable_classes']) or 'none'}; zero target: "
                 f"{', '.join(m['zero_target_classes']) or 'none'}")
    lines.append(f"  KL {m['kl_before']:.5f} -> {m['kl_after']:.5f} (gap {m['solver']['gap']:.1e}, "
                 f"{m['solver']['iterations']} iterations); LVIS at its best t={m['lvis']['threshold']:.3g}: "
                 f"{m['lvis']['kl']:.5f}; {100 * m['share_images_repeated']:.1f}% of images repeated")
    return lines


def plan_weights(plan: Mapping[str, Any], order: Sequence[tuple[str, Sequence[int]]]) -> list[float]:
    """The plan's repeat factors in ``ConcatDataset`` order: one sampling weight per dataset item.

    Args:
        plan: The ``plan.json`` document (:func:`plan_document`).
        order: ``[(source, image ids in that dataset's index order), ...]``. Every image of a listed source must be
            in the plan and vice versa; a source left out of ``order`` is simply not drawn from.

    Raises:
        ValueError: An image of ``order`` is not in the plan, or a plan image of a listed source is not in ``order``
            (a stale plan).

    Example:
        >>> plan = {"images": [{"source": "general", "image_id": 1, "repeat_factor": 2.0}]}
        >>> plan_weights(plan, [("general", [1])])
        [2.0]
    """
    factor = {(im["source"], int(im["image_id"])): float(im["repeat_factor"]) for im in plan["images"]}
    weights, seen = [], set()
    for source, ids in order:
        for image_id in ids:
            key = (source, int(image_id))
            if key not in factor:
                raise ValueError(f"image {image_id} of source {source!r} is not in the rebalance plan (stale plan? "
                                 f"re-run the rebalance stage)")
            weights.append(factor[key])
            seen.add(key)
    listed = {source for source, _ in order}
    extra = sorted(key for key in set(factor) - seen if key[0] in listed)
    if extra:
        raise ValueError(f"{len(extra)} images of the plan are not in the datasets, e.g. {extra[0]} (stale plan?)")
    if not weights:
        raise ValueError("the datasets are empty")
    return weights


def make_sampler(plan: Mapping[str, Any], order: Sequence[tuple[str, Sequence[int]]],
                 generator: Any = None, epoch_size: int | None = None) -> Any:
    """A ``torch.utils.data.WeightedRandomSampler`` over ``ConcatDataset`` of the sources, following a plan.

    Args:
        plan: The ``plan.json`` document (:func:`plan_document`).
        order: ``[(source, image ids in that dataset's index order), ...]`` in ``ConcatDataset`` order, e.g.
            ``[("general", [im["id"] for im in general_ds.images]), ("scenario", [...])]``. A source of the plan
            left out of ``order`` is left out of the draw (e.g. general only).
        generator: Optional ``torch.Generator`` (seed it for reproducible epochs).
        epoch_size: Draws per epoch; default the plan's.

    Returns:
        A sampler drawing ``epoch_size`` indices with replacement, index ``j`` with probability
        ``repeat_factor_j / sum(repeat_factors)``.

    Raises:
        ValueError: The datasets and the plan do not list the same images (a stale plan).

    Example:
        >>> sampler = make_sampler(plan, [("general", ids_g), ("scenario", ids_s)])  # doctest: +SKIP
        >>> loader = DataLoader(ConcatDataset([general_ds, scenario_ds]), sampler=sampler)  # doctest: +SKIP
    """
    import torch
    from torch.utils.data import WeightedRandomSampler

    weights = plan_weights(plan, order)
    n = int(epoch_size if epoch_size is not None else plan["epoch_size"])
    return WeightedRandomSampler(torch.tensor(weights, dtype=torch.float64), num_samples=n, replacement=True,
                                 generator=generator)
