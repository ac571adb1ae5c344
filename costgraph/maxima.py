"""Peaks are maxima over candidates (`costgraph.liveness`): expressions that hold a sympy Max.

sympy re-evaluates a Max whenever it is rebuilt (`subs`, `expand`, `collect`), comparing its
candidates symbolically: minutes on a whole model. `over_max` applies a change to each candidate
instead and keeps the Max unevaluated."""
from __future__ import annotations

import sympy as sp


def over_max(expr: sp.Expr, fn) -> sp.Expr:
    """Apply `fn` to each candidate of a (nested) Max, maybe times a factor; anything else: fn(expr)."""
    if isinstance(expr, sp.Max):
        return sp.Max(*[over_max(a, fn) for a in expr.args], evaluate=False)
    if isinstance(expr, sp.Mul) and expr.has(sp.Max):
        return sp.Mul(*[over_max(a, fn) for a in expr.args])
    return fn(expr)
