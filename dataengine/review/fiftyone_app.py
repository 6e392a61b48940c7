"""FiftyOne adapter: the review dataset, its saved views, the App, and the pull of the reviewers' work.

``dataengine review open`` builds (or updates) a persistent FiftyOne dataset from the pipeline's outputs
(:func:`~dataengine.review.inputs.load_review_inputs`) and launches the App on ``review.app_address`` (127.0.0.1 by
default) and ``review.app_port``; ``dataengine review pull`` reads what the reviewers did in it and writes the
decisions file (:mod:`dataengine.review.decisions`). The database is FiftyOne's embedded MongoDB unless
``FIFTYONE_DATABASE_URI`` points at a team's own.

The dataset (one sample per image, keyed by its absolute ``filepath``, so a re-run never duplicates samples):

- scenario pool images, tag ``scenario``, fields ``file_name`` (relative to the pool: the decisions' key),
  ``accepted`` / ``review`` / ``rejected`` (the filter's bands) and ``teacher`` (the teacher's fused output) as
  ``fo.Detections``; ``segmentation`` (the filtered semantic mask: category ids, 255 = ignored pixel) and
  ``teacher_segmentation`` (the teacher's label PNG, values label + 1) as ``fo.Segmentation``, ``uncertainty`` as
  ``fo.Heatmap`` (0-255), ``max_risk`` (the highest risk of its review labels) and ``audit_rank`` (the smallest
  audit rank of its accepted labels, ``None`` outside the audit) for sorting;
- general ground-truth images, tag ``general``, fields ``ground_truth`` (``fo.Detections``) and ``split``.

Every pseudo-label detection carries ``pseudo_id`` (the filter's id ``<file_name>#<i>``), ``confidence`` (the
teacher's score), ``probability``, ``consistency``, ``risk`` (review band), ``reason`` (rejected band) and what the
teacher gave, ``pseudo_bbox`` (xyxy pixels) and ``pseudo_label``, so a pull can tell an edited box from the
original; accepted detections in the filter's audit (``audit.json``: a seeded random sample of accepted labels per
class) also carry ``audit=True`` and ``audit_rank``. Saved views: ``review_queue`` (images with review-band labels,
highest risk first), ``rejected_confident`` (rejected labels with confidence >= ``review.confident_reject_score``),
``hard_negatives`` (images without an accepted label whose teacher still has a box with confidence >=
``review.hard_negative_score``) and, when the audit is not empty, ``audit`` (images with an audited label, lowest
``audit_rank`` first, ``accepted`` showing only the audited labels: a reviewer tags each ``accept`` or ``reject``,
and the filter re-calibrates its thresholds from these decisions). The App shows ``accepted``, ``review`` and
``ground_truth`` by default (the other fields are one click away in the sidebar; a choice saved in the App is kept
on re-runs).

**Mined hard negatives.** When the ``mine`` stage's ``hard_negatives.json`` exists (``--mined``, default
``data/mined`` beside ``--filtered``), its images (scenario and general) get ``hard_negative_regions``
(``fo.Detections``: the teacher's boxes that became regions, ``confidence`` its score), ``hard_negative_reasons`` and
``hard_negative_map`` (``fo.Segmentation`` of the map: 1 region, 2 hard pixel, 3 both), and the saved view
``mined_hard_negatives`` lists them (:func:`apply_mined_hard_negatives`). It is a view of its own, not a new
``hard_negatives``: that one is the reviewers' *input* (candidates to tag ``negative``, from the filter's bands),
the mined set is an *output* computed from their decisions, general train included; mixing the two would make the
review queue depend on a stage downstream of the review.

**Heavy fields are capped.** The teacher keeps every low-score box (the demo: 98k boxes on 600 images, 96k of them
rejected), which makes the dataset slow to write and the App unreadable. ``teacher`` and ``rejected`` therefore
hold, per image, the ``max_per_image`` highest-scoring boxes with score >= ``min_score`` (defaults
:data:`TEACHER_MAX_PER_IMAGE`, :data:`TEACHER_MIN_SCORE`; ``--max-per-image`` / ``--min-score``), plus every box at
or above the saved views' thresholds. ``accepted`` and ``review`` are never capped. The counts shown and dropped
are printed and kept in ``dataset.info["dataengine"]``.

**Re-running keeps the reviewers' work**: in ``accepted`` / ``review`` / ``rejected`` a detection the reviewer
touched (label tags, or a box or class that differs from ``pseudo_bbox`` / ``pseudo_label``) is kept as it is (it
moves with its ``pseudo_id`` if the filter moved the label to another band), untouched ones are refreshed, new ones
added, vanished ones removed; detections a reviewer added (no ``pseudo_id``) stay. ``teacher`` and the
segmentation fields are replaced. Scenario samples whose image left the pool are deleted.

Reviewer conventions (also in ``dataengine review open --help``):

- label tag ``accept`` / ``reject`` on a detection in ``accepted``, ``review`` or ``rejected``: the label is right /
  wrong. ``reject`` wins over everything else on the same label;
- a detection whose ``bounding_box`` or ``label`` was edited (in the App's Annotate tab, through an annotation
  backend such as CVAT or Label Studio via ``dataset.annotate()``, or in Python): a correction;
- a new detection without ``pseudo_id`` in ``accepted``, ``review`` or ``rejected``: a box the reviewer added;
- sample tag ``negative`` (a verified hard negative: no object) / ``relabel`` (labels unusable): image flags.

Tags elsewhere (the ``teacher`` field, other names) are not decisions; a pull counts and reports them.

Example:
    >>> inputs = load_review_inputs("data/filtered", "data/pseudo", "data/prepared")  # doctest: +SKIP
    >>> dataset, summary = build_dataset(inputs, "dataengine-review")  # doctest: +SKIP
    >>> save_review_views(dataset, confident_reject_score=0.5, hard_negative_score=0.5)  # doctest: +SKIP
    >>> pulled = pull_decisions(dataset)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

_TRACKING_CHOSEN = "FIFTYONE_DO_NOT_TRACK" in os.environ
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")  # no usage analytics calls, no App prompt about them

import fiftyone as fo  # noqa: E402
from fiftyone import ViewField as F  # noqa: E402

if not _TRACKING_CHOSEN:
    fo.config.do_not_track = True  # fiftyone may have been imported (and its config read) before this module

from dataengine.boxes import relative_xywh_to_xyxy, xyxy_to_relative_xywh  # noqa: E402
from dataengine.review.decisions import (  # noqa: E402
    image_decision,
    label_decision,
    load_decisions,
    merge_pulled,
    write_decisions,
)
from dataengine.io import read_json  # noqa: E402

__all__ = [
    "BAND_FIELDS",
    "LABEL_TAGS",
    "SAMPLE_TAGS",
    "VIEW_NAMES",
    "AUDIT_VIEW",
    "TEACHER_MAX_PER_IMAGE",
    "TEACHER_MIN_SCORE",
    "record_to_detection",
    "detection_to_record",
    "is_edited",
    "detection_decision",
    "cap_records",
    "build_dataset",
    "save_review_views",
    "mined_to_detections",
    "apply_mined_hard_negatives",
    "app_url",
    "launch_app",
    "pull_decisions",
    "open_cli",
    "pull_cli",
]

BAND_FIELDS = ("accepted", "review", "rejected")  # the filter's bands: where reviewers decide
LABEL_TAGS = ("accept", "reject")
SAMPLE_TAGS = ("negative", "relabel")
VIEW_NAMES = ("review_queue", "rejected_confident", "hard_negatives")
AUDIT_VIEW = "audit"  # saved only when the filter's audit.json lists labels
MINED_VIEW = "mined_hard_negatives"  # saved only when the mine stage's output exists
MINED_FIELDS = ("hard_negative_regions", "hard_negative_reasons", "hard_negative_map")
TEACHER_MAX_PER_IMAGE = 50  # per image, in the teacher and rejected fields (the filter's own max_per_image scale)
TEACHER_MIN_SCORE = 0.05  # below this the teacher's boxes are noise to a reviewer (demo: 61% of all boxes)
SOURCE = "fiftyone"
# Refreshed on re-runs, never a reviewer's; audit / audit_rank only on the accepted labels of the filter's audit.
_PIPELINE_ATTRS = ("probability", "consistency", "risk", "reason", "audit", "audit_rank")
_EDIT_TOLERANCE = 0.02  # pixels; decisions round boxes to 0.01 px

CONVENTIONS = """\
reviewer conventions (what `dataengine review pull` reads):
  label tag 'accept' / 'reject'   on a detection in accepted, review or rejected: the label is right / wrong;
                                  'reject' wins over an edit of the same label
  edited bounding_box or label    (App Annotate tab, dataset.annotate() backends such as CVAT or Label
                                  Studio, or Python): a correction, with the new box and class
  new detection (no pseudo_id)    in accepted, review or rejected: a box the reviewer added
  sample tag 'negative'           the image is a verified hard negative (no object)
  sample tag 'relabel'            the image's labels are unusable until relabelled
Tags on the teacher field are not decisions (it is rebuilt on every `open`); a pull reports them.
"""


# --------------------------------------------------------------------------------------------------------------
# Pure converters: record <-> fo.Detection
# --------------------------------------------------------------------------------------------------------------


def _round_box(box: Iterable[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def record_to_detection(record: Mapping[str, Any]) -> fo.Detection:
    """One filter/teacher record (xyxy pixels) as an ``fo.Detection`` (relative ``[x, y, w, h]``).

    Keeps the pipeline's numbers as attributes (``pseudo_id``, ``confidence`` = score, ``probability``,
    ``consistency``, ``risk``, ``reason``, ``audit``, ``audit_rank`` where present) and what the teacher gave
    (``pseudo_bbox``, xyxy pixels, and ``pseudo_label``), so an edit can be told later (:func:`is_edited`).
    ``record`` is not modified.

    Example:
        >>> d = record_to_detection({"id": "a.png#0", "width": 100, "height": 50, "bbox": [10, 5, 30, 25],
        ...                          "class_name": "circle", "score": 0.9})
        >>> [round(v, 3) for v in d.bounding_box], d.label, d.pseudo_id
        ([0.1, 0.1, 0.2, 0.4], 'circle', 'a.png#0')
    """
    bbox = _round_box(record["bbox"])
    relative = xyxy_to_relative_xywh(bbox, record["width"], record["height"]).tolist()
    attrs = {key: record[key] for key in _PIPELINE_ATTRS if record.get(key) is not None}
    return fo.Detection(
        label=record["class_name"],
        bounding_box=relative,
        confidence=record.get("score"),
        pseudo_id=record["id"],
        pseudo_bbox=bbox,
        pseudo_label=record["class_name"],
        **attrs,
    )


def detection_to_record(detection: fo.Detection, file_name: str, width: float, height: float) -> dict[str, Any]:
    """Inverse of :func:`record_to_detection`: the detection's *current* box (xyxy pixels) and class as a record.

    ``id`` is the ``pseudo_id`` (``None`` for a box a reviewer added); ``score`` is ``confidence``.

    Example:
        >>> r = {"id": "a.png#0", "file_name": "a.png", "width": 100, "height": 50, "bbox": [10.0, 5.0, 30.0, 25.0],
        ...      "class_name": "circle", "score": 0.9}
        >>> detection_to_record(record_to_detection(r), "a.png", 100, 50)["bbox"]
        [10.0, 5.0, 30.0, 25.0]
    """
    bbox = _round_box(relative_xywh_to_xyxy(list(detection.bounding_box), width, height).tolist())
    record: dict[str, Any] = {"id": _attr(detection, "pseudo_id"), "file_name": file_name, "width": width,
                              "height": height, "bbox": bbox, "class_name": detection.label,
                              "score": detection.confidence}
    for key in _PIPELINE_ATTRS:
        if _attr(detection, key) is not None:
            record[key] = _attr(detection, key)
    return record


def _attr(detection: fo.Detection, name: str) -> Any:
    """A detection's (dynamic) attribute, ``None`` where absent."""
    return detection[name] if detection.has_field(name) else None


def is_edited(detection: fo.Detection, width: float, height: float) -> bool:
    """Whether the box or class differs from what the teacher gave (``pseudo_bbox`` / ``pseudo_label``).

    A detection without ``pseudo_id`` (added by a reviewer) is not "edited": it is new.
    """
    original = _attr(detection, "pseudo_bbox")
    if _attr(detection, "pseudo_id") is None or original is None:
        return False
    if detection.label != _attr(detection, "pseudo_label"):
        return True
    current = relative_xywh_to_xyxy(list(detection.bounding_box), width, height).tolist()
    return max(abs(a - b) for a, b in zip(current, original)) > _EDIT_TOLERANCE


def _is_touched(detection: fo.Detection, width: float, height: float) -> bool:
    return bool(detection.tags) or is_edited(detection, width, height)


def detection_decision(
    detection: fo.Detection, file_name: str, width: float, height: float, *, user: str | None = None
) -> dict[str, Any] | None:
    """The label decision a reviewer expressed on one band detection, or ``None`` (no decision, or no
    ``pseudo_id``). ``reject`` tag > edit (``correct``) > ``accept`` tag. Entries carry ``original`` (what the
    reviewer saw) and ``time=None`` (the pull's time is assigned by ``merge_pulled``).

    Raises:
        DecisionsError: An edited box is degenerate (zero width or height).
    """
    if _attr(detection, "pseudo_id") is None:
        return None
    original = {"bbox": list(_attr(detection, "pseudo_bbox")), "class_name": _attr(detection, "pseudo_label")}
    tags = set(detection.tags or ())
    common = {"source": SOURCE, "user": user, "time": None, "original": original}
    if "reject" in tags:
        return label_decision(file_name, "reject", **common)
    if is_edited(detection, width, height):
        current = detection_to_record(detection, file_name, width, height)
        return label_decision(file_name, "correct", bbox=current["bbox"], class_name=current["class_name"], **common)
    if "accept" in tags:
        return label_decision(file_name, "accept", **common)
    return None


def cap_records(records: Sequence[Mapping[str, Any]], *, max_per_image: int, min_score: float,
                keep_score: float = 1.0) -> list[Mapping[str, Any]]:
    """The ``max_per_image`` highest-scoring records with score >= ``min_score``, plus all with score >=
    ``keep_score`` (what the saved views select), in decreasing score (ties: original order). One image's records.

    Example:
        >>> rs = [{"score": s} for s in (0.01, 0.9, 0.3, 0.6)]
        >>> [r["score"] for r in cap_records(rs, max_per_image=1, min_score=0.05, keep_score=0.5)]
        [0.9, 0.6]
    """
    ranked = sorted(records, key=lambda r: -float(r.get("score") or 0.0))
    return [r for i, r in enumerate(ranked)
            if float(r.get("score") or 0.0) >= keep_score
            or (i < max_per_image and float(r.get("score") or 0.0) >= min_score)]


# --------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------


def _detections(items: Iterable[fo.Detection]) -> fo.Detections:
    return fo.Detections(detections=list(items))


def _merge_band_fields(
    records: Mapping[str, list[Mapping[str, Any]]],
    uncapped_ids: Mapping[str, str],
    existing: Mapping[str, fo.Detections | None],
    width: float,
    height: float,
) -> tuple[dict[str, fo.Detections], int]:
    """One image's new band fields: touched detections kept (in the band their id is in now), untouched refreshed.

    Args:
        records: band -> the records to show (capped).
        uncapped_ids: pseudo id -> band for every record of the image (capped or not).
        existing: band -> the detections now in the dataset (``None`` for a new sample).

    Returns:
        ``(band -> fo.Detections, number of touched detections kept)``.
    """
    touched: dict[str, fo.Detection] = {}
    added: dict[str, list[fo.Detection]] = defaultdict(list)
    for band in BAND_FIELDS:
        for det in (existing.get(band).detections if existing.get(band) is not None else []):
            pid = _attr(det, "pseudo_id")
            if pid is None:
                added[band].append(det)  # drawn by a reviewer: stays where it was drawn
            elif pid in uncapped_ids and _is_touched(det, width, height):
                touched[pid] = det
    by_id = {r["id"]: r for band_records in records.values() for r in band_records}
    out: dict[str, fo.Detections] = {}
    kept = 0
    for band in BAND_FIELDS:
        dets = []
        ids = [r["id"] for r in records.get(band, [])]
        ids += [pid for pid in touched if uncapped_ids[pid] == band and pid not in by_id]  # capped but touched
        for pid in ids:
            if pid in touched:
                det = touched[pid]
                record = by_id.get(pid)
                if record is not None:  # the pipeline's numbers are refreshed; box, class, tags are the reviewer's
                    det.confidence = record.get("score")
                    for key in _PIPELINE_ATTRS:
                        det[key] = record.get(key)
                dets.append(det)
                kept += 1
            else:
                dets.append(record_to_detection(by_id[pid]))
        out[band] = _detections(dets + added[band])
    return out, kept


def build_dataset(
    inputs: Any,
    name: str,
    *,
    max_per_image: int = TEACHER_MAX_PER_IMAGE,
    min_score: float = TEACHER_MIN_SCORE,
    keep_score: float = 0.5,
    extra_info: Mapping[str, Any] | None = None,
) -> tuple[fo.Dataset, dict[str, Any]]:
    """Build or update the persistent review dataset ``name`` from :class:`~dataengine.review.inputs.ReviewInputs`.

    See the module docstring for the fields and the update rules. Saved views are written separately
    (:func:`save_review_views`).

    Args:
        inputs: The pipeline outputs (:func:`~dataengine.review.inputs.load_review_inputs`).
        name: The dataset name (``review.dataset_name``).
        max_per_image: Cap of the ``teacher`` and ``rejected`` fields per image (see the module docstring).
        min_score: Score floor of the ``teacher`` and ``rejected`` fields.
        keep_score: Boxes at or above this score are always kept (pass the lowest saved-view threshold).
        extra_info: Merged into ``dataset.info["dataengine"]`` (e.g. the input paths).

    Returns:
        ``(dataset, summary)``; summary: ``samples``, ``new_samples``, ``removed_samples``, ``labels`` (per field),
        ``dropped`` (per capped field), ``kept_reviewer_edits``.
    """
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
    else:
        dataset = fo.Dataset(name)
    dataset.persistent = True
    pool_root = Path(inputs.pool_root).resolve()
    sizes = {img["file_name"]: (img["width"], img["height"]) for img in inputs.images}
    bands = {band: inputs.by_image(band) for band in (*BAND_FIELDS, "raw")}
    audit_rank = {r["id"]: r["audit_rank"] for r in inputs.audit}
    bands["accepted"] = {  # audited accepted labels marked (on copies: the caller's records stay as they are)
        file_name: [{**r, "audit": True, "audit_rank": audit_rank[r["id"]]} if r["id"] in audit_rank else r
                    for r in band_records]
        for file_name, band_records in bands["accepted"].items()}

    # Samples: one per image, keyed by absolute filepath.
    wanted: dict[str, dict[str, Any]] = {}
    for img in inputs.images:
        wanted[str(pool_root / img["file_name"])] = {"kind": "scenario", **img}
    general_seen = 0
    for split, coco_path in sorted(inputs.general.items()):
        coco = read_json(coco_path)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        anns = defaultdict(list)
        for ann in coco["annotations"]:
            anns[ann["image_id"]].append(ann)
        for img in coco["images"]:
            path = str(Path(inputs.general_root).resolve() / img["file_name"])
            if path in wanted:
                general_seen += 1  # listed in two splits: the first split (sorted) wins
                continue
            wanted[path] = {"kind": "general", "split": split, "file_name": img["file_name"], "width": img["width"],
                            "height": img["height"], "annotations": anns[img["id"]], "names": names}
    existing_paths = set(dataset.values("filepath"))
    scenario_paths = set(dataset.match_tags("scenario").values("filepath"))
    stale = sorted(scenario_paths - {p for p, w in wanted.items() if w["kind"] == "scenario"})
    if stale:
        dataset.delete_samples(dataset.select_by("filepath", stale))
    new = [p for p in wanted if p not in existing_paths]
    if new:
        dataset.add_samples([
            fo.Sample(filepath=p, tags=[wanted[p]["kind"]], file_name=wanted[p]["file_name"],
                      metadata=fo.ImageMetadata(width=wanted[p]["width"], height=wanted[p]["height"]))
            for p in new
        ], progress=False)

    # Scenario fields.
    current = dict(zip(*dataset.match_tags("scenario").values(["filepath", "id"])))
    old_bands: dict[str, dict[str, Any]] = {band: {} for band in BAND_FIELDS}
    if all(dataset.has_sample_field(band) for band in BAND_FIELDS):
        paths, *columns = _reviewer_candidates(dataset.match_tags("scenario")).values(["filepath", *BAND_FIELDS])
        old_bands = {band: dict(zip(paths, column)) for band, column in zip(BAND_FIELDS, columns)}
    values: dict[str, dict[str, Any]] = defaultdict(dict)
    dropped: Counter[str] = Counter()
    kept_edits = 0
    for path, img in wanted.items():
        if img["kind"] != "scenario":
            continue
        file_name, (width, height) = img["file_name"], sizes[img["file_name"]]
        sid = current[path]
        records, uncapped = {}, {}
        for band in BAND_FIELDS:
            band_records = bands[band].get(file_name, [])
            uncapped.update({r["id"]: band for r in band_records})
            if band == "rejected":
                shown = cap_records(band_records, max_per_image=max_per_image, min_score=min_score,
                                    keep_score=keep_score)
                dropped[band] += len(band_records) - len(shown)
                band_records = shown
            records[band] = band_records
        merged, kept = _merge_band_fields(records, uncapped, {b: old_bands[b].get(path) for b in BAND_FIELDS},
                                          width, height)
        kept_edits += kept
        for band in BAND_FIELDS:
            values[band][sid] = merged[band]
        raw = bands["raw"].get(file_name, [])
        teacher = cap_records(raw, max_per_image=max_per_image, min_score=min_score, keep_score=keep_score)
        dropped["teacher"] += len(raw) - len(teacher)
        values["teacher"][sid] = _detections(record_to_detection(r) for r in teacher)
        risks = [r["risk"] for r in records["review"] if r.get("risk") is not None]
        values["max_risk"][sid] = max(risks) if risks else None
        ranks = [r["audit_rank"] for r in records["accepted"] if r.get("audit")]
        values["audit_rank"][sid] = min(ranks) if ranks else None
        values["segmentation"][sid] = (
            fo.Segmentation(mask_path=str((Path(inputs.semantic_root) / img["semantic_file"]).resolve()))
            if inputs.semantic_root is not None and img.get("semantic_file") else None)
        seg = img.get("seg") or {}
        values["teacher_segmentation"][sid] = (
            fo.Segmentation(mask_path=str((Path(inputs.seg_root) / seg["label"]).resolve()))
            if seg.get("label") and inputs.seg_root is not None else None)
        values["uncertainty"][sid] = (
            fo.Heatmap(map_path=str((Path(inputs.seg_root) / seg["uncertainty"]).resolve()), range=[0, 255])
            if seg.get("uncertainty") and inputs.seg_root is not None else None)
    # General ground truth.
    general_ids = dict(zip(*dataset.match_tags("general").values(["filepath", "id"])))
    for path, img in wanted.items():
        if img["kind"] != "general":
            continue
        sid = general_ids[path]
        dets = []
        for ann in img["annotations"]:
            x, y, w, h = ann["bbox"]
            dets.append(fo.Detection(label=img["names"][ann["category_id"]],
                                     bounding_box=xyxy_to_relative_xywh([x, y, x + w, y + h], img["width"],
                                                                        img["height"]).tolist()))
        values["ground_truth"][sid] = _detections(dets)
        values["split"][sid] = img["split"]
    for field_name, by_id in values.items():
        if any(value is not None for value in by_id.values()):
            dataset.set_values(field_name, by_id, key_field="id", validate=False, progress=False)  # built here
        elif by_id and dataset.has_sample_field(field_name):  # e.g. no audit (older filter output), no review label
            dataset.clear_sample_field(field_name)  # all None: set_values cannot type a new field from that
    dataset.add_dynamic_sample_fields()  # declare pseudo_id, risk, ... so the App can filter on them

    class_targets = dict(zip(inputs.category_ids, inputs.class_names))
    dataset.mask_targets = {
        "segmentation": {0: "background", **class_targets, 255: "ignored"},
        "teacher_segmentation": {0: "background", **{i + 1: n for i, n in enumerate(inputs.class_names)}},
    }
    dataset.default_classes = list(inputs.class_names)
    if dataset.app_config.active_fields is None:  # the App's default shows every field: 50 teacher boxes per image
        dataset.app_config.active_fields = fo.ActiveFields(paths=["accepted", "review", "ground_truth"])
    summary = {
        "samples": len(dataset),
        "new_samples": len(new),
        "removed_samples": len(stale),
        "general_duplicates": general_seen,
        "labels": {f: dataset.count(f"{f}.detections") for f in (*BAND_FIELDS, "teacher", "ground_truth")
                   if dataset.has_sample_field(f)},
        "dropped": dict(sorted(dropped.items())),
        "kept_reviewer_edits": kept_edits,
    }
    dataset.info["dataengine"] = {
        "model_version": inputs.model_version,
        "pool_root": str(pool_root),
        "class_names": list(inputs.class_names),
        "cap": {"fields": ["rejected", "teacher"], "max_per_image": max_per_image, "min_score": min_score,
                "keep_score": keep_score, "dropped": summary["dropped"]},
        **dict(extra_info or {}),
    }
    dataset.save()
    return dataset, summary


def _reviewer_candidates(view: Any) -> Any:
    """``view`` with only the band detections a reviewer may have touched: tagged, added (no ``pseudo_id``), or
    with a class or box that differs from the teacher's (box to half the edit tolerance, in pixels). Filtering in
    the database spares loading the untouched majority (the demo: 27k detections); the caller still decides
    exactly with :func:`is_edited`.
    """
    width, height = F("$metadata.width"), F("$metadata.height")
    box, original = F("bounding_box"), F("pseudo_bbox")
    tol = _EDIT_TOLERANCE / 2
    moved = (((box[0] * width - original[0]).abs() > tol) | ((box[1] * height - original[1]).abs() > tol)
             | (((box[0] + box[2]) * width - original[2]).abs() > tol)
             | (((box[1] + box[3]) * height - original[3]).abs() > tol))
    touched = (F("tags").length() > 0) | ~F("pseudo_id").exists() | (F("label") != F("pseudo_label")) | moved
    for band in BAND_FIELDS:
        view = view.filter_labels(band, touched, only_matches=False)
    return view


def save_review_views(dataset: fo.Dataset, *, confident_reject_score: float, hard_negative_score: float) -> list[str]:
    """Save (overwrite) the reviewer's views: ``review_queue``, ``rejected_confident``, ``hard_negatives``, and
    :data:`AUDIT_VIEW` when a sample has an ``audit_rank`` (a stale one is deleted otherwise).

    Returns:
        The saved view names.
    """
    scenario = dataset.match_tags("scenario")
    views = {
        "review_queue": scenario.match(F("review.detections").length() > 0).sort_by("max_risk", reverse=True),
        "rejected_confident": scenario.filter_labels("rejected", F("confidence") >= confident_reject_score),
        "hard_negatives": scenario.match(F("accepted.detections").length() == 0)
                                  .filter_labels("teacher", F("confidence") >= hard_negative_score),
    }
    descriptions = {
        "review_queue": "scenario images with review-band labels, highest risk first",
        "rejected_confident": f"rejected labels with teacher confidence >= {confident_reject_score}",
        "hard_negatives": f"no accepted label, a teacher box with confidence >= {hard_negative_score}",
    }
    for name, view in views.items():
        dataset.save_view(name, view, description=descriptions[name], overwrite=True)
    if dataset.has_sample_field("audit_rank") and len(scenario.exists("audit_rank")):
        # `accepted` shows only the audited labels (`== True` builds a database expression, hence the noqa).
        audited = scenario.filter_labels("accepted", F("audit") == True).sort_by("audit_rank")  # noqa: E712
        dataset.save_view(AUDIT_VIEW, audited, overwrite=True,
                          description="a random sample of accepted labels per class: tag each one accept or reject; "
                                      "the filter re-calibrates its thresholds from these decisions")
        return [*views, AUDIT_VIEW]
    if AUDIT_VIEW in dataset.list_saved_views():
        dataset.delete_saved_view(AUDIT_VIEW)
    return list(views)


def mined_to_detections(entry: Mapping[str, Any], width: float, height: float) -> fo.Detections:
    """The regions of one ``hard_negatives.json`` entry as ``fo.Detections`` (relative boxes, score as confidence)."""
    return _detections(fo.Detection(label=r["class_name"], confidence=r["score"],
                                    bounding_box=xyxy_to_relative_xywh(r["bbox"], width, height).tolist())
                       for r in entry["regions"])


def apply_mined_hard_negatives(dataset: fo.Dataset, mined_doc: Mapping[str, Any] | None, *, mined_root: str | Path,
                               pool_root: str | Path, general_root: str | Path | None) -> dict[str, int]:
    """Show the ``mine`` stage's output: the fields of :data:`MINED_FIELDS` and the saved view :data:`MINED_VIEW`.

    Values of a previous run are cleared first; with ``mined_doc=None`` (no mine output) the view is removed.

    Args:
        dataset: The review dataset (:func:`build_dataset`).
        mined_doc: The parsed ``hard_negatives.json``, or ``None``.
        mined_root: Its folder (map paths are relative to it).
        pool_root: The scenario pool (scenario ``file_name`` is relative to it).
        general_root: The general images (general ``file_name`` is relative to it), or ``None``.

    Returns:
        ``{"samples": shown, "missing": entries without a sample in the dataset}``.
    """
    for name in MINED_FIELDS:
        if dataset.has_sample_field(name):
            dataset.clear_sample_field(name)
    if mined_doc is None:
        if MINED_VIEW in dataset.list_saved_views():
            dataset.delete_saved_view(MINED_VIEW)
        return {"samples": 0, "missing": 0}
    roots = {"scenario": Path(pool_root).resolve(), "general": Path(general_root).resolve() if general_root else None}
    paths, ids, widths, heights = dataset.values(["filepath", "id", "metadata.width", "metadata.height"])
    by_path = {p: (i, w, h) for p, i, w, h in zip(paths, ids, widths, heights)}
    values: dict[str, dict[str, Any]] = defaultdict(dict)
    missing = 0
    for entry in mined_doc["images"]:
        root = roots.get(entry["source"])
        found = by_path.get(str(root / entry["file_name"])) if root is not None else None
        if found is None:
            missing += 1
            continue
        sid, width, height = found
        values["hard_negative_regions"][sid] = mined_to_detections(entry, width, height)
        values["hard_negative_reasons"][sid] = list(entry["reasons"])
        values["hard_negative_map"][sid] = (fo.Segmentation(mask_path=str((Path(mined_root) / entry["map"]).resolve()))
                                            if entry.get("map") else None)
    for name, by_id in values.items():
        dataset.set_values(name, by_id, key_field="id", validate=False, progress=False)
    dataset.mask_targets = {**dataset.mask_targets,
                            "hard_negative_map": {1: "region", 2: "hard pixel", 3: "region + hard pixel"}}
    dataset.save()
    view = dataset.exists("hard_negative_reasons") if values else dataset.limit(0)
    dataset.save_view(MINED_VIEW, view, description="mine stage: teacher false alarms (regions) and hard pixels",
                      overwrite=True)
    return {"samples": len(values["hard_negative_regions"]), "missing": missing}


# --------------------------------------------------------------------------------------------------------------
# The App
# --------------------------------------------------------------------------------------------------------------


def app_url(dataset_name: str, address: str, port: int) -> str:
    """The App URL that opens ``dataset_name`` directly (the bare root shows "No dataset selected")."""
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    return f"http://{host}:{port}/datasets/{quote(dataset_name)}"


def launch_app(dataset: fo.Dataset, address: str = "127.0.0.1", port: int = 5151) -> fo.Session:
    """Launch the App for ``dataset`` as a remote session on ``address:port`` and print its URL.

    Returns:
        The session; ``session.close()`` stops it, ``session.wait(-1)`` blocks until Ctrl-C.
    """
    session = fo.launch_app(dataset, remote=True, address=address, port=port)
    print(f"FiftyOne App: {app_url(dataset.name, address, port)}", flush=True)
    return session


# --------------------------------------------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------------------------------------------


def pull_decisions(dataset: fo.Dataset, *, user: str | None = None) -> dict[str, Any]:
    """Every decision the reviewers hold in ``dataset`` now (see the module docstring's conventions).

    Pure over the dataset's state (nothing is written). ``time`` is ``None`` in every entry: ``merge_pulled``
    assigns the pull's time to new or changed entries.

    Args:
        dataset: The review dataset.
        user: Who reviewed (``DATAENGINE_REVIEWER`` in :func:`pull_cli`); FiftyOne does not record it per label.

    Returns:
        ``{"labels": {label id: entry}, "images": {file_name: entry}, "ignored": {what: count}}`` where
        ``ignored`` counts tags that are not decisions (``merge_pulled`` reads only labels and images).
    """
    scenario = _reviewer_candidates(dataset.match_tags("scenario"))
    columns = ["file_name", "metadata.width", "metadata.height", "tags", *BAND_FIELDS]
    rows = zip(*scenario.values(columns)) if len(scenario) else []
    labels: dict[str, Any] = {}
    images: dict[str, Any] = {}
    ignored: Counter[str] = Counter()
    for file_name, width, height, sample_tags, *fields in rows:
        added = []
        for dets in fields:
            for det in (dets.detections if dets is not None else []):
                pid = _attr(det, "pseudo_id")
                if pid is None:
                    bbox = detection_to_record(det, file_name, width, height)["bbox"]
                    added.append({"bbox": bbox, "class_name": det.label})
                    continue
                entry = detection_decision(det, file_name, width, height, user=user)
                if entry is not None:
                    labels[pid] = entry
                ignored.update(f"label tag {t!r}" for t in (det.tags or ()) if t not in LABEL_TAGS)
        flags = [t for t in sample_tags if t in SAMPLE_TAGS]
        ignored.update(f"sample tag {t!r}" for t in sample_tags if t not in (*SAMPLE_TAGS, "scenario"))
        if flags or added:
            images[file_name] = image_decision(source=SOURCE, flags=flags, added=added, user=user, time=None)
    if dataset.has_sample_field("teacher"):
        for tag, n in dataset.count_label_tags("teacher").items():
            ignored[f"label tag {tag!r} on teacher"] += n
    return {"labels": dict(sorted(labels.items())), "images": dict(sorted(images.items())),
            "ignored": dict(sorted(ignored.items()))}


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _review_params(path: str) -> Any:
    from dataengine.config import load_params  # noqa: PLC0415

    return load_params(path, ["review"]).review


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def open_cli(argv: Sequence[str]) -> int:
    """``dataengine review open``: build/update the dataset, save the views, launch the App (see ``--help``)."""
    from dataengine.review.cli import add_common_args, run_action  # noqa: PLC0415 (cli imports adapters lazily)

    parser = argparse.ArgumentParser(
        prog="dataengine review open", description="Build or update the FiftyOne review dataset from the pipeline's "
        "outputs, save the reviewer's views and launch the App.", epilog=CONVENTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--dataset", help="dataset name (default: review.dataset_name in --params)")
    parser.add_argument("--port", type=int, help="App port (default: review.app_port in --params)")
    parser.add_argument("--no-launch", action="store_true", help="build the dataset only")
    parser.add_argument("--no-wait", action="store_true", help="launch the App and return (the App stops with "
                        "this process); default: serve until Ctrl-C")
    parser.add_argument("--max-per-image", type=int, default=TEACHER_MAX_PER_IMAGE,
                        help="teacher/rejected boxes shown per image (default: %(default)s)")
    parser.add_argument("--min-score", type=float, default=TEACHER_MIN_SCORE,
                        help="teacher/rejected boxes below this score are not shown (default: %(default)s)")
    parser.add_argument("--mined", help="mine stage output (hard_negatives.json, maps/); default: mined/ beside "
                        "--filtered (data/mined); shown as the view mined_hard_negatives when it exists")
    args = parser.parse_args(list(argv))
    return run_action(lambda: _open(args))


def _open(args: argparse.Namespace) -> int:
    from dataengine.review.inputs import load_review_inputs  # noqa: PLC0415

    params = _review_params(args.params)
    name = args.dataset or params.dataset_name
    inputs = load_review_inputs(args.filtered, args.pseudo, args.data)
    keep = min(params.confident_reject_score, params.hard_negative_score)
    dataset, summary = build_dataset(
        inputs, name, max_per_image=args.max_per_image, min_score=args.min_score, keep_score=keep,
        extra_info={"filtered": str(Path(args.filtered).resolve()), "pseudo": str(Path(args.pseudo).resolve()),
                    "prepared": str(Path(args.data).resolve())})
    views = save_review_views(dataset, confident_reject_score=params.confident_reject_score,
                              hard_negative_score=params.hard_negative_score)
    mined = Path(args.mined) if args.mined else Path(args.filtered).parent / "mined"
    mined_file = mined / "hard_negatives.json"
    mined_doc = read_json(mined_file) if mined_file.is_file() else None
    shown = apply_mined_hard_negatives(dataset, mined_doc, mined_root=mined, pool_root=inputs.pool_root,
                                       general_root=inputs.general_root)
    if mined_doc is not None:
        views.append(MINED_VIEW)
        print(f"mined hard negatives ({mined_file}): {shown['samples']} samples"
              + (f", {shown['missing']} listed images not in the dataset" if shown["missing"] else ""))
    labels = ", ".join(f"{k} {v}" for k, v in summary["labels"].items())
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items())
    print(f"dataset {name!r}: {summary['samples']} samples ({summary['new_samples']} new, "
          f"{summary['removed_samples']} removed); labels: {labels}")
    print(f"not shown (score < {args.min_score} or beyond {args.max_per_image} per image): {dropped}; "
          f"reviewer-touched labels kept: {summary['kept_reviewer_edits']}")
    print("saved views: " + ", ".join(f"{v} ({len(dataset.load_saved_view(v))} samples)" for v in views))
    if args.no_launch:
        return 0
    session = launch_app(dataset, params.app_address, args.port or params.app_port)
    if args.no_wait:
        session.close()
        return 0
    return serve(session)


def serve(session: Any) -> int:
    """Serve the App until Ctrl-C or SIGTERM (``kill PID``), then close it: the tail of ``dataengine review open``.

    The SIGTERM handler and the "serving" line sit inside the ``try``: a caller that sends SIGTERM the moment it reads
    that line (a script, a test) can land the signal while ``print`` is still returning, and it must still stop the App
    cleanly (exit 0, "App stopped"), not end in a traceback.
    """
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack: for a hang at start or stop
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the App as cleanly as Ctrl-C
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with `&` from a script, or under nohup
            print(f"serving; Ctrl-C is ignored in this process (started in the background?): stop it with "
                  f"`kill {os.getpid()}`", flush=True)
        else:
            print("serving until Ctrl-C", flush=True)
        session.wait(-1)
    except KeyboardInterrupt:
        print("stopping the App", flush=True)
    finally:
        session.close()
    print("App stopped", flush=True)
    return 0


def pull_cli(argv: Sequence[str]) -> int:
    """``dataengine review pull``: the reviewers' tags and edits in FiftyOne -> the decisions file."""
    from dataengine.review.cli import add_common_args, run_action  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="dataengine review pull", description="Write the FiftyOne reviewers' tags and edits to the decisions "
        "file (deterministic; a pull with nothing new leaves it untouched). DATAENGINE_REVIEWER names the reviewer.",
        epilog=CONVENTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--dataset", help="dataset name (default: review.dataset_name in --params)")
    args = parser.parse_args(list(argv))
    return run_action(lambda: _pull(args))


def _pull(args: argparse.Namespace) -> int:
    name = args.dataset or _review_params(args.params).dataset_name
    if not fo.dataset_exists(name):
        print(f"dataengine review pull: no FiftyOne dataset {name!r}: run `dataengine review open` first",
              file=sys.stderr)
        return 1
    pulled = pull_decisions(fo.load_dataset(name), user=os.environ.get("DATAENGINE_REVIEWER") or None)
    merged, _ = merge_pulled(load_decisions(args.decisions), pulled, source=SOURCE)
    written = write_decisions(args.decisions, merged)
    counts = Counter(e["decision"] for e in pulled["labels"].values())
    flags = Counter(f for e in pulled["images"].values() for f in e["flags"])
    added = sum(len(e["added"]) for e in pulled["images"].values())
    ignored = "; ignored: " + ", ".join(f"{k} x{v}" for k, v in pulled["ignored"].items()) if pulled["ignored"] else ""
    print(f"pulled from {name!r}: " + ", ".join(f"{counts[d]} {d}" for d in ("accept", "reject", "correct"))
          + f", {flags['negative']} negative, {flags['relabel']} relabel, {added} added boxes; "
          + f"{args.decisions} {'updated' if written else 'unchanged'}{ignored}")
    return 0
