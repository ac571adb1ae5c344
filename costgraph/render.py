"""Rendering totals for people: plain text, LaTeX, and forms collected by layout terms."""
from __future__ import annotations

import sympy as sp

from . import symbols as S


def closed_form(expr: sp.Expr) -> sp.Expr:
    """Expanded and collected on the layout symbols, so per-crop terms read off directly."""
    expr = sp.expand(sp.sympify(expr))
    return sp.collect(expr, [S.w_crop * S.h_crop, S.w_crop, S.h_crop, S.text_tokens, S.output_tokens])


def plain(expr: sp.Expr) -> str:
    return sp.sstr(expr)


def latex(expr: sp.Expr) -> str:
    return sp.latex(expr, symbol_names=S.LATEX_NAMES, mul_symbol="dot")
