"""The training graph against the training reference, node by node: forward and backward FLOPs of
every node, per scope totals, trainable parameters, and the peak memory of a step.

Runs (`costgraph.verify.train_reference` builds the reference, `costgraph.verify.backward` attributes
every op, the backward's included, to the forward call that created it):
- the language model on CPU (random weights; the router depends on the data): `loss.backward()`
  over B sequences of 1 + image slots + text tokens, the image slots a leaf that requires grad
  when vision trains (the LM's masked_scatter backward then computes their gradient);
- the vision encoder on `meta` (counts only, as in inference) for each of the B pages: forward
  under no_grad when vision does not train (`lm`, `lora`), else forward and a backward seeded with a
  gradient for the image slots (what the LM hands back), SAM's parameters frozen for
  `lm+clip+projector`. A meta run takes the fused SDPA kernel the vendor runs (`backward.VendorSdpaOnMeta`: the
  memory-efficient kernel for SAM's rel-pos mask when SAM trains).

Mapping: a graph node `backward.X` is the gradient of forward node X: its claims are X's (the same
reference module, torch call and call occurrence), selected among the backward ops. Vision claims
are `costgraph.verify.mapping`'s; LM claims are `LM_RULES` below (the inference rules of
`lm_profile` with the training MoE's per-expert modules; LoRA: the base projection runs in
`<target>.base_layer`, the adapters in `<target>.lora_A.default` / `.lora_B.default`). Every
measured op with FLOPs in a compared section must be claimed; a node measured 0 fails.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from costgraph import symbols as S
from costgraph.graphs.deepseek_ocr import assembly, training as train_graph_mod
from costgraph.graphs.deepseek_ocr.config import LM, LMConfig, Mode
from costgraph.graphs.deepseek_ocr.decoder import Variants
from costgraph.graphs.deepseek_ocr.layout import Layout, tokens_for
from .backward import ACCUMULATE, BACKWARD, FORWARD, SEED, Step, counting
from .compare import Comparison, Row
from .lm_profile import EVEN, ODD
from .mapping import claims_for as vision_claims_for
from .profile import COMPUTE_OP
from .train_reference import (apply_setting, build_training_lm, lm_batch, sam_trains, set_vision_trainable,
                              trainable_parameters, vision_trains)

ALL = "all"
_L = r"model\.layers\.{0}"

# (node path within the decoder scope, module regex template, torch call, occurrence or ALL): FLOPs.
LM_RULES: list[tuple[str, str, str, object]] = [
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj", _L + r"\.self_attn\.{1}_proj", "linear", ALL),
    (r"layers\.(\d+)\.self_attn\.rotary_emb", _L + r"\.self_attn\.rotary_emb", "matmul", ALL),
    (r"layers\.(\d+)\.self_attn\.scores", _L + r"\.self_attn", "matmul", 0),
    (r"layers\.(\d+)\.self_attn\.probs_values", _L + r"\.self_attn", "matmul", 1),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)", _L + r"\.mlp\.{1}", "linear", ALL),
    (r"layers\.(\d+)\.mlp\.gate", _L + r"\.mlp\.gate", "linear", ALL),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", _L + r"\.mlp\.experts\.\d+\.{1}", "linear", ALL),
    (r"layers\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)", _L + r"\.mlp\.shared_experts\.{1}",
     "linear", ALL),
    (r"lm_head", "lm_head", "linear", ALL),
]
_LM_RULES = [(re.compile(p), m, c, o) for p, m, c, o in LM_RULES]
LORA_PARTS = {"lora_A": r"\.lora_A\.default", "lora_B": r"\.lora_B\.default"}


@dataclass(frozen=True)
class Claim:
    module: str        # a regex, fullmatched against the op's module path
    call: str
    occurrence: object = ALL

    def matches(self, module: str, call: str, occurrence: int) -> bool:
        return (call == self.call and _which(self.occurrence, occurrence)
                and re.fullmatch(self.module, module) is not None)

    def __str__(self) -> str:
        occ = "" if self.occurrence == ALL else f" #{self.occurrence}"
        return f"{self.module.replace(chr(92), '')} [{self.call}{occ}]"


def _which(which, occurrence: int) -> bool:
    """A claim's occurrence: ALL, one index, or (`lm_profile`'s) EVEN / ODD calls (alternating calls of one
    module: the eager experts loop's gate_up and down projections)."""
    if which in (ALL, occurrence):
        return True
    return (which == EVEN and occurrence % 2 == 0) or (which == ODD and occurrence % 2 == 1)


def lm_claim(path: str, lora: bool) -> Claim:
    """The reference ops of a decoder node (by its path), LoRA-aware: `lora` tells whether the node's
    projection carries adapters (its base then runs in `base_layer`)."""
    base, _, part = path.rpartition(".")
    if part in LORA_PARTS:
        c = lm_claim(base, False)
        return Claim(c.module + LORA_PARTS[part], c.call, c.occurrence)
    hits = [(m, t, c, o) for rx, t, c, o in _LM_RULES if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"decoder node path {path!r} matches {len(hits)} training mapping rules (need exactly 1)")
    m, template, call, occ = hits[0]
    module = template.format(*m.groups())
    return Claim(module + (r"\.base_layer" if lora else ""), call, occ)


def vision_claims(path: str) -> tuple[Claim, ...]:
    return tuple(Claim(re.escape(c.module), c.call) for c in vision_claims_for(path))


# ---- running the reference ---------------------------------------------------------------------------

def run_lm(model, v: Variants, batch: int, text_tokens: int, slots: int, metrics: bool = False,
           seed: int = 0) -> tuple[Step, dict]:
    """One training step of the LM reference (forward, loss, backward) counted op by op."""
    cfg = model.cfg
    tokens = 1 + slots + text_tokens
    ids, mask = lm_batch(cfg, batch, tokens, slots, seed)
    dtype = model.lm_head.weight.dtype
    gen = torch.Generator().manual_seed(seed + 1)
    feats = (torch.randn(batch, slots, cfg.hidden, generator=gen) * 0.02).to(dtype)
    feats.requires_grad_(vision_trains(v))
    t = time.perf_counter()
    with counting(metrics) as (att, step), att.in_section("decoder"):
        loss = model(ids, mask, feats)
        t_fwd = time.perf_counter() - t
        with att.backward():
            loss.backward()
    info = {"tokens_per_sequence": tokens, "batch": batch, "loss": round(float(loss.detach()), 4),
            "forward_seconds": round(t_fwd, 3), "step_seconds": round(time.perf_counter() - t, 3),
            "image_slots_grad": feats.grad is not None}
    return step, info


def run_vision_meta(views, v: Variants, pages: int = 1) -> Step:
    """The vision reference on `meta` for `pages` pages: forward (no_grad unless vision trains) and,
    when vision trains, a backward seeded with a gradient for the image slots."""
    from .runner import meta_page_reference

    page = meta_page_reference()
    set_vision_trainable(page, v)
    grad = vision_trains(v)
    try:
        with counting() as (att, step):
            def encode(scope, model, x):
                with att.in_section(scope):
                    return model.encoder(x)

            for _ in range(pages):
                with att.in_section("vision"), torch.set_grad_enabled(grad):
                    seq = page(views.global_view, views.crops, views.grid, encode=encode)
                if grad:
                    with att.in_section("vision"), att.backward():
                        seq.backward(torch.empty_like(seq))
    finally:
        for p in page.parameters():
            p.requires_grad_(True)
            p.grad = None
    return step


# ---- comparing -------------------------------------------------------------------------------------

def _values(mode: Mode, layout: Layout, text_tokens: int, batch: int, dtype_bytes: int) -> dict:
    return {**assembly.mode_values(mode), **assembly.layout_values(layout), S.text_tokens: text_tokens,
            S.batch: batch, S.dtype_bytes: dtype_bytes}


_VALUES: dict = {}


def _value(expr, values: dict) -> int:
    """An expression at one point (structural replacement: the sizes are numbers; memoised, since
    every layer repeats its nodes' expressions)."""
    import sympy as sp
    key = (expr, tuple(sorted((str(k), v) for k, v in values.items())))
    if key not in _VALUES:
        _VALUES[key] = int(sp.sympify(expr).xreplace({k: sp.Integer(v) for k, v in values.items()}))
    return _VALUES[key]


def compare_flops(graph, values: dict, step: Step, scopes: tuple[str, ...], claims_of) -> tuple[list[Row], list]:
    """Rows per node with FLOPs in `scopes` (forward and backward), and the FLOP ops no node claims."""
    by_section: dict[str, list] = defaultdict(list)
    for op in step.flops:
        if op.flops:
            by_section[op.section].append(op)
    claimed: set[int] = set()
    rows = []
    for scope in scopes:
        for node in graph.nodes(scope):
            if graph.g.nodes[node]["scope"] != scope:
                continue
            predicted = _value(graph.effective_cost(node).flops, values)
            if predicted == 0:
                continue
            claims = claims_of(graph, node)
            got = 0
            for op in by_section[scope]:
                tag = op.where.tag
                if any(c.matches(tag.module, tag.call, tag.occurrence) for c in claims):
                    got += op.flops
                    claimed.add(id(op))
            rows.append(Row(node, "flops", predicted, got, "; ".join(map(str, claims))))
    unclaimed = [(f"{op.section}:{op.module or '<root>'}", f"{op.where.tag.call}#{op.where.tag.occurrence}/{op.op}",
                  op.flops) for s in scopes for op in by_section[s] if id(op) not in claimed]
    return rows, unclaimed


def scope_rows(graph, values: dict, step: Step, scopes: tuple[str, ...]) -> list[Row]:
    out = []
    for scope in scopes:
        if scope not in graph.scopes:
            continue
        got = sum(op.flops for op in step.flops if op.section == scope or op.section.startswith(scope + "."))
        out.append(Row(scope, "flops", _value(graph.total(scope).flops, values), got, "all counted ops"))
    return out


def _lm_claims(graph, node: str) -> tuple[Claim, ...]:
    path = graph.g.nodes[node]["path"]
    return (lm_claim(path, f"{node}.lora_A" in graph.g or _forward_of(node) + ".lora_A" in graph.g),)


def _forward_of(node: str) -> str:
    return node[len("backward."):] if node.startswith("backward.") else node


def _vision_claims(graph, node: str) -> tuple[Claim, ...]:
    return vision_claims(graph.g.nodes[node]["path"])


def blind(step: Step) -> list[str]:
    return sorted({f"{w.section}:{w.tag.module} {op}" for w, op in step.uncounted if COMPUTE_OP.fullmatch(op)})


# ---- one verification --------------------------------------------------------------------------------

@dataclass
class TrainRequest:
    mode: Mode
    layout: Layout
    variants: Variants
    text_tokens: int = 10
    batch: int = 1
    cfg: LMConfig = LM
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    scopes: tuple[str, ...] = ("vision", "decoder")   # which parts run: vision (meta), decoder (CPU LM)
    extra: dict = field(default_factory=dict)


def train_graph(req: TrainRequest):
    return train_graph_mod.train_graph(req.mode.crop_mode, req.variants, req.cfg)[0]


def verify_decoder(req: TrainRequest, model=None, metrics: tuple[str, ...] = ("flops",)) -> Comparison:
    """FLOPs node by node; with elementwise_flops / bytes_read / bytes_written in `metrics`, those per
    reference module too (`costgraph.verify.train_metrics`)."""
    from .train_metrics import METRICS, compare_metrics

    other = tuple(m for m in metrics if m in METRICS)
    graph = train_graph(req)
    slots = tokens_for(req.layout, req.mode)["total"]
    if model is None:
        model = build_training_lm(req.cfg, req.dtype, rope=req.variants.rope, seed=req.seed)
        apply_setting(model, req.variants)
    step, info = run_lm(model, req.variants, req.batch, req.text_tokens, slots, metrics=bool(other), seed=req.seed)
    values = _values(req.mode, req.layout, req.text_tokens, req.batch, torch.tensor([], dtype=req.dtype).element_size())
    scopes = ("decoder", "backward.decoder")
    rows, unclaimed = compare_flops(graph, values, step, scopes, _lm_claims)
    subtotals = scope_rows(graph, values, step, scopes)
    if other:
        lora_of = lambda node: f"{node}.lora_A" in graph.g or _forward_of(node) + ".lora_A" in graph.g
        r, t, u = compare_metrics(graph, values, step, scopes, other, _value, lora_of)
        rows += r
        subtotals += t
        unclaimed += u
    info.update(trainable_parameters=trainable_parameters(model), variants=req.variants.as_dict(),
                seeds=[f"{o.section}:{o.op}" for o in step.flops if o.where.kind == SEED],
                per_module=per_module_rows(step))
    title = f"train {req.variants.train} decoder: {req.mode.name} B={req.batch} L={info['tokens_per_sequence']}"
    return Comparison(title, rows, subtotals, unclaimed, blind(step), info)


def verify_vision(req: TrainRequest, views=None) -> Comparison:
    from .preprocess import meta_views

    graph = train_graph(req)
    views = views if views is not None else meta_views(req.mode, req.layout)
    t = time.perf_counter()
    step = run_vision_meta(views, req.variants, req.batch)
    values = _values(req.mode, req.layout, req.text_tokens, req.batch, 4)
    scopes = tuple(s for s in ("vision.global", "vision.crops", "backward.vision.global", "backward.vision.crops")
                   if s in graph.scopes)
    rows, unclaimed = compare_flops(graph, values, step, scopes, _vision_claims)
    subtotals = scope_rows(graph, values, step, ("vision", "backward.vision") + scopes)
    info = {"device": "meta", "seconds": round(time.perf_counter() - t, 3), "pages": req.batch,
            "variants": req.variants.as_dict(), "per_module": per_module_rows(step)}
    title = f"train {req.variants.train} vision: {req.mode.name} {req.layout.width}x{req.layout.height}"
    return Comparison(title, rows, subtotals, unclaimed, blind(step), info)


# ---- per module, per aten op: what the reference ran ---------------------------------------------------

def per_module_rows(step: Step) -> list[list]:
    """`module_table` as rows [section, module, aten op, calls, FLOPs], ops with FLOPs only (JSON)."""
    return [[sec, mod, op, v["calls"], v["flops"]] for (sec, mod, op), v in sorted(module_table(step).items())
            if v["flops"]]


def module_table(step: Step) -> dict[tuple[str, str, str], dict[str, int]]:
    """(section, module, aten op) -> FLOPs, forward and backward sections apart (a backward op under
    the module whose forward created its autograd node)."""
    out: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: {"calls": 0, "flops": 0})
    for op in step.flops:
        slot = out[(op.section, op.module, op.op)]
        slot["calls"] += 1
        slot["flops"] += op.flops
    return dict(out)


# ---- measured training memory ------------------------------------------------------------------------

class StepLiveBytes:
    """`costgraph.verify.memory.LiveBytes` over a forward + backward, with a timeline: live bytes of op
    outputs after every op (a tensor saved for backward stays alive until its gradient op has run and
    the engine releases it), and which allocations end up as parameter gradients (`.grad`), so the
    peak can be split into activations and gradients."""

    def __init__(self):
        from .memory import LiveBytes

        self.rec = LiveBytes()
        self.timeline: list[int] = []                 # live bytes after each op
        self.allocs: list[tuple[int, int, int]] = []  # (op index, storage key, bytes)
        self.backward_from = 0                        # op index where the backward began
        rec, timeline, allocs = self.rec, self.timeline, self.allocs
        dispatch = type(rec).__torch_dispatch__

        def tracked(mode, func, types, args=(), kwargs=None):
            before = set(rec.live)
            out = dispatch(mode, func, types, args, kwargs)
            for key in rec.live.keys() - before:
                allocs.append((len(timeline), key, rec.live[key]))
            timeline.append(rec.current)
            return out

        rec.__torch_dispatch__ = tracked.__get__(rec)

    def split(self, params) -> dict:
        """Peak of live op outputs, with and without the parameter gradients made so far."""
        grad_keys = {id(p.grad.untyped_storage()) for p in params if p.grad is not None}
        last: dict[int, tuple[int, int]] = {}
        for i, key, n in self.allocs:
            last[key] = (i, n)
        grad_at = sorted((i, n) for key, (i, n) in last.items() if key in grad_keys)
        grads_so_far, j, best, best_i = 0, 0, 0, 0
        for i, live in enumerate(self.timeline):
            while j < len(grad_at) and grad_at[j][0] <= i:
                grads_so_far += grad_at[j][1]
                j += 1
            if live - grads_so_far > best:
                best, best_i = live - grads_so_far, i
        peak_i = max(range(len(self.timeline)), key=self.timeline.__getitem__) if self.timeline else 0
        return {"peak_bytes": self.rec.peak, "peak_in": "backward" if peak_i >= self.backward_from else "forward",
                "activations_peak_bytes": best,
                "activations_peak_in": "backward" if best_i >= self.backward_from else "forward",
                "gradient_bytes": sum(n for _, n in grad_at), "ops": len(self.timeline)}


def measure_lm_memory(model, v: Variants, batch: int, text_tokens: int, slots: int, seed: int = 0) -> dict:
    """Live bytes of op outputs over one training step of the LM reference on CPU (weights and inputs
    are not op outputs: not counted, as in the graph's liveness)."""
    cfg = model.cfg
    ids, mask = lm_batch(cfg, batch, 1 + slots + text_tokens, slots, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    feats = (torch.randn(batch, slots, cfg.hidden, generator=gen) * 0.02).to(model.lm_head.weight.dtype)
    feats.requires_grad_(vision_trains(v))
    for p in model.parameters():
        p.grad = None
    m = StepLiveBytes()
    with m.rec:
        loss = model(ids, mask, feats)
        m.backward_from = len(m.timeline)
        loss.backward()
        del loss
    out = m.split(list(model.parameters()))
    for p in model.parameters():
        p.grad = None
    return out


def predicted_peak(graph, values: dict, scopes: tuple[str, ...] = ("decoder", "backward.decoder")) -> dict:
    """The graph's liveness pass over `scopes` (one pass, build order): peak bytes and the node then."""
    from costgraph import liveness

    peak = liveness.liveness(graph, scopes)
    names = {(k.name if hasattr(k, "name") else k): v for k, v in values.items()}
    return peak.at({k: names[k] for k in peak.args})


def lm_memory_rows(req: TrainRequest, model) -> dict:
    """Measured (CPU) against predicted (the graph's liveness) peak memory of the LM's step."""
    slots = tokens_for(req.layout, req.mode)["total"]
    measured = measure_lm_memory(model, req.variants, req.batch, req.text_tokens, slots, req.seed)
    values = _values(req.mode, req.layout, req.text_tokens, req.batch,
                     torch.tensor([], dtype=model.lm_head.weight.dtype).element_size())
    predicted = predicted_peak(train_graph(req), values)
    return {"measured": measured, "predicted": predicted,
            "ratio": measured["peak_bytes"] / predicted["bytes"] if predicted["bytes"] else None,
            "activations_ratio": measured["activations_peak_bytes"] / predicted["bytes"] if predicted["bytes"] else None}
