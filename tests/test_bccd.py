"""BCCD's semi-supervised split on the real data: nested labelled fractions, determinism, disjoint splits, counts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dataengine.config import BccdParams
from dataengine.data.bccd import prepare_bccd, select_labelled, split_labelled
from dataengine.data.coco import load_coco
from dataengine.data.layout import PreparedLayout
from dataengine.data.validate import validate_coco

BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd"
needs_bccd = pytest.mark.skipif(not (BCCD / "annotations" / "train.json").is_file(),
                                reason=f"real BCCD data not found at {BCCD} (the shared data folder beside the repo)")
N_TRAIN, N_VAL, N_TEST = 205, 87, 72
N_INSTANCES = 2804 + 1137 + 945


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_state() -> dict[str, tuple[int, float]]:
    return {p.relative_to(BCCD).as_posix(): (p.stat().st_size, p.stat().st_mtime) for p in BCCD.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedLayout, dict]:
    if not BCCD.is_dir():
        pytest.skip(f"real BCCD data not found at {BCCD}")
    before = _source_state()
    out = tmp_path_factory.mktemp("bccd")
    summary = prepare_bccd(BCCD, out, BccdParams(), progress=False)
    assert _source_state() == before  # the source is only read
    return PreparedLayout(out), summary


def test_labelled_fractions_are_nested_and_seeded() -> None:
    ids = list(range(100, 305))
    subsets = [select_labelled(ids, f, seed=0) for f in (0.01, 0.1, 0.25, 0.5, 1.0)]
    assert [len(s) for s in subsets] == [2, 20, 51, 102, 205]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) < set(large)
    assert select_labelled(reversed(ids), 0.25, seed=0) == subsets[2]  # input order does not matter
    assert select_labelled(ids, 0.25, seed=1) != subsets[2]


def test_labelled_split_keeps_one_image_on_each_side() -> None:
    assert split_labelled([7, 8], 0.0, seed=0)[1] != [] and len(split_labelled([7, 8], 0.9, seed=0)[0]) == 1
    train, val = split_labelled(range(51), 0.2, seed=0)
    assert len(val) == 10 and len(train) == 41 and not set(train) & set(val)
    with pytest.raises(ValueError, match="fraction"):
        select_labelled(range(10), 0.0, seed=0)


def test_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_bccd(tmp_path / "nowhere", tmp_path / "out", BccdParams(), progress=False)


@needs_bccd
def test_splits_are_disjoint_and_add_up(prepared: tuple[PreparedLayout, dict]) -> None:
    layout, summary = prepared
    files = {name: load_coco(path) for name, path in (("train", layout.general_train), ("val", layout.general_val),
                                                       ("pool", layout.pool_hidden), ("test", layout.test_json))}
    names = {name: {img["file_name"] for img in coco["images"]} for name, coco in files.items()}
    for a in names:
        for b in names:
            assert a == b or not names[a] & names[b], (a, b)
    assert len(names["train"]) == 41 and len(names["val"]) == 10  # 25 % of 205 = 51, 20 % of it held out
    assert len(names["train"]) + len(names["val"]) + len(names["pool"]) == N_TRAIN + N_VAL
    assert len(names["test"]) == N_TEST
    assert sum(len(coco["annotations"]) for coco in files.values()) == N_INSTANCES
    labelled = {img["id"] for name in ("train", "val") for img in files[name]["images"]}
    assert sorted(labelled) == summary["labelled_image_ids"]
    assert labelled <= {img["id"] for img in load_coco(BCCD / "annotations" / "train.json")["images"]}
    assert all("semantic_file" not in img for coco in files.values() for img in coco["images"])
    assert summary["splits"]["scenario_pool"]["images"] == N_TRAIN + N_VAL - 51


@needs_bccd
def test_images_are_copied_and_files_are_valid(prepared: tuple[PreparedLayout, dict]) -> None:
    layout, _ = prepared
    pool_files = sorted(p.name for p in layout.pool_images.iterdir())
    assert pool_files == sorted(img["file_name"] for img in load_coco(layout.pool_hidden)["images"])
    for json_path, root in ((layout.general_train, layout.general_images), (layout.general_val, layout.general_images),
                            (layout.pool_hidden, layout.pool_images), (layout.test_json, layout.test_images)):
        report = validate_coco(json_path, root, check_images=False)
        assert report.ok, report.format()
        first = load_coco(json_path)["images"][0]["file_name"]
        assert _digest(root / first) == _digest(BCCD / "images" / first)
        assert not (root / first).is_symlink()


@needs_bccd
def test_same_params_give_identical_files(prepared: tuple[PreparedLayout, dict], tmp_path: Path) -> None:
    layout, summary = prepared
    again = PreparedLayout(tmp_path / "again")
    assert prepare_bccd(BCCD, again.root, BccdParams(), progress=False) == summary
    for name in ("general_train", "general_val", "pool_hidden", "test_json"):
        assert _digest(getattr(again, name)) == _digest(getattr(layout, name)), name
    smaller = prepare_bccd(BCCD, tmp_path / "small", BccdParams(labelled_fraction=0.1), progress=False)
    assert set(smaller["labelled_image_ids"]) < set(summary["labelled_image_ids"])
    assert len(smaller["labelled_image_ids"]) == 20
