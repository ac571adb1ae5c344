"""Rendering totals for people: plain text, LaTeX, and forms collected by layout terms."""
from __future__ import annotations

import re

import sympy as sp

from . import symbols as S
from .maxima import over_max


def closed_form(expr: sp.Expr, term_symbols=(), term_groups=()) -> sp.Expr:
    """Expanded and collected on the term symbols (and their named products, e.g. a tile = w*h),
    so per-term coefficients read off directly.

    A named indicator (`costgraph.symbols.name_indicator`) is kept as one factor of the terms it
    multiplies rather than expanded into each.
    """
    expr = sp.sympify(expr)
    if expr.has(sp.Max):  # a peak: each candidate on its own
        return over_max(expr, lambda e: closed_form(e, term_symbols, term_groups))
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
    if isinstance(expr, sp.Max):  # a peak: never rebuilt (sympy would compare its candidates)
        return r"\max\left(" + r",\ ".join(latex(a, names) for a in expr.args) + r"\right)"
    if isinstance(expr, sp.Mul) and expr.has(sp.Max):
        return r" \cdot ".join(latex(a, names) for a in expr.args)
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
        elif isinstance(c, sp.Mul) and any(isinstance(a, sp.Add) for a in c.args):
            # a factor times sums: the sums in parentheses after it, not inside its fraction (a line may break in them)
            rest = sp.Mul(*[a for a in c.args if not isinstance(a, sp.Add)])
            ctex = " ".join(([] if rest == 1 else [latex(rest, names)]) +
                            [rf"\left({latex(a, names)}\right)" for a in c.args if isinstance(a, sp.Add)])
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


# ---- LaTeX that fits a page: width estimates and line breaks at terms ----------------------------

# What a printed formula or table needs in the preamble (amsmath: \text, aligned; booktabs: the rules).
FORMULA_PREAMBLE = (r"\usepackage{amsmath}",)
TABLE_PREAMBLE = (r"\usepackage{booktabs}",)
# The line a formula fits by default: \textwidth of LaTeX's article class at 10 pt (345 pt); its page
# holds a display up to \textheight (592 pt) tall.
TEXT_WIDTH = 345.0
TEXT_HEIGHT = 592.0

_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|[{}]|\s+|.")
# Widths in pt of Computer Modern at 10 pt, display style (spacing around operators included).
_BINARY, _RELATION = 12.2, 13.4
_WIDTHS = {"+": _BINARY, "-": _BINARY, r"\cdot": 7.2, r"\times": _BINARY, "=": _RELATION, ">": _RELATION,
           "<": _RELATION, r"\geq": _RELATION, r"\leq": _RELATION, r"\in": _RELATION, ",": 4.5, ";": 4.5,
           ".": 2.8, ":": _RELATION, "(": 3.9, ")": 3.9, "[": 2.8, "]": 2.8, r"\{": 5.0, r"\}": 5.0,
           r"\lceil": 4.5, r"\rceil": 4.5, r"\lfloor": 4.5, r"\rfloor": 4.5, r"\,": 1.7, r"\ ": 3.4,
           r"\;": 2.8, r"\:": 2.2, r"\!": -1.7, r"\quad": 10.0, r"\qquad": 20.0, r"\dots": 13.4,
           r"\ldots": 13.4, r"\max": 17.0, r"\min": 15.0, r"\_": 5.0, "&": 0.0, "'": 2.8, "|": 2.8}
_DELIMS = {r"\bigl": 4.8, r"\bigr": 4.8, r"\Bigl": 5.9, r"\Bigr": 5.9, r"\biggl": 7.4, r"\biggr": 7.4,
           r"\Biggl": 8.5, r"\Biggr": 8.5, r"\left": 5.0, r"\right": 5.0}
_TEXT = (r"\text", r"\mathrm", r"\texttt", r"\textrm", r"\mathit")


def _tokens(tex: str) -> list[str]:
    return _TOKEN.findall(tex)


def _group(toks: list[str], i: int) -> tuple[list[str], int]:
    """The argument starting at toks[i] (a {...} group or one token) and the index after it."""
    while i < len(toks) and toks[i].isspace():
        i += 1
    if i >= len(toks):
        return [], i
    if toks[i] != "{":
        return [toks[i]], i + 1
    depth, j = 0, i
    while j < len(toks):
        depth += {"{": 1, "}": -1}.get(toks[j], 0)
        if depth == 0:
            return toks[i + 1:j], j + 1
        j += 1
    return toks[i + 1:], len(toks)


def _width(toks: list[str], scale: float = 1.0) -> float:
    """Estimated width in pt (a little generous): scripts at 70 %, a fraction as its wider part."""
    w, i = 0.0, 0
    while i < len(toks):
        t = toks[i]
        i += 1
        if t.isspace() or t in ("{", "}"):
            continue
        if t in ("_", "^"):
            arg, i = _group(toks, i)
            sw = _width(arg, max(scale * 0.7, 0.5))
            while i < len(toks) and toks[i] in ("_", "^"):   # a sub- and a superscript stack: the wider
                arg, i = _group(toks, i + 1)
                sw = max(sw, _width(arg, max(scale * 0.7, 0.5)))
            w += sw + 0.5
        elif t in (r"\frac", r"\tfrac", r"\dfrac"):
            num, i = _group(toks, i)
            den, i = _group(toks, i)
            w += max(_width(num, scale), _width(den, scale)) + 2.4 * scale
        elif t in _TEXT:
            arg, i = _group(toks, i)
            w += sum(2.8 if c in ".,:;!'()" else 5.3 for c in "".join(arg).replace("\\_", "_")) * scale
        elif t in (r"\label", r"\phantom", r"\vphantom", r"\begin", r"\end"):
            arg, i = _group(toks, i)
            if t == r"\phantom":
                w += _width(arg, scale)
        elif t in _DELIMS:
            arg, i = _group(toks, i)
            w += (1.2 if arg == ["."] else _DELIMS[t]) * scale
        elif t in _WIDTHS:
            w += _WIDTHS[t] * (scale if scale == 1.0 or t not in ("+", "-", "=", r"\cdot", r"\geq", r"\in")
                               else scale * 0.65)
        elif t.isdigit():
            w += 5.0 * len(t) * scale
        elif t.startswith("\\"):
            w += 6.0 * scale   # a symbol command
        else:
            w += 6.0 * len(t) * scale
    return w


def tex_width(tex: str) -> float:
    """Estimated width in pt of a math formula (one line) in display style at 10 pt."""
    return _width(_tokens(tex))


def _frac_depth(toks: list[str]) -> int:
    """How deeply fractions nest (a fraction in a fraction's numerator: 2)."""
    best, i = 0, 0
    while i < len(toks):
        t = toks[i]
        i += 1
        if t in (r"\frac", r"\tfrac", r"\dfrac"):
            num, i = _group(toks, i)
            den, i = _group(toks, i)
            best = max(best, 1 + _frac_depth(num), 1 + _frac_depth(den))
        elif t == "{":
            arg, i = _group(toks, i - 1)
            best = max(best, _frac_depth(arg))
    return best


def tex_height(tex: str) -> float:
    """Estimated height in pt of a display (an aligned block: its rows), a little generous: rows are
    taller by how deeply fractions nest in them."""
    return sum((15.0, 27.0, 40.0, 52.0)[min(_frac_depth(_tokens(row)), 3)] for row in tex.split("\\\\"))


def _delim_size(inner: list[str]) -> str:
    """A fixed-size delimiter tall enough for its contents: by fractions and \\left groups inside."""
    fracs = any(t in (r"\frac", r"\tfrac", r"\dfrac") for t in inner)
    nested = any(t == r"\left" for t in inner)
    return "Big" if fracs and not nested else ("bigg" if fracs else "big")


_DEPTH = {"{": 1, "}": -1, r"\begin": 1, r"\end": -1}   # braces and environments (cases) nest


def _break_points(toks: list[str]) -> list[int]:
    """Indices a line may start at: the binary + and - at brace depth 0 (a sum breaks before them),
    and what follows a comma at depth 0 (between the arguments of a max)."""
    out, depth, prev = [], 0, None
    for i, t in enumerate(toks):
        depth += _DEPTH.get(t, 0)
        if t.isspace() or t == r"\ ":
            continue
        if depth == 0 and prev == "," and i:
            out.append(i)
        if depth == 0 and t in ("+", "-") and prev is not None and prev not in \
                ("(", "[", r"\{", "=", ",", "+", "-", r"\left", r"\bigl", r"\Bigl", r"\biggl", r"\Biggl", "&"):
            out.append(i)
        prev = t
    return out


def _pairs(toks: list[str]) -> list[tuple[int, int]]:
    """(index of \\left, index of its \\right) for every pair at brace depth 0."""
    out, stack, depth = [], [], 0
    for i, t in enumerate(toks):
        depth += _DEPTH.get(t, 0)
        if t == r"\left":
            stack.append((i, depth))
        elif t == r"\right" and stack:
            j, d = stack.pop()
            if d == 0:
                out.append((j, i))
    return out


def _segments(toks: list[str]) -> list[list[str]]:
    bounds = [0] + _break_points(toks) + [len(toks)]
    return [toks[a:b] for a, b in zip(bounds, bounds[1:])]


def _products(seg: list[str]) -> list[list[str]]:
    """A term split before each \\cdot at brace depth 0."""
    cuts, depth = [], 0
    for i, t in enumerate(seg):
        depth += _DEPTH.get(t, 0)
        if depth == 0 and t == r"\cdot" and i:
            cuts.append(i)
    bounds = [0] + cuts + [len(seg)]
    return [seg[a:b] for a, b in zip(bounds, bounds[1:])]


def term_count(tex: str) -> int:
    """How many terms `break_sum` sees in a sum."""
    return len(_segments(_tokens(tex)))


def widest_term(tex: str) -> float:
    """Estimated width in pt of the widest piece `break_sum` cannot break."""
    return max(_width(s) for s in _segments(_tokens(tex)))


def break_sum(tex: str, first: float, rest: float) -> list[str]:
    """A sum split before its + and - (at brace depth 0, inside parentheses too) into lines no wider
    than `first` pt (the first line) and `rest` pt (the others), packed greedily. A parenthesis that
    spans a break becomes a fixed-size \\bigl( ... \\bigr) (\\left ... \\right cannot span lines).
    Each later line starts with its operator: {}+ term. A term wider than a line breaks before a
    \\cdot of its product; a factor wider than a line stays whole."""
    toks = _tokens(tex)
    segs = []
    for seg in _segments(toks):   # a product wider than a line: break it before its \cdot too
        segs += _products(seg) if _width(seg) > rest else [seg]
    widths = [_width(s) for s in segs]
    lines, cur, budget, used = [], [], first, 0.0
    for seg, w in zip(segs, widths):
        if cur and used + w > budget:
            lines.append(cur)
            cur, used, budget = [], 0.0, rest
        cur.append(seg)
        used += w
    lines.append(cur)
    if len(lines) == 1:
        return [tex]
    # indices where a line starts: a \left ... \right pair that contains one spans a break
    breaks, n = [], 0
    for line in lines[:-1]:
        n += sum(len(s) for s in line)
        breaks.append(n)
    toks = list(toks)
    for a, b in _pairs(toks):
        if any(a < k <= b for k in breaks):
            size = _delim_size(toks[a + 1:b])
            toks[a] = "\\" + size + "l"
            toks[b] = "\\" + size + "r"
    out, n = [], 0
    for line in lines:
        k = sum(len(s) for s in line)
        part = toks[n:n + k]
        while part and part[0].isspace():
            part = part[1:]
        while part and part[-1].isspace():
            part = part[:-1]
        text = "".join(part)
        out.append(text if not out else "{}" + text)
        n += k
    return out
