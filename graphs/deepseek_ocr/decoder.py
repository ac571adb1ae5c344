"""The language model: one prefill over the prompt, then one decode forward per generated token
(SPEC section 5).

Nodes are named by the vendor's module paths (`layers.3.self_attn.q_proj`, `layers.3.mlp.gate`,
`layers.3.mlp.shared_experts.gate_proj`, `lm_head`) plus the op inside the module where a module
runs several (`layers.3.self_attn.softmax`), inside the scopes `decoder.prefill` and
`decoder.decode`. The decode scope is one forward at step `t` (context `L + t`) summed over
t = 1..output_tokens-1 in closed form: the prefill yields the first token.

Every node carries all metrics of `costgraph.cost.Cost`, written from the aten ops the reference
runs (`python -m costgraph.verify.trace lm` prints them) under `costgraph.conventions`:
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
from typing import ClassVar

import sympy as sp

from costgraph.dtypes import FLOAT32 as FP32, INT64 as INDEX
from costgraph.graph import CostGraph, ScopeBuilder, Tensor
from costgraph.ops import more_than_one
from . import symbols as S
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
PHASES = ("inference", "train")
# What trains (SPEC section 7): the vendor HF forward runs vision under no_grad (the language model
# trains); full; SAM frozen; LoRA adapters on the language model's projections.
TRAIN = ("lm", "full", "lm+clip+projector", "lora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
CHECKPOINTING = ("none", "layer")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TRAINING_FIELDS = ("train", "lora_rank", "lora_alpha", "lora_targets", "optimizer", "checkpointing")


@dataclass(frozen=True)
class Variants:
    """How the model is run. Defaults follow the vendor HF path; `phase="train"` is a fine-tuning step
    (forward, backward, optimizer) under the training settings below."""
    attention: str = "eager"
    lm_head: str = "all"
    rope: str = "vendor"
    phase: str = "inference"
    train: str = "lm"
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_targets: str = ",".join(LORA_TARGETS)
    optimizer: str = "adamw"
    checkpointing: str = "none"
    # what `train` may name: a model built on these blocks with other vision modules names its own settings
    train_settings: ClassVar[tuple[str, ...]] = TRAIN

    def __post_init__(self):
        for name, allowed in (("attention", ATTENTION), ("lm_head", LM_HEAD), ("rope", ROPE), ("phase", PHASES),
                              ("train", self.train_settings), ("optimizer", OPTIMIZERS),
                              ("checkpointing", CHECKPOINTING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} variant {getattr(self, name)!r} (choose from {', '.join(allowed)})")
        for name in ("lora_rank", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        targets = self.lora_targets.split(",")
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise ValueError(f"unknown LoRA target {bad[0] if bad else ''!r} (choose from {', '.join(LORA_TARGETS)})")
        if self.phase == "train" and self.lm_head != "all":
            raise ValueError("a training step computes the logits of every position (--lm-head all)")

    @property
    def training(self) -> bool:
        return self.phase == "train"

    def as_dict(self) -> dict:
        d = asdict(self)
        if not self.training:   # an inference run is described as before there was a training phase
            for k in ("phase",) + TRAINING_FIELDS:
                d.pop(k)
        elif self.train != "lora":
            for k in ("lora_rank", "lora_alpha", "lora_targets"):
                d.pop(k)
        return d

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())


VENDOR = Variants()


def check_training_options(options: dict) -> None:
    """Training fields apply to `phase="train"` only, LoRA's to `train="lora"`: one line naming the first
    misplaced option (a default value given explicitly is accepted)."""
    if options.get("phase", "inference") != "train":
        given = [k for k in TRAINING_FIELDS if k in options and options[k] != getattr(VENDOR, k)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --phase train")
    elif options.get("train", "lm") != "lora":
        given = [k for k in ("lora_rank", "lora_alpha", "lora_targets") if k in options]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --train lora")


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

def expected_experts_hit(cfg: LMConfig, tokens) -> sp.Expr:
    """Expected distinct experts one MoE layer runs for `tokens` tokens routed uniformly at random:
    an expert misses one token's top-k with probability (E - k) / E, so E (1 - ((E - k) / E)^tokens).
    One token: exactly k. The prediction for a batched decode step (B tokens, one per sequence);
    `experts_hit_bound` min(E, k B) is its upper bound (reported beside it by `graphs.deepseek_ocr.serving`)."""
    e, k = cfg.routed_experts, cfg.experts_per_token
    return e * (1 - sp.Rational(e - k, e) ** sp.sympify(tokens))


def build(g: CostGraph, cfg: LMConfig = LM, variants: Variants = VENDOR, *, crop_mode: bool = True,
          image: Tensor | None = None, experts_hit: sp.Expr | None = None, slots: sp.Expr | None = None,
          scatter: str = "masked_scatter_", batch=1) -> None:
    """Add `decoder`, `decoder.prefill` and `decoder.decode` to `g`; `image` is the vision output.

    `experts_hit`: distinct experts each MoE layer runs in the prefill; None predicts the bound
    (`experts_hit_bound`), `costgraph.symbols.experts_hit` keeps it a symbol (the verifier
    substitutes what the router did). Decode forwards run exactly k.

    `slots`: the image slots of the prompt (default: DeepSeek-OCR's token count for the layout);
    `scatter`: the op kind writing the image features over their slots' embeddings (another model
    built on these blocks, e.g. DeepSeek-OCR 2, gives its own).
    """
    slots = image_slots(crop_mode) if slots is None else sp.sympify(slots)
    prompt = 1 + S.text_tokens + slots
    hits = experts_hit_bound(cfg, batch * prompt) if experts_hit is None else sp.sympify(experts_hit)
    # batch: B sequences of the same prompt run together (weights read once per step, a KV cache
    # each); a decode step's B tokens meet more experts (expected under uniform routing)
    dec_hits = sp.Integer(cfg.experts_per_token) if batch == 1 else \
        (expected_experts_hit(cfg, batch) if experts_hit is None else sp.sympify(experts_hit))
    g.scope("decoder", doc="the language model: prefill + every decode forward")
    pre = g.scope("decoder.prefill", doc="one forward over the L prompt tokens; yields the first output token")
    forward(pre, cfg, variants, tokens=prompt, past=0, image=image, slots=slots, hits=hits, scatter=scatter,
            batch=batch)
    dec = g.scope("decoder.decode", sum_over=(S.decode_step, 1, S.output_tokens - 1),
                  doc="decode forward t (one new token, context L + t), summed over t = 1..output_tokens-1")
    forward(dec, cfg, variants, tokens=sp.Integer(1), past=decode_context(prompt) - 1, hits=dec_hits, batch=batch)


def forward(b: ScopeBuilder, cfg: LMConfig, v: Variants, *, tokens, past, hits, image: Tensor | None = None,
            slots=None, scatter: str = "masked_scatter_", batch=1) -> Tensor:
    """One forward of `tokens` new tokens over a KV cache holding `past` earlier ones (0: the prefill)."""
    prefill = sp.sympify(past) == 0
    hid = cfg.hidden
    ids = b.input("input_ids", (batch, tokens), itemsize=INDEX)
    x = b.op("embed_tokens", "embedding", ids, num_embeddings=cfg.vocab, embedding_dim=hid,
             out_itemsize=S.dtype_bytes)
    if prefill:
        # image slots hold placeholder ids; the projector's tokens are written over their embeddings
        feats = image if image is not None else b.input("image_features", (batch * slots, hid))
        x = b.op("image_scatter", scatter, x, feats)
    pos = b.op("position_ids", "position_ids", tokens=tokens, out_itemsize=INDEX)
    mask = None
    if v.attention == "eager":
        mask = b.op("attention_mask", "causal_mask", pos, keys=sp.sympify(past) + tokens, out_itemsize=S.dtype_bytes,
                    **({"batch": batch} if batch != 1 else {}))
    tables = None
    if v.rope == "once":
        tables = b.op("rotary_emb", "rope_tables", pos, head_dim=cfg.head_dim, matmul=False,
                      out_itemsize=S.dtype_bytes)
    for i, kind in enumerate(cfg.mlp_layer_types):
        x = layer(b, x, i, kind, cfg, v, tokens=tokens, past=past, pos=pos, mask=mask, tables=tables, hits=hits,
                  batch=batch)
    x = b.op("norm", "rms_norm", x, eps=cfg.rms_norm_eps)
    if prefill and v.lm_head == "last":
        x = b.op("lm_head.last_position", "slice", x, shape=(batch, 1, hid))
    logits = b.op("lm_head", "linear", x, in_features=hid, out_features=cfg.vocab, bias=False)
    return b.op("next_token", "argmax_last", logits, out_itemsize=INDEX)  # greedy: the last position's argmax


def layer(b: ScopeBuilder, x: Tensor, i: int, kind: str, cfg: LMConfig, v: Variants, *, tokens, past, pos,
          mask, tables, hits, batch=1, cache: bool = True, moe_block=None, linear=None) -> Tensor:
    """One decoder layer. `batch` sequences of `tokens`; `cache`: keys and values go through the KV
    cache (inference); `moe_block` builds the MoE MLP (default: the inference experts loop);
    `linear` builds a projection (default: a plain linear; training adds LoRA through it)."""
    p = f"layers.{i}"
    linear = linear or plain_linear
    h = b.op(f"{p}.input_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    h = self_attn(b, h, f"{p}.self_attn", cfg, v, tokens=tokens, past=past, pos=pos, mask=mask, tables=tables,
                  batch=batch, cache=cache, linear=linear)
    x = b.op(f"{p}.residual_attn", "add", x, h)
    h = b.op(f"{p}.post_attention_layernorm", "rms_norm", x, eps=cfg.rms_norm_eps)
    if kind == "dense":
        h = swiglu(b, h, f"{p}.mlp", cfg.hidden, cfg.dense_intermediate, linear=linear)
    elif moe_block is not None:
        h = moe_block(b, h, f"{p}.mlp", cfg, tokens, batch)
    else:
        h = moe(b, h, f"{p}.mlp", cfg, tokens, hits, batch)
    return b.op(f"{p}.residual_mlp", "add", x, h)


def plain_linear(b: ScopeBuilder, path: str, x: Tensor, *, in_features, out_features) -> Tensor:
    return b.op(path, "linear", x, in_features=in_features, out_features=out_features, bias=False)


def self_attn(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, v: Variants, *, tokens, past, pos, mask,
              tables, batch=1, cache: bool = True, linear=None) -> Tensor:
    nh, hd, hid = cfg.heads, cfg.head_dim, cfg.hidden
    causal = ATTENTION[v.attention]
    linear = linear or plain_linear
    q, k, val = (linear(b, f"{p}.{n}_proj", h, in_features=hid, out_features=nh * hd) for n in "qkv")
    q, k, val = (b.op(f"{p}.{n}_heads", "reshape", t, shape=(batch, nh, tokens, hd))
                 for n, t in zip("qkv", (q, k, val)))
    if v.rope == "vendor":
        # every attention layer recomputes its cos/sin: inv_freq (pairs x 1) @ positions (1 x T)
        tables = b.op(f"{p}.rotary_emb", "rope_tables", pos, head_dim=hd, matmul=True, out_itemsize=S.dtype_bytes)
    q = b.op(f"{p}.rotary_q", "rope_apply", q, tables)
    k = b.op(f"{p}.rotary_k", "rope_apply", k, tables)
    if cache:
        pk = b.input(f"{p}.past_key", (batch, nh, past, hd))
        pv = b.input(f"{p}.past_value", (batch, nh, past, hd))
        k = b.op(f"{p}.cache_key", "cache_update", pk, k)
        val = b.op(f"{p}.cache_value", "cache_update", pv, val)
    if v.attention == "eager":
        # several sequences of several tokens: q (rotated in its tokens-major layout) is copied for the bmm
        copy = {"q_copy": more_than_one(batch)} if batch != 1 and sp.sympify(tokens) != 1 else {}
        s = b.op(f"{p}.scores", "attention_scores", q, k, causal=causal, **copy)
        s = b.op(f"{p}.scale", "scalar_mul", s)
        s = b.op(f"{p}.causal_mask", "add", s, mask)
        s = b.op(f"{p}.softmax", "softmax_fp32", s, out_itemsize=S.dtype_bytes)
        o = b.op(f"{p}.probs_values", "attention_values", s, val, causal=causal)
        # (1, heads, T, hd) -> (1, T, heads, hd): a copy, except for one token (already contiguous)
        o = b.op(f"{p}.merge_heads", "heads_merge", o, shape=(batch, tokens, nh * hd),
                 copies=sp.sympify(tokens) != 1)
    else:
        o = b.op(f"{p}.attention", "fused_attention", q, k, val, causal=causal)
        o = b.op(f"{p}.merge_heads", "reshape", o, shape=(batch, tokens, nh * hd))
    return linear(b, f"{p}.o_proj", o, in_features=nh * hd, out_features=hid)


def swiglu(b: ScopeBuilder, h: Tensor, p: str, hidden: int, inter: int, linear=None) -> Tensor:
    linear = linear or plain_linear
    gate = linear(b, f"{p}.gate_proj", h, in_features=hidden, out_features=inter)
    act = b.op(f"{p}.act_fn", "silu", gate)
    up = linear(b, f"{p}.up_proj", h, in_features=hidden, out_features=inter)
    m = b.op(f"{p}.mul", "mul", act, up)
    return linear(b, f"{p}.down_proj", m, in_features=inter, out_features=hidden)


# The op kinds of the eager experts loop's per-run ops: the rows' gather, the routing weights' gather and
# the routed projections (a training step gives kinds whose backward counts each run's gradient bookkeeping).
EXPERTS_LOOP = {"rows": "expert_gather", "weights": "routed_gather", "experts": "routed_linear"}


def moe(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, tokens, hits, batch=1, linear=None,
        kinds: dict = EXPERTS_LOOP) -> Tensor:
    """fp32 router, greedy top-k, the eager experts loop (k routed rows per token), the shared expert
    (`linear`: its projections' builder, as in `swiglu`; the routed experts are 3-D parameters, not
    Linear modules). `kinds`: the loop's per-run op kinds (`EXPERTS_LOOP`'s keys)."""
    hid, k, inter, e = cfg.hidden, cfg.experts_per_token, cfg.moe_intermediate, cfg.routed_experts
    n = batch * tokens   # the experts loop sees the batch's tokens as one list
    rows = n * k   # whatever the router decides: k distinct experts per token
    flat = b.op(f"{p}.flatten", "reshape", h, shape=(n, hid))
    r = b.op(f"{p}.gate.cast", "cast", flat, out_itemsize=FP32)
    logits = b.op(f"{p}.gate", "linear", r, in_features=hid, out_features=e, bias=False, weight_itemsize=FP32)
    scores = b.op(f"{p}.gate.softmax", "softmax_fp32", logits, out_itemsize=FP32)
    top = b.op(f"{p}.gate.topk", "router_topk", scores, k=k)
    top = b.op(f"{p}.gate.scaling", "scalar_mul", top)           # x routed_scaling_factor (1.0: still a multiply)
    acc = b.op(f"{p}.experts.zeros_like", "zeros_init", flat)
    mask = b.op(f"{p}.experts.expert_mask", "expert_mask", top, experts=e, hits=hits, out_itemsize=INDEX)
    where = b.op(f"{p}.experts.where", "expert_select", mask, rows=rows, hits=hits, out_itemsize=INDEX)
    # the eager loop launches these once per expert hit (`launches`: the time model's kernel count)
    x = b.op(f"{p}.experts.gather", kinds["rows"], flat, where, rows=rows, width=hid, launches=hits)
    gu = b.op(f"{p}.experts.gate_up_proj", kinds["experts"], x, in_features=hid, out_features=2 * inter,
              hits=hits, experts=e, active_experts=k)
    gate = b.op(f"{p}.experts.gate", "slice", gu, shape=(rows, inter))   # chunk(2): views
    up = b.op(f"{p}.experts.up", "slice", gu, shape=(rows, inter))
    act = b.op(f"{p}.experts.act_fn", "silu", gate, launches=hits)
    m = b.op(f"{p}.experts.mul", "mul", act, up, launches=hits)
    out = b.op(f"{p}.experts.down_proj", kinds["experts"], m, in_features=inter, out_features=hid,
               hits=hits, experts=e, active_experts=k)
    w = b.op(f"{p}.experts.routing_weights.select", kinds["weights"], top, where, rows=rows, launches=hits)
    out = b.op(f"{p}.experts.routing_weights", "promote_mul", out, w, out_itemsize=FP32, launches=hits)
    out = b.op(f"{p}.experts.cast", "cast", out, out_itemsize=S.dtype_bytes, launches=hits)
    out = b.op(f"{p}.experts.combine", "index_add_", acc, out, where, hits=hits)
    routed = b.op(f"{p}.experts.unflatten", "reshape", out, shape=(batch, tokens, hid))
    shared = swiglu(b, h, f"{p}.shared_experts", hid, cfg.shared_intermediate, linear=linear)
    return b.op(f"{p}.add_shared", "add", routed, shared)


def decoder_graph(cfg: LMConfig = LM, variants: Variants = VENDOR, crop_mode: bool = True,
                  experts_hit: sp.Expr | None = None, batch=1) -> CostGraph:
    """The language model alone (its image input is a placeholder of the right length); `batch`
    sequences of the same prompt run together (`costgraph.symbols.batch` keeps it symbolic)."""
    g = CostGraph("deepseek-ocr.decoder", params={"crop_mode": crop_mode, **variants.as_dict(),
                                                  **({"batch": batch} if batch != 1 else {})})
    build(g, cfg, variants, crop_mode=crop_mode, experts_hit=experts_hit, batch=batch)
    return g
