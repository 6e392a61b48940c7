"""How a stage script ends on bad input or a storage fault: one line naming the file, exit status 1, no traceback.

A full disk, a read-only output folder, a missing input, a corrupt checkpoint or a bad params key is not a bug
of the stage: the user needs the path and the reason, not forty lines of traceback from inside PyTorch. Every
``pipelines/<stage>.py`` ends with ``sys.exit(run_stage("<stage>", main))``.

Reported this way (``<stage>: error: <message>``, exit 1):

- ``OSError`` and its subclasses: ENOSPC, EDQUOT, EFBIG (a file size limit), EROFS, EACCES, ENOENT, ... The message
  is the reason and the path (:func:`dataengine.io.atomic_write` puts ``cannot write <path>`` in it).
- Exceptions that ``dataengine`` defines for bad input (``ParamsError``, ``CheckpointError``, ``ImageReadError``,
  ``CocoFormatError``, ``DataValidationError``, ...): their messages carry the file and what was expected
  (STYLE rule 7).

Anything else is a bug and keeps its traceback, as does everything when ``DATAENGINE_TRACEBACK=1`` is set.
Output files are not cleaned up here: every write is atomic, so a failed stage leaves no half-written file under
a final name (the stages' tests check this under a real file size limit and a real read-only folder).

Example:
    >>> def main() -> int:
    ...     raise PermissionError(13, "Permission denied", "models/teacher/last.pt")
    >>> run_stage("train_teacher", main)  # doctest: +SKIP
    train_teacher: error: Permission denied: models/teacher/last.pt
    1
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["TRACEBACK_ENV", "error_line", "is_reported", "run_stage"]

TRACEBACK_ENV = "DATAENGINE_TRACEBACK"
"""Set to ``1`` to get the full traceback of a reported error (for a bug report)."""


def is_reported(err: BaseException) -> bool:
    """True for the errors :func:`run_stage` reports as one line: ``OSError`` and ``dataengine``'s own exceptions."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, Exception) and any(
        cls.__module__ == "dataengine" or cls.__module__.startswith("dataengine.") for cls in type(err).__mro__)


def error_line(err: BaseException) -> str:
    """The message of ``err``; for an ``OSError`` ``"<reason>: <path>"`` without the ``[Errno N]`` prefix.

    Example:
        >>> error_line(PermissionError(13, "Permission denied", "out/x.json"))
        'Permission denied: out/x.json'
        >>> error_line(OSError(28, "cannot write out/x.json: No space left on device"))
        'cannot write out/x.json: No space left on device'
    """
    if isinstance(err, OSError) and err.strerror:
        paths = [p for p in (err.filename, err.filename2) if p is not None]
        return err.strerror + "".join(f": {os.fsdecode(p)}" for p in paths)
    return str(err) or type(err).__name__


def run_stage(name: str, main: Callable[[], int | None]) -> int:
    """Run a stage's ``main()``; report bad input and storage faults as ``<name>: error: ...`` and return 1.

    Args:
        name: The stage name, as in ``dvc.yaml``.
        main: The script's ``main``; its return value is the exit status.

    Returns:
        ``main``'s exit status (``None`` counts as 0), or 1 after a reported error.

    Raises:
        Exception: Whatever :func:`is_reported` does not cover, unchanged (a bug: the traceback is wanted).
    """
    try:
        return int(main() or 0)
    except Exception as err:
        if not is_reported(err) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"{name}: error: {error_line(err)}", file=sys.stderr, flush=True)
        return 1
