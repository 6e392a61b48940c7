"""benchmarks/tta_scales.py: the params it writes, the stage commands it runs, how it scores the pool's boxes."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from dataengine.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tta_scales", ROOT / "benchmarks" / "tta_scales.py")
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)


def _hidden() -> dict:
    return {"images": [{"id": 10, "file_name": "cam0/a.png", "width": 64, "height": 64},
                       {"id": 11, "file_name": "cam1/b.PNG", "width": 64, "height": 64}],
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}],
            "annotations": [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 11, "category_id": 2, "bbox": [30, 30, 10, 10], "area": 100,
                             "iscrowd": 0}]}


def _box(file_name: str, label: int, xyxy: list[float], score: float) -> dict:
    return {"file_name": file_name, "bbox": xyxy, "label": label, "score": score}


def test_pool_ap50_reads_xyxy_boxes_and_matches_images_and_classes_by_name():
    # The predictions number classes star=0, circle=1: the reverse of the hidden file's ids.
    predictions = {"class_names": ["star", "circle"],
                   "boxes": [_box("cam0/a.png", 1, [10, 10, 30, 30], 0.9),
                             _box("cam1/b.PNG", 0, [30, 30, 40, 40], 0.8)]}
    assert ts.pool_ap50(predictions, _hidden()) == pytest.approx({"circle": 1.0, "star": 1.0, "overall": 1.0})


def test_pool_ap50_ranks_a_false_positive_above_the_object():
    # The star's only true box is outscored by one on the circle's image: precision 1/2 at full recall, and
    # COCO's interpolated precision is 0.5 at every recall point.
    predictions = {"class_names": ["circle", "star"],
                   "boxes": [_box("cam0/a.png", 0, [10, 10, 30, 30], 0.9), _box("cam0/a.png", 1, [0, 0, 8, 8], 0.95),
                             _box("cam1/b.PNG", 1, [30, 30, 40, 40], 0.5)]}
    ap = ts.pool_ap50(predictions, _hidden())
    assert ap["circle"] == pytest.approx(1.0)
    assert ap["star"] == pytest.approx(0.5, abs=0.01)
    assert ap["overall"] == pytest.approx(0.75, abs=0.01)


def test_pool_ap50_names_classes_and_images_the_hidden_labels_lack():
    with pytest.raises(ValueError, match="hexagon"):
        ts.pool_ap50({"class_names": ["hexagon"], "boxes": []}, _hidden())
    with pytest.raises(ValueError, match="cam9/x.png"):
        ts.pool_ap50({"class_names": ["circle"], "boxes": [_box("cam9/x.png", 0, [0, 0, 4, 4], 0.5)]}, _hidden())


def test_parse_scales_and_tag():
    assert ts.parse_scales("1.25,1.5") == (1.25, 1.5)
    assert ts.scale_tag((1.5, 2.0)) == "1.5-2"
    with pytest.raises(SystemExit, match="1,x"):
        ts.parse_scales("1,x")


def test_write_params_sets_only_the_scales_and_refuses_bad_ones(tmp_path: Path):
    out = ts.write_params(ROOT / "params.yaml", (1.25, 1.5), tmp_path / "p.yaml")
    written, base = yaml.safe_load(out.read_text()), yaml.safe_load((ROOT / "params.yaml").read_text())
    assert load_params(out).pseudo_label.tta_scales == (1.25, 1.5)
    written["pseudo_label"]["tta_scales"] = base["pseudo_label"]["tta_scales"]
    assert written == base
    with pytest.raises(ParamsError, match="tta_scales"):
        ts.write_params(ROOT / "params.yaml", (1.0, -1.0), tmp_path / "bad.yaml")
    with pytest.raises(ParamsError, match="different size"):  # 1.0 and 1.05 both give 128 px
        ts.write_params(ROOT / "params.yaml", (1.0, 1.05), tmp_path / "bad.yaml")


def test_commands_pass_the_same_options_as_dvc_yaml(tmp_path: Path):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {"pseudo_label": ts.pseudo_label_command(tmp_path / "p.yaml", tmp_path / "run"),
                "filter": ts.filter_command(tmp_path / "p.yaml", tmp_path / "run", tmp_path / "d.json", tmp_path)}
    for name, cmd in commands.items():
        dvc_cmd = shlex.split(stages[name]["cmd"])
        assert cmd[1] == dvc_cmd[1]  # the stage's script
        options = [a for a in cmd[2:] if a.startswith("--") and a != "--no-progress"]
        assert options == [a for a in dvc_cmd[2:] if a.startswith("--")], name
    other = ts.pseudo_label_command(tmp_path / "p.yaml", tmp_path / "run", Path("t"), Path("d"))
    assert other[other.index("--teacher") + 1] == "t" and other[other.index("--data") + 1] == "d"
    other = ts.filter_command(tmp_path / "p.yaml", tmp_path / "run", tmp_path / "d.json", tmp_path, Path("d"))
    assert other[other.index("--data") + 1] == "d"
