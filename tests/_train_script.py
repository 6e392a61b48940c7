"""Train the tiny model in a process of its own, for the kill-and-resume and DDP tests.

Single process:  python tests/_train_script.py OUT [--resume] [--delay S]
Under torchrun:  python -m torch.distributed.run --nproc_per_node 2 --standalone tests/_train_script.py OUT --report

With ``--report`` every rank writes ``OUT/rank<r>.json``: hashes of its model, EMA and adapter states, and how many
checkpoints and DVCLive loggers it created (only rank 0 may create any).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataengine.engine.trainer as trainer_module  # noqa: E402
from _tiny_model import CLASS_NAMES, SIZE, SquaresDataset, TinyNet, build_tiny  # noqa: E402
from dataengine.config import TrainParams  # noqa: E402
from dataengine.data.dataset import collate  # noqa: E402
from dataengine.engine import Trainer, cleanup, get_rank, get_world_size, seed_everything, unwrap_model  # noqa: E402


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per item (slows the run down)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--weighted", action="store_true", help="sample with per-item weights")
    parser.add_argument("--report", action="store_true", help="write OUT/rank<r>.json (DDP test)")
    args = parser.parse_args()

    counts = {"saves": 0, "lives": 0}
    if args.report:  # count what each rank writes, through the names the trainer calls
        save, live = trainer_module.save_checkpoint, trainer_module.Live

        def counting_save(*a: object, **k: object) -> None:
            counts["saves"] += 1
            save(*a, **k)  # type: ignore[arg-type]

        def counting_live(*a: object, **k: object) -> object:
            counts["lives"] += 1
            return live(*a, **k)

        trainer_module.save_checkpoint = counting_save  # type: ignore[assignment]
        trainer_module.Live = counting_live  # type: ignore[assignment,misc]

    seed_everything(0)
    model, adapter = TinyNet(), nn.Linear(3, 3)
    dataset = SquaresDataset(32, delay=args.delay)

    def loss_fn(net: nn.Module, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        outputs = net(images)
        terms = unwrap_model(net).loss(outputs, targets)
        colors = torch.stack([t["color"] for t in targets])  # [B, 3]
        kd = F.mse_loss(adapter(outputs["color"]), colors)
        return {**terms, "loss": terms["loss"] + kd, "kd": kd}

    params = TrainParams(epochs=args.epochs, batch_size=8, lr=1e-2, warmup_epochs=1, ema_decay=0.9,
                         num_workers=args.num_workers, seed=0)
    trainer = Trainer(model, dataset, params, args.out, collate_fn=collate, class_names=CLASS_NAMES, input_size=SIZE,
                      build_fn=build_tiny, progress=False, loss_fn=loss_fn if args.report else None,
                      extra_modules=adapter if args.report else None,
                      sampler_weights=[1.0 + i % 2 for i in range(len(dataset))] if args.weighted else None)
    result = trainer.fit(resume=args.resume)
    if args.report:
        report = {
            "rank": get_rank(),
            "world_size": get_world_size(),
            "model": state_hash(trainer.model.state_dict()),
            "ema": state_hash(trainer.ema.module.state_dict()),
            "adapter": state_hash(adapter.state_dict()),
            "result": result,
            **counts,
        }
        Path(args.out, f"rank{get_rank()}.json").write_text(json.dumps(report))
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
