"""The cost graph: one networkx node per vendor operation, grouped in scopes.

A node is `<scope>.<module path>` (e.g. `vision.views.blocks.3.attn.qkv`) and carries
its op kind, symbolic input/output shapes and its per-execution `Cost`. Edges are data
flow. A scope is a named subgraph that runs `multiplicity` times (a branch
run once per view) and may be summed over an index (decode step t = lo..hi). A scope's total
is a sympy sum: there is no numeric "effective batch" anywhere.
"""
from __future__ import annotations

import inspect
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Iterable, Mapping, NamedTuple

import networkx as nx
import sympy as sp

from . import ops
from . import params
from . import symbols as S
from .cost import METRICS, Cost


class Tensor(NamedTuple):
    node: str
    shape: tuple
    itemsize: sp.Expr = S.dtype_bytes  # bytes per element

    @property
    def spec(self) -> ops.Spec:
        return ops.Spec(self.shape, self.itemsize)


@dataclass(frozen=True)
class Scope:
    name: str
    multiplicity: sp.Expr = sp.Integer(1)
    # (index symbol, lo, hi): the scope's body is summed over the index, inclusive.
    sum_over: tuple | None = None
    doc: str = ""


@dataclass
class CostGraph:
    name: str
    params: dict = field(default_factory=dict)  # what the graph was built for (mode, variants)

    def __post_init__(self):
        self.g = nx.DiGraph(name=self.name)
        self.scopes: dict[str, Scope] = {}

    # ---- building ----------------------------------------------------------------
    def scope(self, name: str, multiplicity=1, sum_over=None, doc: str = "") -> "ScopeBuilder":
        parent = name.rpartition(".")[0]
        if parent and parent not in self.scopes:
            raise ValueError(f"scope {name!r} needs its parent {parent!r} first")
        self.scopes[name] = Scope(name, sp.sympify(multiplicity), sum_over, doc)
        return ScopeBuilder(self, name)

    def builder(self, name: str) -> "ScopeBuilder":
        if name not in self.scopes:
            raise ValueError(f"unknown scope {name!r}")
        return ScopeBuilder(self, name)

    def add_node(self, scope: str, path: str, kind: str, inputs: Iterable[Tensor], **attrs) -> Tensor:
        if scope not in self.scopes:
            raise ValueError(f"unknown scope {scope!r}")
        node = f"{scope}.{path}"
        if node in self.g:
            raise ValueError(f"duplicate node {node!r}")
        inputs = list(inputs)
        # The output's element size: `out_itemsize` if the node says (a cast, an fp32 router),
        # else its first input's, else the storage dtype's.
        formula_attrs = _formula_attrs(kind, attrs)
        out_itemsize = sp.sympify(attrs.get("out_itemsize", inputs[0].itemsize if inputs else
                                            attrs.get("itemsize", S.dtype_bytes)))
        specs = [t.spec for t in inputs]
        shape, cost = ops.apply(kind, specs, formula_attrs)
        # Weights are node data, not a Cost: repeating a node does not repeat its parameters.
        weights = params.weights_of(kind, specs, attrs, out_itemsize)
        self.g.add_node(node, scope=scope, path=path, kind=kind, attrs=attrs, inputs=[t.node for t in inputs],
                        in_shapes=[t.shape for t in inputs], in_itemsizes=[t.itemsize for t in inputs],
                        out_shape=shape, out_itemsize=out_itemsize, cost=cost, weights=weights)
        for t in inputs:
            self.g.add_edge(t.node, node)
        self.__dict__.pop("_children", None)
        return Tensor(node, tuple(shape), out_itemsize)

    def add_derived(self, scope: str, path: str, kind: str, cost: Cost, reads: Iterable[str], *, of: str,
                    **attrs) -> str:
        """A node derived from another (`of`): a gradient, a recomputation, an optimizer update. Its cost
        is given (from `costgraph.ops.backward` or the forward's); `reads` are the nodes whose outputs it
        reads (data-flow edges). It owns no weights; its output is `cost.activation_bytes`."""
        if scope not in self.scopes:
            raise ValueError(f"unknown scope {scope!r}")
        node = f"{scope}.{path}"
        if node in self.g:
            raise ValueError(f"duplicate node {node!r}")
        reads = list(dict.fromkeys(reads))
        self.g.add_node(node, scope=scope, path=path, kind=kind, attrs={**attrs, "of": of}, inputs=reads,
                        in_shapes=[], in_itemsizes=[], out_shape=(), out_itemsize=S.dtype_bytes, cost=cost,
                        weights=params.NONE)
        for r in reads:
            self.g.add_edge(r, node)
        self.__dict__.pop("_children", None)
        return node

    # ---- reading -----------------------------------------------------------------
    def nodes(self, scope: str | None = None) -> list[str]:
        if scope is None:
            return list(self.g.nodes)
        return [n for n in self.g.nodes if within(self.g.nodes[n]["scope"], scope)]

    def cost(self, node: str) -> Cost:
        """Cost of one execution of the node (one view, one decode step at index t)."""
        return self.g.nodes[node]["cost"]

    def chain(self, scope: str) -> list[Scope]:
        parts = scope.split(".")
        return [self.scopes[".".join(parts[: i + 1])] for i in range(len(parts))
                if ".".join(parts[: i + 1]) in self.scopes]

    def effective_cost(self, node: str) -> Cost:
        """The node's cost over the whole run: scaled by every enclosing multiplicity, summed over indices."""
        cost = self.cost(node)
        for s in reversed(self.chain(self.g.nodes[node]["scope"])):
            cost = _repeat(cost, s)
        return cost

    @cached_property
    def _children(self) -> dict[str, list[str]]:
        kids: dict[str, list[str]] = {s: [] for s in self.scopes}
        for s in self.scopes:
            parent = s.rpartition(".")[0]
            if parent in kids:
                kids[parent].append(s)
        return kids

    def total(self, scope: str) -> Cost:
        """Total cost of a scope, including its own multiplicity and those of its parents."""
        if scope not in self.scopes:
            raise KeyError(scope)
        cost = self._inner(scope)
        for s in reversed(self.chain(scope)):
            cost = _repeat(cost, s)
        return cost

    def _inner(self, scope: str) -> Cost:
        own = [self.cost(n) for n in self.g.nodes if self.g.nodes[n]["scope"] == scope]
        kids = [_repeat(self._inner(k), self.scopes[k]) for k in self._children[scope]]
        return _sum(own + kids)

    # ---- export ------------------------------------------------------------------
    def to_json(self, values: Mapping[sp.Symbol, int] | None = None, info: Mapping | None = None) -> dict:
        """Node-link JSON with every expression as a string.

        `values`: symbol values substituted into every expression first (e.g. a configuration's
        sizes). The "graph" section records them ("substituted"), the symbols every expression
        may still hold ("free_symbols"; a summed scope's index is in its "sum_over", not there),
        and `info` (what the export is of)."""
        rule = {k: sp.sympify(v) for k, v in (values or {}).items()}
        free: set = set()

        def s(v) -> str:
            return str(_subbed(v, rule, free))

        data = nx.node_link_data(self.g, edges="edges")
        for n in data["nodes"]:
            n["cost"] = {m: s(e) for m, e in n["cost"].as_dict().items()}
            n["in_shapes"] = [[s(d) for d in sh] for sh in n["in_shapes"]]
            n["out_shape"] = [s(d) for d in n["out_shape"]]
            n["out_itemsize"] = s(n["out_itemsize"])
            n["in_itemsizes"] = [s(i) for i in n["in_itemsizes"]]
            n.pop("inputs", None)
            w = n.pop("weights")
            n["params"], n["weight_bytes"] = s(w.count), s(w.nbytes)
            n["attrs"] = {k: s(v) for k, v in n["attrs"].items()}
        data["scopes"] = [
            {"name": sc.name, "multiplicity": s(sc.multiplicity),
             "sum_over": [s(x) for x in sc.sum_over] if sc.sum_over else None, "doc": sc.doc}
            for sc in self.scopes.values()
        ]
        free -= {sc.sum_over[0] for sc in self.scopes.values() if sc.sum_over}
        data["graph"] = {"name": self.name, **(info or {}),
                         "params": {k: str(v) for k, v in self.params.items()},
                         "substituted": {str(k): str(v) for k, v in rule.items()},
                         "free_symbols": sorted(str(x) for x in free)}
        return data

    def dumps(self, values: Mapping[sp.Symbol, int] | None = None, info: Mapping | None = None) -> str:
        return json.dumps(self.to_json(values, info), indent=1)


class ScopeBuilder:
    """Adds nodes to one scope: `b.op("blocks.0.attn.qkv", "linear", x, in_features=.., ...)`."""

    def __init__(self, graph: CostGraph, scope: str):
        self.graph, self.scope = graph, scope

    def input(self, path: str, shape, itemsize=S.dtype_bytes, param=None) -> Tensor:
        """A tensor from outside the graph. `param=True`: a stored parameter of this shape;
        `param=<shape>`: a parameter stored at that shape (the node's shape being a gathered view)."""
        extra = {} if param is None else {"param": param}
        return self.graph.add_node(self.scope, path, "input", [], shape=tuple(sp.sympify(d) for d in shape),
                                   itemsize=itemsize, **extra)

    def op(self, path: str, kind: str, *inputs: Tensor, **attrs) -> Tensor:
        return self.graph.add_node(self.scope, path, kind, inputs, **attrs)


def _formula_attrs(kind: str, attrs: dict) -> dict:
    """The attrs a cost formula takes: all but node data (element sizes, weight attrs of
    `costgraph.params`), unless the formula names one of those itself."""
    fn = ops.OPS.get(kind)
    named = inspect.signature(fn).parameters if fn is not None else {}
    node_data = ("out_itemsize", "itemsize") + params.NODE_ATTRS
    return {k: v for k, v in attrs.items() if k not in node_data or k in named}


def _subbed(v, rule: dict, free: set):
    """`v` with `rule` substituted in every expression (a tuple's too); their symbols added to `free`."""
    if type(v) in (tuple, list):
        return type(v)(_subbed(x, rule, free) for x in v)
    if not isinstance(v, sp.Basic):
        return v
    v = v.xreplace(rule) if rule else v
    free |= v.free_symbols
    return v


def _sum(costs: list[Cost]) -> Cost:
    """The sum of many costs as one sympy Add per metric (adding pairwise re-flattens the running
    sum every time: quadratic in the number of nodes). Repeated layers give equal expressions:
    each distinct one enters the Add once, times its count."""
    out = {}
    for m in METRICS:
        counts = Counter(getattr(c, m) for c in costs)
        out[m] = sp.Add(*[e if n == 1 else n * e for e, n in counts.items()])
    return Cost(**out)


def within(scope: str, prefix: str) -> bool:
    """`scope` is `prefix` or a scope under it (encoder.layers is within encoder)."""
    return scope == prefix or scope.startswith(prefix + ".")


def _repeat(cost: Cost, scope: Scope) -> Cost:
    if scope.sum_over is not None:
        idx, lo, hi = scope.sum_over
        cost = cost.map(lambda e: sum_over(e, idx, lo, hi) if e.has(idx) else e * (hi - lo + 1))
    return cost * scope.multiplicity if scope.multiplicity != 1 else cost


def sum_over(e: sp.Expr, idx: sp.Symbol, lo, hi) -> sp.Expr:
    """sum_{idx=lo..hi} e in closed form. A polynomial in idx (its coefficients may hold anything
    else: floors, Piecewise, Min) is summed term by term with Faulhaber's power sums, which is
    what `sp.summation` returns but without its rational-function machinery (seconds per
    expression on the decode costs); anything else goes to `sp.summation`."""
    e = sp.expand(e)
    try:
        poly = sp.Poly(e, idx)
    except sp.PolynomialError:
        return sp.expand(sp.summation(e, (idx, lo, hi)))
    return sp.expand(sp.Add(*[c * _power_sum(k, idx, lo, hi) for (k,), c in poly.terms()]))


@lru_cache(maxsize=None)
def _power_sum(k: int, idx: sp.Symbol, lo, hi) -> sp.Expr:
    return sp.expand(sp.summation(idx ** k, (idx, lo, hi)))
