"""DeepSeek-OCR graphs: the global branch, the crop branch (run w_crop*h_crop times) and
the token assembly, for crop mode (sizes symbolic) and for the native modes; then the
language model (prefill over the prompt, decode summed over the generated tokens).

One symbolic graph per structure, built once and cached; a mode is a substitution.
Scopes: `vision`, `vision.global`, `vision.crops`, `decoder`, `decoder.prefill`,
`decoder.decode`, and `e2e` (= vision + decoder: reading a page end to end).
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from . import symbols as S
from costgraph.evaluate import substitute
from costgraph.graph import CostGraph, Tensor
from costgraph.ops import more_than_one
from costgraph.graphs.pages import page_size
from . import decoder, vision
from .config import (DEFAULT_DTYPE, DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, DTYPES, LM, MAX_CROPS, MAX_POSITIONS, VISION,
                     LMConfig, Mode, VisionConfig)
from .decoder import VENDOR, Variants
from .layout import (VALID_TOKENS, Layout, compression_ratio, crops_run, layout_for, tokens_for,
                     valid_tokens)

SCOPES = ("vision", "vision.global", "vision.crops")
DECODER_SCOPES = ("decoder", "decoder.prefill", "decoder.decode")
E2E = "e2e"
# Scopes that are sums of graph scopes rather than subgraphs of their own.
COMPOSITE = {E2E: ("vision", "decoder")}
# What a report of `e2e` breaks it into.
E2E_PARTS = ("vision", "decoder.prefill", "decoder.decode")
# Stages: scopes that run as one step (a liveness pass each); the roofline's rows.
STAGES = ("vision.global", "vision.crops", "decoder.prefill", "decoder.decode")
ROOFLINE_STAGES = ("vision", "decoder.prefill", "decoder.decode")


@lru_cache(maxsize=None)
def vision_graph(crop_mode: bool = True, cfg: VisionConfig = VISION) -> CostGraph:
    """Crop mode: global view at base_size + crops at image_size. Native: one view at image_size.
    `cfg`: the vision widths and depths (a small one for fast checks against a small reference)."""
    g = CostGraph("deepseek-ocr.vision", params={"crop_mode": crop_mode})
    _add_vision(g, crop_mode, cfg)
    return g


@lru_cache(maxsize=None)
def model_graph(crop_mode: bool = True, variants: Variants = VENDOR, cfg: LMConfig = LM) -> CostGraph:
    """The whole model in one graph: vision, then the language model fed with its image slots."""
    g = CostGraph("deepseek-ocr", params={"crop_mode": crop_mode, **variants.as_dict()})
    image = _add_vision(g, crop_mode)
    decoder.build(g, cfg, variants, crop_mode=crop_mode, image=image)
    return g


def _add_vision(g: CostGraph, crop_mode: bool, cfg: VisionConfig = VISION, pages=1) -> Tensor:
    """The vision scopes; returns the image slots (the assembled sequence). `pages`: how many pages
    run through it one after another (a training micro-batch: the vendor loops over its pages)."""
    g.scope("vision", multiplicity=pages, doc="DeepEncoder: every view, then token assembly"
            + (" (per page, for each page of the batch)" if pages != 1 else ""))
    side = S.base_size if crop_mode else S.image_size
    out_global = vision.view(g.scope("vision.global", doc="the global view, batch 1"), side, cfg=cfg)
    out_crop = None
    if crop_mode:
        # One batch of w_crop*h_crop views (weights and tables read once per batch, as the vendor
        # runs it); the scope runs once, or not at all for the 1x1 layout.
        crops = g.scope("vision.crops", multiplicity=crops_run(),
                        doc="one batch of w_crop*h_crop crop views (none for the 1x1 layout)")
        out_crop = vision.view(crops, S.image_size, batch=S.w_crop * S.h_crop, cfg=cfg, min_batch=2)
    return _assemble(g.builder("vision"), out_global, side, out_crop, cfg.projector_out)


def stitch_copies(w=S.w_crop) -> sp.Expr:
    """Indicator that stitching the crop batch into one grid copies it: a permute and reshape that
    stays a view for a single column of tiles (w_crop == 1). The one layout-dependent case in the
    vision bytes that is not `crops_run`: a closed form polynomial in the layout needs w_crop >= 2."""
    return more_than_one(w)


def _assemble(a, out_global, side, out_crop, width: int = VISION.projector_out) -> Tensor:
    """Image slots: [crop grid rows + newlines], global grid rows + newlines, separator.

    Crops: the batch (P, n*n, d) is stitched row-major into one (n*h_crop, n*w_crop, d) grid, a
    copy unless w_crop == 1 (a single column stays a view); a newline after every stitched row
    (`cat` with the newline expanded: its footprint is one vector). All of it only when the crops
    run (`crops_run`: the row count carries it, so the slot count is exact).
    """
    newline = a.input("assemble.image_newline", (width,), param=True)
    parts = []
    if out_crop is not None:
        (out_crop, nc), run = out_crop, crops_run()
        rows, cols = run * nc * S.h_crop, nc * S.w_crop
        grid = a.op("assemble.crop_stitch", "reshape", out_crop, shape=(rows, cols, width), copy=stitch_copies())
        nl = a.op("assemble.crop_newline_expand", "reshape", newline, shape=(rows, 1, width))
        grid = a.op("assemble.crop_newlines", "cat", grid, nl, dim=1, broadcast_inputs=(1,), when=run)
        parts.append(a.op("assemble.crop_flatten", "flatten", grid, shape=(rows * (cols + 1), width)))
    out_global, nb = out_global
    grid = a.op("assemble.global_grid", "reshape", out_global, shape=(nb, nb, width))
    nl = a.op("assemble.global_newline_expand", "reshape", newline, shape=(nb, 1, width))
    grid = a.op("assemble.global_newlines", "cat", grid, nl, dim=1, broadcast_inputs=(1,))
    parts.append(a.op("assemble.global_flatten", "flatten", grid, shape=(nb * (nb + 1), width)))
    parts.append(a.input("assemble.view_seperator", (1, width), param=(width,)))
    return a.op("assemble.sequence", "cat", *parts, dim=0)


def mode_values(mode: Mode) -> dict[sp.Symbol, int]:
    """The substitution a mode makes: its sizes and the patch parameters."""
    return {S.base_size: mode.base_size, S.image_size: mode.image_size,
            S.patch_size: VISION.patch_size, S.downsample_ratio: VISION.downsample_ratio}


def dtype_values(dtype: str = DEFAULT_DTYPE) -> dict[sp.Symbol, int]:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return {S.dtype_bytes: DTYPES[dtype]}


def layout_values(layout: Layout) -> dict[sp.Symbol, int]:
    return {S.w_crop: layout.w_crop, S.h_crop: layout.h_crop}


def sequence_values(text_tokens: int = DEFAULT_TEXT_TOKENS, output_tokens: int = DEFAULT_OUTPUT_TOKENS
                    ) -> dict[sp.Symbol, int]:
    """The substitution for the language model's sequence symbols, checked.

    output_tokens >= 1: the prefill itself yields the first token, so a generation has at least
    one; the prompt alone is the scope `decoder.prefill`. text_tokens >= 0.
    """
    for name, v, lo in (("text_tokens", text_tokens, 0), ("output_tokens", output_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            why = " (the prefill yields the first token; for the prompt alone use the scope decoder.prefill)" \
                if name == "output_tokens" else ""
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}{why}")
    return {S.text_tokens: text_tokens, S.output_tokens: output_tokens}


def graph_for(mode: Mode, variants: Variants = VENDOR) -> CostGraph:
    return model_graph(mode.crop_mode, variants)


# ---- the model-level API the CLI, verifier and benchmarks use ---------------------------

def scopes_for(mode: Mode | None, lm: bool = True) -> tuple[str, ...]:
    """The scopes of a mode: vision's, then (with `lm`) the language model's and `e2e`."""
    vision_scopes = ("vision", "vision.global") if mode is not None and not mode.crop_mode else SCOPES
    return vision_scopes + (DECODER_SCOPES + (E2E,) if lm else ())


def layout_for_image(path: str, mode: Mode, max_num: int = MAX_CROPS) -> Layout:
    """The layout of a page file: its size as the vendor sees it (EXIF orientation applied)."""
    return layout_for(*page_size(path), mode, max_num=max_num)


COMPRESSION_BASIS = f"output_text_tokens / {VALID_TOKENS} (the vendor's int rule)"


def layout_record(layout: Layout, mode: Mode, output_text_tokens: int | None = None) -> dict:
    """The layout, its token slots, the paper's count and the valid tokens (SPEC section 3).

    `output_text_tokens` (the page's OCR text in tokens): adds the vendor's compression ratio,
    output text tokens / valid tokens (None when the page has no valid tokens).
    """
    tokens = tokens_for(layout, mode)
    rec = {**layout.as_dict(), "image_tokens": tokens["total"], "paper_tokens": tokens["paper"],
           **valid_tokens(layout, mode), "tokens": tokens}
    if output_text_tokens is not None:
        rec.update(output_text_tokens=output_text_tokens,
                   compression_ratio=compression_ratio(output_text_tokens, rec[VALID_TOKENS]),
                   compression_ratio_basis=COMPRESSION_BASIS)
    return rec


@lru_cache(maxsize=None)
def formula(mode: Mode | None, scope: str, metric: str, variants: Variants = VENDOR) -> sp.Expr:
    """Closed form of `metric` over `scope`: all symbolic without a mode, the mode's sizes substituted with one.

    Language-model scopes keep text_tokens (and, for decode, output_tokens) symbolic; `variants`
    chooses the attention implementation, the lm_head positions and the RoPE table computation.
    """
    if scope in COMPOSITE:  # left unexpanded: a closed form expands it after its assumptions simplify it
        return sp.Add(*[formula(mode, s, metric, variants) for s in COMPOSITE[scope]])
    crop_mode = True if mode is None else mode.crop_mode
    g = vision_graph(crop_mode) if scope in SCOPES else model_graph(crop_mode, variants)
    if scope not in g.scopes:
        raise ValueError(f"unknown scope {scope!r} (choose from {', '.join(scopes_for(mode))})")
    expr = g.total(scope)[metric]
    return expr.subs(mode_values(mode)) if mode is not None else expr


def layout_totals(mode: Mode, layout: Layout, scopes, metrics, *, text_tokens: int = DEFAULT_TEXT_TOKENS,
                  output_tokens: int = DEFAULT_OUTPUT_TOKENS, variants: Variants = VENDOR,
                  dtype: str = DEFAULT_DTYPE) -> dict[str, dict[str, int]]:
    values = {**layout_values(layout), **sequence_values(text_tokens, output_tokens), **dtype_values(dtype)}
    return {s: {m: substitute(formula(mode, s, m, variants), values) for m in metrics} for s in scopes}


def sequence_record(mode: Mode, layout: Layout, text_tokens: int = DEFAULT_TEXT_TOKENS,
                    output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> dict:
    """What the language model runs for a page: prompt length and generated tokens."""
    return prompt_record(tokens_for(layout, mode)["total"], text_tokens, output_tokens)


def prompt_record(image_tokens: int, text_tokens: int, output_tokens: int, max_positions: int = MAX_POSITIONS
                  ) -> dict:
    """A prompt of 1 BOS + `image_tokens` + `text_tokens` and `output_tokens` generated, refused past the
    language model's `max_positions`."""
    sequence_values(text_tokens, output_tokens)
    prompt = 1 + text_tokens + image_tokens
    if prompt > max_positions:
        raise ValueError(f"the sequence (1 BOS + {image_tokens} image + {text_tokens:,} text = {prompt:,} tokens) "
                         f"exceeds the language model's {max_positions:,} positions (at most "
                         f"{max(max_positions - 1 - image_tokens, 0):,} text tokens for this page)")
    if prompt + output_tokens - 1 > max_positions:
        raise ValueError(f"the prompt ({prompt} tokens) and {output_tokens:,} output tokens need "
                         f"{prompt + output_tokens - 1:,} positions; the language model has {max_positions:,} "
                         f"(at most {max_positions - prompt + 1:,} output tokens for this page)")
    return {"text_tokens": text_tokens, "output_tokens": output_tokens, "prompt_tokens": prompt,
            "decode_forwards": output_tokens - 1, "final_context": prompt + output_tokens - 1}
