"""Rendering totals for people: plain text, LaTeX, and forms collected by layout terms."""
from __future__ import annotations

import sympy as sp

from . import symbols as S


def closed_form(expr: sp.Expr, term_symbols=(), term_groups=()) -> sp.Expr:
    """Expanded and collected on the term symbols (and their named products, e.g. a tile = w*h),
    so per-term coefficients read off directly.

    A named indicator (`costgraph.symbols.name_indicator`) is kept as one factor of the terms it
    multiplies rather than expanded into each.
    """
    expr = sp.sympify(expr)
    inds = {i.expr: sp.Dummy(i.name) for i in S.INDICATORS.values() if expr.has(i.expr)}
    expr = sp.expand(expr.subs(inds))
    groups = [sp.Mul(*g) for g in term_groups]
    keys = [g * d for g in groups for d in inds.values()] + groups + list(term_symbols)
    expr = sp.collect(expr, keys)
    return expr.subs({d: e for e, d in inds.items()})


def plain(expr: sp.Expr) -> str:
    return sp.sstr(expr)


def latex(expr: sp.Expr, names=None) -> str:
    """LaTeX with the declared symbol names (or the model's own `names`); a named indicator as its
    compact spelling."""
    expr = sp.sympify(expr)
    own = names
    names = {s: S.latex_name(s, own) for s in expr.free_symbols if isinstance(s, sp.Symbol)}
    for ind in S.INDICATORS.values():
        if expr.has(ind.expr):
            sym = sp.Symbol(ind.name)
            expr = expr.subs(ind.expr, sym)
            names[sym] = ind.latex
    return sp.latex(expr, symbol_names=names, mul_symbol="dot")


def latex_number(x, names=None) -> str:
    """Exact numbers with thin spaces between digit groups: 1\\,139\\,967\\,033\\,344."""
    x = sp.sympify(x)
    if x.is_Integer:
        return f"{int(x):,}".replace(",", r"\,")
    if x.is_Rational:
        return rf"\frac{{{latex_number(x.p)}}}{{{latex_number(x.q)}}}"
    return latex(x, names)


def _split_sign(coeff):
    coeff = sp.sympify(coeff)
    if coeff.is_number:
        return (coeff < 0), abs(coeff)
    if coeff.could_extract_minus_sign():
        return True, -coeff
    return False, coeff


def latex_terms(terms, order=(), names=None) -> list[tuple[str, str]]:
    """(sign, body) per term c_i m_i: numbers exact, symbolic coefficients in parentheses when sums."""
    parts = []
    for mono, coeff in terms:
        neg, c = _split_sign(coeff)
        if c.is_number:
            ctex = latex_number(c)
        else:
            ctex = latex(c, names)
            if isinstance(c, sp.Add) and mono != 1:
                ctex = rf"\left({ctex}\right)"
        if mono == 1:
            body = ctex
        else:
            body = monomial_latex(mono, order, names) if c == 1 else rf"{ctex}\, {monomial_latex(mono, order, names)}"
        parts.append(("-" if neg else "+", body))
    return parts


def latex_sum(parts) -> str:
    if not parts:
        return "0"
    first_sign, first = parts[0]
    out = ("-" if first_sign == "-" else "") + first
    return out + "".join(f" {sign} {body}" for sign, body in parts[1:])


def monomial_latex(mono, order=(), names=None) -> str:
    """Symbols in the model's term order (w before h; sympy would sort by name)."""
    powers = {s: k for s, k in sp.sympify(mono).as_powers_dict().items() if s.is_Symbol}
    order = tuple(order)
    out = []
    for s in order + tuple(sorted(set(powers) - set(order), key=str)):
        k = powers.get(s, 0)
        if k:
            name = S.latex_name(s, names)
            out.append(name if k == 1 else f"{name}^{{{k}}}")
    return " ".join(out)


def monomial_plain(mono, order=()) -> str:
    powers = {s: k for s, k in sp.sympify(mono).as_powers_dict().items() if s.is_Symbol}
    order = tuple(order)
    out = []
    for s in order + tuple(sorted(set(powers) - set(order), key=str)):
        k = powers.get(s, 0)
        if k:
            out.append(s.name if k == 1 else f"{s.name}**{k}")
    return "*".join(out) or "1"


def plain_terms(terms, order=()) -> str:
    parts = []
    for mono, coeff in terms:
        c = sp.sympify(coeff)
        ctext = f"({plain(c)})" if isinstance(c, sp.Add) else plain(c)
        parts.append(ctext if mono == 1 else f"{ctext}*{monomial_plain(mono, order)}")
    return " + ".join(parts) if parts else "0"


def human(n: int) -> str:
    """An integer with a decimal prefix, 3 decimals: 1.140 T."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.3f} {unit}"
    return f"{n:,}"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])
