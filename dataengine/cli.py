"""The ``dataengine`` command: what users run by hand (stages run through ``dvc repro``).

Each subcommand imports its implementation lazily, so ``dataengine --help`` is fast and a missing optional
component only affects the subcommand that needs it.

Example:
    $ dataengine validate data/prepared/general/train.json
    $ dataengine demo /tmp/demo --seed 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

# name -> (help, "module:function"); each function takes the remaining argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("check a COCO file (and its images) or a scenario image folder; exit 1 on defects",
                 "dataengine.data.validate:validate_cli"),
    "import": ("convert a Pascal VOC or YOLO folder to COCO JSON", "dataengine.data.validate:import_cli"),
    "demo": ("generate the synthetic demo dataset (deterministic by seed)", "dataengine.data.demo:demo_cli"),
    "review": ("push pseudo-labels to FiftyOne / Label Studio and pull reviewers' decisions",
               "dataengine.review.cli:review_cli"),
    "profile": ("run the pipeline with a params profile (e.g. bccd) as a DVC experiment",
                "dataengine.profiles:profile_cli"),
    "predict": ("run a trained student (.pt, ONNX or INT8 ONNX) over images; write COCO results JSON",
                "dataengine.predictor:predict_cli"),
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    module = __import__(module_name, fromlist=[func_name])
    return getattr(module, func_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dataengine`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="dataengine",
        description="Semi-supervised data engine: teacher -> pseudo-labels -> review -> curation -> mobile students. "
        "Pipeline stages run with `dvc repro`; these subcommands are what you run by hand.",
        epilog="Run `dataengine COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    func = _resolve(SUBCOMMANDS[name][1])
    return int(func(rest) or 0)


def _version() -> str:
    from dataengine import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
