"""Convert Pascal VOC and YOLO label folders to dataengine's COCO form.

The output is what every stage reads: ``file_name`` relative to an image root (by default the images folder),
images numbered ``1..N`` in ``file_name`` order, categories ``1..K``, annotations ``1..M`` in image order, boxes
as COCO ``[x, y, w, h]`` converted by :mod:`dataengine.boxes`. Images without labels are kept with no
annotations (they are the negatives hard-negative mining needs).

Hand-written with ``xml.etree`` and plain text parsing rather than FiftyOne's ``VOCDetectionDataset`` /
``YOLOv5Dataset`` importers: this is a pure file conversion, and FiftyOne would start its MongoDB for it (seconds,
plus a database the data layer should not need), truncate VOC coordinates to ints, and number ids its own way;
here ids, category order and the coordinate convention are exact and tested. (Python's expat refuses
entity-expansion bombs since 3.7.1 / expat 2.4.1, so ``xml.etree`` is safe on untrusted XML of this kind.)

Choices:

- VOC coordinates are taken as written (0-based, continuous), as FiftyOne, CVAT and LabelImg read and write
  them. The original VOC devkit files are 1-based inclusive pixel indices: pass ``one_based=True`` to subtract 1
  from ``xmin``/``ymin`` as detectron2's ``load_voc_instances`` does (``xmin=1, xmax=W`` covers the image).
- VOC ``difficult`` objects are kept as ordinary objects (``iscrowd=0``) with ``"difficult": 1`` on the annotation
  (every VOC annotation carries the key, 0 or 1; other COCO tools ignore it). Not ``iscrowd=1``: crowd means "a
  region of many objects" and would become an ignore region in semantic masks; detectron2 also trains on
  difficult objects ("they don't hurt accuracy"). A later filter can drop them by the key.
- VOC categories: ``classes`` in that order, else the sorted set of names found.
- YOLO class names: ``classes``, else ``names`` in ``data.yaml``/``dataset.yaml`` (list, or dict ``{0: name}``),
  else one per line in ``classes.txt``/``obj.names``. Class ``c`` becomes category ``c + 1``.
- YOLO layout: ``images/<split>/x.jpg`` with ``labels/<split>/x.txt`` (Ultralytics), or labels next to the images
  (darknet). Segment lines (``c x1 y1 x2 y2 ...``) become polygons with their enclosing box.

Example:
    >>> coco = import_yolo("data/raw/yolo", "data/raw/train.json")  # doctest: +SKIP
    >>> coco["categories"][0]  # doctest: +SKIP
    {'id': 1, 'name': 'cell', 'supercategory': 'object'}
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml
from pycocotools import mask as mask_utils

from dataengine.boxes import xyxy_to_coco, yolo_to_xyxy
from dataengine.data.coco import CategoryMap, empty_coco, save_coco
from dataengine.data.images import IMAGE_EXTENSIONS, ImageReadError, image_size, list_images

__all__ = ["ImportFormatError", "import_voc", "import_yolo"]


class ImportFormatError(ValueError):
    """A VOC or YOLO file is malformed; the message names the file (and line or object)."""


def _relative(path: Path, image_root: Path) -> str:
    try:
        return path.absolute().relative_to(image_root.absolute()).as_posix()
    except ValueError:
        raise ImportFormatError(f"image {path} is not under the image root {image_root}") from None


def _size(path: Path) -> tuple[int, int]:
    try:
        return image_size(path)
    except ImageReadError as err:
        raise ImportFormatError(f"cannot read the size of {path}: {err}") from None


def _build(records: list[tuple[str, int, int, list[dict[str, Any]]]], names: list[str]) -> dict[str, Any]:
    """Number images, annotations and categories; ``records`` are ``(file_name, width, height, annotations)``."""
    coco = empty_coco(CategoryMap.from_names(names))
    ann_id = 0
    for image_id, (file_name, width, height, anns) in enumerate(sorted(records, key=lambda r: r[0]), start=1):
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            ann_id += 1
            coco["annotations"].append({"id": ann_id, "image_id": image_id, **ann})
    return coco


def _box_annotation(category_id: int, xyxy: list[float], **extra: Any) -> dict[str, Any]:
    bbox = [float(v) for v in xyxy_to_coco(xyxy)]
    return {"category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, **extra}


def _voc_text(node: ET.Element, path: str, where: str) -> str:
    element = node.find(path)
    if element is None or element.text is None or not element.text.strip():
        raise ImportFormatError(f"{where}: missing <{path}>")
    return element.text.strip()


def _voc_number(node: ET.Element, path: str, where: str) -> float:
    text = _voc_text(node, path, where)
    try:
        value = float(text)
    except ValueError:
        raise ImportFormatError(f"{where}: <{path}> must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ImportFormatError(f"{where}: <{path}> must be finite, got {text!r}")
    return value


def _find_image(images_dir: Path, rel_xml: Path, filename: str | None) -> Path | None:
    candidates = [rel_xml.parent / filename] if filename else []
    candidates += [rel_xml.with_suffix(ext) for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)]
    return next((images_dir / c for c in candidates if (images_dir / c).is_file()), None)


def import_voc(
    voc_root: str | Path,
    out_json: str | Path | None,
    *,
    classes: list[str] | None = None,
    split: str | None = None,
    image_root: str | Path | None = None,
    images_dir: str | Path | None = None,
    annotations_dir: str | Path | None = None,
    one_based: bool = False,
) -> dict[str, Any]:
    """Convert a Pascal VOC folder to COCO (see the module docstring for the conventions).

    Args:
        voc_root: Holds ``Annotations/`` (else the XMLs themselves) and ``JPEGImages/`` (else ``images/``, else
            the images sit in ``voc_root``).
        out_json: COCO file to write atomically; ``None`` to only return the dict.
        classes: Category names in id order; an object of another class is an error. Default: sorted names found.
        split: Only the ids in ``ImageSets/Main/<split>.txt``; default: every XML, plus images without an XML
            (as images with no objects).
        image_root: Folder ``file_name`` is relative to (default: the images folder).
        images_dir: Override the images folder.
        annotations_dir: Override the XML folder.
        one_based: Coordinates are 1-based pixel indices (the original VOC devkit): subtract 1 from xmin/ymin.

    Returns:
        The COCO dict.

    Raises:
        FileNotFoundError: A folder or the split file is missing.
        ImportFormatError: Unparseable XML (with line and column), a missing tag or non-number (naming the file
            and object), an unknown class, or an XML whose image cannot be found.

    Example:
        >>> coco = import_voc("VOC2012", "voc_train.json", split="train", one_based=True)  # doctest: +SKIP
    """
    root = Path(voc_root)
    ann_dir = Path(annotations_dir) if annotations_dir else (root / "Annotations" if (root / "Annotations").is_dir()
                                                            else root)
    img_dir = Path(images_dir) if images_dir else next(
        (d for d in (root / "JPEGImages", root / "images") if d.is_dir()), root)
    img_root = Path(image_root) if image_root else img_dir
    for folder in (ann_dir, img_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder not found: {folder}")
    if split is not None:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"VOC split file not found: {split_file}")
        ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        xmls = [ann_dir / f"{i}.xml" for i in ids]
    else:
        xmls = sorted(ann_dir.rglob("*.xml"))

    parsed: list[tuple[Path, int, int, list[tuple[str, list[float], int]]]] = []
    for xml in xmls:
        if not xml.is_file():
            raise ImportFormatError(f"{xml}: listed in split {split!r} but missing")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as err:
            line, column = err.position
            raise ImportFormatError(f"{xml}: line {line}, column {column}: not valid XML ({err.msg})") from None
        rel = xml.relative_to(ann_dir)
        filename = tree.findtext("filename")
        image = _find_image(img_dir, rel, filename.strip() if filename else None)
        if image is None:
            raise ImportFormatError(f"{xml}: image {filename!r} (or {rel.stem}.<jpg|png|...>) not found in {img_dir}")
        try:
            width, height = (int(float(tree.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
        except (ValueError, OverflowError):
            raise ImportFormatError(f"{xml}: <size> width/height must be whole numbers") from None
        if width <= 0 or height <= 0:  # some exporters write 0: the header is the truth
            width, height = _size(image)
        objects = []
        for i, obj in enumerate(tree.iter("object")):
            where = f"{xml}: object {i}"
            name = _voc_text(obj, "name", where)
            xyxy = [_voc_number(obj, f"bndbox/{k}", f"{where} ({name})") for k in ("xmin", "ymin", "xmax", "ymax")]
            if one_based:
                xyxy[0], xyxy[1] = xyxy[0] - 1.0, xyxy[1] - 1.0
            difficult = obj.findtext("difficult")
            objects.append((name, xyxy, 1 if difficult and difficult.strip() in ("1", "true") else 0))
        parsed.append((image, width, height, objects))

    found = sorted({name for *_, objects in parsed for name, _, _ in objects})
    names = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ImportFormatError(f"{ann_dir}: classes {unknown} are not in the given classes {names}")
    category = {name: i + 1 for i, name in enumerate(names)}
    records = [(_relative(image, img_root), w, h, [_box_annotation(category[n], b, difficult=d) for n, b, d in objs])
               for image, w, h, objs in parsed]
    if split is None:
        claimed = {image.absolute() for image, *_ in parsed}
        for rel_name in list_images(img_dir):
            path = img_dir / rel_name
            if path.absolute() not in claimed:
                records.append((_relative(path, img_root), *_size(path), []))
    coco = _build(records, names)
    if out_json is not None:
        save_coco(out_json, coco)
    return coco


def _yolo_names(root: Path) -> list[str]:
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            data = yaml.safe_load((root / name).read_text(encoding="utf-8")) or {}
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, dict):
                if sorted(names) != list(range(len(names))):
                    raise ImportFormatError(f"{root / name}: names keys must be 0..{len(names) - 1}, got {list(names)}")
                names = [names[i] for i in range(len(names))]
            if not isinstance(names, list) or not names:
                raise ImportFormatError(f"{root / name}: 'names' must be a non-empty list or dict, got {names!r}")
            return [str(n) for n in names]
    for name in ("classes.txt", "obj.names"):
        if (root / name).is_file():
            return [line.strip() for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ImportFormatError(f"{root}: no class names: pass classes, or add data.yaml (names:), classes.txt or "
                            "obj.names")


def _yolo_annotations(label_file: Path, width: int, height: int, num_classes: int) -> list[dict[str, Any]]:
    anns = []
    for lineno, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{label_file}: line {lineno}"
        if len(tokens) != 5 and (len(tokens) < 7 or len(tokens) % 2 == 0):
            raise ImportFormatError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
                                    f"got {line!r}")
        try:
            cls, values = int(tokens[0]), [float(t) for t in tokens[1:]]
        except ValueError:
            raise ImportFormatError(f"{where}: class must be an int and coordinates numbers, got {line!r}") from None
        if not 0 <= cls < num_classes:
            raise ImportFormatError(f"{where}: class {cls} is not in 0..{num_classes - 1}")
        if not all(math.isfinite(v) for v in values):
            raise ImportFormatError(f"{where}: coordinates must be finite, got {line!r}")
        if len(tokens) == 5:
            anns.append(_box_annotation(cls + 1, [float(v) for v in yolo_to_xyxy(values, width, height)]))
            continue
        polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]  # x1 y1 x2 y2 ... absolute
        xs, ys = polygon[0::2], polygon[1::2]
        ann = _box_annotation(cls + 1, [min(xs), min(ys), max(xs), max(ys)], segmentation=[polygon])
        ann["area"] = float(mask_utils.area(mask_utils.frPyObjects([polygon], height, width)).sum())
        anns.append(ann)
    return anns


def import_yolo(
    yolo_root: str | Path,
    out_json: str | Path | None,
    *,
    classes: list[str] | None = None,
    split: str | None = None,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Convert a YOLO folder (Ultralytics ``images/``+``labels/``, or darknet labels beside images) to COCO.

    Args:
        yolo_root: The dataset folder (holding ``data.yaml``, ``classes.txt`` or ``obj.names`` unless ``classes``).
        out_json: COCO file to write atomically; ``None`` to only return the dict.
        classes: Class names, index = YOLO class.
        split: Only ``images/<split>/`` (and ``labels/<split>/``); default: every image under ``images/``.
        image_root: Folder ``file_name`` is relative to (default: the images folder).

    Returns:
        The COCO dict; an image without a label file (or with an empty one) has no annotations.

    Raises:
        FileNotFoundError: The images folder is missing.
        ImportFormatError: No class names, a malformed label line (naming file and line), a class out of range,
            or an unreadable image (its size is needed to un-normalise the boxes).

    Example:
        >>> coco = import_yolo("datasets/cells", "cells_train.json", split="train")  # doctest: +SKIP
    """
    root = Path(yolo_root)
    names = list(classes) if classes is not None else _yolo_names(root)
    if (root / "images").is_dir():
        img_dir, label_dir = root / "images", root / "labels"
    else:
        img_dir = label_dir = root
    if split is not None:
        img_dir, label_dir = img_dir / split, label_dir / split
    img_root = Path(image_root) if image_root else img_dir
    records = []
    for rel_name in list_images(img_dir):  # raises FileNotFoundError naming img_dir
        path = img_dir / rel_name
        width, height = _size(path)
        label_file = label_dir / Path(rel_name).with_suffix(".txt")
        anns = _yolo_annotations(label_file, width, height, len(names)) if label_file.is_file() else []
        records.append((_relative(path, img_root), width, height, anns))
    coco = _build(records, names)
    if out_json is not None:
        save_coco(out_json, coco)
    return coco
