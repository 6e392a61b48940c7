"""Params profiles: a partial params file applied on top of ``params.yaml`` as a DVC experiment.

A profile (``profiles/<name>.yaml``) has the same keys as ``params.yaml`` (``null`` removes a key).
``dataengine profile NAME`` merges it onto ``params.yaml``, validates the result with the same typed loader as
the stages (so a typo fails before any work), and runs ``dvc exp run -n NAME -S key=value ...``: the experiment
is then compared with ``dvc exp show`` / ``dvc metrics diff`` like any other; ``params.yaml`` is not edited.

Example:
    $ dataengine profile bccd --dry-run
    dvc exp run -n bccd -S data.source=bccd -S data.bccd.labelled_fraction=0.25 ...
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dataengine.config import ParamsError, load_params

__all__ = ["flatten", "merge", "profile_overrides", "profile_cli"]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` onto a copy of ``base``; a ``None`` (YAML ``null``) override removes the key.

    Removal is how a profile drops an entry of a mapping, e.g. a student of ``distill.students`` (DVC runs it as
    ``-S ~distill.students.NAME``, Hydra's delete syntax).

    Example:
        >>> merge({"a": {"b": 1, "c": 2}}, {"a": {"c": None, "d": 3}})
        {'a': {'b': 1, 'd': 3}}
    """
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def profile_overrides(profile: str | Path, params: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a profile, check that ``params`` + profile is valid, and return the flat overrides.

    Raises:
        FileNotFoundError: The profile does not exist (the message lists the available ones).
        ParamsError: The merged params are invalid (names the profile file and the key).
    """
    path = Path(profile)
    if not path.exists():
        available = sorted(p.stem for p in Path("profiles").glob("*.yaml"))
        raise FileNotFoundError(f"profile not found: {path}; available: {', '.join(available) or 'none'}")
    overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    base = yaml.safe_load(Path(params).read_text(encoding="utf-8")) or {}
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / path.name
        merged.write_text(yaml.safe_dump(merge(base, overrides)))
        try:
            load_params(merged)
        except ParamsError as err:
            raise ParamsError(str(err).replace(str(merged), f"{params} + {path}")) from None
    return flatten(overrides)


def profile_cli(argv: list[str] | None = None) -> int:
    """``dataengine profile NAME [--dry-run] [--params params.yaml]``."""
    parser = argparse.ArgumentParser(
        prog="dataengine profile",
        description="Run the pipeline with a params profile (profiles/NAME.yaml) as a DVC experiment: "
        "dvc exp run -n NAME -S key=value ... Compare with `dvc exp show` or `dvc metrics diff`.",
    )
    parser.add_argument("name", help="profile name (profiles/NAME.yaml) or a path to a profile file")
    parser.add_argument("--params", default="params.yaml", help="base params file (default: params.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command instead of running it")
    parser.add_argument("--queue", action="store_true", help="queue the experiment (dvc exp run --queue)")
    args = parser.parse_args(argv)
    path = Path(args.name) if args.name.endswith((".yaml", ".yml")) else Path("profiles") / f"{args.name}.yaml"
    try:
        overrides = profile_overrides(path, args.params)
    except (FileNotFoundError, ParamsError) as err:
        print(f"dataengine profile: {err}", file=sys.stderr)
        return 2
    cmd = ["dvc", "exp", "run", "-n", path.stem] + (["--queue"] if args.queue else [])
    for key, value in overrides.items():
        if value is None:  # removal (see merge)
            cmd += ["-S", f"~{key}"]
        else:
            cmd += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.call(cmd)
