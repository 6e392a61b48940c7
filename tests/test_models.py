"""Teacher/student models: shapes, losses (empty images, mask-less data), decoding, registry, cost, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm
from torchvision import tv_tensors
from torchvision.ops import box_iou

from dataengine.models import (
    MultiTaskDetSeg,
    PretrainedWeightsMissing,
    build_backbone,
    count_gflops,
    count_params_m,
    create_model,
    fold_batchnorm,
    list_models,
    pretrained_path,
)
from dataengine.models.backbones import STAGE_ENDS
from dataengine.models.losses import (
    atss_assign,
    distribution_focal_loss,
    distribution_to_distance,
    quality_focal_loss,
    semantic_loss,
)

K = 3
S = 64
N64 = 8 * 8 + 4 * 4 + 2 * 2  # locations at 64 px: strides 8, 16, 32
ALL_MODELS = ["mobilenet_v2_gfl", "mobilenet_v3_large_gfl", "mobilenet_v3_small_gfl", "resnet18_bifpn_gfl",
              "resnet50_bifpn_gfl"]


def targets_for(batch: int, *, empty: bool = False) -> list[dict]:
    out = []
    for i in range(batch):
        boxes = torch.zeros(0, 4) if empty else torch.tensor([[4.0, 6.0, 30.0, 40.0], [36.0, 20.0, 60.0, 44.0]])
        labels = torch.zeros(0, dtype=torch.int64) if empty else torch.tensor([0, (i + 1) % K])
        semantic = torch.zeros(S, S, dtype=torch.int64)
        semantic[6:40, 4:30] = 1
        out.append({"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(S, S)), "labels": labels,
                    "semantic": semantic})
    return out


@pytest.fixture(scope="module")
def models() -> dict[str, MultiTaskDetSeg]:
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=K, input_size=S) for name in ALL_MODELS}


def test_registry_lists_the_required_models() -> None:
    assert set(ALL_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shapes_and_finite_losses_in_train_and_eval(models: dict[str, MultiTaskDetSeg], name: str) -> None:
    model = models[name]
    images = torch.rand(2, 3, S, S)
    model.train()
    out = model(images)
    assert out["cls_logits"].shape == (2, N64, K)
    assert out["bbox_dist"].shape == (2, N64, 4 * 8)
    assert out["seg_logits"].shape == (2, K + 1, S // 4, S // 4)
    assert [tuple(f.shape) for f in out["features"]] == [(2, model.neck_channels, s, s) for s in (8, 4, 2)]
    losses = model.loss(out, targets_for(2))
    assert set(losses) == {"loss", "qfl", "dfl", "giou", "seg"}
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    expected = losses["qfl"] + 2 * losses["giou"] + 0.25 * losses["dfl"] + losses["seg"]
    assert torch.allclose(losses["loss"], expected)
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert all(torch.isfinite(v).all() for k, v in out.items() if k != "features")


def test_model_losses_are_weighted_by_task() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    out = model(torch.rand(2, 3, S, S))
    losses = model.loss(out, targets_for(2), det_weight=0.5, seg_weight=3.0)
    det = losses["qfl"] + 2 * losses["giou"] + 0.25 * losses["dfl"]
    assert torch.allclose(losses["loss"], 0.5 * det + 3.0 * losses["seg"])


def test_backbone_stage_ends_have_strides_4_8_16_32() -> None:
    for arch in (*STAGE_ENDS, "resnet18"):
        backbone = build_backbone(arch, width_mult=0.5 if arch in STAGE_ENDS else 1.0).eval()
        with torch.no_grad():
            feats = backbone(torch.zeros(1, 3, 64, 64))
        assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32], arch
        assert [f.shape[1] for f in feats] == list(backbone.channels), arch
        if arch in STAGE_ENDS:  # the block right after each cut halves the resolution (or is the end)
            net = getattr(tvm, arch)(weights=None)
            x, strides = torch.zeros(1, 3, 64, 64), []
            with torch.no_grad():
                for block in net.features:
                    x = block(x)
                    strides.append(64 // x.shape[-1])
            assert [max(i for i, s in enumerate(strides) if s == t) for t in (4, 8, 16, 32)] == list(STAGE_ENDS[arch])


def test_images_without_boxes_give_finite_detection_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    out = model(torch.rand(2, 3, S, S))
    losses = model.loss(out, targets_for(2, empty=True))
    assert losses["qfl"] > 0 and torch.isfinite(losses["qfl"])
    assert losses["dfl"].item() == 0.0 and losses["giou"].item() == 0.0
    losses["loss"].backward()
    # every head parameter still gets a (possibly zero) gradient, so DDP sees no unused parameters
    assert all(p.grad is not None for p in model.det_head.parameters())
    # negatives only: the classifier is pushed down everywhere
    assert model.det_head.cls_out.bias.grad.gt(0).all()


def test_one_image_without_boxes_in_a_batch() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    targets = targets_for(1) + targets_for(1, empty=True)
    losses = model.loss(model(torch.rand(2, 3, S, S)), targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_all_ignored_semantic_targets_give_zero_seg_loss() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    targets = targets_for(2)
    for t in targets:
        t["semantic"] = torch.full((S, S), 255, dtype=torch.int64)
    losses = model.loss(model(torch.rand(2, 3, S, S)), targets)
    assert losses["seg"].item() == 0.0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.seg_head.parameters() if p.grad is not None)


def test_semantic_loss_known_value_and_ignore() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = math.log(3.0)  # p(class 1) = 3/4 everywhere
    target = torch.tensor([[[1, 1, 255, 255]] * 4])  # [1, 4, 4]: half the pixels ignored
    assert semantic_loss(logits, target).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert semantic_loss(logits, torch.full((1, 4, 4), 255)).item() == 0.0


def test_detection_only_and_segmentation_only() -> None:
    det = create_model("mobilenet_v2_gfl", num_classes=K, input_size=S, segmentation=False)
    assert det.seg_head is None and det.det_head is not None
    out = det(torch.rand(1, 3, S, S))
    assert "seg_logits" not in out and "cls_logits" in out
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])}]  # no "semantic"
    assert set(det.loss(out, targets)) == {"loss", "qfl", "dfl", "giou"}
    with pytest.raises(RuntimeError, match="segmentation=False"):
        det.semantic_probs(out)

    seg = create_model("mobilenet_v2_gfl", num_classes=K, input_size=S, detection=False)
    assert seg.det_head is None and not any(n.startswith("det_head") for n, _ in seg.named_parameters())
    out = seg(torch.rand(1, 3, S, S))
    assert "cls_logits" not in out and "bbox_dist" not in out and "seg_logits" in out
    losses = seg.loss(out, [{"semantic": torch.zeros(S, S, dtype=torch.int64)}])
    assert set(losses) == {"loss", "seg"} and torch.equal(losses["loss"], losses["seg"])
    with pytest.raises(RuntimeError, match="detection=False"):
        seg.postprocess(out)
    with pytest.raises(ValueError, match="both off"):
        create_model("mobilenet_v2_gfl", num_classes=K, detection=False, segmentation=False)


def test_bad_targets_are_refused_with_the_image_index() -> None:
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    out = model(torch.rand(2, 3, S, S))
    targets = targets_for(2)
    targets[1]["labels"] = torch.tensor([0, K])
    with pytest.raises(ValueError, match=r"targets\[1\]: labels must be in \[0, 3\)"):
        model.loss(out, targets)
    targets = targets_for(2)
    targets[0]["semantic"][0, 0] = K + 1
    with pytest.raises(ValueError, match=r"targets\[0\]: semantic values must be in \[0, 3\] or 255"):
        model.loss(out, targets)
    targets = targets_for(2)
    del targets[1]["semantic"]
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'semantic'"):
        model.loss(out, targets)
    with pytest.raises(ValueError, match="float images"):
        model(torch.zeros(1, 3, S, S, dtype=torch.uint8))


def test_anchor_points_order_and_cache() -> None:
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    points, strides = model.anchor_points()
    assert points.shape == (N64, 2) and strides.shape == (N64,)
    assert points[:3].tolist() == [[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]  # row-major inside P3
    assert points[8].tolist() == [4.0, 12.0]
    assert points[64].tolist() == [8.0, 8.0] and strides[64].item() == 16.0  # first P4 location
    assert points[-1].tolist() == [48.0, 48.0] and strides[-1].item() == 32.0
    assert model.anchor_points(S)[0] is points  # cached
    assert model.anchor_points((96, 64))[0].shape[0] == 12 * 8 + 6 * 4 + 3 * 2


def test_decode_and_postprocess_exact_box() -> None:
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, S, S))
    out["cls_logits"] = torch.full_like(out["cls_logits"], -10.0)
    out["cls_logits"][0, 9, 2] = 3.0  # P3 location (x=1, y=1): centre (12, 12), class 2
    out["cls_logits"][0, 10, 1] = 0.0  # its neighbour (20, 12), class 1, score 0.5
    dist = torch.full_like(out["bbox_dist"], -1e4)
    dist[..., 2::8] = 0.0  # every side: all mass on bin 2 -> 2 strides
    out["bbox_dist"] = dist
    dets = model.postprocess(out, score_threshold=0.3)
    assert [len(d["boxes"]) for d in dets] == [2, 0]
    assert dets[0]["boxes"].tolist() == [[0.0, 0.0, 28.0, 28.0], [4.0, 0.0, 36.0, 28.0]]  # clipped at 0
    assert dets[0]["labels"].tolist() == [2, 1]
    assert dets[0]["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item(), 0.5])
    assert dets[1]["boxes"].shape == (0, 4) and dets[1]["labels"].dtype == torch.int64
    same_class = out["cls_logits"].clone()
    same_class[0, 10] = -10.0
    same_class[0, 10, 2] = 0.0  # now a class-2 duplicate with IoU 0.6 > 0.5: suppressed
    assert len(model.postprocess({**out, "cls_logits": same_class}, score_threshold=0.3, nms_iou=0.5)[0]["boxes"]) == 1
    assert len(model.postprocess(out, score_threshold=0.3, max_detections=1)[0]["boxes"]) == 1


def test_postprocess_ranges_on_random_outputs(models: dict[str, MultiTaskDetSeg]) -> None:
    model = models["resnet18_bifpn_gfl"].eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, S, S))
    out["cls_logits"] = torch.randn_like(out["cls_logits"])  # plenty of scores above threshold
    dets = model.postprocess(out, score_threshold=0.05, max_detections=20)
    for det in dets:
        assert 0 < len(det["boxes"]) <= 20
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= S
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
        assert det["scores"].min() > 0.05 and det["scores"].max() <= 1
        assert torch.equal(det["scores"], det["scores"].sort(descending=True).values)
        assert det["labels"].min() >= 0 and det["labels"].max() < K
    probs = model.semantic_probs(out)
    assert probs.shape == (2, K + 1, S, S)
    assert torch.allclose(probs.sum(1), torch.ones(2, S, S), atol=1e-5)
    assert model.semantic_probs(out, size=(40, 30)).shape == (2, K + 1, 40, 30)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_round_trip(models: dict[str, MultiTaskDetSeg], name: str) -> None:
    model = models[name]
    config = json.loads(json.dumps(model.config))
    assert {"name", "num_classes", "input_size", "width_mult", "neck_channels", "detection", "segmentation"} <= set(
        config)
    rebuilt = create_model(**config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # strict: the same architecture
    assert torch.equal(rebuilt.mean, model.mean) and torch.equal(rebuilt.std, model.std)


def test_config_round_trip_keeps_overrides() -> None:
    model = create_model("mobilenet_v3_small_gfl", num_classes=5, input_size=96, width_mult=0.75, neck_channels=32,
                         neck_repeats=2, head_convs=1, segmentation=False, reg_max=10)
    rebuilt = create_model(**model.config)
    assert rebuilt.config == model.config == {
        "name": "mobilenet_v3_small_gfl", "num_classes": 5, "input_size": 96, "width_mult": 0.75,
        "neck_channels": 32, "neck_repeats": 2, "head_convs": 1, "detection": True, "segmentation": False,
        "reg_max": 10}
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt(torch.rand(1, 3, 96, 96))["bbox_dist"].shape == (1, 12 * 12 + 6 * 6 + 3 * 3, 44)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet18_fcos'") as err:
        create_model("resnet18_fcos", num_classes=K)
    assert all(name in str(err.value) for name in ALL_MODELS)
    with pytest.raises(ValueError, match="no width multiplier"):
        create_model("resnet18_bifpn_gfl", num_classes=K, width_mult=0.5)


def test_pretrained_missing_cache_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert pretrained_path("mobilenet_v3_small")[0] == expected
    with pytest.raises(PretrainedWeightsMissing) as err:
        create_model("mobilenet_v3_small_gfl", num_classes=K, pretrained=True)
    message = str(err.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth" in message
    with pytest.raises(ValueError, match="only for width_mult=1.0"):
        create_model("mobilenet_v3_small_gfl", num_classes=K, pretrained=True, width_mult=0.5)


def test_pretrained_loads_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = pretrained_path("mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = tvm.mobilenet_v3_small(weights=None)
    torch.save(reference.state_dict(), path)
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, pretrained=True)
    first_conv = model.backbone.stages[0][0][0].weight
    assert torch.equal(first_conv, reference.features[0][0].weight)
    assert "pretrained" not in model.config  # a rebuilt model takes its weights from the checkpoint


@pytest.mark.parametrize("name", ALL_MODELS)
def test_folded_batchnorm_gives_the_same_outputs(name: str) -> None:
    torch.manual_seed(1)
    model = create_model(name, num_classes=K, input_size=S)
    for module in model.modules():  # statistics and affine terms far from the identity, so a wrong fold shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.train()
    folded, count = fold_batchnorm(model)
    left = [n for n, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert count > 0 and all(".norms." in n for n in left), left  # only the head's per-level norms stay
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == count + len(left)
    x = torch.rand(2, 3, S, S)
    with torch.inference_mode():
        expected, got = model.eval()(x), folded(x)
    for key in ("cls_logits", "bbox_dist", "seg_logits"):
        assert torch.allclose(got[key], expected[key], atol=1e-4, rtol=1e-4), key


def test_gflops_student_is_under_a_tenth_of_the_demo_teacher() -> None:
    student = create_model("mobilenet_v3_small_gfl", num_classes=K)
    teacher = create_model("resnet18_bifpn_gfl", num_classes=K)
    s, t = count_gflops(student, 128), count_gflops(teacher, 128)
    assert 0 < s <= t / 10
    assert 1.0 < t < 2.0  # ResNet-18 alone is 2 * 1.82 * (128/224)^2 = 1.19 GFLOPs at 128 px
    assert count_params_m(student) < count_params_m(teacher) / 5
    assert teacher.training  # mode restored


def test_count_gflops_counts_a_multiply_add_as_two() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_gflops(conv, (10, 20)) == pytest.approx(2 * 3 * 8 * 9 * 200 / 1e9)
    assert count_params_m(conv) == pytest.approx(3 * 8 * 9 / 1e6)


def test_quality_and_distribution_focal_losses() -> None:
    # QFL vanishes when the score equals its soft target and grows with the gap.
    logits = torch.tensor([0.0, 0.0, 2.0])
    target = torch.tensor([0.5, 0.0, 0.0])
    qfl = quality_focal_loss(logits, target)
    assert qfl[0].item() == pytest.approx(0.0, abs=1e-7)
    assert qfl[2] > qfl[1] > 0
    # DFL is minimal for the two-bin distribution around the target (here 60% bin 2, 40% bin 3).
    best = torch.log(torch.tensor([[1e-9, 1e-9, 0.6, 0.4, 1e-9]]))
    target = torch.tensor([2.4])
    assert distribution_focal_loss(best, target) < distribution_focal_loss(torch.zeros(1, 5), target)
    assert distribution_to_distance(best.repeat(1, 4), 4)[0].tolist() == pytest.approx([2.4] * 4, abs=1e-6)


def test_atss_assignment_edge_cases() -> None:
    model = create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=S)
    points, strides = model.anchor_points()
    counts = [64, 16, 4]
    assert atss_assign(points, strides, counts, torch.zeros(0, 4)).eq(-1).all()
    big, nested, tiny = [4.0, 4.0, 60.0, 60.0], [20.0, 20.0, 36.0, 36.0], [41.0, 9.0, 43.0, 11.0]
    assigned = atss_assign(points, strides, counts, torch.tensor([big, nested, tiny]))
    # every object gets locations, the nested one keeps those it shares with the big one, the 2-px one gets one
    assert set(assigned[assigned >= 0].tolist()) == {0, 1, 2}
    assert assigned.eq(2).sum().item() == 1
    assert points[assigned == 2].tolist() == [[44.0, 12.0]]
    assert all(20 <= x <= 36 and 20 <= y <= 36 for x, y in points[assigned == 1].tolist())


def _synthetic(generator: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0]])
    layout = [[([8, 10, 36, 40], 0)], [([30, 20, 58, 50], 1), ([4, 4, 20, 24], 2)]]
    images = 0.5 + 0.05 * torch.randn(len(layout), 3, S, S, generator=generator)
    targets = []
    for i, objects in enumerate(layout):
        semantic = torch.zeros(S, S, dtype=torch.int64)
        for (x1, y1, x2, y2), label in objects:
            images[i, :, y1:y2, x1:x2] = colours[label][:, None, None]
            semantic[y1:y2, x1:x2] = label + 1
        targets.append({"boxes": torch.tensor([box for box, _ in objects], dtype=torch.float32),
                        "labels": torch.tensor([label for _, label in objects]), "semantic": semantic})
    return images.clamp(0, 1), targets


@pytest.mark.slow
def test_demo_teacher_overfits_two_images() -> None:
    torch.manual_seed(0)
    images, targets = _synthetic(torch.Generator().manual_seed(0))
    model = create_model("resnet18_bifpn_gfl", num_classes=K, input_size=S)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(50):
        losses = model.loss(model(images), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["giou"] < history[0]["giou"] / 3
    assert history[-1]["qfl"] < history[0]["qfl"] / 10
    model.eval()
    with torch.no_grad():
        out = model(images)
    for det, target in zip(model.postprocess(out), targets):
        top = det["boxes"][: len(target["boxes"])]  # as many top detections as objects
        iou = box_iou(target["boxes"], top)  # [M, M]
        same = target["labels"][:, None] == det["labels"][None, : len(target["boxes"])]
        assert (iou * same).max(1).values.min() > 0.5, (target, det)
    accuracy = (model.semantic_probs(out).argmax(1) == torch.stack([t["semantic"] for t in targets])).float().mean()
    assert accuracy > 0.9


class _ExportWrapper(torch.nn.Module):
    """Tuple outputs for ``torch.onnx.export`` (dict/list outputs are not ONNX outputs)."""

    def __init__(self, model: MultiTaskDetSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["cls_logits"], out["bbox_dist"], out["seg_logits"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_student_exports_to_onnx_and_matches_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    wrapper = _ExportWrapper(create_model("mobilenet_v3_small_gfl", num_classes=K, input_size=128)).eval()
    images = torch.rand(1, 3, 128, 128)
    path = tmp_path / "student.onnx"
    # the TorchScript exporter: the dynamo one needs onnxscript, which is not installed
    torch.onnx.export(wrapper, (images,), str(path), dynamo=False, opset_version=17, input_names=["images"])
    outputs = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = wrapper(images)
    for got, want in zip(outputs, expected):
        assert got.shape == tuple(want.shape)
        assert abs(got - want.numpy()).max() < 1e-4
