"""Serving a page model (SPEC section 8), generic over the model: engines, batches of pages, step times,
memory and the continuous-batching (or static-batch) simulation of a stream of pages.

A model takes part through a `Served` record (a subclass per model: `graphs/<model>/serving.py`; the
model's `serving()` hands it to the app): its modes and layout rule, its prompt length, the values a
layout substitutes, its vision graph and stages, its language model with `costgraph.symbols.batch` (B)
sequences per step, its weights and KV bytes per token, its engines and the throughput claims published
for it (None: none). Everything below is the same for every model:

- `vllm_graph`: the language model as vLLM runs it (K and V written in place into the paged cache, the
  routed experts one fused kernel per op);
- `StepModel`: predicted seconds of a page's vision, a batched prefill, a batched decode step on a preset
  (`costgraph.timemodel`);
- `serve`: weights, reserved activations and KV blocks on the preset, then `costgraph.simulate` over the pages.

Vision runs image by image in both engines (a batch of pages costs the sum of its pages' vision). For
pages of one layout the batched prefill is the (B, L) graph; for mixed pages the simulator uses the padded
cost (static batches, HF) or the mean of the per-layout costs at that batch size (continuous batching,
vLLM: exact for the linear parts, the attention of a mixed batch approximated). KV memory: whole blocks of
`block_size` tokens; a decode step reads the cached tokens it attends, so bytes follow the context, memory
the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import sympy as sp

from costgraph import symbols as ES
from costgraph import timemodel as TM
from costgraph.cost import Cost
from costgraph.dtypes import INT64
from costgraph.evaluate import substitute
from costgraph.graph import CostGraph
from costgraph.ops import nbytes, prod, Spec
from costgraph.simulate import Limits, Request, StepTimes, simulate


@dataclass(frozen=True)
class Engine:
    name: str
    variants: object          # the model's language-model variants (attention, lm_head, rope)
    max_num: int              # crops at most
    paged: bool               # KV written in place into a paged cache (no concatenation)
    cuda_graphs: bool         # decode steps replayed without per-kernel launches
    batching: str             # "continuous" or "static"
    block_size: int           # KV allocation unit (tokens)
    note: str

    def as_dict(self) -> dict:
        return {"engine": self.name, **self.variants.as_dict(), "max_num": self.max_num, "paged_kv": self.paged,
                "cuda_graphs_decode": self.cuda_graphs, "batching": self.batching, "block_size": self.block_size}


def vllm_graph(g: CostGraph) -> CostGraph:
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


@dataclass(frozen=True)
class Page:
    """One kind of page: its layout and sequence lengths."""
    layout: object
    text_tokens: int
    output_tokens: int

    @property
    def key(self) -> tuple:
        return (self.layout.w_crop, self.layout.h_crop, self.layout.tiled, self.text_tokens)


@dataclass(frozen=True)
class ServeConfig:
    max_num_seqs: int = 100            # the vendor script's MAX_CONCURRENCY
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None   # None: the model's positions
    block_size: int | None = None      # None: the engine's (vLLM 256, as the vendor script sets)
    max_num_batched_tokens: int | None = None   # None: vLLM's default without chunked prefill, max(max_model_len, 2048)
    rate: float | None = None          # pages per second arriving (None: all at once, the vendor's batch script)


class Served:
    """What serving needs of one model; a model's subclass fills the hooks (`NotImplementedError` here)."""

    model = None                  # the `costgraph.model.Model`
    engines: dict[str, Engine] = {}
    published: dict | None = None  # claims to print beside a prediction; None: none published
    max_positions: int = 0

    # ---- hooks --------------------------------------------------------------------------------------
    def layout_for(self, width: int, height: int, mode, max_num: int):
        raise NotImplementedError

    def check_sequence(self, mode, layout, text_tokens: int, output_tokens: int) -> None:
        """Refuse a page whose prompt and output do not fit the model's positions (ValueError)."""
        raise NotImplementedError

    def image_tokens(self, layout, mode) -> int:
        raise NotImplementedError

    def layout_values(self, layout) -> dict:
        raise NotImplementedError

    def dtype_values(self, dtype: str) -> dict:
        """The storage dtype's substitution (symbol -> bytes)."""
        raise NotImplementedError

    def vision_graph(self, mode) -> CostGraph:
        raise NotImplementedError

    def vision_scopes(self, mode) -> tuple[str, ...]:
        raise NotImplementedError

    def vision_formula(self, mode, metric: str):
        raise NotImplementedError

    def lm_graph(self, mode, variants, batch) -> CostGraph:
        """The language model alone with `batch` sequences per step (B = 1: the per-page graph)."""
        raise NotImplementedError

    def prompt_length(self, mode) -> sp.Expr:
        raise NotImplementedError

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        raise NotImplementedError

    def decode_experts(self, batch: int) -> dict:
        """Distinct experts one MoE layer runs in a decode step of `batch` sequences: prediction and bound."""
        raise NotImplementedError

    # ---- generic ------------------------------------------------------------------------------------
    @property
    def modes(self) -> dict:
        return self.model.modes

    @property
    def default_mode(self) -> str:
        return self.model.default_mode

    def get_mode(self, name: str | None):
        return self.model.get_mode(self.default_mode if name is None else name)

    def engine(self, name: str) -> Engine:
        try:
            return self.engines[name]
        except KeyError:
            raise ValueError(f"unknown engine {name!r} (choose from {', '.join(self.engines)})") from None

    def e2e_formula(self, mode, metric: str, variants):
        return self.model.formula(mode, "e2e", metric, variants)

    def batched_graph(self, mode, engine_name: str, batch=ES.batch) -> CostGraph:
        """The language model of `engine` with `batch` sequences per step (symbolic B by default)."""
        return _batched(self, mode, engine_name, batch)

    def page(self, mode, width: int, height: int, eng: Engine, text_tokens: int, output_tokens: int) -> Page:
        lay = self.layout_for(width, height, mode, eng.max_num)
        self.check_sequence(mode, lay, text_tokens, output_tokens)   # checks the positions
        return Page(lay, text_tokens, output_tokens)

    def prompt_tokens(self, mode, p: Page) -> int:
        return 1 + p.text_tokens + self.image_tokens(p.layout, mode)

    def page_values(self, p: Page) -> dict:
        return {**self.layout_values(p.layout), ES.text_tokens: p.text_tokens}

    def fixed_values(self, mode, dtype: str) -> dict:
        """The mode's and the dtype's substitutions (symbol -> number)."""
        return {**self.model.mode_values(mode), **self.dtype_values(dtype)}

    def weight_bytes(self, mode, dtype: str = "bf16") -> int:
        from costgraph import stages
        return int(stages.param_summary(self.model, mode, self.dtype_values(dtype))["resident_weight_bytes"])

    def activation_bytes(self, mode, p: Page, tokens: int, eng: Engine, dtype: str = "bf16") -> int:
        """Peak activations the engine reserves: the prefill's liveness peak for one page, scaled to the
        step's token budget (vLLM profiles a dummy run of max_num_batched_tokens; the vision encoder's
        peak per image is smaller at these budgets and is not added)."""
        from costgraph import stages
        values = {**self.model.mode_values(mode), **self.page_values(p), ES.output_tokens: p.output_tokens,
                  **self.dtype_values(dtype)}
        peaks = stages.peaks(self.model, mode, values, eng.variants, only=("decoder.prefill",))
        return int(peaks["decoder.prefill"]["bytes"] * tokens / self.prompt_tokens(mode, p))

    def vision_batch(self, mode, layouts: list, metric: str = "flops", dtype: str = "bf16") -> int:
        """A batch of pages through the vision encoders: both engines encode image by image (the global
        view, then the page's crop batch), so the batch costs the sum of its pages' `vision` totals."""
        f = self.vision_formula(mode, metric)
        return sum(substitute(f, {**self.layout_values(l), **self.dtype_values(dtype)}) for l in layouts)

    def decode_step_formula(self, mode, engine_name: str, metric: str, dtype: str = "bf16"):
        return _decode_step_formula(self, mode, engine_name, metric, dtype)

    def step_model(self, mode, eng: Engine, hw, dtype: str = "bf16", eff=None) -> "StepModel":
        return StepModel(self, mode, eng, hw, dtype, eff)

    def serve(self, mode, pages: list[Page], eng: Engine, hw, cfg: ServeConfig = ServeConfig(),
              dtype: str = "bf16", progress=None) -> dict:
        return serve(self, mode, pages, eng, hw, cfg, dtype, progress)


@lru_cache(maxsize=None)
def _batched(sv: Served, mode, engine_name: str, batch) -> CostGraph:
    e = sv.engine(engine_name)
    g = sv.lm_graph(mode, e.variants, batch)
    return vllm_graph(g) if e.paged else g


@lru_cache(maxsize=None)
def _decode_step_formula(sv: Served, mode, engine_name: str, metric: str, dtype: str):
    """One decode step of B sequences at context C (each sequence's attended length), in closed form:
    symbolic in B and C (`costgraph.symbols.batch`, `context`); decode costs depend on the page only
    through its context. The weights' share is the term without B (the routed experts' part grows
    with B); every term in B is per sequence (its KV cache, its tokens)."""
    g = sv.batched_graph(mode, engine_name)
    e = sp.Add(*[g.cost(n)[metric] for n in g.nodes("decoder.decode")])
    e = e.subs(ES.decode_step, ES.context - sv.prompt_length(mode))
    e = e.subs(sv.fixed_values(mode, dtype))
    return sp.collect(sp.expand(e), ES.batch)


class StepModel:
    """Predicted seconds of serving steps on one preset: vision per page, batched prefill, batched decode."""

    def __init__(self, sv: Served, mode, eng: Engine, hw, dtype: str = "bf16", eff=None):
        self.sv, self.mode, self.engine, self.hw = sv, mode, eng, hw
        self.eff = eff or TM.efficiency_for(hw)
        self.fixed = sv.fixed_values(mode, dtype)
        self.graph = sv.batched_graph(mode, eng.name)
        self.vision_graph = sv.vision_graph(mode)

    def vision(self, p: Page) -> float:
        v = {k.name: x for k, x in self.sv.layout_values(p.layout).items()}
        return float(sum(TM.stage_prediction(self.vision_graph, s, self.fixed, v, self.hw, self.eff).total()
                         for s in self.sv.vision_scopes(self.mode)))

    def prefill(self, p: Page, batch) -> np.ndarray:
        v = {k.name: x for k, x in self.sv.page_values(p).items()}
        v[ES.batch.name] = np.asarray(batch)
        return TM.stage_prediction(self.graph, "decoder.prefill", self.fixed, v, self.hw, self.eff).total()

    def decode(self, p: Page, batch, context) -> np.ndarray:
        """One decode step of `batch` sequences at `context` (the attended length, prompt + t): decode
        costs depend on the page only through prompt + t, so any page gives every context."""
        L = self.sv.prompt_tokens(self.mode, p)
        v = {k.name: x for k, x in self.sv.page_values(p).items()}
        v[ES.batch.name] = np.asarray(batch)
        v[ES.decode_step.name] = np.asarray(context) - L
        return TM.stage_prediction(self.graph, "decoder.decode", self.fixed, v, self.hw, self.eff,
                                   launch=not self.engine.cuda_graphs).total()


def serve(sv: Served, mode, pages: list[Page], eng: Engine, hw, cfg: ServeConfig = ServeConfig(),
          dtype: str = "bf16", progress=None) -> dict:
    """Simulate serving `pages` (in order) on one preset; returns the summary with its inputs."""
    if cfg.max_model_len is None:
        cfg = replace(cfg, max_model_len=sv.max_positions)
    if not pages:
        raise ValueError("no pages to serve")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {cfg.gpu_memory_utilization}")
    if cfg.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {cfg.max_num_seqs}")
    if not 0 < cfg.max_model_len <= sv.max_positions:
        raise ValueError(f"max_model_len must be in 1..{sv.max_positions}, got {cfg.max_model_len}")
    sm = StepModel(sv, mode, eng, hw, dtype)
    kinds = {p.key: p for p in pages}
    prompts = {k: sv.prompt_tokens(mode, p) for k, p in kinds.items()}
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
    w = sv.weight_bytes(mode, dtype)
    per_tok = sv.kv_bytes_per_token(dtype)
    room = cfg.gpu_memory_utilization * hw.memory - w
    max_seqs = cfg.max_num_seqs
    if eng.batching == "static":
        # HF: a batch must hold every sequence's whole cache and its prefill activations at once (no paging,
        # no preemption: beyond that it runs out of memory), so the batch is what fits
        per_seq = sv.activation_bytes(mode, kinds[longest], prompts[longest], eng, dtype) + \
            (prompts[longest] + kinds[longest].output_tokens) * per_tok
        max_seqs = min(max_seqs, int(room // per_seq))
        act = sv.activation_bytes(mode, kinds[longest], max(1, max_seqs) * prompts[longest], eng, dtype)
    else:
        act = sv.activation_bytes(mode, any_page, min(budget, cfg.max_num_seqs * max(prompts.values())), eng, dtype)
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
    out["decode_experts_hit"] = sv.decode_experts(n_typ)
    out["decode_step_formulas"] = {m: str(sv.decode_step_formula(mode, eng.name, m, dtype))
                                   for m in ("flops", "bytes_read", "bytes_written")}
    out["limits"] = {"max_num_seqs": cfg.max_num_seqs, "batch_that_fits": max_seqs, "max_num_batched_tokens": budget,
                     "max_model_len": cfg.max_model_len, "block_size": block,
                     "arrival": f"{cfg.rate} pages/s" if cfg.rate else "all at once"}
    return out


def _at(table: np.ndarray, sizes: np.ndarray, n: int) -> float:
    if n <= len(sizes):
        return float(table[n - 1])
    return float(table[-1] * n / len(sizes))   # beyond the table: linear in the batch
