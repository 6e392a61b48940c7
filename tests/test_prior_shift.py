"""benchmarks/prior_shift.py: the EM of Saerens et al. recovers a prior shift where its assumption holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "prior_shift", Path(__file__).resolve().parents[1] / "benchmarks" / "prior_shift.py")
ps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ps)


def _posteriors(n: int, prior: float, rng: np.random.Generator) -> np.ndarray:
    """Scores ~ N(+1, 1) for right boxes and N(-1, 1) for wrong ones; the exact posterior under a 0.5 prior."""
    right = rng.uniform(size=n) < prior
    x = rng.normal(np.where(right, 1.0, -1.0), 1.0)
    return 1.0 / (1.0 + np.exp(-2.0 * x))  # likelihood ratio exp(2x), prior odds 1


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_em_recovers_the_pool_prior_when_only_the_prior_shifts(target):
    p = _posteriors(20_000, target, np.random.default_rng(0))
    assert ps.em_prior(p, 0.5) == pytest.approx(target, abs=0.02)


def test_rescale_is_the_identity_at_the_val_prior_and_monotone():
    p = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(ps.rescale(p, 0.3, 0.3), p)
    shifted = ps.rescale(p, 0.1, 0.6)
    assert np.all(np.diff(shifted) > 0) and np.all(shifted[1:-1] < p[1:-1])
    assert shifted[-1] == 1.0  # odds of a certain box cannot be rescaled: why the demo's top steps do not move


def test_em_prior_is_undefined_for_a_degenerate_val_prior_or_no_boxes():
    assert ps.em_prior(np.array([0.9, 0.2]), 1.0) is None
    assert ps.em_prior(np.array([0.9, 0.2]), 0.0) is None
    assert ps.em_prior(np.array([]), 0.5) is None
