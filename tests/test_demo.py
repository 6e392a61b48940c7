"""The synthetic demo dataset: deterministic, complete layout, boxes = masks = semantic pixels = drawn pixels,
long tail, confusers only as metadata, empty images, scenario-folder contract."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.config import DemoParams
from dataengine.data.coco import annotation_to_mask, load_coco
from dataengine.data.demo import (
    CLASS_NAMES,
    CONFUSER_OF,
    GENERAL,
    SCENARIO,
    DomainStyle,
    _coverage,
    demo_cli,
    generate_demo,
    sample_layout,
    split_layouts,
)
from dataengine.data.images import list_images, read_image
from dataengine.data.layout import PreparedLayout
from dataengine.data.validate import validate_coco, validate_image_folder
from dataengine.io import read_json

SMALL = DemoParams(seed=3, image_size=96, n_train=12, n_val=6, n_pool=12, n_test=6)


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> PreparedLayout:
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, SMALL, progress=False)
    return PreparedLayout(root)


def _labelled_splits(layout: PreparedLayout) -> list[tuple[str, Path, Path]]:
    return [("train", layout.general_train, layout.general_images), ("val", layout.general_val, layout.general_images),
            ("test", layout.test_json, layout.test_images)]


def test_same_seed_gives_identical_files_and_another_seed_does_not(demo: PreparedLayout, tmp_path: Path) -> None:
    generate_demo(tmp_path / "again", SMALL, progress=False)
    first, second = _hashes(demo.root), _hashes(tmp_path / "again")
    assert first == second
    # 12 + 6 + 12 + 6 images, 12 + 6 + 6 semantic PNGs, 4 COCO files, summary, preview.
    assert len(first) == 36 + 24 + 4 + 2
    generate_demo(tmp_path / "other", DemoParams(**{**SMALL.__dict__, "seed": 4}), progress=False)
    other = _hashes(tmp_path / "other")
    assert other.keys() == first.keys()
    assert other["general/train.json"] != first["general/train.json"]


def test_layout_is_complete_and_valid(demo: PreparedLayout) -> None:
    for _, json_path, root in _labelled_splits(demo):
        report = validate_coco(json_path, root)
        assert report.ok, report.format()
    report = validate_coco(demo.pool_hidden, demo.pool_images)
    assert report.ok, report.format()
    good, folder_report = validate_image_folder(demo.pool_images)
    assert folder_report.ok and len(good) == SMALL.n_pool
    train = load_coco(demo.general_train)
    assert [(c["id"], c["name"]) for c in train["categories"]] == list(enumerate(CLASS_NAMES, start=1))
    ids = [img["id"] for split in ("general_train", "general_val", "pool_hidden", "test_json")
           for img in load_coco(getattr(demo, split))["images"]]
    assert len(ids) == len(set(ids)) == 36  # image ids unique across splits
    summary = read_json(demo.root / "demo_summary.json")
    assert summary["seed"] == 3 and summary["splits"]["train"]["instances"] == len(train["annotations"])
    with Image.open(demo.root / "preview.png") as preview:
        assert preview.size == (2 * 4 * 160 + 16, 4 * 160)


def test_boxes_masks_and_semantic_pixels_agree(demo: PreparedLayout) -> None:
    for split, json_path, root in _labelled_splits(demo):
        coco = load_coco(json_path)
        by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            by_image[ann["image_id"]].append(ann)
        for img in coco["images"]:
            assert read_image(root / img["file_name"]).shape == (96, 96, 3)
            semantic = np.asarray(Image.open(root / img["semantic_file"]))
            assert semantic.shape == (96, 96) and semantic.dtype == np.uint8
            expected = np.zeros_like(semantic)
            for ann in by_image[img["id"]]:
                mask = annotation_to_mask(ann, 96, 96).astype(bool)
                ys, xs = np.nonzero(mask)
                # The box is the mask's box, exactly (whole pixels, COCO's x + w is one past the last column).
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], ann
                assert ann["area"] == mask.sum()
                assert not expected[mask].any()  # instance masks never overlap
                expected[mask] = ann["category_id"]
            # Exactly the objects: confusers and clutter are background (0).
            np.testing.assert_array_equal(semantic, expected, err_msg=f"{split} {img['file_name']}")


def test_drawn_pixels_match_the_polygon_masks() -> None:
    layouts = split_layouts(SMALL, "test") + split_layouts(SMALL, "train")
    shapes = [s for layout in layouts for s in layout.objects + layout.confusers]
    assert len(shapes) > 30
    for shape in shapes:
        cov, x0, y0 = _coverage(shape, 96)
        drawn = np.zeros((96, 96), dtype=np.float32)
        drawn[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]] = cov
        mask = shape.mask(96).astype(bool)
        # The shape's colour dominates exactly the mask pixels; edges are anti-aliased, the inside is solid.
        np.testing.assert_array_equal(drawn >= 0.5, mask, err_msg=shape.kind)
        assert ((drawn > 0) & (drawn < 1)).any() and (drawn == 1).sum() >= 0.3 * mask.sum(), shape.kind


def test_label_only_layouts_are_what_generation_writes(demo: PreparedLayout) -> None:
    layouts = split_layouts(SMALL, "test")
    coco = load_coco(demo.test_json)
    polygons = [ann["segmentation"][0] for ann in coco["annotations"]]
    assert polygons == [s.polygon.ravel().tolist() for layout in layouts for s in layout.objects]
    assert [img["confusers"] for img in coco["images"]] == [[c.coco_bbox(96) for c in layout.confusers]
                                                            for layout in layouts]


def test_default_train_split_has_a_long_tail() -> None:
    layouts = split_layouts(DemoParams(), "train")
    counts = Counter(obj.kind for layout in layouts for obj in layout.objects)
    total = sum(counts.values())
    shares = [counts[name] / total for name in CLASS_NAMES]
    assert len(layouts) == 600 and 1200 < total < 1800  # 1-4 objects per image, a few dropped by placement
    assert min(shares) <= 0.05 and counts["cross"] >= 20  # rare, still learnable
    assert shares[0] >= 0.3
    assert all(1 <= len(layout.objects) <= 4 and not layout.confusers for layout in layouts)


def test_confusers_are_metadata_not_annotations(demo: PreparedLayout) -> None:
    for path in (demo.test_json, demo.pool_hidden):
        coco = load_coco(path)
        confusers = [box for img in coco["images"] for box in img["confusers"]]
        assert len(confusers) >= 3
        ann_boxes = [ann["bbox"] for ann in coco["annotations"]]
        assert not any(box in ann_boxes for box in confusers)
    for path in (demo.general_train, demo.general_val):
        assert all("confusers" not in img for img in load_coco(path)["images"])
    kinds = Counter(c.kind for layout in split_layouts(DemoParams(seed=0), "pool") for c in layout.confusers)
    assert set(kinds) == set(CONFUSER_OF)  # every confuser shape occurs in a default-size pool


def test_scenario_has_empty_images(demo: PreparedLayout) -> None:
    for path, n in ((demo.pool_hidden, SMALL.n_pool), (demo.test_json, SMALL.n_test)):
        coco = load_coco(path)
        with_objects = {ann["image_id"] for ann in coco["annotations"]}
        assert sum(img["id"] not in with_objects for img in coco["images"]) == round(SCENARIO.empty_rate * n) == 1
    pool = split_layouts(DemoParams(), "pool")
    assert sum(not layout.objects for layout in pool) == 60  # exactly 10 % of 600


def test_pool_is_nested_with_mixed_extensions_and_hidden_labels_cover_it(demo: PreparedLayout) -> None:
    files = list_images(demo.pool_images)
    assert {Path(f).suffix for f in files} == {".png", ".PNG", ".jpg", ".JPG"}
    assert any(f.count("/") >= 2 for f in files)  # cam3/dusk/...
    hidden = load_coco(demo.pool_hidden)
    assert sorted(img["file_name"] for img in hidden["images"]) == files
    assert all("semantic_file" not in img for img in hidden["images"])
    with Image.open(demo.pool_images / files[-1]) as jpeg:
        assert jpeg.format == "JPEG"


def test_scenario_objects_are_smaller_than_general_ones() -> None:
    def median_side(split: str) -> float:
        layouts = split_layouts(DemoParams(n_train=100, n_test=100), split)
        return float(np.median([max(s.xyxy[2] - s.xyxy[0], s.xyxy[3] - s.xyxy[1])
                                for layout in layouts for s in layout.objects]))

    assert median_side("test") < 0.85 * median_side("train")  # size ranges 10-36 vs 14-48 px


def test_sample_layout_respects_counts_and_spacing() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        layout = sample_layout(rng, SCENARIO, 128)
        assert 1 <= len(layout.objects) <= 6 and len(layout.confusers) <= 3
        masks = [s.mask(128).astype(bool) for s in layout.objects + layout.confusers]
        assert sum(m.sum() for m in masks) == np.logical_or.reduce(masks + [np.zeros((128, 128), bool)]).sum()
        for s in layout.objects + layout.confusers:
            x1, y1, x2, y2 = s.xyxy
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
    assert sample_layout(rng, SCENARIO, 128, empty=True).objects == ()


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class_shares"):
        DomainStyle(objects=(1, 2), empty_rate=0.0, size_range=(10, 20), class_shares=(0.5, 0.5))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        generate_demo(tmp_path / "neg", DemoParams(seed=-1, n_train=1, n_val=1, n_pool=1, n_test=1), progress=False)
    assert GENERAL.confuser_rate == 0.0 and GENERAL.empty_rate == 0.0  # confusers and empties are scenario-only


def test_cli_writes_a_dataset_and_refuses_out_of_range_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert demo_cli([str(tmp_path / "d"), "--image-size", "64", "--n-train", "2", "--n-val", "1", "--n-pool", "2",
                     "--n-test", "1"]) == 0
    assert len(load_coco(tmp_path / "d/general/train.json")["images"]) == 2
    assert demo_cli([str(tmp_path / "e"), "--image-size", "16"]) == 2
    assert "image_size" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_general_confuser_rate_puts_unlabelled_lookalikes_in_the_general_set_only(demo: PreparedLayout,
                                                                                   tmp_path: Path) -> None:
    params = DemoParams(**{**SMALL.__dict__, "general_confuser_rate": 1.5})
    summary = generate_demo(tmp_path / "g", params, progress=False)
    layout = PreparedLayout(tmp_path / "g")
    assert summary["styles"]["general"]["confuser_rate"] == 1.5
    assert summary["splits"]["train"]["confusers"] > 0 and summary["splits"]["val"]["confusers"] > 0
    # Confusers are background: the general labels list the same classes as the images' objects, none for them.
    layouts = split_layouts(params, "train")
    train = load_coco(layout.general_train)
    assert len(train["annotations"]) == sum(len(lay.objects) for lay in layouts)
    assert sum(len(img.get("confusers", [])) for img in train["images"]) == sum(len(lay.confusers) for lay in layouts)
    # The scenario does not move: same pool and test files as with general_confuser_rate 0.
    before, after = _hashes(demo.root), _hashes(layout.root)
    scenario = [name for name in before if name.startswith("scenario/")]
    assert scenario and all(before[name] == after[name] for name in scenario)
    assert any(before[name] != after[name] for name in before if name.startswith("general/"))
    assert demo_cli([str(tmp_path / "h"), "--image-size", "64", "--n-train", "2", "--n-val", "1", "--n-pool", "1",
                     "--n-test", "1", "--general-confuser-rate", "-1"]) == 2
