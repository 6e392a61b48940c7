"""VOC and YOLO folders convert to exactly the expected COCO values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.boxes import coco_to_xyxy, xyxy_to_yolo
from dataengine.data.importers import ImportFormatError, import_voc, import_yolo
from dataengine.data.validate import import_cli, validate_coco
from dataengine.io import read_json


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)


def _voc_object(name: str, box: tuple[str, str, str, str], difficult: str | None = None) -> str:
    diff = f"<difficult>{difficult}</difficult>" if difficult is not None else ""
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name>{diff}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _voc(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    _image(root / "JPEGImages" / "a.jpg", 20, 10)
    _image(root / "JPEGImages" / "b.png", 16, 16)
    _image(root / "JPEGImages" / "c.jpg", 8, 8)  # no XML: an image without objects
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>20</width><height>10</height><depth>3</depth></size>"
        + _voc_object("dog", ("1", "2", "11", "7"), "1") + _voc_object("cat", ("0", "0", "20", "10"), "0")
        + "</annotation>")
    (root / "Annotations" / "b.xml").write_text(  # size 0 (some exporters): read from the image header
        "<annotation><filename>b.png</filename><size><width>0</width><height>0</height></size>"
        + _voc_object(" cat ", ("1.5", "2.25", "9.5", "16")) + "</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("b\n")
    return root


def _assert_coco(actual: dict, expected: dict) -> None:
    """Equal, with boxes and areas compared within 1e-6."""
    assert actual["categories"] == expected["categories"]
    assert actual["images"] == expected["images"]
    assert len(actual["annotations"]) == len(expected["annotations"])
    for got, want in zip(actual["annotations"], expected["annotations"]):
        np.testing.assert_allclose(got["bbox"], want["bbox"], atol=1e-6)
        assert got["area"] == pytest.approx(want["area"], abs=1e-6)
        rest = {k: v for k, v in got.items() if k not in ("bbox", "area")}
        assert rest == {k: v for k, v in want.items() if k not in ("bbox", "area")}


def _cats(*names: str) -> list[dict]:
    return [{"id": i, "name": n, "supercategory": "object"} for i, n in enumerate(names, start=1)]


def test_voc_to_coco_exact(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    out = tmp_path / "out" / "voc.json"
    coco = import_voc(root, out)
    _assert_coco(coco, {
        "categories": _cats("cat", "dog"),
        "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10},
                   {"id": 2, "file_name": "b.png", "width": 16, "height": 16},
                   {"id": 3, "file_name": "c.jpg", "width": 8, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0, "difficult": 1},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10], "area": 200, "iscrowd": 0,
             "difficult": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1.5, 2.25, 8, 13.75], "area": 110, "iscrowd": 0,
             "difficult": 0},
        ]})
    assert read_json(out) == coco
    assert validate_coco(out, root / "JPEGImages").ok


def test_voc_options(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    coco = import_voc(root, None, classes=["dog", "cat", "bird"], one_based=True)
    assert coco["categories"] == _cats("dog", "cat", "bird")
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2, 2]
    np.testing.assert_allclose(coco["annotations"][0]["bbox"], [0, 1, 11, 6])  # detectron2's xmin-1, ymin-1
    split = import_voc(root, None, split="train", image_root=root)
    assert [i["file_name"] for i in split["images"]] == ["JPEGImages/b.png"]
    with pytest.raises(ImportFormatError, match=r"\['dog'\] are not in the given classes"):
        import_voc(root, None, classes=["cat"])


@pytest.mark.parametrize(("xml", "message"), [
    ("<annotation><filename>a.jpg</filename>", r"a\.xml: line 1, column \d+: not valid XML"),
    ("<annotation><filename>a.jpg</filename>" + _voc_object("dog", ("1", "x", "3", "4")) + "</annotation>",
     r"a\.xml: object 0 \(dog\): <bndbox/ymin> must be a number, got 'x'"),
    ("<annotation><filename>a.jpg</filename><object><bndbox/></object></annotation>",
     r"a\.xml: object 0: missing <name>"),
    ("<annotation><filename>zz.jpg</filename></annotation>", r"zz\.jpg.* not found"),
])
def test_voc_malformed(tmp_path: Path, xml: str, message: str) -> None:
    root = tmp_path / "voc"
    _image(root / "JPEGImages" / "a.jpg", 4, 4)
    (root / "Annotations").mkdir()
    (root / "Annotations" / ("a.xml" if "zz" not in xml else "zz.xml")).write_text(xml)
    with pytest.raises(ImportFormatError, match=message):
        import_voc(root, None)


def _yolo(tmp_path: Path, names_file: str = "data.yaml") -> Path:
    root = tmp_path / "yolo"
    _image(root / "images" / "train" / "a.png", 20, 10)
    _image(root / "images" / "train" / "b.jpg", 16, 16)  # no label file: no objects
    _image(root / "images" / "val" / "c.PNG", 10, 10)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.5 0.4\n\n1 0.25 0.25 0.1 0.2\n")
    (root / "labels" / "val" / "c.txt").write_text("1 0.1 0.1 0.5 0.1 0.5 0.5\n")  # a segment (triangle)
    if names_file == "data.yaml":
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cell\n  1: rbc\n")
    else:
        (root / names_file).write_text("cell\nrbc\n")
    return root


def test_yolo_to_coco_exact(tmp_path: Path) -> None:
    root = _yolo(tmp_path)
    out = tmp_path / "yolo.json"
    coco = import_yolo(root, out)
    _assert_coco(coco, {
        "categories": _cats("cell", "rbc"),
        "images": [{"id": 1, "file_name": "train/a.png", "width": 20, "height": 10},
                   {"id": 2, "file_name": "train/b.jpg", "width": 16, "height": 16},
                   {"id": 3, "file_name": "val/c.PNG", "width": 10, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 3, 10, 4], "area": 40, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [4, 1.5, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [1, 1, 4, 4], "area": coco["annotations"][2]["area"],
             "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        ]})
    assert 6 <= coco["annotations"][2]["area"] <= 12  # rasterised triangle of area 8
    assert read_json(out) == coco
    assert validate_coco(out, root / "images").ok
    # Round trip: back to YOLO gives the label file's numbers.
    xyxy = coco_to_xyxy(np.array([a["bbox"] for a in coco["annotations"][:2]]))
    np.testing.assert_allclose(xyxy_to_yolo(xyxy, 20, 10), [[0.5, 0.5, 0.5, 0.4], [0.25, 0.25, 0.1, 0.2]], atol=1e-6)


@pytest.mark.parametrize("names_file", ["classes.txt", "obj.names"])
def test_yolo_names_files_and_split(tmp_path: Path, names_file: str) -> None:
    root = _yolo(tmp_path, names_file)
    coco = import_yolo(root, None, split="val", image_root=root)
    assert coco["categories"] == _cats("cell", "rbc")
    assert [i["file_name"] for i in coco["images"]] == ["images/val/c.PNG"]
    assert [a["category_id"] for a in coco["annotations"]] == [2]


def test_yolo_darknet_layout_and_names_list(tmp_path: Path) -> None:
    root = tmp_path / "dk"
    _image(root / "x.jpg", 10, 20)
    (root / "x.txt").write_text("0 0.5 0.5 1 1\n")
    (root / "data.yaml").write_text("names: [only]\n")
    coco = import_yolo(root, None)
    assert coco["images"] == [{"id": 1, "file_name": "x.jpg", "width": 10, "height": 20}]
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 10.0, 20.0]


@pytest.mark.parametrize(("line", "message"), [
    ("0 0.5 0.5 0.5", r"a\.txt: line 2: expected 'class cx cy w h'"),
    ("2 0.5 0.5 0.5 0.5", r"a\.txt: line 2: class 2 is not in 0\.\.1"),
    ("x 0.5 0.5 0.5 0.5", r"a\.txt: line 2: class must be an int"),
    ("0 nan 0.5 0.5 0.5", r"a\.txt: line 2: coordinates must be finite"),
])
def test_yolo_malformed_line(tmp_path: Path, line: str, message: str) -> None:
    root = _yolo(tmp_path)
    (root / "labels" / "train" / "a.txt").write_text(f"0 0.5 0.5 0.5 0.4\n{line}\n")
    with pytest.raises(ImportFormatError, match=message):
        import_yolo(root, None)


def test_yolo_without_names(tmp_path: Path) -> None:
    root = _yolo(tmp_path)
    (root / "data.yaml").unlink()
    with pytest.raises(ImportFormatError, match="no class names"):
        import_yolo(root, None)
    assert len(import_yolo(root, None, classes=["a", "b"])["categories"]) == 2


def test_import_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _yolo(tmp_path)
    out = tmp_path / "cli.json"
    assert import_cli(["yolo", str(root), "--out", str(out)]) == 0
    assert len(read_json(out)["images"]) == 3
    assert import_cli(["voc", str(_voc(tmp_path)), "--out", str(out), "--classes", "cat,dog"]) == 0
    assert [c["name"] for c in read_json(out)["categories"]] == ["cat", "dog"]
    (root / "labels" / "train" / "a.txt").write_text("0 1\n")
    assert import_cli(["yolo", str(root), "--out", str(tmp_path / "bad.json")]) == 1
    assert "a.txt: line 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
    assert import_cli(["yolo", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert import_cli(["coco", str(root), "--out", str(out)]) == 2
