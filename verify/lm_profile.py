"""The language model against its profiled reference, node by node: one prefill and a few decode
forwards with a KV cache (`DynamicCache`), on CPU with random weights (the MoE router depends on
the data, so the LM cannot run on `meta`).

FLOPs: every counted op is logged per call (`CallLog`: the innermost module, the outermost torch
call, the aten op, its FLOPs) so two calls in one module are told apart: the attention's two
matmuls in `self_attn` (scores first, then probabilities x values) and the routed experts'
alternating fused gate_up and down projections (`RULES`: one graph node per claim).

Elementwise FLOPs and bytes (with `metrics`): every aten op of the run is recorded by
`costgraph.verify.dispatch.MetricRecorder` under `costgraph.conventions`, and compared per reference module
(`MODULES`): the nodes that run in one module form one group, predicted = the sum of their costs,
measured = the sum of the module's ops (its own, not its children's). One node per module for
the norms, projections, rotary tables, router parts, embedding, lm_head; several in
`self_attn` (rotary application, cache updates, scores, scale, mask add, softmax with its casts,
probabilities x values, head merge), in `mlp.experts` (the whole eager experts loop), in the
MoE `mlp` (the shared add), in the decoder layer (the two residual adds) and in `model` (position
ids and the causal mask). A recorded op with a non-zero metric in a module no node claims fails.

Routing: the experts loop costs depend on how many distinct experts each MoE layer runs
(`costgraph.symbols.experts_hit`). The graph checked here keeps it a symbol; each prefill layer
is evaluated at the count its router produced (read from the router's top-k indices), a prefill
total at the mean over the MoE layers (costs are linear in it). Decode forwards run exactly k.
The counts and the command line's prediction (`graphs.decoder.experts_hit_bound`) are reported.

KV cache: the bytes the `DynamicCache` holds after each forward against `kv_cache_bytes`.

Predicted values come from the symbolic graph (`graphs.decoder.decoder_graph`, the same builder
the command line's graph uses); the decode total is the closed-form summation at
`output_tokens = steps + 1`, compared with the sum of the measured steps.

The reference's structure decides the variants it can check: attention `eager` only (no CPU
kernel computes only the causal half; `flash` and `uncounted` are accounting variants, tested
against eager in the unit tests); lm_head `all` or `last`; RoPE `vendor` (per-layer tables,
see `costgraph.verify.lm_reference`) or `once` (`transformers` 5.x unchanged).
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp
import torch

from costgraph.dtypes import STORAGE, torch_dtype
from costgraph import symbols as S
from costgraph.evaluate import substitute
from costgraph.graph import CostGraph
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import DEFAULT_DTYPE, DTYPES, LM, LMConfig, Mode
from costgraph.graphs.deepseek_ocr.decoder import Variants, decoder_graph, experts_hit_bound, kv_cache_bytes_per_token
from costgraph.graphs.deepseek_ocr.layout import Layout, tokens_for
from .compare import Comparison, Row
from .dispatch import MetricRecorder
from .profile import COMPUTE_OP, OpCounter
from .lm_reference import LanguageModel, build_language_model, num_parameters

LINEAR, MATMUL = "linear", "matmul"
ALL, EVEN, ODD = "all", "even", "odd"
_L = "model.layers.{0}"

# (node path within a forward, [(reference module template, torch call, which calls)]): FLOPs.
# Which calls: ALL, an index into the module's calls of that torch call, EVEN or ODD.
RULES: list[tuple[str, list[tuple[str, str, object]]]] = [
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj", [(_L + ".self_attn.{1}_proj", LINEAR, ALL)]),
    (r"layers\.(\d+)\.self_attn\.rotary_emb", [(_L + ".self_attn.rotary_emb", MATMUL, ALL)]),
    (r"layers\.(\d+)\.self_attn\.scores", [(_L + ".self_attn", MATMUL, 0)]),
    (r"layers\.(\d+)\.self_attn\.probs_values", [(_L + ".self_attn", MATMUL, 1)]),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)", [(_L + ".mlp.{1}", LINEAR, ALL)]),
    (r"layers\.(\d+)\.mlp\.gate", [(_L + ".mlp.gate", LINEAR, ALL)]),
    (r"layers\.(\d+)\.mlp\.experts\.gate_up_proj", [(_L + ".mlp.experts", LINEAR, EVEN)]),
    (r"layers\.(\d+)\.mlp\.experts\.down_proj", [(_L + ".mlp.experts", LINEAR, ODD)]),
    (r"layers\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
     [(_L + ".mlp.shared_experts.{1}", LINEAR, ALL)]),
    (r"lm_head", [("lm_head", LINEAR, ALL)]),
]
_COMPILED = [(re.compile(p), claims) for p, claims in RULES]

# (node path within a forward, the reference module whose own ops it is part of): the other metrics.
# Module paths are relative to `LanguageModel`: "" is its own forward (the image scatter),
# "<global>" the generation loop around it (the greedy argmax).
# The rules a forward's and a training step's decoder nodes share (train_metrics adds its own to these).
DECODER_MODULES: list[tuple[str, str]] = [
    (r"embed_tokens", "model.embed_tokens"),
    (r"position_ids|attention_mask", "model"),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)", _L + ".{1}"),
    (r"layers\.(\d+)\.self_attn\.(rotary_emb|[qkvo]_proj)", _L + ".self_attn.{1}"),
    (r"layers\.(\d+)\.self_attn\.(?!rotary_emb$|[qkvo]_proj$)\w+", _L + ".self_attn"),
    (r"layers\.(\d+)\.residual_(attn|mlp)", _L),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj|act_fn)", _L + ".mlp.{1}"),
    (r"layers\.(\d+)\.mlp\.(mul|add_shared)", _L + ".mlp"),
    (r"layers\.(\d+)\.mlp\.gate(\.\w+)?", _L + ".mlp.gate"),
    (r"layers\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj|act_fn)", _L + ".mlp.shared_experts.{1}"),
    (r"layers\.(\d+)\.mlp\.shared_experts\.mul", _L + ".mlp.shared_experts"),
    (r"norm", "model.norm"),
    (r"lm_head", "lm_head"),
]
MODULES: list[tuple[str, str]] = DECODER_MODULES + [   # a path must match exactly one rule: order is free
    (r"image_scatter", ""),
    (r"rotary_emb", "model.rotary_emb"),
    (r"layers\.(\d+)\.mlp\.experts\.act_fn", _L + ".mlp.experts.act_fn"),
    (r"layers\.(\d+)\.mlp\.experts\.(?!act_fn$)[\w.]+", _L + ".mlp.experts"),
    (r"next_token", "<global>"),
]
_MODULES = [(re.compile(p), t) for p, t in MODULES]

FLOPS = "flops"
OTHER_METRICS = ("elementwise_flops", "bytes_read", "bytes_written")   # compared per module group
KV_CACHE = "kv_cache_bytes"
CHECKABLE = (FLOPS, *OTHER_METRICS, KV_CACHE)
_ALIASES = {"bytes": ("bytes_read", "bytes_written"), "kv_cache": (KV_CACHE,), "all": CHECKABLE}

Claim = tuple[str, str, object]   # (module, torch call, which)


def claims_for(path: str) -> tuple[Claim, ...]:
    hits = [(m, claims) for rx, claims in _COMPILED if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"decoder node path {path!r} matches {len(hits)} mapping rules (need exactly 1)")
    m, claims = hits[0]
    return tuple((t.format(*m.groups()), call, which) for t, call, which in claims)


def module_for(path: str) -> str:
    """The reference module a node (by its path within a forward) runs in."""
    hits = [(m, t) for rx, t in _MODULES if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"decoder node path {path!r} matches {len(hits)} module rules (need exactly 1)")
    m, template = hits[0]
    return template.format(*m.groups())


def checked_metrics(names) -> tuple[str, ...]:
    """The metrics this verifier checks: FLOPs always, plus those among `names` (aliases: bytes,
    kv_cache, all), in CHECKABLE order; metrics checked elsewhere (params, activations) are left
    to their verifiers."""
    want = {FLOPS}
    for n in names:
        want.update(_ALIASES.get(n, (n,)))
    return tuple(m for m in CHECKABLE if m in want)


def _claim_text(c: Claim) -> str:
    module, call, which = c
    return f"{module} [{call}{'' if which == ALL else f' #{which}'}]"


# ---- measuring ----------------------------------------------------------------------------------

@dataclass
class Call:
    section: str
    module: str
    call: str
    op: str
    flops: int


class CallLog(OpCounter):
    """`OpCounter` that also keeps every counted call, in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []

    def __enter__(self):
        self.calls.clear()
        return super().__enter__()

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.calls.append(Call(*self._key(func_packet), int(n)))
        return super()._count_flops(func_packet, out, args, kwargs)


PREFILL, DECODE = "decoder.prefill", "decoder.decode"


def section(step: int) -> str:
    return PREFILL if step == 0 else f"{DECODE}[t={step}]"


@dataclass
class LMRun:
    """What the reference did: calls per forward, in order (step 0 = prefill)."""
    prompt_tokens: int
    steps: int
    calls: list[Call] = field(default_factory=list)
    ops: list = field(default_factory=list)            # costgraph.verify.dispatch.Call, with metrics (if recorded)
    blind: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)   # generated ids (the first from the prefill)
    seconds: dict[str, float] = field(default_factory=dict)
    experts_hit: dict[int, dict[int, int]] = field(default_factory=dict)   # step -> MoE layer -> distinct experts
    kv_cache_bytes: dict[int, int] = field(default_factory=dict)          # step -> bytes the cache holds after it


@contextlib.contextmanager
def router_log(layers):
    """Each MoE layer's top-k indices (of the decoder `layers`), per forward, kept by forward hooks (a
    reference: no op runs)."""
    log: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue
        log[i] = []
        handles.append(gate.register_forward_hook(lambda mod, args, out, i=i: log[i].append(out[2])))
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_reference(model: LanguageModel, prompt_tokens: int, image_slots: int, decode_steps: int,
                  lm_head: str = "all", image_features: torch.Tensor | None = None, seed: int = 0,
                  progress: bool = False, metrics: bool = False, batch: int = 1) -> LMRun:
    """Greedy generation of decode_steps + 1 tokens: the prefill, then decode_steps forwards of one token.

    The prompt is [BOS] + image slots + text (random ids); the image slots' embeddings are
    replaced by `image_features` (the vision output, or random: FLOPs do not depend on it), cast
    to the model dtype beforehand (the vendor's vision tower runs in it). `metrics`: also record
    every aten op with elementwise FLOPs and bytes (`costgraph.verify.dispatch.MetricRecorder`).
    `batch`: B prompts of that length run together (a batch of pages: B x image_slots features).
    """
    from transformers import DynamicCache
    from tqdm import tqdm

    cfg = model.cfg
    dtype = model.lm_head.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab, (batch, prompt_tokens), generator=gen)
    ids[:, 0] = 0
    slots = torch.zeros(batch, prompt_tokens, dtype=torch.bool)
    slots[:, 1:1 + image_slots] = True
    if image_features is None:
        image_features = torch.randn(batch * image_slots, cfg.hidden, generator=gen)
    if tuple(image_features.shape) != (batch * image_slots, cfg.hidden):
        raise ValueError(f"image features {tuple(image_features.shape)} do not fill {image_slots} slots")
    image_features = image_features.to(dtype)
    run = LMRun(prompt_tokens, decode_steps)
    log = CallLog()
    rec = MetricRecorder() if metrics else None
    cache = DynamicCache(config=model.model.config)
    with router_log(model.model.layers) as routes, log, (rec if rec is not None else contextlib.nullcontext()), \
            torch.no_grad():
        for step in tqdm(range(decode_steps + 1), desc="LM forwards", disable=not progress):
            t = time.perf_counter()
            tagged = rec.section(section(step)) if rec is not None else contextlib.nullcontext()
            with log.section(section(step)), tagged:
                if step == 0:
                    logits = model(ids, cache, slots, image_features, lm_head)
                else:
                    logits = model(nxt, cache)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
            run.seconds[section(step)] = round(time.perf_counter() - t, 3)
            run.tokens.append(int(nxt) if batch == 1 else nxt.flatten().tolist())
            run.kv_cache_bytes[step] = _cache_bytes(cache)
    run.calls = list(log.calls)
    run.ops = list(rec.calls) if rec is not None else []
    run.blind = [f"{k[0]}:{k[1] or '<root>'} {k[2]}/{k[3]}" for k in log.uncounted if COMPUTE_OP.fullmatch(k[3])]
    for layer, per_forward in routes.items():
        for step, idx in enumerate(per_forward):
            run.experts_hit.setdefault(step, {})[layer] = int(torch.unique(idx).numel())
    return run


def _pick(calls: list[Call], which) -> list[int]:
    idx = list(range(len(calls)))
    if which == ALL:
        return idx
    if which == EVEN:
        return idx[0::2]
    if which == ODD:
        return idx[1::2]
    return [which] if which < len(calls) else []


# ---- predicting and comparing ---------------------------------------------------------------------

@lru_cache(maxsize=None)
def lm_graph(cfg: LMConfig, variants: Variants, crop_mode: bool, batch: int = 1) -> CostGraph:
    """The graph checked: the decoder builder of the command line's graph, with `experts_hit` kept
    a symbol (the command line predicts it by `experts_hit_bound`)."""
    return decoder_graph(cfg, variants, crop_mode, experts_hit=S.experts_hit, batch=batch)


_TOTALS: dict[int, dict] = {}


def _scope_totals(graph: CostGraph) -> dict:
    """The graph's decoder scope totals (closed forms), computed once per graph."""
    key = id(graph)
    if key not in _TOTALS:
        pre, dec = graph.total(PREFILL), graph.total(DECODE)
        _TOTALS[key] = {PREFILL: pre, DECODE: dec, "decoder": pre + dec, "graph": graph}
    return _TOTALS[key]


_LAYER = re.compile(r"layers\.(\d+)\.")


def _layer_of(graph: CostGraph, node: str) -> int | None:
    m = _LAYER.match(graph.g.nodes[node]["path"])
    return int(m.group(1)) if m else None


def _flop_groups(graph: CostGraph, scope: str) -> dict[tuple[Claim, ...], list[str]]:
    """Nodes of one forward with matmul FLOPs, grouped by the reference calls they claim."""
    groups: dict[tuple[Claim, ...], list[str]] = defaultdict(list)
    for node in graph.nodes(scope):
        if graph.cost(node).flops != 0:
            groups[claims_for(graph.g.nodes[node]["path"])].append(node)
    return groups


def _module_groups(graph: CostGraph, scope: str, metrics) -> dict[str, list[str]]:
    """Nodes of one forward costing something in `metrics`, grouped by the reference module they run in."""
    groups: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes(scope):
        cost = graph.cost(node)
        if any(cost[m] != 0 for m in metrics):
            groups[module_for(graph.g.nodes[node]["path"])].append(node)
    return groups


def _value(expr, values: dict) -> int:
    """Exact integer value: `xreplace` (fast: no simplification) where it yields an integer, else substitute."""
    v = sp.sympify(expr).xreplace({k: sp.sympify(x) for k, x in values.items()})
    return int(v) if v.is_Integer else substitute(expr, values)


def _group_name(nodes: list[str]) -> str:
    if len(nodes) == 1:
        return nodes[0]
    head = nodes[0].rpartition(".")[0]
    if all(n.startswith(head + ".") for n in nodes):
        return f"{head}.{{{','.join(n[len(head) + 1:] for n in nodes)}}}"
    return "{" + ",".join(nodes) + "}"


def _hits_at(run: LMRun, step: int, layer: int | None) -> dict:
    """experts_hit for a node: its layer's count in that forward (a layer without routing: none)."""
    if layer is None or layer not in run.experts_hit.get(step, {}):
        return {}
    return {S.experts_hit: run.experts_hit[step][layer]}


def _mean_hits(run: LMRun, step: int) -> dict:
    per = run.experts_hit.get(step, {})
    return {S.experts_hit: sp.Rational(sum(per.values()), len(per))} if per else {}


def compare_lm(graph: CostGraph, values: dict, run: LMRun, scopes: tuple[str, ...] = (PREFILL, DECODE),
               metrics: tuple[str, ...] = (FLOPS,), cfg: LMConfig = LM, batch: int = 1
               ) -> tuple[list[Row], list[Row], list[tuple[str, str, int]]]:
    """Rows per node group and forward, subtotals (the decoder totals first), and the measured
    calls no node claims. The prefill is evaluated at the router's experts_hit counts."""
    forwards = ([0] if PREFILL in scopes else []) + (list(range(1, run.steps + 1)) if DECODE in scopes else [])
    rows: list[Row] = []
    unclaimed: list[tuple[str, str, int]] = []
    other = tuple(m for m in metrics if m in OTHER_METRICS)
    if FLOPS in metrics:
        r, u = _compare_flops(graph, values, run, forwards)
        rows += r
        unclaimed += u
    if other:
        r, u = _compare_modules(graph, values, run, forwards, other)
        rows += r
        unclaimed += u
    unclaimed.sort()
    measured = {(step, m): sum(getattr(c, m) for c in (run.calls if m == FLOPS else run.ops)
                               if c.section == section(step))
                for step in forwards for m in metrics if m != KV_CACHE}
    at = {**values, S.output_tokens: run.steps + 1, **_mean_hits(run, 0)}
    scope_total = _scope_totals(graph)
    totals, parts = [], []
    for m in (m for m in metrics if m != KV_CACHE):
        if PREFILL in scopes and DECODE in scopes and not scope_total[DECODE][m].has(S.experts_hit):
            totals.append(Row("decoder", m, substitute(scope_total["decoder"][m], at),
                              sum(measured[(s, m)] for s in forwards), "prefill + decode"))
        if PREFILL in scopes:
            parts.append(Row(PREFILL, m, substitute(scope_total[PREFILL][m], at), measured[(0, m)],
                             "all recorded ops of the prefill forward"))
        if DECODE in scopes and run.steps:
            per_step = sp.Add(*[graph.cost(n)[m] for n in graph.nodes(DECODE)])
            steps = [_value(per_step, {**values, S.decode_step: t, **_mean_hits(run, t)})
                     for t in range(1, run.steps + 1)]
            if scope_total[DECODE][m].has(S.experts_hit):   # a batch's decode steps meet a varying number of experts
                total, how = sum(steps), f"sum over t = 1..{run.steps} at each step's experts_hit"
            else:
                total = substitute(scope_total[DECODE][m], at)
                how = f"closed-form sum over t = 1..{run.steps} (output_tokens = {run.steps + 1})"
            parts.append(Row(DECODE, m, total, sum(measured[(t, m)] for t in range(1, run.steps + 1)), how))
            for t in range(1, run.steps + 1):
                parts.append(Row(f"{DECODE}[t={t}]", m, steps[t - 1], measured[(t, m)],
                                 f"context {run.prompt_tokens + t}"))
    if KV_CACHE in metrics:
        per_token = kv_cache_bytes_per_token(cfg)
        for step in forwards:
            context = run.prompt_tokens + step
            parts.append(Row(f"{section(step)}.kv_cache", KV_CACHE, substitute(batch * per_token * context, values),
                             run.kv_cache_bytes[step], f"DynamicCache tensors after the forward: {context} tokens"
                             + (f" x {batch} sequences" if batch != 1 else "")))
    return rows, totals + parts, unclaimed


def _compare_flops(graph, values, run, forwards):
    by_key: dict[tuple[str, str, str], list[Call]] = defaultdict(list)
    for c in run.calls:
        by_key[(c.section, c.module, c.call)].append(c)
    claimed: set[int] = set()
    rows: list[Row] = []
    for step in forwards:
        scope, sec = (PREFILL if step == 0 else DECODE), section(step)
        at = {**values, S.decode_step: step}
        for claims, nodes in _flop_groups(graph, scope).items():
            predicted = sum(_value(graph.cost(n).flops, at) for n in nodes)
            got = 0
            for module, call, which in claims:
                calls = by_key[(sec, module, call)]
                for i in _pick(calls, which):
                    got += calls[i].flops
                    claimed.add(id(calls[i]))
            ref = "; ".join(map(_claim_text, claims))
            rows.append(Row(_group_name(nodes), FLOPS, predicted, got, ref if step == 0 else f"t={step}: {ref}"))
    compared = {section(step) for step in forwards}
    unclaimed = [(f"{c.section}:{c.module or '<root>'}", f"{c.call}/{c.op}", c.flops)
                 for c in run.calls if c.flops and c.section in compared and id(c) not in claimed]
    return rows, unclaimed


def _compare_modules(graph, values, run, forwards, metrics):
    """Per (forward, reference module): the sum of the module's nodes against the sum of its own ops."""
    measured: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in run.ops:
        for m in metrics:
            measured[(c.section, c.module)][m] += getattr(c, m)
    rows: list[Row] = []
    claimed: set[tuple[str, str]] = set()
    for step in forwards:
        scope, sec = (PREFILL if step == 0 else DECODE), section(step)
        for module, nodes in _module_groups(graph, scope, metrics).items():
            claimed.add((sec, module))
            layer = _layer_of(graph, nodes[0])
            at = {**values, S.decode_step: step, **_hits_at(run, step, layer)}
            for m in metrics:
                predicted = sum(_value(graph.cost(n)[m], at) for n in nodes)
                got = measured[(sec, module)][m]
                if predicted or got:
                    ref = f"{module or '<root>'} (all its own ops)"
                    rows.append(Row(_group_name(nodes), m, predicted, got, ref if step == 0 else f"t={step}: {ref}"))
    compared = {section(step) for step in forwards}
    unclaimed = []
    for (sec, module), got in measured.items():
        if sec in compared and (sec, module) not in claimed:
            for m in metrics:
                if got[m]:
                    unclaimed.append((f"{sec}:{module or '<root>'}", m, got[m]))
    return rows, unclaimed


@dataclass
class LMRequest:
    """One page's language-model check."""
    mode: Mode
    layout: Layout
    text_tokens: int
    decode_steps: int = 3
    variants: Variants = Variants()
    cfg: LMConfig = LM
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    progress: bool = False
    metrics: tuple[str, ...] = (FLOPS,)
    batch: int = 1      # sequences of this page run together


def check_request(req: LMRequest) -> None:
    if req.variants.attention != "eager":
        raise ValueError(f"attention {req.variants.attention!r} cannot be verified: no CPU reference computes "
                         "only the causal half or hides the kernel; the reference runs eager attention")
    model_graph.sequence_values(req.text_tokens, req.decode_steps + 1)


TORCH_DTYPES = {name: torch_dtype(name) for name in STORAGE}
_DTYPE_BYTES = {TORCH_DTYPES[name]: n for name, n in STORAGE.items()}


def verify_lm(req: LMRequest, scopes: tuple[str, ...] = (PREFILL, DECODE), image_features=None,
              model: LanguageModel | None = None) -> Comparison:
    """Build (or take) the reference, generate decode_steps + 1 tokens, compare per node."""
    check_request(req)
    if req.dtype not in _DTYPE_BYTES:
        raise ValueError(f"unsupported reference dtype {req.dtype} (bfloat16 or float32)")
    metrics = checked_metrics(req.metrics)
    t0 = time.perf_counter()
    graph = lm_graph(req.cfg, req.variants, req.mode.crop_mode, req.batch)
    slots = tokens_for(req.layout, req.mode)["total"]
    prompt = 1 + req.text_tokens + slots
    if model is None:
        model = build_language_model(req.cfg, req.dtype, attention="eager", rope=req.variants.rope, seed=req.seed)
    built = time.perf_counter() - t0
    run = run_reference(model, prompt, slots, req.decode_steps, req.variants.lm_head, image_features, req.seed,
                        req.progress, metrics=any(m != FLOPS for m in metrics), batch=req.batch)
    values = {**model_graph.mode_values(req.mode), **model_graph.layout_values(req.layout),
              S.text_tokens: req.text_tokens, S.dtype_bytes: _DTYPE_BYTES[req.dtype]}
    rows, subtotals, unclaimed = compare_lm(graph, values, run, scopes, metrics, req.cfg, req.batch)
    grid = f"{req.layout.w_crop}x{req.layout.h_crop}" if req.layout.tiled else "no crops"
    bound = int(experts_hit_bound(req.cfg, req.batch * prompt))
    prefill_hits = run.experts_hit.get(0, {})
    info = {"mode": req.mode.name, "layout": req.layout.as_dict(), "grid": grid, "device": "cpu",
            "prompt_tokens": prompt, "image_tokens": slots, "text_tokens": req.text_tokens,
            "decode_steps": req.decode_steps, "generated": run.tokens, "variants": req.variants.as_dict(),
            "dtype": str(req.dtype).replace("torch.", ""), "metrics": list(metrics),
            "parameters": num_parameters(model),
            "router_dtype": str(model.model.layers[-1].mlp.gate.weight.dtype).replace("torch.", "")
            if req.cfg.layers > req.cfg.dense_layers else None,
            "experts_hit": {"prefill": {str(k): v for k, v in prefill_hits.items()},
                            "decode": sorted({v for s in range(1, run.steps + 1)
                                              for v in run.experts_hit.get(s, {}).values()}),
                            "predicted_bound": bound,
                            "bound_attained": all(v == bound for v in prefill_hits.values())},
            "kv_cache_bytes": {section(s): b for s, b in run.kv_cache_bytes.items()},
            "build_seconds": round(built, 3), "forward_seconds": run.seconds,
            "seconds": round(time.perf_counter() - t0, 3)}
    title = f"{req.mode.name} {req.layout.width}x{req.layout.height} ({grid}) LM {'+'.join(scopes)}"
    return Comparison(title, rows, subtotals, unclaimed, run.blind, info)


# ---- `costgraph verify --scope decoder.prefill | decoder.decode | decoder | e2e` ------------------

DECODE_STEPS = 3   # decode forwards a verification runs by default (t = 1..3)


def _request_metrics(req) -> tuple[str, ...]:
    return tuple(req.extra.get("metrics", getattr(req, "metrics", (FLOPS,))))


def _request_dtype(req) -> str:
    """The storage dtype of the run: the request's when metrics beyond FLOPs are checked (they depend
    on it); for FLOPs alone the vendor's bf16 (FLOPs do not depend on it; half the memory of fp32)."""
    if checked_metrics(_request_metrics(req)) == (FLOPS,):
        return DEFAULT_DTYPE
    # only an explicit --dtype (in `extra`): `Request.dtype` carries the vision-only default (fp32)
    dtype = req.extra.get("dtype") or DEFAULT_DTYPE
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return dtype


def _lm_request(req, mode: Mode, layout: Layout) -> LMRequest:
    extra = req.extra
    return LMRequest(mode, layout, text_tokens=extra.get("text_tokens", model_graph.DEFAULT_TEXT_TOKENS),
                     decode_steps=extra.get("decode_steps", DECODE_STEPS),
                     variants=extra.get("variants", Variants()), progress=req.progress,
                     metrics=_request_metrics(req), dtype=TORCH_DTYPES[_request_dtype(req)])


def _page_cases(req) -> list[tuple[Mode, Layout]]:
    if req.all_grids:
        raise ValueError("--all-grids is for the vision scope: the language model runs at full size on CPU "
                         "(tens of seconds per page); give --image, --size or --grid")
    if req.image:
        return [(m, model_graph.layout_for_image(req.image, m, req.max_num)) for m in req.modes]
    if req.grid:
        from costgraph.graphs.deepseek_ocr.layout import layout_for_grid
        return [(m, layout_for_grid(*req.grid, m)) for m in req.modes]
    from costgraph.graphs.deepseek_ocr.layout import layout_for
    return [(m, layout_for(*req.size, m, max_num=req.max_num)) for m in req.modes]


def _verifier(scopes: tuple[str, ...]):
    def run(req) -> list[Comparison]:
        cases = _page_cases(req)
        out = []
        for mode, layout in cases:
            lm = _lm_request(req, mode, layout)
            check_request(lm)
            if scopes == (DECODE,) and lm.decode_steps < 1:
                raise ValueError("--decode-steps must be at least 1 for the decode scope")
            out.append(verify_lm(lm, scopes))
        return out
    return run


def verify_e2e(req) -> list[Comparison]:
    """Vision (the page reference, on req.device) + the full-size LM (CPU) on the same page.

    On `cpu` the LM's image slots are the vision reference's actual output; on `meta` (counts
    only) they are random of the right length: FLOPs do not depend on them.
    """
    from . import runner
    from .preprocess import meta_views, random_views, views_from_file

    if req.device not in ("meta", "cpu"):
        raise ValueError(f"unknown device {req.device!r} (choose meta or cpu)")
    out = []
    for mode, layout in _page_cases(req):
        lm = _lm_request(req, mode, layout)
        check_request(lm)
        t = time.perf_counter()
        if req.image:
            views = views_from_file(req.image, mode, req.max_num)
            views = views.to("meta") if req.device == "meta" else views
        else:
            views = meta_views(mode, layout) if req.device == "meta" else random_views(mode, layout)
        dtype = _request_dtype(req)
        if req.device == "meta" or checked_metrics(lm.metrics) == (FLOPS,):
            page = runner.meta_page_reference() if req.device == "meta" else runner.build_page_reference("cpu")
            measured, seq = runner.measure_page(views, page)
            vision = runner.compare_page(views, measured, int(seq.shape[0]), time.perf_counter() - t)
        else:   # elementwise FLOPs and bytes: a real CPU run in the storage dtype, every aten op recorded
            page = runner.build_page_reference("cpu", TORCH_DTYPES[dtype])
            rec = MetricRecorder()
            measured, seq = runner.measure_page(views.to(TORCH_DTYPES[dtype]), page, rec)
            vision = runner.compare_page(views, measured, int(seq.shape[0]), time.perf_counter() - t, rec.calls,
                                         dtype)
            del rec
        del page
        features = seq.detach() if req.device == "cpu" else None
        dec = verify_lm(lm, (PREFILL, DECODE), image_features=features)
        e2e, at_bound = _e2e_rows(mode, layout, lm, vision, dec)
        info = {**dec.info, "vision_device": req.device, "vision_seconds": vision.info.get("seconds"),
                "image_slots_from": "vision reference output" if features is not None else "random (meta vision)",
                "e2e_command_line_prediction": at_bound,
                "seconds": round(time.perf_counter() - t, 3)}
        title = f"{mode.name} {layout.width}x{layout.height} ({vision.info['grid']}) e2e"
        out.append(Comparison(title, vision.rows + dec.rows, e2e + vision.subtotals + dec.subtotals,
                              vision.unclaimed + dec.unclaimed, vision.blind + dec.blind, info))
    return out


def _e2e_rows(mode: Mode, layout: Layout, lm: LMRequest, vision: Comparison, dec: Comparison
              ) -> tuple[list[Row], dict]:
    """e2e = vision + decoder, for every metric both comparisons measured.

    FLOPs do not depend on routing: predicted by the command line's own e2e formula. The other
    metrics: the vision and decoder predictions checked above (the decoder at the routers'
    experts_hit); what the command line predicts (experts_hit at its bound) is returned beside,
    with its difference from the measurement (0 when every layer reached the bound).
    """
    values = {**model_graph.layout_values(layout), S.text_tokens: lm.text_tokens,
              S.output_tokens: lm.decode_steps + 1, S.dtype_bytes: _DTYPE_BYTES[lm.dtype]}
    rows, at_bound = [], {}
    for m in checked_metrics(lm.metrics):
        v = next((r for r in vision.subtotals if r.node == "vision" and r.metric == m), None)
        d = next((r for r in dec.subtotals if r.node == "decoder" and r.metric == m), None)
        if v is None or d is None:
            continue
        cli = substitute(model_graph.formula(mode, model_graph.E2E, m, lm.variants), values)
        measured = v.measured + d.measured
        note = f"vision + decoder (output_tokens = {lm.decode_steps + 1})"
        if m == FLOPS:
            rows.append(Row(model_graph.E2E, m, cli, measured, note + ": the command line's e2e formula"))
        else:
            rows.append(Row(model_graph.E2E, m, v.predicted + d.predicted, measured,
                            note + ": experts_hit as the routers ran"))
            at_bound[m] = {"predicted": cli, "measured": measured, "difference": measured - cli}
    return rows, at_bound


LM_VERIFIERS = {
    PREFILL: _verifier((PREFILL,)),
    DECODE: _verifier((DECODE,)),
    "decoder": _verifier((PREFILL, DECODE)),
    model_graph.E2E: verify_e2e,
}


def register(verifiers: dict) -> None:
    verifiers.update(LM_VERIFIERS)
