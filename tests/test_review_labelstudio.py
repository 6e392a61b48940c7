"""Label Studio round trip: pure converters (fast) and the real server (markers ``server``, ``slow``).

The server tests start ``label-studio`` from its own venv (see ``tests/labelstudio_server.py``) once per session,
push the fixture review queue, annotate through the API as an annotator, pull, and check the decisions file entry
by entry; then the error paths (server down, wrong token, unknown project) and that the API key leaks nowhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataengine.review import labelstudio as lsmod
from dataengine.review.decisions import load_decisions
from dataengine.review.inputs import load_review_inputs
from dataengine.review.labelstudio import (
    LabelStudioError,
    audit_images,
    box_region,
    decisions_from_annotation,
    label_config,
    latest_annotation,
    queue_images,
    region_box,
    task_for_image,
)
from review_fixtures import BOXES, CLASSES, H, W, make_review_tree

ENV_KEYS = (lsmod.URL_ENV, lsmod.KEY_ENV, lsmod.ROOT_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------------------------------------------------
# Pure converters
# ------------------------------------------------------------------------------------------------------------


def test_label_config_lists_classes_masks_and_flags():
    xml = label_config(["circle", 'a "b" & <c>'], masks=True)
    root = ET.fromstring(xml)
    rect = root.find("RectangleLabels")
    assert rect.get("name") == "label" and rect.get("toName") == "image"
    assert [lab.get("value") for lab in rect.findall("Label")] == ["circle", 'a "b" & <c>']
    assert [lab.get("value") for lab in root.find("BrushLabels").findall("Label")] == ["circle", 'a "b" & <c>']
    flags = root.find("Choices")
    assert flags.get("name") == "flags" and flags.get("choice") == "multiple"
    assert [c.get("value") for c in flags.findall("Choice")] == ["negative", "relabel"]
    assert root.find("Image").get("value") == "$image"
    assert ET.fromstring(label_config(["circle"], masks=False)).find("BrushLabels") is None
    with pytest.raises(ValueError):
        label_config([], masks=False)


@st.composite
def _box_in_image(draw):
    width = draw(st.integers(8, 4000))
    height = draw(st.integers(8, 4000).filter(lambda h: h != width))
    x1 = draw(st.floats(0, width - 1, allow_nan=False))
    y1 = draw(st.floats(0, height - 1, allow_nan=False))
    x2 = draw(st.floats(x1 + 0.5, width, allow_nan=False).filter(lambda v: v > x1))
    y2 = draw(st.floats(y1 + 0.5, height, allow_nan=False).filter(lambda v: v > y1))
    return width, height, [x1, y1, x2, y2]


@settings(max_examples=200, deadline=None)
@given(_box_in_image(), st.sampled_from(["circle", "square", "star"]))
def test_box_round_trip(case, class_name):
    width, height, box = case
    item = box_region("p3", box, class_name, width, height, score=0.5)
    value = item["value"]
    assert all(0.0 <= value[k] <= 100.0 + 1e-9 for k in ("x", "y", "width", "height"))
    back, cls = region_box(json.loads(json.dumps(item)))  # through JSON, as the server stores it
    assert cls == class_name
    assert np.allclose(back, box, atol=1e-6)


def test_box_region_percent_uses_width_for_x_and_height_for_y():
    item = box_region("p0", [16.0, 12.0, 32.0, 36.0], "circle", 64, 48)
    assert item["value"] == {"x": 25.0, "y": 25.0, "width": 25.0, "height": 50.0, "rotation": 0,
                             "rectanglelabels": ["circle"]}
    assert (item["from_name"], item["to_name"], item["type"]) == ("label", "image", "rectanglelabels")
    assert (item["original_width"], item["original_height"]) == (64, 48)


def test_region_box_refuses_rotation():
    item = box_region("p0", [1, 1, 10, 10], "circle", 64, 48)
    item["value"]["rotation"] = 30
    with pytest.raises(ValueError, match="rotated"):
        region_box(item)


def _inputs(tmp_path):
    paths = make_review_tree(tmp_path)
    return load_review_inputs(paths["filtered"], paths["pseudo"], paths["prepared"]), paths


def _records(inputs, name):
    return [r for band in ("accepted", "review") for r in getattr(inputs, band) if r["file_name"] == name]


def test_task_for_image_holds_accepted_and_review_labels(tmp_path):
    inputs, _ = _inputs(tmp_path)
    records = _records(inputs, "sub/b.jpg")
    before = copy.deepcopy(records)
    task = task_for_image("sub/b.jpg", W, H, records, "/img/sub/b.jpg", "teacher-x")
    assert records == before  # never mutates the caller's records
    assert task["data"] == {"image": "/img/sub/b.jpg", "file_name": "sub/b.jpg"}
    (pred,) = task["predictions"]
    assert pred["model_version"] == "teacher-x" and pred["score"] == pytest.approx(0.35)  # lowest label score
    assert [r["id"] for r in pred["result"]] == ["p0", "p1", "p2"]
    for item, (bbox, cls, score, *_rest) in zip(pred["result"], BOXES["sub/b.jpg"]):
        back, name = region_box(item)
        assert np.allclose(back, bbox) and name == CLASSES[cls] and item["score"] == score
    with pytest.raises(ValueError, match="does not belong"):
        task_for_image("a.png", W, H, records, "/x", "v")


def test_task_for_image_masks_one_brush_region_per_present_class():
    from label_studio_sdk.converter.brush import decode_rle

    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 3:30] = 2
    mask[30:40, 40:60] = 1
    mask[:2] = 255  # ignored pixels: no region
    mask[45:, :] = 7  # not a category: no region
    task = task_for_image("a.png", W, H, [], "/a", "v", mask=mask, class_of_id={1: "circle", 2: "square"})
    regions = task["predictions"][0]["result"]
    assert [(r["id"], r["type"], r["value"]["brushlabels"]) for r in regions] == [
        ("m1", "brushlabels", ["circle"]), ("m2", "brushlabels", ["square"])]
    for region, cat in zip(regions, (1, 2)):
        decoded = decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3]
        assert np.array_equal(decoded > 0, mask == cat)
    assert task["predictions"][0]["score"] == 1.0  # no label on the image
    with pytest.raises(ValueError, match="shape"):
        task_for_image("a.png", W, H, [], "/a", "v", mask=mask[:10], class_of_id={1: "circle"})


def test_queue_images_by_risk_and_max_tasks(tmp_path):
    inputs, _ = _inputs(tmp_path)
    assert queue_images(inputs.review) == ["a.png", "sub/b.jpg", "c.png"]
    assert queue_images(inputs.review, max_tasks=2) == ["a.png", "sub/b.jpg"]


def test_audit_images_in_audit_order_without_the_queue_ones():
    audit = [{"file_name": n, "audit_rank": i} for i, n in enumerate(["c.png", "a.png", "c.png", "sub/b.jpg"])]
    assert audit_images(audit) == ["c.png", "a.png", "sub/b.jpg"]  # an image's place: its first audited label
    assert audit_images(audit, pushed=["a.png", "x.png"]) == ["c.png", "sub/b.jpg"]
    assert audit_images([], pushed=["a.png"]) == []


def test_load_review_inputs_reads_the_audit_by_rank_and_checks_its_ids(tmp_path):
    inputs, paths = _inputs(tmp_path)
    assert inputs.audit == []  # no audit.json (an older filter output): an empty audit
    audit_file = paths["filtered"] / "audit.json"
    paths = make_review_tree(tmp_path, audit=["sub/b.jpg#0", "a.png#0"])
    records = json.loads(audit_file.read_text())
    audit_file.write_text(json.dumps(records[::-1]))  # listed out of rank order: read by rank
    inputs = load_review_inputs(paths["filtered"], paths["pseudo"], paths["prepared"])
    assert [(r["id"], r["audit_rank"]) for r in inputs.audit] == [("sub/b.jpg#0", 0), ("a.png#0", 1)]
    audit_file.write_text(json.dumps([{**records[0], "id": "a.png#1", "audit_rank": 0}]))  # a review-band label
    with pytest.raises(ValueError, match=r"audit\.json: audit label 'a\.png#1' is not an accepted label"):
        load_review_inputs(paths["filtered"], paths["pseudo"], paths["prepared"])


def _annotation(result, **kw):
    return {"id": 7, "result": result, "completed_by": 3, "was_cancelled": False,
            "updated_at": "2026-11-23T10:00:00.123456Z", **kw}


def test_decisions_from_annotation_each_action(tmp_path):
    inputs, _ = _inputs(tmp_path)
    a = task_for_image("a.png", W, H, _records(inputs, "a.png"), "/a", "v")
    b = task_for_image("sub/b.jpg", W, H, _records(inputs, "sub/b.jpg"), "/b", "v")
    pa, pb = a["predictions"][0]["result"], b["predictions"][0]["result"]
    moved = box_region("p1", [32.0, 12.0, 52.0, 32.0], "square", W, H)
    added = box_region("x9Yz", [1.0, 30.0, 12.0, 44.0], "circle", W, H)
    relabelled = copy.deepcopy(pb[1])
    relabelled["value"]["rectanglelabels"] = ["square"]
    flags = {"id": "f", "type": "choices", "from_name": "flags", "to_name": "image",
             "value": {"choices": ["negative"]}}
    before = copy.deepcopy((a, b))
    got_a = decisions_from_annotation(a, _annotation([pa[0], moved, added]), CLASSES, {3: "ann@example.com"})
    got_b = decisions_from_annotation(b, _annotation([pb[0], relabelled, flags]), CLASSES, {3: "ann@example.com"})
    assert (a, b) == before
    meta = {"source": "labelstudio", "user": "ann@example.com", "time": "2026-11-23T10:00:00Z"}
    assert got_a["labels"] == {
        "a.png#0": {"file_name": "a.png", "decision": "accept", **meta,
                    "original": {"bbox": [4.0, 6.0, 20.0, 22.0], "class_name": "circle"}},
        "a.png#1": {"file_name": "a.png", "decision": "correct", "bbox": [32.0, 12.0, 52.0, 32.0],
                    "class_name": "square", **meta,
                    "original": {"bbox": [30.0, 10.0, 50.0, 30.0], "class_name": "square"}},
    }
    assert got_a["images"] == {"a.png": {"flags": [], "added": [{"bbox": [1.0, 30.0, 12.0, 44.0],
                                                                   "class_name": "circle"}], **meta}}
    assert {k: (v["decision"], v.get("bbox"), v.get("class_name")) for k, v in got_b["labels"].items()} == {
        "sub/b.jpg#0": ("accept", None, None),
        "sub/b.jpg#1": ("correct", [34.0, 4.0, 54.0, 24.0], "square"),
        "sub/b.jpg#2": ("reject", None, None),
    }
    assert got_b["images"]["sub/b.jpg"]["flags"] == ["negative"] and got_b["images"]["sub/b.jpg"]["added"] == []


def test_decisions_tolerance_cancelled_and_unknown_class(tmp_path):
    inputs, _ = _inputs(tmp_path)
    task = task_for_image("c.png", W, H, _records(inputs, "c.png"), "/c", "v")
    (region,) = task["predictions"][0]["result"]
    nudged = box_region("p0", [20.004, 12.0, 44.0, 36.006], "circle", W, H)
    assert decisions_from_annotation(task, _annotation([nudged]), CLASSES)["labels"]["c.png#0"]["decision"] == "accept"
    shifted = box_region("p0", [20.02, 12.0, 44.0, 36.0], "circle", W, H)
    assert decisions_from_annotation(task, _annotation([shifted]), CLASSES)["labels"]["c.png#0"]["decision"] == \
        "correct"
    assert decisions_from_annotation(task, _annotation([region], was_cancelled=True), CLASSES) == \
        {"labels": {}, "images": {}, "skipped": []}
    assert decisions_from_annotation(task, None, CLASSES)["labels"] == {}
    # who: created_username when the user list does not know the id
    got = decisions_from_annotation(task, _annotation([region], created_username=" x@y.z, 3"), CLASSES)
    assert got["labels"]["c.png#0"]["user"] == "x@y.z"
    star = copy.deepcopy(region)
    star["value"]["rectanglelabels"] = ["star"]
    with pytest.raises(LabelStudioError, match="'star'"):
        decisions_from_annotation(task, _annotation([star]), CLASSES)
    unlabeled = box_region("new", [1, 1, 5, 5], "circle", W, H)
    unlabeled["value"]["rectanglelabels"] = []
    assert decisions_from_annotation(task, _annotation([region, unlabeled]), CLASSES)["skipped"]


def test_latest_annotation_skips_cancelled():
    anns = [{"id": 1, "updated_at": "2026-01-01T00:00:00Z", "was_cancelled": False},
            {"id": 2, "updated_at": "2026-01-03T00:00:00Z", "was_cancelled": True},
            {"id": 3, "updated_at": "2026-01-02T00:00:00+00:00", "was_cancelled": False}]
    assert latest_annotation(anns)["id"] == 3
    assert latest_annotation(anns[1:2]) is None and latest_annotation([]) is None


def test_image_urls_local_files_http_or_error(tmp_path, monkeypatch):
    inputs, _ = _inputs(tmp_path / "tree")
    with pytest.raises(LabelStudioError, match="--image-url-base"):
        lsmod._image_urls(inputs, ["sub/b.jpg"], None)
    urls, storage = lsmod._image_urls(inputs, ["sub/b c.jpg"], "http://h:8000/pool/")
    assert urls == {"sub/b c.jpg": "http://h:8000/pool/sub/b%20c.jpg"} and storage is None
    monkeypatch.setenv(lsmod.ROOT_ENV, str(tmp_path))
    urls, storage = lsmod._image_urls(inputs, ["sub/b.jpg"], "http://ignored")
    assert urls == {"sub/b.jpg": "/data/local-files/?d=tree/prepared/scenario/pool/sub/b.jpg"}
    assert storage == tmp_path / "tree/prepared/scenario/pool"
    monkeypatch.setenv(lsmod.ROOT_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(LabelStudioError, match="not below"):
        lsmod._image_urls(inputs, ["a.png"], None)


def _params(path: Path, title: str, masks: bool = True) -> Path:
    path.write_text("review:\n  labelstudio:\n"
                    f"    project_title: {json.dumps(title)}\n    masks: {str(masks).lower()}\n")
    return path


def _cli_args(paths, params):
    return ["--params", str(params), "--filtered", str(paths["filtered"]), "--pseudo", str(paths["pseudo"]),
            "--data", str(paths["prepared"]), "--decisions", str(paths["decisions"])]


def test_cli_missing_env_is_one_line_and_touches_nothing(tmp_path, capsys):
    _, paths = _inputs(tmp_path)
    args = _cli_args(paths, _params(tmp_path / "params.yaml", "dataengine review"))
    assert lsmod.pull_cli(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LABEL_STUDIO_URL is not set" in err
    assert not paths["decisions"].exists()


def test_cli_audit_out_of_step_with_accepted_is_one_line_and_touches_nothing(tmp_path, capsys):
    """The error comes from reading the pipeline's outputs, before any server is contacted (none is set here)."""
    paths = make_review_tree(tmp_path, audit=["a.png#1"])  # a review-band label: the filter outputs disagree
    args = _cli_args(paths, _params(tmp_path / "params.yaml", "dataengine review"))
    for action in (lsmod.push_cli, lsmod.pull_cli):
        assert action(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "audit label 'a.png#1' is not an accepted label" in err and "dvc repro filter" in err
    assert not paths["decisions"].exists()


def test_review_cli_labelstudio_alone_lists_its_actions(capsys):
    from dataengine.review.cli import review_cli

    assert review_cli(["labelstudio", "--help"]) == 0
    out = capsys.readouterr().out
    assert "dataengine review labelstudio ACTION" in out and "push" in out and "pull" in out
    assert "LABEL_STUDIO_API_KEY" in out
    assert review_cli(["labelstudio"]) == 2


def test_review_cli_dispatches_to_labelstudio(capsys):
    from dataengine.review.cli import review_cli

    for action in ("push", "pull"):
        with pytest.raises(SystemExit) as exit_info:
            review_cli(["labelstudio", action, "--help"])
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        assert f"dataengine review labelstudio {action}" in help_text and "LABEL_STUDIO_API_KEY" in help_text


# ------------------------------------------------------------------------------------------------------------
# The real server
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory):
    from labelstudio_server import INSTALL_HINT, label_studio_binary, start_server

    binary = label_studio_binary()
    if binary is None:
        if os.environ.get("DATAENGINE_REQUIRE_SERVERS") == "1":
            pytest.fail(f"label-studio not found and DATAENGINE_REQUIRE_SERVERS=1: {INSTALL_HINT}")
        pytest.skip(f"label-studio not installed: {INSTALL_HINT}")
    workdir = tmp_path_factory.mktemp("labelstudio")
    root = tmp_path_factory.mktemp("ls-files")  # document root; each test's fixture tree lives below it
    try:
        server = start_server(binary, workdir, root)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield server
    server.stop()


@pytest.fixture
def ls_env(ls_server, monkeypatch):
    monkeypatch.setenv(lsmod.URL_ENV, ls_server.url)
    monkeypatch.setenv(lsmod.KEY_ENV, ls_server.token)
    monkeypatch.setenv(lsmod.ROOT_ENV, str(ls_server.document_root))
    return ls_server


def _tree(server, name):
    root = server.document_root / name
    paths = make_review_tree(root)
    return root, paths


def _sdk(server):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=server.url, api_key=server.token)


def _project_tasks(ls, title):
    (project,) = [p for p in ls.projects.list() if p.title == title]
    return project, [t.model_dump(mode="json") for t in ls.tasks.list(project=project.id, fields="all")]


def _assert_key_nowhere(key, texts, root):
    for text in texts:
        assert key not in text
    for path in root.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


@pytest.mark.server
@pytest.mark.slow
def test_round_trip_push_annotate_pull(ls_env, tmp_path, capsys):
    server = ls_env
    root, paths = _tree(server, "roundtrip")
    title = "dataengine review roundtrip"
    args = _cli_args(paths, _params(root / "params.yaml", title))

    assert lsmod.push_cli(args) == 0
    out1 = capsys.readouterr()
    assert "3 new, 0 updated, 0 unchanged" in out1.out, out1
    ls = _sdk(server)
    project, tasks = _project_tasks(ls, title)
    assert "<BrushLabels" in project.label_config
    by_name = {t["data"]["file_name"]: t for t in tasks}
    assert sorted(by_name) == ["a.png", "c.png", "sub/b.jpg"]
    for name, task in by_name.items():
        (pred,) = task["predictions"]
        assert pred["model_version"] == "teacher-" + "f" * 12
        boxes = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
        expected = [i for i, item in enumerate(BOXES[name]) if item[4] in ("accepted", "review")]
        assert [r["id"] for r in boxes] == [f"p{i}" for i in expected]
        assert [r["type"] for r in pred["result"] if r["type"] != "rectanglelabels"] == ["brushlabels"]
        # the image is served by Label Studio from local files (no upload)
        assert task["data"]["image"].startswith("/data/local-files/?d=")
        req = urllib.request.Request(server.url + task["data"]["image"],
                                     headers={"Authorization": f"Token {server.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        assert resp.status == 200 and body == (paths["prepared"] / "scenario/pool" / name).read_bytes()

    # The annotator: a.png keeps p0, moves p1, draws a new circle; sub/b.jpg keeps p0, relabels p1 as square,
    # deletes p2 and flags the image negative; c.png is left untouched.
    pa = {r["id"]: r for r in by_name["a.png"]["predictions"][0]["result"]}
    pb = {r["id"]: r for r in by_name["sub/b.jpg"]["predictions"][0]["result"]}
    moved = box_region("p1", [32.0, 12.0, 52.0, 32.0], "square", W, H)
    drawn = box_region("Xk3u9", [1.0, 30.0, 12.0, 44.0], "circle", W, H)
    relabelled = copy.deepcopy(pb["p1"])
    relabelled["value"]["rectanglelabels"] = ["square"]
    flags = {"id": "fl1", "type": "choices", "from_name": "flags", "to_name": "image",
             "value": {"choices": ["negative"]}}
    ann_a = ls.annotations.create(id=by_name["a.png"]["id"], result=[pa["p0"], pa["m1"], moved, drawn])
    ann_b = ls.annotations.create(id=by_name["sub/b.jpg"]["id"], result=[pb["p0"], relabelled, flags])

    assert lsmod.pull_cli(args) == 0
    out2 = capsys.readouterr()
    assert "pulled 2 annotated of 3 tasks" in out2.out and "2 accept, 2 correct, 1 reject" in out2.out, out2
    doc = load_decisions(paths["decisions"])

    def meta(ann):
        return {"source": "labelstudio", "user": server.email, "time": lsmod._iso_z(ann.updated_at)}

    ma, mb = meta(ann_a), meta(ann_b)
    assert doc["labels"] == {
        "a.png#0": {"file_name": "a.png", "decision": "accept", **ma,
                    "original": {"bbox": [4.0, 6.0, 20.0, 22.0], "class_name": "circle"}},
        "a.png#1": {"file_name": "a.png", "decision": "correct", "bbox": [32.0, 12.0, 52.0, 32.0],
                    "class_name": "square", **ma,
                    "original": {"bbox": [30.0, 10.0, 50.0, 30.0], "class_name": "square"}},
        "sub/b.jpg#0": {"file_name": "sub/b.jpg", "decision": "accept", **mb,
                        "original": {"bbox": [10.0, 10.0, 30.0, 30.0], "class_name": "square"}},
        "sub/b.jpg#1": {"file_name": "sub/b.jpg", "decision": "correct", "bbox": [34.0, 4.0, 54.0, 24.0],
                        "class_name": "square", **mb,
                        "original": {"bbox": [34.0, 4.0, 54.0, 24.0], "class_name": "circle"}},
        "sub/b.jpg#2": {"file_name": "sub/b.jpg", "decision": "reject", **mb,
                        "original": {"bbox": [2.0, 28.0, 18.0, 44.0], "class_name": "square"}},
    }
    assert doc["images"] == {
        "a.png": {"flags": [], "added": [{"bbox": [1.0, 30.0, 12.0, 44.0], "class_name": "circle"}], **ma},
        "sub/b.jpg": {"flags": ["negative"], "added": [], **mb},
    }

    # An unchanged pull leaves the file byte-identical, mtime included.
    text, mtime = paths["decisions"].read_bytes(), paths["decisions"].stat().st_mtime_ns
    assert lsmod.pull_cli(args) == 0
    out3 = capsys.readouterr()
    assert "unchanged" in out3.out
    assert paths["decisions"].read_bytes() == text and paths["decisions"].stat().st_mtime_ns == mtime

    # A second push creates nothing; a new model version replaces predictions, never adds tasks.
    assert lsmod.push_cli(args) == 0
    out4 = capsys.readouterr()
    assert "found) at" in out4.out and "0 new, 0 updated, 3 unchanged" in out4.out, out4
    inputs = load_review_inputs(paths["filtered"], paths["pseudo"], paths["prepared"])
    inputs.model_version = "teacher-next"
    from dataengine.config import load_params

    params = load_params(root / "params.yaml", ["review"]).review.labelstudio
    stats = lsmod.push(inputs, params)
    assert (stats["new"], stats["updated"], stats["unchanged"]) == (0, 3, 0)
    project, tasks = _project_tasks(ls, title)
    assert project.model_version == "teacher-next"  # the editor pre-fills only this version's predictions
    assert len(tasks) == 3 and sorted(t["data"]["file_name"] for t in tasks) == ["a.png", "c.png", "sub/b.jpg"]
    assert all([p["model_version"] for p in t["predictions"]] == ["teacher-next"] for t in tasks)
    assert len(ls.import_storage.local.list(project=tasks[0]["project"])) == 1

    _assert_key_nowhere(server.token, [out1.out, out1.err, out2.out, out2.err, out3.out, out3.err, out4.out,
                                       out4.err], root)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("case", ["server_down", "wrong_token", "unknown_project"])
def test_errors_one_line_nonzero_file_untouched(case, ls_env, monkeypatch, capsys):
    from labelstudio_server import free_port

    server = ls_env
    root, paths = _tree(server, f"err-{case}")
    args = _cli_args(paths, _params(root / "params.yaml", f"never pushed {case}"))
    paths["decisions"].parent.mkdir(parents=True, exist_ok=True)
    before = '{"version": 1, "labels": {}, "images": {}}\n'  # pre-existing (not canonical) text: must stay as is
    paths["decisions"].write_text(before)
    url = server.url
    if case == "server_down":
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        monkeypatch.setenv(lsmod.URL_ENV, url)
        cause = "cannot connect (connection refused)"
    elif case == "wrong_token":
        monkeypatch.setenv(lsmod.KEY_ENV, "0" * 40)
        cause = "the API key was refused (401)"
    else:
        cause = "no project titled 'never pushed unknown_project' (run `dataengine review labelstudio push` first)"
    key = os.environ[lsmod.KEY_ENV]
    outputs = []
    for action in (lsmod.pull_cli,) + ((lsmod.push_cli,) if case != "unknown_project" else ()):
        assert action(args) == 1
        out = capsys.readouterr()
        outputs += [out.out, out.err]
        assert out.out == ""
        assert out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
        assert out.err.startswith(f"error: Label Studio at {url}: {cause}"), out.err
    assert paths["decisions"].read_text() == before
    _assert_key_nowhere(key, outputs, root)
    _assert_key_nowhere(server.token, outputs, root)


@pytest.mark.server
@pytest.mark.slow
def test_push_max_tasks_then_all_and_config_change(ls_env, capsys):
    from dataengine.config import load_params

    server = ls_env
    root, paths = _tree(server, "maxtasks")
    title = "dataengine review max tasks"
    inputs = load_review_inputs(paths["filtered"], paths["pseudo"], paths["prepared"])
    params = load_params(_params(root / "params.yaml", title, masks=False), ["review"]).review.labelstudio
    first = lsmod.push(inputs, dataclasses.replace(params, max_tasks=2))
    assert first["created_project"] and (first["new"], first["updated"], first["unchanged"]) == (2, 0, 0)
    ls = _sdk(server)
    project, tasks = _project_tasks(ls, title)
    assert "<BrushLabels" not in project.label_config
    assert sorted(t["data"]["file_name"] for t in tasks) == ["a.png", "sub/b.jpg"]  # the two riskiest images
    # All images, now with masks: the config is updated, the old tasks get the brush regions, one task is new.
    second = lsmod.push(inputs, dataclasses.replace(params, masks=True))
    assert second["config_updated"] and (second["new"], second["updated"], second["unchanged"]) == (1, 2, 0)
    project, tasks = _project_tasks(ls, title)
    assert "<BrushLabels" in project.label_config and len(tasks) == 3
    for task in tasks:
        (pred,) = task["predictions"]
        assert sum(r["type"] == "brushlabels" for r in pred["result"]) == 1
    # Pull with no annotation: no decision, an absent decisions file is written as an empty document.
    args = _cli_args(paths, root / "params.yaml")
    assert lsmod.pull_cli(args) == 0
    assert "pulled 0 annotated of 3 tasks" in capsys.readouterr().out
    assert load_decisions(paths["decisions"]) == {"version": 1, "labels": {}, "images": {}}


@pytest.mark.server
@pytest.mark.slow
def test_push_sends_audit_images_after_the_capped_queue_and_pull_reads_them(ls_env, capsys):
    server = ls_env
    root = server.document_root / "audit"
    paths = make_review_tree(root, audit=["sub/b.jpg#0", "a.png#0"])
    title = "dataengine review audit"
    params = root / "params.yaml"
    params.write_text("review:\n  labelstudio:\n"
                      f"    project_title: {json.dumps(title)}\n    masks: false\n    max_tasks: 1\n")
    args = _cli_args(paths, params)
    assert lsmod.push_cli(args) == 0
    out = capsys.readouterr()
    assert "2 new, 0 updated, 0 unchanged tasks (1 of them audit images)" in out.out, out
    ls = _sdk(server)
    _, tasks = _project_tasks(ls, title)
    # max_tasks = 1 cuts the queue (a.png, sub/b.jpg, c.png) to a.png only; the audit then adds sub/b.jpg (a.png#0's
    # image is pushed already), imported after the queue's image. c.png is in neither.
    ordered = sorted(tasks, key=lambda t: t["id"])
    assert [t["data"]["file_name"] for t in ordered] == ["a.png", "sub/b.jpg"]
    a_regions = ordered[0]["predictions"][0]["result"]
    b_regions = {r["id"]: r for r in ordered[1]["predictions"][0]["result"]}
    assert sorted(b_regions) == ["p0", "p1", "p2"]  # the audited accepted label and the image's review labels

    # The reviewer deletes sub/b.jpg's audited label (a reject) and keeps every label of a.png.
    ann = ls.annotations.create(id=ordered[1]["id"], result=[b_regions["p1"], b_regions["p2"]])
    ls.annotations.create(id=ordered[0]["id"], result=a_regions)
    assert lsmod.pull_cli(args) == 0
    assert "pulled 2 annotated of 2 tasks" in capsys.readouterr().out
    labels = load_decisions(paths["decisions"])["labels"]
    assert labels["sub/b.jpg#0"] == {
        "file_name": "sub/b.jpg", "decision": "reject", "source": "labelstudio", "user": server.email,
        "time": lsmod._iso_z(ann.updated_at), "original": {"bbox": [10.0, 10.0, 30.0, 30.0], "class_name": "square"}}
    assert {k: v["decision"] for k, v in labels.items()} == {
        "a.png#0": "accept", "a.png#1": "accept", "sub/b.jpg#0": "reject", "sub/b.jpg#1": "accept",
        "sub/b.jpg#2": "accept"}

    assert lsmod.push_cli(args) == 0  # a re-push adds nothing
    assert "0 new, 0 updated, 2 unchanged tasks (1 of them audit images)" in capsys.readouterr().out
