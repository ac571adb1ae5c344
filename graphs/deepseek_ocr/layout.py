"""The crop layout, the image-token count and the valid tokens: `dynamic_preprocess` and the vendor's
`test_compress` bookkeeping mirrored (SPEC sections 2-3).

This is the one implementation: the graph's substitution, the CLI and the verifier's
preprocessing all call it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import sympy as sp

from costgraph.symbols import name_indicator
from . import symbols as S
from .config import MAX_CROPS, MIN_CROPS, NO_CROP_THRESHOLD, VISION, Mode


def candidate_grids(min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    """(i across, j down) with min_num <= i*j <= max_num, in the vendor's order.

    The vendor builds a Python set and sorts it by i*j; the sort is stable, so within an
    equal product the set's iteration order decides. Building the same set the same way
    reproduces that order (int-tuple hashes do not depend on the process).
    """
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grids(widths, heights, tile: int, grids: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The vendor's walk over the candidates, for arrays of page sizes at once.

    Same float arithmetic as the vendor's scalar loop (`W / H` and `i / j` are IEEE
    divisions of exact integers, numpy and Python alike). The tie test
    `W*H > 0.5*tile*tile*i*j` is exact in integers as `2*W*H > tile*tile*i*j`: the vendor's
    right side is an exact float (a small integer times 0.5) and Python compares int with
    float exactly.
    """
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    aspect = w / h
    twice_area = 2 * w * h
    best_diff = np.full(aspect.shape, np.inf)
    best_i = np.ones(aspect.shape, dtype=np.int64)
    best_j = np.ones(aspect.shape, dtype=np.int64)
    for i, j in grids:
        diff = np.abs(aspect - i / j)
        better = diff < best_diff
        # ties go to the later grid for large pages; best_diff stays
        take = better | ((diff == best_diff) & (twice_area > tile * tile * i * j))
        best_i = np.where(take, i, best_i)
        best_j = np.where(take, j, best_j)
        best_diff = np.where(better, diff, best_diff)
    return best_i, best_j


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    w_crop: int
    h_crop: int
    tiled: bool  # False: page within the no-crop threshold (or a native mode): only one view runs

    @property
    def num_crops(self) -> int:
        return self.w_crop * self.h_crop if self.tiled else 0

    def as_dict(self) -> dict:
        return {**asdict(self), "num_crops": self.num_crops}


def check_size(width, height) -> None:
    if not (isinstance(width, int) and isinstance(height, int)) or width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive integers, got {width}x{height}")


class Layouts(NamedTuple):
    """Layouts of many pages as arrays (the vectorised `Layout`)."""
    width: np.ndarray
    height: np.ndarray
    w_crop: np.ndarray
    h_crop: np.ndarray
    tiled: np.ndarray  # bool

    @property
    def num_crops(self) -> np.ndarray:
        return np.where(self.tiled, self.w_crop * self.h_crop, 0)


def layouts_for(widths, heights, mode: Mode, min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> Layouts:
    """`dynamic_preprocess`'s grid choice for arrays of page sizes: the one implementation of the rule."""
    w = np.asarray(widths, dtype=np.int64).ravel()
    h = np.asarray(heights, dtype=np.int64).ravel()
    check_pages(w, h, mode)
    if min_num == MIN_CROPS:
        check_max_num(max_num)
    elif not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got {min_num}, {max_num}")
    w_crop, h_crop, tiled = grid_choice(w, h, mode.crop_mode, mode.image_size, candidate_grids(min_num, max_num))
    return Layouts(w, h, w_crop, h_crop, tiled)


# Kernels: elementwise numpy over arrays of pages, written in the subset `costgraph explore` translates to
# JavaScript (costgraph.app.pyjs), so the page runs this code, not a copy of it.

def grid_choice(w, h, crop_mode, tile, grids):
    """(w_crop, h_crop, tiled) of pages: within the no-crop threshold (or a native mode) a page runs the
    global view only (grid 1x1), else the closest grid."""
    tiled = np.zeros(w.shape, dtype=bool) if not crop_mode else \
        ~((w <= NO_CROP_THRESHOLD) & (h <= NO_CROP_THRESHOLD))
    i, j = closest_grids(w, h, tile, grids)
    return np.where(tiled, i, 1), np.where(tiled, j, 1), tiled


def layout_for(width: int, height: int, mode: Mode, min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> Layout:
    check_size(width, height)
    lay = layouts_for([width], [height], mode, min_num, max_num)
    return Layout(width, height, int(lay.w_crop[0]), int(lay.h_crop[0]), bool(lay.tiled[0]))


def layout_for_grid(w_crop: int, h_crop: int, mode: Mode) -> Layout:
    """A layout given directly as a grid; 1x1 means no crops (the vendor never tiles 1x1)."""
    check_size(w_crop, h_crop)
    if not mode.crop_mode and (w_crop, h_crop) != (1, 1):
        raise ValueError(f"mode {mode.name!r} does not crop; only the 1x1 grid applies")
    tiled = mode.crop_mode and w_crop * h_crop > 1
    return Layout(mode.image_size * w_crop, mode.image_size * h_crop, w_crop, h_crop, tiled)


def check_grid(grid, mode: Mode, max_num: int = MAX_CROPS, what_if: bool = False) -> str | None:
    """A grid given directly must be one the layout rule can produce under `max_num` (1x1: no crops);
    any other is refused, or with `what_if` accepted and labelled (the returned note)."""
    check_max_num(max_num)
    grid = tuple(grid)
    if not mode.crop_mode or grid == (1, 1) or grid in candidate_grids(MIN_CROPS, max_num):
        return None
    why = (f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} crops: the layout never produces more than --max-num "
           f"{max_num}" if grid[0] * grid[1] > max_num else f"{grid[0]}x{grid[1]} is not a grid the layout produces")
    if not what_if:
        raise ValueError(f"grid {why}; pass --what-if to cost it anyway (labelled as a what-if)")
    return f"what-if: {why}"


MAX_NUM_LIMIT = 64   # the most crops --max-num allows


def check_max_num(max_num) -> None:
    if isinstance(max_num, bool) or not isinstance(max_num, int) or not MIN_CROPS <= max_num <= MAX_NUM_LIMIT:
        raise ValueError(f"--max-num must be an integer from {MIN_CROPS} (the vendor's min_num) to {MAX_NUM_LIMIT}, "
                         f"got {max_num}")


def all_grids(min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    """Every grid the layout can produce: the no-crop 1x1 then the candidates."""
    return [(1, 1)] + candidate_grids(min_num, max_num)


# ---- tokens (SPEC section 3) --------------------------------------------------------

def num_queries(side, patch=S.patch_size, ratio=S.downsample_ratio):
    """nq(S) = ceil((S // patch) / ratio): the token grid side of one view."""
    if all(isinstance(x, int) for x in (side, patch, ratio)):
        return math.ceil((side // patch) / ratio)
    return sp.ceiling(sp.floor(sp.sympify(side) / patch) / ratio)


def crops_run(w=S.w_crop, h=S.h_crop):
    """Indicator that the crop branch runs: the layout [1, 1] (never chosen when tiling) means no crops.
    Named for closed forms: one factor [w h > 1] (an Iverson bracket: 1 when true, else 0) of the crop terms."""
    return name_indicator(sp.Piecewise((0, sp.Eq(w * h, 1)), (1, True)), "crops_run",
                          r"[w_{\mathrm{crop}} h_{\mathrm{crop}} > 1]")


def image_tokens(mode: Mode | None = None, w=S.w_crop, h=S.h_crop) -> dict:
    """Token slots per part, the paper's newline-free counts, and the total.

    With mode None the sizes and patch parameters stay symbolic (crop mode); with a mode
    they are the mode's. Concrete w, h give integers.
    """
    if mode is None:
        patch, ratio, crop_mode, base, tile = S.patch_size, S.downsample_ratio, True, S.base_size, S.image_size
    else:
        patch, ratio, crop_mode = VISION.patch_size, VISION.downsample_ratio, mode.crop_mode
        base = mode.base_size if crop_mode else mode.image_size
        tile = mode.image_size
    nb = num_queries(base, patch, ratio)
    out = {"global": nb * (nb + 1), "separator": 1, "global_features": nb * nb}  # a newline per grid row
    if crop_mode:
        nc = num_queries(tile, patch, ratio)
        run = crops_run(w, h)
        out["crops"] = sp.sympify(run * (nc * w + 1) * (nc * h))
        out["crop_features"] = sp.sympify(run * w * h * nc * nc)
    else:
        out["crops"] = out["crop_features"] = 0
    out["total"] = out["global"] + out["separator"] + out["crops"]
    out["paper"] = out["global_features"] + out["crop_features"]
    return out


def tokens_for(layout: Layout, mode: Mode) -> dict[str, int]:
    return {k: int(v) for k, v in image_tokens(mode, layout.w_crop, layout.h_crop).items()}


def padded_sizes(widths, heights, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Size of each page inside a `side` x `side` view padded with aspect kept (Pillow's ImageOps.pad).

    `np.rint` rounds half to even like Python's `round`, on the same float products.
    """
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    square = w == h
    pw = np.where(square | (w > h), side, np.rint(w / h * side).astype(np.int64))
    ph = np.where(square | (w < h), side, np.rint(h / w * side).astype(np.int64))
    return pw, ph


def padded_size(width: int, height: int, side: int) -> tuple[int, int]:
    pw, ph = padded_sizes([width], [height], side)
    return int(pw[0]), int(ph[0])


def check_pages(widths, heights, mode: Mode) -> None:
    """Pages the vendor preprocessing cannot handle are refused up front, with the reason."""
    refuse_pages(widths, heights, (lambda w, h: padded_sizes(w, h, mode.base_size)) if pads(mode) else None,
                 f"{mode.base_size}x{mode.base_size} padded view")


def refuse_pages(widths, heights, view_sizes, view: str) -> None:
    """Refuses sizes that are not positive, then pages whose `view` (its sizes: `view_sizes(w, h)`, None for
    none) has a side of 0 pixels."""
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    bad = (w <= 0) | (h <= 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"image size must be positive integers, got {w[k]}x{h[k]}")
    if view_sizes is None:
        return
    vw, vh = view_sizes(w, h)
    bad = (vw == 0) | (vh == 0)
    if bad.any():
        k, n = int(np.argmax(bad)), int(bad.sum())
        more = f" ({n - 1} more such pages)" if n > 1 else ""
        raise ValueError(f"page {w[k]}x{h[k]} is too elongated: its {view} would be {vw[k]}x{vh[k]} pixels{more}")


def check_page(width: int, height: int, mode: Mode) -> None:
    check_size(width, height)
    check_pages([width], [height], mode)


# ---- valid tokens and the compression ratio (SPEC section 3) -------------------------------
#
# The vendor's `infer(..., test_compress=True)` bookkeeping. A padded global view counts its
# feature tokens times the page's share of the padded square, r = 1 - (max - min) / max of the
# ORIGINAL page, truncated by `int()`; a stretched native view (tiny, small) counts them all;
# crop mode then adds 100 per crop, but only when image_size == 640 (a hard-coded tile, so the
# Gundam-M variant's 1024 crops add nothing). P is the number of crops that actually run: the
# vendor adds `len(images_crop_list) * 100` and that list is empty for a page within 640x640
# (grid reported [1, 1], no crop runs), so such a page counts the global view only.
# The paper's Equation 1 writes ceil where the code truncates: reported beside it, by name.

VALID_TOKENS = "valid_tokens"                  # the vendor's printout: int(features * r)
VALID_TOKENS_PAPER_CEIL = "valid_tokens_paper_ceil"  # the paper's Equation 1: ceil(features * r)
# base_size -> feature tokens scaled by r (the padded views: base, large, and crop mode's global view)
VALID_SCALED_FEATURES = {1024: 256, 1280: 400}
# base_size -> tokens counted whole (native modes whose view is the image stretched, no padding)
VALID_NATIVE_CONSTANT = {640: 100, 512: 64}
VALID_PER_CROP = 100                           # per crop run, only when image_size == VALID_CROP_TILE
VALID_CROP_TILE = 640


class ValidTokens(NamedTuple):
    """Valid-token counts of many pages (int64 arrays)."""
    vendor: np.ndarray        # int(): truncation, what the vendor prints
    paper_ceil: np.ndarray    # ceil(): the paper's Equation 1


def unpadded_share(widths, heights) -> np.ndarray:
    """r = 1 - (max(W,H) - min(W,H)) / max(W,H), as the vendor's Python float expression computes it.

    The same IEEE operations: an exact integer difference, one division of two integers (numpy
    converts both to float64 first, exact below 2^53, so the quotient is Python's correctly rounded
    int / int), then 1.0 minus it. Not simplified to min/max: that rounds differently on some pages.
    """
    w = np.asarray(widths, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    big, small = np.maximum(w, h), np.minimum(w, h)
    return 1.0 - (big - small) / big


def valid_rule(mode: Mode) -> tuple[int, int, int]:
    """The vendor's valid-token case for a mode: (features scaled by r, or 0; a constant count, or 0;
    tokens per crop run). A base_size the rule does not name (no released mode has one) is refused
    rather than counted 0."""
    per_crop = VALID_PER_CROP if mode.crop_mode and mode.image_size == VALID_CROP_TILE else 0
    if mode.base_size in VALID_SCALED_FEATURES:
        return VALID_SCALED_FEATURES[mode.base_size], 0, per_crop
    if not mode.crop_mode and mode.base_size in VALID_NATIVE_CONSTANT:
        return 0, VALID_NATIVE_CONSTANT[mode.base_size], per_crop
    known = sorted(VALID_SCALED_FEATURES) if mode.crop_mode else sorted({**VALID_SCALED_FEATURES,
                                                                         **VALID_NATIVE_CONSTANT})
    raise ValueError(f"the vendor's valid-token rule has no case for mode {mode.name!r} with base_size "
                     f"{mode.base_size} (it names {', '.join(map(str, known))})")


def valid_counts(w, h, crops, scaled, constant, per_crop):
    """(vendor, paper_ceil) valid tokens of pages under one mode's case (`valid_rule`): `scaled` features
    times r (int(): toward zero, as the vendor prints; ceil: the paper's Equation 1), else `constant`;
    plus `per_crop` per crop run."""
    features = scaled * unpadded_share(w, h)  # int * float, as in Python
    vendor = np.where(scaled > 0, np.trunc(features), constant).astype(np.int64) + per_crop * crops
    paper = np.where(scaled > 0, np.ceil(features), constant).astype(np.int64) + per_crop * crops
    return vendor, paper


def valid_tokens_for(widths, heights, num_crops, mode: Mode) -> ValidTokens:
    """The vendor's valid-token rule for arrays of original page sizes and the crops each runs.

    `num_crops`: crops actually run (0 for a page within 640x640 in crop mode, and in native modes)."""
    w = np.asarray(widths, dtype=np.int64).ravel()
    h = np.asarray(heights, dtype=np.int64).ravel()
    crops = np.broadcast_to(np.asarray(num_crops, dtype=np.int64).ravel(), w.shape)
    check_pages(w, h, mode)
    return ValidTokens(*valid_counts(w, h, crops, *valid_rule(mode)))


def valid_tokens(layout: Layout, mode: Mode) -> dict[str, int]:
    """Both valid-token counts of one page (the vectorised rule on one element)."""
    v = valid_tokens_for([layout.width], [layout.height], [layout.num_crops], mode)
    return {VALID_TOKENS: int(v.vendor[0]), VALID_TOKENS_PAPER_CEIL: int(v.paper_ceil[0])}


def check_output_text_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"output_text_tokens must be an integer >= 0, got {n!r}")
    return int(n)


def compression_ratios(output_text_tokens: int, valid) -> np.ndarray:
    """output text tokens / valid tokens per page (float64; NaN where a page has no valid tokens).

    int64 / int64 in numpy divides the float64 conversions: Python's int / int below 2^53.
    """
    n = check_output_text_tokens(output_text_tokens)
    valid = np.asarray(valid, dtype=np.int64)
    return np.where(valid > 0, n / np.maximum(valid, 1), np.nan)


def compression_ratio(output_text_tokens: int, valid: int) -> float | None:
    """The vendor's compression ratio of one page; None when it has no valid tokens (a sliver in base/large)."""
    r = float(compression_ratios(output_text_tokens, [valid])[0])
    return None if math.isnan(r) else r


# ---- one page as the explorer page computes it (costgraph explore) ---------------------------

def page_point(width, height, m, grids):
    """The layout kernels composed as `layouts_for`, `padded_sizes` and `valid_tokens_for` compose them, for
    one mode's data `m` (`page_data`) and the candidate grids under max_num: what the page shows of a page."""
    pw, ph = padded_sizes(width, height, m["base_size"])
    w_crop, h_crop, tiled = grid_choice(width, height, m["crop_mode"], m["image_size"], grids)
    crops = np.where(tiled, w_crop * h_crop, 0)
    vendor, paper = valid_counts(width, height, crops, m["valid_scaled"], m["valid_constant"], m["valid_per_crop"])
    return {"w_crop": w_crop, "h_crop": h_crop, "tiled": tiled, "num_crops": crops, VALID_TOKENS: vendor,
            VALID_TOKENS_PAPER_CEIL: paper, "padded_width": pw, "padded_height": ph,
            "too_elongated": m["pads"] & ((pw == 0) | (ph == 0))}


def page_data(mode: Mode) -> dict:
    """What `page_point` reads of a mode (plain values)."""
    scaled, constant, per_crop = valid_rule(mode)
    return {"base_size": mode.base_size, "image_size": mode.image_size,
            "crop_mode": mode.crop_mode, "pads": pads(mode), "valid_scaled": scaled, "valid_constant": constant,
            "valid_per_crop": per_crop}


def pads(mode: Mode) -> bool:
    """The mode's global view is the page padded to a square (aspect kept); else stretched (tiny, small)."""
    return mode.crop_mode or mode.name in ("base", "large")
