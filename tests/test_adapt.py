"""BatchNorm adaptation (AdaBN) before pseudo-labelling: exact statistics, the caller's model untouched, the cache a
re-run reads, and what the labeller records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dataengine.config import PseudoLabelParams
from dataengine.pseudo import label_images, tta_views
from dataengine.pseudo.adapt import BATCHNORM_FILE, adapt_batchnorm, evenly_spaced, with_batchnorm


def _images(root: Path, n: int, side: int = 32) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        pixels[..., 0] //= 1 + i  # images differ in their mean, so the subset used shows in the statistics
        Image.fromarray(pixels).save(root / f"{i}.png")
        names.append(f"{i}.png")
    return names


def _pixels(root: Path, names: list[str]) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1], as the labeller feeds the network (square images: the letterbox is a no-op)."""
    return torch.stack([torch.from_numpy(np.array(Image.open(root / n))).permute(2, 0, 1).float() / 255
                        for n in names])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_evenly_spaced() -> None:
    assert evenly_spaced(list("abcdef"), 3) == ["a", "c", "e"]
    assert evenly_spaced(list("abcdefg"), 3) == ["a", "c", "e"]
    assert evenly_spaced(list("ab"), 5) == ["a", "b"]
    assert evenly_spaced(list("abcdef"), 1) == ["a"]


def test_statistics_are_those_of_the_images_views_and_the_model_is_untouched(tmp_path: Path) -> None:
    names = _images(tmp_path / "pool", 6)
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    views = tta_views(32, (1.0,), hflip=True)  # a plain and a mirrored view: same statistics, two forward passes
    adapted, info = adapt_batchnorm(model, tmp_path / "pool", names, views, out_dir=tmp_path / "out",
                                    batch_size=8, max_images=3, progress=False)
    assert info is not None and (info["images"], info["layers"], info["reused"]) == (3, 2, False)
    used = _pixels(tmp_path / "pool", ["0.png", "2.png", "4.png"])  # evenly spaced: 3 of 6
    first = adapted[0]
    torch.testing.assert_close(first.running_mean, used.mean(dim=(0, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(first.running_var, used.var(dim=(0, 2, 3), unbiased=True), rtol=0, atol=1e-6)
    assert int(first.num_batches_tracked) == 2  # one batch, two views
    assert not adapted.training and all(m.momentum == 0.1 for m in adapted if isinstance(m, nn.BatchNorm2d))
    # The second BatchNorm saw the first one's batch-normalised output: its statistics moved from the defaults too.
    assert not torch.allclose(adapted[2].running_var, torch.ones(4))
    # Only BatchNorm statistics change, and only in the copy.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{i}.{b}" for i in (0, 2) for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_rerun_reads_the_stored_statistics_and_recomputes_when_anything_changed(tmp_path: Path) -> None:
    names = _images(tmp_path / "pool", 4)
    model, views, out = _net(), tta_views(32, (1.0,), hflip=False), tmp_path / "out"
    first, info = adapt_batchnorm(model, tmp_path / "pool", names, views, out_dir=out, progress=False)
    assert info is not None and not info["reused"] and (out / BATCHNORM_FILE).is_file()
    again, info = adapt_batchnorm(model, tmp_path / "pool", names, views, out_dir=out, progress=False)
    assert info is not None and info["reused"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    (out / BATCHNORM_FILE).write_bytes(b"truncated")  # a file that is not ours is recomputed, never trusted
    _, info = adapt_batchnorm(model, tmp_path / "pool", names, views, out_dir=out, progress=False)
    assert info is not None and not info["reused"]
    _, info = adapt_batchnorm(model, tmp_path / "pool", names[:3], views, out_dir=out, progress=False)
    assert info is not None and not info["reused"]  # other images
    with torch.no_grad():
        model[1].weight.add_(1.0)
    other, info = adapt_batchnorm(model, tmp_path / "pool", names[:3], views, out_dir=out, progress=False)
    assert info is not None and not info["reused"]  # other weights: the second layer's statistics differ
    assert not torch.equal(other[2].running_mean, first[2].running_mean)


def test_a_model_without_batchnorm_is_returned_as_it_is(tmp_path: Path) -> None:
    names = _images(tmp_path / "pool", 2)
    model = nn.Conv2d(3, 2, 1)
    adapted, info = adapt_batchnorm(model, tmp_path / "pool", names, tta_views(32, (1.0,), hflip=False),
                                    out_dir=tmp_path / "out", progress=False)
    assert adapted is model and info is None and not (tmp_path / "out").exists()


def test_no_readable_image_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"adapting BatchNorm to .*pool: none of the 1 images could be read"):
        adapt_batchnorm(_net(), tmp_path / "pool", ["a.png"], tta_views(32, (1.0,), hflip=False),
                        out_dir=tmp_path / "out", progress=False)


class BNDetector(nn.Module):
    """A detector shaped like the teacher for the labeller: BatchNorm on the input, boxes from its output's mean."""

    num_classes, class_names, input_size, segmentation, detection = 1, ("blob",), 32, False, True
    config: ClassVar[dict[str, str]] = {"name": "bn-detector"}

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"level": self.norm(x).mean(dim=(1, 2, 3))}  # [B]

    def postprocess(self, outputs: dict[str, torch.Tensor], **_: object) -> list[dict[str, torch.Tensor]]:
        score = torch.sigmoid(outputs["level"])  # a normalised brightness: moves with the statistics
        return [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "scores": s.reshape(1),
                 "labels": torch.zeros(1, dtype=torch.int64)} for s in score]


def test_labeller_scores_with_adapted_statistics_and_records_them(tmp_path: Path) -> None:
    names = _images(tmp_path / "pool", 4)
    model = BNDetector().eval()
    with torch.no_grad():  # general-set statistics far from these images: every score near sigmoid(-20)
        model.norm.running_mean.fill_(0.9)
        model.norm.running_var.fill_(0.0001)
    params = PseudoLabelParams(tta_scales=(1.0,), tta_hflip=False, num_workers=0, score_threshold=0.0,
                               segmentation=False)
    plain = label_images(model, tmp_path / "pool", names, params, tmp_path / "plain", progress=False)
    adapted = label_images(model, tmp_path / "pool", names, replace(params, adapt_bn=True), tmp_path / "adapted",
                           progress=False)
    assert plain["adapt_bn"] is None and not (tmp_path / "plain" / BATCHNORM_FILE).exists()
    assert adapted["adapt_bn"]["images"] == 4 and (tmp_path / "adapted" / BATCHNORM_FILE).is_file()
    assert model.norm.running_var.max() == pytest.approx(0.0001)  # the caller's model is left as it was

    def scores(out: Path) -> list[float]:
        return [b["score"] for b in json.loads((out / "predictions.json").read_text())["boxes"]]

    assert max(scores(tmp_path / "plain")) < 0.01
    # Normalised by their own statistics, the images' normalised means average to zero: so do the scores' logits.
    logits = [np.log(s / (1 - s)) for s in scores(tmp_path / "adapted")]
    assert np.mean(logits) == pytest.approx(0.0, abs=1e-3) and max(map(abs, logits)) > 0.1
    record = json.loads((tmp_path / "adapted" / "predictions.json").read_text())
    assert record["adapt_bn"] == {"images": 4, "layers": 1}
    assert json.loads((tmp_path / "plain" / "predictions.json").read_text())["adapt_bn"] is None
    assert record["fingerprint"] != json.loads((tmp_path / "plain" / "predictions.json").read_text())["fingerprint"]

    # No images: nothing to adapt to, an empty labelling as without adaptation.
    empty = label_images(model, tmp_path / "pool", [], replace(params, adapt_bn=True), tmp_path / "empty",
                         progress=False)
    assert (empty["images"], empty["adapt_bn"]) == (0, None)

    # Switching the adaptation off relabels everything and removes the stored statistics.
    off = label_images(model, tmp_path / "pool", names, params, tmp_path / "adapted", progress=False)
    assert off["reused_chunks"] == 0 and not (tmp_path / "adapted" / BATCHNORM_FILE).exists()


def test_with_batchnorm_rebuilds_the_labelling_network_and_refuses_other_files(tmp_path: Path) -> None:
    names = _images(tmp_path / "pool", 4)
    model, out = _net(), tmp_path / "out"
    adapted, _ = adapt_batchnorm(model, tmp_path / "pool", names, tta_views(32, (1.0,), hflip=True), out_dir=out,
                                 progress=False)
    rebuilt = with_batchnorm(model, out / BATCHNORM_FILE)
    assert not rebuilt.training and rebuilt is not model
    assert all(torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), rebuilt.state_dict().values()))
    assert torch.equal(model[0].running_var, torch.ones(3))  # the given model keeps its statistics
    with pytest.raises(ValueError, match=r"batchnorm\.pt: statistics for 6 buffers that do not match the model's 3"):
        with_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), out / BATCHNORM_FILE)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pt: not a BatchNorm statistics file"):
        with_batchnorm(model, tmp_path / "junk.pt")
