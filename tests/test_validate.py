"""Validation finds one of each defect with the right code and id, nothing for good entries, and changes nothing."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dataengine.data.validate import (
    BOX_TOLERANCE,
    Defect,
    ValidationReport,
    _rle_run_counts,
    split_bad,
    validate_cli,
    validate_coco,
    validate_image_folder,
)
from dataengine.io import read_json


def _png(path: Path, width: int = 16, height: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(path)


def _jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


GOOD_IMAGES = {1, 2, 3}
GOOD_ANNS = {100, 101, 102, 103}
# (code, kind, id) of every planted defect, and nothing else.
EXPECTED = {
    ("missing_image", "image", 10),
    ("unreadable_image", "image", 11),
    ("truncated_image", "image", 12),
    ("zero_size_image", "image", 13),
    ("path_escape", "image", 14),  # symlink out of the root
    ("path_escape", "image", 15),  # ../outside.png
    ("path_escape", "image", 16),  # absolute path
    ("size_mismatch", "image", 17),
    ("duplicate_image_id", "image", 18),
    ("nan_box", "annotation", 200),
    ("box_outside_image", "annotation", 201),
    ("zero_area_box", "annotation", 202),
    ("unknown_category", "annotation", 203),
    ("duplicate_annotation_id", "annotation", 205),
    ("unknown_image_id", "annotation", 206),
    ("bad_box", "annotation", 207),
    ("bad_segmentation", "annotation", 208),  # RLE size differs from the image
    ("bad_segmentation", "annotation", 209),  # RLE runs fall short
    ("bad_segmentation", "annotation", 211),  # polygon of 2 points
}


def _build(tmp_path: Path, *, dup_category: bool = True) -> tuple[Path, Path, dict[str, Any]]:
    """A dataset with ONE of each defect: ``(coco_json, image_root, coco)``; the JSON sits next to images/."""
    ds = tmp_path / "ds"
    root = ds / "images"
    _png(root / "good1.png")
    (root / "good2.jpg").write_bytes(_jpeg_bytes(16))
    _png(root / "sub" / "good3.PNG")
    (root / "notimage.png").write_text("hello")
    jpeg = _jpeg_bytes(64)
    (root / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.png").write_bytes(b"")
    _png(tmp_path / "outside.png")
    _png(ds / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    _png(root / "small.png")
    _png(root / "dup_a.png")
    _png(root / "dup_b.png")

    def img(i: int, name: str, w: int = 16, h: int = 16) -> dict[str, Any]:
        return {"id": i, "file_name": name, "width": w, "height": h}

    images = [img(1, "good1.png"), img(2, "good2.jpg"), img(3, "sub/good3.PNG"),
              img(10, "missing.png"), img(11, "notimage.png"), img(12, "trunc.jpg", 64, 64), img(13, "empty.png"),
              img(14, "link.png"), img(15, "../outside.png"), img(16, str(tmp_path / "outside.png")),
              img(17, "small.png", 32, 32), img(18, "dup_a.png"), img(18, "dup_b.png")]
    mask = np.zeros((16, 16), bool)
    mask[2:6, 3:9] = True

    def ann(i: int, image_id: Any, bbox: Any, cat: int = 1, **extra: Any) -> dict[str, Any]:
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **extra}

    short = _rle(mask)
    short["counts"] = _rle(mask[:8])["counts"]  # runs for 8 rows under a 16-row size
    annotations = [
        ann(100, 1, [2, 2, 8, 8]),
        ann(101, 2, [1, 1, 4, 4], cat=2, segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]]),
        ann(102, 3, [3, 2, 6, 4], segmentation=_rle(mask), iscrowd=1),
        ann(103, 3, [0, 0, 16 + BOX_TOLERANCE / 2, 16]),  # inside the rounding tolerance: fine
        ann(200, 1, [1, float("nan"), 2, 2]),
        ann(201, 1, [10, 10, 10, 10]),
        ann(202, 1, [1, 1, 0, 5]),
        ann(203, 1, [1, 1, 2, 2], cat=99),
        ann(205, 2, [1, 1, 2, 2]),
        ann(205, 2, [2, 2, 2, 2]),
        ann(206, 999, [1, 1, 2, 2]),
        ann(207, 1, [1, 2, 3]),
        ann(208, 1, [3, 2, 6, 4], segmentation=_rle(np.zeros((8, 8), bool))),
        ann(209, 1, [3, 2, 6, 4], segmentation=short),
        ann(210, 10, [1, 1, 2, 2]),  # fine itself, but on the missing image
        ann(211, 2, [1, 1, 2, 2], segmentation=[[1, 1, 2, 2]]),
    ]
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "rbc"}]
    if dup_category:
        categories.append({"id": 2, "name": "platelet"})
    coco = {"images": images, "annotations": annotations, "categories": categories}
    path = ds / "train.json"
    path.write_text(json.dumps(coco))  # NaN is written as the bare token NaN, as Python's json does
    return path, root, coco


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            out[str(p)] = (b"" if p.is_symlink() else p.read_bytes(), p.lstat().st_mtime_ns)
    return out


def _codes(report: ValidationReport) -> set[tuple[str, str, Any]]:
    return {(d.code, d.kind, d.id) for d in report.defects}


def test_every_defect_reported_once_with_code_and_id(tmp_path: Path) -> None:
    path, root, _ = _build(tmp_path)
    before = _snapshot(tmp_path)
    report = validate_coco(path, root)
    assert _snapshot(tmp_path) == before
    assert _codes(report) == EXPECTED | {("duplicate_category_id", "category", 2)}
    assert len(report.defects) == len(EXPECTED) + 1  # nothing reported twice
    assert report.counts == {"images": 13, "annotations": 16, "categories": 3}
    assert not report.ok
    by = {(d.code, d.id): d for d in report.defects}
    assert by[("duplicate_image_id", 18)].file == "dup_b.png"
    assert by[("nan_box", 200)].file == "good1.png"  # annotation defects name their image
    assert "32 x 32" in by[("size_mismatch", 17)].reason and "16 x 16" in by[("size_mismatch", 17)].reason
    assert "symlink" in by[("path_escape", 14)].reason
    assert json.loads(json.dumps(report.to_dict()))["by_code"]["path_escape"] == 3


def test_json_only_check_skips_files_but_not_paths(tmp_path: Path) -> None:
    path, root, _ = _build(tmp_path)
    report = validate_coco(path, root, check_images=False)
    image_codes = {c for c, kind, _ in _codes(report) if kind == "image"}
    assert image_codes == {"path_escape", "duplicate_image_id"}
    assert {i for c, _, i in _codes(report) if c == "path_escape"} == {14, 15, 16}  # symlinks resolve on disk
    assert {x for x in _codes(report) if x[1] == "annotation"} == {x for x in EXPECTED if x[1] == "annotation"}


def test_not_coco_json_is_one_file_defect(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"images": [')
    report = validate_coco(tmp_path / "x.json", tmp_path)
    assert [(d.kind, d.code) for d in report.defects] == [("file", "bad_json")]
    with pytest.raises(ValueError, match="cannot be skipped"):
        split_bad({}, report)


def test_missing_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        validate_coco(tmp_path / "nope.json", tmp_path)
    (tmp_path / "c.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(FileNotFoundError, match="image root"):
        validate_coco(tmp_path / "c.json", tmp_path / "absent")


def test_split_bad_drops_exactly_the_bad_entries_and_never_mutates(tmp_path: Path) -> None:
    path, root, coco = _build(tmp_path, dup_category=False)
    report = validate_coco(path, root)
    assert _codes(report) == EXPECTED
    original = copy.deepcopy(coco)
    clean, quarantine = split_bad(coco, report)
    assert coco == original
    assert [i["id"] for i in clean["images"]] == [1, 2, 3]
    assert [a["id"] for a in clean["annotations"]] == [100, 101, 102, 103]
    assert clean["categories"] == coco["categories"]
    assert len(quarantine) == len(EXPECTED) + 1
    assert {q["code"] for q in quarantine} == {c for c, _, _ in EXPECTED} | {"dropped_with_image"}
    dropped = [q for q in quarantine if q["code"] == "dropped_with_image"]
    assert dropped == [{"file": "missing.png", "kind": "annotation", "id": 210, "code": "dropped_with_image",
                        "reason": "its image 10 was quarantined"}]
    assert set(quarantine[0]) == {"file", "kind", "id", "code", "reason"}
    # The clean set validates clean (the quarantined files are still there, but no longer referenced).
    clean_path = tmp_path / "ds" / "clean.json"
    clean_path.write_text(json.dumps(clean))
    assert validate_coco(clean_path, root).ok
    clean["images"][0]["width"] = 999
    assert coco["images"][0]["width"] == 16  # a deep copy


def test_split_bad_refuses_category_defects(tmp_path: Path) -> None:
    path, root, coco = _build(tmp_path)
    with pytest.raises(ValueError, match="duplicate_category_id"):
        split_bad(coco, validate_coco(path, root))


def test_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    _png(root / "a.png")
    _png(root / "sub" / "deeper" / "B.JPG")
    (root / "empty.webp").parent.mkdir(exist_ok=True)
    (root / "empty.webp").write_bytes(b"")
    jpeg = _jpeg_bytes(64)
    (root / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.bmp").write_text("not an image")
    _png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    before = _snapshot(tmp_path)
    good, report = validate_image_folder(root)
    assert _snapshot(tmp_path) == before
    assert good == ["a.png", "sub/deeper/B.JPG"]
    assert {(d.file, d.code) for d in report.defects} == {
        ("empty.webp", "zero_size_image"), ("cut.jpeg", "truncated_image"), ("text.bmp", "unreadable_image"),
        ("link.png", "path_escape")}
    assert report.counts == {"images": 6}


def test_empty_image_folder_is_clean(tmp_path: Path) -> None:
    good, report = validate_image_folder(tmp_path)
    assert good == [] and report.ok and report.counts == {"images": 0}


def test_format_one_line_per_defect_plus_summary() -> None:
    report = ValidationReport("c.json", [Defect("a.png", "image", 1, "missing_image", "a.png: missing"),
                                          Defect("b.png", "annotation", 7, "nan_box", "bbox holds NaN")],
                              counts={"images": 2, "annotations": 1, "categories": 1})
    lines = report.format().splitlines()
    assert len(lines) == 4
    assert lines[1].split()[:4] == ["a.png", "image", "1", "missing_image"]
    assert lines[-1] == ("2 defects in c.json (2 images, 1 annotations, 1 categories checked): "
                         "missing_image 1, nan_box 1")
    assert ValidationReport("c.json").format().startswith("OK: no defects in c.json")


def test_cli_reports_defects_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = _build(tmp_path)
    before = _snapshot(tmp_path / "ds")
    out = tmp_path / "report.json"
    assert validate_cli([str(path), "--json", str(out)]) == 1  # image root defaults to images/ next to the JSON
    assert _snapshot(tmp_path / "ds") == before
    printed = capsys.readouterr().out
    for code, _, entry_id in EXPECTED:
        assert any(code in line and f" {entry_id} " in line for line in printed.splitlines()), (code, entry_id)
    assert len(printed.splitlines()) == 1 + len(EXPECTED) + 1 + 1  # header, defects, summary
    assert len(read_json(out)["defects"]) == len(EXPECTED) + 1


def test_cli_clean_dataset_exits_0_and_usage_errors_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 16, 16]}],
            "categories": [{"id": 1, "name": "cell"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert validate_cli([str(tmp_path / "c.json")]) == 0  # no images/ folder: the JSON's own folder
    assert capsys.readouterr().out.startswith("OK")
    assert validate_cli([str(tmp_path)]) == 0  # an image folder
    assert validate_cli([str(tmp_path / "missing.json")]) == 2
    assert validate_cli([str(tmp_path / "c.json"), "--images", str(tmp_path / "absent")]) == 2
    assert validate_cli([str(tmp_path), "--no-images"]) == 2
    assert validate_cli(["--bogus"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_rle_run_counts_match_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        runs = _rle_run_counts(_rle(mask)["counts"])
        assert sum(runs) == h * w
        assert sum(runs[1::2]) == mask.sum()
