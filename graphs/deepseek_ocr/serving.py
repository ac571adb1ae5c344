"""Serving DeepSeek-OCR (SPEC section 8): engines, batches of pages, step times, throughput.

Engines (`--engine`), each a set of variants; every output names its engine:
- `hf`: the vendor's HF path: eager attention (full L x L scores), logits at every prompt position,
  per-layer RoPE tables, `DynamicCache` (every decode step concatenates the whole cache: a copy), up
  to 9 crops, every kernel launched from Python (eager), static batches (a batch ends when its longest
  sequence does; prompts padded to the longest).
- `vllm`: the vendor's vLLM script: flash/paged attention (the causal half; decode reads the paged
  cache), logits only at the sampled position, RoPE from a cached table, the new tokens' K and V written
  into the paged cache in place (no copy of the cache), at most 6 crops, CUDA graphs for decode steps
  (no per-kernel launch cost; prefill steps run eagerly), continuous batching with `max_num_seqs`,
  `gpu_memory_utilization`, `max_model_len` and KV blocks of `block_size` (256) tokens.
Both run the vision encoders per image (the global view, then the crop batch), so a batch of pages
costs the sum of its pages' vision costs.

Batches: `batched_graph` is the language model with `costgraph.symbols.batch` (B) sequences per step,
symbolic in B: weights read once per step for all sequences, each sequence its own KV cache; a decode
step's B tokens meet E (1 - ((E - k) / E)^B) distinct experts (`decoder.expected_experts_hit`, the
expectation under uniform routing; the bound min(E, k B) beside it), a prefill's B L tokens the bound
(64). B = 1 is exactly the per-page graph. Batched prefill: HF pads every prompt to the longest and
runs one (B, L_max) forward; vLLM concatenates them (ragged, varlen attention per sequence). For pages
of one layout both are the (B, L) graph; for mixed pages the simulator uses the padded cost (HF) or
the mean of the per-layout costs at that batch size (vLLM: exact for the linear parts, the attention
of a mixed batch approximated).

KV memory: vLLM allocates whole blocks of 256 tokens; a decode step reads the cached tokens it
attends (the kernel reads the filled part of a block), so bytes follow the context, memory the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from costgraph import symbols as ES
from costgraph import timemodel as TM
from costgraph.cost import Cost
from costgraph.dtypes import INT64
from costgraph.evaluate import substitute
from costgraph.graph import CostGraph
from costgraph.ops import nbytes, prod, Spec
from costgraph.simulate import Limits, Request, StepTimes, simulate
from . import assembly
from . import symbols as S
from .config import LM, MAX_POSITIONS, Mode
from .decoder import Variants, decoder_graph, expected_experts_hit, experts_hit_bound, kv_cache_bytes_per_token
from .layout import Layout, layout_for, tokens_for


@dataclass(frozen=True)
class Engine:
    name: str
    variants: Variants
    max_num: int              # crops at most
    paged: bool               # KV written in place into a paged cache (no concatenation)
    cuda_graphs: bool         # decode steps replayed without per-kernel launches
    batching: str             # "continuous" or "static"
    block_size: int           # KV allocation unit (tokens)
    note: str

    def as_dict(self) -> dict:
        return {"engine": self.name, **self.variants.as_dict(), "max_num": self.max_num, "paged_kv": self.paged,
                "cuda_graphs_decode": self.cuda_graphs, "batching": self.batching, "block_size": self.block_size}


ENGINES = {
    "hf": Engine("hf", Variants(), 9, False, False, "static", 1,
                 "vendor HF: eager attention, logits at every prompt position, DynamicCache, eager kernels, "
                 "static padded batches"),
    "vllm": Engine("vllm", Variants(attention="flash", lm_head="last", rope="once"), 6, True, True, "continuous",
                   256, "vendor vLLM script: flash/paged attention, logits at the sampled position, CUDA graphs "
                        "for decode, continuous batching, KV blocks of 256"),
}
PAPER = {"pages_per_day": 200_000, "output_tokens_per_second": 2_500,
         "source": "paper: 200k+ pages/day on one A100-40G; README: PDF mode ~2,500 tokens/s at concurrency "
                   "on an A100-40G (vLLM)"}


def engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})") from None


# ---- the batched graph --------------------------------------------------------------------------

def _vllm(g: CostGraph) -> CostGraph:
    """The graph as vLLM runs it: each `cache_update` writes only the new tokens' K or V into the paged
    cache in place (reads them and one int64 slot per token), where `DynamicCache` copies the whole
    cache (attention still reads every cached token); the routed experts are one fused MoE kernel per
    op (no per-expert launches: the same FLOPs and weight reads, the time model's kernel count)."""
    out = CostGraph(g.name + ".vllm", params={**g.params, "kv_cache": "paged", "moe": "fused"})
    out.g = g.g.copy()
    out.scopes = dict(g.scopes)
    for n, d in out.g.nodes(data=True):
        if "hits" in d["attrs"] or "launches" in d["attrs"]:
            d["attrs"] = {**d["attrs"], "launches": 1}
        if d["kind"] == "cache_update":
            new = Spec(d["in_shapes"][1], d["in_itemsizes"][1])
            tokens = prod(new[:-3]) * new[-2]
            d["cost"] = Cost(bytes_read=nbytes(new) + INT64 * tokens, bytes_written=nbytes(new))
    return out


@lru_cache(maxsize=None)
def batched_graph(crop_mode: bool, engine_name: str, batch=ES.batch) -> CostGraph:
    """The language model of `engine` with `batch` sequences per step (symbolic B by default)."""
    e = engine(engine_name)
    g = decoder_graph(LM, e.variants, crop_mode, batch=batch)
    return _vllm(g) if e.paged else g


@lru_cache(maxsize=None)
def decode_step_formula(mode: Mode, engine_name: str, metric: str, dtype: str = "bf16"):
    """One decode step of B sequences at context C (each sequence's attended length), in closed form:
    symbolic in B and C (`costgraph.symbols.batch`, `context`); decode costs depend on the page only
    through its context. The weights' share is the term without B (the routed experts' part grows
    with B as 1 - (58/64)^B); every term in B is per sequence (its KV cache, its tokens)."""
    import sympy as sp
    from .decoder import prompt_length

    g = batched_graph(mode.crop_mode, engine_name)
    e = sp.Add(*[g.cost(n)[metric] for n in g.nodes("decoder.decode")])
    e = e.subs(ES.decode_step, ES.context - prompt_length(mode.crop_mode))
    e = e.subs({**assembly.mode_values(mode), **assembly.dtype_values(dtype)})
    return sp.collect(sp.expand(e), ES.batch)


def vision_batch(mode: Mode, layouts: list[Layout], metric: str = "flops", dtype: str = "bf16") -> int:
    """A batch of pages through the vision encoders: both engines encode image by image (the global
    view, then the page's crop batch), so the batch costs the sum of its pages' `vision` totals."""
    f = assembly.formula(mode, "vision", metric)
    return sum(substitute(f, {**assembly.layout_values(l), **assembly.dtype_values(dtype)}) for l in layouts)


def decode_experts(batch: int) -> dict:
    """Distinct experts one MoE layer runs in a decode step of `batch` sequences: the prediction and the bound."""
    return {"expected_uniform": float(expected_experts_hit(LM, batch)),
            "bound": int(experts_hit_bound(LM, batch)), "used": "expected_uniform"}


# ---- pages and step times -----------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    """One kind of page: its layout and sequence lengths."""
    layout: Layout
    text_tokens: int
    output_tokens: int

    @property
    def key(self) -> tuple:
        return (self.layout.w_crop, self.layout.h_crop, self.layout.tiled, self.text_tokens)


def page(mode: Mode, width: int, height: int, eng: Engine, text_tokens: int, output_tokens: int) -> Page:
    lay = layout_for(width, height, mode, max_num=eng.max_num)
    assembly.sequence_record(mode, lay, text_tokens, output_tokens)   # checks the positions
    return Page(lay, text_tokens, output_tokens)


def prompt_tokens(mode: Mode, p: Page) -> int:
    return 1 + p.text_tokens + tokens_for(p.layout, mode)["total"]


def _values(mode: Mode, p: Page) -> dict:
    return {**assembly.layout_values(p.layout), S.text_tokens: p.text_tokens}


class StepModel:
    """Predicted seconds of serving steps on one preset: vision per page, batched prefill, batched decode."""

    def __init__(self, mode: Mode, eng: Engine, hw, dtype: str = "bf16", eff=None):
        self.mode, self.engine, self.hw = mode, eng, hw
        self.eff = eff or TM.efficiency_for(hw)
        self.fixed = {**assembly.mode_values(mode), **assembly.dtype_values(dtype)}
        self.graph = batched_graph(mode.crop_mode, eng.name)
        self.vision_graph = assembly.vision_graph(mode.crop_mode)

    def vision(self, p: Page) -> float:
        scopes = ("vision.global", "vision.crops") if self.mode.crop_mode else ("vision.global",)
        v = {k.name: x for k, x in assembly.layout_values(p.layout).items()}
        return float(sum(TM.stage_prediction(self.vision_graph, s, self.fixed, v, self.hw, self.eff).total()
                         for s in scopes))

    def prefill(self, p: Page, batch) -> np.ndarray:
        v = {k.name: x for k, x in _values(self.mode, p).items()}
        v[ES.batch.name] = np.asarray(batch)
        return TM.stage_prediction(self.graph, "decoder.prefill", self.fixed, v, self.hw, self.eff).total()

    def decode(self, p: Page, batch, context) -> np.ndarray:
        """One decode step of `batch` sequences at `context` (the attended length, prompt + t): decode
        costs depend on the page only through prompt + t, so any page gives every context."""
        L = prompt_tokens(self.mode, p)
        v = {k.name: x for k, x in _values(self.mode, p).items()}
        v[ES.batch.name] = np.asarray(batch)
        v[ES.decode_step.name] = np.asarray(context) - L
        return TM.stage_prediction(self.graph, "decoder.decode", self.fixed, v, self.hw, self.eff,
                                   launch=not self.engine.cuda_graphs).total()


# ---- memory ----------------------------------------------------------------------------------------

def weight_bytes(mode: Mode, dtype: str = "bf16") -> int:
    from costgraph import stages
    from . import MODEL
    return int(stages.param_summary(MODEL, mode, assembly.dtype_values(dtype))["resident_weight_bytes"])


def kv_bytes_per_token(dtype: str = "bf16") -> int:
    return substitute(kv_cache_bytes_per_token(LM), assembly.dtype_values(dtype))


def activation_bytes(mode: Mode, p: Page, tokens: int, eng: Engine, dtype: str = "bf16") -> int:
    """Peak activations the engine reserves: the prefill's liveness peak for one page, scaled to the
    step's token budget (vLLM profiles a dummy run of max_num_batched_tokens; the vision encoder's peak
    per image is smaller at these budgets and is not added)."""
    from costgraph import stages
    from . import MODEL
    values = {**assembly.mode_values(mode), **_values(mode, p), S.output_tokens: p.output_tokens,
              **assembly.dtype_values(dtype)}
    peaks = stages.peaks(MODEL, mode, values, eng.variants, only=("decoder.prefill",))
    return int(peaks["decoder.prefill"]["bytes"] * tokens / prompt_tokens(mode, p))


# ---- the simulation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeConfig:
    max_num_seqs: int = 100            # the vendor script's MAX_CONCURRENCY
    gpu_memory_utilization: float = 0.9
    max_model_len: int = MAX_POSITIONS
    block_size: int | None = None      # None: the engine's (vLLM 256, as the vendor script sets)
    max_num_batched_tokens: int | None = None   # None: vLLM's default without chunked prefill, max(max_model_len, 2048)
    rate: float | None = None          # pages per second arriving (None: all at once, the vendor's batch script)


def serve(mode: Mode, pages: list[Page], eng: Engine, hw, cfg: ServeConfig = ServeConfig(), dtype: str = "bf16",
          progress=None) -> dict:
    """Simulate serving `pages` (in order) on one preset; returns the summary with its inputs."""
    if not pages:
        raise ValueError("no pages to serve")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {cfg.gpu_memory_utilization}")
    if cfg.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {cfg.max_num_seqs}")
    if not 0 < cfg.max_model_len <= MAX_POSITIONS:
        raise ValueError(f"max_model_len must be in 1..{MAX_POSITIONS}, got {cfg.max_model_len}")
    sm = StepModel(mode, eng, hw, dtype)
    kinds = {p.key: p for p in pages}
    prompts = {k: prompt_tokens(mode, p) for k, p in kinds.items()}
    for k, p in kinds.items():
        if prompts[k] + p.output_tokens - 1 > cfg.max_model_len:
            raise ValueError(f"a page of {prompts[k]} prompt tokens and {p.output_tokens} output tokens needs "
                             f"{prompts[k] + p.output_tokens - 1} positions; max_model_len is {cfg.max_model_len}")
    block = cfg.block_size or eng.block_size
    budget = cfg.max_num_batched_tokens or max(cfg.max_model_len, 2048)
    if eng.batching == "static":
        budget = max(budget, cfg.max_num_seqs * max(prompts.values()))   # HF: one padded batch, no token budget
    # memory: weights, the activations reserved, the rest for KV blocks
    any_page = next(iter(kinds.values()))
    longest = max(kinds, key=lambda k: prompts[k] + kinds[k].output_tokens)
    w = weight_bytes(mode, dtype)
    per_tok = kv_bytes_per_token(dtype)
    room = cfg.gpu_memory_utilization * hw.memory - w
    max_seqs = cfg.max_num_seqs
    if eng.batching == "static":
        # HF: a batch must hold every sequence's whole cache and its prefill activations at once (no paging,
        # no preemption: beyond that it runs out of memory), so the batch is what fits
        per_seq = activation_bytes(mode, kinds[longest], prompts[longest], eng, dtype) + \
            (prompts[longest] + kinds[longest].output_tokens) * per_tok
        max_seqs = min(max_seqs, int(room // per_seq))
        act = activation_bytes(mode, kinds[longest], max(1, max_seqs) * prompts[longest], eng, dtype)
    else:
        act = activation_bytes(mode, any_page, min(budget, cfg.max_num_seqs * max(prompts.values())), eng, dtype)
    free = room - act
    if free < block * per_tok or max_seqs < 1:
        raise ValueError(f"{hw.name}: {cfg.gpu_memory_utilization:.0%} of {hw.memory / 2**30:.0f} GiB leaves no room "
                         f"for a sequence after {w / 2**30:.2f} GiB of weights and {act / 2**30:.2f} GiB of activations")
    kv_blocks = int(free // (block * per_tok))
    # step-time tables (vectorised, once): prefill per page kind over batch sizes, decode over batch x context
    most = min(cfg.max_num_seqs, max(1, budget // min(prompts.values())))
    sizes = np.arange(1, most + 1)
    pre = {k: sm.prefill(p, sizes) for k, p in kinds.items()}
    vis = {k: sm.vision(p) for k, p in kinds.items()}
    lo = min(prompts.values())
    ctx = np.unique(np.linspace(lo, cfg.max_model_len, 64).astype(int))
    seqs = np.arange(1, cfg.max_num_seqs + 1)
    dec = sm.decode(any_page, seqs[:, None], ctx[None, :])

    def prefill_time(keys, lens) -> float:
        n = len(keys)
        if eng.batching == "static":   # padded to the longest prompt
            longest = max(keys, key=lambda k: prompts[k])
            return float(_at(pre[longest], sizes, n))
        return float(np.mean([_at(pre[k], sizes, n) for k in keys]))

    def decode_time(n: int, context: float) -> float:
        return float(np.interp(context, ctx, dec[n - 1]))

    reqs = [Request(prompts[p.key], p.output_tokens, vis[p.key], (i / cfg.rate) if cfg.rate else 0.0, key=p.key)
            for i, p in enumerate(pages)]
    limits = Limits(max_seqs, budget, cfg.max_model_len, block, kv_blocks, block * per_tok, eng.batching)
    res = simulate(reqs, StepTimes(prefill_time, decode_time), limits, progress)
    out = res.summary()
    out["memory"] = {"gpu_bytes": hw.memory, "utilization": cfg.gpu_memory_utilization, "weight_bytes": w,
                     "activation_bytes": act, "kv_bytes_per_token": per_tok, "kv_block_tokens": block,
                     "kv_blocks": kv_blocks, "kv_capacity_tokens": kv_blocks * block,
                     "max_sequences_by_kv": int(kv_blocks // max(-(-(prompts[k] + kinds[k].output_tokens) // block)
                                                               for k in kinds))}
    out["timeline"] = {k: v for k, v in res.timeline.items()}
    n_typ = min(cfg.max_num_seqs, out["max_concurrent_sequences"] or 1)
    out["step_seconds"] = {"vision_per_page": {str(k): v for k, v in vis.items()},
                           "prefill_one_page": {str(k): float(pre[k][0]) for k in kinds},
                           f"decode_step_batch_{n_typ}_at_prompt": float(dec[n_typ - 1][0]),
                           "decode_step_batch_1_at_prompt": float(dec[0][0])}
    out["decode_experts_hit"] = decode_experts(n_typ)
    out["decode_step_formulas"] = {m: str(decode_step_formula(mode, eng.name, m, dtype))
                                   for m in ("flops", "bytes_read", "bytes_written")}
    out["limits"] = {"max_num_seqs": cfg.max_num_seqs, "batch_that_fits": max_seqs, "max_num_batched_tokens": budget,
                     "max_model_len": cfg.max_model_len, "block_size": block,
                     "arrival": f"{cfg.rate} pages/s" if cfg.rate else "all at once"}
    return out


def _at(table: np.ndarray, sizes: np.ndarray, n: int) -> float:
    if n <= len(sizes):
        return float(table[n - 1])
    return float(table[-1] * n / len(sizes))   # beyond the table: linear in the batch
