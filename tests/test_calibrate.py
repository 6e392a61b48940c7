"""Calibration of the teacher's val boxes: known-truth synthetic data, hand-checkable thresholds, pooled fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from dataengine.config import FilterParams
from dataengine.pseudo.calibrate import (
    Calibration,
    ValBoxes,
    fit_calibration,
    fit_calibrator,
    load_predictions,
    match_val_predictions,
    plot_reliability,
    recalibrate,
    select_threshold,
)


def _synthetic(n: int, seed: int, truth=lambda s, c: s**2, label: int = 0) -> ValBoxes:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.0, 1.0, n)
    consistency = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < truth(scores, consistency)
    return ValBoxes(np.full(n, label, dtype=np.int64), scores, consistency, correct)


# ---------------------------------------------------------------------------------------------------------------
# Calibrator
# ---------------------------------------------------------------------------------------------------------------


def test_calibrated_probability_matches_known_truth_in_middle_bins() -> None:
    val = _synthetic(4000, seed=0)  # P(correct) = score^2, consistency is noise
    cal = fit_calibrator(val.scores, val.consistency, val.correct)
    p = cal.predict(val.scores, val.consistency)
    for lo in np.arange(0.3, 0.8, 0.1):
        in_bin = (val.scores >= lo) & (val.scores < lo + 0.1)
        assert abs(p[in_bin].mean() - (val.scores[in_bin] ** 2).mean()) < 0.1, lo
    # Fresh data from the same law: the calibration generalises, not only fits.
    test = _synthetic(4000, seed=1)
    p_test = cal.predict(test.scores, test.consistency)
    in_mid = (test.scores >= 0.3) & (test.scores < 0.8)
    assert abs(p_test[in_mid].mean() - (test.scores[in_mid] ** 2).mean()) < 0.03


def test_calibrator_is_monotone_in_score_and_uses_consistency() -> None:
    val = _synthetic(4000, seed=2, truth=lambda s, c: s * c)  # agreement across views matters
    cal = fit_calibrator(val.scores, val.consistency, val.correct)
    assert cal.coef_score > 0 and cal.coef_consistency > 0
    grid = np.linspace(0.0, 1.0, 201)
    for c in (0.3, 0.6, 1.0):
        assert np.all(np.diff(cal.predict(grid, np.full_like(grid, c))) >= 0)
    assert cal.predict([0.7], [1.0])[0] > cal.predict([0.7], [0.3])[0]


def test_negative_consistency_effect_is_dropped_to_stay_monotone() -> None:
    val = _synthetic(3000, seed=3, truth=lambda s, c: s * (1.3 - c))  # consistency *lowers* P(correct) here
    cal = fit_calibrator(val.scores, val.consistency, val.correct)
    assert cal.coef_consistency == 0.0 and cal.coef_score > 0


def test_single_outcome_class_gives_constant_probability() -> None:
    cal = fit_calibrator(np.array([0.3, 0.6, 0.9]), np.ones(3), np.array([True, True, True]))
    assert cal.predict([0.01, 0.5, 0.99], [1.0, 1.0, 1.0]).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no boxes"):
        fit_calibrator(np.array([]), np.array([]), np.array([], dtype=bool))


def test_predict_is_sklearn_isotonic_at_val_boxes_and_its_lower_step_between_them() -> None:
    val = _synthetic(500, seed=4)
    cal = fit_calibrator(val.scores, val.consistency, val.correct)
    logit = np.log(np.clip(val.scores, 1e-6, 1 - 1e-6) / (1 - np.clip(val.scores, 1e-6, 1 - 1e-6)))
    z = cal.coef_score * logit + cal.coef_consistency * val.consistency + cal.intercept
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(z, val.correct)
    # At the val boxes themselves: exactly scikit-learn's fitted values.
    np.testing.assert_allclose(cal.predict(val.scores, val.consistency), iso.predict(z), atol=1e-12)
    # Anywhere else: the step function read from the left, never above scikit-learn's linear interpolation.
    grid_s, grid_c = np.linspace(0, 1, 57), np.linspace(0.2, 1, 57)
    z_grid = cal.coef_score * np.log(np.clip(grid_s, 1e-6, 1 - 1e-6) / (1 - np.clip(grid_s, 1e-6, 1 - 1e-6)))
    z_grid = z_grid + cal.coef_consistency * grid_c + cal.intercept
    p_grid = cal.predict(grid_s, grid_c)
    assert np.all(p_grid <= iso.predict(z_grid) + 1e-12)
    below = np.searchsorted(iso.X_thresholds_, z_grid, side="right") - 1  # the last fitted z at or below each
    np.testing.assert_allclose(p_grid, iso.y_thresholds_[np.clip(below, 0, None)], atol=1e-12)

    calibration = fit_calibration(val, ["cat"], FilterParams(min_calibration_boxes=10))
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again == calibration


def test_box_between_two_val_blocks_gets_the_lower_blocks_probability() -> None:
    # Val: every box up to 0.3 wrong, every box from 0.8 right; no val box in between.
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.85, 0.9])
    correct = np.array([False, False, False, True, True, True])
    cal = fit_calibrator(scores, np.ones(6), correct)
    gap = np.array([0.4, 0.55, 0.7, 0.79])
    # Monotonicity only says such a box is at least as likely right as the 0.3 one: 0, not an interpolated guess.
    assert cal.predict(gap, np.ones(4)).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert cal.predict(np.array([0.05, 0.8, 0.95]), np.ones(3)).tolist() == [0.0, 1.0, 1.0]
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    z = cal.projection(scores, np.ones(6))
    iso.fit(z, correct.astype(float))
    assert np.all((iso.predict(cal.projection(gap, np.ones(4))) > 0.1))  # what linear interpolation would claim


# ---------------------------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------------------------

P10 = np.array([0.99, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3])


def test_threshold_is_lowest_reaching_target_calibrated_limit() -> None:
    # Cumulative mean p: .99 .98 .97 .96 .948 .932 .913 .886 .843 .789 -> 0.9 is reached down to t = 0.8 (7 boxes).
    correct = np.array([True] * 8 + [False] * 2)
    t, calibrated, empirical, n = select_threshold(P10, correct, 0.9)
    assert (t, n, empirical) == (0.8, 7, 1.0)
    assert calibrated == pytest.approx(6.39 / 7)


def test_threshold_empirical_check_is_enforced() -> None:
    # The 0.9 box is wrong: empirical precision 4/5, 5/6, 6/7 for t = 0.9, 0.85, 0.8 -> only t = 0.93 (4/4) passes.
    correct = np.array([True, True, True, True, False, True, True, True, False, False])
    t, _, empirical, n = select_threshold(P10, correct, 0.9)
    assert (t, n, empirical) == (0.93, 4, 1.0)
    # At 0.85: t = 0.7 gives mean p .886 and 7/8 = .875 correct; t = 0.5 gives mean p .843.
    assert select_threshold(P10, correct, 0.85)[0] == 0.7


def test_threshold_ties_enter_together_and_unreachable_is_none() -> None:
    p = np.array([0.95, 0.9, 0.9, 0.6])
    assert select_threshold(p, np.array([True, True, False, True]), 0.9)[0] == 0.95  # {0.9, 0.9} brings 2/3 correct
    assert select_threshold(np.array([0.5, 0.4]), np.array([True, True]), 0.9) == (None, None, None, 0)
    assert select_threshold(np.array([]), np.array([], dtype=bool), 0.9) == (None, None, None, 0)


# ---------------------------------------------------------------------------------------------------------------
# Per-class calibration
# ---------------------------------------------------------------------------------------------------------------


def test_rare_class_uses_pooled_calibrator_and_empty_class_accepts_nothing() -> None:
    common = _synthetic(600, seed=5, label=0)
    rare = _synthetic(12, seed=6, label=1)
    val = ValBoxes(*(np.concatenate([getattr(common, f), getattr(rare, f)])
                     for f in ("labels", "scores", "consistency", "correct")))
    cal = fit_calibration(val, ["cat", "dog", "eel"], FilterParams(min_calibration_boxes=30, target_precision=0.8))
    cat, dog, eel = cal.classes
    assert (cat.kind, dog.kind, eel.kind) == ("per-class", "pooled", "pooled")
    assert dog.calibrator is cal.pooled and cat.calibrator is not cal.pooled
    assert (cat.val_boxes, dog.val_boxes, eel.val_boxes) == (600, 12, 0)
    assert eel.threshold is None and eel.val_accepted == 0
    assert cat.threshold is not None and cat.val_calibrated_precision >= 0.8 and cat.val_empirical_precision >= 0.8
    assert cal.to_dict()["classes"]["dog"]["calibrator"] is None  # pooled: stored once, under "pooled"
    assert np.isinf(cal.thresholds()[2])
    with pytest.raises(ValueError, match="no box on general val"):
        fit_calibration(ValBoxes(*(np.array([]),) * 4), ["cat"], FilterParams())


# ---------------------------------------------------------------------------------------------------------------
# Matching val predictions, files, plot
# ---------------------------------------------------------------------------------------------------------------

VAL_GT = {
    "images": [{"id": 10, "file_name": "val/a.png", "width": 50, "height": 50},
               {"id": 11, "file_name": "val/b.png", "width": 50, "height": 50}],
    "annotations": [{"id": 1, "image_id": 10, "category_id": 4, "bbox": [0, 0, 10, 10]},
                    {"id": 2, "image_id": 11, "category_id": 9, "bbox": [20, 20, 10, 10]}],
    "categories": [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}],
}


def _box(file_name: str, bbox: list[float], label: int, score: float) -> dict:
    return {"file_name": file_name, "bbox": bbox, "label": label, "score": score, "consistency": 0.9}


# ---------------------------------------------------------------------------------------------------------------
# Re-calibration on reviewers' decisions
# ---------------------------------------------------------------------------------------------------------------


def _lowest_accepted_score(calibration: Calibration, label: int = 0) -> float:
    """Thresholds live in each calibrator's own probability: compare calibrations by the raw score they accept."""
    grid = np.linspace(0.0, 1.0, 1001)
    cls = calibration.classes[label]
    ones = np.ones_like(grid)
    return float(grid[(cls.predict(grid, ones) >= cls.threshold) & cls.acceptable(grid, ones)].min())


def _val_cat_dog() -> Calibration:
    """Val where a box above 0.3 is right 90+ % of the time, for two classes."""
    val = [_synthetic(2000, seed=s, truth=lambda sc, c: np.where(sc > 0.3, 0.97, 0.1), label=k)
           for k, s in ((0, 10), (1, 11))]
    merged = ValBoxes(*(np.concatenate([getattr(v, f) for v in val]) for f in ("labels", "scores", "consistency",
                                                                                 "correct")))
    return fit_calibration(merged, ["cat", "dog"], FilterParams(target_precision=0.9))


def _reviewed(n: int, seed: int, truth, label: int = 0, lo: float = 0.3) -> ValBoxes:
    rng = np.random.default_rng(seed)
    scores = rng.uniform(lo, 1.0, n)
    return ValBoxes(np.full(n, label, dtype=np.int64), scores, np.ones(n), rng.uniform(size=n) < truth(scores))


def test_recalibrate_raises_the_threshold_where_reviewers_find_the_band_worse() -> None:
    cal = _val_cat_dog()
    assert _lowest_accepted_score(cal) < 0.35  # val: everything above 0.3 is good
    # On the scenario only cats above 0.7 are real (the rest are confusers).
    noise = np.random.default_rng(1).uniform(size=400)
    reviewed = _reviewed(400, seed=0, truth=lambda s: (s > 0.7) & (noise < 0.97))
    new = recalibrate(cal, reviewed, min_reviewed_accepted=20)
    cat, dog = new.classes
    assert cat.kind == "reviewed" and dog == cal.classes[1]  # no review of dogs: unchanged
    assert 0.68 <= _lowest_accepted_score(new) <= 0.75
    assert cat.reviewed is not None and (cat.reviewed.boxes, cat.reviewed.correct) == (400, int(reviewed.correct.sum()))
    assert cat.reviewed.val_threshold == cal.classes[0].threshold and cat.reviewed.val_kind == "per-class"
    assert cat.reviewed.empirical_precision >= 0.9
    # It survives calibration.json.
    again = Calibration.from_dict(json.loads(json.dumps(new.to_dict())))
    grid = np.linspace(0, 1, 101)
    np.testing.assert_array_equal(again.probability(np.zeros(101, int), grid, np.ones(101)),
                                  new.probability(np.zeros(101, int), grid, np.ones(101)))
    assert again.classes[0].reviewed == cat.reviewed


def test_recalibrate_needs_evidence_in_the_accepted_range_and_both_verdicts() -> None:
    cal = _val_cat_dog()
    t_score = _lowest_accepted_score(cal)
    # 100 reviewed cats, all *below* the val threshold (the review queue alone): not re-fitted.
    below = _reviewed(100, seed=2, truth=lambda s: s > 0.1, lo=0.0)
    below = ValBoxes(below.labels, below.scores * t_score * 0.99, below.consistency, below.correct)
    assert recalibrate(cal, below, min_reviewed_accepted=20).classes[0] == cal.classes[0]
    # 19 in range: one short.
    few = _reviewed(19, seed=3, truth=lambda s: s > 0.7, lo=0.4)
    assert recalibrate(cal, few, min_reviewed_accepted=20).classes[0] == cal.classes[0]
    # Enough, but every one right: nothing to fit a calibrator on.
    right = _reviewed(50, seed=4, truth=lambda s: s > 0.0, lo=0.4)
    assert recalibrate(cal, right, min_reviewed_accepted=20).classes[0] == cal.classes[0]
    # Switched off.
    enough = _reviewed(200, seed=5, truth=lambda s: s > 0.7, lo=0.4)
    assert recalibrate(cal, enough, min_reviewed_accepted=0) == cal
    assert recalibrate(cal, enough, min_reviewed_accepted=20).classes[0].kind == "reviewed"
    with pytest.raises(ValueError, match="0..1"):
        recalibrate(cal, ValBoxes(np.array([2]), np.array([0.5]), np.ones(1), np.array([True])), 1)


def test_recalibrated_class_does_not_extrapolate_below_the_reviewed_range() -> None:
    cal = _val_cat_dog()
    # Reviewers checked only strong cats (0.8-1.0), two of 60 wrong: the isotonic fit is ~0.97 everywhere.
    reviewed = _reviewed(60, seed=6, truth=lambda s: np.arange(len(s)) >= 2, lo=0.8)
    new = recalibrate(cal, reviewed, min_reviewed_accepted=20)
    cat = new.classes[0]
    assert cat.kind == "reviewed"
    weak = np.array([0.05, 0.2, 0.5])
    p_new, p_val = cat.predict(weak, np.ones(3)), cal.classes[0].predict(weak, np.ones(3))
    # Below the reviewed range: never above the val calibrator, nor above the bottom of the reviewed fit.
    assert np.all(p_new <= p_val + 1e-12) and np.all(p_new <= cat.calibrator.iso_y[0] + 1e-12)
    assert p_new[0] < 0.2  # a 0.05 box stays in the reject band, as on val
    # Nothing was reviewed below 0.8 and val trusts boxes from about 0.3: there val still decides (capped by the
    # reviewed fit's bottom, so never more loosely than on val).
    assert _lowest_accepted_score(cal) <= _lowest_accepted_score(new) < 0.4


def test_recalibrate_keeps_the_val_projection_so_a_narrow_review_band_cannot_reweight_the_features() -> None:
    # The demo failure (teacher seed 1, tta [1.25, 1.5]): reviewers saw squares scoring 0.5-1.0 with consistency
    # 0.88-0.99, where the wrong ones happened to have lower consistency. A logistic re-fit on them weighted
    # consistency 44 to the score's 0.3 and accepted squares scoring 0.06 (596 accepted, true precision 0.58).
    rng = np.random.default_rng(12)
    val = _synthetic(3000, seed=13, truth=lambda sc, c: np.where(sc > 0.3, 0.95, 0.05))
    cal = fit_calibration(val, ["cat"], FilterParams(target_precision=0.9))
    scores, consistency = rng.uniform(0.5, 1.0, 200), rng.uniform(0.88, 0.99, 200)
    reviewed = ValBoxes(np.zeros(200, dtype=np.int64), scores, consistency, consistency > 0.9)
    new = recalibrate(cal, reviewed, min_reviewed_accepted=20)
    cat, before = new.classes[0], cal.classes[0]
    assert cat.kind == "reviewed"
    projection = ("coef_score", "coef_consistency", "intercept")
    assert [getattr(cat.calibrator, k) for k in projection] == [getattr(before.calibrator, k) for k in projection]
    assert cat.calibrator.n_boxes == 200  # the isotonic step is the reviewed one
    weak, agreeing = np.array([0.06, 0.1, 0.2]), np.full(3, 0.97)
    accepted = (cat.predict(weak, agreeing) >= cat.threshold) & cat.acceptable(weak, agreeing)
    assert not accepted.any()


def test_a_reviewed_threshold_at_the_bottom_of_its_fit_does_not_accept_everything_below() -> None:
    cal = _val_cat_dog()
    # 60 strong cats reviewed (0.8-1.0); the two weakest are wrong, so the isotonic fit starts at 0 and the whole
    # reviewed set (58/60 right) meets the target: the threshold is that bottom value, 0.
    scores = np.linspace(0.8, 1.0, 60)
    new = recalibrate(cal, ValBoxes(np.zeros(60, dtype=np.int64), scores, np.ones(60), np.arange(60) >= 2),
                      min_reviewed_accepted=20)
    cat = new.classes[0]
    assert cat.kind == "reviewed" and cat.threshold == cat.calibrator.iso_y[0] == 0.0
    probe = np.array([0.05, 0.2, 0.5, 0.9])
    p = cat.predict(probe, np.ones(4))
    assert np.all(p[:3] >= cat.threshold)  # predict alone would accept even the 0.05 box
    ok = new.acceptable(np.zeros(4, dtype=np.int64), probe, np.ones(4))
    assert ok.tolist() == [False, False, True, True]  # below the reviewed range: what val accepts (from ~0.3)


def test_before_review_restores_the_val_calibration_and_a_floor_bounds_a_refitted_class() -> None:
    cal = _val_cat_dog()
    new = recalibrate(cal, _reviewed(60, seed=6, truth=lambda s: np.arange(len(s)) >= 2, lo=0.8),
                      min_reviewed_accepted=20)
    assert new.classes[0].kind == "reviewed" and new.before_review() == cal
    assert Calibration.from_dict(json.loads(json.dumps(new.to_dict()))).before_review() == cal
    assert cal.before_review() == cal
    probe, labels = np.array([0.31, 0.35, 0.5, 0.85, 0.95]), np.zeros(5, dtype=np.int64)
    p_val = cal.classes[0].predict(probe, np.ones(5))  # 0.94, then 0.96-0.97 (val is flat above 0.35)
    assert new.acceptable(labels, probe, np.ones(5)).tolist() == [True] * 5  # val accepts from about 0.3
    # A floor (the band before review, widened where reviewed labels support it) bounds p_val across the band.
    floors = np.array([p_val[1], np.inf])
    assert new.acceptable(labels, probe, np.ones(5), floors).tolist() == [False, True, True, True, True]
    assert not new.acceptable(labels, probe, np.ones(5), np.array([np.inf, np.inf])).any()
    # A class that was not re-calibrated ignores it: the pool raise already applies to it.
    assert cal.acceptable(labels, probe, np.ones(5), floors).all()


def test_match_val_predictions_is_class_aware_and_one_to_one() -> None:
    preds = {"images": [{"file_name": "val/a.png"}, {"file_name": "val/b.png"}], "class_names": ["cat", "dog"],
             "boxes": [_box("val/a.png", [0, 0, 10, 10], 0, 0.9),    # cat on cat: correct
                       _box("val/a.png", [0, 0, 10, 10], 0, 0.8),    # duplicate: wrong
                       _box("val/b.png", [20, 20, 30, 30], 0, 0.7),  # cat on dog: wrong class
                       _box("val/b.png", [20, 20, 30, 29], 1, 0.6)]} # dog, IoU 0.9: correct
    val = match_val_predictions(preds, VAL_GT, 0.5)
    assert val.correct.tolist() == [True, False, False, True]
    assert val.labels.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"\['cat', 'dog'\].*\['dog', 'cat'\]"):
        match_val_predictions({**preds, "class_names": ["dog", "cat"]}, VAL_GT, 0.5)
    with pytest.raises(ValueError, match="val/c.png"):
        match_val_predictions({**preds, "images": [{"file_name": "val/c.png"}],
                               "boxes": [_box("val/c.png", [0, 0, 1, 1], 0, 0.5)]}, VAL_GT, 0.5)
    with pytest.raises(ValueError, match="pool predictions on files not in the pool ground truth.*val/c.png"):
        match_val_predictions({**preds, "images": [{"file_name": "val/c.png"}],
                               "boxes": [_box("val/c.png", [0, 0, 1, 1], 0, 0.5)]}, VAL_GT, 0.5, split="pool")


def test_load_predictions_names_the_bad_box(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    good = {"images": [{"file_name": "a.png"}], "class_names": ["cat"], "boxes": [_box("a.png", [0, 0, 5, 5], 0, 0.5)]}
    path.write_text(json.dumps(good))
    assert load_predictions(path) == good
    for bad, message in [({"label": 1}, "box 0.*'label'"), ({"bbox": [5, 0, 0, 5]}, "box 0.*x2 >= x1"),
                         ({"score": 1.5}, "box 0.*'score'"), ({"file_name": "z.png"}, "z.png")]:
        path.write_text(json.dumps({**good, "boxes": [{**good["boxes"][0], **bad}]}))
        with pytest.raises(ValueError, match=message):
            load_predictions(path)
    with pytest.raises(FileNotFoundError, match="pseudo_label"):
        load_predictions(tmp_path / "missing.json")


def test_reliability_plot_is_written(tmp_path: Path) -> None:
    val = _synthetic(300, seed=7)
    cal = fit_calibration(val, ["cat", "dog"], FilterParams(min_calibration_boxes=30))
    plot_reliability(cal, val, tmp_path / "rel.png")
    data = (tmp_path / "rel.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_reliability_plot_shows_how_the_val_calibration_transfers_to_the_pool(tmp_path: Path) -> None:
    val = _synthetic(2000, seed=7)  # P(correct) = score^2
    cal = fit_calibration(val, ["cat"], FilterParams(min_calibration_boxes=30))
    pool = _synthetic(2000, seed=8, truth=lambda s, c: s**2 / 2)  # the same scores, right half as often
    reviewed = _synthetic(300, seed=9)  # right as often as on val
    drawn = plot_reliability(cal, val, tmp_path / "rel.png", pool_truth=pool, reviewed=reviewed, applied={"cat": 0.95})
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(drawn) == ["cat", "all classes"]
    assert list(drawn["cat"]) == ["val, calibrated p", "pool, hidden labels", "pool, reviewed labels"]
    assert sum(n for *_, n in drawn["all classes"]["pool, hidden labels"]) == 2000
    (p_val, acc_val, _), (p_pool, acc_pool, n_pool) = drawn["cat"]["val, calibrated p"][-1], \
        drawn["cat"]["pool, hidden labels"][-1]
    assert p_val > 0.8 and acc_val == pytest.approx(p_val, abs=0.03)  # in-sample: on the diagonal
    assert n_pool > 50 and acc_pool == pytest.approx(p_pool / 2, abs=0.1)  # the pool: half as often right
    p_rev, acc_rev, n_rev = [b for b in drawn["cat"]["pool, reviewed labels"] if b[0] > 0.7][-1]
    assert n_rev > 15 and acc_rev > p_rev - 0.2  # reviewed like val: near the diagonal, far above the pool
    nobody = ValBoxes(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool))
    only_val = plot_reliability(cal, val, tmp_path / "rel2.png", reviewed=nobody)  # no decision yet: no green series
    assert only_val == {name: {"val, calibrated p": drawn[name]["val, calibrated p"]} for name in drawn}
