"""Peak activation memory of a stage: a liveness pass over the graph in execution order.

The nodes of a scope run in the order they were built (the vendor's order; it is checked to be
a topological order of the data flow). A node's output (`activation_bytes`) is allocated when
the node runs and freed after its last consumer has run; while node i runs, everything
allocated before it and still needed at i or later is live, plus its own output. So

    live(i) = sum of activation_bytes(b) over outputs b with  alloc(b) <= i <= last_use(b)
    peak    = max_i live(i)

Rules, all structural (no numbers are special-cased):
- views (a node whose `activation_bytes` is 0: reshapes, slices, ...) own no storage: they alias
  their first input, and their consumers keep that input's storage alive;
- inputs (pixels, token ids, the KV cache of earlier steps, weights) are not activations: they
  are excluded here and reported separately (weights: `costgraph.params`; KV cache: the LM's
  `kv_cache_bytes`);
- a tensor consumed outside the scope, or by nobody (a result), lives to the end of the stage;
- a KV-cache update (`cache_update`: cat of the cache and the new keys or values) makes the new
  cache: its output outlives the stage, and the old cache it read (an input) is released when it
  returns, so live memory changes by (new - old) after it and holds both while it runs. Inputs
  count 0, so that release is a negative term: a decode step's own peak is what it adds to the
  memory that was live when it began (the cache of earlier steps is reported as the KV cache);
- a batched scope (a batch of views: `multiplicity` = the batch) holds every tensor that
  many times over: its peak is multiplicity x the per-view peak. Scopes summed over an index (the
  decode steps) run one after another: their peak is a function of the index (decode step `t`).

Each live(i) is a sympy expression; the peak is `Max` over the distinct ones that are not
dominated by another (a difference that is a non-negative polynomial). `Peak.evaluate` takes
numpy arrays (`costgraph.evaluate.Compiled`: lambdified once, vectorised), never `subs` per point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import sympy as sp

from .evaluate import Compiled

END = float("inf")
# Op kinds whose output takes the place of their first input (the KV cache grows by reallocation).
REPLACES_FIRST_INPUT = ("cache_update",)


@dataclass
class Peak:
    scope: str
    factor: sp.Expr                           # the scope's batch multiplicity (1 for most)
    candidates: list[tuple[sp.Expr, str]]     # (live bytes per execution, the node running then)
    steps: int = 0                            # nodes scheduled
    timeline: list[tuple[str, sp.Expr]] = field(default_factory=list, repr=False)

    @property
    def expr(self) -> sp.Expr:
        """The peak as one expression: factor x Max(candidates)."""
        exprs = [e for e, _ in self.candidates]
        inner = exprs[0] if len(exprs) == 1 else sp.Max(*exprs, evaluate=False)
        return self.factor * inner

    @cached_property
    def _compiled(self) -> Compiled:
        exprs = {f"c{i}": e for i, (e, _) in enumerate(self.candidates)}
        exprs["factor"] = self.factor
        return Compiled(exprs)

    @property
    def args(self) -> list[str]:
        return [s.name for s in self._compiled.args]

    def evaluate(self, **values) -> tuple[np.ndarray, np.ndarray]:
        """(peak bytes, index of the winning candidate) for arrays of symbol values (by name)."""
        out = self._compiled(**values)
        stack = np.stack(np.broadcast_arrays(*[out[f"c{i}"] for i in range(len(self.candidates))]))
        arg = np.argmax(stack, axis=0)
        return out["factor"] * np.max(stack, axis=0), arg

    def at(self, values: dict) -> dict:
        """The peak for one point: bytes and the node running at the peak."""
        peak, arg = self.evaluate(**{(k.name if hasattr(k, "name") else k): v for k, v in values.items()})
        return {"bytes": int(peak), "node": self.candidates[int(arg)][1]}


def schedule(graph, scope) -> list[str]:
    """The scope's nodes (sub-scopes included; a tuple of scopes: all of theirs) in execution order:
    the build order, checked topological."""
    if isinstance(scope, tuple):
        nodes = [n for n in graph.nodes() if any(_within(graph.g.nodes[n]["scope"], s) for s in scope)]
    else:
        nodes = graph.nodes(scope)
    index = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        for p in graph.g.predecessors(n):
            if p in index and index[p] > index[n]:
                raise ValueError(f"build order is not an execution order: {p} feeds {n} but comes after it")
    return nodes


def _within(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + ".")


def _batch(graph, node: str, scope) -> sp.Expr:
    """How many copies of the node's output one execution of `scope` holds: the batch
    multiplicities of the scopes between the node and `scope`, `scope`'s own excluded (a tuple of
    scopes, one step made of several: every multiplicity)."""
    k = sp.Integer(1)
    depth = -1 if isinstance(scope, tuple) else len(scope)
    for s in graph.chain(graph.g.nodes[node]["scope"]):
        if len(s.name) > depth and s.sum_over is None:
            k *= s.multiplicity
    return k


@dataclass(frozen=True)
class Plan:
    """The structural part of a liveness pass: what is allocated, freed and released at each step."""
    order: list
    size: dict            # owning node -> its bytes (an expression)
    frees: dict           # step -> owning nodes freed after it
    replaced: dict        # step -> input bytes released after it (a cache grown by reallocation)
    recorded: list        # steps at which the live total changes (a candidate for the peak)
    factor: sp.Expr


_PLANS: dict = {}


def plan(graph, scope) -> Plan:
    """The liveness plan of a scope (cached per graph and scope: graphs are built once)."""
    key = (id(graph), scope)
    if key in _PLANS and _PLANS[key][0] is graph:
        return _PLANS[key][1]
    order = schedule(graph, scope)
    index = {n: i for i, n in enumerate(order)}
    data = graph.g.nodes
    base: dict[str, str | None] = {}     # node -> the node owning its storage (None: not an activation)
    size: dict[str, sp.Expr] = {}
    for n in order:
        if data[n]["kind"] == "input":
            base[n] = None
            continue
        act = sp.sympify(data[n]["cost"].activation_bytes)
        preds = list(graph.g.predecessors(n))
        if act == 0 and preds:
            first = _first_input(graph, n)
            base[n] = base.get(first) if first in index else None
        else:
            base[n] = n
            # expanded once: sums of expanded terms stay expanded (sympy combines like terms),
            # which keeps the candidates cheap to compare
            size[n] = sp.expand(act * _batch(graph, n, scope))
    last: dict[str, float] = {b: index[b] for b in size}
    for n in order:
        b = base[n]
        if b is None:
            continue
        succ = list(graph.g.successors(n))
        if not succ or any(s not in index for s in succ):
            last[b] = END
        for s in succ:
            if s in index and base.get(s) != b:  # a view of b extends b through its own consumers
                last[b] = max(last[b], index[s])
    replaced: dict[int, sp.Expr] = {}
    for n in order:
        if data[n]["kind"] in REPLACES_FIRST_INPUT and base[n] == n:
            last[n] = END
            first = _first_input(graph, n)
            if data[first]["kind"] == "input":
                replaced[index[n]] = sp.expand(_input_bytes(data[first]) * _batch(graph, first, scope))
    frees: dict[int, list] = {}
    for b, i in last.items():
        if i != END:
            frees.setdefault(int(i), []).append(b)
    recorded = [i for i, n in enumerate(order) if base[n] == n or i in frees]
    if isinstance(scope, tuple):
        factor = sp.Integer(1)
    else:
        factor = graph.scopes[scope].multiplicity if graph.scopes[scope].sum_over is None else sp.Integer(1)
    p = Plan(order, size, frees, replaced, recorded, factor)
    _PLANS[key] = (graph, p)
    return p


def liveness(graph, scope, keep_timeline: bool = False, samples: dict | None = None) -> Peak:
    """Peak activation bytes of one execution of `scope` (times its batch multiplicity), as expressions;
    a tuple of scopes: one pass over all of their nodes in build order (a training step: forward,
    backward, optimizer), every multiplicity inside.

    The candidates kept are those no other dominates (a difference that is a non-negative polynomial).
    `samples` (symbol name -> array of values, the model's domain): keep instead the candidates that
    are the maximum at one of those points at least. A training step has thousands of mutually
    undominated live totals; on the sampled domain a handful win, and the Max of those equals the
    peak at every sampled point (between samples it is the winners' max, not a proof)."""
    p = plan(graph, scope)
    order, size, frees, replaced = p.order, p.size, p.frees, p.replaced
    # The live total is kept as a table of terms (monomial -> coefficient), updated as tensors are
    # born and freed: the same sum sympy's Add would form, without re-flattening every live tensor
    # at every step (minutes on a whole model).
    live: dict[str, dict] = {}
    total: dict = {}
    seen: dict[frozenset, tuple[dict, str]] = {}
    timeline = []

    def change(terms: dict, sign: int) -> None:
        for m, c in terms.items():
            v = total.get(m, 0) + sign * c
            if v == 0:
                total.pop(m, None)
            else:
                total[m] = v

    for i, n in enumerate(order):
        if n in size:
            live[n] = _terms(size[n])
            change(live[n], 1)
        if n in size or i in frees:
            key = frozenset(total.items())
            if key not in seen:
                seen[key] = (dict(total), n)
            if keep_timeline:
                timeline.append((n, _expr(total)))
        for b in frees.get(i, ()):
            if b in live:
                change(live.pop(b), -1)
        if i in replaced:
            live[f"released:{n}"] = _terms(-replaced[i])
            change(live[f"released:{n}"], 1)
    if samples is not None:
        kept = _winners([(t, None, n) for t, n in seen.values()], samples)
    else:
        kept = _undominated_terms([(t, None, n) for t, n in seen.values()])
    cands = [(_expr(t), n) for t, _, n in kept] or [(sp.Integer(0), order[-1] if order else "")]
    return Peak("+".join(scope) if isinstance(scope, tuple) else scope, p.factor, cands, len(order), timeline)


_SIZES: dict = {}


def peak_at(graph, scope, values: dict) -> dict:
    """The peak at one input, numerically: the same pass as `liveness` over the sizes evaluated once
    (`Compiled`: each distinct size expression lambdified once per graph and scope), the live total
    a cumulative sum. {"bytes", "node"}; `values` by symbol name. No symbolic maximum is formed, so
    it answers in milliseconds where the closed form of a whole training step takes minutes."""
    p = plan(graph, scope)
    key = (id(graph), scope)
    if key not in _SIZES or _SIZES[key][0] is not graph:
        exprs = {f"s{i}": e for i, e in enumerate(dict.fromkeys([*p.size.values(), *p.replaced.values(),
                                                                  p.factor]))}
        _SIZES[key] = (graph, exprs, {e: k for k, e in exprs.items()}, Compiled(exprs))
    _, exprs, name_of, compiled = _SIZES[key]
    got = compiled(**{a.name: values[a.name] for a in compiled.args})
    val = {e: int(got[k]) for e, k in name_of.items()}
    steps = len(p.order)
    alloc = np.zeros(steps, dtype=object)
    freed = np.zeros(steps, dtype=object)
    index = {n: i for i, n in enumerate(p.order)}
    for n, e in p.size.items():
        alloc[index[n]] += val[e]
    for i, bs in p.frees.items():
        freed[i] += sum(val[p.size[b]] for b in bs)
    for i, e in p.replaced.items():
        freed[i] += val[e]
    live = np.cumsum(alloc) - np.concatenate([[0], np.cumsum(freed)[:-1]])
    if not p.recorded:
        return {"bytes": 0, "node": p.order[-1] if p.order else ""}
    at = max(p.recorded, key=lambda i: live[i])
    return {"bytes": int(val[p.factor] * live[at]), "node": p.order[at]}


def _winners(cands: list[tuple[dict, object, str]], samples: dict) -> list[tuple[dict, object, str]]:
    """The candidates (term tables) that are the largest at one sample point at least: every monomial
    evaluated once over the samples, each candidate a dot product of its coefficients with them."""
    monomials = list(dict.fromkeys(m for t, _, _ in cands for m in t))
    if not monomials:
        return cands[:1]
    n = len(next(iter(samples.values())))
    values = np.empty((len(monomials), n))
    for i, m in enumerate(monomials):
        syms = sorted(m.free_symbols, key=lambda s: s.name)
        fn = sp.lambdify(syms, m, modules="numpy")
        values[i] = np.broadcast_to(np.asarray(fn(*[np.asarray(samples[s.name], dtype=float) for s in syms]),
                                               dtype=float), (n,))
    coeffs = np.array([[float(t.get(m, 0)) for m in monomials] for t, _, _ in cands])
    win = set(np.argmax(coeffs @ values, axis=0).tolist())
    return [c for i, c in enumerate(cands) if i in win]


def _input_bytes(data: dict) -> sp.Expr:
    return sp.Mul(*[sp.sympify(d) for d in data["out_shape"]]) * data["out_itemsize"]


def _first_input(graph, node: str) -> str:
    """The node's first input (edges keep insertion order; a repeated input is one edge)."""
    return next(iter(graph.g.predecessors(node)))


def _terms(e: sp.Expr) -> dict:
    """An expanded expression as {monomial: numeric coefficient} (its terms, like terms combined)."""
    out: dict = {}
    for term in sp.Add.make_args(e):
        coeff, rest = term.as_coeff_Mul()
        out[rest] = out.get(rest, 0) + coeff
    return out


@lru_cache(maxsize=None)
def _nonnegative_monomial(m: sp.Expr) -> bool:
    """A product of non-negative factors (positive symbols, floors and ceilings of non-negatives)."""
    for f in sp.Mul.make_args(m):
        b = f.base if isinstance(f, sp.Pow) else f
        if not (b.is_nonnegative or isinstance(b, (sp.floor, sp.ceiling)) and b.args[0].is_nonnegative):
            return False
    return True


def _geq(a: dict, b: dict) -> bool:
    """a >= b for every value of the (positive) symbols: every coefficient of a - b is >= 0 on a
    non-negative monomial. The terms of expanded expressions (see `_terms`): no sympy arithmetic."""
    for m in a.keys() | b.keys():
        c = a.get(m, 0) - b.get(m, 0)
        if c == 0:
            continue
        if c < 0 or not _nonnegative_monomial(m):
            return False
    return True


def _expr(terms: dict) -> sp.Expr:
    return sp.Add(*[c * m for m, c in terms.items()])


def _undominated_terms(cands: list[tuple[dict, object, str]]) -> list[tuple[dict, object, str]]:
    """Drop every candidate (its terms, anything, a name) some other is provably >= to (keeps the
    earliest of equals); of the constant candidates only the largest can matter."""
    nums = [c for c in cands if set(c[0]) <= {sp.Integer(1)}]
    rest = [c for c in cands if not set(c[0]) <= {sp.Integer(1)}]
    if nums:
        value = lambda c: c[0].get(sp.Integer(1), 0)
        top = max(value(c) for c in nums)
        rest.append(next(c for c in nums if value(c) == top))
    keep: list = []
    for c in rest:
        if any(_geq(k[0], c[0]) for k in keep):
            continue  # a kept candidate is always >= this one (the earlier of equals stays)
        keep = [k for k in keep if not _geq(c[0], k[0])] + [c]
    return keep


def undominated(cands: list[tuple[sp.Expr, str]]) -> list[tuple[sp.Expr, str]]:
    """Drop every candidate some other candidate is provably >= to (keeps the earliest of equals).
    Candidates must be expanded: each is turned into its terms once, and a comparison is a walk
    over two coefficient tables."""
    return [(e, n) for _, e, n in _undominated_terms([(_terms(e), e, n) for e, n in cands])]
