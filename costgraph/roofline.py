"""Roofline latency: per node, time = max(compute, memory), summed over the nodes of a stage.

    compute = flops / tensor_flops + elementwise_flops / vector_flops
    memory  = (bytes_read + bytes_written) / bandwidth
    time    = max(compute, memory)        (an unfused node: nothing overlaps across nodes)

Nodes are costed per execution of the stage: a batched scope (a batch of views) multiplies its
nodes' costs by its multiplicity; a summed scope (the decode forwards) is evaluated at every
step t as a numpy array. The per-node metric expressions are compiled once per stage
(`costgraph.evaluate.Compiled`) and evaluated vectorised; the hardware only enters afterwards
in numpy, so several presets cost one evaluation.

Arithmetic intensity of a node: (flops + elementwise_flops) / (bytes_read + bytes_written); a
node is compute-bound when its compute time exceeds its memory time (its intensity is above
the hardware's ridge point for its mix of tensor and vector work).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

from .evaluate import Compiled
from .hardware import Hardware

RAW = ("flops", "elementwise_flops", "bytes")


def batch_factor(graph, node: str) -> sp.Expr:
    """Copies of the node one execution of its stage runs: the batch multiplicities of its scopes."""
    k = sp.Integer(1)
    for s in graph.chain(graph.g.nodes[node]["scope"]):
        if s.sum_over is None:
            k *= s.multiplicity
    return k


def stage_nodes(graph, scope: str) -> list[str]:
    """Nodes that cost something in the roofline metrics, in execution order."""
    out = []
    for n in graph.nodes(scope):
        c = graph.cost(n)
        if any(sp.sympify(e) != 0 for e in (c.flops, c.elementwise_flops, c.bytes_read, c.bytes_written)):
            out.append(n)
    return out


class StageModel:
    """One stage's per-node flops, elementwise flops and bytes, compiled once."""

    def __init__(self, graph, scope: str, fixed: dict | None = None):
        self.scope = scope
        self.nodes = stage_nodes(graph, scope)
        # Repeated layers have identical expressions: each distinct one is compiled once.
        unique: dict[sp.Expr, str] = {}
        self._keys: dict[str, list[str]] = {p: [] for p in "feb"}
        for n in self.nodes:
            c, k = graph.cost(n), batch_factor(graph, n)
            for p, e in (("f", c.flops), ("e", c.elementwise_flops), ("b", c.bytes_read + c.bytes_written)):
                e = sp.expand(k * e)
                self._keys[p].append(unique.setdefault(e, f"x{len(unique)}"))
        self._compiled = Compiled({key: e for e, key in unique.items()}, fixed=fixed)
        self.args = [s.name for s in self._compiled.args]

    def raw(self, values: dict) -> dict[str, np.ndarray]:
        """{'flops', 'elementwise_flops', 'bytes'}: arrays (nodes, *broadcast shape of the values)."""
        out = self._compiled(**{k: v for k, v in values.items() if k in self.args})
        shape = np.broadcast_shapes(*(np.shape(v) for v in out.values())) if out else ()
        stack = lambda p: np.stack([np.broadcast_to(out[key], shape) for key in self._keys[p]]) \
            if self.nodes else np.zeros((0, *shape), dtype=np.int64)
        return {"flops": stack("f"), "elementwise_flops": stack("e"), "bytes": stack("b")}


@dataclass
class NodeTimes:
    nodes: list[str]
    compute: np.ndarray      # seconds, (nodes, ...)
    memory: np.ndarray
    raw: dict

    @property
    def time(self) -> np.ndarray:
        return np.maximum(self.compute, self.memory)

    @property
    def intensity(self) -> np.ndarray:
        work = (self.raw["flops"] + self.raw["elementwise_flops"]).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.raw["bytes"] > 0, work / self.raw["bytes"], np.inf)

    @property
    def compute_bound(self) -> np.ndarray:
        return self.compute > self.memory


def node_times(raw: dict, hw: Hardware, nodes: list[str]) -> NodeTimes:
    compute = raw["flops"] / hw.tensor_flops + raw["elementwise_flops"] / hw.vector_flops
    memory = raw["bytes"] / hw.bandwidth
    return NodeTimes(nodes, compute, memory, raw)


@lru_cache(maxsize=None)
def _model(graph_key, scope: str, fixed_items: tuple) -> StageModel:
    graph = _GRAPHS[graph_key]
    return StageModel(graph, scope, dict(fixed_items))


_GRAPHS: dict[int, object] = {}


def stage_model(graph, scope: str, fixed: dict) -> StageModel:
    """Cached per (graph, scope, fixed values): compiling a stage takes a moment, evaluating it does not."""
    _GRAPHS[id(graph)] = graph
    return _model(id(graph), scope, tuple(sorted(fixed.items(), key=lambda kv: kv[0].name)))


# ---- the stages of a generation ----------------------------------------------------------------

def stage_report(times: NodeTimes, top: int = 0) -> dict:
    """Totals of one stage (one execution): seconds, compute- vs memory-bound split, top nodes."""
    t = times.time
    total = float(t.sum())
    bound = times.compute_bound
    out = {"seconds": total, "compute_seconds": float(times.compute.sum()),
           "memory_seconds": float(times.memory.sum()),
           "compute_bound_seconds": float(t[bound].sum()), "memory_bound_seconds": float(t[~bound].sum()),
           "nodes": len(times.nodes), "compute_bound_nodes": int(bound.sum())}
    if top:
        order = np.argsort(-t)[:top]
        out["top_nodes"] = [node_record(times, i) for i in order]
    return out


def node_record(times: NodeTimes, i: int) -> dict:
    inten = float(times.intensity[i])
    return {"node": times.nodes[i], "seconds": float(times.time[i]),
            "bound": "compute" if times.compute_bound[i] else "memory",
            "intensity": None if not np.isfinite(inten) else round(inten, 3),
            "flops": int(times.raw["flops"][i]), "elementwise_flops": int(times.raw["elementwise_flops"][i]),
            "bytes": int(times.raw["bytes"][i])}


def decode_steps(output_tokens: int) -> np.ndarray:
    """The decode forwards of a generation: t = 1..output_tokens-1 (the prefill yields token 1)."""
    return np.arange(1, max(int(output_tokens), 1), dtype=np.int64)


def per_node(graph, scope: str, fixed: dict, values: dict, hw: Hardware) -> NodeTimes:
    m = stage_model(graph, scope, fixed)
    return node_times(m.raw(values), hw, m.nodes)


def ridge(hw: Hardware) -> dict:
    """Intensities (FLOP/byte) above which pure tensor or pure vector work is compute-bound."""
    return {"tensor": hw.tensor_flops / hw.bandwidth, "vector": hw.vector_flops / hw.bandwidth}
