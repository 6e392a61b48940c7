"""Distillation terms (exact where exact), the student's feature adapters, and the Trainer's epoch size."""

from __future__ import annotations

import math

import pytest
import torch

from dataengine.config import DistillLossParams
from dataengine.distill import FeatureAdapters, _location_map, distill_terms
from dataengine.models import create_model

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


def test_location_map_samples_the_pixel_under_each_location_centre() -> None:
    maps = torch.zeros(1, 16, 16, dtype=torch.uint8)
    maps[0, 4, 12] = 1
    points = torch.tensor([[12.0, 4.0], [4.0, 4.0], [100.0, 100.0]])  # the last is clamped to the corner
    assert _location_map(maps, points).tolist() == [[1, 0, 0]]


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
