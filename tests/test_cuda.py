"""The CUDA path: evaluation, the teacher stage, and labelling ranks sharing one GPU. Skipped where there is no GPU
(CI, the project's own machines); run them on a lent GPU machine with ``pytest tests/test_cuda.py`` (see README,
"GPU path")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dataengine.config import DemoParams
from dataengine.data.demo import generate_demo
from dataengine.data.layout import PreparedLayout
from dataengine.engine.checkpoint import load_checkpoint, save_checkpoint
from dataengine.inference import evaluate_model
from dataengine.models import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    generate_demo(root, DemoParams(seed=3, image_size=64, n_train=24, n_val=6, n_pool=4, n_test=6), progress=False)
    return root


def test_evaluate_model_runs_on_the_models_device_and_matches_the_cpu(tiny_data: Path) -> None:
    # The trainer evaluates its model where it trains: images must follow the model to CUDA (they once did not).
    torch.manual_seed(0)
    model = create_model("resnet18_bifpn_gfl", 5, input_size=64, neck_channels=16).eval()
    layout = PreparedLayout(tiny_data)
    cpu = evaluate_model(model, layout.general_val, layout.general_images, input_size=64)
    gpu = evaluate_model(model.to("cuda"), layout.general_val, layout.general_images, input_size=64)
    assert next(model.parameters()).is_cuda  # left where it was
    assert gpu["mIoU"] == pytest.approx(cpu["mIoU"], abs=0.02)
    assert gpu["AP50"] == pytest.approx(cpu["AP50"], abs=0.05)


def test_train_teacher_stage_trains_on_cuda_and_saves_a_cpu_loadable_checkpoint(tiny_data: Path,
                                                                                 tmp_path: Path) -> None:
    params = {"teacher": {"model": {"name": "resnet18_bifpn_gfl", "input_size": 64, "neck_channels": 16},
                          "train": {"epochs": 2, "batch_size": 4, "num_workers": 0, "warmup_epochs": 1,
                                    "eval_every": 1},
                          "augment": {"preset": "light"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(ROOT / "pipelines/train_teacher.py"), "--params", str(tmp_path / "params.yaml"),
           "--data", str(tiny_data), "--out", str(tmp_path / "teacher"), "--log-dir", str(tmp_path / "live"),
           "--metrics", str(tmp_path / "teacher.json")]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    run = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((tmp_path / "teacher.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["general_val"]["AP50"] <= 1.0
    ckpt = load_checkpoint(tmp_path / "teacher" / "model.pt")  # weights_only, mapped to the CPU
    model = create_model(**ckpt["model_config"]).eval()
    model.load_state_dict(ckpt["model_state"])  # a GPU-trained teacher serves CPU stages (mine, evaluate, export)
    assert model(torch.rand(1, 3, 64, 64))["cls_logits"].isfinite().all()


def test_two_labelling_ranks_share_one_gpu_and_give_the_single_process_predictions(tiny_data: Path,
                                                                                   tmp_path: Path) -> None:
    # Pseudo-labelling is host-bound on a GPU (README, "GPU path"): several ranks per GPU is how it scales there.
    # NCCL refuses two ranks on one device, so they run Gloo, each on cuda:(LOCAL_RANK % GPUs).
    torch.manual_seed(0)
    model = create_model("resnet18_bifpn_gfl", 5, input_size=64, neck_channels=16)
    names = ["circle", "square", "triangle", "star", "cross"]
    save_checkpoint(tmp_path / "teacher" / "model.pt", model_state=model.state_dict(), model_config=model.config,
                    class_names=names, input_size=64, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    params = {"pseudo_label": {"batch_size": 2, "tta_scales": [1.0, 1.5], "score_threshold": 0.005,
                               "chunk_size": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}

    def run(out: str, *launcher: str) -> Path:
        cmd = [sys.executable, *launcher, str(ROOT / "pipelines/pseudo_label.py"), "--params",
               str(tmp_path / "params.yaml"), "--teacher", str(tmp_path / "teacher"), "--data", str(tiny_data),
               "--out", str(tmp_path / out), "--no-progress"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return tmp_path / out

    one = run("one")
    two = run("two", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone")
    stats = json.loads((two / "stats.json").read_text())
    assert stats["pool"]["world_size"] == 2
    for sub in ("pool", "val"):
        assert (two / sub / "predictions.json").read_bytes() == (one / sub / "predictions.json").read_bytes()
