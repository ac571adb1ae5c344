"""Opening page images safely: every failure becomes one clear ValueError."""
from __future__ import annotations

import contextlib
import os
import warnings

from PIL import Image


@contextlib.contextmanager
def open_page(path: str):
    """Open and fully decode an image; corrupt, truncated, non-image and oversized files are refused."""
    if not os.path.isfile(path):
        raise ValueError(f"no such image file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: image too large (over Pillow's decompression-bomb limit): {e}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or truncated image ({e})") from None
    try:
        if img.width <= 0 or img.height <= 0:
            raise ValueError(f"{path}: image has no pixels ({img.width}x{img.height})")
        yield img
    finally:
        img.close()
