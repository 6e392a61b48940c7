"""KL rebalancing: solver properties and exact cases, LVIS baseline, targets, sampler, and the `rebalance` stage."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dataengine.config import ParamsError, RebalanceParams, load_params
from dataengine.curation import (
    Q_FLOOR,
    kl_divergence,
    kl_of_repeat_factors,
    lvis_best_threshold,
    lvis_repeat_factors,
    make_sampler,
    plan_document,
    plan_repeat_factors,
    rebalance_coco,
    rebalance_metrics,
    target_distribution,
)

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    """A count matrix (zeros common: background rows, empty classes), a target with zeros, a max repeat."""
    n = draw(st.integers(0, 12))
    k = draw(st.integers(1, 5))
    counts = draw(arrays(np.int64, (n, k), elements=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 7])))
    q = draw(arrays(np.float64, (k,), elements=st.sampled_from([0.0, 0.05, 0.2, 1.0, 3.0])))
    max_repeat = draw(st.sampled_from([1.0, 1.5, 2.0, 4.0, 10.0, 100.0]))
    return counts, q, max_repeat


@settings(max_examples=150, deadline=None)
@given(problems())
def test_properties_for_any_input(problem: tuple[np.ndarray, np.ndarray, float]) -> None:
    counts, q, max_repeat = problem
    plan = plan_repeat_factors(counts, q, max_repeat)
    assert plan.kl_after <= plan.kl_before + 1e-12
    r = plan.repeat_factors
    assert r.shape == (counts.shape[0],)
    assert np.all(r >= 1.0) and np.all(r <= max_repeat)
    assert np.all(r[counts.sum(axis=1) == 0] == 1.0)  # background images keep r = 1
    for arr in (plan.target, plan.p_before, plan.p_after, plan.counts_after):
        assert np.all(np.isfinite(arr))
    assert all(math.isfinite(v) and v >= 0 for v in (plan.kl_before, plan.kl_after, plan.gap))
    empty = tuple(int(k) for k in np.flatnonzero(counts.sum(axis=0) == 0))
    assert plan.unreachable == empty
    assert np.all(plan.target[list(empty)] == 0) and np.all(plan.p_after[list(empty)] == 0)
    if len(empty) < counts.shape[1]:
        assert plan.target.sum() == pytest.approx(1.0) and plan.p_after.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(plan.counts_after, counts.T @ r)
    # The certificate: no feasible r (LVIS's, all-max, a vertex) does better than kl_after - gap.
    for other in (lvis_repeat_factors(counts, 0.5, max_repeat), np.full(counts.shape[0], max_repeat),
                  np.where(np.arange(counts.shape[0]) % 2 == 0, max_repeat, 1.0)):
        assert kl_of_repeat_factors(counts, other, q) >= plan.kl_after - plan.gap - 1e-12


def test_exact_two_images_two_classes() -> None:
    # Image 0: three of class 0; image 1: one of class 1; uniform target. r1 / r0 = 3 balances exactly if allowed.
    counts = np.array([[3, 0], [0, 1]])
    plan = plan_repeat_factors(counts, np.array([0.5, 0.5]), 4.0)
    np.testing.assert_allclose(plan.repeat_factors, [1.0, 3.0], atol=1e-4)
    assert plan.kl_after == pytest.approx(0.0, abs=1e-9) and plan.converged
    # With max_repeat 2 the best is r = (1, 2): p = (3/5, 2/5).
    plan = plan_repeat_factors(counts, np.array([0.5, 0.5]), 2.0)
    np.testing.assert_allclose(plan.repeat_factors, [1.0, 2.0])
    p = np.array([0.6, 0.4])
    assert plan.kl_after == pytest.approx(float(np.sum(p * np.log(p / 0.5))), abs=1e-12)
    assert plan.kl_before == pytest.approx(float(0.75 * np.log(1.5) + 0.25 * np.log(0.5)), abs=1e-12)


def test_exact_rare_class_cooccurs_with_common_one() -> None:
    # Image 1 has both classes: raising it is the only way up for class 1, so r = (1, R): p = (1 + R, R) / (1 + 2R).
    R = 3.0
    plan = plan_repeat_factors(np.array([[1, 0], [1, 1]]), np.array([0.5, 0.5]), R)
    np.testing.assert_allclose(plan.repeat_factors, [1.0, R])
    np.testing.assert_allclose(plan.p_after, [(1 + R) / (1 + 2 * R), R / (1 + 2 * R)])
    assert plan.gap <= 1e-12


def test_zero_instance_class_is_reported_not_divided_by() -> None:
    counts = np.array([[5, 0, 0], [1, 0, 1], [0, 0, 0]])
    plan = plan_repeat_factors(counts, np.full(3, 1 / 3), 4.0)
    assert plan.unreachable == (1,)
    np.testing.assert_allclose(plan.target, [0.5, 0.0, 0.5])  # renormalised over the reachable classes
    assert plan.p_after[1] == 0.0 and plan.counts_after[1] == 0.0
    assert plan.kl_after < plan.kl_before and math.isfinite(plan.kl_after)
    assert plan.repeat_factors[2] == 1.0


def test_all_background_and_empty_sets() -> None:
    plan = plan_repeat_factors(np.zeros((4, 3), dtype=int), np.full(3, 1 / 3), 4.0)
    assert plan.repeat_factors.tolist() == [1.0] * 4
    assert plan.kl_before == plan.kl_after == 0.0 and plan.unreachable == (0, 1, 2)
    assert np.all(plan.p_after == 0) and np.all(plan.target == 0)
    plan = plan_repeat_factors(np.zeros((0, 2), dtype=int), np.array([0.5, 0.5]), 4.0)
    assert plan.repeat_factors.shape == (0,) and plan.kl_after == 0.0


def test_zero_target_share_is_floored_and_pushed_down() -> None:
    counts = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]])
    plan = plan_repeat_factors(counts, np.array([0.0, 0.5, 0.5]), 4.0)
    assert plan.zero_target == (0,)
    assert plan.target[0] == pytest.approx(Q_FLOOR, rel=1e-3) and math.isfinite(plan.kl_after)
    assert plan.p_after[0] < plan.p_before[0]
    assert plan.repeat_factors[0] == 1.0  # the image with most of class 0 is not repeated


def test_bad_inputs_raise_with_the_value() -> None:
    with pytest.raises(ValueError, match="max_repeat"):
        plan_repeat_factors(np.ones((2, 2)), np.array([0.5, 0.5]), 0.5)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        plan_repeat_factors(np.ones((2, 2)), np.array([1.0]), 2.0)
    with pytest.raises(ValueError, match="counts"):
        plan_repeat_factors(-np.ones((2, 2)), np.array([0.5, 0.5]), 2.0)
    with pytest.raises(ValueError, match="infinite"):
        kl_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0]))


def test_targets() -> None:
    counts = np.array([81.0, 9.0, 1.0, 0.0])
    np.testing.assert_allclose(target_distribution("uniform", counts), [0.25] * 4)
    np.testing.assert_allclose(target_distribution("tempered", counts, tau=0.0), [0.25] * 4)
    np.testing.assert_allclose(target_distribution("tempered", counts, tau=1.0), counts / counts.sum())
    np.testing.assert_allclose(target_distribution("tempered", counts, tau=0.5), np.array([9, 3, 1, 0]) / 13)
    names = ("a", "b", "c", "d")
    q = target_distribution("explicit", counts, shares={"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, names=names)
    np.testing.assert_allclose(q, [0.1, 0.2, 0.3, 0.4])
    for shares, message in [({"a": 1.0, "e": 0.0, "b": 0, "c": 0, "d": 0}, "unknown class 'e'"),
                            ({"a": 1.0}, "missing: b, c, d"),
                            ({"a": 1.5, "b": -0.5, "c": 0, "d": 0}, ">= 0"),
                            ({"a": 0.5, "b": 0.2, "c": 0, "d": 0}, "sum to 1, they sum to 0.7")]:
        with pytest.raises(ValueError, match=message):
            target_distribution("explicit", counts, shares=shares, names=names)
    with pytest.raises(ValueError, match="valid: uniform, tempered, explicit"):
        target_distribution("square-root", counts)
    # tau = 1: the data already is the target; nothing is repeated.
    plan = plan_repeat_factors(np.array([[3, 1], [1, 0]]), target_distribution("tempered", np.array([4, 1]), tau=1.0),
                               4.0)
    assert plan.repeat_factors.tolist() == [1.0, 1.0] and plan.kl_after == 0.0


def test_lvis_repeat_factors_known_values() -> None:
    # f = (1.0, 0.25): class 1's factor is sqrt(t / 0.25) = 2 at t = 1; images take the max over their classes.
    counts = np.array([[1, 0], [2, 0], [1, 0], [1, 1], [0, 0]])
    np.testing.assert_allclose(lvis_repeat_factors(counts[:4], 1.0), [1, 1, 1, 2])
    # With a background image f = (4/5, 1/5): f counts images, background ones included.
    r0, r1 = math.sqrt(5 / 4), math.sqrt(5)
    np.testing.assert_allclose(lvis_repeat_factors(counts, 1.0), [r0, r0, r0, r1, 1])
    np.testing.assert_allclose(lvis_repeat_factors(counts, 1.0, max_repeat=2.0), [r0, r0, r0, 2, 1])
    assert lvis_repeat_factors(np.zeros((3, 2)), 1.0).tolist() == [1.0, 1.0, 1.0]


def _imbalanced(shares: list[float], n_images: int, seed: int, per_image: float = 2.0,
                background: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.poisson(per_image, n_images) + 1
    sizes[rng.random(n_images) < background] = 0
    return np.stack([rng.multinomial(s, shares) for s in sizes])


@pytest.mark.parametrize(("shares", "target", "max_repeat"), [
    ([0.85, 0.10, 0.05], "uniform", 4.0),  # BCCD-like: RBC / WBC / platelets
    ([0.85, 0.10, 0.05], "tempered", 2.0),
    ([0.5, 0.3, 0.15, 0.04, 0.01], "uniform", 10.0),
    ([0.4, 0.3, 0.2, 0.1], "tempered", 4.0),
])
def test_solver_beats_lvis_at_the_same_max_repeat(shares: list[float], target: str, max_repeat: float) -> None:
    counts = _imbalanced(shares, 300, seed=len(shares))
    q = target_distribution(target, counts.sum(axis=0), tau=0.5)
    plan = plan_repeat_factors(counts, q, max_repeat)
    # At the optimum the solver may stop on "no projected step left" (a KKT point) before the certificate, computed
    # in floating point, falls under its 1e-9 tol: on an AMD EPYC (2026-12-07) the 4-class case stops there at 2.1e-9.
    assert plan.converged and plan.gap <= 1e-8
    _, lvis_kl = lvis_best_threshold(counts, q, max_repeat)
    assert plan.kl_after <= lvis_kl + 1e-12
    assert plan.kl_after < plan.kl_before


def test_sampler_draws_follow_the_plan() -> None:
    counts = _imbalanced([0.8, 0.15, 0.05], 60, seed=3)
    coco = _coco(counts)
    params = RebalanceParams(target="uniform", max_repeat=4.0, epoch_size=0, sources=("general",))
    result = rebalance_coco({"general": coco}, params)
    plan = plan_document(result)
    # Datasets index images in file order, which here is reversed with respect to the plan.
    ids = [im["id"] for im in coco["images"]][::-1]
    sampler = make_sampler(plan, [("general", ids)], generator=torch.Generator().manual_seed(0), epoch_size=20000)
    drawn = np.array(list(sampler))
    row = {im["id"]: i for i, im in enumerate(coco["images"])}
    seen = counts[[row[ids[j]] for j in drawn]].sum(axis=0)
    np.testing.assert_allclose(seen / seen.sum(), result.plan.p_after, atol=0.015)
    assert len(make_sampler(plan, [("general", ids)])) == plan["epoch_size"]
    with pytest.raises(ValueError, match="not in the rebalance plan"):
        make_sampler(plan, [("general", ids + [9999])])
    with pytest.raises(ValueError, match="not in the datasets"):
        make_sampler(plan, [("general", ids[1:])])


def _coco(counts: np.ndarray, names: tuple[str, ...] = ("rbc", "wbc", "platelets")) -> dict:
    images = [{"id": 100 + i, "file_name": f"img/{i:03d}.png", "width": 64, "height": 64} for i in range(len(counts))]
    anns = []
    for i, row in enumerate(counts):
        for k, c in enumerate(row):
            anns += [{"id": len(anns) + 1, "image_id": 100 + i, "category_id": k + 1, "bbox": [1, 1, 5, 5],
                      "area": 25, "iscrowd": 0} for _ in range(int(c))]
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names[:counts.shape[1]])]}


def test_rebalance_coco_sources_order_and_errors() -> None:
    general = _coco(np.array([[3, 0, 0], [2, 1, 0]]))
    scenario = _coco(np.array([[0, 0, 0], [1, 0, 1]]))
    scenario["annotations"].append({"id": 99, "image_id": 101, "category_id": 1, "bbox": [0, 0, 9, 9], "iscrowd": 1})
    result = rebalance_coco({"general": general, "scenario": scenario}, RebalanceParams(target="uniform"))
    assert [s for s, _, _ in result.images] == ["general"] * 2 + ["scenario"] * 2
    assert result.counts.sum(axis=0).tolist() == [6, 1, 1]  # the crowd region is not an instance
    m = rebalance_metrics(result)
    assert {"kl_before", "kl_after", "class_counts_before", "class_counts_after"} <= set(m)
    assert m["class_counts_before"] == {"rbc": 6.0, "wbc": 1.0, "platelets": 1.0}
    assert sum(m["class_counts_after"].values()) == pytest.approx(
        result.epoch_size * result.plan.counts_after.sum() / result.plan.repeat_factors.sum(), abs=0.01)
    assert m["kl_after"] <= m["kl_before"] and m["background_images"] == 1
    bad = _coco(np.array([[1, 0]]), names=("rbc", "other"))
    with pytest.raises(ValueError, match="different categories"):
        rebalance_coco({"general": general, "scenario": bad}, RebalanceParams())
    with pytest.raises(ValueError, match="source 'scenario' was not given"):
        rebalance_coco({"general": general}, RebalanceParams())
    with pytest.raises(ValueError, match="no image"):
        rebalance_coco({"general": _coco(np.zeros((0, 3), dtype=int))}, RebalanceParams(sources=("general",)))


def test_params_section(tmp_path: Path) -> None:
    assert load_params(ROOT / "params.yaml", ["rebalance"]).rebalance.max_repeat >= 1.0
    path = tmp_path / "p.yaml"
    path.write_text("rebalance: {target: explicit, shares: {a: 0.5, b: 0.5}, sources: [scenario]}\n")
    p = load_params(path, ["rebalance"]).rebalance
    assert p.shares == {"a": 0.5, "b": 0.5} and p.sources == ("scenario",)
    for text, message in [("rebalance: {target: sqrt}", "one of 'uniform'"), ("rebalance: {max_repeat: 0.5}", "1.0"),
                          ("rebalance: {shares: {a: -1}}", "rebalance.shares.a"),
                          ("rebalance: {sources: [pool]}", "rebalance.sources"),
                          ("rebalance: {maxrepeat: 2}", "allowed")]:
        path.write_text(text + "\n")
        with pytest.raises(ParamsError, match=message):
            load_params(path, ["rebalance"])


def test_stage_smoke(tmp_path: Path) -> None:
    """The stage script end to end on tiny files: one class has no instance, one scenario image is background."""
    general = _coco(np.array([[4, 0, 0], [3, 1, 0], [5, 0, 0], [2, 0, 0]]))
    scenario = _coco(np.array([[0, 0, 0], [2, 1, 0]]))
    for name, coco in (("general.json", general), ("scenario.json", scenario)):
        (tmp_path / name).write_text(json.dumps(coco))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"rebalance": {"target": "uniform", "max_repeat": 3.0}}))
    out = subprocess.run(
        [sys.executable, str(ROOT / "pipelines/rebalance.py"), "--params", str(tmp_path / "params.yaml"),
         "--general", str(tmp_path / "general.json"), "--curated", str(tmp_path / "scenario.json"),
         "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.png"),
         "--table", str(tmp_path / "t.csv")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "unreachable (no instance): platelets" in out.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["unreachable_classes"] == ["platelets"] and m["class_counts_after"]["platelets"] == 0.0
    assert m["kl_after"] < m["kl_before"]
    plan = json.loads((tmp_path / "out/plan.json").read_text())
    assert [(im["source"], im["image_id"]) for im in plan["images"]] == [
        ("general", 100), ("general", 101), ("general", 102), ("general", 103), ("scenario", 100), ("scenario", 101)]
    assert all(1.0 <= im["repeat_factor"] <= 3.0 for im in plan["images"])
    assert plan["images"][4]["repeat_factor"] == 1.0  # background
    assert sum(im["weight"] for im in plan["images"]) == pytest.approx(1.0)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "t.csv").read_text().splitlines()
    assert table[0] == "label,class,series,share,instances" and len(table) == 1 + 3 * 3
    assert table[9].startswith("platelets: target,platelets,target,0.000000")


def test_dvc_stage_wiring() -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["rebalance"]
    for dep in ("pipelines/rebalance.py", "dataengine/curation", "data/prepared/general/train.json",
                "data/curated/scenario.json"):
        assert dep in stage["deps"]
    assert stage["params"] == ["rebalance"]
