"""Find every defect in a COCO dataset or a scenario image folder, without changing anything.

A :class:`ValidationReport` lists one :class:`Defect` per bad entry (never stopping at the first), each with a
machine-readable ``code``:

================================  ==========  ==============================================================
code                              kind        meaning
================================  ==========  ==============================================================
``bad_json``                      file        the COCO file is not JSON or lacks ``images``/``categories``
``bad_entry``                     any         an entry lacks a required key or has the wrong type
``missing_image``                 image       the file does not exist
``zero_size_image``               image       the file is empty
``unreadable_image``              image       the header cannot be parsed (not an image, too many pixels)
``truncated_image``               image       the header parses but the pixels do not decode (cut-off file)
``size_mismatch``                 image       declared ``width``/``height`` differ from the decoded image
``path_escape``                   image       ``..``, an absolute path, or a symlink out of the image root
``duplicate_image_id``            image       a second image with the same id
``duplicate_annotation_id``       annotation  a second annotation with the same id
``duplicate_category_id``         category    a second category with the same id
``unknown_image_id``              annotation  ``image_id`` names no image
``unknown_category``              annotation  ``category_id`` names no category
``bad_box``                       annotation  ``bbox`` missing, not 4 numbers
``nan_box``                       annotation  ``bbox`` holds NaN or infinity
``zero_area_box``                 annotation  ``bbox`` width or height <= 0
``box_outside_image``             annotation  ``bbox`` leaves the image by more than :data:`BOX_TOLERANCE`
``bad_segmentation``              annotation  polygons/RLE malformed, or RLE size/run total not the image's
================================  ==========  ==============================================================

Image sizes are compared after EXIF orientation, as :func:`dataengine.data.images.read_image` returns them.
:func:`split_bad` implements ``data.on_bad: skip``: it returns a clean copy and the quarantined entries.

Example:
    >>> import tempfile, pathlib, json
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> coco = {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
    ...         "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2]}],
    ...         "categories": [{"id": 1, "name": "cell"}]}
    >>> _ = (d / "c.json").write_text(json.dumps(coco))
    >>> [x.code for x in validate_coco(d / "c.json", d, check_images=False).defects]
    ['unknown_category']
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dataengine.data.coco import CocoFormatError, load_coco
from dataengine.data.importers import ImportFormatError, import_voc, import_yolo
from dataengine.data.images import ImageReadError, image_size, list_images, read_image
from dataengine.io import PathEscapeError, atomic_write_json, safe_join

__all__ = [
    "BOX_TOLERANCE",
    "Defect",
    "ValidationReport",
    "validate_coco",
    "validate_image_folder",
    "split_bad",
    "validate_cli",
    "import_cli",
]

BOX_TOLERANCE = 1.0
"""Pixels a box may leave the image by. Exporters write ``x + w`` a hair past the border through float rounding,
and 1-based tools (Pascal VOC's devkit) put ``xmax = W``: neither is a labelling error, and one pixel is below
what a detector can resolve. Anything further out is reported."""


@dataclass(frozen=True)
class Defect:
    """One bad entry.

    Attributes:
        file: The image file the entry refers to (``file_name`` as written), else the COCO file.
        kind: ``"image"``, ``"annotation"``, ``"category"`` or ``"file"`` (the COCO file itself).
        id: The entry's id as written (``None`` when it has none, or it is not an int or str).
        code: Machine-readable reason (table in the module docstring).
        reason: What is wrong, with the offending value and what was expected.
    """

    file: str
    kind: str
    id: int | str | None
    code: str
    reason: str


@dataclass
class ValidationReport:
    """Every defect found, and how many entries were checked.

    Attributes:
        source: The COCO file or image folder checked.
        defects: One per bad entry, in file order (images, then annotations, then categories).
        counts: Entries checked: ``{"images": n, "annotations": n, "categories": n}``.
    """

    source: str
    defects: list[Defect] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"images": 0, "annotations": 0, "categories": 0})

    @property
    def ok(self) -> bool:
        return not self.defects

    def by_code(self) -> dict[str, int]:
        """Number of defects per code, sorted by code."""
        return dict(sorted(Counter(d.code for d in self.defects).items()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: ``ok``, ``source``, ``counts``, ``by_code`` and ``defects``."""
        return {"ok": self.ok, "source": self.source, "counts": dict(self.counts), "by_code": self.by_code(),
                "defects": [asdict(d) for d in self.defects]}

    def format(self) -> str:
        """A table (file, kind, id, code, reason), one line per defect, then a summary line.

        Example:
            >>> print(ValidationReport("x.json", [Defect("a.png", "image", 3, "missing_image", "missing")]).format())
            file   kind   id  code           reason
            a.png  image  3   missing_image  missing
            1 defect in x.json (0 images, 0 annotations, 0 categories checked): missing_image 1
        """
        checked = ", ".join(f"{n} {k}" for k, n in self.counts.items())
        if self.ok:
            return f"OK: no defects in {self.source} ({checked} checked)"
        header = ("file", "kind", "id", "code", "reason")
        rows = [header] + [(d.file, d.kind, "-" if d.id is None else str(d.id), d.code, d.reason) for d in self.defects]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join([*(r[i].ljust(widths[i]) for i in range(4)), r[4]]) for r in rows]
        n = len(self.defects)
        codes = ", ".join(f"{c} {k}" for c, k in self.by_code().items())
        lines.append(f"{n} defect{'s' if n != 1 else ''} in {self.source} ({checked} checked): {codes}")
        return "\n".join(lines)


def _entry_id(value: Any) -> int | str | None:
    """An id usable as a key: int (not bool) or str; anything else is ``None`` (reported as ``bad_entry``)."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rle_run_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (a port of ``rleFrString`` in pycocotools' ``maskApi.c``).

    Hand-written because pycocotools does not check that the runs add up to ``h * w``: decoding an RLE whose runs
    fall short returns uninitialised pixels instead of raising.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("RLE string ends inside a number")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
        if len(runs) > 2:
            x += runs[-2]  # runs after the second are stored as differences
        runs.append(x)
    return runs


def _segmentation_problem(seg: Any, height: int | None, width: int | None) -> str | None:
    """Why a ``segmentation`` is malformed, or ``None`` when it is usable (empty counts as absent)."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, list):
        for i, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return f"polygon {i} must be a list of >= 3 x, y pairs, got {str(poly)[:60]}"
            if not all(_is_number(v) and math.isfinite(v) for v in poly):
                return f"polygon {i} holds a non-number, NaN or infinity"
        return None
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return f"expected a list of polygons or an RLE dict with 'size' and 'counts', got {str(seg)[:60]}"
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return f"RLE size must be [height, width], got {size!r}"
    if height is not None and width is not None and list(size) != [height, width]:
        return f"RLE size {size} differs from the image's [height, width] = [{height}, {width}]"
    counts = seg["counts"]
    if isinstance(counts, list) and all(isinstance(v, int) and v >= 0 for v in counts):
        runs = counts
    elif isinstance(counts, str):
        try:
            runs = _rle_run_counts(counts)
        except ValueError as err:
            return f"RLE counts cannot be parsed: {err}"
    else:
        return "RLE counts must be a string or a list of non-negative ints"
    if any(r < 0 for r in runs):
        return "RLE has a negative run length"
    if sum(runs) != size[0] * size[1]:
        return f"RLE runs add up to {sum(runs)} pixels; expected {size[0]} x {size[1]} = {size[0] * size[1]}"
    return None


def _check_image_file(root: Path, name: str) -> tuple[Path | None, str | None, str, tuple[int, int] | None]:
    """Resolve and fully decode one image: ``(path, code, reason, (width, height))`` with ``code`` None if fine."""
    try:
        path = safe_join(root, name)
    except PathEscapeError as err:
        return None, "path_escape", str(err), None
    if not path.exists():
        return path, "missing_image", f"{path}: missing", None
    if not path.is_file():
        return path, "unreadable_image", f"{path}: not a regular file", None
    if path.stat().st_size == 0:
        return path, "zero_size_image", f"{path}: zero-size file", None
    try:
        pixels = read_image(path)  # decodes every pixel: a cut-off JPEG/PNG only fails here
    except ImageReadError as err:
        try:
            image_size(path)  # header only: if this works, the file is cut off or corrupt after its header
        except ImageReadError as header_err:
            return path, "unreadable_image", str(header_err), None
        return path, "truncated_image", str(err), None
    return path, None, "", (pixels.shape[1], pixels.shape[0])


def _progress(items: list[Any], enabled: bool, desc: str) -> Any:
    return tqdm(items, desc=desc, unit="img", disable=not enabled)


def validate_coco(
    coco_path: str | Path, image_root: str | Path, *, check_images: bool = True, progress: bool = False
) -> ValidationReport:
    """Check a COCO file and its images; report every defect (see the module docstring for the codes).

    Args:
        coco_path: The COCO JSON file.
        image_root: The folder ``file_name`` is relative to.
        check_images: Decode every image fully (about 6 ms per 640x480 JPEG on one CPU core); without it only the
            JSON is checked (ids, categories, boxes against the declared sizes, path escapes, symlinks).
        progress: Show a tqdm progress bar over the images.

    Returns:
        The report; a file that is not COCO JSON gives one ``bad_json`` defect. Nothing is modified.

    Raises:
        FileNotFoundError: ``coco_path`` does not exist, or ``check_images`` and ``image_root`` is not a folder.

    Example:
        >>> report = validate_coco("data/prepared/general/train.json", "data/prepared/general/images")  # doctest: +SKIP
        >>> report.ok  # doctest: +SKIP
        True
    """
    coco_path, root = Path(coco_path), Path(image_root)
    if check_images and not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root} (for {coco_path})")
    report = ValidationReport(source=str(coco_path))
    try:
        coco = load_coco(coco_path)
    except CocoFormatError as err:
        report.defects.append(Defect(str(coco_path), "file", None, "bad_json", str(err)))
        return report
    defects, src = report.defects, str(coco_path)

    def add(file: str, kind: str, entry_id: Any, code: str, reason: str) -> None:
        defects.append(Defect(file, kind, _entry_id(entry_id), code, reason))

    # Images: ids, declared sizes, files.
    sizes: dict[int | str, tuple[int | None, int | None]] = {}
    names: dict[int | str, str] = {}
    for img in _progress(coco["images"], progress, "validate images"):
        img = img if isinstance(img, dict) else {}
        iid, name = _entry_id(img.get("id")), img.get("file_name")
        label = name if isinstance(name, str) and name else src
        if iid is None:
            add(label, "image", None, "bad_entry", f"image id must be an int or str, got {img.get('id')!r}")
        elif iid in sizes:
            add(label, "image", iid, "duplicate_image_id", f"image id {iid!r} is used again (first by {names[iid]})")
        w, h = img.get("width"), img.get("height")
        declared = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
        if not declared:
            add(label, "image", iid, "bad_entry", f"width/height must be positive ints, got {w!r} x {h!r}")
        if iid is not None and iid not in sizes:
            sizes[iid], names[iid] = ((w, h) if declared else (None, None)), label
        if not isinstance(name, str) or not name:
            add(label, "image", iid, "bad_entry", f"file_name must be a non-empty string, got {name!r}")
            continue
        if not check_images:
            try:
                safe_join(root, name)
            except PathEscapeError as err:
                add(name, "image", iid, "path_escape", str(err))
            continue
        _, code, reason, actual = _check_image_file(root, name)
        if code is not None:
            add(name, "image", iid, code, reason)
        elif declared and actual != (w, h):
            add(name, "image", iid, "size_mismatch", f"declared {w} x {h} but the file is {actual[0]} x {actual[1]}")
        elif not declared and iid is not None and sizes[iid] == (None, None):
            sizes[iid] = actual  # boxes can still be checked against the real size

    # Categories.
    cat_ids: set[int] = set()
    for cat in coco["categories"]:
        cat = cat if isinstance(cat, dict) else {}
        cid = cat.get("id")
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 1:
            add(src, "category", cid, "bad_entry",
                f"category id must be an int >= 1 (0 is background in semantic masks), got {cid!r}")
            continue
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            add(src, "category", cid, "bad_entry", f"category {cid} needs a non-empty string 'name'")
        if cid in cat_ids:
            add(src, "category", cid, "duplicate_category_id", f"category id {cid} is used again ({cat.get('name')!r})")
        cat_ids.add(cid)

    # Annotations.
    ann_ids: set[int | str] = set()
    for ann in coco["annotations"]:
        ann = ann if isinstance(ann, dict) else {}
        aid, iid = _entry_id(ann.get("id")), _entry_id(ann.get("image_id"))
        label = names.get(iid, src) if iid is not None else src
        if aid is None:
            add(label, "annotation", None, "bad_entry", f"annotation id must be an int or str, got {ann.get('id')!r}")
        elif aid in ann_ids:
            add(label, "annotation", aid, "duplicate_annotation_id", f"annotation id {aid!r} is used again")
        ann_ids.add(aid)
        if iid not in sizes:
            add(label, "annotation", aid, "unknown_image_id", f"image_id {ann.get('image_id')!r} names no image")
        if _entry_id(ann.get("category_id")) not in cat_ids:  # _entry_id: a list id must not raise TypeError
            add(label, "annotation", aid, "unknown_category",
                f"category_id {ann.get('category_id')!r} is not one of {sorted(cat_ids)}")
        w, h = sizes.get(iid, (None, None))
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            add(label, "annotation", aid, "bad_box", f"bbox must be 4 numbers [x, y, w, h], got {box!r}")
        elif not all(math.isfinite(v) for v in box):
            add(label, "annotation", aid, "nan_box", f"bbox {box} holds NaN or infinity")
        elif box[2] <= 0 or box[3] <= 0:
            add(label, "annotation", aid, "zero_area_box", f"bbox {box} has width or height <= 0")
        elif w is not None and (min(box[0], box[1]) < -BOX_TOLERANCE or box[0] + box[2] > w + BOX_TOLERANCE
                                or box[1] + box[3] > h + BOX_TOLERANCE):
            add(label, "annotation", aid, "box_outside_image",
                f"bbox {box} (x2={box[0] + box[2]:g}, y2={box[1] + box[3]:g}) leaves the {w} x {h} image by more "
                f"than {BOX_TOLERANCE:g} px")
        problem = _segmentation_problem(ann.get("segmentation"), h, w)
        if problem is not None:
            add(label, "annotation", aid, "bad_segmentation", problem)

    report.counts = {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
                     "categories": len(coco["categories"])}
    return report


def validate_image_folder(root: str | Path, *, progress: bool = False) -> tuple[list[str], ValidationReport]:
    """Check every image of a scenario folder (nested, any extension case) by decoding it fully.

    Args:
        root: The folder.
        progress: Show a tqdm progress bar.

    Returns:
        The readable images (sorted POSIX paths relative to ``root``) and a report of the others
        (``zero_size_image``, ``unreadable_image``, ``truncated_image``, ``path_escape``, ``missing_image`` for a
        dangling symlink); defects have ``id=None`` and ``file`` relative to ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.

    Example:
        >>> good, report = validate_image_folder("data/prepared/scenario/pool")  # doctest: +SKIP
    """
    root = Path(root)
    names = list_images(root)
    report = ValidationReport(source=str(root), counts={"images": len(names)})
    good = []
    for name in _progress(names, progress, "validate images"):
        _, code, reason, _ = _check_image_file(root, name)
        if code is None:
            good.append(name)
        else:
            report.defects.append(Defect(name, "image", None, code, reason))
    return good, report


def split_bad(coco: dict[str, Any], report: ValidationReport) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Drop bad entries for ``data.on_bad: skip``: a clean deep copy of ``coco`` and the quarantined entries.

    A bad image is dropped with all its annotations (quarantined as ``dropped_with_image``); a bad annotation
    (including an unknown category or image id) is dropped alone. Entries are matched by id, so every entry
    that shares a duplicated id goes: which of them the other entries meant cannot be told.

    Args:
        coco: The dict that ``report`` was made from (not modified).
        report: From :func:`validate_coco`.

    Returns:
        ``(clean, quarantine)``; each quarantine entry is ``{"file", "kind", "id", "code", "reason"}``.

    Raises:
        ValueError: The report has ``file`` or ``category`` defects: dropping categories would change the label
            space, so those must be fixed by hand.

    Example:
        >>> coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}
        >>> report = ValidationReport("c.json", [Defect("a.png", "image", 1, "missing_image", "missing")])
        >>> clean, quarantine = split_bad(coco, report)
        >>> clean["images"], [q["code"] for q in quarantine]
        ([], ['missing_image'])
    """
    unfixable = [d for d in report.defects if d.kind in ("file", "category")]
    if unfixable:
        raise ValueError(f"{report.source}: {len(unfixable)} file/category defects cannot be skipped, fix them first: "
                         + "; ".join(f"{d.code} ({d.reason})" for d in unfixable[:5]))
    images = [img if isinstance(img, dict) else {} for img in coco["images"]]
    files = {_entry_id(img.get("id")): str(img.get("file_name")) for img in images}
    bad_images = {d.id for d in report.defects if d.kind == "image"}
    bad_anns = {d.id for d in report.defects if d.kind == "annotation"}
    quarantine = [asdict(d) for d in report.defects]
    clean = {k: copy.deepcopy(v) for k, v in coco.items() if k not in ("images", "annotations")}
    clean["images"] = [copy.deepcopy(img) for img in images if _entry_id(img.get("id")) not in bad_images]
    kept_images = {img["id"] for img in clean["images"]}
    clean["annotations"] = []
    for ann in coco["annotations"]:
        ann = ann if isinstance(ann, dict) else {}
        aid, iid = _entry_id(ann.get("id")), _entry_id(ann.get("image_id"))
        if aid in bad_anns:
            continue
        if iid not in kept_images:  # its image was quarantined (unknown image ids are already in bad_anns)
            quarantine.append({"file": files.get(iid, "?"), "kind": "annotation", "id": aid,
                               "code": "dropped_with_image", "reason": f"its image {iid!r} was quarantined"})
            continue
        clean["annotations"].append(copy.deepcopy(ann))
    return clean, quarantine


def _default_image_root(coco_path: Path) -> Path:
    images = coco_path.parent / "images"
    return images if images.is_dir() else coco_path.parent


def validate_cli(argv: list[str] | None = None) -> int:
    """``dataengine validate PATH [--images ROOT] [--no-images] [--json OUT]``.

    PATH is a COCO JSON file or a scenario image folder. For a JSON the image root is ``--images``, else
    ``images/`` next to the JSON if that folder exists, else the JSON's own folder.

    Returns:
        0 when clean, 1 when defects were found, 2 for usage errors (PATH or ROOT missing, bad options).

    Example:
        >>> validate_cli(["data/prepared/general/train.json"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="dataengine validate", description="Report every defect in a dataset.")
    parser.add_argument("path", type=Path, help="COCO JSON file, or a folder of scenario images")
    parser.add_argument("--images", type=Path, help="image root of the COCO file (default: see docs)")
    parser.add_argument("--no-images", action="store_true", help="check only the JSON, do not decode images")
    parser.add_argument("--json", type=Path, dest="json_out", help="also write the report as JSON here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad options, 0 on --help
        return int(exit_.code or 0)
    progress = sys.stderr.isatty()
    if args.path.is_dir():
        if args.images is not None or args.no_images:
            print("error: --images/--no-images apply only to a COCO JSON file", file=sys.stderr)
            return 2
        _, report = validate_image_folder(args.path, progress=progress)
    elif args.path.is_file():
        root = args.images if args.images is not None else _default_image_root(args.path)
        try:
            report = validate_coco(args.path, root, check_images=not args.no_images, progress=progress)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        print(f"error: {args.path} is neither a COCO JSON file nor an image folder", file=sys.stderr)
        return 2
    print(report.format())
    if args.json_out is not None:
        atomic_write_json(args.json_out, report.to_dict())
    return 0 if report.ok else 1


def import_cli(argv: list[str] | None = None) -> int:
    """``dataengine import {voc,yolo} SRC --out COCO.json [--images ROOT] [--classes A,B,...] [--split NAME]``.

    Returns:
        0 on success, 1 when the source is malformed (the message names the file and line), 2 for usage errors.

    Example:
        >>> import_cli(["yolo", "data/raw/yolo", "--out", "data/raw/train.json"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="dataengine import", description="Convert VOC or YOLO labels to COCO.")
    parser.add_argument("format", choices=("voc", "yolo"))
    parser.add_argument("src", type=Path, help="VOC root (Annotations/, JPEGImages/) or YOLO root")
    parser.add_argument("--out", type=Path, required=True, help="COCO JSON to write")
    parser.add_argument("--images", type=Path, help="folder file_name is made relative to (default: the images)")
    parser.add_argument("--classes", help="comma-separated class names, in category-id order")
    parser.add_argument("--split", help="VOC ImageSets/Main/<split>.txt, or YOLO images/<split>/")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if not args.src.is_dir():
        print(f"error: source folder not found: {args.src}", file=sys.stderr)
        return 2
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    convert = import_voc if args.format == "voc" else import_yolo
    try:
        coco = convert(args.src, args.out, classes=classes, split=args.split, image_root=args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, "
          f"{len(coco['categories'])} categories")
    return 0
