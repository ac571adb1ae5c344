"""DeepSeek-OCR 2's vision tower for a batch of square views of one side: SAM (DeepSeek-OCR's SAM
builder with `transformers`' bookkeeping and the [512, 896] compressor), the Qwen2-style encoder over
the SAM tokens plus learned queries, and the projector (SPEC section 9; `DeepseekOcr2VisionModel`,
`DeepseekOcr2VisionEncoder`, `multi_modal_projector`).

Encoder: the SAM grid flattened to (B, n^2, 896) is joined with the view's learned queries (the
`query_1024_resolution` / `query_768_resolution` table expanded over the batch, not looked up), then 24
pre-norm layers: RMSNorm; q/k/v projections (with bias; 14 query heads, 2 kv heads of 64); RoPE (theta
1e6, tables computed once per forward from positions 0..N-1); keys and values repeated to the 14 heads
(`repeat_kv`: SDPA is given a mask, so transformers does not use SDPA's own GQA); SDPA with the boolean
hybrid mask made additive inside every call (image tokens attend to each other, queries to the image
and to earlier queries); o_proj; residual; RMSNorm; SwiGLU 896 -> 4864 -> 896; residual. A final
RMSNorm; only the query outputs are kept (a view).

Projector Linear(896, 1280): one view (the global one) is a contiguous 2-D problem (`addmm`); a batch of
crops hands `F.linear` a non-contiguous 3-D slice, which torch runs as a copy, a matmul without bias
and an in-place bias add; a training micro-batch's B global views are either (`projector_linear`).
"""
from __future__ import annotations


import sympy as sp

from costgraph.graph import ScopeBuilder, Tensor
from costgraph.ops import more_than_one
from costgraph.graphs.deepseek_ocr import decoder as lm_blocks, vision as sam_builder
from . import ops  # noqa: F401  (registers this model's op kinds)
from . import symbols as S
from .config import VISION, EncoderConfig, VisionConfig


def view(b: ScopeBuilder, side: int, cfg: VisionConfig = VISION, batch=1, min_batch: int = 1) -> Tensor:
    """`batch` views of side `side` -> projected query tokens (batch, queries, projector_out)."""
    pixels = b.input("pixels", (batch, cfg.sam.in_channels, side, side))
    s = sam_builder.sam(b, pixels, cfg.patch_size, cfg.sam_view, min_batch, impl="transformers")
    bsz, ch, n, _ = s.shape
    x = b.op("encoder.sam_tokens", "flatten", s, shape=(bsz, n * n, ch))
    q = cfg.num_queries(side)
    x = encoder(b, x, patches=n * n, queries=q, cfg=cfg.encoder)
    if min_batch > 1:   # a crop batch: F.linear on a non-contiguous 3-D slice
        x = b.op("projector.flatten", "reshape", x, shape=(bsz * q, cfg.encoder.width), copy=True)
        x = b.op("projector", "linear_bias_apart", x, in_features=cfg.encoder.width, out_features=cfg.projector_out)
        bias = b.input("projector.bias", (cfg.projector_out,))   # the Linear's own bias (counted there)
        x = b.op("projector.bias_add", "add", x, bias)
        return b.op("projector.unflatten", "reshape", x, shape=(bsz, q, cfg.projector_out))
    if sp.sympify(batch) != 1:   # a symbolic batch of global views: one view is addmm, more are not
        return b.op("projector", "projector_linear", x, in_features=cfg.encoder.width, out_features=cfg.projector_out,
                    apart=more_than_one(batch))
    return b.op("projector", "linear", x, in_features=cfg.encoder.width, out_features=cfg.projector_out)


def encoder(b: ScopeBuilder, x: Tensor, *, patches, queries: int, cfg: EncoderConfig) -> Tensor:
    bsz, _, width = x.shape
    n = patches + queries
    table = b.input(f"encoder.query_{queries}", (queries, width), param=True)
    table = b.op(f"encoder.query_{queries}.expand", "reshape", table, shape=(bsz, queries, width))
    x = b.op("encoder.cat", "cat", x, table, dim=1, broadcast_inputs=(1,))
    pos = b.op("encoder.position_ids", "arange_ids", tokens=n)
    mask = b.op("encoder.attention_mask", "block_causal_mask", pos, batch=bsz, patches=patches)
    tables = b.op("encoder.rotary_emb", "rope_tables", pos, head_dim=cfg.head_dim, matmul=False,
                  out_itemsize=S.dtype_bytes)
    for i in range(cfg.depth):
        x = layer(b, x, i, cfg, mask=mask, tables=tables)
    x = b.op("encoder.norm", "rms_norm", x, eps=cfg.rms_norm_eps)
    return b.op("encoder.queries_out", "slice", x, shape=(bsz, queries, width))


def layer(b: ScopeBuilder, x: Tensor, i: int, cfg: EncoderConfig, *, mask: Tensor, tables: Tensor) -> Tensor:
    p = f"encoder.layers.{i}"
    h = b.op(f"{p}.input_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    h = self_attn(b, h, f"{p}.self_attn", cfg, mask=mask, tables=tables)
    x = b.op(f"{p}.residual_attn", "add", x, h)
    h = b.op(f"{p}.post_attention_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    h = lm_blocks.swiglu(b, h, f"{p}.mlp", cfg.width, cfg.mlp_dim)
    return b.op(f"{p}.residual_mlp", "add", x, h)


def self_attn(b: ScopeBuilder, h: Tensor, p: str, cfg: EncoderConfig, *, mask: Tensor, tables: Tensor) -> Tensor:
    bsz, n, width = h.shape
    hd = cfg.head_dim
    heads = {"q": cfg.heads, "k": cfg.kv_heads, "v": cfg.kv_heads}
    t = {k: b.op(f"{p}.{k}_proj", "linear", h, in_features=width, out_features=nh * hd) for k, nh in heads.items()}
    t = {k: b.op(f"{p}.{k}_heads", "reshape", v, shape=(bsz, heads[k], n, hd)) for k, v in t.items()}
    q = b.op(f"{p}.rotary_q", "rope_apply", t["q"], tables)
    k = b.op(f"{p}.rotary_k", "rope_apply", t["k"], tables)
    k = b.op(f"{p}.repeat_k", "repeat_kv", k, groups=cfg.groups)
    v = b.op(f"{p}.repeat_v", "repeat_kv", t["v"], groups=cfg.groups)
    m = b.op(f"{p}.mask_to_float", "mask_to_float", mask)
    o = b.op(f"{p}.sdpa", "sdpa", q, k, v, m)
    # the CPU kernel's output is laid out (B, N, heads, hd): transpose(1, 2).contiguous() is a view
    o = b.op(f"{p}.merge_heads", "reshape", o, shape=(bsz, n, cfg.heads * hd))
    return b.op(f"{p}.o_proj", "linear", o, in_features=cfg.heads * hd, out_features=width, bias=False)
