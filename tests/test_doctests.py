"""Every docstring example runs: the library's and the benchmark scripts' (doctest; the stage scripts have none).

``pytest --doctest-modules`` cannot collect both with the suite: ``benchmarks/`` and ``pipelines/`` share file names
(``pseudo_label.py``, ``rebalance.py``), which pytest's default import mode refuses, and the suite's test modules
import their helpers in that mode. So each folder gets its own pytest run in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["dataengine", "benchmarks"])
def test_docstring_examples_run(folder: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--doctest-modules", "-p", "no:cacheprovider",
                             "-o", "addopts=", folder], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]  # collected and ran examples, not zero
