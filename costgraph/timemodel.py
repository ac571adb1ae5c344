"""A time model that predicts, not only bounds: per node, compute at an achieved efficiency for its
op class and shape regime, memory at an achieved bandwidth, plus a per-kernel launch/dispatch cost.

Per node (one execution of its stage, batch multiplicities included, as `costgraph.roofline`):

    compute = flops / (tensor_flops * e_class) + elementwise_flops / (vector_flops * e.vector)
    memory  = (bytes_read + bytes_written) / (bandwidth * b_class)
    time    = max(compute, memory) + kernels * e.launch

- op class (by op kind, `CLASS`): matmul (linear, conv, bmm, einsum, routed experts), attention
  (score and value products, fused kernels), elementwise (arithmetic on every element), copy
  (data movement only: casts, cat, cache updates, gathers), free (views: no kernel, no time).
- shape regime of a matmul: *skinny* (GEMV-like: a decode step's few rows against a weight) when
  its arithmetic intensity flops / bytes is below `e.skinny` FLOP/byte; a skinny matmul streams its
  weights, so its memory side runs at `e.stream`; a large GEMM at `e.gemm` of the tensor peak.
  (For a bf16 GEMM of M rows against a K x N weight the intensity is about M, so the regime is a
  row count read off the graph's own FLOPs and bytes, no shape inspection needed.)
- cache regime (CPU presets): an elementwise op or copy whose traffic exceeds the caches (`cache_bytes`)
  runs at the DRAM fractions (`elementwise_dram`, `copy_dram`), a smaller one at the in-cache ones.
- max(): a kernel overlaps its loads with its arithmetic; nothing overlaps across nodes (eager).
- kernels: the aten kernels one node launches (`KERNELS`, by op kind; x its `launches` attr where a
  loop runs it per expert hit). CUDA graphs (vLLM decode) replay a step without per-kernel launch:
  `launch=False` drops that term. On a CPU the term is torch's dispatch overhead per op.

The efficiencies of a preset (`Efficiency`) are measured on this machine by `costgraph calibrate`
(`costgraph.calibrate`), or documented defaults for GPUs (`GPU_DEFAULT`: rules of thumb for cuBLAS,
flash-attention and elementwise kernels on data-centre GPUs, not measurements; a GPU user should
calibrate or adjust them). The engine knows no model: kinds are `costgraph.ops` kinds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import sympy as sp

from . import roofline as RL
from .evaluate import Compiled
from .hardware import GPU_DEFAULT, Efficiency, Hardware
from . import symbols as S
from .ops import converts

MATMUL, ATTENTION, ELEMENTWISE, COPY, FREE = "matmul", "attention", "elementwise", "copy", "free"
CLASS = {
    **dict.fromkeys(("linear", "conv2d", "bmm", "matmul", "einsum", "routed_linear", "rope_tables"), MATMUL),
    **dict.fromkeys(("sdpa", "attention_scores", "attention_values", "fused_attention"), ATTENTION),
    **dict.fromkeys(("cast", "clone", "pad", "cat", "index", "embedding", "masked_scatter_", "cache_update",
                     "heads_merge", "zeros_init", "expert_gather", "routed_gather", "reshape", "flatten", "slice",
                     "permute", "window_partition", "window_unpartition", "identity", "input"), COPY),
}
# Aten kernels one execution of a node runs (non-view ops), where not 1: read off the reference's
# dispatch trace (`python -m costgraph.verify.trace lm`). Casts to the same dtype launch nothing
# (`converts` is 0 there). A node of zero cost launches nothing.
def _kernels(kind: str, attrs: dict, out_itemsize) -> sp.Expr:
    to32 = converts(S.dtype_bytes, 4)
    table = {
        "rms_norm": 6 + 2 * to32,            # cast, pow, mean, add, rsqrt, mul, cast, mul
        "softmax_fp32": 1 + converts(attrs.get("_in_itemsize", 4), 4) + converts(4, out_itemsize),
        "rope_tables": 9,                    # cast, bmm|mul, cat, cos, sin, 2 mul, 2 casts
        "rope_apply": 5,                     # mul, neg, cat, mul, add
        "causal_mask": 10,                   # 4 aranges, 2 adds, le, zeros, scalar, where
        "position_ids": 2,                   # arange, add
        "expert_mask": 8,                    # aminmax, 2 item, zeros, scatter_, sum, gt, nonzero
        "expert_select": 6,                  # per hit: eq, 4 scalar reads, nonzero
        "heads_merge": _flag(attrs.get("copies", False)),
        "attention_scores": 1 + sp.sympify(attrs.get("q_copy", 0)),   # bmm (+ the copy of q)
    }
    if kind in ("reshape", "flatten", "slice", "permute", "window_partition", "window_unpartition"):
        return _flag(attrs.get("copy", False))
    n = sp.sympify(table.get(kind, 0 if kind in ("input", "identity", "rel_pos_coords") else 1))
    per = attrs.get("launches", attrs.get("hits") if kind in ("expert_select", "routed_linear", "index_add_")
                    else 1)
    return n * sp.sympify(per)


def _flag(v) -> sp.Expr:
    """A copy flag (a bool or a 0/1 indicator expression) as a number of kernels."""
    if isinstance(v, (bool, sp.logic.boolalg.BooleanAtom)):
        return sp.Integer(int(bool(v)))
    return sp.sympify(v)


def efficiency_for(hw: Hardware) -> Efficiency:
    """The preset's efficiencies: a calibrated preset carries its own; a GPU preset the defaults."""
    eff = getattr(hw, "efficiency", None)
    return eff if isinstance(eff, Efficiency) else GPU_DEFAULT


# ---- per-stage evaluation --------------------------------------------------------------------------

class StageTimes:
    """A stage's node metrics (compiled once: `costgraph.roofline.StageModel`) and kernel counts."""

    def __init__(self, graph, scope: str, fixed: dict):
        self.metrics = RL.stage_model(graph, scope, fixed)
        self.nodes = self.metrics.nodes
        self.classes = np.array([CLASS.get(graph.g.nodes[n]["kind"], ELEMENTWISE) for n in self.nodes])
        unique: dict[sp.Expr, str] = {}   # repeated layers: each distinct count compiled once
        self._keys = []
        for n in self.nodes:
            d = graph.g.nodes[n]
            attrs = dict(d["attrs"])
            if d["in_itemsizes"]:
                attrs["_in_itemsize"] = d["in_itemsizes"][0]
            e = RL.batch_factor(graph, n) * _kernels(d["kind"], attrs, d["out_itemsize"])
            self._keys.append(unique.setdefault(e, f"k{len(unique)}"))
        self._kernels = Compiled({key: e for e, key in unique.items()}, fixed=fixed)
        self.args = sorted(set(self.metrics.args) | {s.name for s in self._kernels.args})

    def evaluate(self, values: dict) -> tuple[dict, np.ndarray]:
        raw = self.metrics.raw(values)
        shape = raw["flops"].shape[1:]
        k = self._kernels(**{a.name: values[a.name] for a in self._kernels.args})
        kernels = np.stack([np.broadcast_to(k[key], shape) for key in self._keys]) \
            if self.nodes else np.zeros((0, *shape))
        return raw, kernels


@lru_cache(maxsize=None)
def _stage(graph_key: int, scope: str, fixed_items: tuple) -> StageTimes:
    return StageTimes(RL._GRAPHS[graph_key], scope, dict(fixed_items))


def stage_times(graph, scope: str, fixed: dict) -> StageTimes:
    RL._GRAPHS[id(graph)] = graph
    return _stage(id(graph), scope, tuple(sorted(fixed.items(), key=lambda kv: kv[0].name)))


@dataclass
class Prediction:
    nodes: list
    classes: np.ndarray
    compute: np.ndarray      # seconds (nodes, ...)
    memory: np.ndarray
    overhead: np.ndarray
    kernels: np.ndarray

    @property
    def time(self) -> np.ndarray:
        return np.maximum(self.compute, self.memory) + self.overhead

    def total(self) -> np.ndarray:
        return self.time.sum(axis=0)

    def by_class(self) -> dict[str, float]:
        """Seconds per op class (and the launch term) of one execution: the mean over the points evaluated."""
        points = max(1, int(np.prod(self.compute.shape[1:])))
        t = np.maximum(self.compute, self.memory)
        out = {c: float(t[self.classes == c].sum()) / points for c in (MATMUL, ATTENTION, ELEMENTWISE, COPY)}
        out["launch"] = float(self.overhead.sum()) / points
        return out


def predict(raw: dict, kernels: np.ndarray, classes: np.ndarray, nodes: list, hw: Hardware, eff: Efficiency,
            launch: bool = True) -> Prediction:
    f, e, b = (raw[k].astype(float) for k in ("flops", "elementwise_flops", "bytes"))
    cls = classes.reshape((-1,) + (1,) * (f.ndim - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = np.where(b > 0, f / np.maximum(b, 1), np.inf)
    skinny = (cls == MATMUL) & (intensity < eff.skinny)
    peak = np.where(cls == ATTENTION, eff.attention, eff.gemm) * hw.tensor_flops
    compute = f / peak + e / (hw.vector_flops * eff.vector)
    big = b > eff.cache_bytes if eff.cache_bytes else np.zeros(b.shape, dtype=bool)
    copy = np.where(big, eff.copy_dram or eff.copy, eff.copy)
    elementwise = np.where(big, eff.elementwise_dram or eff.elementwise, eff.elementwise)
    bw = np.select([cls == COPY, cls == ELEMENTWISE, skinny], [copy, elementwise, eff.stream], eff.stream)
    memory = b / (hw.bandwidth * bw)
    overhead = kernels * (eff.launch if launch else 0.0)
    return Prediction(nodes, classes, compute, memory, overhead, kernels)


def stage_prediction(graph, scope: str, fixed: dict, values: dict, hw: Hardware, eff: Efficiency | None = None,
                     launch: bool = True) -> Prediction:
    """Predicted seconds per node of one execution of `scope` at `values` (arrays broadcast)."""
    st = stage_times(graph, scope, fixed)
    v = {(k.name if hasattr(k, "name") else k): x for k, x in values.items()}
    raw, kernels = st.evaluate(v)
    return predict(raw, kernels, st.classes, st.nodes, hw, eff or efficiency_for(hw), launch)


def with_efficiency(hw: Hardware, eff: Efficiency) -> Hardware:
    """The preset carrying `eff` (a calibrated preset's own efficiencies)."""
    return replace(hw, efficiency=eff)
