"""The real input path: a page image through Pillow to the tensors the encoders see (SPEC sections 1-2).

The layout comes from `graphs.layout` (the one implementation). Crop mode: the page is
resized to (tile*w_crop, tile*h_crop) and cut row-major into w_crop*h_crop tiles (none when
the page is not tiled); the global view is `ImageOps.pad` to base_size with grey 127.
Native modes: tiny/small stretch the page to image_size, base/large pad it. Every view is
normalised with mean = std = 0.5. The tensors' shapes are checked against the layout
before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from costgraph.graphs.deepseek_ocr.config import MAX_CROPS, NORM_MEAN, NORM_STD, PAD_FILL, VISION, Mode
from costgraph.graphs.deepseek_ocr.layout import Layout, layout_for
from costgraph.graphs.pages import open_page

PADDED_NATIVE = ("base", "large")  # the native modes that keep the aspect (the others stretch)


@dataclass
class Views:
    """What one page feeds the encoders: one global view, one batch of crops (or None)."""
    mode: Mode
    layout: Layout
    global_view: torch.Tensor          # (1, 3, side, side)
    crops: torch.Tensor | None         # (w_crop*h_crop, 3, tile, tile) or None

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.w_crop, self.layout.h_crop

    def to(self, device: str) -> "Views":
        move = lambda t: None if t is None else t.to(device)
        return Views(self.mode, self.layout, move(self.global_view), move(self.crops))


def view_sides(mode: Mode) -> tuple[int, int]:
    """(global view side, crop tile side)."""
    return (mode.base_size if mode.crop_mode else mode.image_size), mode.image_size


def expected_shapes(mode: Mode, layout: Layout) -> tuple[tuple, tuple | None]:
    side, tile = view_sides(mode)
    c = VISION.sam.in_channels
    crops = (layout.num_crops, c, tile, tile) if layout.tiled else None
    return (1, c, side, side), crops


def check_views(views: Views) -> Views:
    """The tensors must be exactly what the layout says the vendor runs."""
    want_global, want_crops = expected_shapes(views.mode, views.layout)
    got_global = tuple(views.global_view.shape)
    got_crops = None if views.crops is None else tuple(views.crops.shape)
    if got_global != want_global or got_crops != want_crops:
        raise AssertionError(f"views do not match layout {views.grid}: global {got_global} (want {want_global}), "
                             f"crops {got_crops} (want {want_crops})")
    return views


# ---- from an image ----------------------------------------------------------------------

def global_image(img: Image.Image, mode: Mode) -> Image.Image:
    side, _ = view_sides(mode)
    if mode.crop_mode or mode.name in PADDED_NATIVE:
        return ImageOps.pad(img, (side, side), color=PAD_FILL)
    return img.resize((side, side))


def crop_images(img: Image.Image, layout: Layout, tile: int) -> list[Image.Image]:
    """Resize to the grid and cut row-major: tile k is at column k % w_crop, row k // w_crop."""
    if not layout.tiled:
        return []
    w, h = layout.w_crop, layout.h_crop
    big = img.resize((tile * w, tile * h))
    return [big.crop(((k % w) * tile, (k // w) * tile, (k % w + 1) * tile, (k // w + 1) * tile))
            for k in range(w * h)]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float32 in [-1, 1]: (x/255 - mean) / std."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    mean = np.asarray(NORM_MEAN, dtype=np.float32)
    std = np.asarray(NORM_STD, dtype=np.float32)
    return torch.from_numpy(((a - mean) / std).transpose(0, 3, 1, 2).copy())


def views_from_image(img: Image.Image, mode: Mode, max_num: int = MAX_CROPS) -> Views:
    img = img.convert("RGB")
    layout = layout_for(img.width, img.height, mode, max_num=max_num)
    _, tile = view_sides(mode)
    tiles = crop_images(img, layout, tile)
    views = Views(mode, layout, to_tensor([global_image(img, mode)]), to_tensor(tiles) if tiles else None)
    return check_views(views)


def views_from_file(path: str, mode: Mode, max_num: int = MAX_CROPS) -> Views:
    with open_page(path) as img:  # corrupt, truncated, non-image and oversized files are refused here
        return views_from_image(img, mode, max_num)


# ---- without an image (a size or a grid): shapes only, or seeded random pixels ------------------

def meta_views(mode: Mode, layout: Layout) -> Views:
    g, c = expected_shapes(mode, layout)
    return check_views(Views(mode, layout, torch.empty(g, device="meta"),
                             None if c is None else torch.empty(c, device="meta")))


def random_views(mode: Mode, layout: Layout, seed: int = 0) -> Views:
    """Pixels in [-1, 1] for a CPU run without an image: FLOPs do not depend on the values."""
    gen = torch.Generator().manual_seed(seed)
    g, c = expected_shapes(mode, layout)
    rand = lambda s: torch.rand(s, generator=gen) * 2 - 1
    return check_views(Views(mode, layout, rand(g), None if c is None else rand(c)))
