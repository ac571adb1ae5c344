"""DeepSeek-OCR 2's training step (`costgraph.graphs.deepseek_ocr2.training`) against its ground truth, node by node:
`transformers`' `DeepseekOcr2ForConditionalGeneration` itself in train mode (dropout 0 as configured), `labels`
given (the input ids, the image slots -100), `loss.backward()`, the setting applied to the model's own
parameters (`requires_grad` off on the frozen parts; LoRA by peft's `LoraConfig` with `target_modules` a regex
restricted to the language model's q/k/v/o and gate/up/down Linear modules, attention, dense MLP and shared
experts: the routed experts are 3-D parameters, no Linear modules), eager attention in the language model,
eager experts (`costgraph.verify.deepseek_ocr2.reference_config`).

Two runs of the one model class, apart as in DeepSeek-OCR's training verification (`costgraph.verify.training`):
- vision on `meta` (FLOPs only): `get_image_features` for B pages (the B global views one batch, the B x w x h
  crops another) and the concatenation `forward()` makes of the pages' lists (`deepseek_ocr2.VisionPart`),
  labelled global / crops / assembly by `deepseek_ocr2.Labels`; when vision trains, a backward seeded with a
  gradient for the image slots (what the language model's masked_scatter hands back). A meta run takes the
  fused SDPA kernel the vendor runs (`backward.VendorSdpaOnMeta`);
- the language model on CPU (`build_reference(parts=LANGUAGE_MODEL)`: the vision tower stays on meta): the
  model's forward with the image features given (`mm_encoder_outputs`, a leaf that requires grad when vision
  trains), the loss, `loss.backward()`. The features' concatenation (vision's, in the graph) is labelled
  `vision` (from the embedding's return to `get_placeholder_mask`) and left out.

Every op, backward ops included, is attributed to the forward module and torch call that created it
(`costgraph.verify.backward`). Claims: vision nodes by `deepseek_ocr2.FLOP_RULES`, decoder nodes by
`lm_profile.RULES` (the eager experts' alternating gate_up / down calls) with the language model's paths
(`model.language_model.X`) and peft's (`<target>.base_layer`, `.lora_A.default`, `.lora_B.default`); a node
`backward.X` claims X's module and call among the backward ops. Every measured op with FLOPs must be claimed; a
node measured 0 fails. Trainable parameters of the reference against the graph's trained nodes' weights.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from costgraph import autodiff
from costgraph.graphs.deepseek_ocr.config import LMConfig
from costgraph.graphs.deepseek_ocr2 import layout as L, symbols as S, training as train_graph_mod
from costgraph.graphs.deepseek_ocr2.config import LM, VISION, VisionConfig
from costgraph.graphs.deepseek_ocr2.decoder import Variants
from . import deepseek_ocr2 as V
from .backward import SEED, Step, counting
from .compare import Comparison, Row
from .lm_profile import claims_for as lm_claims_for
from .training import LORA_PARTS, Claim, _forward_of, _value, blind, compare_flops, per_module_rows, scope_rows
from .train_reference import apply_lora

VISION_PARTS = ("model.vision_tower", "model.multi_modal_projector", "model.view_separator")
SAM = "model.vision_tower.sam_encoder"
LM_SCOPES = ("decoder", "backward.decoder")
VISION_SCOPES = ("vision", "vision.global", "vision.crops", "backward.vision", "backward.vision.global",
                 "backward.vision.crops")


# ---- the settings --------------------------------------------------------------------------------------

def vision_trains(v: Variants) -> bool:
    return v.train in ("full", "lm+encoder+projector")


def sam_trains(v: Variants) -> bool:
    return v.train == "full"


def lora_regex(v: Variants) -> str:
    """peft's `target_modules` (a regex, fullmatched against module paths): the setting's targets among the
    language model's Linear modules (q,k,v,o -> `self_attn.X_proj`; gate,up,down -> the dense MLP's and the
    shared experts' `X_proj`)."""
    targets = v.lora_targets.split(",")
    attn = [t for t in targets if t in ("q", "k", "v", "o")]
    mlp = [t for t in targets if t in ("gate", "up", "down")]
    alts = ([rf"self_attn\.({'|'.join(attn)})_proj"] if attn else []) + \
        ([rf"mlp\.(shared_experts\.)?({'|'.join(mlp)})_proj"] if mlp else [])
    return rf"model\.language_model\.layers\.\d+\.({'|'.join(alts)})"


def apply_setting(model, v: Variants) -> None:
    """requires_grad of every parameter per the setting, and peft's LoRA for `lora`, in place."""
    for name, p in model.named_parameters():
        if name.startswith(VISION_PARTS):
            p.requires_grad_(sam_trains(v) if name.startswith(SAM) else vision_trains(v))
        else:
            p.requires_grad_(v.train != "lora")
    if v.train == "lora":
        apply_lora(model, v, lora_regex(v))
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- claims ----------------------------------------------------------------------------------------------

def _lm_module(module: str) -> str:
    """`lm_profile`'s module path (`model.X`, relative to its LanguageModel) as this model names it."""
    return "model.language_model" + module[len("model"):] if module == "model" or module.startswith("model.") \
        else module


def lm_claims(path: str, lora: bool) -> tuple[Claim, ...]:
    """A decoder node's reference ops: `lm_profile`'s rules with this model's paths, LoRA-aware (`lora`: the
    node's projection carries adapters, its base then runs in `base_layer`)."""
    base, _, part = path.rpartition(".")
    if part in LORA_PARTS:
        return tuple(Claim(c.module + LORA_PARTS[part], c.call, c.occurrence) for c in lm_claims(base, False))
    return tuple(Claim(re.escape(_lm_module(m)) + (r"\.base_layer" if lora else ""), call, which)
                 for m, call, which in lm_claims_for(path))


def _lm_claims_of(graph, node: str) -> tuple[Claim, ...]:
    lora = f"{node}.lora_A" in graph.g or _forward_of(node) + ".lora_A" in graph.g
    return lm_claims(graph.g.nodes[node]["path"], lora)


def _vision_claims_of(graph, node: str) -> tuple[Claim, ...]:
    return tuple(Claim(re.escape(m), call) for m, call in V._rule(V.FLOP_RULES, graph.g.nodes[node]["path"]))


def metric_module(path: str, lora: bool = False) -> str:
    """The reference module a decoder node runs in (elementwise FLOPs and bytes, per module): `lm_profile`'s
    inference rules with this model's paths; the image features' merge in `DeepseekOcr2Model` ("model"), the loss
    in the root's forward (""), LoRA's parts as `train_metrics` places them."""
    from .lm_profile import module_for
    from .train_metrics import LORA_OWN, LORA_PARTS as PARTS

    base, _, part = path.rpartition(".")
    if part in PARTS:
        return metric_module(base) + PARTS[part]
    if part in LORA_OWN:
        return metric_module(base)
    if path.startswith("loss."):
        return ""
    if path == "packed_sequence_check":
        return "model.language_model"
    if path in ("image_features", "image_scatter"):
        return "model"
    if m := re.fullmatch(r"layers\.(\d+)\.mlp\.flatten", path):   # the MoE's view of its input (a gradient sum)
        return f"model.language_model.layers.{m.group(1)}.post_attention_layernorm"
    return _lm_module(module_for(path)) + (".base_layer" if lora else "")


# ---- the request and the graph ----------------------------------------------------------------------------

@dataclass
class TrainRequest:
    layout: L.Layout
    variants: Variants
    text_tokens: int = 10
    batch: int = 1
    lm: LMConfig = LM
    vision: VisionConfig = VISION
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return L.tokens_for(self.layout, V.MODE)["total"]


def train_graph(req: TrainRequest):
    """The step's graph with the experts each MoE layer runs kept free (`S.experts_hit`)."""
    return train_graph_mod.train_graph(req.variants, req.lm, req.vision, S.experts_hit)


def experts_bound(req: TrainRequest) -> int:
    """The graph's prediction of the experts a layer runs: every one a micro-batch's rows can reach."""
    return int(train_graph_mod.blocks.experts_hit_bound(req.lm, req.batch * (1 + req.text_tokens + req.slots)))


def values(req: TrainRequest, dtype_bytes: int | None = None) -> dict:
    """The request's values, the experts each layer runs at the bound (FLOPs and parameters do not depend on
    them; `verify_decoder` substitutes each layer's own count for the other metrics)."""
    b = dtype_bytes if dtype_bytes is not None else torch.tensor([], dtype=req.dtype).element_size()
    return {**V._values(req.layout, b, req.text_tokens), S.batch: req.batch, S.experts_hit: experts_bound(req)}


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_values(vals: dict, hits: dict[str, int]):
    """A node's values: its MoE layer's experts as the routers ran them (`hits`: layer -> count)."""
    def of(node: str) -> dict:
        m = _LAYER.search(node)
        return {**vals, S.experts_hit: hits[m.group(1)]} if m and m.group(1) in hits else vals
    return of


def params_row(req: TrainRequest, model) -> Row:
    """Trainable parameters: the reference's (requires_grad) against the graph's trained nodes' weights."""
    graph, step = train_graph(req)
    predicted = _value(autodiff.trained_weights(graph, step.trained).params, values(req))
    return Row("trainable_parameters", "params", predicted, trainable_parameters(model),
               f"reference parameters with requires_grad ({req.variants.train})")


# ---- the runs ----------------------------------------------------------------------------------------------

class _Section:
    """A `deepseek_ocr2.Labels` recorder that labels the attribution's section."""

    def __init__(self, att):
        self.att = att

    @property
    def scope(self) -> str:
        return self.att.section

    @scope.setter
    def scope(self, name: str) -> None:
        self.att.section = name


def lm_inputs(req: TrainRequest):
    """B prompts ([BOS] + image slots + text), their labels (the image slots -100), the image features."""
    ids = torch.cat([V.prompt_ids(req.layout, req.text_tokens, req.seed + b, req.lm) for b in range(req.batch)])
    labels = ids.masked_fill(ids == V.image_token_id(req.lm), -100)
    gen = torch.Generator().manual_seed(req.seed + 1)
    feats = (torch.randn(req.batch * req.slots, req.lm.hidden, generator=gen) * 0.02).to(req.dtype)
    return ids, labels, feats.requires_grad_(vision_trains(req.variants))


def run_lm(model, req: TrainRequest, metrics: bool = False) -> tuple[Step, dict]:
    """One training step of the model's language-model part on CPU (forward with the image features given,
    the loss, backward), counted op by op; the features' concatenation labelled `vision`."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2ModelOutputWithPooling

    ids, labels, feats = lm_inputs(req)
    mm = model.model
    model.train()
    t = time.perf_counter()
    with counting(metrics) as (att, step), V.router_log(mm.language_model.layers) as routes:
        original = mm.get_placeholder_mask

        def placeholder(*args, **kwargs):
            att.section = "decoder"
            return original(*args, **kwargs)

        mm.get_placeholder_mask = placeholder
        hook = mm.language_model.embed_tokens.register_forward_hook(lambda *a: setattr(att, "section", "vision"))
        try:
            att.section = "decoder"
            out = model(input_ids=ids, labels=labels, use_cache=False,
                        mm_encoder_outputs={"image": DeepseekOcr2ModelOutputWithPooling(pooler_output=[feats])})
        finally:
            hook.remove()
            del mm.get_placeholder_mask
        t_fwd = time.perf_counter() - t
        with att.backward():
            out.loss.backward()
        att.section = ""
    hits = {str(layer): int(torch.unique(torch.cat(per)).numel()) for layer, per in routes.items() if per}
    info = {"tokens_per_sequence": ids.shape[1], "batch": req.batch, "loss": round(float(out.loss.detach()), 4),
            "forward_seconds": round(t_fwd, 3), "step_seconds": round(time.perf_counter() - t, 3),
            "image_features_grad": feats.grad is not None, "experts_hit": hits,
            "experts_hit_bound": experts_bound(req)}
    return step, info


def vision_inputs(req: TrainRequest, device: str = "meta"):
    lay, mode = req.layout, V.MODE
    make = lambda *s: torch.empty(*s, device=device, dtype=req.dtype)
    pixels = make(req.batch, 3, mode.base_size, mode.base_size)
    local = make(req.batch * lay.num_crops, 3, mode.image_size, mode.image_size) if lay.tiled else None
    return pixels, local


def run_vision(model, req: TrainRequest) -> Step:
    """The vision part for B pages on meta (the model's requires_grad as set): forward, and when it made an
    autograd graph, a backward seeded with a gradient for the image slots."""
    pixels, local = vision_inputs(req)
    page = V.VisionPart(model.model)
    model.train()
    with counting() as (att, step), V.Labels(model, [_Section(att)]) as labels:
        labels.set("vision")
        seq = page(pixels, local, [req.layout.num_crops] * req.batch if local is not None else None)
        if seq.requires_grad:
            with att.backward():
                seq.backward(torch.empty_like(seq))
        att.section = ""
    return step


# ---- one verification -------------------------------------------------------------------------------------

def _outside(step: Step, scopes: tuple[str, ...]) -> list:
    """Ops with FLOPs outside the compared sections (a check that the split run left nothing uncounted)."""
    return [(f"{o.section}:{o.module or '<root>'}", f"{o.where.tag.call}#{o.where.tag.occurrence}/{o.op}", o.flops)
            for o in step.flops if o.flops and o.section not in scopes]


def verify_decoder(req: TrainRequest, model=None, metrics: tuple[str, ...] = ("flops",)) -> Comparison:
    """The language model's forward, loss and backward on CPU: FLOPs node by node, per scope; trainable
    parameters; with elementwise_flops / bytes_read / bytes_written in `metrics`, those per reference module
    (`costgraph.verify.train_metrics`)."""
    from .train_metrics import METRICS, compare_metrics

    other = tuple(m for m in metrics if m in METRICS)
    graph, _ = train_graph(req)
    if model is None:
        model = V.build_reference("cpu", req.dtype, req.vision, req.lm, req.seed, parts=V.LANGUAGE_MODEL)
        apply_setting(model, req.variants)
    step, info = run_lm(model, req, metrics=bool(other))
    vals = values(req)
    rows, unclaimed = compare_flops(graph, vals, step, LM_SCOPES, _lm_claims_of)
    rows.append(params_row(req, model))
    subtotals = scope_rows(graph, vals, step, LM_SCOPES)
    if other:
        lora_of = lambda node: f"{node}.lora_A" in graph.g or _forward_of(node) + ".lora_A" in graph.g
        r, t, u = compare_metrics(graph, vals, step, LM_SCOPES, other, _value, lora_of, metric_module,
                                  layer_values(vals, info["experts_hit"]))
        rows, subtotals, unclaimed = rows + r, subtotals + t, unclaimed + u
    info.update(seconds=info["step_seconds"], variants=req.variants.as_dict(), device="cpu", dtype=str(req.dtype).replace("torch.", ""),
                trainable_parameters=trainable_parameters(model),
                seeds=[f"{o.section}:{o.op}" for o in step.flops if o.where.kind == SEED],
                per_module=per_module_rows(step))
    title = (f"deepseek-ocr-2 train {req.variants.train} decoder: {req.layout.width}x{req.layout.height} "
             f"B={req.batch} L={info['tokens_per_sequence']}")
    return Comparison(title, rows, subtotals, unclaimed + _outside(step, LM_SCOPES + ("vision", "backward.vision")), blind(step), info)


def verify_vision(req: TrainRequest, model=None) -> Comparison:
    """The vision part on meta: FLOPs node by node (forward, and backward when it trains), per scope;
    trainable parameters (of the whole model, meta)."""
    graph, _ = train_graph(req)
    if model is None:
        model = V.build_reference("meta", req.dtype, req.vision, req.lm)
        apply_setting(model, req.variants)
    t = time.perf_counter()
    step = run_vision(model, req)
    vals = values(req)
    scopes = tuple(s for s in VISION_SCOPES if s in graph.scopes and (req.layout.tiled or "crops" not in s))
    rows, unclaimed = compare_flops(graph, vals, step, scopes, _vision_claims_of)
    rows.append(params_row(req, model))
    info = {"device": "meta", "seconds": round(time.perf_counter() - t, 3), "pages": req.batch,
            "variants": req.variants.as_dict(), "trainable_parameters": trainable_parameters(model),
            "per_module": per_module_rows(step)}
    grid = f"{req.layout.w_crop}x{req.layout.h_crop}" if req.layout.tiled else "no crops"
    title = f"deepseek-ocr-2 train {req.variants.train} vision: {req.layout.width}x{req.layout.height} ({grid})"
    return Comparison(title, rows, scope_rows(graph, vals, step, scopes), unclaimed + _outside(step, scopes),
                      blind(step), info)
