"""What the review tools show: the filter's bands, the teacher's raw output and the images, in one record form.

Every review adapter (FiftyOne, Label Studio) and the ``review`` stage read the pipeline's outputs through
:func:`load_review_inputs`, so they agree on ids, classes and box convention. A *record* is the filter's record
(:mod:`dataengine.pseudo.filter`): ``{"id": "<file_name>#<i>", "file_name", "width", "height", "bbox": [x1, y1, x2,
y2] (original pixels), "category_id", "class_name", "score", "probability", "consistency", ...}``; review records also
carry ``risk`` and ``threshold``, rejected ones ``reason``. Accepted COCO annotations are turned into records here
(``pseudo_id`` becomes ``id``, ``xywh`` becomes ``xyxy``). The *audit* is the filter's seeded random sample of
accepted labels per class, for a person to check (the filter re-calibrates from those decisions): records of the
review form plus ``audit_rank`` (0-based, the order to review them in), each id an accepted label's id.

Paths (all from the command line, defaults as laid out by ``dvc.yaml``)::

    data/filtered/accepted.json, review_queue.json, rejected.json, semantic/  (stage filter)
    data/filtered/audit.json (optional: absent in older outputs = no audit)   (stage filter)
    data/pseudo/pool/predictions.json, seg/                                   (stage pseudo_label)
    data/prepared/scenario/pool/, data/prepared/general/{train,val}.json      (stage prepare)

Example:
    >>> inputs = load_review_inputs("data/filtered", "data/pseudo", "data/prepared")  # doctest: +SKIP
    >>> inputs.class_names  # doctest: +SKIP
    ['circle', 'square', 'triangle', 'star', 'cross']
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataengine.boxes import coco_to_xyxy
from dataengine.data.layout import PreparedLayout
from dataengine.io import read_json

__all__ = ["ReviewInputs", "ReviewInputsError", "load_review_inputs", "accepted_records"]


class ReviewInputsError(ValueError):
    """A pipeline output the review tools read is unreadable or out of step with the others (the message names it)."""


@dataclass
class ReviewInputs:
    """The pipeline's outputs a reviewer looks at (see the module docstring for the record form)."""

    class_names: list[str]
    category_ids: list[int]
    pool_root: Path  # scenario pool images; record file_names are relative to it
    images: list[dict[str, Any]]  # every pool image: {"file_name", "width", "height", "seg": {...} | None,
    #                               "semantic_file": str | None (relative to semantic_root)}
    accepted: list[dict[str, Any]]
    review: list[dict[str, Any]]  # ranked by decreasing risk
    rejected: list[dict[str, Any]]
    raw: list[dict[str, Any]]  # the teacher's fused TTA output, every box (records without probability/risk)
    seg_root: Path | None  # folder of predictions' "seg" paths (label / confidence / uncertainty PNGs)
    semantic_root: Path | None  # filtered semantic masks (255 = ignored pixel), per image "semantic_file"
    model_version: str = "teacher"  # "teacher-<first 12 hex of the pseudo-labels' fingerprint>"
    general: dict[str, Path] = field(default_factory=dict)  # split -> COCO file (file_name relative to general_root)
    general_root: Path | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)  # accepted labels to check, by audit_rank

    def records_by_id(self) -> dict[str, dict[str, Any]]:
        """Every filtered label (accepted, review, rejected) by id, each with its ``band``."""
        out: dict[str, dict[str, Any]] = {}
        for band in ("accepted", "review", "rejected"):
            for record in getattr(self, band):
                out[record["id"]] = {**record, "band": band}
        return out

    def by_image(self, band: str) -> dict[str, list[dict[str, Any]]]:
        """Records of ``band`` ("accepted", "review", "rejected" or "raw") grouped by ``file_name``."""
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in getattr(self, band):
            grouped[record["file_name"]].append(record)
        return dict(grouped)


def accepted_records(accepted_coco: dict[str, Any]) -> list[dict[str, Any]]:
    """The accepted COCO annotations as records (``xyxy`` boxes, ``id`` = the annotation's ``pseudo_id``)."""
    images = {img["id"]: img for img in accepted_coco["images"]}
    names = {c["id"]: c["name"] for c in accepted_coco["categories"]}
    records = []
    for ann in accepted_coco["annotations"]:
        img = images[ann["image_id"]]
        records.append({
            "id": ann["pseudo_id"],
            "file_name": img["file_name"],
            "width": img["width"],
            "height": img["height"],
            "bbox": [round(float(v), 2) for v in coco_to_xyxy([ann["bbox"]])[0]],
            "category_id": ann["category_id"],
            "class_name": names[ann["category_id"]],
            "score": ann.get("score"),
            "probability": ann.get("probability"),
            "consistency": ann.get("consistency"),
        })
    return records


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as err:  # read_json's message names the file, line and column
        raise ReviewInputsError(f"{err}: re-run the stage that writes it (`dvc repro`)") from None


def _audit_records(path: Path, accepted_ids: set[str]) -> list[dict[str, Any]]:
    """The audit file's records in ``audit_rank`` order, each checked to be an accepted label.

    Raises:
        ReviewInputsError: A record's id is not an accepted label id (the message names the file).
    """
    audit = _read(path)
    for record in audit:
        if record["id"] not in accepted_ids:
            raise ReviewInputsError(f"{path}: audit label {record['id']!r} is not an accepted label (accepted.json "
                                    "has no annotation with that pseudo_id): the filter outputs are out of step, "
                                    "re-run `dvc repro filter`")
    return sorted(audit, key=lambda r: r["audit_rank"])


def load_review_inputs(filtered: str | Path, pseudo: str | Path, prepared: str | Path) -> ReviewInputs:
    """Read the filter, pseudo_label and prepare outputs into :class:`ReviewInputs`.

    ``<filtered>/audit.json`` is optional: without it (older filter outputs) the audit is empty.

    Raises:
        FileNotFoundError: A required output is missing; the message names it and the stage that writes it.
        ReviewInputsError: An output is not valid JSON, or an audit label is not an accepted label.
    """
    filtered, pseudo, layout = Path(filtered), Path(pseudo), PreparedLayout(prepared)
    needed = {
        filtered / "accepted.json": "filter",
        filtered / "review_queue.json": "filter",
        filtered / "rejected.json": "filter",
        pseudo / "pool" / "predictions.json": "pseudo_label",
    }
    for path, stage in needed.items():
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `dvc repro {stage}` first")
    accepted_coco = _read(filtered / "accepted.json")
    predictions = _read(pseudo / "pool" / "predictions.json")
    class_names = list(predictions["class_names"])
    category_ids = list(predictions["category_ids"])
    name_of = dict(zip(category_ids, class_names))
    sizes = {img["file_name"]: (img["width"], img["height"]) for img in predictions["images"]}
    counters: dict[str, int] = defaultdict(int)
    raw = []
    for box in predictions["boxes"]:  # ids as the filter numbers them: the box's index within its image
        name = box["file_name"]
        raw.append({**box, "id": f"{name}#{counters[name]}", "width": sizes[name][0], "height": sizes[name][1],
                    "class_name": name_of[box["category_id"]]})
        counters[name] += 1
    accepted = accepted_records(accepted_coco)
    audit_path = filtered / "audit.json"
    audit = _audit_records(audit_path, {r["id"] for r in accepted}) if audit_path.exists() else []
    semantic_root = filtered / accepted_coco["semantic_root"] if accepted_coco.get("semantic_root") else None
    semantic_files = {img["file_name"]: img.get("semantic_file") for img in accepted_coco["images"]}
    images = [{**img, "semantic_file": semantic_files.get(img["file_name"])} for img in predictions["images"]]
    general = {split: path for split, path in (("train", layout.general_train), ("val", layout.general_val))
               if path.exists()}
    return ReviewInputs(
        class_names=class_names,
        category_ids=category_ids,
        pool_root=layout.pool_images,
        images=images,
        accepted=accepted,
        review=_read(filtered / "review_queue.json"),
        rejected=_read(filtered / "rejected.json"),
        raw=raw,
        seg_root=pseudo / "pool",
        semantic_root=semantic_root,
        model_version=f"teacher-{str(predictions.get('fingerprint', ''))[:12]}",
        general=general,
        general_root=layout.general_images if general else None,
        audit=audit,
    )
