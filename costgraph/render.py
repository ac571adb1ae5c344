"""Rendering totals for people: plain text, LaTeX, and forms collected by layout terms."""
from __future__ import annotations

import sympy as sp

from . import symbols as S


ORDER = (S.w_crop, S.h_crop, S.text_tokens, S.output_tokens)  # how monomials are spelled


def closed_form(expr: sp.Expr) -> sp.Expr:
    """Expanded and collected on the layout symbols, so per-crop terms read off directly.

    The no-crop indicator is kept as one factor of the crop terms rather than expanded into each.
    """
    from graphs.layout import crops_run

    run, ind = crops_run(), sp.Dummy("crops_run")
    expr = sp.expand(sp.sympify(expr).subs(run, ind))
    expr = sp.collect(expr, [S.w_crop * S.h_crop * ind, S.w_crop * S.h_crop, S.w_crop, S.h_crop,
                             S.text_tokens, S.output_tokens])
    return expr.subs(ind, run)


def plain(expr: sp.Expr) -> str:
    return sp.sstr(expr)


def _indicator_names() -> dict:
    """The no-crop indicator (a Piecewise) as a compact 1[w h > 1] in LaTeX."""
    from graphs.layout import crops_run

    run = sp.Symbol("crops_run")
    return {crops_run(): (run, r"\mathbb{1}[w_{\mathrm{crop}} h_{\mathrm{crop}} > 1]")}


def latex(expr: sp.Expr) -> str:
    expr = sp.sympify(expr)
    names = dict(S.LATEX_NAMES)
    for piece, (sym, tex) in _indicator_names().items():
        if expr.has(piece):
            expr = expr.subs(piece, sym)
            names[sym] = tex
    return sp.latex(expr, symbol_names=names, mul_symbol="dot")


def latex_number(x) -> str:
    """Exact numbers with thin spaces between digit groups: 1\\,139\\,967\\,033\\,344."""
    x = sp.sympify(x)
    if x.is_Integer:
        return f"{int(x):,}".replace(",", r"\,")
    if x.is_Rational:
        return rf"\frac{{{latex_number(x.p)}}}{{{latex_number(x.q)}}}"
    return latex(x)


def _split_sign(coeff):
    coeff = sp.sympify(coeff)
    if coeff.is_number:
        return (coeff < 0), abs(coeff)
    if coeff.could_extract_minus_sign():
        return True, -coeff
    return False, coeff


def latex_terms(terms) -> list[tuple[str, str]]:
    """(sign, body) per term c_i m_i: numbers exact, symbolic coefficients in parentheses when sums."""
    parts = []
    for mono, coeff in terms:
        neg, c = _split_sign(coeff)
        if c.is_number:
            ctex = latex_number(c)
        else:
            ctex = latex(c)
            if isinstance(c, sp.Add) and mono != 1:
                ctex = rf"\left({ctex}\right)"
        if mono == 1:
            body = ctex
        else:
            body = monomial_latex(mono) if c == 1 else rf"{ctex}\, {monomial_latex(mono)}"
        parts.append(("-" if neg else "+", body))
    return parts


def latex_sum(parts) -> str:
    if not parts:
        return "0"
    first_sign, first = parts[0]
    out = ("-" if first_sign == "-" else "") + first
    return out + "".join(f" {sign} {body}" for sign, body in parts[1:])


def monomial_latex(mono) -> str:
    """w_crop before h_crop (sympy would sort by name)."""
    powers = {s: k for s, k in sp.sympify(mono).as_powers_dict().items() if s.is_Symbol}
    out = []
    for s in ORDER + tuple(sorted(set(powers) - set(ORDER), key=str)):
        k = powers.get(s, 0)
        if k:
            name = S.LATEX_NAMES.get(s, sp.latex(s))
            out.append(name if k == 1 else f"{name}^{{{k}}}")
    return " ".join(out)


def monomial_plain(mono) -> str:
    powers = {s: k for s, k in sp.sympify(mono).as_powers_dict().items() if s.is_Symbol}
    out = []
    for s in ORDER + tuple(sorted(set(powers) - set(ORDER), key=str)):
        k = powers.get(s, 0)
        if k:
            out.append(s.name if k == 1 else f"{s.name}**{k}")
    return "*".join(out) or "1"


def plain_terms(terms) -> str:
    parts = []
    for mono, coeff in terms:
        c = sp.sympify(coeff)
        ctext = f"({plain(c)})" if isinstance(c, sp.Add) else plain(c)
        parts.append(ctext if mono == 1 else f"{ctext}*{monomial_plain(mono)}")
    return " + ".join(parts) if parts else "0"
