"""DeepSeek-OCR graphs: the global branch, the crop branch (run w_crop*h_crop times) and
the token assembly, for crop mode (sizes symbolic) and for the native modes.

One symbolic graph per structure, built once and cached; a mode is a substitution.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from costgraph import symbols as S
from costgraph.graph import CostGraph
from . import vision
from costgraph.evaluate import substitute
from .config import MAX_CROPS, VISION, Mode
from .layout import Layout, crops_run, layout_for, layout_for_grid, tokens_for

SCOPES = ("vision", "vision.global", "vision.crops")


@lru_cache(maxsize=None)
def vision_graph(crop_mode: bool = True) -> CostGraph:
    """Crop mode: global view at base_size + crops at image_size. Native: one view at image_size."""
    g = CostGraph("deepseek-ocr.vision", params={"crop_mode": crop_mode})
    g.scope("vision", doc="DeepEncoder: every view, then token assembly")
    side = S.base_size if crop_mode else S.image_size
    out_global = vision.view(g.scope("vision.global", doc="the global view, batch 1"), side)
    out_crop = None
    if crop_mode:
        crops = g.scope("vision.crops", multiplicity=S.w_crop * S.h_crop * crops_run(),
                        doc="one batch of w_crop*h_crop crop views (none for the 1x1 layout)")
        out_crop = vision.view(crops, S.image_size)
    _assemble(g.builder("vision"), out_global, side, out_crop)
    return g


def _assemble(a, out_global, side, out_crop) -> None:
    """Image slots: [crop grid rows + newlines], global grid rows + newlines, separator."""
    width = VISION.projector_out
    newline = a.input("assemble.image_newline", (width,))
    parts = []
    if out_crop is not None:
        (out_crop, nc), run = out_crop, crops_run()
        rows, cols = run * nc * S.h_crop, nc * S.w_crop
        grid = a.op("assemble.crop_stitch", "reshape", out_crop, shape=(rows, cols, width))
        nl = a.op("assemble.crop_newline_expand", "reshape", newline, shape=(rows, 1, width))
        grid = a.op("assemble.crop_newlines", "cat", grid, nl, dim=1)
        parts.append(a.op("assemble.crop_flatten", "flatten", grid, shape=(rows * (cols + 1), width)))
    out_global, nb = out_global
    grid = a.op("assemble.global_grid", "reshape", out_global, shape=(nb, nb, width))
    nl = a.op("assemble.global_newline_expand", "reshape", newline, shape=(nb, 1, width))
    grid = a.op("assemble.global_newlines", "cat", grid, nl, dim=1)
    parts.append(a.op("assemble.global_flatten", "flatten", grid, shape=(nb * (nb + 1), width)))
    parts.append(a.input("assemble.view_seperator", (1, width)))
    a.op("assemble.sequence", "cat", *parts, dim=0)


def mode_values(mode: Mode) -> dict[sp.Symbol, int]:
    """The substitution a mode makes: its sizes and the patch parameters."""
    return {S.base_size: mode.base_size, S.image_size: mode.image_size,
            S.patch_size: VISION.patch_size, S.downsample_ratio: VISION.downsample_ratio}


def layout_values(layout: Layout) -> dict[sp.Symbol, int]:
    return {S.w_crop: layout.w_crop, S.h_crop: layout.h_crop}


def graph_for(mode: Mode) -> CostGraph:
    return vision_graph(mode.crop_mode)


# ---- the model-level API the CLI, verifier and benchmarks use ---------------------------

FORMULA_NOTE = ("FLOPs in torch's convention (2 per multiply-add), matmul-class ops only. "
                "The crop branch runs w_crop*h_crop times; the layout 1x1 (a page within 640x640) "
                "means no crops, hence the Piecewise factor.")


def get_mode(name: str) -> Mode:
    from .config import get_mode as _get

    return _get(name)


def scopes_for(mode: Mode | None) -> tuple[str, ...]:
    if mode is not None and not mode.crop_mode:
        return ("vision", "vision.global")
    return SCOPES


def layout_for_image(path: str, mode: Mode, max_num: int = MAX_CROPS) -> Layout:
    from .pages import open_page

    with open_page(path) as img:
        return layout_for(img.width, img.height, mode, max_num=max_num)


def layout_record(layout: Layout, mode: Mode) -> dict:
    tokens = tokens_for(layout, mode)
    return {**layout.as_dict(), "image_tokens": tokens["total"], "paper_tokens": tokens["paper"], "tokens": tokens}


@lru_cache(maxsize=None)
def formula(mode: Mode | None, scope: str, metric: str) -> sp.Expr:
    """Closed form of `metric` over `scope`: all symbolic without a mode, the mode's sizes substituted with one."""
    g = vision_graph(True if mode is None else mode.crop_mode)
    expr = g.total(scope)[metric]
    return expr.subs(mode_values(mode)) if mode is not None else expr


def layout_totals(mode: Mode, layout: Layout, scopes, metrics) -> dict[str, dict[str, int]]:
    values = layout_values(layout)
    return {s: {m: substitute(formula(mode, s, m), values) for m in metrics} for s in scopes}
