"""Evaluation metrics on hand-built cases whose answers are known exactly.

pycocotools computes precision as ``tp / (tp + fp + eps)``, so its "1.0" is ``1 - 2e-16``: AP values are compared
with ``abs=1e-12``; recall-based values (AR) and our own counts are exact.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from dataengine.evaluation import (
    SegmentationMeter,
    confuser_false_positives,
    confuser_false_positives_at_recall,
    evaluate_detection,
    flatten_metrics,
    match_predictions,
    precision_recall_at,
    precision_recall_curves,
)

EPS = 1e-12


def _gt(anns: list[tuple[int, int, list[float]]], n_images: int = 1, **image_extra: Any) -> dict[str, Any]:
    """GT with images 1..n_images, categories cat (1) and dog (2); anns as (image_id, category_id, xywh)."""
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100, **image_extra.get(str(i), {})}
                   for i in range(1, n_images + 1)],
        "annotations": [
            {"id": j, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for j, (img, cat, box) in enumerate(anns, start=1)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _pred(image_id: int, category_id: int, box: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


GT_BOX = [0.0, 0.0, 10.0, 10.0]


# ---------------------------------------------------------------------------------------------------------------
# evaluate_detection
# ---------------------------------------------------------------------------------------------------------------


def test_perfect_predictions_score_one() -> None:
    gt = _gt([(1, 1, [10, 10, 20, 20]), (1, 2, [50, 50, 30, 20]), (2, 1, [5, 5, 40, 40])], n_images=2)
    preds = [_pred(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    m = evaluate_detection(gt, preds)
    assert m["mAP"] == pytest.approx(1.0, abs=EPS)
    assert m["AP50"] == pytest.approx(1.0, abs=EPS)
    assert m["AP75"] == pytest.approx(1.0, abs=EPS)
    assert m["AR100"] == 1.0
    assert m["per_class_AP"] == pytest.approx({"cat": 1.0, "dog": 1.0}, abs=EPS)
    assert m["num_images"] == 2 and m["num_predictions"] == 3


@pytest.mark.parametrize(
    ("height", "iou", "thresholds_passed", "ap75"),
    [(6, 0.6, 3, 0.0), (7, 0.7, 5, 0.0), (8, 0.8, 7, 1.0)],  # IoU t passes 0.50, 0.55, ..., t (COCOeval: IoU >= t)
)
def test_shifted_box_map_counts_passed_thresholds(height: int, iou: float, thresholds_passed: int, ap75: float) -> None:
    pred_box = [0.0, 0.0, 10.0, float(height)]  # inside the 10x10 GT: IoU = 10 * height / 100
    iou_tv = box_iou(torch.tensor([[0.0, 0.0, 10.0, height]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert float(iou_tv) == pytest.approx(iou)
    m = evaluate_detection(_gt([(1, 1, GT_BOX)]), [_pred(1, 1, pred_box, 0.9)])
    assert m["AP50"] == pytest.approx(1.0, abs=EPS)
    assert m["mAP"] == pytest.approx(thresholds_passed / 10, abs=EPS)  # pycocotools: 0.29999999999999993 for 0.6
    assert m["AP75"] == pytest.approx(ap75, abs=EPS)
    assert m["AR100"] == pytest.approx(thresholds_passed / 10, abs=EPS)


def test_empty_predictions_give_zero_and_none_without_gt() -> None:
    m = evaluate_detection(_gt([(1, 1, GT_BOX)]), [])
    assert (m["mAP"], m["AP50"], m["AP75"], m["AR100"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["per_class_AP"] == {"cat": 0.0, "dog": None}
    assert m["per_class_AP50"] == {"cat": 0.0, "dog": None}
    assert m["num_predictions"] == 0


def test_gt_without_any_instance_gives_none() -> None:
    m = evaluate_detection(_gt([], n_images=2), [_pred(1, 1, GT_BOX, 0.9)])
    assert m["mAP"] is None and m["AP50"] is None and m["AR100"] is None
    assert m["per_class_AP"] == {"cat": None, "dog": None}


def test_image_without_gt_or_prediction_changes_nothing() -> None:
    preds = [_pred(1, 1, [0, 0, 10, 6], 0.9)]
    one = evaluate_detection(_gt([(1, 1, GT_BOX)], n_images=1), preds)
    three = evaluate_detection(_gt([(1, 1, GT_BOX)], n_images=3), preds)
    assert three["num_images"] == 3
    assert {k: v for k, v in three.items() if k != "num_images"} == {k: v for k, v in one.items() if k != "num_images"}


def test_false_positive_on_extra_image_lowers_precision() -> None:
    gt = _gt([(1, 1, GT_BOX)], n_images=2)
    tp = _pred(1, 1, GT_BOX, 0.8)
    # Ranked above the TP, the FP halves precision at every recall level: AP = 0.5.
    assert evaluate_detection(gt, [tp, _pred(2, 1, GT_BOX, 0.9)])["AP50"] == pytest.approx(0.5, abs=EPS)
    # Ranked below it, full recall is reached first: COCO AP does not see it.
    assert evaluate_detection(gt, [tp, _pred(2, 1, GT_BOX, 0.7)])["AP50"] == pytest.approx(1.0, abs=EPS)


def test_class_without_gt_is_none_and_excluded_from_mean() -> None:
    gt = _gt([(1, 1, GT_BOX), (2, 1, [20, 20, 10, 10])], n_images=2)
    # cat: image 2's GT found with IoU 0.6 only; dog: no GT, one confident detection.
    preds = [_pred(1, 1, GT_BOX, 0.9), _pred(2, 1, [20, 20, 10, 6], 0.8), _pred(1, 2, [50, 50, 10, 10], 0.95)]
    m = evaluate_detection(gt, preds)
    assert m["per_class_AP"]["dog"] is None and m["per_class_AP50"]["dog"] is None
    assert m["per_class_AP50"]["cat"] == pytest.approx(1.0, abs=EPS)
    # Recall 1/2 at every threshold, 2/2 at 0.50-0.60: AP_t = 1 for 3 thresholds, 0.5 (area under 1.0 up to 0.5
    # recall: 51 of 101 points) for the other 7.
    expected_cat = (3 * 1.0 + 7 * 51 / 101) / 10
    assert m["per_class_AP"]["cat"] == pytest.approx(expected_cat, abs=EPS)
    assert m["mAP"] == pytest.approx(expected_cat, abs=EPS)


def test_class_names_override_and_length_check() -> None:
    m = evaluate_detection(_gt([(1, 2, GT_BOX)]), [_pred(1, 2, GT_BOX, 0.5)], class_names=["c", "d"])
    assert m["per_class_AP"]["c"] is None and m["per_class_AP"]["d"] == pytest.approx(1.0, abs=EPS)
    with pytest.raises(ValueError, match="class_names has 1 names but gt has 2 categories"):
        evaluate_detection(_gt([]), [], class_names=["only"])


def test_unknown_image_or_category_ids_raise() -> None:
    gt = _gt([(1, 1, GT_BOX)])
    with pytest.raises(ValueError, match=r"image ids not in gt: \[7, 9\]"):
        evaluate_detection(gt, [_pred(9, 1, GT_BOX, 0.5), _pred(7, 1, GT_BOX, 0.5), _pred(1, 1, GT_BOX, 0.5)])
    with pytest.raises(ValueError, match=r"category ids not in gt: \[5\]"):
        match_predictions(gt, [_pred(1, 5, GT_BOX, 0.5)])
    with pytest.raises(ValueError, match="prediction 0: 'bbox' must be 4 numbers"):
        evaluate_detection(gt, [_pred(1, 1, [0, 0, 1], 0.5)])


def test_inputs_are_not_mutated_and_gt_id_zero_counts() -> None:
    gt = _gt([(1, 1, GT_BOX)])
    gt["annotations"][0]["id"] = 0  # COCOeval tests matched GT ids for truth: id 0 must still match
    del gt["annotations"][0]["area"], gt["annotations"][0]["iscrowd"]  # optional keys, filled in on the copy
    preds = [_pred(1, 1, GT_BOX, 0.9)]
    gt_before, preds_before = copy.deepcopy(gt), copy.deepcopy(preds)
    m = evaluate_detection(gt, preds)
    precision_recall_curves(gt, preds)
    assert m["mAP"] == pytest.approx(1.0, abs=EPS)
    assert gt == gt_before and preds == preds_before


# ---------------------------------------------------------------------------------------------------------------
# precision_recall_curves
# ---------------------------------------------------------------------------------------------------------------


def test_precision_recall_curve_values() -> None:
    gt = _gt([(1, 1, GT_BOX), (2, 1, GT_BOX)], n_images=2)
    # Ranked TP (0.9), FP (0.8), TP (0.7): recall 0.5 at precision 1, then recall 1 at precision 2/3.
    preds = [_pred(1, 1, GT_BOX, 0.9), _pred(1, 1, [60, 60, 10, 10], 0.8), _pred(2, 1, GT_BOX, 0.7)]
    curves = precision_recall_curves(gt, preds)
    assert list(curves) == ["cat"]  # dog has no GT: no curve
    c = curves["cat"]
    assert len(c["recall"]) == len(c["precision"]) == len(c["scores"]) == 101
    assert c["recall"][50] == 0.5 and c["recall"][51] == pytest.approx(0.51)
    np.testing.assert_allclose(c["precision"][:51], 1.0, atol=EPS)
    np.testing.assert_allclose(c["precision"][51:], 2 / 3, atol=EPS)
    assert c["scores"][:51] == [0.9] * 51 and c["scores"][51:] == [0.7] * 50


def test_precision_recall_curve_iou_threshold() -> None:
    gt, preds = _gt([(1, 1, GT_BOX)]), [_pred(1, 1, [0, 0, 10, 6], 0.9)]  # IoU 0.6
    assert precision_recall_curves(gt, preds, iou=0.6)["cat"]["precision"][-1] == pytest.approx(1.0, abs=EPS)
    assert precision_recall_curves(gt, preds, iou=0.65)["cat"]["precision"] == [0.0] * 101
    with pytest.raises(ValueError, match="iou must be in"):
        precision_recall_curves(gt, preds, iou=0.0)


# ---------------------------------------------------------------------------------------------------------------
# match_predictions / precision_recall_at
# ---------------------------------------------------------------------------------------------------------------


def test_duplicate_detection_is_one_tp_one_fp() -> None:
    gt = _gt([(1, 1, GT_BOX)])
    preds = [_pred(1, 1, [0, 0, 10, 9], 0.6), _pred(1, 1, [0, 0, 10, 8], 0.9)]
    assert match_predictions(gt, preds) == [False, True]  # the higher score takes the GT, even with lower IoU
    r = precision_recall_at(gt, preds)
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["recall"]) == (1, 1, 0, 0.5, 1.0)


def test_matching_is_class_aware_and_uses_threshold_inclusively() -> None:
    gt = _gt([(1, 1, GT_BOX)])
    assert match_predictions(gt, [_pred(1, 2, GT_BOX, 0.9)]) == [False]  # right box, wrong class
    six = [_pred(1, 1, [0, 0, 10, 6], 0.9)]  # IoU exactly 0.6
    assert match_predictions(gt, six, iou_threshold=0.6) == [True]
    assert match_predictions(gt, six, iou_threshold=0.61) == [False]


def test_greedy_matching_follows_score_order() -> None:
    gt = _gt([(1, 1, [0, 0, 10, 10]), (1, 1, [0, 5, 10, 10])])  # two overlapping GT, A above B
    # The top prediction overlaps A best (IoU 0.667 vs 0.538) and takes it; the second then sees only B (IoU 0.333).
    # A globally optimal assignment would match both: greedy is COCOeval's rule, and what we want to reproduce.
    preds = [_pred(1, 1, [0, 2, 10, 10], 0.9), _pred(1, 1, [0, 0, 10, 10], 0.8), _pred(1, 1, [0, 6, 10, 9], 0.5)]
    assert match_predictions(gt, preds[:2]) == [True, False]
    assert match_predictions(gt, preds) == [True, False, True]  # the third finds B free (IoU 0.9)


def test_crowd_gt_is_ignored_by_matching() -> None:
    gt = _gt([(1, 1, GT_BOX), (1, 1, [50, 50, 40, 40])])
    gt["annotations"][1]["iscrowd"] = 1
    preds = [_pred(1, 1, GT_BOX, 0.9), _pred(1, 1, [50, 50, 40, 40], 0.8)]
    assert match_predictions(gt, preds) == [True, False]
    r = precision_recall_at(gt, preds)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)


def test_precision_recall_at_empty_and_per_class() -> None:
    gt = _gt([(1, 1, GT_BOX), (1, 1, [30, 30, 10, 10]), (1, 2, [60, 60, 10, 10])])
    r = precision_recall_at(gt, [])
    assert (r["precision"], r["recall"], r["tp"], r["fp"], r["fn"]) == (None, 0.0, 0, 0, 3)
    nothing = precision_recall_at(_gt([]), [])
    assert nothing["precision"] is None and nothing["recall"] is None
    r = precision_recall_at(gt, [_pred(1, 1, GT_BOX, 0.9), _pred(1, 2, [0, 80, 10, 10], 0.9)])
    assert r["per_class"]["cat"] == {"precision": 1.0, "recall": 0.5, "tp": 1, "fp": 0, "fn": 1}
    assert r["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "tp": 0, "fp": 1, "fn": 1}
    assert (r["precision"], r["recall"]) == (0.5, pytest.approx(1 / 3))


# ---------------------------------------------------------------------------------------------------------------
# confuser_false_positives
# ---------------------------------------------------------------------------------------------------------------


def test_confuser_fp_counted_only_on_confuser_overlaps() -> None:
    confuser = [40.0, 40.0, 20.0, 20.0]
    gt = _gt(
        [(2, 1, [40, 40, 20, 18])],  # image 2: a real cat right on its confuser
        n_images=3,
        **{"1": {"confusers": [confuser]}, "2": {"confusers": [confuser, [0, 0, 5, 5]]}},
    )
    preds = [
        _pred(1, 1, confuser, 0.9),  # fooled by the confuser: counted
        _pred(1, 2, [42, 42, 20, 20], 0.5),  # IoU ~0.68 with it, other class: counted
        _pred(1, 1, confuser, 0.2),  # below score_threshold
        _pred(1, 1, [0, 0, 10, 10], 0.9),  # plain false positive, away from the confuser
        _pred(2, 1, confuser, 0.9),  # matches the real cat (IoU 0.9): a true positive
        _pred(2, 2, confuser, 0.9),  # dog on the cat + confuser: no dog GT, counted
        _pred(3, 1, confuser, 0.9),  # image 3 has no confusers
    ]
    r = confuser_false_positives(gt, preds)
    assert r == {"confuser_fp_per_image": 1.5, "confuser_fp": 3, "images": 2}
    assert confuser_false_positives(gt, preds, score_threshold=0.6)["confuser_fp"] == 2
    assert confuser_false_positives(gt, preds, iou_threshold=0.7)["confuser_fp"] == 2


def test_confuser_edge_cases() -> None:
    none = confuser_false_positives(_gt([]), [_pred(1, 1, GT_BOX, 0.9)])
    assert none == {"confuser_fp_per_image": None, "confuser_fp": 0, "images": 0}
    with pytest.raises(ValueError, match="gt image id=1: 'confusers' must be a list"):
        confuser_false_positives(_gt([], **{"1": {"confusers": [[1, 2, 3]]}}), [])


def test_confuser_fp_at_recall_reads_each_model_at_its_own_threshold() -> None:
    # 4 cats in 2 images, a confuser in each; a model that scores everything 0.5x lower has the same operating
    # points: at matched recall it fires on confusers exactly as often, while a fixed threshold would favour it
    cats = [(1, 1, [0, 0, 10, 10]), (1, 1, [20, 0, 10, 10]), (2, 1, [0, 0, 10, 10]), (2, 1, [20, 0, 10, 10])]
    confuser = {"confusers": [[60.0, 60.0, 20.0, 20.0]]}
    gt = _gt(cats, n_images=2, **{"1": confuser, "2": confuser})
    preds = [_pred(img, 1, box, s) for (img, _, box), s in zip(cats, (0.9, 0.8, 0.6, 0.3))]
    preds += [_pred(1, 1, [60, 60, 20, 20], 0.7), _pred(2, 1, [61, 61, 20, 20], 0.35)]
    preds += [_pred(1, 1, [0, 0, 10, 10], 0.95)]  # a duplicate of a found cat: matched first, the 0.9 one is not
    r = confuser_false_positives_at_recall(gt, preds, 0.75)
    assert r["score_threshold"] == 0.6 and r["recall_reached"] == 0.75  # cats found: 0.95, 0.8, 0.6
    assert r["confuser_fp"] == 1 and r["confuser_fp_per_image"] == 0.5 and r["max_recall"] == 1.0
    shy = [{**p, "score": p["score"] * 0.5} for p in preds]
    assert confuser_false_positives(gt, shy)["confuser_fp"] < confuser_false_positives(gt, preds)["confuser_fp"]
    assert confuser_false_positives_at_recall(gt, shy, 0.75)["confuser_fp"] == 1
    everything = confuser_false_positives_at_recall(gt, preds, 1.0)
    assert everything["score_threshold"] == 0.3 and everything["confuser_fp"] == 2
    out_of_reach = confuser_false_positives_at_recall(gt, preds[:2], 0.75)
    assert out_of_reach["score_threshold"] is None and out_of_reach["max_recall"] == 0.5
    assert out_of_reach["confuser_fp_per_image"] is None and out_of_reach["images"] == 2
    with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
        confuser_false_positives_at_recall(gt, preds, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# SegmentationMeter
# ---------------------------------------------------------------------------------------------------------------

TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.uint8)
PRED = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])


def test_segmentation_perfect() -> None:
    meter = SegmentationMeter(2, ["background", "cat"])
    meter.update(TARGET.long(), TARGET)
    assert meter.compute() == {"mIoU": 1.0, "pixel_accuracy": 1.0, "per_class_IoU": {"background": 1.0, "cat": 1.0}}


def test_segmentation_hand_computed_4x4() -> None:
    # cat: 6 target, 6 predicted, 5 both -> 5/7; background: 10, 10, 9 both -> 9/11; 14 of 16 pixels right.
    meter = SegmentationMeter(2, ["background", "cat"])
    meter.update(PRED, TARGET)
    assert meter.confusion.tolist() == [[9, 1], [1, 5]]
    r = meter.compute()
    assert r["per_class_IoU"] == {"background": pytest.approx(9 / 11), "cat": pytest.approx(5 / 7)}
    assert r["mIoU"] == pytest.approx((9 / 11 + 5 / 7) / 2)
    assert r["pixel_accuracy"] == pytest.approx(14 / 16)


def test_segmentation_ignore_pixels_are_excluded() -> None:
    target = TARGET.clone()
    target[0, 2] = 255  # the one cat pixel predicted as background
    target[3, 3] = 255  # a background pixel predicted right...
    pred = PRED.clone()
    pred[3, 3] = 200  # ...whose prediction is out of range: ignored pixels' predictions are never read
    meter = SegmentationMeter(2)
    meter.update(pred, target)
    # background: 9 target, 8 predicted, 8 both -> 8/9; cat: 5 target, 6 predicted, 5 both -> 5/6; 13 of 14 right.
    assert meter.confusion.tolist() == [[8, 1], [0, 5]]
    r = meter.compute()
    assert r["per_class_IoU"] == {"class_0": pytest.approx(8 / 9), "class_1": pytest.approx(5 / 6)}
    assert r["pixel_accuracy"] == pytest.approx(13 / 14)


def test_segmentation_absent_class_is_none_and_pred_only_class_is_zero() -> None:
    meter = SegmentationMeter(4)
    pred = PRED.clone()
    pred[3, 0] = 3  # class 3 predicted once, never in the target
    meter.update(pred, TARGET)
    r = meter.compute()
    assert r["per_class_IoU"]["class_2"] is None
    assert r["per_class_IoU"]["class_3"] == 0.0
    assert r["mIoU"] == pytest.approx((8 / 11 + 5 / 7 + 0.0) / 3)


def test_segmentation_batches_merge_and_uint8_overflow() -> None:
    batched = SegmentationMeter(2)
    batched.update(torch.stack([PRED, TARGET.long()]), torch.stack([TARGET, TARGET]))  # [B, H, W]
    a, b = SegmentationMeter(2), SegmentationMeter(2)
    a.update(PRED, TARGET)
    b.update(TARGET.long(), TARGET)
    assert torch.equal(a.merge(b).confusion, batched.confusion)
    # 150 * 200 overflows uint8: the meter must widen before indexing.
    big = SegmentationMeter(200)
    big.update(torch.full((2, 2), 150), torch.full((2, 2), 150, dtype=torch.uint8))
    assert big.confusion[150, 150] == 4 and big.confusion.sum() == 4
    big.reset()
    assert big.compute()["mIoU"] is None


def test_segmentation_bad_input() -> None:
    meter = SegmentationMeter(2)
    with pytest.raises(ValueError, match="differs from target shape"):
        meter.update(PRED, TARGET[:2])
    with pytest.raises(ValueError, match="expected integer class ids"):
        meter.update(PRED.float(), TARGET)
    with pytest.raises(ValueError, match=r"target holds ids \[7\]"):
        meter.update(PRED, torch.full_like(TARGET, 7))
    with pytest.raises(ValueError, match=r"pred holds ids \[2\]"):
        meter.update(torch.full_like(PRED, 2), TARGET)
    with pytest.raises(ValueError, match="cannot merge a 3-class meter"):
        meter.merge(SegmentationMeter(3))


# ---------------------------------------------------------------------------------------------------------------
# flatten_metrics
# ---------------------------------------------------------------------------------------------------------------


def test_flatten_metrics() -> None:
    nested = {
        "mAP": np.float64(0.25),
        "per_class_AP": {"cat": 0.5, "dog": None},
        "seg": {"mIoU": torch.tensor(0.75), "n": 3},
        "skip": None,
    }
    assert flatten_metrics(nested) == {"mAP": 0.25, "per_class_AP/cat": 0.5, "seg/mIoU": 0.75, "seg/n": 3.0}
    assert flatten_metrics({"a": {"b": 1}}, sep=".") == {"a.b": 1.0}
    with pytest.raises(TypeError, match="metric 'curve/precision' is a list"):
        flatten_metrics({"curve": {"precision": [1.0]}})
