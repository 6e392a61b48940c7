"""Reading images the same way everywhere: RGB uint8, EXIF orientation applied, odd formats handled or refused.

Handled: grayscale (``L``, ``1``), palette (``P``), RGBA/LA (alpha dropped: compositing on a colour would invent
background; the colour channels are kept as stored), 16-bit grayscale PNG (``I;16``; ``I`` above 255): scaled to
8 bit over the full 16-bit range, ``round(v * 255 / 65535)``, never clipped; 16-bit RGB(A) PNG: Pillow decodes it to
8 bit itself by keeping the high byte (``v >> 8``, within one level of the exact scaling); CMYK; EXIF orientation
(``ImageOps.exif_transpose``, JPEG, PNG and WebP alike): pixels, :func:`read_image`'s shape and :func:`image_size`
are all of the upright image, so COCO ``width``/``height`` and boxes are in upright coordinates, as annotation
tools and browsers show the image.
Refused with :class:`ImageReadError` (the message names the file): unreadable or truncated files, zero-size files,
images larger than ``max_pixels`` (default 50 MP: an 8000x6000 photo is 48 MP and is accepted; anything larger,
including a decompression bomb, is refused from its header before any pixel is decoded; Pillow's own bomb check,
above 179 MP, is reported the same way).

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from PIL import Image
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"
    >>> Image.fromarray(np.zeros((4, 5), np.uint8)).save(p)
    >>> read_image(p).shape
    (4, 5, 3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "ImageReadError", "read_image", "image_size", "is_image_file", "MAX_PIXELS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_PIXELS = 50_000_000


class ImageReadError(ValueError):
    """An image cannot be used: missing, empty, unreadable, truncated or too large. The message names the file."""


def is_image_file(path: str | Path) -> bool:
    """True for the supported extensions, in any letter case."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageReadError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: zero-size file")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image") from None
    except Image.DecompressionBombError as err:  # not an OSError: it would escape as a bare exception
        raise ImageReadError(f"{path}: refused before decoding, a possible decompression bomb ({err}); the limit is "
                             f"{max_pixels / 1e6:.0f} MP; downscale it first") from None
    except OSError as err:
        raise ImageReadError(f"{path}: cannot open ({err})") from None
    if img.width * img.height > max_pixels:
        img.close()
        raise ImageReadError(
            f"{path}: {img.width}x{img.height} = {img.width * img.height / 1e6:.1f} MP exceeds the limit of "
            f"{max_pixels / 1e6:.0f} MP; downscale it first"
        )
    return img


def image_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, reading only the header."""
    with _open(Path(path), max_pixels) as img:
        orientation = img.getexif().get(0x0112, 1)
        w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image fully to ``[H, W, 3]`` uint8 RGB (EXIF orientation applied).

    Raises:
        ImageReadError: Missing, zero-size, unreadable, truncated or too large; the message names the file.
    """
    path = Path(path)
    with _open(path, max_pixels) as opened:
        try:
            opened.load()
            img = ImageOps.exif_transpose(opened)  # a new image (or a copy): usable after the file is closed
        except (OSError, SyntaxError, ValueError) as err:  # PIL raises OSError("image file is truncated ...")
            raise ImageReadError(f"{path}: truncated or corrupt ({err})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, RGBA, LA, CMYK, YCbCr: alpha dropped, palette expanded
    return np.asarray(img, dtype=np.uint8).copy()


def list_images(root: str | Path) -> list[str]:
    """All image files under ``root`` (nested folders, extensions in any letter case), as sorted POSIX paths
    relative to ``root``. Hidden files and folders (``.name``) are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a directory.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "a").mkdir(); _ = (d / "a" / "x.PNG").write_bytes(b"")
        >>> list_images(d)
        ['a/x.PNG']
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"scenario image folder not found: {root}")
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if is_image_file(path) and (path.is_file() or path.is_symlink()):
            out.append(rel.as_posix())
    return sorted(out)
