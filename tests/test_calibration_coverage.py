"""benchmarks/calibration_coverage.py: params it writes, the stage commands it runs, how it counts confuser errors."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dataengine.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("calibration_coverage", ROOT / "benchmarks" / "calibration_coverage.py")
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def _hidden() -> dict:
    return {"images": [{"id": 10, "file_name": "cam0/a.png", "width": 64, "height": 64,
                        "confusers": [[0, 0, 10, 10], [40, 40, 10, 10]]},
                       {"id": 11, "file_name": "cam1/b.PNG", "width": 64, "height": 64, "confusers": []}],
            "categories": CATEGORIES,
            "annotations": [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [40, 40, 10, 10], "area": 100,
                             "iscrowd": 0}]}


def _accepted(boxes: list[tuple[str, int, list[float]]]) -> dict:
    files = sorted({f for f, _, _ in boxes})
    ids = {f: i + 1 for i, f in enumerate(files)}  # the accepted file's own ids, not the hidden ones
    return {"images": [{"id": ids[f], "file_name": f} for f in files], "categories": CATEGORIES,
            "annotations": [{"id": k, "image_id": ids[f], "category_id": c, "bbox": b, "score": 0.95}
                            for k, (f, c, b) in enumerate(boxes)]}


def test_accepted_on_confusers_counts_boxes_on_a_confuser_and_on_no_real_object_of_their_class():
    accepted = _accepted([
        ("cam0/a.png", 1, [0, 0, 10, 10]),    # circle on the first confuser: counted
        ("cam0/a.png", 2, [1, 1, 10, 10]),    # square on it too: counted, for square
        ("cam0/a.png", 1, [40, 40, 10, 10]),  # circle on a real circle that a confuser overlaps: not a confuser error
        ("cam0/a.png", 2, [40, 40, 10, 10]),  # square there: no real square, on a confuser: counted
        ("cam1/b.PNG", 1, [5, 5, 10, 10]),    # background, no confuser: not counted
    ])
    assert cc.accepted_on_confusers(accepted, _hidden()) == {"circle": 1, "square": 2, "overall": 3}


def test_accepted_on_confusers_matches_classes_by_name_not_id():
    accepted = _accepted([("cam0/a.png", 7, [0, 0, 10, 10]), ("cam0/a.png", 7, [40, 40, 10, 10])])
    accepted["categories"] = [{"id": 7, "name": "circle"}, {"id": 8, "name": "square"}]
    # The second circle sits on the real circle (hidden id 1): not a confuser error once 7 is read as circle.
    assert cc.accepted_on_confusers(accepted, _hidden()) == {"circle": 1, "square": 0, "overall": 1}


def test_accepted_on_confusers_names_images_and_classes_the_hidden_labels_lack():
    with pytest.raises(ValueError, match="cam9/x.png"):
        cc.accepted_on_confusers(_accepted([("cam9/x.png", 1, [0, 0, 4, 4])]), _hidden())
    accepted = _accepted([("cam0/a.png", 1, [0, 0, 4, 4])])
    accepted["categories"] = [{"id": 1, "name": "hexagon"}]
    with pytest.raises(ValueError, match="hexagon"):
        cc.accepted_on_confusers(accepted, _hidden())


def test_write_params_sets_only_the_rate_and_refuses_a_bad_one(tmp_path: Path):
    out = cc.write_params(ROOT / "params.yaml", 0.2, tmp_path / "p.yaml")
    written, base = yaml.safe_load(out.read_text()), yaml.safe_load((ROOT / "params.yaml").read_text())
    assert load_params(out).data.demo.general_confuser_rate == 0.2
    written["data"]["demo"]["general_confuser_rate"] = base["data"]["demo"]["general_confuser_rate"]
    assert written == base
    with pytest.raises(ParamsError, match="general_confuser_rate"):
        cc.write_params(ROOT / "params.yaml", -1.0, tmp_path / "bad.yaml")


def test_stage_commands_pass_the_same_options_as_dvc_yaml(tmp_path: Path):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = cc.stage_commands(tmp_path / "p.yaml", tmp_path / "run")
    assert [name for name, _, _ in commands] == ["prepare", "train_teacher", "pseudo_label", "filter"]
    for name, _, cmd in commands:
        dvc_cmd = shlex.split(stages[name]["cmd"])
        assert cmd[1] == dvc_cmd[1]  # the stage's script
        assert [a for a in cmd[2:] if a.startswith("--")] == [a for a in dvc_cmd[2:] if a.startswith("--")], name


def test_write_params_with_a_seed_sets_the_teacher_seed_too(tmp_path: Path):
    out = cc.write_params(ROOT / "params.yaml", 0.8, tmp_path / "p.yaml", seed=2)
    written, base = yaml.safe_load(out.read_text()), yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(out)
    assert (params.data.demo.general_confuser_rate, params.teacher.train.seed) == (0.8, 2)
    written["data"]["demo"]["general_confuser_rate"] = base["data"]["demo"]["general_confuser_rate"]
    written["teacher"]["train"]["seed"] = base["teacher"]["train"]["seed"]
    assert written == base


def test_the_params_own_seed_keeps_the_old_run_folder_and_others_get_their_own(tmp_path: Path):
    assert cc.run_dir(tmp_path, 0.0, 3, 3) == tmp_path / "rate0"
    assert cc.run_dir(tmp_path, 0.8, 1, 3) == tmp_path / "rate0.8_seed1"


def test_seed_spread_skips_undefined_precision_and_gives_min_mean_max():
    runs = {"0": {"per_class": {"cross": {"true_precision": None, "true_recall": 0.0},
                                "star": {"true_precision": 0.75, "true_recall": 0.5}}},
            "1": {"per_class": {"cross": {"true_precision": 0.5, "true_recall": 0.25},
                                "star": {"true_precision": 0.85, "true_recall": 0.4}}}}
    spread = cc.seed_spread(runs)
    assert spread["cross"] == {"true_precision": [0.5, 0.5, 0.5], "true_recall": [0.0, 0.125, 0.25]}
    assert spread["star"]["true_precision"] == [0.75, 0.8, 0.85]


def test_seeds_without_the_params_own_seed_stop_before_any_work(tmp_path: Path):
    run = subprocess.run([sys.executable, "benchmarks/calibration_coverage.py", "--seeds", "5", "6",
                          "--work", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "teacher.train.seed 0" in run.stderr and "--seeds [5, 6]" in run.stderr
    assert not (tmp_path / "w").exists()
