"""A fine-tuning step of DeepSeek-OCR (SPEC section 7): one micro-batch of B pages forward, the loss,
the backward of whatever trains, the optimizer update.

Forward: every page through the vision encoder (the vendor loops over the pages: scope `vision`
runs B times), then one language-model forward over the B sequences of L = 1 + image slots +
text_tokens tokens (no KV cache, logits at every position), with the vendor's TRAINING MoE path
(`moe_train`: repeat_interleave, a boolean-mask gather and write-back per expert over all 64
experts, the weighted sum of the k rows, the gate's auxiliary balance loss) rather than the
inference experts loop, and the causal-LM loss (fp32 logits, log_softmax, nll over every position).

What trains (`Variants.train`):
- `lm`: the vendor HF forward: SAM, CLIP, the projector and the view tokens under no_grad; every
  language-model weight trains (the default);
- `full`: everything (the first conv's pixels still need no gradient);
- `lm+clip+projector`: SAM frozen (no weight gradients, and no backward through it at all: nothing
  upstream of its output needs one);
- `lora`: LoRA adapters (PEFT's math: base(x) + B(A(x)) * alpha/r, dropout 0; the adapters in fp32 as
  PEFT keeps them by default, the input cast to fp32 for them and the sum cast back) on the
  language model's projections named by `lora_targets` (q,k,v,o,gate,up,down: every routed and
  shared expert included; CLIP's and SAM's module names match none), all base weights frozen.

Scopes: `vision`, `vision.global`, `vision.crops`, `decoder` (forward), `backward.vision...` and
`backward.decoder` (their gradients; `backward.X` is the gradient of node X), `recompute.decoder`
(checkpointing: each decoder layer's forward again before its backward), `optimizer` (one update
per trained parameter). Composites: `forward` = vision + decoder; `train` = the whole step.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from costgraph import autodiff
from costgraph.dtypes import FLOAT32 as FP32, INT64 as INDEX
from costgraph.graph import CostGraph, ScopeBuilder, Tensor
from . import assembly, decoder
from . import symbols as S
from .config import LM, LMConfig
from .decoder import ATTENTION, Variants

FORWARD = ("vision", "decoder")
STEP = ("vision", "decoder", "backward", "recompute", "optimizer")
COMPOSITE = {"forward": FORWARD, "train": STEP}
SCOPES = ("vision", "vision.global", "vision.crops", "decoder", "forward", "backward", "backward.vision",
          "backward.vision.global", "backward.vision.crops", "backward.decoder", "recompute", "optimizer", "train")
REPORT_PARTS = {"forward": ("vision", "decoder"), "train": ("forward", "backward", "recompute", "optimizer")}
STAGES = ("train",)      # one liveness pass over the whole step: saved tensors live into the backward


def sequence_length(crop_mode: bool = True) -> sp.Expr:
    """Tokens of one training sequence: [BOS] + image slots + text tokens (prompt and answer)."""
    return decoder.prompt_length(crop_mode)


def _lora_targets(v: Variants) -> set[str]:
    return {f"{t}_proj" for t in v.lora_targets.split(",")} if v.train == "lora" else set()


def lora_linear(rank: int, targets: set[str]):
    """A projection builder: the base linear, plus LoRA on the targeted ones (PEFT's Linear.forward)."""
    def linear(b: ScopeBuilder, path: str, x: Tensor, *, in_features, out_features, routed=None) -> Tensor:
        def proj(p, inp, i, o):
            if routed is None:
                return b.op(p, "linear", inp, in_features=i, out_features=o, bias=False)
            return b.op(p, "routed_linear", inp, in_features=i, out_features=o, hits=routed[0], experts=routed[0],
                        active_experts=routed[1])
        base = proj(path, x, in_features, out_features)
        if path.rpartition(".")[2] not in targets:
            return base
        xa = b.op(f"{path}.lora_input_cast", "cast", x, out_itemsize=FP32)
        a = proj(f"{path}.lora_A", xa, in_features, rank)
        up = proj(f"{path}.lora_B", a, rank, out_features)
        scaled = b.op(f"{path}.lora_scaling", "scalar_mul", up)
        out = b.op(f"{path}.lora_add", "add", base, scaled, out_itemsize=FP32)
        return b.op(f"{path}.lora_result_cast", "cast", out, out_itemsize=S.dtype_bytes)
    return linear


def moe_train(linear):
    """The vendor's training MoE path for one layer (SPEC section 7), over all routed experts."""
    def block(b: ScopeBuilder, h: Tensor, p: str, cfg: LMConfig, tokens, batch) -> Tensor:
        hid, k, inter, e = cfg.hidden, cfg.experts_per_token, cfg.moe_intermediate, cfg.routed_experts
        rows = batch * tokens
        flat = b.op(f"{p}.flatten", "reshape", h, shape=(rows, hid))
        r = b.op(f"{p}.gate.cast", "cast", flat, out_itemsize=FP32)
        logits = b.op(f"{p}.gate", "linear", r, in_features=hid, out_features=e, bias=False, weight_itemsize=FP32)
        scores = b.op(f"{p}.gate.softmax", "softmax_fp32", logits, out_itemsize=FP32)
        top = b.op(f"{p}.gate.topk", "router_topk", scores, k=k)
        top = b.op(f"{p}.gate.scaling", "scalar_mul", top)
        aux = b.op(f"{p}.gate.aux_loss", "aux_loss", scores, top, experts=e, k=k, batch=batch)
        x = b.op(f"{p}.experts.repeat_interleave", "moe_repeat", flat, k=k)
        x = b.op(f"{p}.experts.rows", "expert_rows", x, top, experts=e)
        routed = (e, k)
        gate = linear(b, f"{p}.experts.gate_proj", x, in_features=hid, out_features=inter, routed=routed)
        act = b.op(f"{p}.experts.act_fn", "silu", gate)
        up = linear(b, f"{p}.experts.up_proj", x, in_features=hid, out_features=inter, routed=routed)
        m = b.op(f"{p}.experts.mul", "mul", act, up)
        out = linear(b, f"{p}.experts.down_proj", m, in_features=inter, out_features=hid, routed=routed)
        y = b.op(f"{p}.experts.write_back", "expert_scatter", out, top, experts=e)
        y = b.op(f"{p}.experts.weighted_sum", "weighted_sum", y, top, k=k, out_itemsize=S.dtype_bytes)
        y = b.op(f"{p}.experts.add_aux_loss", "attach_loss", y, aux)
        y = b.op(f"{p}.experts.unflatten", "reshape", y, shape=(batch, tokens, hid))
        shared = decoder.swiglu(b, h, f"{p}.shared_experts", hid, cfg.shared_intermediate, linear=linear)
        return b.op(f"{p}.add_shared", "add", y, shared)
    return block


def forward(b: ScopeBuilder, cfg: LMConfig, v: Variants, *, tokens, batch, image: Tensor, slots, moe_block=moe_train,
            scatter: str = "masked_scatter_") -> Tensor:
    """One training forward of B sequences; returns the loss node. `moe_block(linear)`: the MoE layer's
    builder (default: the vendor's training path); `scatter`: the op kind writing the image features
    over their slots (a model built on these blocks gives its own)."""
    hid = cfg.hidden
    linear = lora_linear(v.lora_rank, _lora_targets(v))
    ids = b.input("input_ids", (batch, tokens), itemsize=INDEX)
    x = b.op("embed_tokens", "embedding", ids, num_embeddings=cfg.vocab, embedding_dim=hid,
             out_itemsize=S.dtype_bytes)
    feats = b.op("image_features", "reshape", image, shape=(batch * slots, hid))   # the pages' slots, in order
    x = b.op("image_scatter", scatter, x, feats)
    pos = b.op("position_ids", "position_ids", tokens=tokens, out_itemsize=INDEX)
    mask = None
    if v.attention == "eager":
        mask = b.op("attention_mask", "causal_mask", pos, keys=tokens, out_itemsize=S.dtype_bytes, batch=batch)
    tables = None
    if v.rope == "once":
        tables = b.op("rotary_emb", "rope_tables", pos, head_dim=cfg.head_dim, matmul=False,
                      out_itemsize=S.dtype_bytes)
    block = moe_block(linear)
    for i, kind in enumerate(cfg.mlp_layer_types):
        x = decoder.layer(b, x, i, kind, cfg, v, tokens=tokens, past=0, pos=pos, mask=mask, tables=tables,
                          hits=None, batch=batch, cache=False, moe_block=block, linear=linear)
    x = b.op("norm", "rms_norm", x, eps=cfg.rms_norm_eps)
    logits = b.op("lm_head", "linear", x, in_features=hid, out_features=cfg.vocab, bias=False)
    logits = b.op("loss.cast", "cast", logits, out_itemsize=FP32)
    logp = b.op("loss.log_softmax", "log_softmax", logits)
    return b.op("loss.nll", "nll_loss", logp)


def trains(v: Variants):
    """The `trains(node)` predicate of a setting (see the module docstring); the setting that freezes SAM
    alone (here `lm+clip+projector`; a model built on these blocks names its own) trains the rest."""
    def lm(node):
        return node.startswith("decoder.")

    rules = {
        "lm": lm,
        "full": lambda node: True,
        "lora": lambda node: node.endswith((".lora_A", ".lora_B")),
    }
    return rules.get(v.train, lambda node: lm(node) or (node.startswith("vision.") and ".sam." not in node))


def layer_segment(node: str) -> str | None:
    """Checkpointing per decoder layer: the layer a forward node belongs to."""
    parts = node.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return ".".join(parts[:3])
    return None


@lru_cache(maxsize=None)
def train_graph(crop_mode: bool = True, variants: Variants = Variants(phase="train"), cfg: LMConfig = LM
                ) -> tuple[CostGraph, autodiff.Step]:
    """The training step's graph (symbolic in the layout, text_tokens, batch and dtype) and what trained."""
    if variants.phase != "train":
        raise ValueError("train_graph needs phase='train'")
    if ATTENTION[variants.attention] == "none":
        raise ValueError("a training step cannot leave the attention uncounted (--attention eager|flash)")
    g = CostGraph("deepseek-ocr.train", params={"crop_mode": crop_mode, **variants.as_dict()})
    image = assembly._add_vision(g, crop_mode, pages=S.batch)
    tokens = sequence_length(crop_mode)
    loss = forward(g.scope("decoder", doc="one language-model forward over B training sequences, and the loss"),
                   cfg, variants, tokens=tokens, batch=S.batch, image=image, slots=decoder.image_slots(crop_mode))
    return g, add_step(g, loss.node, variants, trains(variants))


def add_step(g: CostGraph, loss: str, variants: Variants, trains_node) -> autodiff.Step:
    """The rest of a step after the forward (scopes `vision...` and `decoder` ending in `loss`): the
    backward of what trains, the recomputed layers under checkpointing, the optimizer update."""
    grads = autodiff.mirror_scopes(g, tuple(s for s in ("vision", "vision.global", "vision.crops", "decoder")
                                            if s in g.scopes), "backward", "gradients of")
    recompute = autodiff.mirror_scopes(g, ("decoder",), "recompute", "checkpointed forward again before the "
                                                                     "backward of") \
        if variants.checkpointing == "layer" else {}
    step = autodiff.add_backward(g, loss, grads, trains_node,
                                 layer_segment if variants.checkpointing == "layer" else (lambda n: None), recompute)
    g.scope("optimizer", doc=f"one {variants.optimizer} update per trained parameter")
    autodiff.add_optimizer(g, "optimizer", step.trained, variants.optimizer)
    if "recompute" not in g.scopes:
        g.scope("recompute", doc="checkpointing off: nothing recomputed")
    return step


@lru_cache(maxsize=None)
def formula(mode, scope: str, metric: str, variants: Variants) -> sp.Expr:
    """Total of `metric` over a scope of the training step (a composite: the sum of its parts); the
    mode's sizes substituted (all symbolic without a mode)."""
    if scope in COMPOSITE:
        return sp.Add(*[formula(mode, s, metric, variants) for s in COMPOSITE[scope]])
    crop_mode = True if mode is None else mode.crop_mode
    g = train_graph(crop_mode, variants)[0]
    if scope not in g.scopes:
        raise ValueError(f"unknown scope {scope!r} for a training step (choose from {', '.join(scopes_for(mode))})")
    expr = g.total(scope)[metric]
    return expr.subs(assembly.mode_values(mode)) if mode is not None else expr


def scopes_for(mode) -> tuple[str, ...]:
    if mode is not None and not mode.crop_mode:
        return tuple(s for s in SCOPES if "crops" not in s)
    return SCOPES
