"""Reading page images as the vendor's `load_image` does (SPEC section 2, "Loading"); every failure
is one clear ValueError.

Two readings of one file, with one rule for its orientation and one for its size limits:
- `page_size(path)`: the page's (width, height) as the vendor lays it out, without decoding every
  pixel: the header's size, width and height swapped when the EXIF orientation turns the page a
  quarter (5-8), and the file's data checked as far as that is cheap (PNG: every chunk's CRC up to
  IEND, and a PNG whose orientation may follow its pixel data is read in full; JPEG: a full decode
  at 1/8 scale; other formats: a full decode). A layout needs no more: `cost`/`roofline --image`,
  `sweep --folder` and the ViT's image sizes use it, so a 139 MP PNG scan costs no 400 MB there.
- `open_page(path)`: the pixels, as `load_image` gives them: fully decoded, `ImageOps.exif_transpose`,
  then `.convert("RGB")` (the reference preprocessing of `verify --image`).

Size limits are Pillow's defaults, as the vendor keeps them: a page over `Image.MAX_IMAGE_PIXELS`
(about 89.5 MP; an A0 scan at 300 dpi is 139 MP) is read with a `PageWarning` naming it; a page
over twice that (about 179 MP) is refused, as Pillow refuses it (a decompression bomb).
"""
from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib

from PIL import Image, ImageOps

ORIENTATION = 0x0112          # the EXIF tag
QUARTER_TURNS = (5, 6, 7, 8)  # orientations whose transpose swaps width and height
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class PageWarning(UserWarning):
    """A page read as the vendor reads it, with something worth a note (a very large page)."""


def _open(path: str) -> tuple[Image.Image, str | None]:
    """The file opened (header only) under Pillow's decompression-bomb limits, and the note on a
    page over the warning limit (given once the page has been read)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: a folder, not an image file" if os.path.isdir(path) else
                         f"{path}: not a regular file" if os.path.exists(path) else f"no such image file: {path}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large, refused as the vendor's Pillow refuses it "
                         f"(decompression-bomb limit): {e}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{path}: not an image Pillow can read") from None
    except DECODE_ERRORS as e:
        raise ValueError(f"{path}: corrupt or truncated image ({e})") from None
    note = None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            limit = Image.MAX_IMAGE_PIXELS
            note = (f"{path}: a large page ({img.width}x{img.height}, {img.width * img.height:,} pixels, over "
                    f"Pillow's warning limit of {limit:,}): read, as the vendor reads it (refused over {2 * limit:,})")
        else:
            warnings.warn(w.message, w.category, stacklevel=3)
    if img.width <= 0 or img.height <= 0:
        img.close()
        raise ValueError(f"{path}: image has no pixels ({img.width}x{img.height})")
    return img, note


def _give(note: str | None) -> None:
    if note:
        warnings.warn(note, PageWarning, stacklevel=4)


# text chunks whose keyword Pillow reads an orientation from (XMP, ImageMagick's raw EXIF profile)
ORIENTING_TEXT = (b"XML:com.adobe.xmp", b"Raw profile type exif")


def _png_chunks(path: str) -> tuple[bytes | None, bool]:
    """Every chunk of a PNG checked (length, CRC, pixel data present, IEND reached) without
    decompressing: the payload of its eXIf chunk wherever it is, and whether a text chunk that may
    carry an orientation follows the pixel data (Pillow reads those only when it decodes)."""
    exif, idat, late_text = None, False, False
    with open(path, "rb") as f:
        f.read(8)  # the signature: Pillow checked it
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("truncated PNG file (no IEND chunk)")
            length, kind = struct.unpack(">I4s", head)
            data, crc = f.read(length), f.read(4)
            if len(data) < length or len(crc) < 4:
                raise ValueError(f"truncated PNG file (in a {kind.decode('latin-1')} chunk)")
            if zlib.crc32(kind + data) & 0xFFFFFFFF != struct.unpack(">I", crc)[0]:
                raise ValueError(f"broken PNG file (bad checksum in a {kind.decode('latin-1')} chunk)")
            if kind == b"eXIf":
                exif = data
            elif idat and kind in (b"tEXt", b"zTXt", b"iTXt") and data.split(b"\0", 1)[0] in ORIENTING_TEXT:
                late_text = True
            idat |= kind == b"IDAT"
            if kind == b"IEND":
                break
    if not idat:
        raise ValueError("PNG file without pixel data (no IDAT chunk)")
    return exif, late_text


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation as Pillow's `getexif` finds it (EXIF, raw profile or XMP), 1 when absent
    or unreadable (the vendor's `load_image` then keeps the page as stored). For a PNG, the base
    method: the PNG one decodes every pixel when the header has no eXIf chunk."""
    try:
        exif = Image.Image.getexif(img) if img.format == "PNG" else img.getexif()
        return int(exif.get(ORIENTATION, 1))
    except Exception:  # corrupt EXIF: as the vendor, keep the page as stored
        return 1


def page_size(path: str) -> tuple[int, int]:
    """(width, height) of the page as the vendor lays it out (EXIF orientation applied), its data
    checked without decoding every pixel where the format allows (see the module's doc)."""
    img, note = _open(path)
    try:
        w, h = img.size
        if img.format == "PNG":
            exif, late_text = _png_chunks(path)
            if late_text:  # an orientation may follow the pixels: read the page as the vendor does
                img.close()
                with open_page(path) as page:
                    return page.size
            if exif is not None:
                img.info.setdefault("exif", exif)  # one after the pixel data (Pillow's own when before)
        turn = _orientation(img) in QUARTER_TURNS
        if img.format == "JPEG":  # every coefficient decoded, at 1/8 of the pixels
            img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
        if img.format != "PNG":
            img.load()
    except DECODE_ERRORS as e:
        raise ValueError(f"{path}: corrupt or truncated image ({e})") from None
    finally:
        img.close()
    _give(note)
    return (h, w) if turn else (w, h)


@contextlib.contextmanager
def open_page(path: str):
    """The page's pixels as the vendor's `load_image` gives them: decoded, EXIF-transposed, RGB."""
    img, note = _open(path)
    try:
        try:
            img.load()
        except DECODE_ERRORS as e:
            raise ValueError(f"{path}: corrupt or truncated image ({e})") from None
        try:
            ImageOps.exif_transpose(img, in_place=True)  # a no-op without a turning orientation
        except Exception:  # the vendor's load_image falls back to the page as stored
            pass
        page = img if img.mode == "RGB" else img.convert("RGB")
    except BaseException:
        img.close()
        raise
    _give(note)
    try:
        yield page
    finally:
        page.close()
        img.close()
