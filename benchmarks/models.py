"""Speed benchmark of the teacher and student models on this machine's CPU, with the fp32 peak measured alongside.

For each model at 128 px, on one synthetic batch (16 images of uniform noise, 1-3 boxes each and a semantic mask
that paints the boxes with their class):

- **training images/s**: ``forward`` + ``model.loss`` + ``backward`` + one AdamW step, in train mode;
- **inference images/s**: eval mode under ``torch.inference_mode``, ``forward`` + ``postprocess``, on a separate
  copy of the initial weights (training steps would change how many boxes reach NMS);

each in the default (NCHW-contiguous) memory format and in ``torch.channels_last`` (model and input converted),
which lets oneDNN pick its blocked NHWC convolution kernels.

Timing on a shared machine: every (model, format, train/infer) case first runs ``warmup`` untimed steps (the first
step creates the oneDNN primitives and grows the allocator's pools). Then ``repeats`` **rounds** each time one
repeat of every case in turn (a repeat runs whole steps until ``min_repeat_seconds`` have passed) and the peak.
Interleaving spreads a burst of load from another process over one repeat of many cases instead of all repeats of
one case, and the reported rate is the **median** over repeats, which drops such a repeat.

Cost: GFLOPs of one forward pass per image (:func:`dataengine.models.count_gflops`; a multiply-add counts as 2
FLOPs; convolutions and matmuls only) and parameters in millions. Achieved GFLOP/s uses the convention of
Kaplan et al. 2020 (§2.1) and PaLM's model FLOPs utilisation: a training step costs **3x** the forward FLOPs (the
backward pass computes gradients for both activations and weights, about 2x forward); loss, optimizer and
element-wise FLOPs are not counted. Inference costs 1x forward.

Peak: measured in the same run, once per round, as the best ``FLOPs / t`` of a few calls of two dense fp32 kernels:
``torch.matmul`` of ``n x n`` matrices (``2 n^3`` FLOPs; Intel MKL) and a 3x3 convolution, 256 -> 256 channels on
``[8, 256, 32, 32]`` channels_last (oneDNN). ``peak_gflops_per_second`` is the higher of the two over all rounds.
Both count because on AMD CPUs MKL's sgemm may not take its AVX-512 path while oneDNN does: on the development
machine (AMD EPYC, Zen 5) the matmul reached about half the convolution's rate, below what the ResNet models
achieve, so a matmul-only "peak" gave fractions above 100 %. The matmul peak alone is in the JSON too.

Threads: ``torch.set_num_threads(threads)`` (default 2, the cores of the development machine) before any
measurement; the JSON records ``torch.get_num_threads()`` and the load average before and after. Weights are
random (``pretrained=False``): speed does not depend on them, except that an untrained detector passes few boxes to
NMS, so ``postprocess`` of a trained model costs slightly more.

Usage::

    python benchmarks/models.py                      # full run (2-5 min on 2 cores, by load): results/models.json
    python benchmarks/models.py --quick --out /tmp/x.json   # smoke run (< 1 min): batch 2, one timed step
    python benchmarks/models.py --models mobilenet_v3_small_gfl resnet18_bifpn_gfl --no-channels-last
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataengine.io import atomic_write_json
from dataengine.models import count_gflops, count_params_m, create_model

__all__ = ["FORMATS", "QUICK", "VARIANTS", "Settings", "conv_peak_gflops", "machine_info", "main", "markdown_table",
           "matmul_peak_gflops", "run", "synthetic_batch", "train_step", "infer_step"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "models.json"

# Benchmark key -> (registered model name, extra create_model arguments). Teachers first, then students.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18_bifpn_gfl": ("resnet18_bifpn_gfl", {}),
    "resnet50_bifpn_gfl": ("resnet50_bifpn_gfl", {}),
    "mobilenet_v3_large_gfl": ("mobilenet_v3_large_gfl", {}),
    "mobilenet_v3_small_gfl": ("mobilenet_v3_small_gfl", {}),
    "mobilenet_v2_gfl": ("mobilenet_v2_gfl", {}),
    "mobilenet_v2_gfl_w0.5": ("mobilenet_v2_gfl", {"width_mult": 0.5}),
}

# Memory-format label in the JSON -> torch memory format; short labels for the table.
FORMATS: dict[str, torch.memory_format] = {"contiguous": torch.contiguous_format,
                                            "channels_last": torch.channels_last}
_SHORT = {"contiguous": "NCHW", "channels_last": "NHWC"}

Step = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How one benchmark run measures.

    Args:
        batch_size: Images per step.
        input_size: Square input side in pixels.
        num_classes: Detection classes ``K`` (5: the demo dataset's).
        threads: ``torch.set_num_threads`` value.
        warmup: Untimed steps of each case before the rounds.
        repeats: Rounds; each times one repeat of every case, and the median rate is reported.
        min_repeat_seconds: A repeat runs whole steps until this much time has passed (at least one step).
        matmul_n: Side of the square fp32 matrices of the matmul peak.
        peak_batch: Batch of the ``[B, 256, 32, 32]`` input of the convolution peak.
        peak_calls: Timed calls per peak kernel per round (the best is kept).
        formats: Memory formats to measure (keys of :data:`FORMATS`); the first is reported without prefix.
        seed: Seed of the synthetic batch and of the weights.
    """

    batch_size: int = 16
    input_size: int = 128
    num_classes: int = 5
    threads: int = 2
    warmup: int = 1
    repeats: int = 5
    min_repeat_seconds: float = 0.75
    matmul_n: int = 2048
    peak_batch: int = 8
    peak_calls: int = 4
    formats: tuple[str, ...] = ("contiguous", "channels_last")
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.batch_size, self.threads, self.repeats, self.matmul_n, self.peak_batch, self.peak_calls) < 1:
            raise ValueError(f"batch_size, threads, repeats, matmul_n, peak_batch and peak_calls must be >= 1, got "
                             f"{self}")
        if self.input_size < 32 or self.warmup < 0 or self.min_repeat_seconds < 0:
            raise ValueError(f"need input_size >= 32, warmup >= 0, min_repeat_seconds >= 0, got {self}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be distinct keys of {sorted(FORMATS)}, got {list(self.formats)}")


QUICK = Settings(batch_size=2, warmup=1, repeats=1, min_repeat_seconds=0.0, matmul_n=1024, peak_batch=2,
                 peak_calls=2)


def _best_rate(call: Step, flops: float, calls: int) -> float:
    """Best GFLOP/s of ``calls`` timed calls after one warm-up call (a slower call was interrupted, not slower)."""
    call()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def matmul_peak_gflops(n: int = 2048, calls: int = 4) -> float:
    """Best fp32 GFLOP/s of ``torch.matmul`` on two ``n x n`` matrices (``2 n^3`` FLOPs) with the current threads.

    Example:
        >>> matmul_peak_gflops(64, calls=2) > 0
        True
    """
    a, b = torch.randn(n, n), torch.randn(n, n)  # [n, n] fp32 each
    return _best_rate(lambda: torch.matmul(a, b), 2 * n**3, calls)


@torch.inference_mode()
def conv_peak_gflops(batch: int = 8, channels: int = 256, size: int = 32, calls: int = 4) -> float:
    """Best fp32 GFLOP/s of a channels_last 3x3 convolution, ``channels -> channels`` on ``[batch, C, size, size]``.

    FLOPs are ``2 * batch * size^2 * C^2 * 9`` (multiply-add = 2, as :func:`dataengine.models.count_gflops`).

    Example:
        >>> conv_peak_gflops(1, 8, 8, calls=2) > 0
        True
    """
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)  # [B, C, S, S]
    w = torch.randn(channels, channels, 3, 3).contiguous(memory_format=torch.channels_last)  # [C, C, 3, 3]
    return _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * batch * size**2 * channels**2 * 9, calls)


def synthetic_batch(batch_size: int, input_size: int, num_classes: int,
                    seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random images with 1-3 random boxes each and a semantic mask painting each box with its class (1..K).

    Returns:
        ``images`` float ``[B, 3, S, S]`` in ``[0, 1]`` and one target per image with ``boxes`` ``[M, 4]`` xyxy
        pixels, ``labels`` int64 ``[M]`` in ``[0, K)`` and ``semantic`` int64 ``[S, S]`` (0 = background), as
        :meth:`dataengine.models.MultiTaskDetSeg.loss` takes them.

    Example:
        >>> images, targets = synthetic_batch(2, 64, num_classes=3)
        >>> tuple(images.shape), 1 <= len(targets[0]["boxes"]) <= 3, targets[0]["semantic"].max().item() <= 3
        ((2, 3, 64, 64), True, True)
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, input_size, input_size, generator=gen)  # [B, 3, S, S]
    targets = []
    for _ in range(batch_size):
        m = int(torch.randint(1, 4, (), generator=gen))
        wh = torch.randint(input_size // 8, input_size // 2 + 1, (m, 2), generator=gen).float()  # [M, 2]
        xy = torch.rand(m, 2, generator=gen) * (input_size - wh)  # [M, 2] top-left, so the box stays inside
        boxes = torch.cat([xy, xy + wh], 1).floor()  # [M, 4] xyxy
        labels = torch.randint(0, num_classes, (m,), generator=gen)
        semantic = torch.zeros(input_size, input_size, dtype=torch.int64)  # [S, S]
        for (x0, y0, x1, y1), label in zip(boxes.int().tolist(), labels.tolist()):
            semantic[y0:y1, x0:x1] = label + 1
        targets.append({"boxes": boxes, "labels": labels, "semantic": semantic})
    return images, targets


def train_step(model: nn.Module, images: torch.Tensor,
               targets: Sequence[dict[str, torch.Tensor]]) -> tuple[Step, dict[str, list[float]]]:
    """A training step (train mode, ``forward`` + ``loss`` + ``backward`` + AdamW) and its per-phase seconds.

    Returns:
        ``step`` and ``phases``: each call of ``step`` appends its seconds of ``forward``, ``loss``, ``backward``
        and ``optimizer`` (which sum to the step) to the lists of ``phases``.

    Example:
        >>> model = create_model("mobilenet_v3_small_gfl", num_classes=3, input_size=64)
        >>> step, phases = train_step(model, *synthetic_batch(2, 64, 3))
        >>> step(); sorted(phases), len(phases["loss"])
        (['backward', 'forward', 'loss', 'optimizer'], 1)
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    phases: dict[str, list[float]] = {"forward": [], "loss": [], "backward": [], "optimizer": []}

    def step() -> None:
        t0 = time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        outputs = model(images)
        t1 = time.perf_counter()
        loss = model.loss(outputs, targets)["loss"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key].append(seconds)

    return step, phases


def infer_step(model: nn.Module, images: torch.Tensor) -> Step:
    """An inference step: eval mode, ``torch.inference_mode``, ``forward`` + ``postprocess``.

    Example:
        >>> model = create_model("mobilenet_v3_small_gfl", num_classes=3, input_size=64)
        >>> infer_step(model, torch.rand(2, 3, 64, 64))()
    """

    def step() -> None:
        model.eval()
        with torch.inference_mode():
            model.postprocess(model(images))

    return step


def _timed_repeat(step: Step, min_seconds: float) -> tuple[int, float]:
    """``(steps, seconds)`` of whole steps run until ``min_seconds`` have passed (at least one)."""
    steps, start = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return steps, elapsed


@dataclasses.dataclass
class _Case:
    """One (model, format, train/infer) measurement and its timed repeats."""

    key: str
    fmt: str
    kind: str
    step: Step
    images_per_step: int
    rates: list[float] = dataclasses.field(default_factory=list)


def _build_cases(key: str, settings: Settings) -> tuple[dict[str, Any], list[_Case], dict[str, dict[str, list[float]]]]:
    """Cost of :data:`VARIANTS` ``[key]`` and its cases, one model copy per (format, kind) from the same weights."""
    name, kwargs = VARIANTS[key]
    torch.manual_seed(settings.seed)
    model = create_model(name, num_classes=settings.num_classes, input_size=settings.input_size, **kwargs)
    info = {"model": name, "width_mult": model.width_mult, "input_size": settings.input_size,
            "batch_size": settings.batch_size, "gflops": count_gflops(model, settings.input_size),
            "params_m": count_params_m(model)}
    images, targets = synthetic_batch(settings.batch_size, settings.input_size, settings.num_classes, settings.seed)
    cases, phases = [], {}
    for fmt in settings.formats:
        batch = images.contiguous(memory_format=FORMATS[fmt])
        step, phases[fmt] = train_step(copy.deepcopy(model).to(memory_format=FORMATS[fmt]), batch, targets)
        cases.append(_Case(key, fmt, "train", step, len(batch)))
        cases.append(_Case(key, fmt, "infer", infer_step(copy.deepcopy(model).to(memory_format=FORMATS[fmt]), batch),
                           len(batch)))
    return info, cases, phases


def machine_info() -> dict[str, Any]:
    """CPU model, core count, platform, Python and torch versions, and the threads torch uses now.

    Example:
        >>> sorted(machine_info())
        ['cpu', 'cpu_count', 'platform', 'python', 'threads', 'torch']
    """
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # platform.processor() is empty or just the architecture on most Linux systems
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu or platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run(keys: Sequence[str], settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the models of ``keys`` (keys of :data:`VARIANTS`) and the peak in interleaved rounds.

    Returns:
        The JSON-able result (see the ``--help`` epilog of :func:`main`).

    Raises:
        KeyError: A key is not in :data:`VARIANTS` (the message lists them).

    Example:
        >>> s = Settings(batch_size=2, input_size=64, warmup=0, repeats=1, min_repeat_seconds=0.0, matmul_n=64,
        ...              peak_batch=1, peak_calls=1, formats=("contiguous",))
        >>> r = run(["mobilenet_v3_small_gfl"], s, log=lambda line: None)
        >>> m = r["models"]["mobilenet_v3_small_gfl"]
        >>> m["input_size"], m["train_images_per_second"] > 0, sorted(m["by_format"])
        (64, True, ['contiguous'])
    """
    unknown = [key for key in keys if key not in VARIANTS]
    if unknown:
        raise KeyError(f"unknown benchmark models {unknown}; expected keys of {sorted(VARIANTS)}")
    torch.set_num_threads(settings.threads)
    load_before, start = _load(), time.perf_counter()
    infos, cases, phases = {}, [], {}
    for key in keys:
        infos[key], model_cases, phases[key] = _build_cases(key, settings)
        cases += model_cases
    for case in cases:
        for _ in range(settings.warmup):
            case.step()
    for phase_lists in phases.values():  # keep only timed steps in the phase statistics
        for per_phase in phase_lists.values():
            for values in per_phase.values():
                values.clear()
    log(f"built and warmed up {len(cases)} cases in {time.perf_counter() - start:.0f} s")
    peaks: dict[str, list[float]] = {"matmul": [], "conv3x3_channels_last": []}
    for round_ in range(settings.repeats):
        peaks["matmul"].append(matmul_peak_gflops(settings.matmul_n, settings.peak_calls))
        peaks["conv3x3_channels_last"].append(conv_peak_gflops(settings.peak_batch, calls=settings.peak_calls))
        for case in cases:
            steps, seconds = _timed_repeat(case.step, settings.min_repeat_seconds)
            case.rates.append(steps * case.images_per_step / seconds)
        log(f"round {round_ + 1}/{settings.repeats} done at {time.perf_counter() - start:.0f} s; peaks (GFLOP/s) "
            f"matmul {peaks['matmul'][-1]:.0f}, conv {peaks['conv3x3_channels_last'][-1]:.0f}; load {_load()}")
    peak = max(max(values) for values in peaks.values())

    models: dict[str, dict[str, Any]] = {}
    for key, info in infos.items():
        by_format: dict[str, dict[str, Any]] = {}
        for fmt in settings.formats:
            entry: dict[str, Any] = {}
            for case in (c for c in cases if c.key == key and c.fmt == fmt):
                rate = statistics.median(case.rates)
                gflops_s = (3 if case.kind == "train" else 1) * info["gflops"] * rate
                entry.update({f"{case.kind}_images_per_second": rate, f"{case.kind}_gflops_per_second": gflops_s,
                              f"{case.kind}_fraction_of_peak": gflops_s / peak,
                              f"{case.kind}_repeats_images_per_second": case.rates})
            entry["train_phase_seconds_per_step"] = {phase: statistics.median(values)
                                                     for phase, values in phases[key][fmt].items()}
            by_format[fmt] = entry
        summary = {k: v for k, v in by_format[settings.formats[0]].items() if "repeats" not in k and "phase" not in k}
        models[key] = {**info, "memory_format": settings.formats[0], **summary, "by_format": by_format}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": _load()},
        "settings": dataclasses.asdict(settings),
        "conventions": {
            "gflops": "forward pass per image, multiply-add = 2 FLOPs, convolutions + matmuls only",
            "train_gflops_per_second": "3 x forward GFLOPs x training images/s (forward + backward; "
                                       "Kaplan et al. 2020)",
            "infer_gflops_per_second": "1 x forward GFLOPs x inference images/s",
            "peak_gflops_per_second": "best FLOPs/t over rounds of fp32 torch.matmul (n x n, 2 n^3 FLOPs) and a "
                                      "channels_last 3x3 conv 256->256 on [peak_batch, 256, 32, 32]",
            "images_per_second": "median over rounds of timed repeats, after warm-up steps"},
        "peak_gflops_per_second": peak,
        "matmul_peak_gflops_per_second": max(peaks["matmul"]),
        "peak_rounds_gflops_per_second": peaks,
        "models": models,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown table of one run's JSON: cost, images/s and fraction of the measured peak per model and format.

    Example:
        >>> r = {"peak_gflops_per_second": 100.0, "models": {"m": {"gflops": 1.0, "params_m": 2.0, "by_format": {
        ...     "contiguous": {"train_images_per_second": 3.0, "infer_images_per_second": 10.0,
        ...                    "train_fraction_of_peak": 0.09, "infer_fraction_of_peak": 0.1}}}}}
        >>> print(markdown_table(r).splitlines()[2])
        | `m` | 1 | 2 | 3 | 10 | 9 % | 10 % |
    """
    formats = list(next(iter(result["models"].values()))["by_format"]) if result["models"] else []
    label = " / ".join(_SHORT[f] for f in formats)

    def cell(by_format: dict[str, dict[str, float]], key: str, percent: bool = False) -> str:
        values = [by_format[f][key] for f in formats]
        return " / ".join(f"{100 * v:.0f} %" if percent else f"{v:.3g}" for v in values)

    lines = [f"| model | GFLOPs | params (M) | train img/s {label} | infer img/s {label} | "
             f"train % of peak {label} | infer % of peak {label} |", "|---|---|---|---|---|---|---|"]
    for key, m in result["models"].items():
        f = m["by_format"]
        lines.append(f"| `{key}` | {m['gflops']:.3g} | {m['params_m']:.3g} | {cell(f, 'train_images_per_second')} | "
                     f"{cell(f, 'infer_images_per_second')} | {cell(f, 'train_fraction_of_peak', True)} | "
                     f"{cell(f, 'infer_fraction_of_peak', True)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: parse arguments, run the benchmark, write the JSON atomically and print a markdown table."""
    parser = argparse.ArgumentParser(
        description="Training and inference images/s, GFLOPs, params and fraction of the measured fp32 peak of the "
                    "teacher and student models on this CPU (synthetic batch, random weights). Training = forward + "
                    "model.loss + backward + AdamW step; inference = eval-mode forward + postprocess under "
                    "torch.inference_mode. Each in NCHW-contiguous and channels_last; the median of timed repeats, "
                    "interleaved over all cases in rounds after warm-up, is reported. Train GFLOP/s counts 3x the "
                    "forward FLOPs. The peak is the best of fp32 torch.matmul and a oneDNN 3x3 conv, same run.",
        epilog="The JSON holds date, machine (cpu, threads, torch, load average), settings, conventions, "
               "peak_gflops_per_second (and the matmul-only peak) and per model: input_size, gflops, params_m, "
               "{train,infer}_images_per_second, {train,infer}_gflops_per_second, {train,infer}_fraction_of_peak "
               "(first format, contiguous by default) and by_format (each format's numbers, per-repeat rates and the "
               "training step's seconds per phase). The module docstring of benchmarks/models.py gives the method.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON result file, written atomically (default: {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 min): batch 2, one timed step per case, small peak kernels; not for "
                             "reporting")
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="KEY",
                        help=f"models to measure (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=Settings.threads,
                        help="torch.set_num_threads value (default: 2, the cores of the development machine)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 16; 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of timed repeats, median reported (default: 5; 1 with --quick)")
    parser.add_argument("--no-channels-last", action="store_true", help="measure the contiguous format only")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {"threads": args.threads}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.no_channels_last:
        overrides["formats"] = ("contiguous",)
    try:
        settings = dataclasses.replace(QUICK if args.quick else Settings(), **overrides)
    except ValueError as err:
        parser.error(str(err))

    start = time.perf_counter()
    result = run(args.models, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["quick"] = args.quick
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    machine = result["machine"]
    print(f"{result['date']}, {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, batch "
          f"{settings.batch_size} at {settings.input_size} px; fp32 peak {result['peak_gflops_per_second']:.0f} "
          f"GFLOP/s (matmul alone {result['matmul_peak_gflops_per_second']:.0f}); {result['wall_seconds']:.0f} s; "
          f"wrote {args.out}\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
