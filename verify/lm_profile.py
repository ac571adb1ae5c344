"""The language model against its profiled reference, node by node: one prefill and a few decode
forwards with a KV cache (`DynamicCache`), on CPU with random weights (the MoE router depends on
the data, so the LM cannot run on `meta`).

Every counted op is logged per call (`CallLog`: the innermost module, the outermost torch call,
the aten op, its FLOPs) so two calls in one module are told apart: the attention's two matmuls
in `self_attn` (scores first, then probabilities x values) and the routed experts' alternating
fused gate+up and down projections (`transformers` fuses the vendor's per-expert `gate_proj` and
`up_proj` into one `gate_up_proj`: the two graph nodes share one row).

Predicted values come from the graph the command line uses (`graphs.deepseek_ocr.model_graph`
for the full configuration); the decode total is the closed-form summation at
`output_tokens = steps + 1`, compared with the sum of the measured steps.

The reference's structure decides the variants it can check: attention `eager` only (no CPU
kernel computes only the causal half; `flash` and `uncounted` are accounting variants, tested
against eager in the unit tests); lm_head `all` or `last`; RoPE `vendor` (per-layer tables,
see `verify.lm_reference`) or `once` (`transformers` 5.x unchanged).
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from costgraph import symbols as S
from costgraph.evaluate import substitute
from costgraph.graph import CostGraph
from graphs import deepseek_ocr as model_graph
from graphs.config import LM, LMConfig, Mode
from graphs.decoder import Variants, decoder_graph
from graphs.layout import Layout, tokens_for
from .compare import Comparison, Row
from .mapping import has_cost
from .profile import COMPUTE_OP, OpCounter
from .lm_reference import LanguageModel, build_language_model, num_parameters

LINEAR, MATMUL = "linear", "matmul"
ALL, EVEN, ODD = "all", "even", "odd"
_L = "model.layers.{0}"

# (node path within a forward, [(reference module template, torch call, which calls)]).
# Which calls: ALL, an index into the module's calls of that torch call, EVEN or ODD.
RULES: list[tuple[str, list[tuple[str, str, object]]]] = [
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj", [(_L + ".self_attn.{1}_proj", LINEAR, ALL)]),
    (r"layers\.(\d+)\.self_attn\.rotary_emb", [(_L + ".self_attn.rotary_emb", MATMUL, ALL)]),
    (r"layers\.(\d+)\.self_attn\.scores", [(_L + ".self_attn", MATMUL, 0)]),
    (r"layers\.(\d+)\.self_attn\.probs_values", [(_L + ".self_attn", MATMUL, 1)]),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)", [(_L + ".mlp.{1}", LINEAR, ALL)]),
    (r"layers\.(\d+)\.mlp\.gate", [(_L + ".mlp.gate", LINEAR, ALL)]),
    (r"layers\.(\d+)\.mlp\.experts\.(?:gate_proj|up_proj)", [(_L + ".mlp.experts", LINEAR, EVEN)]),
    (r"layers\.(\d+)\.mlp\.experts\.down_proj", [(_L + ".mlp.experts", LINEAR, ODD)]),
    (r"layers\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
     [(_L + ".mlp.shared_experts.{1}", LINEAR, ALL)]),
    (r"lm_head", [("lm_head", LINEAR, ALL)]),
]
_COMPILED = [(re.compile(p), claims) for p, claims in RULES]

Claim = tuple[str, str, object]   # (module, torch call, which)


def claims_for(path: str) -> tuple[Claim, ...]:
    hits = [(m, claims) for rx, claims in _COMPILED if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"decoder node path {path!r} matches {len(hits)} mapping rules (need exactly 1)")
    m, claims = hits[0]
    return tuple((t.format(*m.groups()), call, which) for t, call, which in claims)


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
    blind: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)   # generated ids (the first from the prefill)
    seconds: dict[str, float] = field(default_factory=dict)


def run_reference(model: LanguageModel, prompt_tokens: int, image_slots: int, decode_steps: int,
                  lm_head: str = "all", image_features: torch.Tensor | None = None, seed: int = 0,
                  progress: bool = False) -> LMRun:
    """Greedy generation of decode_steps + 1 tokens: the prefill, then decode_steps forwards of one token.

    The prompt is [BOS] + image slots + text (random ids); the image slots' embeddings are
    replaced by `image_features` (the vision output, or random: FLOPs do not depend on it).
    """
    from transformers import DynamicCache
    from tqdm import tqdm

    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab, (1, prompt_tokens), generator=gen)
    ids[0, 0] = 0
    slots = torch.zeros(1, prompt_tokens, dtype=torch.bool)
    slots[0, 1:1 + image_slots] = True
    if image_features is None:
        image_features = torch.randn(image_slots, cfg.hidden, generator=gen)
    if tuple(image_features.shape) != (image_slots, cfg.hidden):
        raise ValueError(f"image features {tuple(image_features.shape)} do not fill {image_slots} slots")
    run = LMRun(prompt_tokens, decode_steps)
    log = CallLog()
    cache = DynamicCache(config=model.model.config)
    with log, torch.no_grad():
        for step in tqdm(range(decode_steps + 1), desc="LM forwards", disable=not progress):
            t = time.perf_counter()
            with log.section(section(step)):
                if step == 0:
                    logits = model(ids, cache, slots, image_features, lm_head)
                else:
                    logits = model(nxt, cache)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
            run.tokens.append(int(nxt))
            run.seconds[section(step)] = round(time.perf_counter() - t, 3)
    run.calls = list(log.calls)
    run.blind = [f"{k[0]}:{k[1] or '<root>'} {k[2]}/{k[3]}" for k in log.uncounted if COMPUTE_OP.fullmatch(k[3])]
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
def lm_graph(cfg: LMConfig, variants: Variants, crop_mode: bool) -> CostGraph:
    """The graph whose decoder is checked: the command line's own for the full configuration."""
    if cfg == LM:
        return model_graph.model_graph(crop_mode, variants)
    return decoder_graph(cfg, variants, crop_mode)


def _forward_groups(graph: CostGraph, scope: str) -> dict[tuple[Claim, ...], list[str]]:
    """Costed nodes of one forward grouped by the reference calls they claim."""
    groups: dict[tuple[Claim, ...], list[str]] = defaultdict(list)
    for node in graph.nodes(scope):
        if has_cost(graph, node):
            groups[claims_for(graph.g.nodes[node]["path"])].append(node)
    return groups


def _group_name(nodes: list[str]) -> str:
    if len(nodes) == 1:
        return nodes[0]
    head = nodes[0].rpartition(".")[0]
    return f"{head}.{{{','.join(n.rpartition('.')[2] for n in nodes)}}}"


def compare_lm(graph: CostGraph, values: dict, run: LMRun, scopes: tuple[str, ...] = (PREFILL, DECODE)
               ) -> tuple[list[Row], list[Row], list[tuple[str, str, int]]]:
    """Rows per node group and forward, subtotals, and the counted calls no node claims."""
    by_key: dict[tuple[str, str, str], list[Call]] = defaultdict(list)
    for c in run.calls:
        by_key[(c.section, c.module, c.call)].append(c)
    claimed: set[int] = set()
    rows: list[Row] = []
    measured_step: dict[int, int] = {}
    forwards = ([0] if PREFILL in scopes else []) + (list(range(1, run.steps + 1)) if DECODE in scopes else [])
    for step in forwards:
        scope, sec = (PREFILL if step == 0 else DECODE), section(step)
        at = {**values, S.decode_step: step}
        for claims, nodes in _forward_groups(graph, scope).items():
            predicted = sum(substitute(graph.cost(n).flops, at) for n in nodes)
            got = 0
            for module, call, which in claims:
                calls = by_key[(sec, module, call)]
                for i in _pick(calls, which):
                    got += calls[i].flops
                    claimed.add(id(calls[i]))
            ref = "; ".join(map(_claim_text, claims))
            rows.append(Row(_group_name(nodes), "flops", predicted, got, ref if step == 0 else f"t={step}: {ref}"))
        measured_step[step] = sum(c.flops for c in run.calls if c.section == sec)
    compared = {section(step) for step in forwards}
    unclaimed = sorted((f"{c.section}:{c.module or '<root>'}", f"{c.call}/{c.op}", c.flops)
                       for c in run.calls if c.flops and c.section in compared and id(c) not in claimed)
    # subtotals: the prefill, each decode step, and the closed-form decode sum over the steps run
    at = {**values, S.output_tokens: run.steps + 1}
    subtotals: list[Row] = []
    if PREFILL in scopes:
        subtotals.append(Row(PREFILL, "flops", substitute(graph.total(PREFILL).flops, at), measured_step[0],
                             "all counted ops of the prefill forward"))
    if DECODE in scopes and run.steps:
        decode_total = substitute(graph.total(DECODE).flops, at)
        subtotals.append(Row(DECODE, "flops", decode_total, sum(measured_step[t] for t in range(1, run.steps + 1)),
                             f"closed-form sum over t = 1..{run.steps} (output_tokens = {run.steps + 1})"))
        for t in range(1, run.steps + 1):
            per_step = sum(substitute(graph.cost(n).flops, {**values, S.decode_step: t}) for n in graph.nodes(DECODE))
            subtotals.append(Row(f"{DECODE}[t={t}]", "flops", per_step, measured_step[t],
                                 f"context {run.prompt_tokens + t}"))
    if PREFILL in scopes and DECODE in scopes:
        subtotals.insert(0, Row("decoder", "flops", substitute(graph.total("decoder").flops, at),
                                sum(measured_step.values()), "prefill + decode"))
    return rows, subtotals, unclaimed


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


def check_request(req: LMRequest) -> None:
    if req.variants.attention != "eager":
        raise ValueError(f"attention {req.variants.attention!r} cannot be verified: no CPU reference computes "
                         "only the causal half or hides the kernel; the reference runs eager attention")
    model_graph.sequence_values(req.text_tokens, req.decode_steps + 1)


def verify_lm(req: LMRequest, scopes: tuple[str, ...] = (PREFILL, DECODE), image_features=None,
              model: LanguageModel | None = None) -> Comparison:
    """Build (or take) the reference, generate decode_steps + 1 tokens, compare per node."""
    check_request(req)
    t0 = time.perf_counter()
    graph = lm_graph(req.cfg, req.variants, req.mode.crop_mode)
    slots = tokens_for(req.layout, req.mode)["total"]
    prompt = 1 + req.text_tokens + slots
    if model is None:
        model = build_language_model(req.cfg, req.dtype, attention="eager", rope=req.variants.rope, seed=req.seed)
    built = time.perf_counter() - t0
    run = run_reference(model, prompt, slots, req.decode_steps, req.variants.lm_head, image_features, req.seed,
                        req.progress)
    values = {**model_graph.mode_values(req.mode), **model_graph.layout_values(req.layout),
              S.text_tokens: req.text_tokens}
    rows, subtotals, unclaimed = compare_lm(graph, values, run, scopes)
    grid = f"{req.layout.w_crop}x{req.layout.h_crop}" if req.layout.tiled else "no crops"
    info = {"mode": req.mode.name, "layout": req.layout.as_dict(), "grid": grid, "device": "cpu",
            "prompt_tokens": prompt, "image_tokens": slots, "text_tokens": req.text_tokens,
            "decode_steps": req.decode_steps, "generated": run.tokens, "variants": req.variants.as_dict(),
            "dtype": str(req.dtype).replace("torch.", ""), "parameters": num_parameters(model),
            "router_dtype": str(model.model.layers[-1].mlp.gate.weight.dtype).replace("torch.", "")
            if req.cfg.layers > req.cfg.dense_layers else None,
            "build_seconds": round(built, 3), "forward_seconds": run.seconds,
            "seconds": round(time.perf_counter() - t0, 3)}
    title = f"{req.mode.name} {req.layout.width}x{req.layout.height} ({grid}) LM {'+'.join(scopes)}"
    return Comparison(title, rows, subtotals, unclaimed, run.blind, info)


# ---- `costgraph verify --scope decoder.prefill | decoder.decode | decoder | e2e` ------------------

DECODE_STEPS = 3   # decode forwards a verification runs by default (t = 1..3)


def _lm_request(req, mode: Mode, layout: Layout) -> LMRequest:
    extra = req.extra
    return LMRequest(mode, layout, text_tokens=extra.get("text_tokens", model_graph.DEFAULT_TEXT_TOKENS),
                     decode_steps=extra.get("decode_steps", DECODE_STEPS),
                     variants=extra.get("variants", Variants()), progress=req.progress)


def _page_cases(req) -> list[tuple[Mode, Layout]]:
    if req.all_grids:
        raise ValueError("--all-grids is for the vision scope: the language model runs at full size on CPU "
                         "(tens of seconds per page); give --image, --size or --grid")
    if req.image:
        return [(m, model_graph.layout_for_image(req.image, m, req.max_num)) for m in req.modes]
    if req.grid:
        from graphs.layout import layout_for_grid
        return [(m, layout_for_grid(*req.grid, m)) for m in req.modes]
    from graphs.layout import layout_for
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
        page = runner.meta_page_reference() if req.device == "meta" else runner.build_page_reference("cpu")
        measured, seq = runner.measure_page(views, page)
        vision = runner.compare_page(views, measured, int(seq.shape[0]), time.perf_counter() - t)
        del page
        features = seq.detach() if req.device == "cpu" else None
        dec = verify_lm(lm, (PREFILL, DECODE), image_features=features)
        values = {**model_graph.layout_values(layout), S.text_tokens: lm.text_tokens,
                  S.output_tokens: lm.decode_steps + 1}
        e2e = Row(model_graph.E2E, "flops", substitute(model_graph.formula(mode, model_graph.E2E, "flops", lm.variants),
                                                       values),
                  vision.subtotals[0].measured + dec.subtotals[0].measured,
                  f"vision + decoder (output_tokens = {lm.decode_steps + 1})")
        info = {**dec.info, "vision_device": req.device, "vision_seconds": vision.info.get("seconds"),
                "image_slots_from": "vision reference output" if features is not None else "random (meta vision)",
                "seconds": round(time.perf_counter() - t, 3)}
        title = f"{mode.name} {layout.width}x{layout.height} ({vision.info['grid']}) e2e"
        out.append(Comparison(title, vision.rows + dec.rows, [e2e] + vision.subtotals + dec.subtotals,
                              vision.unclaimed + dec.unclaimed, vision.blind + dec.blind, info))
    return out


LM_VERIFIERS = {
    PREFILL: _verifier((PREFILL,)),
    DECODE: _verifier((DECODE,)),
    "decoder": _verifier((PREFILL, DECODE)),
    model_graph.E2E: verify_e2e,
}


def register(verifiers: dict) -> None:
    verifiers.update(LM_VERIFIERS)
