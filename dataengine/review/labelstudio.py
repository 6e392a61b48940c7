"""Label Studio round trip: push the review queue and the audit as a project, pull the annotations into decisions.

Two layers, kept apart as FiftyOne keeps ``LabelStudioAnnotationAPI`` apart from its converters:

1. **Pure converters** (no network, no SDK import at module level): :func:`label_config`, :func:`box_region`,
   :func:`region_box`, :func:`task_for_image` and :func:`decisions_from_annotation` turn our records (``xyxy``
   pixel boxes, ids ``"<file_name>#<i>"``) into Label Studio JSON (percent coordinates) and an annotation back into
   decisions (:mod:`dataengine.review.decisions`). They are round-trip tested.
2. **A thin client** (:func:`push`, :func:`pull`) over the SDK 2.x ``LabelStudio`` client. The server's address and
   API key come from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` only, never from params (a key in a params file
   ends up in git and DVC's lock file); the key never appears in output, files or error messages.

The tasks are the review queue's images, highest risk first (``max_tasks`` > 0 keeps the first ``max_tasks``), then
the images of the filter's audit (a seeded random sample of accepted labels per class, :attr:`ReviewInputs.audit`)
that are not already among them, in audit order and never cut by ``max_tasks``: the audit measures the accepted
band's precision only if every audited label is seen, and the filter re-calibrates from these decisions.

A pushed task is one pool image: ``data = {"image": <url>, "file_name": ...}`` and one prediction (``model_version``
of the pseudo-labels) holding every accepted and review-band box of the image as a ``rectanglelabels`` region with
id ``p<i>`` (the record id is ``<file_name>#<i>``), plus, with ``masks``, one ``brushlabels`` region per class of
the filtered semantic mask. The annotator starts from the prediction and keeps, moves, relabels or deletes regions,
draws new boxes and ticks the ``negative`` / ``relabel`` image flags; :func:`decisions_from_annotation` reads that
back as ``accept`` / ``correct`` / ``reject`` label decisions, ``added`` boxes and image flags.

Images are served, never uploaded: with ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set (the variable the server
reads too, together with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``) tasks point at
``/data/local-files/?d=<path below that root>`` and the project gets a local-files import storage on the pool folder
(which grants access; it is never synced, a sync would import every image a second time); otherwise
``--image-url-base`` names any HTTP server that serves the pool folder.

Example:
    >>> label_config(["circle", "square"], masks=False).count("<Label ")
    2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

from dataengine.boxes import percent_xywh_to_xyxy, xyxy_to_percent_xywh
from dataengine.review.cli import add_common_args, run_action
from dataengine.review.decisions import (
    format_time,
    image_decision,
    label_decision,
    load_decisions,
    merge_pulled,
    split_label_id,
    write_decisions,
)

__all__ = [
    "LabelStudioError",
    "IMAGE_NAME",
    "BOX_NAME",
    "MASK_NAME",
    "FLAGS_NAME",
    "label_config",
    "box_region",
    "region_box",
    "mask_regions",
    "task_for_image",
    "queue_images",
    "audit_images",
    "decisions_from_annotation",
    "latest_annotation",
    "connect",
    "push",
    "pull",
    "push_cli",
    "pull_cli",
]

SOURCE = "labelstudio"
IMAGE_NAME, BOX_NAME, MASK_NAME, FLAGS_NAME = "image", "label", "mask", "flags"
FLAGS = ("negative", "relabel")  # the image flags of the decisions schema
BOX_TOLERANCE_PX = 0.01  # a region within this of the pushed box (after converting back) is "unchanged"
URL_ENV, KEY_ENV, ROOT_ENV = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
_REGION_ID = re.compile(r"^p(\d+)$")


class LabelStudioError(RuntimeError):
    """A Label Studio request failed or cannot be made; the message is one line naming the URL and the cause."""


# --------------------------------------------------------------------------------------------------------------
# Pure converters
# --------------------------------------------------------------------------------------------------------------


def label_config(class_names: Sequence[str], masks: bool) -> str:
    """The labelling config (XML) for ``class_names``: boxes, optional brush masks, and the image flags.

    Args:
        class_names: The detector's classes, in order (one ``<Label>`` each, XML-escaped).
        masks: Add a ``<BrushLabels>`` control so the semantic masks can be shown.

    Example:
        >>> 'value="a &amp; b"' in label_config(["a & b"], masks=True)
        True
    """
    if not class_names:
        raise ValueError("label_config needs at least one class name")
    labels = "".join(f"\n    <Label value={quoteattr(str(n))}/>" for n in class_names)
    lines = [
        "<View>",
        f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}" zoom="true"/>',
        f'  <RectangleLabels name="{BOX_NAME}" toName="{IMAGE_NAME}">{labels}\n  </RectangleLabels>',
    ]
    if masks:
        lines.append(f'  <BrushLabels name="{MASK_NAME}" toName="{IMAGE_NAME}">{labels}\n  </BrushLabels>')
    choices = "".join(f'\n    <Choice value="{f}"/>' for f in FLAGS)
    lines += [f'  <Choices name="{FLAGS_NAME}" toName="{IMAGE_NAME}" choice="multiple">{choices}\n  </Choices>',
              "</View>"]
    return "\n".join(lines)


def box_region(region_id: str, bbox: Sequence[float], class_name: str, width: int, height: int,
               score: float | None = None) -> dict[str, Any]:
    """One ``rectanglelabels`` result item for an ``xyxy`` pixel box (percent coordinates, no rotation).

    Example:
        >>> box_region("p0", [16, 12, 32, 36], "circle", 64, 48)["value"]["height"]
        50.0
    """
    x, y, w, h = (float(v) for v in xyxy_to_percent_xywh(np.asarray(bbox, dtype=np.float64), width, height))
    item: dict[str, Any] = {
        "id": region_id, "from_name": BOX_NAME, "to_name": IMAGE_NAME, "type": "rectanglelabels",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [class_name]},
    }
    if score is not None:
        item["score"] = float(score)
    return item


def region_box(item: Mapping[str, Any], width: int | None = None, height: int | None = None
               ) -> tuple[list[float], str | None]:
    """Inverse of :func:`box_region`: ``(xyxy pixel box, class name or None)`` of a ``rectanglelabels`` item.

    The image size is the item's ``original_width/height`` unless given. A rotated rectangle is refused (our boxes
    are axis-aligned; the config does not offer rotation, so this means a hand-edited result).

    Raises:
        ValueError: The item is rotated or lacks coordinates or image size.
    """
    value = item.get("value") or {}
    width = width or item.get("original_width")
    height = height or item.get("original_height")
    if not width or not height:
        raise ValueError(f"region {item.get('id')!r} has no original_width/original_height")
    if abs(float(value.get("rotation") or 0.0)) > 1e-6:
        raise ValueError(f"region {item.get('id')!r} is rotated by {value.get('rotation')} degrees; only "
                         "axis-aligned boxes can be read back")
    try:
        pct = [float(value[k]) for k in ("x", "y", "width", "height")]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"region {item.get('id')!r} has no x/y/width/height: {value!r}") from None
    box = [float(v) for v in percent_xywh_to_xyxy(np.asarray(pct), width, height)]
    labels = value.get("rectanglelabels") or []
    return box, (str(labels[0]) if labels else None)


def mask_regions(mask: np.ndarray, class_of_id: Mapping[int, str]) -> list[dict[str, Any]]:
    """One ``brushlabels`` region (RLE) per class present in a semantic mask.

    Masks are shown to the annotator as context; pulling brush edits back is out of scope (the decisions file has
    no mask decisions), so :func:`decisions_from_annotation` ignores brush regions.

    Args:
        mask: ``[H, W]`` integer map, pixel = category id; ids not in ``class_of_id`` (background 0, ignored 255)
            get no region.
        class_of_id: Category id -> class name.
    """
    from label_studio_sdk.converter.brush import mask2rle  # the SDK only where a mask is actually encoded

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    height, width = mask.shape
    regions = []
    for cat_id in sorted(int(v) for v in np.unique(mask)):
        if cat_id not in class_of_id:
            continue
        binary = np.where(mask == cat_id, 255, 0).astype(np.uint8)
        regions.append({
            "id": f"m{cat_id}", "from_name": MASK_NAME, "to_name": IMAGE_NAME, "type": "brushlabels",
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in mask2rle(binary)], "brushlabels": [class_of_id[cat_id]]},
        })
    return regions


def task_for_image(
    file_name: str,
    width: int,
    height: int,
    records: Sequence[Mapping[str, Any]],
    image_url: str,
    model_version: str,
    mask: np.ndarray | None = None,
    class_of_id: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """The Label Studio task of one image: its data and one prediction with the image's pseudo-labels.

    Args:
        file_name: The image's path relative to the pool (also stored in ``data.file_name``: the task's key).
        width, height: Image size in pixels.
        records: The image's records (accepted and review band); each ``id`` must be ``<file_name>#<i>``.
        image_url: What Label Studio loads the image from (local-files URL or HTTP URL).
        model_version: The pseudo-labels' version (:attr:`ReviewInputs.model_version`).
        mask: Optional ``[H, W]`` semantic mask (category ids) shown as brush regions.
        class_of_id: Category id -> class name, needed with ``mask``.

    Returns:
        ``{"data": {"image", "file_name"}, "predictions": [{"model_version", "score", "result"}]}``; the prediction's
        ``score`` is the lowest label score of the image (sorting by it shows the most doubtful images first),
        1.0 for an image without labels.

    Example:
        >>> rec = {"id": "a.png#1", "bbox": [0, 0, 32, 24], "class_name": "circle", "score": 0.5}
        >>> task = task_for_image("a.png", 64, 48, [rec], "http://h/a.png", "teacher-0")
        >>> task["predictions"][0]["result"][0]["value"]["width"], task["predictions"][0]["result"][0]["id"]
        (50.0, 'p1')
    """
    result = []
    for record in sorted(records, key=lambda r: split_label_id(r["id"])[1]):
        name, index = split_label_id(record["id"])
        if name != file_name:
            raise ValueError(f"record {record['id']!r} does not belong to image {file_name!r}")
        score = record.get("score")
        result.append(box_region(f"p{index}", record["bbox"], record["class_name"], width, height, score))
    if mask is not None:
        if class_of_id is None:
            raise ValueError("task_for_image: a mask needs class_of_id (category id -> class name)")
        if tuple(np.asarray(mask).shape) != (height, width):
            raise ValueError(f"mask of {file_name} has shape {np.asarray(mask).shape}, expected {(height, width)}")
        result += mask_regions(mask, class_of_id)
    scores = [float(r["score"]) for r in records if r.get("score") is not None]
    return {
        "data": {IMAGE_NAME: image_url, "file_name": file_name},
        "predictions": [{"model_version": model_version, "score": min(scores) if scores else 1.0, "result": result}],
    }


def queue_images(review: Sequence[Mapping[str, Any]], max_tasks: int = 0) -> list[str]:
    """Images of the review queue, highest risk first (an image's risk: its riskiest label); ``max_tasks`` > 0 cuts.

    Example:
        >>> queue_images([{"file_name": "a", "risk": 0.2}, {"file_name": "b", "risk": 0.9}, {"file_name": "a",
        ...               "risk": 0.3}])
        ['b', 'a']
    """
    risk: dict[str, float] = {}
    for record in review:
        value = float(record.get("risk") or 0.0)
        risk[record["file_name"]] = max(risk.get(record["file_name"], -math.inf), value)
    names = sorted(risk, key=lambda n: (-risk[n], n))
    return names[:max_tasks] if max_tasks > 0 else names


def audit_images(audit: Sequence[Mapping[str, Any]], pushed: Collection[str] = ()) -> list[str]:
    """Images of the audit in audit order (an image's place: its first audited label), leaving out ``pushed``.

    Args:
        audit: The audit records, by ``audit_rank`` (:attr:`ReviewInputs.audit`).
        pushed: Images already sent (the review queue's): their tasks hold the audited labels too.

    Example:
        >>> audit_images([{"file_name": "b", "audit_rank": 0}, {"file_name": "a", "audit_rank": 1},
        ...               {"file_name": "b", "audit_rank": 2}, {"file_name": "c", "audit_rank": 3}], pushed=["c"])
        ['b', 'a']
    """
    skip = set(pushed)
    return [n for n in dict.fromkeys(r["file_name"] for r in audit) if n not in skip]


def _iso_z(value: Any) -> str | None:
    """An annotation time (``datetime`` or ISO string) as ``YYYY-MM-DDTHH:MM:SSZ`` in UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):
        moment = value
    else:
        text = str(value).strip().replace(" ", "T", 1)
        moment = _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    return format_time(moment)


def _annotator(annotation: Mapping[str, Any], users: Mapping[int, str] | None) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        return who.get("email") or None
    if isinstance(who, int) and users and who in users:
        return users[who]
    created = str(annotation.get("created_username") or "").strip()  # " ann@example.com, 3"
    name = created.rsplit(",", 1)[0].strip() if created else ""
    return name or None


def latest_annotation(annotations: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The most recently updated annotation that was not cancelled (skipped), or ``None``."""
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (_iso_z(a.get("updated_at") or a.get("created_at")) or "", a.get("id") or 0))


def _pushed_regions(task: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Index -> pushed box region of the task's newest prediction."""
    predictions = sorted(task.get("predictions") or [], key=lambda p: (p.get("id") or 0))
    if not predictions:
        return {}
    out = {}
    for item in predictions[-1].get("result") or []:
        match = _REGION_ID.match(str(item.get("id", "")))
        if match and item.get("type") == "rectanglelabels":
            out[int(match.group(1))] = dict(item)
    return out


def decisions_from_annotation(
    task: Mapping[str, Any],
    annotation: Mapping[str, Any] | None,
    class_names: Sequence[str],
    users: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Read one annotation of one pushed task back as decisions.

    For each pushed region ``p<i>`` (label ``<file_name>#<i>``): present with the same box (within
    :data:`BOX_TOLERANCE_PX` after converting back) and class -> ``accept``; present but moved, resized or reclassed
    -> ``correct`` (box clipped to the image, class); absent -> ``reject``. Rectangles with any other id are
    ``added`` boxes of the image; the ``flags`` choices are image flags. Brush regions are ignored (see
    :func:`mask_regions`). A cancelled (skipped) or missing annotation gives no decision.

    Args:
        task: The task as the API lists it (``data.file_name``, ``predictions``).
        annotation: One of its annotations (``result``, ``completed_by``, ``updated_at``, ``was_cancelled``).
        class_names: The classes of the label config; another class in a region is refused.
        users: User id -> email, to name the annotator (else ``created_username`` is used).

    Returns:
        ``{"labels": {id: entry}, "images": {file_name: entry}, "skipped": [why, ...]}``; ``skipped`` lists regions
        that could not be read (no class, rotated), so the caller can report them.

    Raises:
        LabelStudioError: A region carries a class not in ``class_names``.
    """
    out: dict[str, Any] = {"labels": {}, "images": {}, "skipped": []}
    if annotation is None or annotation.get("was_cancelled"):
        return out
    data = task.get("data") or {}
    file_name = data.get("file_name")
    if not file_name:
        raise LabelStudioError(f"task {task.get('id')} has no data.file_name: not a task pushed by dataengine")
    meta = {"source": SOURCE, "user": _annotator(annotation, users),
            "time": _iso_z(annotation.get("updated_at") or annotation.get("created_at"))}
    pushed = _pushed_regions(task)
    seen: dict[int, Mapping[str, Any]] = {}
    added, flags = [], set()
    for item in annotation.get("result") or []:
        kind = item.get("type")
        if kind == "choices" and item.get("from_name") == FLAGS_NAME:
            flags.update(c for c in (item.get("value") or {}).get("choices", []) if c in FLAGS)
            continue
        if kind != "rectanglelabels":
            continue  # brush masks, relations, ...: not read back
        match = _REGION_ID.match(str(item.get("id", "")))
        if match and int(match.group(1)) in pushed:
            seen[int(match.group(1))] = item
            continue
        try:
            box, cls = region_box(item)
        except ValueError as err:
            out["skipped"].append(f"{file_name}: {err}")
            continue
        if cls is None:
            out["skipped"].append(f"{file_name}: drawn box {item.get('id')!r} has no class")
            continue
        added.append({"bbox": _clip(box, item), "class_name": _known(cls, class_names, file_name)})
    for index, original in sorted(pushed.items()):
        lid = f"{file_name}#{index}"
        orig_box, orig_cls = region_box(original)
        orig = {"bbox": orig_box, "class_name": orig_cls}
        if index not in seen:
            out["labels"][lid] = label_decision(file_name, "reject", original=orig, **meta)
            continue
        try:
            box, cls = region_box(seen[index], original.get("original_width"), original.get("original_height"))
        except ValueError as err:
            out["skipped"].append(f"{lid}: {err}")
            continue
        cls = _known(cls or orig_cls, class_names, lid)
        same = cls == orig_cls and max(abs(a - b) for a, b in zip(box, orig_box)) <= BOX_TOLERANCE_PX + 1e-9
        if same:
            out["labels"][lid] = label_decision(file_name, "accept", original=orig, **meta)
        else:
            out["labels"][lid] = label_decision(file_name, "correct", bbox=_clip(box, original), class_name=cls,
                                                original=orig, **meta)
    if flags or added:
        out["images"][file_name] = image_decision(flags=flags, added=added, **meta)
    return out


def _known(cls: str, class_names: Sequence[str], where: str) -> str:
    if cls not in class_names:
        raise LabelStudioError(f"{where}: class {cls!r} is not one of {', '.join(class_names)} (was the project's "
                               "label config edited by hand?)")
    return cls


def _clip(box: Sequence[float], item: Mapping[str, Any]) -> list[float]:
    width, height = float(item["original_width"]), float(item["original_height"])
    x1, y1, x2, y2 = box
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]


# --------------------------------------------------------------------------------------------------------------
# Client layer
# --------------------------------------------------------------------------------------------------------------


class _Conn:
    """The SDK client plus what error messages need: the URL (shown) and the key (scrubbed from every message)."""

    def __init__(self, url: str, key: str, timeout: float) -> None:
        from label_studio_sdk import LabelStudio

        self.url, self._key = url.rstrip("/"), key
        self.ls = LabelStudio(base_url=self.url, api_key=key, timeout=timeout)

    def fail(self, cause: str) -> LabelStudioError:
        text = " ".join(str(cause).split())
        if self._key:
            text = text.replace(self._key, "***")
        return LabelStudioError(f"Label Studio at {self.url}: {text}")

    @contextlib.contextmanager
    def calls(self, doing: str) -> Iterator[None]:
        """Turn the SDK's and httpx's exceptions into one-line :class:`LabelStudioError` (key scrubbed)."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except httpx.ConnectError as err:
            reason = re.sub(r"^\[Errno -?\d+\]\s*", "", str(err)).strip().lower() or "connection failed"
            raise self.fail(f"cannot connect ({reason})") from None
        except httpx.TimeoutException:
            raise self.fail(f"no answer while {doing} (timeout)") from None
        except httpx.HTTPError as err:
            raise self.fail(f"request failed while {doing} ({type(err).__name__}: {err})") from None
        except ApiError as err:
            if err.status_code in (401, 403):
                raise self.fail(f"the API key was refused ({err.status_code}); check {KEY_ENV}") from None
            body = err.body if isinstance(err.body, str) else json.dumps(err.body, default=str)
            raise self.fail(f"{doing} failed ({err.status_code}): {body[:300]}") from None


def connect(timeout: float = 60.0) -> _Conn:
    """A client for the server named by ``LABEL_STUDIO_URL`` with the key ``LABEL_STUDIO_API_KEY``.

    Raises:
        LabelStudioError: A variable is unset (the message says which and how to set it).
    """
    url = os.environ.get(URL_ENV, "").strip()
    key = os.environ.get(KEY_ENV, "").strip()
    if not url:
        raise LabelStudioError(f"{URL_ENV} is not set: export the server's address, e.g. "
                               f"{URL_ENV}=http://127.0.0.1:8080")
    if not re.match(r"^https?://", url):
        raise LabelStudioError(f"{URL_ENV}={url!r} is not an http(s) URL, e.g. http://127.0.0.1:8080")
    if not key:
        raise LabelStudioError(f"{KEY_ENV} is not set: export the access token from Label Studio's "
                               "'Account & Settings' page")
    return _Conn(url, key, timeout)


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj.dict()


def _find_project(conn: _Conn, title: str) -> Any | None:
    with conn.calls("listing projects"):
        found = [p for p in conn.ls.projects.list(title=title) if p.title == title]
    return min(found, key=lambda p: p.id) if found else None


def _task_list(conn: _Conn, project_id: int) -> list[dict[str, Any]]:
    with conn.calls("listing tasks"):
        return [_as_dict(t) for t in conn.ls.tasks.list(project=project_id, fields="all", page_size=100)]


def _image_urls(inputs: Any, names: Sequence[str], image_url_base: str | None) -> tuple[dict[str, str], Path | None]:
    """Image URL per file name, and the local-files storage folder (``None`` when served over HTTP)."""
    root = os.environ.get(ROOT_ENV, "").strip()
    if root:
        doc_root = Path(root)
        if not doc_root.is_absolute():
            raise LabelStudioError(f"{ROOT_ENV}={root!r} must be an absolute path (the server's document root)")
        pool = Path(inputs.pool_root).resolve()
        try:
            rel = pool.relative_to(doc_root.resolve())
        except ValueError:
            raise LabelStudioError(f"the pool images ({pool}) are not below {ROOT_ENV}={root}: start Label Studio "
                                   "with a document root that contains them, or use --image-url-base") from None
        if rel == Path("."):
            raise LabelStudioError(f"{ROOT_ENV} must be a parent of the pool folder {pool}, not the folder itself "
                                   "(Label Studio refuses a storage at its document root)")
        urls = {n: "/data/local-files/?d=" + quote((rel / n).as_posix()) for n in names}
        return urls, doc_root / rel
    if image_url_base:
        base = image_url_base.rstrip("/")
        return {n: f"{base}/{quote(n)}" for n in names}, None
    raise LabelStudioError(f"no way to serve the images: set {ROOT_ENV} (and start Label Studio with it and "
                           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true), or pass --image-url-base URL of an HTTP "
                           "server that serves the pool folder")


def _semantic_mask(inputs: Any, image: Mapping[str, Any]) -> np.ndarray | None:
    if inputs.semantic_root is None or not image.get("semantic_file"):
        return None
    from PIL import Image

    path = Path(inputs.semantic_root) / image["semantic_file"]
    if not path.exists():
        return None
    with Image.open(path) as img:
        return np.asarray(img)


def _same_prediction(existing: Sequence[Mapping[str, Any]], wanted: Mapping[str, Any]) -> bool:
    if len(existing) != 1:
        return False
    have = existing[0]
    return (have.get("model_version") == wanted["model_version"]
            and math.isclose(float(have.get("score") or 0.0), float(wanted["score"]), abs_tol=1e-9)
            and json.dumps(have.get("result"), sort_keys=True) == json.dumps(wanted["result"], sort_keys=True))


def push(inputs: Any, params: Any, *, image_url_base: str | None = None, conn: _Conn | None = None
         ) -> dict[str, Any]:
    """Send the review queue and the audit to the Label Studio project ``params.project_title`` (created if absent).

    The tasks are the queue's images (:func:`queue_images`, cut to ``params.max_tasks``), then the audit's images not
    among them (:func:`audit_images`, never cut: see the module docstring), imported in that order.

    Idempotent: tasks are keyed by ``data.file_name``; new images are imported in one batched call, an existing task
    gets its data updated and its predictions replaced only when they changed (the project is dataengine's: every
    prediction of a changed task is replaced), so a re-push never duplicates a task. Tasks of images no longer pushed
    (they left the queue and the audit) are kept (they may hold annotations) and counted as ``stale``. The project's
    ``model_version`` is set to the pushed one: Label Studio pre-fills the annotation editor only with that version's
    predictions.

    Args:
        inputs: :class:`~dataengine.review.inputs.ReviewInputs`.
        params: :class:`~dataengine.config.LabelStudioParams`.
        image_url_base: Base URL of an HTTP server serving the pool folder (used without local-files serving).
        conn: A client from :func:`connect` (default: a new one).

    Returns:
        Counts: ``{"project_id", "created_project", "config_updated", "new", "updated", "unchanged", "stale",
        "audit"}`` (``audit``: the audit's images pushed after the queue's).
    """
    conn = conn or connect()
    queue = queue_images(inputs.review, params.max_tasks)
    audit_names = audit_images(inputs.audit, pushed=queue)
    names = queue + audit_names
    urls, storage_path = _image_urls(inputs, names, image_url_base)
    config = label_config(inputs.class_names, params.masks)
    stats: dict[str, Any] = {"created_project": False, "config_updated": False, "new": 0, "updated": 0,
                             "unchanged": 0, "stale": 0, "audit": len(audit_names)}
    project = _find_project(conn, params.project_title)
    if project is None:
        with conn.calls("creating the project"):
            project = conn.ls.projects.create(title=params.project_title, label_config=config,
                                              description="dataengine review queue and audit (pseudo-labels to check)")
        stats["created_project"] = True
    elif (project.label_config or "").strip() != config.strip():
        with conn.calls("updating the label config"):
            conn.ls.projects.update(id=project.id, label_config=config)
        stats["config_updated"] = True
    stats["project_id"] = project.id
    if storage_path is not None:
        with conn.calls("listing local-files storages"):
            storages = conn.ls.import_storage.local.list(project=project.id)
        if not any(Path(s.path or "") == storage_path for s in storages):
            with conn.calls("creating the local-files storage"):  # grants access to the files; never synced
                conn.ls.import_storage.local.create(project=project.id, path=str(storage_path),
                                                    title="dataengine pool", use_blob_urls=True)
    images = {img["file_name"]: img for img in inputs.images}
    labelled: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for band in ("accepted", "review"):
        for record in getattr(inputs, band):
            if record["file_name"] in labelled:
                labelled[record["file_name"]].append(record)
    class_of_id = dict(zip(inputs.category_ids, inputs.class_names))
    wanted = {}
    for name in names:
        image = images.get(name) or {"file_name": name, "width": labelled[name][0]["width"],
                                     "height": labelled[name][0]["height"]}
        mask = _semantic_mask(inputs, image) if params.masks else None
        wanted[name] = task_for_image(name, int(image["width"]), int(image["height"]), labelled[name], urls[name],
                                      inputs.model_version, mask=mask, class_of_id=class_of_id)
    existing: dict[str, dict[str, Any]] = {}
    for task in _task_list(conn, project.id):
        key = (task.get("data") or {}).get("file_name")
        if key in existing:  # should not happen; keep the oldest, say so
            print(f"warning: Label Studio project {project.id} holds two tasks for {key} "
                  f"(ids {existing[key]['id']}, {task['id']})", file=sys.stderr)
            continue
        existing[key] = task
    new = [wanted[n] for n in names if n not in existing]
    for start in range(0, len(new), 500):  # one request per 500 tasks, predictions included
        with conn.calls("importing tasks"):
            conn.ls.projects.import_tasks(id=project.id, request=new[start:start + 500])
    stats["new"] = len(new)
    for name in names:
        task = existing.get(name)
        if task is None:
            continue
        want = wanted[name]
        changed = False
        if task.get("data") != want["data"]:
            with conn.calls("updating a task"):
                conn.ls.tasks.update(id=str(task["id"]), data=want["data"])
            changed = True
        prediction = want["predictions"][0]
        if not _same_prediction(task.get("predictions") or [], prediction):
            with conn.calls("replacing a prediction"):
                for old in task.get("predictions") or []:
                    conn.ls.predictions.delete(id=old["id"])
                conn.ls.predictions.create(task=task["id"], result=prediction["result"],
                                           model_version=prediction["model_version"], score=prediction["score"])
            changed = True
        stats["updated" if changed else "unchanged"] += 1
    stats["stale"] = len(set(existing) - set(names))
    if names and (getattr(project, "model_version", None) or "") != inputs.model_version:
        # Label Studio pre-fills the annotation editor only with predictions of the project's model_version, which
        # it sets from the first import and never changes: tasks re-pushed for a new teacher would open empty.
        with conn.calls("setting the project's model version"):
            conn.ls.projects.update(id=project.id, model_version=inputs.model_version)
    return stats


def _user_emails(conn: _Conn) -> dict[int, str]:
    """User id -> email; empty when the key may not list users (an annotator's key: names come from the tasks)."""
    from label_studio_sdk.core.api_error import ApiError

    with conn.calls("listing users"):
        try:
            return {u.id: u.email for u in conn.ls.users.list() if u.email}
        except ApiError as err:
            if err.status_code != 403:
                raise
            return {}  # the tasks were listed with this key, so a 403 here is a permission, not a bad key


def pull(inputs: Any, params: Any, decisions_path: str | Path, *, conn: _Conn | None = None,
         now: str | None = None) -> dict[str, Any]:
    """Merge the annotations of the project ``params.project_title`` into the decisions file.

    The latest non-cancelled annotation of each task is read with :func:`decisions_from_annotation`; the result
    replaces this tool's earlier entries (:func:`~dataengine.review.decisions.merge_pulled`), and the file is
    rewritten only when something changed. Nothing is written when any request fails.

    Returns:
        ``{"changed": bool, "tasks": n, "annotated": n, "skipped": [...], "accept"/"reject"/"correct": n,
        "added": n, "flagged": n}``.

    Raises:
        LabelStudioError: The server is unreachable, refuses the key, or has no such project.
    """
    conn = conn or connect()
    existing = load_decisions(decisions_path)  # a broken file fails before any request
    project = _find_project(conn, params.project_title)
    if project is None:
        raise conn.fail(f"no project titled {params.project_title!r} "
                        "(run `dataengine review labelstudio push` first)")
    tasks = _task_list(conn, project.id)
    users = _user_emails(conn)
    pulled: dict[str, Any] = {"labels": {}, "images": {}}
    skipped: list[str] = []
    annotated = 0
    for task in tasks:
        annotation = latest_annotation(task.get("annotations") or [])
        if annotation is None:
            continue
        annotated += 1
        got = decisions_from_annotation(task, annotation, inputs.class_names, users)
        pulled["labels"].update(got["labels"])
        pulled["images"].update(got["images"])
        skipped += got["skipped"]
    merged, _ = merge_pulled(existing, pulled, source=SOURCE, now=now)
    changed = write_decisions(decisions_path, merged)
    counts = Counter(e["decision"] for e in pulled["labels"].values())
    return {"changed": changed, "tasks": len(tasks), "annotated": annotated, "skipped": skipped,
            **{d: counts.get(d, 0) for d in ("accept", "correct", "reject")},
            "added": sum(len(e["added"]) for e in pulled["images"].values()),
            "flagged": sum(1 for e in pulled["images"].values() if e["flags"])}


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

_ENV_HELP = (f"The server comes from {URL_ENV} (e.g. http://127.0.0.1:8080) and the access token from {KEY_ENV}; "
             "neither is ever read from params or printed.")


def _parser(action: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dataengine review labelstudio {action}", description=description,
                                     epilog=_ENV_HELP)
    add_common_args(parser)
    return parser


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from dataengine.config import load_params
    from dataengine.review.inputs import load_review_inputs

    params = load_params(args.params, ["review"]).review.labelstudio
    inputs = load_review_inputs(args.filtered, args.pseudo, args.data)
    return inputs, params


def push_cli(argv: list[str]) -> int:
    """``dataengine review labelstudio push``: the review queue and the audit -> a Label Studio project."""
    parser = _parser("push", "Send the review queue to a Label Studio project (created if absent): one task per "
                     "image, its accepted and review-band pseudo-labels as predictions; then the images of the "
                     "filter's audit (a random sample of accepted labels per class; review.labelstudio.max_tasks "
                     "cuts the queue only). Re-running updates the tasks, never duplicates them. Images are served "
                     f"by Label Studio from {ROOT_ENV} (set it for the server too, with "
                     "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true) or by --image-url-base.")
    parser.add_argument("--image-url-base", default=None, metavar="URL",
                        help=f"base URL of an HTTP server serving the pool folder (used when {ROOT_ENV} is unset); "
                             "image URL = URL/<file_name>")
    args = parser.parse_args(argv)

    def body() -> int:
        inputs, params = _load(args)
        conn = connect()
        stats = push(inputs, params, image_url_base=args.image_url_base, conn=conn)
        how = "created" if stats["created_project"] else "updated" if stats["config_updated"] else "found"
        print(f"pushed to Label Studio project {params.project_title!r} (id {stats['project_id']}, {how}) at "
              f"{conn.url}: {stats['new']} new, {stats['updated']} updated, {stats['unchanged']} unchanged tasks"
              + (f" ({stats['audit']} of them audit images)" if stats["audit"] else "")
              + (f", {stats['stale']} no longer pushed (kept)" if stats["stale"] else ""))
        return 0

    return run_action(body, LabelStudioError)


def pull_cli(argv: list[str]) -> int:
    """``dataengine review labelstudio pull``: annotations -> the decisions file (see :func:`pull`)."""
    parser = _parser("pull", "Merge the Label Studio annotations of the review project into the decisions file "
                     "(kept / moved / relabelled / deleted predictions -> accept / correct / reject; drawn boxes "
                     "and the negative/relabel flags -> image entries). The file is rewritten only when something "
                     "changed; then `dvc repro` applies the decisions.")
    args = parser.parse_args(argv)

    def body() -> int:
        inputs, params = _load(args)
        conn = connect()
        stats = pull(inputs, params, args.decisions, conn=conn)
        for why in stats["skipped"]:
            print(f"skipped: {why}", file=sys.stderr)
        print(f"pulled {stats['annotated']} annotated of {stats['tasks']} tasks from {conn.url}: "
              f"{stats['accept']} accept, {stats['correct']} correct, {stats['reject']} reject, "
              f"{stats['added']} added boxes, {stats['flagged']} flagged images"
              + (f", {len(stats['skipped'])} regions skipped" if stats["skipped"] else "")
              + f"; {args.decisions} {'updated' if stats['changed'] else 'unchanged'}")
        return 0

    return run_action(body, LabelStudioError)
