"""DeepSeek-OCR 2's graph: the global view (run first), the crop batch (w_crop*h_crop views of 768, none for
a page within 768x768), the image slots (crops, global, separator: no newlines), then the language
model (prefill over the prompt, decode summed over the generated tokens).

Scopes: `vision`, `vision.global`, `vision.crops`, `decoder`, `decoder.prefill`, `decoder.decode`,
`e2e` (= vision + decoder). One symbolic graph per variant set, built once; the mode fixes no symbol
(the view sides are numbers).
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from costgraph.evaluate import substitute
from costgraph.graph import CostGraph, Tensor
from costgraph.graphs.deepseek_ocr.layout import crops_run
from costgraph.graphs.pages import page_size
from . import decoder, vision
from . import symbols as S
from .config import (DEFAULT_DTYPE, DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, DTYPES, LM, MAX_CROPS, MAX_POSITIONS,
                     MODES, VISION, Mode, VisionConfig)
from .layout import Layout, image_tokens, layout_for, tokens_for

SCOPES = ("vision", "vision.global", "vision.crops")
DECODER_SCOPES = ("decoder", "decoder.prefill", "decoder.decode")
E2E = "e2e"
COMPOSITE = {E2E: ("vision", "decoder")}
E2E_PARTS = ("vision", "decoder.prefill", "decoder.decode")
STAGES = ("vision.global", "vision.crops", "decoder.prefill", "decoder.decode")
ROOFLINE_STAGES = ("vision", "decoder.prefill", "decoder.decode")
MODE = MODES["default"]


def image_slots(mode: Mode = MODE) -> sp.Expr:
    return image_tokens(mode)["total"]


def _add_vision(g: CostGraph, mode: Mode = MODE, cfg: VisionConfig = VISION) -> Tensor:
    g.scope("vision", doc="the vision tower for every view, then the image slots")
    out_global = vision.view(g.scope("vision.global", doc="the global view (1024), batch 1, run first"),
                             mode.base_size, cfg)
    run = crops_run()
    crops = g.scope("vision.crops", multiplicity=run,
                    doc="one batch of w_crop*h_crop crop views (768); none for a page within 768x768")
    out_crops = vision.view(crops, mode.image_size, cfg, batch=S.w_crop * S.h_crop, min_batch=2)
    a = g.builder("vision")
    width = cfg.projector_out
    _, qc, _ = out_crops.shape
    local = a.op("assemble.crops_flat", "reshape", out_crops, shape=(run * S.w_crop * S.h_crop * qc, width))
    glob = a.op("assemble.global_flat", "reshape", out_global, shape=(out_global.shape[1], width))
    sep = a.input("assemble.view_separator", (1, width), param=(width,))
    seq = a.op("assemble.sequence", "cat", local, glob, sep, dim=0)
    # forward() concatenates the per-image list again (one image: a copy of the whole sequence)
    return a.op("assemble.batch_cat", "cat", seq, dim=0)


@lru_cache(maxsize=None)
def vision_graph(cfg: VisionConfig = VISION) -> CostGraph:
    g = CostGraph("deepseek-ocr-2.vision", params={"mode": MODE.name})
    _add_vision(g, MODE, cfg)
    return g


@lru_cache(maxsize=None)
def model_graph(variants: decoder.Variants = decoder.DEFAULT, cfg=LM, experts_hit=None,
                vision_cfg: VisionConfig = VISION) -> CostGraph:
    """The whole model; `cfg`, `vision_cfg`: small ones for fast checks against a small reference;
    `experts_hit`: None predicts its bound, the symbol keeps it free (the verifier's)."""
    g = CostGraph("deepseek-ocr-2", params={"mode": MODE.name, **variants.as_dict()})
    image = _add_vision(g, MODE, vision_cfg)
    decoder.build(g, cfg, variants, image=image, slots=image_slots(), experts_hit=experts_hit)
    return g


def scopes_for(mode=None, lm: bool = True) -> tuple[str, ...]:
    return SCOPES + (DECODER_SCOPES + (E2E,) if lm else ())


@lru_cache(maxsize=None)
def formula(scope: str, metric: str, variants: decoder.Variants = decoder.DEFAULT) -> sp.Expr:
    if scope in COMPOSITE:
        return sp.Add(*[formula(s, metric, variants) for s in COMPOSITE[scope]])
    g = vision_graph() if scope in SCOPES else model_graph(variants)
    if scope not in g.scopes:
        raise ValueError(f"unknown scope {scope!r} (choose from {', '.join(scopes_for())})")
    return g.total(scope)[metric]


def layout_values(layout: Layout) -> dict:
    return {S.w_crop: layout.w_crop, S.h_crop: layout.h_crop}


def dtype_values(dtype: str = DEFAULT_DTYPE) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return {S.dtype_bytes: DTYPES[dtype]}


def sequence_values(text_tokens: int = DEFAULT_TEXT_TOKENS, output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> dict:
    for name, v, lo in (("text_tokens", text_tokens, 0), ("output_tokens", output_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            why = " (the prefill yields the first token; for the prompt alone use the scope decoder.prefill)" \
                if name == "output_tokens" else ""
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}{why}")
    return {S.text_tokens: text_tokens, S.output_tokens: output_tokens}


def sequence_record(layout: Layout, text_tokens: int = DEFAULT_TEXT_TOKENS,
                    output_tokens: int = DEFAULT_OUTPUT_TOKENS, mode: Mode = MODE) -> dict:
    sequence_values(text_tokens, output_tokens)
    prompt = 1 + text_tokens + tokens_for(layout, mode)["total"]
    if prompt + output_tokens - 1 > MAX_POSITIONS:
        raise ValueError(f"the prompt ({prompt} tokens) and {output_tokens:,} output tokens need "
                         f"{prompt + output_tokens - 1:,} positions; the language model has {MAX_POSITIONS:,} "
                         f"(at most {MAX_POSITIONS - prompt + 1:,} output tokens for this page)")
    return {"text_tokens": text_tokens, "output_tokens": output_tokens, "prompt_tokens": prompt,
            "decode_forwards": output_tokens - 1, "final_context": prompt + output_tokens - 1}


def layout_record(layout: Layout, mode: Mode = MODE) -> dict:
    tokens = tokens_for(layout, mode)
    return {**layout.as_dict(), "image_tokens": tokens["total"], "paper_tokens": tokens["paper"],
            "valid_tokens": None, "tokens": tokens}


def layout_for_image(path: str, mode: Mode = MODE, max_num: int = MAX_CROPS) -> Layout:
    """A page file's layout: its size as the processor sees it (EXIF orientation applied by the page loader)."""
    return layout_for(*page_size(path), mode, max_num=max_num)


def layout_totals(layout: Layout, scopes, metrics, *, text_tokens=DEFAULT_TEXT_TOKENS,
                  output_tokens=DEFAULT_OUTPUT_TOKENS, variants=decoder.DEFAULT, dtype=DEFAULT_DTYPE) -> dict:
    values = {**layout_values(layout), **sequence_values(text_tokens, output_tokens), **dtype_values(dtype)}
    return {s: {m: substitute(formula(s, m, variants), values) for m in metrics} for s in scopes}
