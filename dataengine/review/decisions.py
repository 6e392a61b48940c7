"""The decisions file: what reviewers decided, versioned as data (``data/review/decisions.json``).

DVC cannot wait for a person, so review is split: ``dataengine review pull`` / ``dataengine review labelstudio
pull`` read the reviewers' work out of the review tools and write this file; the deterministic ``review`` stage
reads it. The file is small JSON, tracked in git, written with sorted keys and one entry per line block so a
``git diff`` reads as the list of what changed.

Schema (``version`` 1)::

    {
      "version": 1,
      "labels": {                                   # one entry per pseudo-label a person decided on
        "<label id>": {                             # the filter's stable id "<file_name>#<i>"
          "file_name": "cam0/00004.png",
          "decision": "accept" | "reject" | "correct",
          "bbox": [x1, y1, x2, y2],                 # "correct" only: the corrected box, original pixels
          "class_name": "circle",                   # "correct" only: the corrected class
          "original": {"bbox": [...], "class_name": "square"},  # what the reviewer saw (optional): lets the
                                                    # review stage notice a decision made on another teacher's box
          "source": "fiftyone" | "labelstudio" | "simulated",   # simulated: benchmarks only
          "user": "ann@example.com" | null,         # who, where the tool knows it
          "time": "2026-11-23T10:00:00Z" | null     # when, where the tool knows it (else: first pulled)
        }
      },
      "images": {                                   # per image: flags and boxes a person added
        "<file_name>": {
          "flags": ["negative", "relabel"],         # sorted; negative = verified hard negative (no object),
                                                    # relabel = labels unusable until relabelled
          "added": [{"bbox": [x1, y1, x2, y2], "class_name": "star"}],   # sorted by (class, box)
          "source": ..., "user": ..., "time": ...
        }
      }
    }

Decisions:

- ``accept``: the label is right as the teacher gave it (a review-band label is promoted into the training set);
- ``reject``: the label is wrong and is removed;
- ``correct``: the object is real but the box and/or class were wrong; ``bbox`` and ``class_name`` replace them.

Merging a pull (:func:`merge_pulled`): a pull reads *all* of one tool's current review state, so its entries
replace that tool's earlier entries: a new or changed decision is written (with the pull's time), an unchanged one
keeps its earlier ``time``/``user`` (so a pull with nothing new leaves the file byte-identical), and an entry that
came from this tool but is no longer there (the reviewer removed a tag) is dropped. Entries from the other tool
are kept unless this tool decided on the same label (last pull wins; ``source`` says which).

Example:
    >>> d = empty_decisions()
    >>> pulled = {"labels": {"a.png#0": label_decision("a.png", "reject", source="fiftyone")}, "images": {}}
    >>> merged, changed = merge_pulled(d, pulled, source="fiftyone", now="2026-01-01T00:00:00Z")
    >>> merged["labels"]["a.png#0"]["decision"], changed
    ('reject', True)
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dataengine.io import atomic_write_text

__all__ = [
    "DECISIONS_VERSION",
    "LABEL_DECISIONS",
    "IMAGE_FLAGS",
    "SOURCES",
    "DecisionsError",
    "empty_decisions",
    "label_decision",
    "image_decision",
    "validate_decisions",
    "load_decisions",
    "dumps_decisions",
    "write_decisions",
    "merge_pulled",
    "attach_originals",
    "utc_now",
    "format_time",
    "label_id",
    "split_label_id",
]

DECISIONS_VERSION = 1
LABEL_DECISIONS = ("accept", "reject", "correct")
IMAGE_FLAGS = ("negative", "relabel")
SOURCES = ("fiftyone", "labelstudio", "simulated")  # simulated: benchmarks only (dataengine.review.oracle)
_META = ("source", "user", "time")  # fields that do not make two decisions different


class DecisionsError(ValueError):
    """The decisions file (or a pulled record) does not follow the schema; the message names the key."""


def format_time(moment: _dt.datetime) -> str:
    """The decisions file's time format: UTC, seconds precision, ISO-8601 with a ``Z`` (naive means UTC).

    Example:
        >>> format_time(_dt.datetime(2026, 1, 2, 3, 4, 5, 678))
        '2026-01-02T03:04:05Z'
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def utc_now() -> str:
    """The current UTC time in the decisions file's format (:func:`format_time`)."""
    return format_time(_dt.datetime.now(_dt.timezone.utc))


def label_id(file_name: str, index: int) -> str:
    """The filter's stable id of the ``index``-th box of ``file_name`` (see :mod:`dataengine.pseudo.filter`)."""
    return f"{file_name}#{index}"


def split_label_id(lid: str) -> tuple[str, int]:
    """Inverse of :func:`label_id`: ``"a/b.png#3"`` -> ``("a/b.png", 3)``.

    Raises:
        DecisionsError: ``lid`` is not of the form ``<file_name>#<non-negative int>``.
    """
    file_name, sep, index = lid.rpartition("#")
    if not sep or not file_name or not index.isdigit():
        raise DecisionsError(f"label id {lid!r} is not of the form '<file_name>#<index>'")
    return file_name, int(index)


def empty_decisions() -> dict[str, Any]:
    """A decisions document with no decision (what the ``review`` stage assumes when the file is absent)."""
    return {"version": DECISIONS_VERSION, "labels": {}, "images": {}}


def _box(bbox: Sequence[float], where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DecisionsError(f"{where}: 'bbox' must be [x1, y1, x2, y2], got {bbox!r}")
    try:
        out = [round(float(v), 2) for v in bbox]
    except (TypeError, ValueError):
        raise DecisionsError(f"{where}: 'bbox' must hold 4 numbers, got {bbox!r}") from None
    if not all(math.isfinite(v) for v in out) or out[2] <= out[0] or out[3] <= out[1]:
        raise DecisionsError(f"{where}: 'bbox' must be finite with x2 > x1 and y2 > y1, got {bbox!r}")
    return out


def label_decision(
    file_name: str,
    decision: str,
    *,
    source: str,
    bbox: Sequence[float] | None = None,
    class_name: str | None = None,
    user: str | None = None,
    time: str | None = None,
    original: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one label entry (validated; boxes rounded to 0.01 px so re-pulls compare equal).

    Example:
        >>> label_decision("a.png", "correct", source="labelstudio", bbox=[1, 2, 30, 40], class_name="star")["bbox"]
        [1.0, 2.0, 30.0, 40.0]
    """
    entry: dict[str, Any] = {"file_name": file_name, "decision": decision, "source": source, "user": user,
                             "time": time}
    if decision == "correct":
        entry["bbox"] = bbox
        entry["class_name"] = class_name
    if original is not None:
        entry["original"] = {"bbox": original.get("bbox"), "class_name": original.get("class_name")}
    _check_label(entry, f"label of {file_name}")
    if decision == "correct":
        entry["bbox"] = _box(bbox, f"label of {file_name}")  # type: ignore[arg-type]
    if original is not None:
        entry["original"]["bbox"] = _box(original["bbox"], f"label of {file_name}: original")
    return entry


def attach_originals(pulled: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Return a copy of ``pulled`` whose label entries carry ``original`` (box and class) from ``records``.

    Args:
        pulled: ``{"labels": {...}, "images": {...}}`` as a review adapter builds it.
        records: Record by label id (every band of :class:`~dataengine.review.inputs.ReviewInputs`).
    """
    out = copy.deepcopy(dict(pulled))
    for lid, entry in out.get("labels", {}).items():
        record = records.get(lid)
        if record is not None and "original" not in entry:
            entry["original"] = {"bbox": _box(record["bbox"], lid), "class_name": record["class_name"]}
    return out


def image_decision(
    *,
    source: str,
    flags: Iterable[str] = (),
    added: Iterable[Mapping[str, Any]] = (),
    user: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """Build one image entry: sorted unique ``flags`` and sorted ``added`` boxes (``{"bbox", "class_name"}``)."""
    boxes = [{"bbox": _box(a["bbox"], "added box"), "class_name": str(a["class_name"])} for a in added]
    entry = {
        "flags": sorted(set(flags)),
        "added": sorted(boxes, key=lambda a: (a["class_name"], a["bbox"])),
        "source": source,
        "user": user,
        "time": time,
    }
    _check_image(entry, "image entry")
    return entry


def _check_meta(entry: Mapping[str, Any], where: str) -> None:
    if entry.get("source") not in SOURCES:
        raise DecisionsError(f"{where}: 'source' must be one of {', '.join(SOURCES)}, got {entry.get('source')!r}")
    for key in ("user", "time"):
        if entry.get(key) is not None and not isinstance(entry.get(key), str):
            raise DecisionsError(f"{where}: '{key}' must be a string or null, got {entry.get(key)!r}")


def _check_label(entry: Mapping[str, Any], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise DecisionsError(f"{where}: expected an object, got {type(entry).__name__}")
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        raise DecisionsError(f"{where}: 'file_name' must be a non-empty string")
    decision = entry.get("decision")
    if decision not in LABEL_DECISIONS:
        raise DecisionsError(f"{where}: 'decision' must be one of {', '.join(LABEL_DECISIONS)}, got {decision!r}")
    if decision == "correct":
        _box(entry.get("bbox"), where)  # type: ignore[arg-type]
        if not isinstance(entry.get("class_name"), str) or not entry["class_name"]:
            raise DecisionsError(f"{where}: a 'correct' decision needs 'class_name' (the corrected class)")
    original = entry.get("original")
    if original is not None:
        if not isinstance(original, Mapping) or not isinstance(original.get("class_name"), str):
            raise DecisionsError(f"{where}: 'original' must be {{'bbox', 'class_name'}}, got {original!r}")
        _box(original.get("bbox"), f"{where}: original")  # type: ignore[arg-type]
    _check_meta(entry, where)


def _check_image(entry: Mapping[str, Any], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise DecisionsError(f"{where}: expected an object, got {type(entry).__name__}")
    flags = entry.get("flags", [])
    if not isinstance(flags, list) or any(f not in IMAGE_FLAGS for f in flags):
        raise DecisionsError(f"{where}: 'flags' must be a list drawn from {', '.join(IMAGE_FLAGS)}, got {flags!r}")
    added = entry.get("added", [])
    if not isinstance(added, list):
        raise DecisionsError(f"{where}: 'added' must be a list of {{'bbox', 'class_name'}}, got {added!r}")
    for i, box in enumerate(added):
        if not isinstance(box, Mapping) or not isinstance(box.get("class_name"), str):
            raise DecisionsError(f"{where}: added[{i}] needs 'bbox' and 'class_name', got {box!r}")
        _box(box.get("bbox"), f"{where}: added[{i}]")  # type: ignore[arg-type]
    _check_meta(entry, where)


def validate_decisions(doc: Any, where: str = "decisions") -> dict[str, Any]:
    """Check a decisions document against the schema and return it.

    Raises:
        DecisionsError: Naming ``where`` and the offending key (e.g. ``labels['a.png#0'].decision``).
    """
    if not isinstance(doc, Mapping):
        raise DecisionsError(f"{where}: expected a JSON object with 'version', 'labels', 'images'")
    if doc.get("version") != DECISIONS_VERSION:
        raise DecisionsError(f"{where}: 'version' must be {DECISIONS_VERSION}, got {doc.get('version')!r}")
    unknown = sorted(set(doc) - {"version", "labels", "images"})
    if unknown:
        raise DecisionsError(f"{where}: unknown key {unknown[0]!r}; allowed: version, labels, images")
    for key in ("labels", "images"):
        if not isinstance(doc.get(key, {}), Mapping):
            raise DecisionsError(f"{where}: '{key}' must be an object keyed by id")
    for lid, entry in doc.get("labels", {}).items():
        split_label_id(lid)
        _check_label(entry, f"{where}: labels[{lid!r}]")
        if entry["file_name"] != split_label_id(lid)[0]:
            raise DecisionsError(f"{where}: labels[{lid!r}].file_name is {entry['file_name']!r}, "
                                 f"but the id belongs to {split_label_id(lid)[0]!r}")
    for name, entry in doc.get("images", {}).items():
        _check_image(entry, f"{where}: images[{name!r}]")
    return {"version": DECISIONS_VERSION, "labels": dict(doc.get("labels", {})), "images": dict(doc.get("images", {}))}


def load_decisions(path: str | Path) -> dict[str, Any]:
    """Read and validate a decisions file; a missing file is an empty document (no decision yet).

    Raises:
        DecisionsError: The file is not valid JSON or breaks the schema (the message names the file and key).
    """
    path = Path(path)
    if not path.exists():
        return empty_decisions()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DecisionsError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    return validate_decisions(doc, str(path))


def dumps_decisions(doc: Mapping[str, Any]) -> str:
    """The canonical text of a decisions document: sorted keys, 1-space indent, trailing newline."""
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_decisions(path: str | Path, doc: Mapping[str, Any]) -> bool:
    """Write ``doc`` atomically unless the file already holds exactly this text.

    Returns:
        Whether the file was (re)written. An unchanged document leaves the file (and its mtime) untouched, so a
        pull with nothing new changes nothing, not even for ``make``-like tools.
    """
    path = Path(path)
    text = dumps_decisions(validate_decisions(doc, str(path)))
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    strip = lambda e: {k: v for k, v in e.items() if k not in _META}  # noqa: E731
    return strip(a) == strip(b)


def merge_pulled(
    existing: Mapping[str, Any], pulled: Mapping[str, Any], *, source: str, now: str | None = None
) -> tuple[dict[str, Any], bool]:
    """Merge one tool's complete pulled state into the decisions document (see the module docstring).

    Args:
        existing: The current decisions document (not modified).
        pulled: ``{"labels": {...}, "images": {...}}`` with every decision the tool holds now; entries whose
            ``time`` is ``None`` get ``now``.
        source: The tool pulled from (``"fiftyone"`` or ``"labelstudio"``).
        now: The pull's time (default :func:`utc_now`); tests pass a fixed value.

    Returns:
        ``(merged, changed)``: the new document and whether it differs from ``existing``.
    """
    if source not in SOURCES:
        raise DecisionsError(f"unknown review source {source!r}; expected one of {', '.join(SOURCES)}")
    now = now or utc_now()
    merged = copy.deepcopy(validate_decisions(existing))
    for section in ("labels", "images"):
        current = merged[section]
        incoming = pulled.get(section, {})
        for key in [k for k, e in current.items() if e.get("source") == source and k not in incoming]:
            del current[key]  # the reviewer took this decision back in the tool
        for key, entry in incoming.items():
            if entry.get("source") != source:
                raise DecisionsError(f"pulled {section}[{key!r}] has source {entry.get('source')!r}, not {source!r}")
            old = current.get(key)
            if old is not None and old.get("source") == source and _same(old, entry):
                continue  # unchanged: keep who/when of the first pull
            new = dict(entry)
            new["time"] = new.get("time") or now
            current[key] = new
    merged = validate_decisions(merged)
    changed = dumps_decisions(merged) != dumps_decisions(validate_decisions(existing))
    return merged, changed
