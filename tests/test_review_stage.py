"""The decisions file (schema, merge, stable writes) and the review stage (curation rules, metrics, DVC wiring)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.io import read_json
from dataengine.review.curate import curate, review_metrics, teacher_verdicts
from dataengine.review.decisions import (
    DecisionsError,
    attach_originals,
    empty_decisions,
    image_decision,
    label_decision,
    load_decisions,
    merge_pulled,
    split_label_id,
    validate_decisions,
    write_decisions,
)
from dataengine.review.inputs import load_review_inputs

sys.path.insert(0, str(Path(__file__).parent))
from review_fixtures import make_review_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"


# --------------------------------------------------------------------------------------------------------------
# decisions file
# --------------------------------------------------------------------------------------------------------------


def test_split_label_id_round_trip_and_refusals():
    assert split_label_id("cam0/a#b.png#12") == ("cam0/a#b.png", 12)
    for bad in ("a.png", "a.png#", "#3", "a.png#-1", "a.png#x"):
        with pytest.raises(DecisionsError, match="label id"):
            split_label_id(bad)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "'version' must be 1"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d["labels"]["a.png#0"].update(decision="maybe"), r"labels\['a.png#0'\].*'decision' must be"),
        (lambda d: d["labels"]["a.png#0"].update(decision="correct"), "'bbox' must be"),
        (lambda d: d["labels"]["a.png#0"].update(source="cvat"), "'source' must be one of"),
        (lambda d: d["labels"]["a.png#0"].update(file_name="b.png"), "the id belongs to 'a.png'"),
        (lambda d: d["images"].update({"a.png": {"flags": ["maybe"], "source": "fiftyone"}}), "'flags' must be"),
        (lambda d: d["images"].update({"a.png": {"added": [{"bbox": [5, 5, 1, 1], "class_name": "c"}],
                                                 "source": "fiftyone"}}), "x2 > x1"),
    ],
)
def test_validate_names_the_offending_key(mutate, message):
    doc = empty_decisions()
    doc["labels"]["a.png#0"] = label_decision("a.png", "accept", source="fiftyone", time=T0)
    mutate(doc)
    with pytest.raises(DecisionsError, match=message):
        validate_decisions(doc, "decisions.json")


def test_load_missing_is_empty_and_bad_json_names_file(tmp_path):
    assert load_decisions(tmp_path / "none.json") == empty_decisions()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DecisionsError, match="bad.json: not valid JSON"):
        load_decisions(bad)


def test_merge_keeps_unchanged_entries_and_drops_taken_back_ones():
    existing = empty_decisions()
    existing["labels"]["a.png#0"] = label_decision("a.png", "accept", source="fiftyone", time=T0)
    existing["labels"]["a.png#1"] = label_decision("a.png", "reject", source="fiftyone", time=T0)
    existing["labels"]["b.png#0"] = label_decision("b.png", "reject", source="labelstudio", user="x@y", time=T0)
    pulled = {"labels": {
        "a.png#0": label_decision("a.png", "accept", source="fiftyone"),  # unchanged: keeps T0
        "a.png#2": label_decision("a.png", "correct", source="fiftyone", bbox=[1, 2, 3, 4], class_name="c"),
    }, "images": {"a.png": image_decision(source="fiftyone", flags=["negative"])}}
    merged, changed = merge_pulled(existing, pulled, source="fiftyone", now=T1)
    assert changed
    assert merged["labels"]["a.png#0"]["time"] == T0
    assert "a.png#1" not in merged["labels"]  # the reviewer removed the reject tag
    assert merged["labels"]["a.png#2"]["time"] == T1 and merged["labels"]["a.png#2"]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert merged["labels"]["b.png#0"] == existing["labels"]["b.png#0"]  # the other tool's decision stays
    assert merged["images"]["a.png"]["flags"] == ["negative"]
    again, changed_again = merge_pulled(merged, pulled, source="fiftyone", now="2030-01-01T00:00:00Z")
    assert not changed_again and again == merged
    assert existing["labels"]["a.png#1"]["decision"] == "reject"  # the caller's document is not modified


def test_write_is_stable_sorted_and_skips_unchanged(tmp_path):
    path = tmp_path / "review" / "decisions.json"
    doc = empty_decisions()
    doc["labels"]["z.png#0"] = label_decision("z.png", "accept", source="fiftyone", time=T0)
    doc["labels"]["a.png#10"] = label_decision("a.png", "reject", source="fiftyone", time=T0)
    assert write_decisions(path, doc)
    text = path.read_text()
    assert text.index('"a.png#10"') < text.index('"z.png#0"') and text.endswith("}\n")
    os.utime(path, (1, 1))
    assert not write_decisions(path, json.loads(text))
    assert path.stat().st_mtime == 1 and path.read_text() == text


def test_attach_originals_records_what_the_reviewer_saw():
    pulled = {"labels": {"a.png#1": label_decision("a.png", "reject", source="fiftyone")}, "images": {}}
    out = attach_originals(pulled, {"a.png#1": {"bbox": [1, 2, 3, 4], "class_name": "square"}})
    assert out["labels"]["a.png#1"]["original"] == {"bbox": [1.0, 2.0, 3.0, 4.0], "class_name": "square"}
    assert "original" not in pulled["labels"]["a.png#1"]


# --------------------------------------------------------------------------------------------------------------
# curation
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path):
    paths = make_review_tree(tmp_path)
    inputs = load_review_inputs(paths["filtered"], paths["pseudo"], paths["prepared"])
    return paths, inputs, read_json(paths["filtered"] / "accepted.json")


def _boxes(curated, name):
    image_id = next(i["id"] for i in curated["images"] if i["file_name"] == name)
    cats = {c["id"]: c["name"] for c in curated["categories"]}
    return sorted((cats[a["category_id"]], a["bbox"], a["source"], a.get("pseudo_id"))
                  for a in curated["annotations"] if a["image_id"] == image_id)


def test_no_decisions_passes_the_accepted_set_through(tree, tmp_path):
    paths, inputs, accepted = tree
    curated, stats = curate(accepted, inputs.records_by_id(), empty_decisions(), inputs.semantic_root,
                            tmp_path / "out" / "semantic")
    assert len(curated["images"]) == 3 and len(curated["annotations"]) == 2
    assert _boxes(curated, "a.png") == [("circle", [4.0, 6.0, 16.0, 16.0], "pseudo", "a.png#0")]
    assert _boxes(curated, "c.png") == []  # kept: an image without boxes is a negative for the students
    for name in ("a.png", "sub/b.jpg", "c.png"):
        before = np.array(Image.open(inputs.semantic_root / f"{name}.png"))
        after = np.array(Image.open(tmp_path / "out" / "semantic" / f"{name}.png"))
        assert (before == after).all()
    metrics = review_metrics(stats, empty_decisions(), curated)
    assert metrics["reviewed_labels"] == 0 and metrics["teacher_precision_reviewed"] is None
    assert metrics["curated"]["per_class"] == {"circle": 1, "square": 1}


def _decisions(inputs):
    records = inputs.records_by_id()
    doc = empty_decisions()
    doc["labels"] = {
        "a.png#0": label_decision("a.png", "reject", source="fiftyone", time=T0),  # accepted -> removed
        "a.png#1": label_decision("a.png", "accept", source="labelstudio", time=T0),  # review -> promoted
        "a.png#2": label_decision("a.png", "correct", source="fiftyone", bbox=[38, 28, 58, 44], class_name="square",
                                  time=T0),  # rejected but real: corrected class and box
        "sub/b.jpg#1": label_decision("sub/b.jpg", "correct", source="labelstudio", bbox=[35, 5, 55, 24],
                                      class_name="circle", time=T0),  # review, box nudged: teacher was right
        "c.png#0": label_decision("c.png", "accept", source="fiftyone", time=T0),  # overridden by negative
    }
    doc["images"] = {
        "c.png": image_decision(source="fiftyone", flags=["negative"], time=T0),
        "sub/b.jpg": image_decision(source="labelstudio", added=[{"bbox": [40, 30, 60, 46], "class_name": "circle"}],
                                    time=T0),
    }
    return validate_decisions(attach_originals(doc, records))


@pytest.mark.parametrize("decision", ["reject", "correct"])
def test_removed_label_pixels_become_background_only_where_a_reviewer_saw_no_object(tree, tmp_path, decision):
    # a.png's mask holds circle pixels (1) exactly in #0's box [4, 6, 20, 22] (rows 6:22, columns 4:20)
    paths, inputs, accepted = tree
    doc = empty_decisions()
    extra = {"bbox": [44, 2, 60, 12], "class_name": "square"} if decision == "correct" else {}  # elsewhere
    doc["labels"]["a.png#0"] = label_decision("a.png", decision, source="fiftyone", time=T0, **extra)
    doc["images"]["a.png"] = image_decision(source="fiftyone", time=T0,
                                            added=[{"bbox": [4, 6, 12, 14], "class_name": "circle"}])
    curate(accepted, inputs.records_by_id(), validate_decisions(attach_originals(doc, inputs.records_by_id())),
           inputs.semantic_root, tmp_path / "semantic")
    mask = np.array(Image.open(tmp_path / "semantic" / "a.png.png"))
    assert (mask[6:14, 4:12] == 255).all()  # under a curated box (the added one): doubtful, ignored
    outside = mask[6:22, 4:20].copy()
    outside[:8, :8] = 0
    if decision == "reject":
        assert (outside == 0).all()  # the reviewer saw nothing there: background (a hard pixel for `mine`)
    else:
        assert (mask[6:22, 4:20] == 255).all()  # a corrected object is there: its old pixels stay doubtful


def test_decisions_are_applied(tree, tmp_path):
    paths, inputs, accepted = tree
    decisions = _decisions(inputs)
    curated, stats = curate(accepted, inputs.records_by_id(), decisions, inputs.semantic_root,
                            tmp_path / "out" / "semantic")
    assert _boxes(curated, "a.png") == [("square", [30.0, 10.0, 20.0, 20.0], "review", "a.png#1"),
                                        ("square", [38.0, 28.0, 20.0, 16.0], "review", "a.png#2")]
    assert _boxes(curated, "sub/b.jpg") == [("circle", [35.0, 5.0, 20.0, 19.0], "review", "sub/b.jpg#1"),
                                            ("circle", [40.0, 30.0, 20.0, 16.0], "review", None),
                                            ("square", [10.0, 10.0, 20.0, 20.0], "pseudo", "sub/b.jpg#0")]
    assert _boxes(curated, "c.png") == []
    c_image = next(i for i in curated["images"] if i["file_name"] == "c.png")
    assert c_image["negative"] and c_image["reviewed"]
    # masks: a negative is all background; a rejected circle's pixels that no curated box covers are background
    assert (np.array(Image.open(tmp_path / "out" / "semantic" / "c.png.png")) == 0).all()
    mask_a = np.array(Image.open(tmp_path / "out" / "semantic" / "a.png.png"))
    assert (mask_a[6:22, 4:20] == 0).all() and (mask_a[30:, :30] == 0).all()

    metrics = review_metrics(stats, decisions, curated)
    assert metrics["decisions"] == {"accept": 2, "reject": 1, "correct": 2, "added": 1, "negative": 1, "relabel": 0}
    assert metrics["labels_changed_by_person"] == 4
    assert metrics["by_source"] == {"fiftyone": 4, "labelstudio": 3}
    # right: a.png#1 (accept), sub/b.jpg#1 (same class, IoU >= 0.5), c.png#0 (accept); wrong: a.png#0, a.png#2
    assert metrics["reviewed_labels"] == 5 and metrics["teacher_precision_reviewed"] == 0.6
    assert metrics["teacher_precision_reviewed_per_band"]["accepted"] == {"labels": 1, "precision": 0.0}
    assert metrics["teacher_precision_reviewed_per_class"] == {"circle": 0.5, "square": 1.0}  # 2 of 4, 1 of 1
    assert metrics["curated"]["negatives"] == 1 and metrics["curated"]["annotations"] == 5


def test_relabel_excludes_the_image(tree, tmp_path):
    paths, inputs, accepted = tree
    doc = empty_decisions()
    doc["images"]["a.png"] = image_decision(source="fiftyone", flags=["relabel"], time=T0)
    curated, stats = curate(accepted, inputs.records_by_id(), doc, inputs.semantic_root, tmp_path / "sem")
    assert [i["file_name"] for i in curated["images"]] == ["c.png", "sub/b.jpg"]
    assert review_metrics(stats, doc, curated)["curated"]["excluded_relabel"] == 1


def test_stale_decision_follows_its_box(tree, tmp_path):
    """A new teacher numbered the boxes differently: the decision re-attaches by class and IoU, or adds the box."""
    paths, inputs, accepted = tree
    doc = empty_decisions()
    # id #1 of a.png is now the square at [30, 10, 50, 30]; the reviewer had accepted a circle at [5, 7, 20, 22]
    doc["labels"]["a.png#1"] = label_decision("a.png", "reject", source="fiftyone", time=T0,
                                              original={"bbox": [5, 7, 20, 22], "class_name": "circle"})
    doc["labels"]["sub/b.jpg#1"] = label_decision("sub/b.jpg", "accept", source="fiftyone", time=T0,
                                                  original={"bbox": [50, 30, 60, 40], "class_name": "square"})
    curated, stats = curate(accepted, inputs.records_by_id(), doc, inputs.semantic_root, None)
    assert _boxes(curated, "a.png") == []  # the reject found the accepted circle a.png#0 (IoU 0.83), not #1
    assert ("square", [50.0, 30.0, 10.0, 10.0], "review", None) in _boxes(curated, "sub/b.jpg")  # person's box kept
    metrics = review_metrics(stats, doc, curated)
    assert metrics["stale_decisions"] == 2 and metrics["stale_unmatched"] == 1


def test_unknown_class_or_image_is_refused(tree):
    paths, inputs, accepted = tree
    doc = empty_decisions()
    doc["labels"]["a.png#1"] = label_decision("a.png", "correct", source="fiftyone", bbox=[1, 1, 5, 5],
                                              class_name="hexagon")
    with pytest.raises(ValueError, match="'hexagon'.*known classes: circle, square"):
        curate(accepted, inputs.records_by_id(), doc, None, None)
    doc = empty_decisions()
    doc["images"]["nope.png"] = image_decision(source="fiftyone", flags=["negative"])
    with pytest.raises(ValueError, match="'nope.png' is not in the pool"):
        curate(accepted, inputs.records_by_id(), doc, None, None)


# --------------------------------------------------------------------------------------------------------------
# the stage under DVC: a changed decisions file re-runs review and what depends on it, nothing upstream
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_reruns_review_and_downstream_only(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    fixture = make_review_tree(tmp_path / "fixture")
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@t")
    run("git", "config", "user.name", "t")
    run(*dvc, "init", "-q")
    write_decisions(repo / "data" / "review" / "decisions.json", empty_decisions())
    (repo / "dvc.yaml").write_text(f"""stages:
  upstream:
    cmd: rm -rf data/filtered && cp -r {fixture['filtered']} data/filtered
    outs: [data/filtered]
  review:
    cmd: {sys.executable} {ROOT}/pipelines/review.py --filtered data/filtered --pseudo {fixture['pseudo']}
      --data {fixture['prepared']} --decisions data/review/decisions.json --out data/curated --metrics review.json
    deps: [data/filtered, data/review/decisions.json]
    outs: [data/curated]
    metrics: [review.json: {{cache: false}}]
  downstream:
    cmd: {sys.executable} -c "import json; print(len(json.load(open('data/curated/scenario.json'))['annotations']))"
      > count.txt
    deps: [data/curated]
    outs: [count.txt]
""")
    run(*dvc, "repro", "-q")
    assert (repo / "count.txt").read_text().strip() == "2"
    assert "up to date" in run(*dvc, "status").stdout.lower()

    doc = empty_decisions()
    doc["labels"]["a.png#1"] = label_decision("a.png", "accept", source="fiftyone", time=T0)
    write_decisions(repo / "data" / "review" / "decisions.json", doc)
    status = run(*dvc, "status", "--json").stdout
    assert set(json.loads(status)) == {"review"}
    out = run(*dvc, "repro").stdout
    assert "Running stage 'review'" in out and "Running stage 'downstream'" in out
    assert "Running stage 'upstream'" not in out
    assert (repo / "count.txt").read_text().strip() == "3"
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)


def test_teacher_verdicts_follow_the_review_metrics_rules_and_reattach_stale_decisions() -> None:
    records = {"a.png#0": {"file_name": "a.png", "bbox": [0, 0, 10, 10], "class_name": "cat"},
               "a.png#1": {"file_name": "a.png", "bbox": [50, 50, 60, 60], "class_name": "dog"},
               "a.png#2": {"file_name": "a.png", "bbox": [20, 20, 30, 30], "class_name": "cat"},
               "b.png#0": {"file_name": "b.png", "bbox": [0, 0, 10, 10], "class_name": "cat"}}
    doc = empty_decisions()
    doc["labels"] = {
        "a.png#0": label_decision("a.png", "correct", source="fiftyone", bbox=[0, 0, 10, 11], class_name="cat"),
        "a.png#1": label_decision("a.png", "correct", source="fiftyone", bbox=[50, 50, 60, 60], class_name="cat"),
        # Stale: the id now names another box; re-attached to a.png#2 (same class, same box).
        "a.png#7": label_decision("a.png", "reject", source="fiftyone",
                                  original={"bbox": [20, 20, 30, 30], "class_name": "cat"}),
        # Stale and matching nothing now: no verdict.
        "b.png#3": label_decision("b.png", "accept", source="fiftyone",
                                  original={"bbox": [80, 80, 90, 90], "class_name": "cat"}),
        "b.png#0": label_decision("b.png", "accept", source="labelstudio"),
    }
    assert teacher_verdicts(doc, records) == {"a.png#0": True, "a.png#1": False, "a.png#2": False, "b.png#0": True}
    assert teacher_verdicts(empty_decisions(), records) == {}
