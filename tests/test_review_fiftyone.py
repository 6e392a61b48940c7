"""FiftyOne adapter: converters (pure), the dataset on the real embedded MongoDB, the pull, and the App in Chromium.

Every dataset here has a unique ``dataengine-test-<hex>`` name and is deleted afterwards, so a user's datasets are
never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

fo = pytest.importorskip("fiftyone")

from dataengine.review import decisions as decisions_module  # noqa: E402
from dataengine.review import fiftyone_app as fa  # noqa: E402
from dataengine.review.inputs import load_review_inputs  # noqa: E402
from review_fixtures import BOXES, CLASSES, H, W, make_review_tree  # noqa: E402

NOW = "2026-01-02T03:04:05Z"
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Converters (no database)
# ---------------------------------------------------------------------------------------------------------------


def _record(name: str, i: int, **extra) -> dict:
    bbox, cls, score, consistency, _band, probability, risk = BOXES[name][i]
    record = {"id": f"{name}#{i}", "file_name": name, "width": W, "height": H, "bbox": bbox, "class_name": CLASSES[cls],
              "score": score, "probability": probability, "consistency": consistency, **extra}
    if risk is not None:
        record["risk"] = risk
    return record


@pytest.mark.parametrize("name,i", [(n, i) for n, items in BOXES.items() for i in range(len(items))])
def test_record_detection_round_trip(name, i):
    record = _record(name, i)
    original = json.loads(json.dumps(record))
    det = fa.record_to_detection(record)
    assert record == original  # the caller's record is not modified
    x1, y1, x2, y2 = record["bbox"]
    assert det.bounding_box == pytest.approx([x1 / W, y1 / H, (x2 - x1) / W, (y2 - y1) / H])  # relative, W != H
    assert det.confidence == record["score"] and det.label == record["class_name"]
    assert det["pseudo_id"] == record["id"] and det["pseudo_bbox"] == record["bbox"]
    back = fa.detection_to_record(det, name, W, H)
    assert back == {k: v for k, v in record.items()}
    assert not fa.is_edited(det, W, H)


def test_rejected_reason_round_trips_and_edits_are_detected():
    record = _record("a.png", 2, reason="low_probability")
    det = fa.record_to_detection(record)
    assert fa.detection_to_record(det, "a.png", W, H)["reason"] == "low_probability"
    det.bounding_box = [0.5, 0.5, 0.25, 0.25]
    assert fa.is_edited(det, W, H)
    assert fa.detection_to_record(det, "a.png", W, H)["bbox"] == [32.0, 24.0, 48.0, 36.0]
    det = fa.record_to_detection(record)
    det.label = "square"
    assert fa.is_edited(det, W, H)
    assert not fa.is_edited(fo.Detection(label="circle", bounding_box=[0, 0, 0.5, 0.5]), W, H)  # added, not edited


def test_detection_decision_precedence():
    record = _record("a.png", 1)
    original = {"bbox": record["bbox"], "class_name": "square"}
    det = fa.record_to_detection(record)
    assert fa.detection_decision(det, "a.png", W, H) is None
    det.tags = ["accept"]
    assert fa.detection_decision(det, "a.png", W, H, user="ann") == {
        "file_name": "a.png", "decision": "accept", "source": "fiftyone", "user": "ann", "time": None,
        "original": original}
    det.label = "circle"  # an edit beats accept
    entry = fa.detection_decision(det, "a.png", W, H)
    assert (entry["decision"], entry["class_name"], entry["bbox"]) == ("correct", "circle", record["bbox"])
    det.tags = ["accept", "reject"]  # reject beats everything
    assert fa.detection_decision(det, "a.png", W, H)["decision"] == "reject"
    assert fa.detection_decision(fo.Detection(label="circle", bounding_box=[0, 0, 0.5, 0.5], tags=["reject"]),
                                 "a.png", W, H) is None  # no pseudo_id: an added box, not a label decision


def test_cap_records_keeps_top_scores_and_everything_a_view_needs():
    records = [{"id": str(i), "score": s} for i, s in enumerate([0.01, 0.2, 0.9, 0.04, 0.3, 0.7, 0.06])]
    capped = fa.cap_records(records, max_per_image=2, min_score=0.05, keep_score=0.5)
    assert [r["score"] for r in capped] == [0.9, 0.7]
    capped = fa.cap_records(records, max_per_image=4, min_score=0.05, keep_score=0.95)
    assert [r["score"] for r in capped] == [0.9, 0.7, 0.3, 0.2]
    assert fa.cap_records([], max_per_image=3, min_score=0.0) == []


def test_app_url():
    assert fa.app_url("my data", "127.0.0.1", 5151) == "http://127.0.0.1:5151/datasets/my%20data"
    assert fa.app_url("d", "0.0.0.0", 80) == "http://127.0.0.1:80/datasets/d"


# ---------------------------------------------------------------------------------------------------------------
# The dataset on the embedded MongoDB
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    return make_review_tree(tmp_path)


@pytest.fixture
def dataset_name():
    name = f"dataengine-test-{uuid.uuid4().hex[:12]}"
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def _build(tree, name, **kwargs):
    inputs = load_review_inputs(tree["filtered"], tree["pseudo"], tree["prepared"])
    dataset, summary = fa.build_dataset(inputs, name, **kwargs)
    fa.save_review_views(dataset, confident_reject_score=0.5, hard_negative_score=0.5)
    return dataset, summary


def _sample(dataset, file_name):
    return dataset.match(fo.ViewField("file_name") == file_name).first()


def _det(sample, field, pseudo_id):
    (det,) = [d for d in sample[field].detections if d.has_field("pseudo_id") and d["pseudo_id"] == pseudo_id]
    return det


def test_build_fields_counts_and_views(tree, dataset_name):
    dataset, summary = _build(tree, dataset_name)
    assert dataset.persistent and fo.dataset_exists(dataset_name)
    assert summary["samples"] == len(dataset) == 4 and summary["new_samples"] == 4
    assert summary["labels"] == {"accepted": 2, "review": 4, "rejected": 2, "teacher": 8, "ground_truth": 1}
    assert summary["general_duplicates"] == 1  # g1.png is listed in train and val: one sample (train)
    assert sorted(dataset.count_sample_tags().items()) == [("general", 1), ("scenario", 3)]
    schema = dataset.get_field_schema()
    for field in ("accepted", "review", "rejected", "teacher", "ground_truth"):
        assert schema[field].document_type is fo.Detections
    assert schema["segmentation"].document_type is fo.Segmentation
    assert schema["teacher_segmentation"].document_type is fo.Segmentation
    assert schema["uncertainty"].document_type is fo.Heatmap
    assert dataset.mask_targets["segmentation"] == {0: "background", 1: "circle", 2: "square", 255: "ignored"}
    assert dataset.info["dataengine"]["model_version"] == "teacher-" + "f" * 12

    a = _sample(dataset, "a.png")
    assert a.filepath == str((tree["prepared"] / "scenario" / "pool" / "a.png").resolve())
    assert (a.metadata.width, a.metadata.height) == (W, H) and a.max_risk == 0.9
    review = _det(a, "review", "a.png#1")
    assert (review.label, review.confidence, review["consistency"], review["risk"]) == ("square", 0.45, 0.70, 0.9)
    assert review["probability"] == 0.55 and review["pseudo_bbox"] == [30.0, 10.0, 50.0, 30.0]
    assert _det(a, "rejected", "a.png#2")["reason"] == "low_probability"
    assert [d["pseudo_id"] for d in a.teacher.detections] == ["a.png#0", "a.png#2", "a.png#1"]  # by score
    assert Path(a.segmentation.mask_path).is_file() and a.segmentation.get_mask()[0, 0] == 255
    assert Path(a.teacher_segmentation.mask_path).is_file() and a.uncertainty.range == [0, 255]
    g = dataset.match_tags("general").first()
    assert g.split == "train" and [d.label for d in g.ground_truth.detections] == ["circle"]
    assert g.ground_truth.detections[0].bounding_box == pytest.approx([5 / W, 5 / H, 20 / W, 20 / H])

    assert sorted(dataset.list_saved_views()) == ["hard_negatives", "rejected_confident", "review_queue"]
    queue = dataset.load_saved_view("review_queue")
    assert queue.values("file_name") == ["a.png", "sub/b.jpg", "c.png"]  # max risk 0.9, 0.7, 0.3
    confident = dataset.load_saved_view("rejected_confident")
    assert confident.values("file_name") == ["a.png"] and confident.count("rejected.detections") == 1
    negatives = dataset.load_saved_view("hard_negatives")
    assert negatives.values("file_name") == ["c.png"]
    assert negatives.values("teacher.detections.pseudo_id") == [["c.png#0"]]


def test_caps_teacher_and_rejected(tree, dataset_name):
    dataset, summary = _build(tree, dataset_name, max_per_image=1, min_score=0.2, keep_score=0.55)
    assert summary["dropped"] == {"rejected": 1, "teacher": 4}  # c.png#1 (0.1); teacher: a 0.45, b 0.40 0.35, c 0.1
    assert dataset.count("rejected.detections") == 1  # a.png#2 (0.6 >= keep_score) stays
    assert dataset.count("teacher.detections") == 4
    assert dataset.count("review.detections") == 4 and dataset.count("accepted.detections") == 2  # never capped


def _act_as_reviewer(dataset):
    """What a reviewer does in the App (tags) and an annotation tool (edits), through the dataset API."""
    a, b, c = (_sample(dataset, n) for n in ("a.png", "sub/b.jpg", "c.png"))
    _det(a, "review", "a.png#1").tags = ["accept"]
    _det(a, "rejected", "a.png#2").tags = ["accept"]  # a confident rejected label rescued
    _det(a, "accepted", "a.png#0").tags = ["reject"]
    _det(a, "teacher", "a.png#1").tags = ["accept"]  # not a decision: reported as ignored
    a.save()
    _det(b, "review", "sub/b.jpg#1").bounding_box = [36 / W, 6 / H, 16 / W, 16 / H]  # box edited
    _det(b, "review", "sub/b.jpg#2").label = "circle"  # class edited
    b.review.detections.append(fo.Detection(label="square", bounding_box=[40 / W, 30 / H, 20 / W, 16 / H]))
    b.save()
    det = _det(c, "review", "c.png#0")
    det.bounding_box = [0.1, 0.1, 0.2, 0.2]
    det.tags = ["reject"]  # reject wins over the edit
    c.tags.append("negative")
    c.save()


def _expected_decisions(user=None):
    meta = {"source": "fiftyone", "user": user, "time": NOW}

    def label(file_name, decision, original_box, original_class, **extra):
        return {"file_name": file_name, "decision": decision, **extra,
                "original": {"bbox": original_box, "class_name": original_class}, **meta}

    return {
        "version": 1,
        "labels": {
            "a.png#0": label("a.png", "reject", [4.0, 6.0, 20.0, 22.0], "circle"),
            "a.png#1": label("a.png", "accept", [30.0, 10.0, 50.0, 30.0], "square"),
            "a.png#2": label("a.png", "accept", [40.0, 30.0, 60.0, 46.0], "circle"),
            "c.png#0": label("c.png", "reject", [20.0, 12.0, 44.0, 36.0], "circle"),
            "sub/b.jpg#1": label("sub/b.jpg", "correct", [34.0, 4.0, 54.0, 24.0], "circle",
                                 bbox=[36.0, 6.0, 52.0, 22.0], class_name="circle"),
            "sub/b.jpg#2": label("sub/b.jpg", "correct", [2.0, 28.0, 18.0, 44.0], "square",
                                 bbox=[2.0, 28.0, 18.0, 44.0], class_name="circle"),
        },
        "images": {
            "c.png": {"flags": ["negative"], "added": [], **meta},
            "sub/b.jpg": {"flags": [], "added": [{"bbox": [40.0, 30.0, 60.0, 46.0], "class_name": "square"}], **meta},
        },
    }


def _pull(tree, name, capsys):
    rc = fa.pull_cli(["--dataset", name, "--decisions", str(tree["decisions"])])
    return rc, capsys.readouterr()


def test_reviewer_work_survives_rerun_and_pulls_exactly(tree, dataset_name, monkeypatch, capsys):
    monkeypatch.setattr(decisions_module, "utc_now", lambda: NOW)
    monkeypatch.delenv("DATAENGINE_REVIEWER", raising=False)
    dataset, _ = _build(tree, dataset_name)
    _act_as_reviewer(dataset)

    dataset, summary = _build(tree, dataset_name)  # re-run: no duplicates, the reviewer's work kept
    assert summary["samples"] == len(dataset) == 4 and summary["new_samples"] == 0
    assert summary["labels"] == {"accepted": 2, "review": 5, "rejected": 2, "teacher": 8, "ground_truth": 1}
    assert summary["kept_reviewer_edits"] == 6
    assert sorted(dataset.list_saved_views()) == ["hard_negatives", "rejected_confident", "review_queue"]
    b = _sample(dataset, "sub/b.jpg")
    assert _det(b, "review", "sub/b.jpg#1").bounding_box == pytest.approx([36 / W, 6 / H, 16 / W, 16 / H])
    assert _det(b, "review", "sub/b.jpg#2").label == "circle"
    assert _sample(dataset, "c.png").tags == ["scenario", "negative"]
    assert _det(_sample(dataset, "a.png"), "teacher", "a.png#1").tags == []  # teacher is rebuilt

    rc, out = _pull(tree, dataset_name, capsys)
    assert rc == 0, out.err
    assert "2 accept, 2 reject, 2 correct, 1 negative, 0 relabel, 1 added" in out.out
    text = tree["decisions"].read_text()
    assert json.loads(text) == _expected_decisions()
    assert text == decisions_module.dumps_decisions(_expected_decisions())  # canonical, sorted

    mtime = tree["decisions"].stat().st_mtime_ns
    rc, out = _pull(tree, dataset_name, capsys)  # nothing new: byte-identical, not even rewritten
    assert rc == 0 and "unchanged" in out.out
    assert tree["decisions"].read_text() == text and tree["decisions"].stat().st_mtime_ns == mtime

    a = _sample(dataset, "a.png")
    _det(a, "review", "a.png#1").tags = []  # the reviewer takes the accept back
    a.save()
    monkeypatch.setenv("DATAENGINE_REVIEWER", "ann@example.com")
    rc, out = _pull(tree, dataset_name, capsys)
    assert rc == 0 and "updated" in out.out
    labels = json.loads(tree["decisions"].read_text())["labels"]
    assert "a.png#1" not in labels
    assert labels["a.png#0"]["user"] is None  # unchanged entries keep who/when of their first pull


def test_rerun_follows_moved_and_vanished_labels(tree, dataset_name):
    dataset, _ = _build(tree, dataset_name)
    b = _sample(dataset, "sub/b.jpg")
    _det(b, "review", "sub/b.jpg#1").bounding_box = [36 / W, 6 / H, 16 / W, 16 / H]
    _det(b, "review", "sub/b.jpg#2").tags = ["accept"]
    b.save()
    # The filter ran again: b#1 moved to rejected, b#2 vanished.
    review = json.loads((tree["filtered"] / "review_queue.json").read_text())
    moved = [r for r in review if r["id"] == "sub/b.jpg#1"][0]
    review = [r for r in review if r["file_name"] != "sub/b.jpg"]
    (tree["filtered"] / "review_queue.json").write_text(json.dumps(review))
    rejected = json.loads((tree["filtered"] / "rejected.json").read_text())
    moved = {k: v for k, v in moved.items() if k != "risk"} | {"reason": "nms"}
    (tree["filtered"] / "rejected.json").write_text(json.dumps(rejected + [moved]))

    dataset, summary = _build(tree, dataset_name)
    b = _sample(dataset, "sub/b.jpg")
    assert b.review.detections == [] and b.max_risk is None
    det = _det(b, "rejected", "sub/b.jpg#1")
    assert det.bounding_box == pytest.approx([36 / W, 6 / H, 16 / W, 16 / H]) and det["reason"] == "nms"
    assert summary["kept_reviewer_edits"] == 1
    assert dataset.load_saved_view("review_queue").values("file_name") == ["a.png", "c.png"]


def test_pull_sees_small_edits_and_loads_only_touched_labels(tree, dataset_name):
    dataset, _ = _build(tree, dataset_name)
    a = _sample(dataset, "a.png")
    det = _det(a, "review", "a.png#1")
    det.bounding_box = [(30.0 + 0.05) / W, 10 / H, 19.95 / W, 20 / H]  # x1 moved by 0.05 px: a correction
    _det(a, "accepted", "a.png#0").bounding_box = [(4.0 + 1e-9) / W, 6 / H, 16 / W, 16 / H]  # float noise: no edit
    a.save()
    assert fa._reviewer_candidates(dataset.match_tags("scenario")).count("review.detections") == 1
    assert fa._reviewer_candidates(dataset.match_tags("scenario")).count("accepted.detections") == 0
    pulled = fa.pull_decisions(dataset)
    assert list(pulled["labels"]) == ["a.png#1"] and pulled["labels"]["a.png#1"]["bbox"] == [30.05, 10.0, 50.0, 30.0]
    assert pulled["images"] == {} and pulled["ignored"] == {}


def test_pull_without_dataset_is_one_line_error(tree, tmp_path, capsys):
    name = f"dataengine-test-missing-{uuid.uuid4().hex[:8]}"
    params = tmp_path / "params.yaml"
    params.write_text(f"review:\n  dataset_name: {name}\n")
    tree["decisions"].parent.mkdir(parents=True, exist_ok=True)
    tree["decisions"].write_text("sentinel")
    rc = fa.pull_cli(["--params", str(params), "--decisions", str(tree["decisions"])])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and name in err and "dataengine review open" in err
    assert tree["decisions"].read_text() == "sentinel"


AUDIT = ["sub/b.jpg#0", "a.png#0"]  # rank 0, 1: not the images' order in the pool, nor the review queue's


def _audit_entries(dataset):
    """``{file_name: (audit_rank, [pseudo ids shown in accepted])}`` of the saved audit view, in its order."""
    view = dataset.load_saved_view(fa.AUDIT_VIEW)
    return list(zip(view.values("file_name"),
                    zip(view.values("audit_rank"), view.values("accepted.detections.pseudo_id"))))


def test_audit_view_marks_labels_in_rank_order_and_pulls_reviewer_tags(tmp_path, dataset_name):
    tree = make_review_tree(tmp_path, audit=AUDIT)
    dataset, _ = _build(tree, dataset_name)
    assert fa.AUDIT_VIEW in dataset.list_saved_views()
    assert _audit_entries(dataset) == [("sub/b.jpg", (0, ["sub/b.jpg#0"])), ("a.png", (1, ["a.png#0"]))]
    a, b, c = (_sample(dataset, n) for n in ("a.png", "sub/b.jpg", "c.png"))
    assert (_det(a, "accepted", "a.png#0")["audit"], _det(a, "accepted", "a.png#0")["audit_rank"]) == (True, 1)
    assert (_det(b, "accepted", "sub/b.jpg#0")["audit"], _det(b, "accepted", "sub/b.jpg#0")["audit_rank"]) == (True, 0)
    assert not _det(a, "review", "a.png#1").has_field("audit") and c.audit_rank is None

    # The reviewer works in the audit view: rejects b's audited label (the App's label tagging), accepts a's, and
    # draws a box in a's accepted field (not audited: the view does not show it).
    view = dataset.load_saved_view(fa.AUDIT_VIEW)
    view.match(fo.ViewField("file_name") == "sub/b.jpg").tag_labels("reject", label_fields="accepted")
    sample = view.match(fo.ViewField("file_name") == "a.png").first()
    sample.accepted.detections[0].tags = ["accept"]
    sample.save()
    a = _sample(dataset, "a.png")
    a.accepted.detections.append(fo.Detection(label="circle", bounding_box=[0.5, 0.5, 0.2, 0.2]))
    a.save()

    dataset, summary = _build(tree, dataset_name)  # re-run: no duplicates, the tags kept, the view the same
    assert summary["samples"] == len(dataset) == 4 and summary["kept_reviewer_edits"] == 2
    assert dataset.count("accepted.detections") == 3
    assert _audit_entries(dataset) == [("sub/b.jpg", (0, ["sub/b.jpg#0"])), ("a.png", (1, ["a.png#0"]))]
    b = _sample(dataset, "sub/b.jpg")
    assert _det(b, "accepted", "sub/b.jpg#0").tags == ["reject"] and _det(b, "accepted", "sub/b.jpg#0")["audit"]
    pulled = fa.pull_decisions(dataset)
    original = {"a.png#0": [4.0, 6.0, 20.0, 22.0], "sub/b.jpg#0": [10.0, 10.0, 30.0, 30.0]}
    assert pulled["labels"] == {
        "a.png#0": {"file_name": "a.png", "decision": "accept", "source": "fiftyone", "user": None, "time": None,
                    "original": {"bbox": original["a.png#0"], "class_name": "circle"}},
        "sub/b.jpg#0": {"file_name": "sub/b.jpg", "decision": "reject", "source": "fiftyone", "user": None,
                        "time": None, "original": {"bbox": original["sub/b.jpg#0"], "class_name": "square"}},
    }
    assert pulled["images"]["a.png"]["added"] == [{"bbox": [32.0, 24.0, 44.8, 33.6], "class_name": "circle"}]

    # A new filter run audits only a.png#0: b's tagged label leaves the audit (its tag stays), the view follows.
    (tree["filtered"] / "audit.json").write_text(json.dumps(
        [{**json.loads((tree["filtered"] / "audit.json").read_text())[1], "audit_rank": 0}]))
    dataset, _ = _build(tree, dataset_name)
    assert _audit_entries(dataset) == [("a.png", (0, ["a.png#0"]))]
    det = _det(_sample(dataset, "sub/b.jpg"), "accepted", "sub/b.jpg#0")
    assert det.tags == ["reject"] and det["audit"] is None and det["audit_rank"] is None
    assert _sample(dataset, "sub/b.jpg").audit_rank is None

    # An older filter output without audit.json: no view, no rank left, the decisions still there.
    (tree["filtered"] / "audit.json").unlink()
    dataset, _ = _build(tree, dataset_name)
    assert sorted(dataset.list_saved_views()) == ["hard_negatives", "rejected_confident", "review_queue"]
    assert dataset.exists("audit_rank").count() == 0
    assert set(fa.pull_decisions(dataset)["labels"]) == {"a.png#0", "sub/b.jpg#0"}


def test_no_audit_file_no_audit_view_no_field(tree, dataset_name):
    dataset, _ = _build(tree, dataset_name)
    assert not (tree["filtered"] / "audit.json").exists()
    assert fa.AUDIT_VIEW not in dataset.list_saved_views() and not dataset.has_sample_field("audit_rank")
    assert all(not d.has_field("audit") for d in dataset.values("accepted.detections", unwind=True))


def test_empty_review_queue_builds_with_an_empty_queue_view(tree, dataset_name):
    """No review label anywhere: every max_risk is None, which FiftyOne cannot type as a new field (it used to fail)."""
    (tree["filtered"] / "review_queue.json").write_text("[]")
    dataset, summary = _build(tree, dataset_name)
    assert summary["labels"]["review"] == 0 and not dataset.has_sample_field("max_risk")
    assert len(dataset.load_saved_view("review_queue")) == 0


def test_open_cli_lists_the_audit_view(tmp_path, dataset_name, capsys):
    tree = make_review_tree(tmp_path / "tree", audit=AUDIT[:1])
    params = tmp_path / "params.yaml"
    params.write_text(f"review:\n  dataset_name: {dataset_name}\n")
    assert fa.open_cli(["--params", str(params), "--filtered", str(tree["filtered"]), "--pseudo", str(tree["pseudo"]),
                        "--data", str(tree["prepared"]), "--no-launch"]) == 0
    assert "audit (1 samples)" in capsys.readouterr().out


def test_open_cli_no_launch_prints_counts_and_views(tree, dataset_name, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"review:\n  dataset_name: {dataset_name}\n")
    argv = ["--params", str(params), "--filtered", str(tree["filtered"]), "--pseudo", str(tree["pseudo"]),
            "--data", str(tree["prepared"]), "--no-launch"]
    assert fa.open_cli(argv) == 0
    out = capsys.readouterr().out
    assert f"dataset '{dataset_name}': 4 samples (4 new, 0 removed)" in out
    assert "review 4" in out and "review_queue (3 samples)" in out and "hard_negatives (1 samples)" in out
    assert fa.open_cli(argv) == 0
    assert "4 samples (0 new, 0 removed)" in capsys.readouterr().out


BAD_OUTPUTS = {  # defect -> (how to make it, what the error line must say)
    "missing": (lambda f: (f / "rejected.json").unlink(), "rejected.json not found: run `dvc repro filter` first"),
    "not_json": (lambda f: (f / "review_queue.json").write_text("[{"), "review_queue.json: not valid JSON (line 1"),
    "audit_not_accepted": (None, "audit label 'a.png#1' is not an accepted label"),
}


@pytest.mark.parametrize("defect", list(BAD_OUTPUTS))
def test_open_cli_bad_pipeline_output_is_one_error_line_and_builds_nothing(tmp_path, dataset_name, capsys, defect):
    break_it, expected = BAD_OUTPUTS[defect]
    tree = make_review_tree(tmp_path / "tree", audit=["a.png#1"] if defect == "audit_not_accepted" else None)
    if break_it is not None:
        break_it(tree["filtered"])
    params = tmp_path / "params.yaml"
    params.write_text(f"review:\n  dataset_name: {dataset_name}\n")
    assert fa.open_cli(["--params", str(params), "--filtered", str(tree["filtered"]), "--pseudo", str(tree["pseudo"]),
                        "--data", str(tree["prepared"]), "--no-launch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not fo.dataset_exists(dataset_name)


def test_pull_cli_corrupt_decisions_file_is_one_error_line_and_kept(tree, dataset_name, tmp_path, capsys):
    _build(tree, dataset_name)
    tree["decisions"].parent.mkdir(parents=True, exist_ok=True)
    tree["decisions"].write_text('{"labels": ')
    params = tmp_path / "params.yaml"
    params.write_text(f"review:\n  dataset_name: {dataset_name}\n")
    assert fa.pull_cli(["--params", str(params), "--decisions", str(tree["decisions"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tree['decisions']}: not valid JSON") and err.count("\n") == 1, err
    assert tree["decisions"].read_text() == '{"labels": '  # the reviewer's file is left for them to fix


def test_help_documents_reviewer_conventions(capsys):
    with pytest.raises(SystemExit):
        fa.open_cli(["--help"])
    out = capsys.readouterr().out
    for words in ("'accept' / 'reject'", "sample tag 'negative'", "sample tag 'relabel'", "pseudo_id"):
        assert words in out


# ---------------------------------------------------------------------------------------------------------------
# The App in a real browser
# ---------------------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("DATAENGINE_REQUIRE_SERVERS") == "1":
        pytest.fail("chromium not found but DATAENGINE_REQUIRE_SERVERS=1: apt-get install -y chromium")
    pytest.skip("chromium not found: install it (Debian: apt-get install -y chromium) to run the App test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_text(dom: str) -> str:
    text = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.server
@pytest.mark.slow
def test_app_shows_the_dataset_in_headless_chromium(tree, dataset_name, tmp_path):
    chromium = _chromium()
    dataset, _ = _build(tree, dataset_name)
    port = _free_port()
    session = fa.launch_app(dataset, "127.0.0.1", port)
    try:
        url = fa.app_url(dataset_name, "127.0.0.1", port)
        base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=25000", "--window-size=1400,900"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        assert dom.returncode == 0, dom.stderr[-2000:]
        text = _page_text(dom.stdout)
        assert dataset_name in text
        assert re.search(r"\b4 samples\b", text), text[-2000:]
        for field in ("review", "accepted", "teacher", "segmentation"):
            assert re.search(rf"\b{field}\b", text), field
        artifacts = Path(os.environ.get("DATAENGINE_TEST_ARTIFACTS") or REPO / "test-artifacts")
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "fiftyone_app.png"
        shot.unlink(missing_ok=True)
        run = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
        assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        session.close()


@pytest.mark.server
@pytest.mark.slow
def test_open_in_the_background_says_how_to_stop_and_stops_on_sigterm(tree, dataset_name, tmp_path):
    """Started with SIGINT ignored (`dataengine review open &` from a script), Ctrl-C cannot stop it: the command says
    so and names the `kill` that does, and SIGTERM then closes the App as cleanly as Ctrl-C."""
    import signal
    import sys
    import time

    params = tmp_path / "params.yaml"
    params.write_text(f"review:\n  dataset_name: {dataset_name}\n")
    cmd = [sys.executable, "-m", "dataengine.cli", "review", "open", "--params", str(params), "--filtered",
           str(tree["filtered"]), "--pseudo", str(tree["pseudo"]), "--data", str(tree["prepared"]),
           "--port", str(_free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving") or time.monotonic() > deadline:
                break
        assert lines and "Ctrl-C is ignored in this process" in lines[-1] and f"kill {proc.pid}" in lines[-1], \
            "".join(lines[-20:])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "stopping the App" in out and "App stopped" in out


class _FakeSession:
    """Stands in for the App's fo.Session (outside the boundary: what is tested is how `serve` stops)."""

    def __init__(self, wait_error: type[BaseException] | None = None) -> None:
        self.waited = self.closed = False
        self.wait_error = wait_error

    def wait(self, timeout: float) -> None:
        self.waited = True
        if self.wait_error is not None:
            raise self.wait_error("SIGTERM")

    def close(self) -> None:
        self.closed = True


class _SignalDuringServingLine:
    """stdout on which a signal lands while the "serving" line is being printed (the race CI once hit)."""

    def __init__(self) -> None:
        self.text = ""
        self.fired = False

    def write(self, s: str) -> int:
        self.text += s
        if s.startswith("serving") and not self.fired:
            self.fired = True
            raise KeyboardInterrupt("SIGTERM")
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("where", ["while printing the serving line", "while waiting"])
def test_serve_stops_cleanly_wherever_the_signal_lands(monkeypatch, where) -> None:
    import signal
    import sys

    out = _SignalDuringServingLine()
    out.fired = where == "while waiting"  # then the line prints normally and the signal arrives in session.wait
    session = _FakeSession(wait_error=KeyboardInterrupt if where == "while waiting" else None)
    monkeypatch.setattr(sys, "stdout", out)
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert fa.serve(session) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert session.closed
    assert session.waited == (where == "while waiting")
    assert "stopping the App" in out.text and out.text.rstrip().endswith("App stopped")
