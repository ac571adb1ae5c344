"""Closed forms for papers: general, simplified under stated assumptions, numeric coefficients by term.

- general: the graph's exact total, floors, ceilings and the model's 0/1 indicators included.
- simplified: the same total under assumptions that make the floors, ceilings and indicators
  exact, which turns it into a polynomial in the model's term symbols. The assumptions are the
  model's (`Model.form_rules`), applied in order by one pipeline for every metric; each says what
  it assumes and gives the value of the case it excludes. The rule kinds:
    * `IndicatorRule`: a 0/1 factor assumed 1 (e.g. an image is tiled, w*h >= 2;
      a stitched grid is a copy, w >= 2); the excluded case is printed beside the form;
    * `BoundRule`: min(N, k*L) = N for the numeric bounds of a data-dependent count (MoE: every
      expert of a layer is hit by a long enough prompt);
    * `AlignedRule` (symbolic sizes only): sizes are multiples of M*unit, where M is the lcm of
      every divisor of the grid S/unit found inside a floor or ceiling (a 14-token window and
      two stride-2 convs: M = lcm(14, 2, 4) = 28). A smaller `grid_multiple` keeps some ceilings.
- coefficients: the simplified form of one mode, numbers collected by term
  (constant, per tile, per tile row, per text token, ...).

Each simplified form is checked equal to the general one where its assumptions hold
(tests/test_forms.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from . import render, stages
from .dtypes import DEFAULT_STORAGE, storage_values
from .liveness import undominated
from .maxima import over_max
from . import symbols as S

FORMS = ("general", "simplified", "coefficients")
LATEX_PREAMBLE = render.FORMULA_PREAMBLE   # what every form's LaTeX needs: amsmath only


@dataclass(frozen=True)
class Assumption:
    name: str
    words: str     # for people (printed with the formula)
    latex: str     # the condition, for the paper


@dataclass(frozen=True)
class Term:
    monomial: sp.Expr      # e.g. w*h; 1 for the constant
    coefficient: sp.Expr
    name: str              # "constant", "per tile", "per tile row", ...


@dataclass(frozen=True)
class Form:
    kind: str
    metric: str
    scope: str
    mode: str | None
    expr: sp.Expr
    assumptions: tuple[Assumption, ...] = ()
    # Values where an assumption fails and the formula does not apply: (case, value).
    otherwise: tuple[tuple[str, sp.Expr], ...] = ()
    notes: tuple[str, ...] = field(default=())
    # A form is a polynomial in these (the model's term symbols, in spelling order); everything
    # else (sizes, patch) lives in the coefficients. Named products: ((w, h), "tile").
    term_symbols: tuple = ()
    term_groups: tuple = ()
    latex_names: tuple = ()   # the model's own LaTeX for symbols it shares a name with another model

    @property
    def names(self) -> dict:
        return dict(self.latex_names)

    @property
    def gens(self) -> list[sp.Symbol]:
        return [s for s in self.term_symbols if self.expr.has(s)]

    @property
    def pieces(self) -> list[sp.Expr]:
        """The candidates of a peak (the form is their max), or the form itself."""
        return list(self.expr.args) if isinstance(self.expr, sp.Max) else [self.expr]

    @property
    def is_polynomial(self) -> bool:
        """Each piece a polynomial in the term symbols, with no floor, ceiling or case left in them."""
        for e in self.pieces:
            gens = [s for s in self.term_symbols if e.has(s)]
            if gens and (e.has(sp.Piecewise, sp.Max) or not e.is_polynomial(*gens)):
                return False
        return True

    def terms(self, piece: sp.Expr | None = None) -> list[Term]:
        if not self.is_polynomial:
            raise ValueError(f"the {self.kind} form of {self.metric}[{self.scope}] is not a polynomial "
                             f"in {', '.join(s.name for s in self.gens)}")
        expr = self.expr if piece is None else piece
        gens = [s for s in self.term_symbols if expr.has(s)]
        if not gens:
            return [Term(sp.Integer(1), sp.sympify(expr), "constant")]
        poly = sp.Poly(sp.expand(expr), *gens)
        out = []
        for powers, coeff in poly.terms():
            mono = sp.Mul(*(g ** k for g, k in zip(gens, powers)))
            out.append(Term(mono, sp.factor_terms(sp.expand(coeff)),
                            term_name(dict(zip(gens, powers)), self.term_symbols, self.term_groups)))
        return sorted(out, key=lambda t: _term_order(t, self.term_symbols, self.term_groups))

    # ---- text ---------------------------------------------------------------
    def lhs_latex(self) -> str:
        sup = rf"^{{\mathrm{{{_tex(self.mode)}}}}}" if self.mode else ""
        return rf"\mathrm{{{_tex(self.metric)}}}{sup}_{{\mathrm{{{_tex(self.scope)}}}}}"

    def latex(self, text_width: float | None = render.TEXT_WIDTH) -> str:
        """The form for a paper (amsmath only: `LATEX_PREAMBLE`), to set in a display (\\[ ... \\]).

        A form wider than `text_width` pt (default: the article class's \\textwidth) is broken at its
        terms into an `aligned` block, continuation lines indented; None or 0 keeps one line. A peak is
        one candidate per line (each broken the same way), coefficients one term per line."""
        conds = [a.latex for a in self.assumptions]
        width = float(text_width or 0) * _SLACK
        if self.kind == "general" and not (width and len(self.pieces) > 1):
            return self._sum_latex(render.latex(self._closed(), self.names), [], width)
        if len(self.pieces) > 1:
            if self.kind == "general":
                cands = [render.latex(render.closed_form(p, self.term_symbols, [g for g, _ in self.term_groups]),
                                      self.names) for p in self.pieces]
            else:
                cands = [render.latex_sum(render.latex_terms([(t.monomial, t.coefficient) for t in self.terms(p)],
                                                             self.term_symbols, self.names)) for p in self.pieces]
            return self._peak_latex(cands, conds, width)
        terms = self.terms()
        parts = render.latex_terms([(t.monomial, t.coefficient) for t in terms], self.term_symbols, self.names)
        if self.kind == "simplified":
            return self._sum_latex(render.latex_sum(parts), conds, width)
        # coefficients: one term per line, named
        head = f"{self.lhs_latex()} ={{}}"
        bodies = [("-" if sign == "-" and k == 0 else (f"{sign} " if k else "")) + body
                  for k, (sign, body) in enumerate(parts)]
        names = [rf"\text{{{_tex_text(t.name)}}}" for t in terms]
        wide = width and render.tex_width(head) + max(map(render.tex_width, bodies)) + _COLUMN_GAP + \
            max(map(render.tex_width, names)) > width
        lines = []
        if wide:   # the left-hand side on a line of its own, overlapping nothing
            lines.append(rf"\rlap{{$\displaystyle {head}$}}")
        for k, (body, name) in enumerate(zip(bodies, names)):
            lead = "&\\quad " if wide else (f"{head}& " if k == 0 else "&")
            lines.append(rf"{lead}{body} && {name}")
        lines += self._cond_lines(conds, (width - (0 if wide else render.tex_width(head))) if width else float("inf"))
        return "\\begin{aligned}\n" + " \\\\\n".join(lines) + "\n\\end{aligned}"

    def legend(self, package: str | None = None) -> list[tuple[str, str, str]]:
        """(LaTeX, plain name, meaning) of what the LaTeX shows: the left-hand side, every symbol (the
        model's own LaTeX; `package`, the model's package, picks its own words) and every named 0/1
        factor."""
        sizes = f"the {self.mode} mode's sizes" if self.mode else "sizes symbolic"
        out = [(self.lhs_latex(), f"{self.metric}[{self.scope}]", f"{self.metric} over the scope {self.scope}, {sizes}")]
        syms = {s for s in self.expr.free_symbols if isinstance(s, sp.Symbol)}
        for s in [s for s in self.term_symbols if s in syms] + sorted(syms - set(self.term_symbols), key=str):
            out.append((S.latex_name(s, self.names), s.name, S.doc(s, package)))
        for ind in S.INDICATORS.values():
            if self.expr.has(ind.expr):
                out.append((ind.latex, ind.name, "Iverson bracket: 1 when the condition holds, else 0"))
        return out

    def _head(self, lead: str, width: float, whole: float, piece: float) -> tuple[str, str, float]:
        """(first line's start, later lines' start, room after the alignment point): the left-hand side
        before the alignment point where the widest unbreakable `piece` still fits after it (and it is
        short, or the widest `whole` line fits), else on a line of its own."""
        head = f"{self.lhs_latex()} = {lead}".rstrip()
        hw = render.tex_width(head)
        if hw + piece + 10 <= width and (hw <= width * 0.4 or hw + whole <= width):
            return head + "&", "&", width - hw
        return rf"&{head}\\" + "\n&\\qquad ", "&\\qquad ", width - 20

    def _cond_widths(self, conds) -> list[float]:
        """Each assumption's width on a line of its own (a line never breaks inside one)."""
        return [render.tex_width(r"\qquad \text{for } " + c + ",") for c in conds]

    def _cond_lines(self, conds, room: float) -> list[str]:
        """The assumptions after the form, as many a line as fit."""
        if not conds:
            return []
        lead, more = r"\qquad \text{for } ", r"\qquad "
        lines, cur = [], []
        for c in conds:
            if cur and render.tex_width(lead + _AND.join(cur + [c])) > room:
                lines.append(_AND.join(cur) + ",")
                cur = []
            cur.append(c)
        lines.append(_AND.join(cur))
        return [f"&{lead if k == 0 else more}{l}" for k, l in enumerate(lines)]

    def _sum_latex(self, body: str, conds, width: float) -> str:
        one = f"{self.lhs_latex()} = {body}"
        if conds:
            one += rf" \qquad \text{{for }} {_AND.join(conds)}"
        if not width or render.tex_width(one) <= width:
            return one
        first, later, room = self._head("{}", width, render.tex_width(body),
                                        max([render.widest_term(body)] + self._cond_widths(conds)))
        lines = render.break_sum(body, room, room - 10)
        rows = [first + lines[0]] + [rf"{later}\quad {l}" for l in lines[1:]]
        rows += self._cond_lines(conds, room)
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"

    def _peak_latex(self, sums, conds, width: float) -> str:
        """A peak: the max of its candidates (LaTeX `sums`), one per line; with a width, candidates of
        one term share a line and long ones are broken at terms."""
        if not width:
            rows = [rf"{self.lhs_latex()} = \max\bigl(&{sums[0]},"] + [rf"&{r}," for r in sums[1:-1]] + \
                [rf"&{sums[-1]}\bigr)"] + ([rf"&\qquad \text{{for }} {_AND.join(conds)}"] if conds else [])
            return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"
        first, later, room = self._head(r"\max\bigl(", width, max(map(render.tex_width, sums)) + 8,
                                        max([render.widest_term(s) + 8 for s in sums] + self._cond_widths(conds)))
        lines, packed = [], []      # lines of the candidates; packed: short candidates waiting for a line
        for k, s in enumerate(sums):
            end = r"\bigr)" if k == len(sums) - 1 else ","
            if packed and (render.term_count(s) > 1 or render.tex_width(" ".join(packed + [s + end])) > room):
                lines.append(" ".join(packed))
                packed = []
            if render.term_count(s) == 1 and render.tex_width(s + end) <= room:
                packed.append(s + end)
                continue
            if packed:
                lines.append(" ".join(packed))
                packed = []
            parts = render.break_sum(s, room - 8, room - 18)
            lines += [(r"\quad " if j else "") + part for j, part in enumerate(parts)]
            lines[-1] += end
        if packed:
            lines.append(" ".join(packed))
        rows = [(first if j == 0 else later) + line for j, line in enumerate(lines)]
        rows += self._cond_lines(conds, room)
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"

    def plain(self) -> str:
        mode = f" ({self.mode})" if self.mode else ""
        lhs = f"{self.metric}[{self.scope}]{mode}"
        if self.kind == "general":
            return f"{lhs} = {render.plain(self._closed())}"
        if len(self.pieces) > 1:
            if self.kind == "simplified":
                body = ",\n    ".join(render.plain_terms([(t.monomial, t.coefficient) for t in self.terms(p)],
                                                          self.term_symbols) for p in self.pieces)
                return f"{lhs} = max(\n    {body}\n)"
            rows = [[f"candidate {k}", t.name, render.monomial_plain(t.monomial, self.term_symbols),
                     render.plain(t.coefficient), _approx(t.coefficient)]
                    for k, p in enumerate(self.pieces, 1) for t in self.terms(p)]
            return f"{lhs} = the max of {len(self.pieces)} candidates, collected by term:\n" + \
                render.table(rows, ["candidate", "term", "monomial", "coefficient", "approx"])
        terms = self.terms()
        if self.kind == "simplified":
            return f"{lhs} = {render.plain_terms([(t.monomial, t.coefficient) for t in terms], self.term_symbols)}"
        rows = [[t.name, render.monomial_plain(t.monomial, self.term_symbols), render.plain(t.coefficient),
                 _approx(t.coefficient)] for t in terms]
        return f"{lhs}, collected by term:\n" + render.table(rows, ["term", "monomial", "coefficient", "approx"])

    def _closed(self) -> sp.Expr:
        return render.closed_form(self.expr, self.term_symbols, [g for g, _ in self.term_groups])

    def commentary(self) -> list[str]:
        """The assumptions, the excluded cases and the conventions, one line each."""
        lines = [f"assumption: {a.words}" for a in self.assumptions]
        lines += [f"otherwise, {case}: {render.plain(v)}" for case, v in self.otherwise]
        return lines + list(self.notes)

    def to_json(self, text_width: float | None = render.TEXT_WIDTH) -> dict:
        out = {"form": self.kind, "mode": self.mode, "scope": self.scope, "metric": self.metric,
               "expression": render.plain(self.expr), "latex": self.latex(text_width),
               "symbols": sorted(s.name for s in self.expr.free_symbols),
               "polynomial": self.is_polynomial,
               "assumptions": [{"name": a.name, "words": a.words, "latex": a.latex} for a in self.assumptions],
               "otherwise": [{"case": c, "expression": render.plain(v)} for c, v in self.otherwise],
               "notes": list(self.notes)}
        if self.kind != "general":
            terms = lambda p: [{"term": t.name, "monomial": render.monomial_plain(t.monomial, self.term_symbols),
                                "coefficient": render.plain(t.coefficient)} for t in self.terms(p)]
            if len(self.pieces) > 1:
                out["max_of"] = [terms(p) for p in self.pieces]
            else:
                out["terms"] = terms(None)
        return out


_AND = ",\\ "          # between the assumptions of a form
_SLACK = 0.95          # the width estimates are within 5 % of TeX's
_COLUMN_GAP = 20.0     # between the column pairs of an aligned block (a term and its name)


def _approx(x) -> str:
    x = sp.sympify(x)
    return render.human(int(x)) if x.is_Integer else (f"{float(x):.6g}" if x.is_number else "")


def _tex_text(name: str) -> str:
    """A term name inside \\text{}: powers and products in math mode."""
    name = re.sub(r"\^(\d+)", r"$^{\1}$", name)
    return name.replace(" x ", r" $\times$ ")


def _tex(name: str) -> str:
    return name.replace("_", r"\_")


# ---- term names -----------------------------------------------------------------

def term_name(powers: dict, term_symbols=(), term_groups=()) -> str:
    """'constant', 'per tile' (a named product w*h), 'per tile row' (h), 'per tile^2 x text token', ..."""


    p = {s: int(k) for s, k in powers.items() if k}
    if not p:
        return "constant"
    parts = []
    for group, name in term_groups:
        n = min(p.get(s, 0) for s in group)
        if n:
            parts.append(name + (f"^{n}" if n > 1 else ""))
            for s in group:
                p[s] -= n
    for s in term_symbols:
        if p.get(s):
            info = S.SYMBOLS.get(s.name)
            parts.append((info.term if info is not None and info.term else s.name) + (f"^{p[s]}" if p[s] > 1 else ""))
    return "per " + " x ".join(parts)


def _term_order(t: Term, term_symbols=(), term_groups=()):
    """Constant, then by degree counting a named product (a tile, w*h) as one unit; within a degree:
    the named products, then the term symbols in the model's order (a form reads constant +
    per tile)."""
    p = {s: int(k) for s, k in t.monomial.as_powers_dict().items() if s.is_Symbol}
    units = []
    for group, _ in term_groups:
        n = min(p.get(s, 0) for s in group)
        units.append(n)
        for s in group:
            p[s] = p.get(s, 0) - n
    units += [p.get(s, 0) for s in term_symbols]
    return (sum(units), tuple(-u for u in units))


# ---- assumptions ----------------------------------------------------------------

@dataclass(frozen=True)
class IndicatorRule:
    """A 0/1 factor of the model assumed to be 1; the case it excludes is evaluated by substituting
    `case_values` in order (the indicator then evaluates itself) and printed beside the form."""
    indicator: sp.Expr
    assumption: Assumption
    case: str
    case_values: tuple[tuple[sp.Expr, object], ...]

    def apply(self, expr: sp.Expr, multiple=None):
        if not expr.has(self.indicator):
            return expr, None, ()

        def case(e):
            for old, new in self.case_values:
                e = e.subs(old, new)
            return sp.expand(e)
        return self.assume(expr), self.assumption, ((self.case, over_max(expr, case)),)

    def assume(self, expr: sp.Expr) -> sp.Expr:
        return over_max(expr, lambda e: e.subs(self.indicator, 1))


@dataclass(frozen=True)
class BoundRule:
    """min(N, k*L) = N for every numeric bound N of a data-dependent count; `words` says when it holds
    (its `{values}` is filled with the bounds found)."""
    name: str
    words: str
    latex: str

    def _bounds(self, expr):
        return [m for m in expr.atoms(sp.Min) if any(a.is_Number for a in m.args)]

    def apply(self, expr: sp.Expr, multiple=None):
        bounds = self._bounds(expr)
        if not bounds:
            return expr, None, ()
        values = sorted({int(a) for m in bounds for a in m.args if a.is_Number})
        a = Assumption(self.name, self.words.format(values=", ".join(map(str, values))), self.latex)
        return self.assume(expr), a, ()

    def assume(self, expr: sp.Expr) -> sp.Expr:
        return over_max(expr, lambda e: e.subs({m: next(x for x in m.args if x.is_Number) for m in self._bounds(e)}))


@dataclass(frozen=True)
class AlignedRule:
    """Sizes multiples of multiple*unit (unit: the patch size): floors and ceilings of the grid
    S/unit become exact. `released(step)` names the model's modes whose sizes are multiples of
    `step` pixels (for the words)."""
    sizes: tuple
    unit: sp.Symbol
    unit_value: int
    released: object = None      # callable(step px, sizes) -> str
    latex_names: dict | None = None
    values: dict | None = None   # the model's released values of the unit and other constants (for the words)

    def multiple(self, expr: sp.Expr):
        """lcm of the divisors applied to the grid S/unit inside floors and ceilings (None: none found)."""
        sizes = [s for s in self.sizes if expr.has(s)]
        grids = {s: sp.Dummy(f"g_{s.name}", integer=True, positive=True) for s in sizes}
        # only the floors and ceilings matter: rewrite those, never the whole (maybe a peak's Max) expression
        atoms = [a.xreplace({s: self.unit * g for s, g in grids.items()}) for a in expr.atoms(sp.floor, sp.ceiling)]
        divisors = [sp.fraction(sp.together(atom.args[0]))[1]
                    for e in atoms for atom in ([e] if isinstance(e, (sp.floor, sp.ceiling)) else
                                                e.atoms(sp.floor, sp.ceiling))
                    if atom.free_symbols & set(grids.values())]
        if not divisors:
            return None
        m = sp.Integer(1)
        for d in divisors:
            m = sp.lcm(m, d)
        return m

    def apply(self, expr: sp.Expr, multiple=None):
        sizes = [s for s in self.sizes if expr.has(s)]
        if not sizes or not expr.has(sp.floor, sp.ceiling):
            return expr, None, ()
        # no divisor inside a floor beyond the unit itself (floor(S/p)): multiples of the unit suffice
        m = sp.sympify(multiple) if multiple is not None else (self.multiple(expr) or sp.Integer(1))
        if not (m.is_integer and m.is_positive):
            raise ValueError(f"grid multiple must be a positive integer, got {m}")
        names = " and ".join(s.name for s in sizes)
        texnames = ", ".join(S.latex_name(s, self.latex_names) for s in sizes)
        # the multiple may hold another of the model's constants (a downsampling ratio): its values give the px
        step = sp.sympify(m * self.unit).subs(self.values or {self.unit: self.unit_value})
        where = f"multiples of {int(step)} px" if step.is_Integer else f"multiples of {render.plain(step)} px"
        if step.is_Integer and self.released:
            where += f"; holds for {self.released(int(step), sizes)}"
        grid = self.unit.name.split("_")[0]
        a = Assumption(f"aligned-{m}",
                       f"{names} are multiples of {render.plain(m)}*{self.unit.name}, so the {grid} grid S/{self.unit.name} "
                       f"is a multiple of {render.plain(m)} and its floors/ceilings are exact (with the released "
                       f"values: {where})",
                       rf"{texnames} \in \{{{render.latex(m * self.unit, self.latex_names)}, "
                       rf"{render.latex(2 * m * self.unit, self.latex_names)}, \dots\}}")   # amsmath only
        return self._aligned(expr, m), a, m

    def _aligned(self, expr, m):
        sizes = [s for s in self.sizes if expr.has(s)]
        ks = {s: sp.Dummy(f"k_{s.name}", integer=True, positive=True) for s in sizes}
        # sizes as m*unit*k with k an integer: the floors and ceilings evaluate as the tree is rebuilt
        return over_max(expr, lambda e: e.xreplace({s: m * self.unit * k for s, k in ks.items()})
                        .xreplace({k: s / (m * self.unit) for s, k in ks.items()}))


# ---- the forms ------------------------------------------------------------------

def build(model, kind: str, mode_name: str | None, scope: str, metric: str, grid_multiple: int | None = None,
          variants=None, dtype: str = DEFAULT_STORAGE) -> Form:
    """One form of a metric over a scope of `model` (costgraph.model.Model): a Cost field or a
    derived metric (costgraph.stages.DERIVED). The same assumption pipeline for all of them.

    The storage dtype is substituted: a 0/1 "does this cast copy" factor is exact only on the
    storage dtypes there are, so a form symbolic in the element size would carry interpolation
    terms (b^2) no paper can print; one form per dtype instead (`--dtype all`)."""
    if kind not in FORMS:
        raise ValueError(f"unknown form {kind!r} (choose from {', '.join(FORMS)})")
    mode = model.get_mode(mode_name) if mode_name else None
    variants = model.variants() if variants is None else variants
    storage_values(dtype)  # validates
    return _build(model, kind, mode, scope, metric, grid_multiple, variants, dtype)


@lru_cache(maxsize=None)
def _build(model, kind, mode, scope, metric, grid_multiple, variants, dtype) -> Form:
    expr = stages.metric_expr(model, mode, scope, metric, variants)
    notes = tuple(n for n in (model.metric_note(metric, variants),) if n)
    if expr.has(S.dtype_bytes):
        b = storage_values(dtype)
        expr = over_max(expr, lambda e: e.subs(b))
        notes += (f"storage dtype {dtype}: {S.dtype_bytes.name} = {b[S.dtype_bytes]} bytes per element "
                  f"(--dtype for another).",)
    common = dict(term_symbols=tuple(model.term_symbols), term_groups=tuple(model.term_groups.items()),
                  latex_names=tuple(model.latex_names.items()))
    name = mode.name if mode is not None else None
    if kind == "general":
        return Form(kind, metric, scope, name, expr, notes=notes, **common)
    expr = over_max(expr, lambda e: sp.expand(e)) if expr.has(sp.Max) else expr
    if kind == "coefficients" and mode is None:
        raise ValueError("the coefficients form needs a mode (--mode): its coefficients are numbers")
    if grid_multiple is not None and mode is not None:
        raise ValueError("--grid-multiple applies to symbolic sizes only (no --mode)")
    assumptions, otherwise = [], ()
    for rule in model.form_rules(mode):
        new, assumption, extra = rule.apply(expr, grid_multiple) if isinstance(rule, AlignedRule) \
            else rule.apply(expr)
        if assumption is None:
            continue
        if isinstance(rule, AlignedRule):
            m = extra
            otherwise = tuple((case, rule._aligned(v, m)) for case, v in otherwise)
        else:
            otherwise = tuple((case, rule.assume(v)) for case, v in otherwise) + tuple(extra)
        expr = new
        assumptions.append(assumption)
    expr = over_max(expr, lambda e: sp.expand(e.doit()))
    if expr.has(sp.Max):
        expr = _max_of_undominated(expr, model.term_symbols)
        otherwise = tuple((case, _max_of_undominated(v, model.term_symbols) if v.has(sp.Max) else v)
                          for case, v in otherwise)
    return Form(kind, metric, scope, name, expr, tuple(assumptions), otherwise, notes, **common)


def _leaves(expr: sp.Expr) -> list[sp.Expr]:
    """The candidates of a (nested) max, a non-negative factor distributed over them."""
    if isinstance(expr, sp.Max):
        return [x for a in expr.args for x in _leaves(a)]
    if isinstance(expr, sp.Mul) and expr.has(sp.Max):
        inner = [a for a in expr.args if a.has(sp.Max)]
        factor = sp.Mul(*[a for a in expr.args if not a.has(sp.Max)])
        if len(inner) == 1 and factor.is_nonnegative is not False:
            return [sp.expand(factor * x) for x in _leaves(inner[0])]
    return [expr]


def _max_of_undominated(expr: sp.Expr, gens) -> sp.Expr:
    """A peak as the max of the candidates no other candidate dominates (their max is the same)."""
    leaves = list(dict.fromkeys(sp.expand(x) for x in _leaves(expr)))
    keep = [e for e, _ in undominated([(e, "") for e, in zip(leaves)])]
    return keep[0] if len(keep) == 1 else sp.Max(*keep, evaluate=False)
