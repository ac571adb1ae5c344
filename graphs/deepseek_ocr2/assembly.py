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
# the sequence and dtype substitutions are DeepSeek-OCR's (the same symbols); re-exported for the app and verifier
from costgraph.graphs.deepseek_ocr.assembly import (dtype_values, layout_values, prompt_record,  # noqa: F401
                                                    sequence_values)
# the scopes and stages are DeepSeek-OCR's (a global view, a crop batch, prefill, decode)
from costgraph.graphs.deepseek_ocr.assembly import (COMPOSITE, DECODER_SCOPES, E2E, E2E_PARTS,  # noqa: F401
                                                    ROOFLINE_STAGES, SCOPES, STAGES)
from costgraph.graphs.deepseek_ocr.layout import crops_run
from costgraph.graphs.pages import page_size
from . import decoder, vision
from . import symbols as S
from .config import (DEFAULT_DTYPE, DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, LM, MAX_CROPS, MAX_POSITIONS,
                     MODES, VISION, Mode, VisionConfig)
from .layout import Layout, image_tokens, layout_for, tokens_for

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


@lru_cache(maxsize=None)
def lm_graph(variants: decoder.Variants = decoder.DEFAULT, cfg=LM, experts_hit=None, batch=1) -> CostGraph:
    """The language model alone with `batch` sequences of one page's prompt per step (serving's batches;
    `costgraph.symbols.batch` keeps B symbolic): the image slots an input of B x slots rows."""
    return decoder.decoder_graph(cfg, variants, slots=image_slots(), experts_hit=experts_hit, batch=batch)


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


def sequence_record(layout: Layout, text_tokens: int = DEFAULT_TEXT_TOKENS,
                    output_tokens: int = DEFAULT_OUTPUT_TOKENS, mode: Mode = MODE) -> dict:
    return prompt_record(tokens_for(layout, mode)["total"], text_tokens, output_tokens, MAX_POSITIONS)


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
