"""The crop layout and the image-token count of DeepSeek-OCR 2: `DeepseekOcr2ImageProcessor`'s torchvision
logic (`get_optimal_tiled_canvas`, `_preprocess`) and `DeepseekOcr2Processor.replace_image_token` mirrored.

- Crops only when the page's longest side exceeds the tile (768); then a grid of min..max tiles
  (2..6) whose aspect is closest to the page's. Candidates: (columns, rows) with min <= c*r <= max,
  columns then rows ascending, sorted (stably) by c*r; the walk is DeepSeek-OCR's (a strictly closer
  aspect leads; an equal one switches to the later candidate when the page's area exceeds half the
  candidate's canvas), so `costgraph.graphs.deepseek_ocr.layout.closest_grids` runs it.
  The PIL processor's `get_number_of_image_patches` (inherited) forgets the 768 rule; it is not followed.
- Image tokens: 256 (global 16x16 queries) + 144 (12x12 queries) per crop + 1 view separator; no
  newline tokens. A page within 768x768 has no crops; its grid is reported as 1x1 (never a candidate).
This is the one implementation: the graph's substitution, the CLI and the verifier call it.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from costgraph.graphs.deepseek_ocr.layout import (Layout, Layouts, check_max_num, check_size, closest_grids,
                                                  crops_run, layout_for_grid, refuse_pages)
from . import symbols as S
from .config import MAX_CROPS, MIN_CROPS, VISION, Mode

__all__ = ["Layout", "Layouts", "candidate_grids", "all_grids", "layouts_for", "layout_for", "layout_for_grid",
           "check_grid", "image_tokens", "tokens_for", "check_pages", "global_view_size"]


def candidate_grids(min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    """(columns, rows) with min_num <= c*r <= max_num in the processor's order."""
    grids = [(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num]
    return sorted(grids, key=lambda g: g[0] * g[1])


def all_grids(max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    """Every grid the layout can produce: the no-crop 1x1, then the candidates."""
    return [(1, 1)] + candidate_grids(MIN_CROPS, max_num)


def global_view_size(widths, heights, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The page resized so its longest side is `side` (before the grey padding to a square):
    `round(h * (side / max(h, w)))` as Python computes it (`np.rint` rounds half to even like `round`)."""
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    scale = side / np.maximum(w, h)
    return np.rint(w * scale).astype(np.int64), np.rint(h * scale).astype(np.int64)


def check_pages(widths, heights, mode: Mode) -> None:
    """Pages the processor cannot handle are refused up front: a side that rounds to 0 in the global view."""
    refuse_pages(widths, heights, lambda w, h: global_view_size(w, h, mode.base_size),
                 f"{mode.base_size}-pixel global view")


def layouts_for(widths, heights, mode: Mode, max_num: int = MAX_CROPS) -> Layouts:
    """The processor's grid choice for arrays of page sizes."""
    w = np.asarray(widths, dtype=np.int64).ravel()
    h = np.asarray(heights, dtype=np.int64).ravel()
    check_pages(w, h, mode)
    check_max_num(max_num)
    tiled = np.maximum(w, h) > mode.image_size
    i, j = closest_grids(w, h, mode.image_size, candidate_grids(MIN_CROPS, max_num))
    return Layouts(w, h, np.where(tiled, i, 1), np.where(tiled, j, 1), tiled)


def layout_for(width: int, height: int, mode: Mode, max_num: int = MAX_CROPS) -> Layout:
    check_size(width, height)
    lay = layouts_for([width], [height], mode, max_num)
    return Layout(width, height, int(lay.w_crop[0]), int(lay.h_crop[0]), bool(lay.tiled[0]))


def check_grid(grid, mode: Mode, max_num: int = MAX_CROPS, what_if: bool = False) -> str | None:
    """A grid given directly must be one the layout can produce under `max_num` (1x1: no crops); any
    other is refused, or with `what_if` accepted and labelled (the returned note)."""
    check_max_num(max_num)
    grid = tuple(grid)
    if grid == (1, 1) or grid in candidate_grids(MIN_CROPS, max_num):
        return None
    n = grid[0] * grid[1]
    why = (f"{grid[0]}x{grid[1]} = {n} crops: the layout never produces more than --max-num {max_num}"
           if n > max_num else f"{grid[0]}x{grid[1]} is not a grid the layout produces")
    if not what_if:
        raise ValueError(f"grid {why}; pass --what-if to cost it anyway (labelled as a what-if)")
    return f"what-if: {why}"


def image_tokens(mode: Mode, w=S.w_crop, h=S.h_crop) -> dict:
    """Token slots per part: crops first (144 each), the global view (256), one separator. `paper`: without
    the separator. Concrete w, h give integers."""
    run = crops_run(w, h)
    crops = sp.sympify(run * w * h * VISION.num_queries(mode.image_size))
    out = {"crops": crops, "global": VISION.num_queries(mode.base_size), "separator": 1}
    out["total"] = out["crops"] + out["global"] + out["separator"]
    out["paper"] = out["crops"] + out["global"]
    return out


def tokens_for(layout: Layout, mode: Mode) -> dict[str, int]:
    return {k: int(v) for k, v in image_tokens(mode, layout.w_crop, layout.h_crop).items()}

