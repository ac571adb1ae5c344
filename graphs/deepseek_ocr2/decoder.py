"""DeepSeek-OCR 2's language model: DeepSeek-OCR's DeepSeek-V2 blocks (`costgraph.graphs.deepseek_ocr.decoder`:
the same attention, dense and MoE layers, 2 shared experts fused into one 1792-wide SwiGLU, fp32 router,
eager experts loop) parameterised, not copied. The release's sizes are DeepSeek-OCR's (`config.LM`).

What differs from DeepSeek-OCR's modelled vendor path, because the ground truth is `transformers`'
`DeepseekOcr2ForConditionalGeneration`:
- RoPE: cos/sin computed once per forward (`rope="once"`), not recomputed in every layer;
- the prompt's image slots: 256 + 144 x crops + 1 (no newlines);
- the image features are merged by `DeepseekOcr2Model.forward`: the placeholder mask
  (`input_ids == image_token_id`), the token-count check and an out-of-place `masked_scatter`
  (`placeholder_scatter`), where the vendor's code runs an in-place `masked_scatter_`;
- lm_head: `generate()` passes `logits_to_keep=1` (the last position, `lm_head="last"`, the default);
  a plain forward computes every position (`lm_head="all"`).
Attention: eager (full L x L scores) is what the CPU reference runs and the default; `transformers`'
default implementation is SDPA (no separate variant here: `flash` counts the causal half, `eager` the
full square that torch's FLOP counter also reports for SDPA).
"""
from __future__ import annotations

import sympy as sp

from dataclasses import dataclass
from typing import ClassVar

from costgraph.graph import CostGraph, Tensor
from costgraph.graphs.deepseek_ocr import decoder as blocks
from costgraph.graphs.deepseek_ocr.decoder import ATTENTION, LM_HEAD  # noqa: F401
from . import ops  # noqa: F401  (registers placeholder_scatter)
from .config import LM
from costgraph.graphs.deepseek_ocr.config import LMConfig

# What trains (`costgraph.graphs.deepseek_ocr2.training`): the language model (vision frozen), everything,
# SAM frozen, LoRA adapters on the language model.
TRAIN = ("lm", "full", "lm+encoder+projector", "lora")


@dataclass(frozen=True)
class Variants(blocks.Variants):
    """DeepSeek-OCR's variants (the same fields and checks), with this model's training settings."""
    train_settings: ClassVar[tuple[str, ...]] = TRAIN


DEFAULT = Variants(attention="eager", lm_head="last", rope="once")


def variants(**options) -> Variants:
    """Inference defaults: eager attention, the last position's logits (generate); a training step
    computes every position's. Training fields apply to `phase="train"` only (LoRA's to `train="lora"`)."""
    if "rope" in options and options["rope"] != "once":
        raise ValueError("DeepSeek-OCR 2's transformers code computes the RoPE tables once per forward: no rope variant")
    options.pop("rope", None)
    blocks.check_training_options(options)
    lm_head = "all" if options.get("phase", "inference") == "train" else DEFAULT.lm_head
    return Variants(**{"attention": DEFAULT.attention, "lm_head": lm_head, **options}, rope="once")


def build(g: CostGraph, cfg: LMConfig = LM, v: Variants = DEFAULT, *, image: Tensor | None, slots: sp.Expr,
          experts_hit=None, batch=1) -> None:
    """`batch`: B sequences of the same prompt per step (`costgraph.symbols.batch` keeps it symbolic): the
    weights read once per step, a KV cache each, B x slots image features merged in one scatter."""
    blocks.build(g, cfg, v, image=image, slots=slots, scatter="placeholder_scatter", experts_hit=experts_hit,
                 batch=batch)


def decoder_graph(cfg: LMConfig = LM, variants: Variants = DEFAULT, *, slots: sp.Expr, experts_hit=None,
                  batch=1) -> CostGraph:
    """The language model alone, its image features an input of B x `slots` rows (`assembly.lm_graph` gives the
    release's slots); B = 1 is the per-page model graph's `decoder` part exactly (tests/test_serving_ocr2.py)."""
    g = CostGraph("deepseek-ocr-2.decoder", params={**variants.as_dict(), **({"batch": batch} if batch != 1 else {})})
    build(g, cfg, variants, image=None, slots=slots, experts_hit=experts_hit, batch=batch)
    return g


def kv_cache_bytes_per_token(cfg: LMConfig = LM) -> sp.Expr:
    return blocks.kv_cache_bytes_per_token(cfg)


def kv_cache_bytes(context, cfg: LMConfig = LM) -> sp.Expr:
    return blocks.kv_cache_bytes(cfg, context)


def experts_hit_bound(cfg: LMConfig, tokens) -> sp.Expr:
    return blocks.experts_hit_bound(cfg, tokens)
