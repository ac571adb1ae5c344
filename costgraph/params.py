"""Parameters (weights) of the graph: per node, and resident / executed / active totals.

Parameters are node data, not a per-execution `Cost`: a batch of views or a decode step that runs
a layer again does not create new weights, so no multiplicity or summation touches them.

- Per node: a registry keyed by op kind (like `costgraph.ops`) reads the node's input specs and
  attrs and returns its `Weights`: the stored count, the element size, and the count one token
  (one row) uses. Weight-bearing ops: linear, conv2d, layer_norm, rms_norm, embedding, and
  `input` nodes marked as parameters (`b.input(path, shape, param=True)`; `param=<shape>` gives
  the stored shape when the node's shape is a gathered one, as gathered relative-position tables are).
- Node attrs read here (never passed to the cost formulas unless a formula names them):
  `param` (inputs), `experts` (stored copies of a linear: MoE routed experts), `active_experts`
  (copies one token runs through), `weight_itemsize` (when the weight's element size is not
  the input's).
- Resident: what a checkpoint stores. Scopes under one root (e.g. two branches of one encoder;
  `decoder.prefill` and `decoder.decode`) run the same modules, so weights are deduplicated by
  (root scope, module path). A parameter input with no consumer is loaded but never executed
  (a patch embedding a model loads but bypasses): resident, not executed.
- Executed: the weights a scope's nodes use (deduplicated the same way within the scope).
- Active per token: executed weights, MoE experts counted `active_experts` of `experts`, an
  embedding table counted as the one row a token looks up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy as sp

from . import symbols as S
from .ops import prod

ZERO = sp.Integer(0)
# Node attrs that are node data for this module, not arguments of the cost formulas.
NODE_ATTRS = ("param", "experts", "active_experts", "weight_itemsize", "launches")  # launches: costgraph.timemodel


@dataclass(frozen=True)
class Weights:
    count: sp.Expr = ZERO                 # stored parameters
    itemsize: sp.Expr = S.dtype_bytes     # bytes per stored element
    active: sp.Expr = ZERO                # parameters one token (one row) uses

    @property
    def nbytes(self) -> sp.Expr:
        return self.count * self.itemsize

    @property
    def active_bytes(self) -> sp.Expr:
        return self.active * self.itemsize

    def __bool__(self) -> bool:
        return self.count != 0


NONE = Weights()
WeightFormula = Callable[..., Weights]
PARAMS: dict[str, WeightFormula] = {}


def register(*kinds: str):
    """Register a weight rule for op kinds; a kind registered twice raises."""
    def deco(fn: WeightFormula) -> WeightFormula:
        for k in kinds:
            if k in PARAMS:
                raise ValueError(f"weights of op kind {k!r} are already registered ({PARAMS[k].__name__})")
            PARAMS[k] = fn
        return fn
    return deco


def _itemsize(inputs, attrs, default) -> sp.Expr:
    return sp.sympify(attrs.get("weight_itemsize", default))


@register("linear")
def linear(inputs, attrs, out_itemsize) -> Weights:
    per = attrs["in_features"] * attrs["out_features"] + (attrs["out_features"] if attrs.get("bias", True) else 0)
    copies = attrs.get("experts", 1)
    active = attrs.get("active_experts", copies)
    return Weights(sp.sympify(per * copies), _itemsize(inputs, attrs, inputs[0].itemsize), sp.sympify(per * active))


@register("conv2d")
def conv2d(inputs, attrs, out_itemsize) -> Weights:
    k = sp.sympify(attrs["kernel"])
    n = attrs["in_channels"] * attrs["out_channels"] * k ** 2 + (attrs["out_channels"] if attrs.get("bias", True) else 0)
    return Weights(sp.sympify(n), _itemsize(inputs, attrs, inputs[0].itemsize), sp.sympify(n))


def _normalized(inputs, attrs) -> sp.Expr:
    """Size of the normalised dimension: the last, or dim 1 for a channels-first LayerNorm2d."""
    for key in ("normalized_shape", "channels", "num_features"):
        if key in attrs:
            v = attrs[key]
            return prod(v) if isinstance(v, (tuple, list)) else sp.sympify(v)
    x = inputs[0]
    if attrs.get("channels_first") or attrs.get("data_format") == "channels_first" or attrs.get("dim") == 1:
        return sp.sympify(x[1])
    return sp.sympify(x[-1])


@register("layer_norm")
def layer_norm(inputs, attrs, out_itemsize) -> Weights:
    if attrs.get("affine", True) is False:
        return NONE
    n = 2 * _normalized(inputs, attrs)  # weight and bias
    return Weights(n, _itemsize(inputs, attrs, inputs[0].itemsize), n)


@register("rms_norm")
def rms_norm(inputs, attrs, out_itemsize) -> Weights:
    n = _normalized(inputs, attrs)  # weight only
    return Weights(n, _itemsize(inputs, attrs, inputs[0].itemsize), n)


@register("embedding")
def embedding(inputs, attrs, out_itemsize) -> Weights:
    dim = sp.sympify(attrs["embedding_dim"])
    # the table is in the output's dtype (the input holds integer ids); a token reads one row
    return Weights(attrs["num_embeddings"] * dim, _itemsize(inputs, attrs, out_itemsize), dim)


@register("routed_linear")
def routed_linear(inputs, attrs, out_itemsize) -> Weights:
    """MoE routed experts: `experts` stored copies, `active_experts` of them per token."""
    per = attrs["in_features"] * attrs["out_features"]
    return Weights(sp.sympify(per * attrs["experts"]), inputs[0].itemsize,
                     sp.sympify(per * attrs["active_experts"]))


@register("input")
def input_(inputs, attrs, out_itemsize) -> Weights:
    param = attrs.get("param")
    if param is None or param is False:
        return NONE
    shape = attrs["shape"] if param is True else tuple(param)
    n = prod(shape)
    return Weights(n, _itemsize(inputs, attrs, out_itemsize), n)


def weights_of(kind: str, inputs, attrs: dict, out_itemsize) -> Weights:
    """The stored weights of one node (NONE for ops without parameters)."""
    fn = PARAMS.get(kind)
    if fn is None:
        if attrs.get("param"):
            raise ValueError(f"op kind {kind!r} has no weight rule in costgraph/params.py but the node says "
                             f"it is a parameter")
        return NONE
    return fn(inputs, attrs, sp.sympify(out_itemsize))


# ---- totals over a graph ---------------------------------------------------------------------

def _root(scope: str) -> str:
    return scope.partition(".")[0]


def _executed(graph, node: str) -> bool:
    data = graph.g.nodes[node]
    return data["kind"] != "input" or graph.g.out_degree(node) > 0


def by_module(graph, nodes, executed_only: bool) -> dict[tuple[str, str], Weights]:
    """Weights by (root scope, module path): a module's weights once however many scopes run it."""
    out: dict[tuple[str, str], Weights] = {}
    for n in nodes:
        w = graph.g.nodes[n].get("weights", NONE)
        if not w or (executed_only and not _executed(graph, n)):
            continue
        key = (_root(graph.g.nodes[n]["scope"]), graph.g.nodes[n]["path"])
        if key in out and out[key] != w:
            raise ValueError(f"module {key[1]!r} has different weights in two scopes: {out[key]} vs {w}")
        out[key] = w
    return out


@dataclass(frozen=True)
class ParamTotals:
    params: sp.Expr
    weight_bytes: sp.Expr
    active: sp.Expr
    active_bytes: sp.Expr
    modules: int

    def as_dict(self) -> dict[str, sp.Expr]:
        return {"params": self.params, "weight_bytes": self.weight_bytes, "active_params": self.active,
                "active_weight_bytes": self.active_bytes, "modules": sp.Integer(self.modules)}


def total(ws) -> ParamTotals:
    """The totals of a set of modules' weights (each counted once)."""
    ws = list(ws)
    return ParamTotals(sp.Add(*[w.count for w in ws]), sp.expand(sp.Add(*[w.nbytes for w in ws])),
                       sp.Add(*[w.active for w in ws]), sp.expand(sp.Add(*[w.active_bytes for w in ws])), len(ws))


def resident(graph, scope: str | None = None) -> ParamTotals:
    """What the checkpoint stores (for `scope`'s root, or the whole graph): executed or not, once each."""
    nodes = graph.nodes(_root(scope) if scope else None)
    return total(by_module(graph, nodes, executed_only=False).values())


def executed(graph, scope: str) -> ParamTotals:
    """Weights the nodes of `scope` (and its sub-scopes) use, once each; `active` is per token."""
    return total(by_module(graph, graph.nodes(scope), executed_only=True).values())


def unexecuted(graph, scope: str | None = None) -> dict[str, sp.Expr]:
    """Resident parameters no node executes (loaded, never run): module path -> count."""
    nodes = graph.nodes(_root(scope) if scope else None)
    run = by_module(graph, nodes, executed_only=True)
    return {path: w.count for (root, path), w in by_module(graph, nodes, executed_only=False).items()
            if (root, path) not in run}


def per_node(graph, scope: str) -> dict[str, Weights]:
    """Weights of every weight-bearing node of `scope` (node id -> Weights), in graph order."""
    return {n: graph.g.nodes[n]["weights"] for n in graph.nodes(scope) if graph.g.nodes[n].get("weights", NONE)}
