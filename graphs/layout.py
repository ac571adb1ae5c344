"""The crop layout and the image-token count: `dynamic_preprocess` mirrored (SPEC sections 2-3).

This is the one implementation: the graph's substitution, the CLI and the verifier's
preprocessing all call it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import sympy as sp

from costgraph import symbols as S
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


def closest_grid(width: int, height: int, tile: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and width * height > 0.5 * tile * tile * i * j:
            best = (i, j)  # ties go to the later grid for large pages; best_diff stays
    return best


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


def layout_for(width: int, height: int, mode: Mode, min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> Layout:
    check_page(width, height, mode)
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got {min_num}, {max_num}")
    if not mode.crop_mode or (width <= NO_CROP_THRESHOLD and height <= NO_CROP_THRESHOLD):
        return Layout(width, height, 1, 1, False)
    i, j = closest_grid(width, height, mode.image_size, candidate_grids(min_num, max_num))
    return Layout(width, height, i, j, True)


def layout_for_grid(w_crop: int, h_crop: int, mode: Mode) -> Layout:
    """A layout given directly as a grid; 1x1 means no crops (the vendor never tiles 1x1)."""
    check_size(w_crop, h_crop)
    if not mode.crop_mode and (w_crop, h_crop) != (1, 1):
        raise ValueError(f"mode {mode.name!r} does not crop; only the 1x1 grid applies")
    tiled = mode.crop_mode and w_crop * h_crop > 1
    return Layout(mode.image_size * w_crop, mode.image_size * h_crop, w_crop, h_crop, tiled)


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
    """Indicator that the crop branch runs: the layout [1, 1] (never chosen when tiling) means no crops."""
    return sp.Piecewise((0, sp.Eq(w * h, 1)), (1, True))


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


def padded_size(width: int, height: int, side: int) -> tuple[int, int]:
    """Size of the page inside a `side` x `side` view padded with aspect kept (Pillow's ImageOps.pad)."""
    if width * side == height * side or width == height:
        return side, side
    if width > height:
        return side, round(height / width * side)
    return round(width / height * side), side


def check_page(width: int, height: int, mode: Mode) -> None:
    """Pages the vendor preprocessing cannot handle are refused up front, with the reason."""
    check_size(width, height)
    if mode.crop_mode or mode.name in ("base", "large"):
        pw, ph = padded_size(width, height, mode.base_size)
        if pw == 0 or ph == 0:
            raise ValueError(f"page {width}x{height} is too elongated: its {mode.base_size}x{mode.base_size} "
                             f"padded view would be {pw}x{ph} pixels")
