"""Safe file I/O: atomic writes (temp file + rename) and paths that cannot escape their root.

A stage that is killed half-way never leaves a half-written file under its final name: every write goes to a
temporary file in the same directory, is flushed and fsync'ed, then renamed over the target (``os.replace`` is
atomic on POSIX within one file system).

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_json(d / "m.json", {"a": 1})
    >>> read_json(d / "m.json")
    {'a': 1}
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PathEscapeError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "remove_temp_files",
    "safe_join",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


class PathEscapeError(ValueError):
    """A dataset-relative path points outside its root (``..``, an absolute path, or a symlink out)."""


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on clean exit fsync it and rename it onto ``path``.

    On an exception (including ``OSError`` for a full disk) the temporary file is removed and ``path`` is left
    as it was. Parent directories are created.

    Args:
        path: Final file name.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        fsync: Flush to disk before the rename (default). ``False`` still never shows a half-written file to a
            process that is killed (the page cache survives it) but may lose the file on a power cut; for many
            small files whose caller can re-check them (an fsync costs ~5 ms here).

    Raises:
        OSError: The directory is read-only or the disk is full; the message names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is not None and not isinstance(cause, FileNotFoundError):
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from err
        raise


def _os_error(err: BaseException) -> OSError | None:
    """``err`` if it is an ``OSError``, else an ``OSError`` it was raised while handling (``None`` if none).

    A writer whose clean-up fails after a failed write hides the real reason: ``torch.save`` on a full disk raises
    ``RuntimeError("[enforce fail at inline_container.cc] unexpected pos ...")`` while handling the ``OSError``
    (EFBIG, ENOSPC) of the write itself.
    """
    if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: never turned into a write error
        return None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def remove_temp_files(path: str | Path) -> list[Path]:
    """Remove what :func:`atomic_write` leaves next to ``path`` when its process is killed mid-write.

    A ``SIGKILL`` (or a power cut) during a write skips the clean-up, leaving ``.<name>.<random>.tmp`` beside the
    target. It is never taken for the target, but inside a DVC output folder it would be cached with it; a stage
    that writes ``path`` calls this before it starts (a single writer per file is assumed).

    Returns:
        The files removed.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / ".m.json.abc123.tmp").write_text("half")
        >>> [p.name for p in remove_temp_files(d / "m.json")]
        ['.m.json.abc123.tmp']
    """
    path = Path(path)
    removed = []
    for tmp in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write` for ``fsync``)."""
    with atomic_write(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a trailing newline keeps diffs clean)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a parse error names the file, line and column."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None


def safe_join(root: str | Path, relative: str) -> Path:
    """Join a dataset-relative file name to its root, refusing anything that escapes the root.

    Refused: absolute paths, ``..`` components that leave the root, and symlinks (anywhere along the path)
    that resolve outside the root.

    Args:
        root: The dataset's image root.
        relative: A file name from an annotation file.

    Returns:
        The joined path (not resolved, so error messages stay readable).

    Raises:
        PathEscapeError: With the offending name and the root.

    Example:
        >>> safe_join("/data", "a/b.png").as_posix()
        '/data/a/b.png'
    """
    if not isinstance(relative, str) or not relative:
        raise PathEscapeError(f"file name {relative!r} is empty or not a string (root {root})")
    if os.path.isabs(relative) or relative.startswith(("\\", "/")) or (len(relative) > 1 and relative[1] == ":"):
        raise PathEscapeError(f"file name {relative!r} is an absolute path; it must be relative to {root}")
    root_path = Path(root)
    joined = root_path / relative
    root_real = os.path.realpath(root_path)
    real = os.path.realpath(joined)
    if os.path.commonpath([root_real, real]) != root_real:
        kind = "a symlink that points" if os.path.normpath(str(joined)).startswith(os.path.normpath(str(root_path))) \
            and ".." not in Path(relative).parts else "a path that goes"
        raise PathEscapeError(f"file name {relative!r} is {kind} outside the dataset root {root}")
    return joined
