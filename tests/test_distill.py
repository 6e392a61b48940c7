"""Distillation terms (exact where exact), the student's feature adapters, the Trainer's epoch size, and the distill
stage end to end: killed mid-way it leaves no model.pt and resumes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dataengine.config import DistillLossParams
from dataengine.distill import FeatureAdapters, distill_terms, oversample
from dataengine.io import read_json
from dataengine.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ALL_ON = DistillLossParams(cls_kd=1.0, box_kd=1.0, feature=1.0, seg_kd=1.0)


def _outputs(seed: int, b: int = 2, n: int = 21, k: int = 3, reg_max: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"cls_logits": torch.randn(b, n, k, generator=g) * 2, "bbox_dist": torch.randn(b, n, 4 * (reg_max + 1),
                                                                                        generator=g),
            "seg_logits": torch.randn(b, k + 1, 8, 8, generator=g),
            "features": [torch.randn(b, 6, 4, 4, generator=g), torch.randn(b, 6, 2, 2, generator=g)]}


def test_identical_outputs_give_no_distillation_loss() -> None:
    out = _outputs(0)
    terms = distill_terms(out, out, params=ALL_ON, reg_max=7, adapted=out["features"])
    assert set(terms) == {"kd_cls", "kd_box", "kd_feat", "kd_seg"}
    for key, value in terms.items():
        assert abs(float(value)) < 1e-6, key


def test_each_term_grows_when_the_student_departs_from_the_teacher() -> None:
    teacher, student = _outputs(0), _outputs(1)
    near = {k: (v if k == "features" else teacher[k] * 0.9 + student[k] * 0.1) for k, v in teacher.items()}
    far = distill_terms(student, teacher, params=ALL_ON, reg_max=7, adapted=student["features"])
    close = distill_terms(near, teacher, params=ALL_ON, reg_max=7, adapted=teacher["features"])
    for key in ("kd_cls", "kd_box", "kd_seg"):
        assert float(close[key]) < float(far[key]), key
    assert float(far["kd_feat"]) > 0.5  # unrelated features: MSE ~ 2 variances


def test_zero_weights_skip_terms_and_temperature_scales_kd() -> None:
    teacher, student = _outputs(0), _outputs(1)
    terms = distill_terms(student, teacher, params=DistillLossParams(cls_kd=1.0, box_kd=0.0, feature=0.0, seg_kd=0.0),
                          reg_max=7, adapted=student["features"])
    assert set(terms) == {"kd_cls"}
    # Seg KD is KL(teacher || student) * T^2 on softmax(x / T): check T = 1 against torch's formula directly.
    seg = distill_terms(student, teacher, params=DistillLossParams(cls_kd=0, box_kd=0, feature=0, seg_kd=1.0),
                        reg_max=7)["kd_seg"]
    p_t = teacher["seg_logits"].softmax(1)
    expected = (p_t * (p_t.log() - student["seg_logits"].log_softmax(1))).sum(1).mean()
    assert torch.allclose(seg, expected, atol=1e-6)


def test_box_kd_is_kl_of_side_distributions_weighted_by_teacher_score() -> None:
    teacher, student = _outputs(0, b=1, n=2), _outputs(1, b=1, n=2)
    teacher["cls_logits"] = torch.tensor([[[20.0, -20, -20], [-20.0, -20, -20]]])  # location 0: sure; 1: nothing
    params = DistillLossParams(cls_kd=0, box_kd=1.0, box_temperature=1.0, feature=0, seg_kd=0)
    value = distill_terms(student, teacher, params=params, reg_max=7)["kd_box"]
    t = teacher["bbox_dist"][0, 0].view(4, 8).softmax(-1)
    s = student["bbox_dist"][0, 0].view(4, 8).log_softmax(-1)
    expected = (t * (t.log() - s)).sum(-1).mean()  # weight ~1 at location 0, ~2e-9 at location 1
    assert torch.allclose(value, expected, atol=1e-5)


def test_silenced_locations_are_distilled_towards_zero() -> None:
    teacher, student = _outputs(0), _outputs(0)
    teacher["cls_logits"][:, 0] = 8.0  # the teacher fires at location 0 of both images ...
    student["cls_logits"][:, 0] = 8.0  # ... and the student copies it: no loss
    params = DistillLossParams(cls_kd=1.0, box_kd=0, feature=0, seg_kd=0)
    plain = distill_terms(student, teacher, params=params, reg_max=7)["kd_cls"]
    silence = torch.zeros(2, 21, dtype=torch.bool)
    silence[:, 0] = True  # ... but location 0 lies in a mined hard-negative region
    silenced = distill_terms(student, teacher, params=params, reg_max=7, silence=silence)["kd_cls"]
    assert float(plain) < 1e-6 < float(silenced)
    student["cls_logits"][:, 0] = -8.0  # a student that stays silent there is right
    assert float(distill_terms(student, teacher, params=params, reg_max=7, silence=silence)["kd_cls"]) < 1e-3


def test_silenced_locations_and_pixels_are_left_out_of_the_other_terms() -> None:
    teacher = _outputs(0, n=20)  # 20 locations: the feature levels 4 x 4 + 2 x 2, in order
    student = {k: ([f.clone() for f in v] if k == "features" else v.clone()) for k, v in teacher.items()}
    # the student departs from the teacher only at location 5 (level 0, row 1, column 1) and in the seg pixels of
    # the top-left quarter
    student["bbox_dist"][:, 5] += torch.linspace(-6, 6, 32)
    student["features"][0][:, :, 1, 1] += 3.0
    student["seg_logits"][:, :, :4, :4] += torch.randn(2, 4, 4, 4)
    params = DistillLossParams(cls_kd=0.0, box_kd=1.0, feature=1.0, seg_kd=1.0)
    plain = distill_terms(student, teacher, params=params, reg_max=7, adapted=student["features"])
    assert all(float(plain[k]) > 1e-4 for k in ("kd_box", "kd_feat", "kd_seg")), plain
    silence = torch.zeros(2, 20, dtype=torch.bool)
    silence[:, 5] = True
    pixels = torch.zeros(2, 16, 16, dtype=torch.bool)  # any resolution: resized to the 8 x 8 segmentation output
    pixels[:, :8, :8] = True
    quiet = distill_terms(student, teacher, params=params, reg_max=7, adapted=student["features"], silence=silence,
                          silence_pixels=pixels)
    assert all(abs(float(quiet[k])) < 1e-6 for k in ("kd_box", "kd_feat", "kd_seg")), quiet
    with pytest.raises(ValueError, match="21 locations, but the feature levels"):
        distill_terms(student, teacher, params=DistillLossParams(cls_kd=0.0, box_kd=0.0, feature=1.0, seg_kd=0.0),
                      reg_max=7, adapted=student["features"], silence=torch.zeros(2, 21, dtype=torch.bool))


def test_gradients_reach_the_student_and_adapters_not_the_teacher() -> None:
    teacher = create_model("resnet18_bifpn_gfl", num_classes=2, input_size=64, neck_channels=16).eval()
    student = create_model("mobilenet_v3_small_gfl", num_classes=2, input_size=64)
    adapters = FeatureAdapters([student.neck_channels] * 3, [teacher.neck_channels] * 3)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        t_out = teacher(images)
    s_out = student(images)
    terms = distill_terms(s_out, t_out, params=ALL_ON, reg_max=student.reg_max, adapted=adapters(s_out["features"]))
    sum(terms.values()).backward()
    assert all(math.isfinite(float(v.detach())) for v in terms.values())
    assert student.det_head is not None and any(p.grad is not None and p.grad.abs().sum() > 0
                                                for p in student.det_head.parameters())
    assert all(p.grad is not None for p in adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_adapters_refuse_mismatched_levels() -> None:
    with pytest.raises(ValueError, match="3 feature levels, teacher 2"):
        FeatureAdapters([8, 8, 8], [16, 16])


def test_trainer_epoch_size_sets_the_number_of_draws(tmp_path) -> None:
    from dataengine.config import TrainParams
    from dataengine.data.dataset import collate
    from dataengine.engine import Trainer

    model = create_model("mobilenet_v3_small_gfl", num_classes=2, input_size=64)
    data = [(torch.rand(3, 64, 64), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                                     "semantic": torch.zeros(64, 64, dtype=torch.long)})] * 5
    params = TrainParams(epochs=1, batch_size=4, num_workers=0)
    trainer = Trainer(model, data, params, tmp_path, collate_fn=collate, sampler_weights=[1.0] * 5, epoch_size=22,
                      class_names=["a", "b"], input_size=64, progress=False)
    assert len(trainer.sampler) == 22 and trainer.steps_per_epoch == 5  # full batches only
    with pytest.raises(ValueError, match="epoch_size=3 needs sampler_weights"):
        Trainer(model, data, params, tmp_path, collate_fn=collate, epoch_size=3, class_names=["a", "b"],
                input_size=64, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# The distill / baseline stage functions end to end on tiny demo data, and adopting a student as the next teacher
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny prepared data, a curated set (the pool's true labels stand in), a plan, a mined region, a teacher."""
    from dataengine.config import DemoParams, RebalanceParams
    from dataengine.curation.rebalance import plan_document, rebalance_coco
    from dataengine.data.coco import load_coco
    from dataengine.data.demo import generate_demo
    from dataengine.engine.checkpoint import save_checkpoint
    from dataengine.io import atomic_write_json

    root = tmp_path_factory.mktemp("engine")
    data = root / "prepared"
    generate_demo(data, DemoParams(seed=5, image_size=64, n_train=12, n_val=4, n_pool=8, n_test=4), progress=False)
    curated = load_coco(data / "scenario/pool_hidden.json")
    atomic_write_json(root / "curated.json", curated)
    general = load_coco(data / "general/train.json")
    plan = plan_document(rebalance_coco({"general": general, "scenario": curated},
                                        RebalanceParams(target="uniform", max_repeat=3.0)))
    atomic_write_json(root / "plan.json", plan)
    first = curated["images"][0]
    mined = root / "mined"
    (mined / "maps/scenario").mkdir(parents=True)
    bits = np.zeros((first["height"], first["width"]), np.uint8)
    bits[:32, :32] = 1  # a hard-negative region in the top-left quarter
    map_name = f"maps/scenario/{first['file_name']}.png"
    (mined / map_name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(bits).save(mined / map_name)
    atomic_write_json(mined / "hard_negatives.json", {"version": 1, "params": {}, "images": [
        {"source": "scenario", "file_name": first["file_name"], "image_id": first["id"], "reasons": ["teacher_fp"],
         "regions": [{"bbox": [0, 0, 32, 32], "class_name": "circle", "score": 0.9}], "hard_pixels": 0,
         "map": map_name}]})
    torch.manual_seed(0)
    names = [c["name"] for c in general["categories"]]
    teacher = create_model("resnet18_bifpn_gfl", num_classes=len(names), input_size=64, neck_channels=16)
    save_checkpoint(root / "teacher.pt", model_state=teacher.state_dict(), model_config=teacher.config,
                    class_names=names, input_size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return {"root": root, "data": data, "curated": root / "curated.json", "plan": root / "plan.json", "mined": mined,
            "teacher": root / "teacher.pt", "names": names}


def _distill_params(**switches: Any) -> Any:
    from dataengine.config import DistillParams, StudentSpec, TrainParams

    return DistillParams(students={"s": StudentSpec("mobilenet_v3_small_gfl", None)}, input_size=64, epoch_size=8,
                         train=TrainParams(epochs=1, batch_size=4, num_workers=0, warmup_epochs=0), **switches)


@pytest.mark.slow
def test_student_and_baseline_train_on_what_their_switches_say(tiny_engine: dict[str, Any], tmp_path) -> None:
    from dataengine.config import MineParams
    from dataengine.distill import train_student
    from dataengine.engine.checkpoint import load_checkpoint

    e = tiny_engine
    kwargs = dict(teacher=e["teacher"], data_root=e["data"], curated=e["curated"], plan=e["plan"], mined=e["mined"],
                  progress=False)
    student = train_student("s", _distill_params(), MineParams(image_repeat=4.0), out_dir=tmp_path / "s",
                            log_dir=tmp_path / "ls", **kwargs)
    plan = read_json(e["plan"])["images"]  # the one mined image (scenario, first) is drawn 4x its plan weight
    first = read_json(e["curated"])["images"][0]["id"]
    w = sum(im["repeat_factor"] for im in plan if (im["source"], im["image_id"]) == ("scenario", first))
    share = round(4 * w / (sum(im["repeat_factor"] for im in plan) + 3 * w), 4)  # its weight w becomes 4w
    assert student["used"] == {"sources": ["general", "scenario"], "images": 20, "rebalance": True,
                               "hard_negatives": True, "hard_negative_images": 1, "hard_negative_draw_share": share,
                               "teacher": True, "distill_weights": dataclasses.asdict(DistillLossParams())}
    assert student["steps"] == 2 and {"kd_cls", "kd_box", "kd_feat", "kd_seg", "qfl", "seg"} <= set(
        student["final_losses"])
    assert all(math.isfinite(v) for v in student["final_losses"].values())
    ckpt = load_checkpoint(tmp_path / "s" / "model.pt")
    assert ckpt["class_names"] == e["names"] and ckpt["model_config"]["name"] == "mobilenet_v3_small_gfl"
    assert ckpt["input_size"] == 64
    baseline = train_student("s", _distill_params(), MineParams(), out_dir=tmp_path / "b", log_dir=tmp_path / "lb",
                             baseline=True, **kwargs)
    assert baseline["role"] == "baseline" and baseline["steps"] == 2
    assert baseline["used"] == {"sources": ["general"], "images": 12, "rebalance": False, "hard_negatives": False,
                                "hard_negative_images": 0, "hard_negative_draw_share": 0.0, "teacher": False,
                                "distill_weights": None}
    assert not any(k.startswith("kd_") for k in baseline["final_losses"])
    with pytest.raises(KeyError, match="'nobody' is not in params distill.students"):
        train_student("nobody", _distill_params(), MineParams(), out_dir=tmp_path / "x", log_dir=tmp_path / "lx",
                      **kwargs)


def test_oversample_multiplies_the_hard_images_only_and_reports_their_share_of_draws() -> None:
    weights, before, after = oversample([1.0, 2.0, 1.0, 4.0], [True, False, True, False], 3.0)
    assert weights == [3.0, 2.0, 3.0, 4.0]
    assert before == pytest.approx(2 / 8) and after == pytest.approx(6 / 12)
    assert oversample([1.0, 2.0], [True, False], 1.0) == ([1.0, 2.0], pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert oversample([1.0, 2.0], [False, False], 5.0) == ([1.0, 2.0], 0.0, 0.0)
    with pytest.raises(ValueError, match="3 weights but 2 hard flags"):
        oversample([1.0, 1.0, 1.0], [True, False], 2.0)


def test_the_teacher_is_silenced_inside_mined_regions(tiny_engine: dict[str, Any]) -> None:
    from dataengine.distill import DistillLoss
    from dataengine.engine.checkpoint import load_model

    teacher, _ = load_model(tiny_engine["teacher"], lambda c: create_model(**c))
    student = create_model("mobilenet_v3_small_gfl", num_classes=len(tiny_engine["names"]), input_size=64)
    params = _distill_params(loss=DistillLossParams(cls_kd=1.0, box_kd=0.0, feature=0.0, seg_kd=0.0))
    loss = DistillLoss(teacher, None, params)
    images = torch.rand(1, 3, 64, 64)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "semantic": torch.zeros(64, 64, dtype=torch.long)}
    plain = loss(student, images, [target])["kd_cls"]
    hard = torch.zeros(64, 64, dtype=torch.uint8)
    hard[:32, :32] = 1
    silenced = loss(student, images, [{**target, "hard_negative": hard}])["kd_cls"]
    assert float(plain.detach()) != pytest.approx(float(silenced.detach()))


def test_a_student_can_be_adopted_as_the_next_teacher(tiny_engine: dict[str, Any], tmp_path) -> None:
    from dataengine.engine.checkpoint import CheckpointError, load_checkpoint
    from dataengine.teacher import adopt_teacher

    out = tmp_path / "teacher"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an older run")
    info = adopt_teacher(tiny_engine["teacher"], out, tiny_engine["names"])
    assert (out / "model.pt").read_bytes() == tiny_engine["teacher"].read_bytes() and not (out / "last.pt").exists()
    assert info["epochs"] == 0 and len(info["adopted_from"]["sha256"]) == 64
    assert load_checkpoint(out / "model.pt")["class_names"] == tiny_engine["names"]
    with pytest.raises(CheckpointError, match="made for classes"):
        adopt_teacher(tiny_engine["teacher"], tmp_path / "other", ["cat", "dog"])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_engine["teacher"].read_bytes()[:30_000])  # cut inside a tensor record
    with pytest.raises(CheckpointError, match="broken.pt"):
        adopt_teacher(broken, tmp_path / "third", tiny_engine["names"])


@pytest.mark.slow
def test_distill_stage_killed_mid_way_leaves_no_final_model_and_resumes(tiny_engine: dict[str, Any], tmp_path) -> None:
    from dataengine.engine.checkpoint import load_checkpoint

    e = tiny_engine
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"distill": {
        "students": {"s": {"model": "mobilenet_v3_small_gfl"}}, "input_size": 64, "epoch_size": 8,
        "train": {"epochs": 4, "batch_size": 4, "num_workers": 0, "warmup_epochs": 0}}}))
    out, metrics = tmp_path / "s", tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "pipelines" / "distill.py"), "--student", "s", "--params", str(params),
           "--teacher", str(e["teacher"]), "--data", str(e["data"]), "--curated", str(e["curated"]), "--plan",
           str(e["plan"]), "--mined", str(e["mined"]), "--out", str(out), "--log-dir", str(tmp_path / "live"),
           "--metrics", str(metrics)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # right after the first epoch's checkpoint: mid-way through the run
    proc.wait()
    assert (out / "last.pt").exists(), "the stage died before its first checkpoint"
    killed_epoch = int(load_checkpoint(out / "last.pt")["epoch"])
    assert 1 <= killed_epoch < 4, "the run finished before it could be killed"
    assert not (out / "model.pt").exists() and not metrics.exists(), "a killed run must not leave final outputs"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    assert f"distill: student s: resumed from the checkpoint of epoch {killed_epoch}" in rerun.stderr
    result = json.loads(metrics.read_text())
    assert (result["epochs"], result["steps"], result["role"]) == (4, 8, "student")
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["epoch"] == 4 and ckpt["class_names"] == e["names"] and ckpt["model_config"]["name"] == \
        "mobilenet_v3_small_gfl"
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3"], "one log row per epoch after the resume"
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "model.pt"]  # no temp file, nothing stale


def test_the_channels_last_teacher_distils_what_the_plain_teacher_does(tiny_engine: dict[str, Any]) -> None:
    import copy

    from dataengine.distill import DistillLoss
    from dataengine.engine.checkpoint import load_model

    teacher, _ = load_model(tiny_engine["teacher"], lambda c: create_model(**c))
    plain_teacher = copy.deepcopy(teacher).eval()
    student = create_model("mobilenet_v3_small_gfl", num_classes=len(tiny_engine["names"]), input_size=64).eval()
    params = _distill_params(loss=DistillLossParams(cls_kd=1.0, box_kd=1.0, feature=0.0, seg_kd=1.0))
    loss = DistillLoss(teacher, None, params)
    conv = next(m for m in loss.teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "semantic": torch.zeros(64, 64, dtype=torch.long)}
    got = loss(student, images, [target, target])
    with torch.no_grad():
        want = distill_terms(student(images), plain_teacher(images), params=params.loss, reg_max=student.reg_max)
    for key in ("kd_cls", "kd_box", "kd_seg"):
        assert float(got[key].detach()) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), key
