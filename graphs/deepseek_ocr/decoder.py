"""The language model: one prefill over the prompt, then one decode forward per generated token
(SPEC section 5).

Nodes are named by the vendor's module paths (`layers.3.self_attn.q_proj`, `layers.3.mlp.gate`,
`layers.3.mlp.shared_experts.gate_proj`, `lm_head`) plus the op inside the module where a module
runs several (`layers.3.self_attn.softmax`), inside the scopes `decoder.prefill` and
`decoder.decode`. The decode scope is one forward at step `t` (context `L + t`) summed over
t = 1..output_tokens-1 in closed form: the prefill yields the first token.

Every node carries all metrics of `costgraph.cost.Cost`, written from the aten ops the reference
runs (`python -m verify.dispatch lm` prints them) under `costgraph.conventions`:
- RMSNorm in fp32: cast up (bf16 only), pow, mean, + eps, rsqrt, multiply, cast back, weight
  multiply; attention softmax in fp32 between two casts; the router in fp32. A `.to(float32)`
  of an fp32 tensor runs nothing: casts are `converts(src, dst)` (1 or 0; for the symbolic
  storage size, a polynomial exact on the supported dtypes).
- The routed experts follow the eager experts loop of `transformers` (`DeepseekOcr2TextExperts`:
  one_hot mask, then per expert hit: where, gather, fused gate_up linear, SiLU, multiply, down
  linear, routing weight, index_add_); `transformers` fuses the vendor's per-expert `gate_proj`
  and `up_proj` into `gate_up_proj` (same FLOPs; the routed rows are read once). The vendor's
  own dispatch (`moe_infer`: argsort by expert) is different bookkeeping of the same matmuls and
  is not modelled. Which experts a token meets depends on the router: the per-expert work scales
  with the number of distinct experts a layer runs, `experts_hit` (see `experts_hit_bound`).
- The causal mask is built as `transformers`' mask utilities build it (aranges, `le`, `where`).

Attention variants: `eager` materialises scores and probabilities (the vendor HF default, and
the only variant a CPU reference runs); `flash` is one fused kernel over the causal half (reads
q, k, v, writes the output; scale and softmax on the computed scores); `uncounted` is what a
profiler blind to that kernel reports (its FLOPs and elementwise work 0, its bytes as `flash`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import sympy as sp

from costgraph import conventions as C
from costgraph import params as P
from . import symbols as S
from costgraph.cost import Cost
from costgraph.graph import CostGraph, ScopeBuilder, Tensor
from costgraph.ops import OPS, itemsize, nbytes, numel, prod, register
from .config import DTYPES, LM, LMConfig, Mode
from .layout import image_tokens

# Attention implementation -> which score pairs are computed (costgraph.ops.sdpa's `causal`).
ATTENTION = {
    "eager": "full",      # vendor HF default: full L x L scores and probabilities, causal mask added
    "flash": "flash",     # flash_attention_2: only the unmasked (causal) half
    "uncounted": "none",  # what a profiler blind to the attention kernel reports
}
LM_HEAD = ("all", "last")     # vendor HF prefill: every prompt position; vLLM: the last one only
ROPE = ("vendor", "once")     # vendor: cos/sin per layer via inv_freq @ positions; transformers 5.x: once, elementwise

INDEX = 8   # int64 ids, positions, indices
FP32 = 4
BOOL = 1


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


def lm_kind(*kinds: str):
    """Register op kinds of the language model (`costgraph.ops.register`), refusing a kind that
    is already registered: one formula per kind, and a core kind is never silently replaced."""
    taken = [k for k in kinds if k in OPS]
    if taken:
        raise RuntimeError(f"op kind(s) {', '.join(taken)} already registered: graphs/decoder.py would replace them")
    return register(*kinds)


# ---- counting helpers ------------------------------------------------------------------------

def ew(op: str, elements) -> sp.Expr:
    """Elementwise FLOPs of one aten op over `elements` (its output or input, as the table's basis says)."""
    return C.FLOPS_PER_ELEMENT[op][0] * sp.sympify(elements)


def converts(src, dst) -> sp.Expr:
    """1 when `.to()` from element size `src` to `dst` copies, 0 when it returns its input unchanged.

    With a symbolic size (the storage dtype `dtype_bytes`) the indicator [src != dst] is the
    polynomial that interpolates it on the supported storage sizes (`graphs.config.DTYPES`: bf16 2,
    fp32 4, so [b != 4] = 2 - b/2): exact on every dtype the model runs in, and closed forms stay
    polynomials (a new storage dtype in DTYPES extends it).
    """
    src, dst = sp.sympify(src), sp.sympify(dst)
    if src == dst:
        return sp.Integer(0)
    if src.is_number and dst.is_number:
        return sp.Integer(1)
    if not src.is_number and not dst.is_number:
        raise ValueError(f"cannot decide whether a cast from {src} to {dst} bytes copies")
    size, fixed = (src, dst) if dst.is_number else (dst, src)
    points = [(v, 0 if v == fixed else 1) for v in sorted(set(DTYPES.values()))]
    return sp.expand(sp.interpolate(points, size))


def _cost(*, flops=0, ew=0, read=0, written=0, out=0) -> Cost:
    x = lambda e: sp.expand(sp.sympify(e))
    return Cost(flops=x(flops), elementwise_flops=x(ew), bytes_read=x(read), bytes_written=x(written),
                activation_bytes=x(out))


def _out(cost: Cost, nbytes_out) -> Cost:
    """The node's cost with its output tensor's bytes as activation_bytes (intermediates die inside)."""
    return Cost(**{**cost.as_dict(), "activation_bytes": sp.expand(sp.sympify(nbytes_out))})


def _cast(n, src, dst) -> Cost:
    """`.to()` of n elements: reads src bytes and writes dst bytes each, when it copies at all."""
    k = converts(src, dst)
    return _cost(read=k * n * src, written=k * n * dst, out=k * n * dst)


# ---- op kinds of the language model ------------------------------------------------------------

@lm_kind("embedding")
def embedding(ids, *, num_embeddings, embedding_dim, out_itemsize=S.dtype_bytes):
    """aten.embedding: reads the ids and one table row per id (a gather: `C.gather_bytes_read`), not
    the num_embeddings x embedding_dim table; writes the rows."""
    out = (*ids, embedding_dim)
    return out, _cost(read=C.gather_bytes_read(nbytes(ids), numel(out), out_itemsize),
                      written=numel(out) * out_itemsize, out=numel(out) * out_itemsize)


@lm_kind("masked_scatter_")
def masked_scatter_(x, source):
    """The image features written over the image slots' embeddings in place (the vendor's masked_scatter_):
    reads the (tokens x 1) bool mask and the source, writes the embeddings."""
    tokens = prod(x[:-1])
    return tuple(x), _cost(read=tokens * BOOL + nbytes(source), written=nbytes(x))


@lm_kind("position_ids")
def position_ids(*, tokens):
    """arange(T) + past length (int64)."""
    n = sp.sympify(tokens)
    return (1, n), _cost(ew=ew("add", n), read=INDEX * n, written=2 * INDEX * n, out=INDEX * n)


@lm_kind("causal_mask")
def causal_mask(pos, *, keys, out_itemsize=S.dtype_bytes):
    """transformers' eager mask: batch and head aranges (1 each), q and kv aranges plus offsets,
    `kv <= q` (bool, T x K), then `where(mask, 0, min)` into the model dtype."""
    t, k, b = sp.sympify(pos[-1]), sp.sympify(keys), out_itemsize
    pairs = t * k
    cost = (_cost(written=2 * INDEX)                                                  # two arange(1)
            + _cost(ew=ew("add", t), read=INDEX * t, written=2 * INDEX * t)          # arange(T) + offset
            + _cost(ew=ew("add", k), read=INDEX * k, written=2 * INDEX * k)          # arange(K) + offset
            + _cost(ew=ew("le", pairs), read=INDEX * (t + k), written=BOOL * pairs)
            + _cost(written=2 * b)                                                    # zeros(()), min scalar
            + _cost(ew=ew("where", pairs), read=BOOL * pairs + 2 * b, written=b * pairs, out=b * pairs))
    return (1, 1, t, k), cost


@lm_kind("rope_tables")
def rope_tables(pos, *, head_dim, matmul: bool, out_itemsize=S.dtype_bytes):
    """cos and sin tables (stacked: 2 x T x head_dim) in fp32, cast to the model dtype.

    positions to fp32; freqs = inv_freq @ positions (vendor, per layer: a bmm) or positions *
    inv_freq (transformers 5.x, once: a multiply); cat(freqs, freqs); cos, sin; both times
    attention_scaling; both cast.
    """
    t, pairs = sp.sympify(pos[-1]), sp.Integer(head_dim) / 2
    n = t * head_dim
    cost = _cost(read=INDEX * t, written=FP32 * t)                                  # positions.float()
    if matmul:
        cost += _cost(flops=2 * pairs * t, read=FP32 * (pairs + t), written=FP32 * pairs * t)
    else:
        cost += _cost(ew=ew("mul", pairs * t), read=FP32 * (pairs + t), written=FP32 * pairs * t)
    cost += _cost(read=FP32 * n, written=FP32 * n)                                  # cat
    for op in ("cos", "sin"):
        cost += _cost(ew=ew(op, n) + ew("mul", n), read=2 * FP32 * n, written=2 * FP32 * n)
        cost += _cast(n, FP32, out_itemsize)
    return (2, t, head_dim), _out(cost, 2 * n * out_itemsize)


@lm_kind("rms_norm")
def rms_norm(x, *, eps):
    """x.to(fp32); pow 2; mean; + eps; rsqrt; x * rstd; .to(dtype); weight * x."""
    rows, h = prod(x[:-1]), x[-1]
    n, b = rows * h, itemsize(x)
    cost = (_cast(n, b, FP32)
            + _cost(ew=ew("pow", n), read=FP32 * n, written=FP32 * n)
            + _cost(ew=ew("mean", n), read=FP32 * n, written=FP32 * rows)
            + _cost(ew=ew("add", rows) + ew("rsqrt", rows), read=2 * FP32 * rows, written=2 * FP32 * rows)
            + _cost(ew=ew("mul", n), read=FP32 * (n + rows), written=FP32 * n)
            + _cast(n, FP32, b)
            + _cost(ew=ew("mul", n), read=b * (h + n), written=b * n))
    return tuple(x), _out(cost, b * n)


@lm_kind("rope_apply")
def rope_apply(x, tables):
    """x * cos + rotate_half(x) * sin; rotate_half = cat(-x2, x1) of the halves (views)."""
    n, b = numel(x), itemsize(x)
    table = prod(tables[1:]) * itemsize(tables)          # one of cos / sin, broadcast over heads
    half = n / 2
    cost = (_cost(ew=ew("mul", n), read=n * b + table, written=n * b)
            + _cost(ew=ew("neg", half), read=half * b, written=half * b)
            + _cost(read=n * b, written=n * b)                                         # cat
            + _cost(ew=ew("mul", n), read=n * b + table, written=n * b)
            + _cost(ew=ew("add", n), read=2 * n * b, written=n * b, out=n * b))
    return tuple(x), cost


@lm_kind("cache_update")
def cache_update(past, new):
    """DynamicCache: cat(cache, new) along the sequence (the prefill's cache starts empty)."""
    out = (*new[:-2], past[-2] + new[-2], new[-1])
    return out, _cost(read=nbytes(past) + nbytes(new), written=nbytes(out), out=nbytes(out))


@lm_kind("attention_scores")
def attention_scores(q, k, *, causal):
    """q k^T per head (a bmm): the score half of `ops.sdpa` (same causal rule)."""
    from costgraph import ops

    *batch, lq, _ = q
    _, cost = ops.sdpa(q, k, (*k[:-1], 0), causal=causal)
    out = (*batch, lq, k[-2])
    b = itemsize(q)
    return out, _cost(flops=cost.flops, read=nbytes(q) + nbytes(k), written=numel(out) * b, out=numel(out) * b)


@lm_kind("attention_values")
def attention_values(probs, v, *, causal):
    """probabilities x values per head (a bmm): the other half of `ops.sdpa`."""
    from costgraph import ops

    *batch, lq, lk = probs
    _, cost = ops.sdpa((*batch, lq, 0), v, v, causal=causal)
    out = (*batch, lq, v[-1])
    b = itemsize(v)
    return out, _cost(flops=cost.flops, read=nbytes(probs) + nbytes(v), written=numel(out) * b,
                      out=numel(out) * b)


@lm_kind("scalar_mul")
def scalar_mul(x):
    """x * a Python scalar (attention scaling, routed_scaling_factor)."""
    n, b = numel(x), itemsize(x)
    return tuple(x), _cost(ew=ew("mul", n), read=n * b, written=n * b, out=n * b)


@lm_kind("softmax_fp32")
def softmax_fp32(x, *, out_itemsize=S.dtype_bytes):
    """softmax(x, dtype=float32).to(out dtype): an upcast, softmax in fp32, a downcast (each only if needed)."""
    n, b = numel(x), itemsize(x)
    cost = (_cast(n, b, FP32)
            + _cost(ew=ew("_softmax", n), read=FP32 * n, written=FP32 * n)
            + _cast(n, FP32, out_itemsize))
    return tuple(x), _out(cost, out_itemsize * n)


@lm_kind("fused_attention")
def fused_attention(q, k, v, *, causal):
    """One attention kernel (flash): reads q, k, v, writes the output; scale and softmax on the
    computed scores, no mask tensor. causal="none": a profiler blind to it (no FLOPs, no elementwise)."""
    from costgraph import ops

    *batch, lq, e = q
    out, cost = ops.sdpa(q, k, v, causal="flash" if causal == "none" else causal)
    pairs = cost.flops / (2 * prod(batch) * (e + v[-1]))     # scores computed per head batch
    work = prod(batch) * pairs * (C.SDPA_SCALE + C.SDPA_SOFTMAX)
    blind = causal == "none"
    b = itemsize(q)
    return tuple(out), _cost(flops=0 if blind else cost.flops, ew=0 if blind else work,
                             read=nbytes(q) + nbytes(k) + nbytes(v), written=numel(out) * b, out=numel(out) * b)


@lm_kind("heads_merge")
def heads_merge(x, *, shape, copies: bool):
    """`.transpose(1, 2).contiguous()` then a view: a copy unless the transpose is already contiguous."""
    n, b = numel(x), itemsize(x)
    return tuple(shape), (_cost(read=n * b, written=n * b, out=n * b) if copies else Cost())


@lm_kind("dtype_cast")
def dtype_cast(x, *, out_itemsize):
    """`.to(dtype)`: a copy when the element size changes, else nothing."""
    return tuple(x), _cast(numel(x), itemsize(x), out_itemsize)


@lm_kind("router_topk")
def router_topk(scores, *, k):
    """topk(scores, k, sorted=False): fp32 weights and int64 indices (outputs: the weights' shape)."""
    tokens = prod(scores[:-1])
    out = (*scores[:-1], k)
    w = tokens * k * (itemsize(scores) + INDEX)
    return out, _cost(ew=ew("topk", numel(scores)), read=nbytes(scores), written=w, out=w)


@lm_kind("expert_mask")
def expert_mask(top, *, experts, hits):
    """one_hot(indices, experts + 1) (aminmax range check, two scalar reads, zeros, scatter_),
    permute (a view), sum over (k, T), greater than 0, nonzero: the experts hit."""
    tokens, k = prod(top[:-1]), top[-1]
    slots, classes = tokens * k, experts + 1
    mask = slots * classes * INDEX
    cost = (_cost(ew=ew("aminmax", slots), read=INDEX * slots, written=2 * INDEX)
            + _cost(read=2 * INDEX)                                                      # two .item()
            + _cost(written=mask)                                                        # zeros
            + _cost(read=INDEX * slots, written=mask)                                    # scatter_
            + _cost(ew=ew("sum", slots * classes), read=mask, written=INDEX * classes)
            + _cost(ew=ew("gt", classes), read=INDEX * classes, written=BOOL * classes)
            + _cost(read=BOOL * classes, written=INDEX * hits, out=mask + INDEX * hits))   # nonzero
    return (classes, k, tokens), cost


@lm_kind("expert_select")
def expert_select(mask, *, rows, hits):
    """Per expert hit: `expert_idx == num_experts` (eq), its bool read, `expert_mask[idx]`'s index
    read, `torch.where(expert_mask[idx])` (nonzero over the k x T slice: (top_k_pos, token_idx)),
    and the index reads of `gate_up_proj[idx]` and `down_proj[idx]`. `rows` (k per token) in all.
    Indexing by the 0-d `idx` is no gather (`conventions.GATHERS`): torch reads the index as a scalar
    (aten._local_scalar_dense, its 8 bytes) and selects a view, so no table or slice is read there."""
    classes, k, tokens = mask
    scalars = hits * (INDEX + BOOL + 3 * INDEX)
    cost = (_cost(ew=ew("eq", hits), read=scalars, written=BOOL * hits)
            + _cost(read=hits * k * tokens * INDEX, written=2 * INDEX * rows, out=2 * INDEX * rows))
    return (2, rows), cost


@lm_kind("expert_gather")
def expert_gather(x, where, *, rows, width):
    """x[token_idx] per expert hit (aten.index, a gather): reads its token_idx and the rows it takes,
    writes them. Over all the experts hit, one index and one row of x per routed row."""
    b = itemsize(x)
    read = C.gather_bytes_read(rows * INDEX, rows * width, b)
    return (rows, width), _cost(read=read, written=rows * width * b, out=rows * width * b)


@lm_kind("routed_linear")
def routed_linear(x, *, in_features, out_features, hits):
    """F.linear(rows of one expert, that expert's weight) per expert hit: each expert's weight read once.
    (Node attrs `experts` / `active_experts`: the stored and per-token weight copies, for costgraph.params.)"""
    rows = x[0]
    b = itemsize(x)
    out = (rows, out_features)
    return out, _cost(flops=2 * rows * in_features * out_features,
                      read=rows * in_features * b + hits * in_features * out_features * b,
                      written=rows * out_features * b, out=rows * out_features * b)


@lm_kind("promote_mul")
def promote_mul(x, w):
    """rows (model dtype) * their routing weights (fp32, one per row): the product is fp32."""
    n = numel(x)
    return tuple(x), _cost(ew=ew("mul", n), read=nbytes(x) + nbytes(w), written=FP32 * n, out=FP32 * n)


@lm_kind("index_add_")
def index_add_(acc, rows, where, *, hits):
    """final.index_add_(0, token_idx, rows) per expert hit: reads the index and the rows, writes
    all of `final` each time (in place: the output is `acc`)."""
    r = rows[0]
    return tuple(acc), _cost(ew=ew("index_add_", numel(rows)), read=r * INDEX + nbytes(rows),
                             written=hits * nbytes(acc))


@lm_kind("zeros_init")
def zeros_init(x):
    """torch.zeros_like(x): reads x by the footprint convention, writes zeros."""
    return tuple(x), _cost(read=nbytes(x), written=nbytes(x), out=nbytes(x))


@lm_kind("argmax_last")
def argmax_last(logits):
    """logits[:, -1].argmax(-1): greedy choice of the next token from the last position's row."""
    row = logits[-1]
    return (1, 1), _cost(ew=ew("argmax", row), read=row * itemsize(logits), written=INDEX, out=INDEX)


@lm_kind("routed_gather")
def routed_gather(weights, where, *, rows):
    """top_k_weights[token_idx, top_k_pos, None] per expert hit (aten.index with two index tensors, a
    gather): reads both indices and the one weight each routed row takes, writes them."""
    b = itemsize(weights)
    return (rows, 1), _cost(read=C.gather_bytes_read(2 * INDEX * rows, rows, b), written=rows * b, out=rows * b)


@P.register("routed_linear")
def _routed_linear_weights(inputs, attrs, out_itemsize) -> P.Weights:
    per = attrs["in_features"] * attrs["out_features"]
    return P.Weights(sp.sympify(per * attrs["experts"]), inputs[0].itemsize,
                     sp.sympify(per * attrs["active_experts"]))


# ---- sequence lengths, routing, KV cache ---------------------------------------------------

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


def experts_hit_bound(cfg: LMConfig, tokens) -> sp.Expr:
    """Distinct experts one MoE layer can run for `tokens` tokens: min(routed experts, k x tokens).

    The default prediction for `experts_hit`: an upper bound, attained when some token of the
    prompt is routed to every expert. One token: exactly k. For DeepSeek-OCR (64 experts, top-6,
    prompts of 74+ tokens) it is 64; the verifier reports how many each layer really ran.
    """
    return sp.Min(cfg.routed_experts, cfg.experts_per_token * sp.sympify(tokens))


def kv_cache_bytes_per_token(cfg: LMConfig = LM) -> sp.Expr:
    """K and V of every layer for one token: 2 x layers x heads x head_dim x dtype_bytes (bf16: 61,440)."""
    return cfg.kv_values_per_token * S.dtype_bytes


def kv_cache_bytes(cfg: LMConfig = LM, context=None) -> sp.Expr:
    """The KV cache holding `context` tokens (default: the whole generation's, prompt + output_tokens - 1:
    the last generated token is never fed back)."""
    if context is None:
        context = prompt_length() + S.output_tokens - 1
    return kv_cache_bytes_per_token(cfg) * sp.sympify(context)


# ---- the graph -------------------------------------------------------------------------------

def build(g: CostGraph, cfg: LMConfig = LM, variants: Variants = VENDOR, *, crop_mode: bool = True,
          image: Tensor | None = None, experts_hit: sp.Expr | None = None) -> None:
    """Add `decoder`, `decoder.prefill` and `decoder.decode` to `g`; `image` is the vision output.

    `experts_hit`: distinct experts each MoE layer runs in the prefill; None predicts the bound
    (`experts_hit_bound`), `costgraph.symbols.experts_hit` keeps it a symbol (the verifier
    substitutes what the router did). Decode forwards run exactly k.
    """
    prompt = prompt_length(crop_mode)
    hits = experts_hit_bound(cfg, prompt) if experts_hit is None else sp.sympify(experts_hit)
    g.scope("decoder", doc="the language model: prefill + every decode forward")
    pre = g.scope("decoder.prefill", doc="one forward over the L prompt tokens; yields the first output token")
    forward(pre, cfg, variants, tokens=prompt, past=0, image=image, slots=image_slots(crop_mode), hits=hits)
    dec = g.scope("decoder.decode", sum_over=(S.decode_step, 1, S.output_tokens - 1),
                  doc="decode forward t (one new token, context L + t), summed over t = 1..output_tokens-1")
    forward(dec, cfg, variants, tokens=sp.Integer(1), past=decode_context(prompt) - 1,
            hits=sp.Integer(cfg.experts_per_token))


def forward(b: ScopeBuilder, cfg: LMConfig, v: Variants, *, tokens, past, hits, image: Tensor | None = None,
            slots=None) -> Tensor:
    """One forward of `tokens` new tokens over a KV cache holding `past` earlier ones (0: the prefill)."""
    prefill = sp.sympify(past) == 0
    hid = cfg.hidden
    ids = b.input("input_ids", (1, tokens), itemsize=INDEX)
    x = b.op("embed_tokens", "embedding", ids, num_embeddings=cfg.vocab, embedding_dim=hid,
             out_itemsize=S.dtype_bytes)
    if prefill:
        # image slots hold placeholder ids; the projector's tokens are written over their embeddings
        feats = image if image is not None else b.input("image_features", (slots, hid))
        x = b.op("image_scatter", "masked_scatter_", x, feats)
    pos = b.op("position_ids", "position_ids", tokens=tokens, out_itemsize=INDEX)
    mask = None
    if v.attention == "eager":
        mask = b.op("attention_mask", "causal_mask", pos, keys=sp.sympify(past) + tokens, out_itemsize=S.dtype_bytes)
    tables = None
    if v.rope == "once":
        tables = b.op("rotary_emb", "rope_tables", pos, head_dim=cfg.head_dim, matmul=False,
                      out_itemsize=S.dtype_bytes)
    for i, kind in enumerate(cfg.mlp_layer_types):
        x = layer(b, x, i, kind, cfg, v, tokens=tokens, past=past, pos=pos, mask=mask, tables=tables, hits=hits)
    x = b.op("norm", "rms_norm", x, eps=cfg.rms_norm_eps)
    if prefill and v.lm_head == "last":
        x = b.op("lm_head.last_position", "slice", x, shape=(1, 1, hid))
    logits = b.op("lm_head", "linear", x, in_features=hid, out_features=cfg.vocab, bias=False)
    return b.op("next_token", "argmax_last", logits, out_itemsize=INDEX)  # greedy: the last position's argmax


def layer(b: ScopeBuilder, x: Tensor, i: int, kind: str, cfg: LMConfig, v: Variants, *, tokens, past, pos,
          mask, tables, hits) -> Tensor:
    p = f"layers.{i}"
    h = b.op(f"{p}.input_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    h = self_attn(b, h, f"{p}.self_attn", cfg, v, tokens=tokens, past=past, pos=pos, mask=mask, tables=tables)
    x = b.op(f"{p}.residual_attn", "add", x, h)
    h = b.op(f"{p}.post_attention_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    if kind == "dense":
        h = swiglu(b, h, f"{p}.mlp", cfg.hidden, cfg.dense_intermediate)
    else:
        h = moe(b, h, f"{p}.mlp", cfg, tokens, hits)
    return b.op(f"{p}.residual_mlp", "add", x, h)


def self_attn(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, v: Variants, *, tokens, past, pos, mask,
              tables) -> Tensor:
    nh, hd, hid = cfg.heads, cfg.head_dim, cfg.hidden
    causal = ATTENTION[v.attention]
    q, k, val = (b.op(f"{p}.{n}_proj", "linear", h, in_features=hid, out_features=nh * hd, bias=False)
                 for n in "qkv")
    q, k, val = (b.op(f"{p}.{n}_heads", "reshape", t, shape=(1, nh, tokens, hd))
                 for n, t in zip("qkv", (q, k, val)))
    if v.rope == "vendor":
        # every attention layer recomputes its cos/sin: inv_freq (pairs x 1) @ positions (1 x T)
        tables = b.op(f"{p}.rotary_emb", "rope_tables", pos, head_dim=hd, matmul=True, out_itemsize=S.dtype_bytes)
    q = b.op(f"{p}.rotary_q", "rope_apply", q, tables)
    k = b.op(f"{p}.rotary_k", "rope_apply", k, tables)
    pk = b.input(f"{p}.past_key", (1, nh, past, hd))
    pv = b.input(f"{p}.past_value", (1, nh, past, hd))
    k = b.op(f"{p}.cache_key", "cache_update", pk, k)
    val = b.op(f"{p}.cache_value", "cache_update", pv, val)
    if v.attention == "eager":
        s = b.op(f"{p}.scores", "attention_scores", q, k, causal=causal)
        s = b.op(f"{p}.scale", "scalar_mul", s)
        s = b.op(f"{p}.causal_mask", "add", s, mask)
        s = b.op(f"{p}.softmax", "softmax_fp32", s, out_itemsize=S.dtype_bytes)
        o = b.op(f"{p}.probs_values", "attention_values", s, val, causal=causal)
        # (1, heads, T, hd) -> (1, T, heads, hd): a copy, except for one token (already contiguous)
        o = b.op(f"{p}.merge_heads", "heads_merge", o, shape=(1, tokens, nh * hd), copies=sp.sympify(tokens) != 1)
    else:
        o = b.op(f"{p}.attention", "fused_attention", q, k, val, causal=causal)
        o = b.op(f"{p}.merge_heads", "reshape", o, shape=(1, tokens, nh * hd))
    return b.op(f"{p}.o_proj", "linear", o, in_features=nh * hd, out_features=hid, bias=False)


def swiglu(b: ScopeBuilder, h: Tensor, p: str, hidden: int, inter: int) -> Tensor:
    gate = b.op(f"{p}.gate_proj", "linear", h, in_features=hidden, out_features=inter, bias=False)
    act = b.op(f"{p}.act_fn", "silu", gate)
    up = b.op(f"{p}.up_proj", "linear", h, in_features=hidden, out_features=inter, bias=False)
    m = b.op(f"{p}.mul", "mul", act, up)
    return b.op(f"{p}.down_proj", "linear", m, in_features=inter, out_features=hidden, bias=False)


def moe(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, tokens, hits) -> Tensor:
    """fp32 router, greedy top-k, the eager experts loop (k routed rows per token), the shared expert."""
    hid, k, inter, e = cfg.hidden, cfg.experts_per_token, cfg.moe_intermediate, cfg.routed_experts
    rows = tokens * k   # whatever the router decides: k distinct experts per token
    flat = b.op(f"{p}.flatten", "reshape", h, shape=(tokens, hid))
    r = b.op(f"{p}.gate.cast", "dtype_cast", flat, out_itemsize=FP32)
    logits = b.op(f"{p}.gate", "linear", r, in_features=hid, out_features=e, bias=False, weight_itemsize=FP32)
    scores = b.op(f"{p}.gate.softmax", "softmax_fp32", logits, out_itemsize=FP32)
    top = b.op(f"{p}.gate.topk", "router_topk", scores, k=k)
    top = b.op(f"{p}.gate.scaling", "scalar_mul", top)           # x routed_scaling_factor (1.0: still a multiply)
    acc = b.op(f"{p}.experts.zeros_like", "zeros_init", flat)
    mask = b.op(f"{p}.experts.expert_mask", "expert_mask", top, experts=e, hits=hits, out_itemsize=INDEX)
    where = b.op(f"{p}.experts.where", "expert_select", mask, rows=rows, hits=hits, out_itemsize=INDEX)
    x = b.op(f"{p}.experts.gather", "expert_gather", flat, where, rows=rows, width=hid)
    gu = b.op(f"{p}.experts.gate_up_proj", "routed_linear", x, in_features=hid, out_features=2 * inter,
              hits=hits, experts=e, active_experts=k)
    gate = b.op(f"{p}.experts.gate", "slice", gu, shape=(rows, inter))   # chunk(2): views
    up = b.op(f"{p}.experts.up", "slice", gu, shape=(rows, inter))
    act = b.op(f"{p}.experts.act_fn", "silu", gate)
    m = b.op(f"{p}.experts.mul", "mul", act, up)
    out = b.op(f"{p}.experts.down_proj", "routed_linear", m, in_features=inter, out_features=hid,
               hits=hits, experts=e, active_experts=k)
    w = b.op(f"{p}.experts.routing_weights.select", "routed_gather", top, where, rows=rows)
    out = b.op(f"{p}.experts.routing_weights", "promote_mul", out, w, out_itemsize=FP32)
    out = b.op(f"{p}.experts.cast", "dtype_cast", out, out_itemsize=S.dtype_bytes)
    out = b.op(f"{p}.experts.combine", "index_add_", acc, out, where, hits=hits)
    routed = b.op(f"{p}.experts.unflatten", "reshape", out, shape=(1, tokens, hid))
    shared = swiglu(b, h, f"{p}.shared_experts", hid, cfg.shared_intermediate)
    return b.op(f"{p}.add_shared", "add", routed, shared)


def decoder_graph(cfg: LMConfig = LM, variants: Variants = VENDOR, crop_mode: bool = True,
                  experts_hit: sp.Expr | None = None) -> CostGraph:
    """The language model alone (its image input is a placeholder of the right length)."""
    g = CostGraph("deepseek-ocr.decoder", params={"crop_mode": crop_mode, **variants.as_dict()})
    build(g, cfg, variants, crop_mode=crop_mode, experts_hit=experts_hit)
    return g
