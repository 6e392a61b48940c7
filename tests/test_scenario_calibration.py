"""benchmarks/scenario_calibration.py: the labelled scenario images it draws, how it samples and scores them."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from dataengine.config import DemoParams
from dataengine.data.demo import generate_demo
from dataengine.io import read_json

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scenario_calibration", ROOT / "benchmarks" / "scenario_calibration.py")
sc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sc)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_labelled_copy_takes_new_scenario_images_as_val_disjoint_from_pool_and_test(tmp_path: Path):
    demo = DemoParams(image_size=64, n_train=3, n_val=2, n_pool=4, n_test=3)
    generate_demo(tmp_path / "prepared", demo, progress=False)
    out = sc.build_labelled_copy(demo, 4, tmp_path / "work", reuse=False, data=tmp_path / "prepared")

    val = read_json(out / "general" / "val.json")
    assert len(val["images"]) == 4 and all(img["file_name"].startswith("scenario_labelled/") for img in val["images"])
    assert all("confusers" not in img for img in val["images"])
    ids = {img["id"] for img in val["images"]}
    assert val["annotations"] and {a["image_id"] for a in val["annotations"]} <= ids
    # The scenario and general train of the copy are the original's; only general val changed.
    assert read_json(out / "scenario" / "test.json") == read_json(tmp_path / "prepared" / "scenario" / "test.json")
    assert read_json(out / "general" / "train.json") == read_json(tmp_path / "prepared" / "general" / "train.json")

    new = {_digest(out / "general" / "images" / img["file_name"]) for img in val["images"]}
    pool = {_digest(p) for p in (tmp_path / "prepared" / "scenario" / "pool").rglob("*") if p.is_file()}
    test = {_digest(p) for p in (tmp_path / "prepared" / "scenario" / "test" / "images").iterdir()}
    assert len(new) == 4 and not new & pool and not new & test
    # They are the generator's scenario test images 3..6 (the same seed, drawn further), with their labels.
    generate_demo(tmp_path / "longer", DemoParams(image_size=64, n_train=1, n_val=1, n_pool=1, n_test=7),
                  progress=False)
    longer = read_json(tmp_path / "longer" / "scenario" / "test.json")
    assert new == {_digest(tmp_path / "longer" / "scenario" / "test" / img["file_name"])
                   for img in longer["images"][3:]}
    assert sorted(a["bbox"] for a in val["annotations"]) == sorted(
        a["bbox"] for a in longer["annotations"] if a["image_id"] in {img["id"] for img in longer["images"][3:]})
    assert not (tmp_path / "work" / "generated").exists()


def test_samples_are_disjoint_and_drop_a_short_remainder():
    files = [f"f{i}" for i in range(7)]
    got = sc.samples(files, 3)
    assert got == [["f0", "f1", "f2"], ["f3", "f4", "f5"]]
    assert sc.samples(files, 8) == []
    with pytest.raises(ValueError, match="got 0"):
        sc.samples(files, 0)


def test_subset_keeps_only_the_sample_and_names_unknown_files():
    coco = {"images": [{"id": 1, "file_name": "a"}, {"id": 2, "file_name": "b"}],
            "annotations": [{"id": 10, "image_id": 1}, {"id": 11, "image_id": 2}], "categories": []}
    preds = {"images": [{"file_name": "a"}, {"file_name": "b"}], "boxes": [{"file_name": "a"}, {"file_name": "b"}],
             "class_names": ["x"]}
    c, p = sc.subset(coco, preds, ["a"])
    assert [a["id"] for a in c["annotations"]] == [10] and p["boxes"] == [{"file_name": "a"}]
    assert p["class_names"] == ["x"] and c["categories"] == []
    with pytest.raises(ValueError, match="zz"):
        sc.subset(coco, preds, ["a", "zz"])


def test_summarise_counts_only_classes_with_20_accepted_and_compares_with_the_bar():
    metrics = {"accepted": 70, "per_class": {"a": {"accepted": 20}, "b": {"accepted": 19}, "c": {"accepted": 31}},
               "true_precision": {"a": 0.849, "b": 0.1, "c": 0.95, "overall": 0.8},
               "true_recall": {"overall": 0.5}}
    s = sc.summarise(metrics, 0.85)
    assert s["lowest"] == 0.849 and s["lowest_class"] == "a" and not s["meets_bar"]
    metrics["true_precision"]["a"] = 0.85
    assert sc.summarise(metrics, 0.85)["meets_bar"]
    metrics["true_precision"] = {"a": None, "b": None, "c": None, "overall": None}
    s = sc.summarise(metrics, 0.85)
    assert s["lowest"] is None and s["lowest_class"] is None and not s["meets_bar"]
