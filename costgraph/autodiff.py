"""Backward as more ops in the graph (as Catamount builds it): a training step is the forward, the
gradient of every op that needs one, recomputed forwards under checkpointing, and the optimizer update.

`add_backward` walks the forward nodes in reverse build order and adds, for each node whose output
needs a gradient, one node `backward.<forward node>` whose cost is the op's backward formula
(`costgraph.ops.backward`, the same registry as the forward). What needs a gradient follows autograd:
- a node's output requires grad when one of its inputs does, or when its own weights train;
  a parameter input (`b.input(..., param=True)`) requires grad when it trains; pixels and ids never;
- only nodes the loss depends on get a backward; an input gets a gradient only if it requires one
  (the first conv's pixels never do), and weights only if they train;
- a tensor read by several consumers that each pass it a gradient has them added: (m - 1) adds of its
  size, charged to its own backward node (autograd accumulates before running the node's backward).
The backward node reads (has edges from) the backward nodes of its consumers (its output's gradient)
and the forward tensors its formula saves, so `costgraph.liveness` keeps a saved tensor alive from the
forward until its gradient op, and gradients until the op that consumes them.

Checkpointing (`segment(node)`: a name per checkpointed segment, e.g. one decoder layer): the forward
of a segment keeps nothing for the backward; right before the segment's backward its forward runs
again (`recompute.<forward node>`, the forward's cost) and the backward reads those copies. The
segment's inputs from outside it are what stays alive (they are read by the recompute).

The optimizer (`add_optimizer`): one update per trained weight-bearing node, after the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import networkx as nx
import sympy as sp

from . import ops
from . import params as P
from .cost import Cost
from .graph import CostGraph, _formula_attrs

BACKWARD = "backward"
RECOMPUTE = "recompute"


@dataclass(frozen=True)
class Step:
    """What `add_backward` made: the backward node of each forward node, and which trained."""
    backward: Mapping[str, str]
    trained: tuple[str, ...]          # forward nodes whose weights get gradients
    recomputed: tuple[str, ...]


def mirror_scopes(g: CostGraph, scopes: tuple[str, ...], prefix: str, doc: str) -> dict[str, str]:
    """Scopes `<prefix>.<scope>` with the forward scopes' multiplicities (a gradient of a batch of views
    runs as many times as its forward): forward scope -> derived scope, for `add_backward`."""
    if prefix not in g.scopes:
        g.scope(prefix, doc=f"{doc} the forward")
    out = {}
    for s in scopes:
        fwd = g.scopes[s]
        g.scope(f"{prefix}.{s}", multiplicity=fwd.multiplicity, doc=f"{doc} {s}")
        out[s] = f"{prefix}.{s}"
    return out


def _place(g: CostGraph, node: str, scopes: Mapping[str, str]) -> tuple[str, str]:
    """(scope, path) of a node derived from a forward node: under the scope mapped from its forward
    scope's longest mapped prefix, at the rest of its name (`enc.views.x` with `enc` -> `backward.enc`
    is `backward.enc` + `views.x`)."""
    scope = g.g.nodes[node]["scope"]
    best = None
    for fwd in scopes:
        if _within(scope, fwd) and (best is None or len(fwd) > len(best)):
            best = fwd
    if best is None:
        raise ValueError(f"no derived scope for forward scope {scope!r}")
    return scopes[best], node[len(best) + 1:]


def add_backward(g: CostGraph, loss: str, scopes: Mapping[str, str], trains: Callable[[str], bool],
                 segment: Callable[[str], str | None] = lambda node: None,
                 recompute_scopes: Mapping[str, str] | None = None) -> Step:
    """Add the backward of the forward graph ending in `loss`.

    `scopes`: forward scope -> backward scope (created by the caller, with the same multiplicities);
    `trains(node)`: the node's weights (or, for a parameter input, itself) get gradients;
    `segment(node)`: the checkpointed segment of a node (None: not checkpointed), with
    `recompute_scopes` forward scope -> recompute scope."""
    data = g.g.nodes
    forward = [n for n in g.nodes() if any(_within(data[n]["scope"], s) for s in scopes)]
    needed = {loss} | _ancestors(g, loss)
    requires: dict[str, bool] = {}
    for n in forward:
        d = data[n]
        if d["kind"] == "input":
            requires[n] = bool(d["weights"]) and trains(n)
        elif d["kind"] in ops.NO_GRADIENT:
            requires[n] = False
        else:
            requires[n] = any(requires.get(p, False) for p in d["inputs"]) or (bool(d["weights"]) and trains(n))
    runs = [n for n in forward if requires[n] and n in needed and data[n]["kind"] != "input"]
    # tensor -> the consumers whose backward passes it a gradient (index inputs get none)
    sources: dict[str, list[str]] = {}
    grads_of: dict[str, tuple] = {}
    for n in runs:
        index = ops.INDEX_INPUTS.get(data[n]["kind"], ())
        grads = tuple(requires.get(p, False) and p in needed and i not in index
                      for i, p in enumerate(data[n]["inputs"]))
        grads_of[n] = grads
        for p, need in zip(data[n]["inputs"], grads):
            if need and data[p]["kind"] != "input":
                sources.setdefault(p, []).append(n)
    recomputed: dict[str, str] = {}
    done_segments: set = set()
    made: dict[str, str] = {}
    trained = []
    for n in reversed(runs):
        seg = segment(n)
        if seg is not None and seg not in done_segments:
            done_segments.add(seg)
            _recompute(g, [m for m in forward if segment(m) == seg], recompute_scopes or {}, recomputed)
        d = data[n]
        weight_grad = bool(d["weights"]) and trains(n)
        if weight_grad:
            trained.append(n)
        specs = [ops.Spec(s, i) for s, i in zip(d["in_shapes"], d["in_itemsizes"])]
        cost, saved = ops.backward(d["kind"], specs, _formula_attrs(d["kind"], d["attrs"]), grads_of[n], weight_grad)
        extra = len(sources.get(n, ())) - 1
        if extra > 0:   # gradients from several consumers added before this backward runs
            elements = ops.prod(d["out_shape"])
            out = sp.expand(elements * d["out_itemsize"])   # the gradient's size (a view's output too)
            cost = cost + Cost(elementwise_flops=extra * elements, bytes_read=2 * extra * out,
                               bytes_written=extra * out)
        reads = [made[c] for c in sources.get(n, ()) if c in made]
        for s in saved:
            t = n if s == "out" else d["inputs"][s]
            reads.append(recomputed.get(t, t))
        made[n] = g.add_derived(*_place(g, n, scopes), f"{d['kind']}.backward", cost, reads,
                                of=n, grads=grads_of[n], weight_grad=weight_grad)
    # parameter inputs that train get their gradient accumulated by their consumers' backward
    trained += [n for n in forward if data[n]["kind"] == "input" and requires[n] and n in needed]
    return Step(made, tuple(trained), tuple(recomputed))


def _recompute(g: CostGraph, nodes: list[str], scopes: Mapping[str, str], done: dict[str, str]) -> None:
    """The forward of a checkpointed segment again, reading the segment's outside inputs (kept alive)."""
    data = g.g.nodes
    for n in nodes:
        d = data[n]
        if d["kind"] == "input":
            continue
        reads = [done.get(p, p) for p in d["inputs"]]
        done[n] = g.add_derived(*_place(g, n, scopes), d["kind"], d["cost"], reads, of=n)


def _within(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + ".")


def _ancestors(g: CostGraph, node: str) -> set:
    return nx.ancestors(g.g, node)


# ---- the optimizer ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Optimizer:
    """Per trained parameter: the state it keeps (bytes per parameter) and its update's aten op."""
    name: str
    state_bytes: sp.Expr          # moments: AdamW two fp32, 8-bit AdamW two bytes (+ block scales)
    update_op: str                # the conventions' name of its per-element update
    state_reads: int              # state tensors read and written per update
    doc: str


# 8-bit AdamW (bitsandbytes): each moment one byte, plus one fp32 absmax per block of 256 values.
OPTIMIZERS = {
    "adamw": Optimizer("adamw", sp.Integer(8), "_foreach_adamw", 2, "AdamW: two fp32 moments per parameter"),
    "adamw8bit": Optimizer("adamw8bit", 2 + sp.Rational(2 * 4, 256), "_foreach_adamw8bit", 2,
                           "8-bit AdamW (bitsandbytes): two 1-byte moments, an fp32 scale per 256 values each"),
    "sgd": Optimizer("sgd", sp.Integer(0), "_foreach_sgd", 0, "SGD without momentum: no state"),
}


def master_bytes(param_itemsize) -> sp.Expr:
    """An fp32 master copy of each trained parameter under mixed precision (storage narrower than fp32):
    4 bytes for bf16 weights, none for fp32 (the interpolating polynomial of [b < 4] * 4 on the storage
    sizes: exact on every supported dtype)."""
    return 4 * ops.converts(param_itemsize, 4)


def add_optimizer(g: CostGraph, scope: str, trained: tuple[str, ...], optimizer: str) -> list[str]:
    """One update per trained node (its weights or itself, for a parameter input), reading the gradient
    (the parameter's size), the state and the fp32 master copy, writing them back and the parameter."""
    opt = OPTIMIZERS[optimizer]
    out = []
    for n in trained:
        w = g.g.nodes[n]["weights"]
        count, b = w.count, w.itemsize
        master = master_bytes(b)
        per = 2 * b + opt.state_bytes + master          # parameter and gradient, state, master
        written = b + opt.state_bytes + master
        cost = Cost(elementwise_flops=ops.ew(opt.update_op, count), bytes_read=sp.expand(count * per),
                    bytes_written=sp.expand(count * written))
        out.append(g.add_derived(scope, n, "optimizer_step", cost, [], of=n, optimizer=optimizer))
    return out


def trained_weights(g: CostGraph, trained) -> P.ParamTotals:
    """Trained parameters, each module once (a module in two scopes trains once)."""
    return P.total(P.by_module(g, trained, executed_only=False).values())


def trained_nodes(g: CostGraph) -> list[str]:
    """The forward nodes whose parameters the optimizer updates (one `optimizer_step` each)."""
    return [g.g.nodes[n]["attrs"]["of"] for n in g.nodes() if g.g.nodes[n]["kind"] == "optimizer_step"]


def static_memory(g: CostGraph) -> dict[str, sp.Expr]:
    """The memory a training step holds besides its activations, as expressions:
    - weights: every parameter resident (frozen ones included) at its element size;
    - gradients: one per trained parameter, at the parameter's element size;
    - optimizer_state: per trained parameter, the optimizer's state bytes;
    - master_weights: the fp32 copy of each trained parameter stored narrower than fp32 (mixed precision).
    The gradients are counted whole: they accumulate during the backward and are all alive at the
    optimizer step (the activation peak comes earlier, so the sum is an upper bound of the true peak
    by at most the gradients not yet written then)."""
    steps = [g.g.nodes[n] for n in g.nodes() if g.g.nodes[n]["kind"] == "optimizer_step"]
    names = {d["attrs"]["optimizer"] for d in steps}
    opt = OPTIMIZERS[names.pop()] if names else None
    trained = P.by_module(g, trained_nodes(g), executed_only=False).values()
    resident = P.resident(g)
    grads = sp.Add(*[w.nbytes for w in trained])
    state = sp.Add(*[w.count for w in trained]) * (opt.state_bytes if opt else 0)
    master = sp.Add(*[w.count * master_bytes(w.itemsize) for w in trained])
    return {"weights": sp.expand(resident.weight_bytes), "gradients": sp.expand(grads),
            "optimizer_state": sp.expand(state), "master_weights": sp.expand(master)}
