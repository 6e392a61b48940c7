"""Box conversions round-trip exactly; atomic writes never leave partial files; paths cannot escape their root."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataengine import boxes as B
from dataengine.io import PathEscapeError, atomic_write, atomic_write_json, read_json, safe_join

W, H = 640.0, 480.0

coords = st.floats(min_value=0, max_value=400, allow_nan=False, width=32)


@st.composite
def xyxy(draw: st.DrawFn) -> list[float]:
    x1, y1 = draw(coords), draw(coords)
    return [x1, y1, x1 + draw(st.floats(0.5, 200)), y1 + draw(st.floats(0.5, 70))]


def test_coco_known_values() -> None:
    assert B.xyxy_to_coco([10, 20, 30, 60]).tolist() == [10, 20, 20, 40]
    assert B.coco_to_xyxy([10, 20, 20, 40]).tolist() == [10, 20, 30, 60]


def test_relative_percent_yolo_known_values() -> None:
    box = [64, 48, 320, 240]
    np.testing.assert_allclose(B.xyxy_to_relative_xywh(box, W, H), [0.1, 0.1, 0.4, 0.4])
    np.testing.assert_allclose(B.xyxy_to_percent_xywh(box, W, H), [10, 10, 40, 40])
    np.testing.assert_allclose(B.xyxy_to_yolo(box, W, H), [0.3, 0.3, 0.4, 0.4])


@settings(max_examples=200, deadline=None)
@given(xyxy())
def test_round_trips(box: list[float]) -> None:
    b = np.asarray(box)
    np.testing.assert_allclose(B.coco_to_xyxy(B.xyxy_to_coco(b)), b, atol=1e-9)
    np.testing.assert_allclose(B.relative_xywh_to_xyxy(B.xyxy_to_relative_xywh(b, W, H), W, H), b, atol=1e-9)
    np.testing.assert_allclose(B.percent_xywh_to_xyxy(B.xyxy_to_percent_xywh(b, W, H), W, H), b, atol=1e-9)
    np.testing.assert_allclose(B.yolo_to_xyxy(B.xyxy_to_yolo(b, W, H), W, H), b, atol=1e-9)


def test_torch_batches_and_no_mutation() -> None:
    t = torch.tensor([[0.0, 0.0, 10.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    before = t.clone()
    out = B.xyxy_to_percent_xywh(t, 20, 10)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)
    torch.testing.assert_close(B.percent_xywh_to_xyxy(out, 20, 10), t)
    torch.testing.assert_close(t, before)
    empty = torch.zeros((0, 4))
    assert B.xyxy_to_coco(empty).shape == (0, 4)


def test_clip_and_area() -> None:
    clipped = B.clip_xyxy(np.array([[-5, -5, 700, 100]]), W, H)
    assert clipped.tolist() == [[0, 0, 640, 100]]
    assert B.box_area(np.array([[0, 0, 2, 3], [5, 5, 4, 4]])).tolist() == [6, 0]


def test_atomic_write_success_and_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.json"
    atomic_write_json(target, {"a": 1})
    assert read_json(target) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write('{"a": 2, "half')
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"a": 1}, "the previous file must survive a failed write"
    assert [p.name for p in target.parent.iterdir()] == ["m.json"], "no temp file left behind"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask(), "same permissions as a plain open() would give"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_disk_full_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the disk is outside the boundary under test
    with pytest.raises(OSError, match=r"cannot write .*m\.json: No space left"):
        atomic_write_json(target, {"a": 2})
    monkeypatch.undo()
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_write_unwritable_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")  # fails for root too, unlike chmod
    with pytest.raises(OSError, match="cannot write"):
        atomic_write_json(blocker / "x.json", {})


def test_read_json_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(line 1"):
        read_json(bad)


def test_safe_join(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "a" / "ok.png").write_bytes(b"x")
    assert safe_join(root, "a/ok.png") == root / "a" / "ok.png"
    assert safe_join(root, "a/../a/ok.png").name == "ok.png"
    with pytest.raises(PathEscapeError, match="outside the dataset root"):
        safe_join(root, "../outside.png")
    with pytest.raises(PathEscapeError, match="absolute path"):
        safe_join(root, str(tmp_path / "outside.png"))
    with pytest.raises(PathEscapeError, match="symlink"):
        safe_join(root, "link.png")
    with pytest.raises(PathEscapeError, match="empty"):
        safe_join(root, "")
