"""Symbols: how every symbol of every model is declared (once, with its assumptions and its names),
and the few symbols the engine's own op formulas use.

`declare` is the one way to make a symbol. It records, beside the sympy symbol, what papers and
tables call it: a LaTeX name, and the words for a term that is linear in it ("per text token").
A model declares its own symbols (its sizes, its layout) in its package's `symbols.py`; the
engine's renderers and closed forms read the names from this registry, so they know no model.
Declaring the same name twice with different assumptions or names raises: one concept, one symbol.

Named indicators: a 0/1 factor (a sympy Piecewise) that a model uses in its costs can be given a
short name and a LaTeX spelling (`name_indicator`), so closed forms print it as one factor.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import sympy as sp

INTEGER_POSITIVE = dict(integer=True, positive=True)


@dataclass(frozen=True)
class SymbolInfo:
    symbol: sp.Symbol
    latex: str
    term: str | None     # a term linear in it is "per <term>" (None: never a term symbol)
    doc: str


SYMBOLS: dict[str, SymbolInfo] = {}
# Every declaration's words, by (name, declaring module): two models may mean different things by one name.
DOCS: dict[tuple[str, str], str] = {}


def declare(name: str, *, latex: str, term: str | None = None, doc: str = "", **assumptions) -> sp.Symbol:
    """A sympy symbol (integer and positive unless told otherwise), registered with its names.

    Two models may declare the same name (both have an `image_size`): it must be the same symbol
    (same assumptions), and the first declaration's names are the registry's; a model prints its
    own through `Model.latex_names`."""
    sym = sp.Symbol(name, **(assumptions or INTEGER_POSITIVE))
    old = SYMBOLS.get(name)
    if old is not None and old.symbol != sym:
        raise ValueError(f"symbol {name!r} is already declared with other assumptions ({old})")
    SYMBOLS.setdefault(name, SymbolInfo(sym, latex, term, doc))
    DOCS.setdefault((name, sys._getframe(1).f_globals.get("__name__", "")), doc)
    return SYMBOLS[name].symbol


def doc(sym: sp.Symbol, package: str | None = None) -> str:
    """What a symbol means: as a module of `package` (a model's, e.g. costgraph.graphs.vit) declared it, else
    the registry's words."""
    if package:
        for (name, module), words in DOCS.items():
            if name == sym.name and words and (module == package or module.startswith(package + ".")):
                return words
    info = SYMBOLS.get(sym.name)
    return info.doc if info is not None else ""


def latex_name(sym: sp.Symbol, names=None) -> str:
    if names and sym in names:
        return names[sym]
    info = SYMBOLS.get(sym.name)
    return info.latex if info is not None else sp.latex(sym)


def by_name(name: str) -> sp.Symbol:
    try:
        return SYMBOLS[name].symbol
    except KeyError:
        raise ValueError(f"unknown symbol {name!r}") from None


@dataclass(frozen=True)
class Indicator:
    expr: sp.Expr        # the 0/1 Piecewise as the model writes it
    name: str            # a plain name (a Symbol of that name stands in for it in text)
    latex: str           # how a paper writes it (amsmath only)


INDICATORS: dict[sp.Expr, Indicator] = {}


def name_indicator(expr: sp.Expr, name: str, latex: str) -> sp.Expr:
    """Give a model's 0/1 factor a name for closed forms; returns the expression unchanged."""
    INDICATORS.setdefault(expr, Indicator(expr, name, latex))
    return expr


# ---- the engine's own symbols (generic to transformer workloads) -----------------------------

# Storage: bytes per element of the activations and weights (bf16: 2, fp32: 4). Parts a model keeps
# in fp32 whatever the storage dtype (routers, softmax upcasts) use 4 directly.
dtype_bytes = declare("dtype_bytes", latex=r"b", doc="bytes per element of the storage dtype")

# Generation: a prompt of some text tokens, then output tokens (the first from the prefill).
text_tokens = declare("text_tokens", latex=r"T_{\mathrm{text}}", term="text token",
                      doc="prompt text tokens after the model's own input slots")
output_tokens = declare("output_tokens", latex=r"N_{\mathrm{out}}", term="output token",
                        doc="generated tokens (the first from the prefill)")
decode_step = declare("t", latex=r"t", doc="decode forward index, 1..output_tokens-1")
context = declare("context", latex=r"C", doc="attended length in one decode step")

# Routing (data-dependent): distinct routed experts one MoE layer runs in one forward. Routed rows
# are exactly k per token whatever the router decides, but an eager experts loop pays per expert
# it runs (the expert's weights read once, the bookkeeping ops, a full read of the hidden states
# and a full write of the output). At most min(routed_experts, k * tokens) (`ops.experts_hit_bound`);
# a decode forward (one token) runs exactly k. Costs are linear in it, so a total over the MoE
# layers is exact at the layers' mean.
experts_hit = declare("experts_hit", latex=r"E_{\mathrm{hit}}", doc="distinct routed experts a MoE layer runs")

# Batching: sequences (pages) run together in one step (a training micro-batch, a serving batch).
batch = declare("batch", latex=r"B", term="sequence in the batch", doc="sequences (pages) run together in one step")
