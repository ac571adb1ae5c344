"""The language model: one prefill over the prompt, then one decode forward per generated token
(SPEC section 5).

Nodes are named by the vendor's module paths (`layers.3.self_attn.q_proj`, `layers.3.mlp.experts`,
`layers.3.mlp.shared_experts.gate_proj`, `lm_head`), inside the scopes `decoder.prefill` and
`decoder.decode`. The decode scope is one forward at step `t` (context `L + t`) summed over
t = 1..output_tokens-1 in closed form: the prefill yields the first token.

Shape-only ops (norms, activations, residual adds, RoPE application, cache writes, routing) are
zero-FLOP nodes: they carry the other metrics later. The graph is parametric in `LMConfig`, so a
small configuration can be checked against a small reference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import sympy as sp

from costgraph import ops
from costgraph import symbols as S
from costgraph.cost import Cost
from costgraph.graph import CostGraph, ScopeBuilder, Tensor
from costgraph.ops import register
from .config import LM, LMConfig, Mode
from .layout import image_tokens

# Attention implementation -> which score pairs are computed (costgraph.ops.sdpa's `causal`).
ATTENTION = {
    "eager": "full",      # vendor HF default: full L x L scores and probabilities, causal mask added
    "flash": "flash",     # flash_attention_2: only the unmasked (causal) half
    "uncounted": "none",  # what a profiler blind to the attention kernel reports
}
LM_HEAD = ("all", "last")     # vendor HF prefill: every prompt position; vLLM: the last one only
ROPE = ("vendor", "once")     # vendor: cos/sin per layer via inv_freq @ positions; transformers 5.x: once, elementwise


@dataclass(frozen=True)
class Variants:
    """How the language model is run. Defaults follow the vendor HF path."""
    attention: str = "eager"
    lm_head: str = "all"
    rope: str = "vendor"

    def __post_init__(self):
        for name, allowed in (("attention", ATTENTION), ("lm_head", LM_HEAD), ("rope", ROPE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} variant {getattr(self, name)!r} (choose from {', '.join(allowed)})")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


VENDOR = Variants()


# ---- op kinds of the language model (all shape-only except the attention pair) -------------

@register("embedding")
def embedding(ids, *, num_embeddings, embedding_dim):
    return (*ids, embedding_dim), Cost()


@register("outer")
def outer(a, b):
    # positions x inv_freq as a broadcast multiply (transformers 5.x): elementwise, no matmul FLOPs
    return (*a, *b), Cost()


@register("topk", "argmax", "gather", "index_add", "masked_scatter", "cos_sin")
def shape_given(*inputs, shape, **attrs):
    return tuple(shape), Cost()


@register("attention_scores")
def attention_scores(q, k, *, causal):
    """q k^T per head: the score half of `ops.sdpa` (same causal rule)."""
    *batch, lq, _ = q
    _, cost = ops.sdpa(q, k, (*k[:-1], 0), causal=causal)
    return (*batch, lq, k[-2]), cost


@register("attention_values")
def attention_values(probs, v, *, causal):
    """probabilities x values per head: the other half of `ops.sdpa`."""
    *batch, lq, lk = probs
    _, cost = ops.sdpa((*batch, lq, 0), v, v, causal=causal)
    return (*batch, lq, v[-1]), cost


# ---- sequence lengths ------------------------------------------------------------------------

def image_slots(crop_mode: bool = True) -> sp.Expr:
    """Image slots in the prompt, from the one token-count implementation (graphs.layout).

    Crop mode keeps every size symbolic; a native mode's one view has side `image_size` (its
    patch size and downsampling are the vision config's numbers: `image_tokens` takes them from
    a mode).
    """
    return image_tokens(None if crop_mode else Mode("native", S.image_size, S.image_size, False))["total"]


def prompt_length(crop_mode: bool = True) -> sp.Expr:
    """L = [BOS] + image slots + text tokens."""
    return 1 + S.text_tokens + image_slots(crop_mode)


def decode_context(prompt) -> sp.Expr:
    """Attended length of decode forward t: the prompt plus t tokens (the t-th one is new)."""
    return prompt + S.decode_step


# ---- the graph -------------------------------------------------------------------------------

def build(g: CostGraph, cfg: LMConfig = LM, variants: Variants = VENDOR, *, crop_mode: bool = True,
          image: Tensor | None = None) -> None:
    """Add `decoder`, `decoder.prefill` and `decoder.decode` to `g`; `image` is the vision output."""
    prompt = prompt_length(crop_mode)
    g.scope("decoder", doc="the language model: prefill + every decode forward")
    pre = g.scope("decoder.prefill", doc="one forward over the L prompt tokens; yields the first output token")
    forward(pre, cfg, variants, tokens=prompt, past=0, image=image, slots=image_slots(crop_mode))
    dec = g.scope("decoder.decode", sum_over=(S.decode_step, 1, S.output_tokens - 1),
                  doc="decode forward t (one new token, context L + t), summed over t = 1..output_tokens-1")
    forward(dec, cfg, variants, tokens=sp.Integer(1), past=decode_context(prompt) - 1)


def forward(b: ScopeBuilder, cfg: LMConfig, v: Variants, *, tokens, past, image: Tensor | None = None,
            slots=None) -> Tensor:
    """One forward of `tokens` new tokens over a KV cache holding `past` earlier ones (0: the prefill)."""
    prefill = sp.sympify(past) == 0
    hid = cfg.hidden
    ids = b.input("input_ids", (1, tokens))
    x = b.op("embed_tokens", "embedding", ids, num_embeddings=cfg.vocab, embedding_dim=hid)
    if prefill:
        # image slots hold placeholder ids; the projector's tokens are scattered over their embeddings
        feats = image if image is not None else b.input("image_features", (slots, hid))
        x = b.op("image_scatter", "masked_scatter", x, feats, shape=(1, tokens, hid))
    pos = b.input("position_ids", (1, tokens))
    cos_sin = None
    if v.rope == "once":
        inv = b.input("rotary_emb.inv_freq", (cfg.rope_pairs,))
        freqs = b.op("rotary_emb.freqs", "outer", pos, inv)
        cos_sin = b.op("rotary_emb.cos_sin", "cos_sin", freqs, shape=(1, tokens, cfg.head_dim))
    for i, kind in enumerate(cfg.mlp_layer_types):
        x = layer(b, x, i, kind, cfg, v, tokens=tokens, past=past, pos=pos, cos_sin=cos_sin)
    x = b.op("norm", "rms_norm", x, eps=cfg.rms_norm_eps)
    if prefill and v.lm_head == "last":
        x = b.op("lm_head.last_position", "slice", x, shape=(1, 1, hid))
    logits = b.op("lm_head", "linear", x, in_features=hid, out_features=cfg.vocab, bias=False)
    return b.op("next_token", "argmax", logits, shape=(1, 1))  # greedy: the last position's argmax


def layer(b: ScopeBuilder, x: Tensor, i: int, kind: str, cfg: LMConfig, v: Variants, *, tokens, past, pos,
          cos_sin) -> Tensor:
    p = f"layers.{i}"
    h = b.op(f"{p}.input_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    h = self_attn(b, h, f"{p}.self_attn", cfg, v, tokens=tokens, past=past, pos=pos, cos_sin=cos_sin)
    x = b.op(f"{p}.residual_attn", "add", x, h)
    h = b.op(f"{p}.post_attention_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    if kind == "dense":
        h = swiglu(b, h, f"{p}.mlp", cfg.hidden, cfg.dense_intermediate)
    else:
        h = moe(b, h, f"{p}.mlp", cfg, tokens)
    return b.op(f"{p}.residual_mlp", "add", x, h)


def self_attn(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, v: Variants, *, tokens, past, pos,
              cos_sin) -> Tensor:
    nh, hd, hid = cfg.heads, cfg.head_dim, cfg.hidden
    causal = ATTENTION[v.attention]
    q, k, val = (b.op(f"{p}.{n}_proj", "linear", h, in_features=hid, out_features=nh * hd, bias=False)
                 for n in "qkv")
    q, k, val = (b.op(f"{p}.{n}_heads", "reshape", t, shape=(1, nh, tokens, hd))
                 for n, t in zip("qkv", (q, k, val)))
    if v.rope == "vendor":
        # every attention layer recomputes its cos/sin: inv_freq (pairs x 1) @ positions (1 x T)
        inv = b.input(f"{p}.rotary_emb.inv_freq", (1, cfg.rope_pairs, 1))
        col = b.op(f"{p}.rotary_emb.positions", "reshape", pos, shape=(1, 1, tokens))
        freqs = b.op(f"{p}.rotary_emb", "matmul", inv, col)
        cos_sin = b.op(f"{p}.rotary_emb.cos_sin", "cos_sin", freqs, shape=(1, tokens, hd))
    q = b.op(f"{p}.rotary_q", "mul", q, cos_sin)  # q*cos + rotate_half(q)*sin: elementwise
    k = b.op(f"{p}.rotary_k", "mul", k, cos_sin)
    if sp.sympify(past) == 0:
        k = b.op(f"{p}.cache_key", "identity", k)     # written to the KV cache
        val = b.op(f"{p}.cache_value", "identity", val)
    else:
        pk = b.input(f"{p}.past_key", (1, nh, past, hd))
        pv = b.input(f"{p}.past_value", (1, nh, past, hd))
        k = b.op(f"{p}.cache_key", "cat", pk, k, dim=2)
        val = b.op(f"{p}.cache_value", "cat", pv, val, dim=2)
    s = b.op(f"{p}.scores", "attention_scores", q, k, causal=causal)
    s = b.op(f"{p}.scale", "mul", s)
    s = b.op(f"{p}.causal_mask", "add", s)
    s = b.op(f"{p}.softmax", "softmax", s, dtype="float32")
    o = b.op(f"{p}.probs_values", "attention_values", s, val, causal=causal)
    o = b.op(f"{p}.merge_heads", "reshape", o, shape=(1, tokens, nh * hd))
    return b.op(f"{p}.o_proj", "linear", o, in_features=nh * hd, out_features=hid, bias=False)


def swiglu(b: ScopeBuilder, h: Tensor, p: str, hidden: int, inter: int) -> Tensor:
    gate = b.op(f"{p}.gate_proj", "linear", h, in_features=hidden, out_features=inter, bias=False)
    up = b.op(f"{p}.up_proj", "linear", h, in_features=hidden, out_features=inter, bias=False)
    act = b.op(f"{p}.act_fn", "silu", gate)
    m = b.op(f"{p}.mul", "mul", act, up)
    return b.op(f"{p}.down_proj", "linear", m, in_features=inter, out_features=hidden, bias=False)


def moe(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, tokens) -> Tensor:
    """fp32 router, greedy top-k, k routed SwiGLU experts per token, plus the shared expert on every token."""
    hid, k = cfg.hidden, cfg.experts_per_token
    flat = b.op(f"{p}.flatten", "reshape", h, shape=(tokens, hid))
    r = b.op(f"{p}.gate.cast", "cast", flat, dtype=cfg.router_dtype)
    # fp32 input and fp32 weight (kept fp32 in a bf16 model): the cast node above carries the dtype
    logits = b.op(f"{p}.gate", "linear", r, in_features=hid, out_features=cfg.routed_experts, bias=False)
    scores = b.op(f"{p}.gate.softmax", "softmax", logits, dtype=cfg.router_dtype)
    top = b.op(f"{p}.gate.topk", "topk", scores, k=k, shape=(tokens, k))
    # Which experts a token meets depends on the data; how many does not: exactly k per token,
    # so the routed experts together run their SwiGLU on tokens*k rows.
    rows = b.op(f"{p}.experts.dispatch", "gather", flat, top, shape=(tokens * k, hid))
    out = swiglu(b, rows, f"{p}.experts", hid, cfg.moe_intermediate)
    out = b.op(f"{p}.experts.routing_weights", "mul", out, top)
    out = b.op(f"{p}.experts.combine", "index_add", out, top, shape=(1, tokens, hid))
    shared = swiglu(b, h, f"{p}.shared_experts", hid, cfg.shared_intermediate)
    return b.op(f"{p}.add_shared", "add", out, shared)


def decoder_graph(cfg: LMConfig = LM, variants: Variants = VENDOR, crop_mode: bool = True) -> CostGraph:
    """The language model alone (its image input is a placeholder of the right length)."""
    g = CostGraph("deepseek-ocr.decoder", params={"crop_mode": crop_mode, **variants.as_dict()})
    build(g, cfg, variants, crop_mode=crop_mode)
    return g
