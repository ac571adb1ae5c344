"""Closed forms for papers: general, simplified under stated assumptions, numeric coefficients by term.

- general: the graph's exact total, floors, ceilings and the no-crop indicator included.
- simplified: the same total under assumptions that make the floors, ceilings and the
  indicator exact, which turns it into a polynomial in the layout (and sequence) symbols:
    * tiled: w_crop*h_crop >= 2 (the vendor tiles into at least 2 crops; the 1x1 layout
      means "no crops" and its value is printed beside the formula);
    * aligned (symbolic sizes only): base_size and image_size are multiples of M*patch_size,
      where M is the lcm of every divisor of the patch grid S/p found inside a floor or
      ceiling (SAM's 14-token window, the two stride-2 convs: M = lcm(14, 2, 4) = 28).
      A smaller `grid_multiple` (e.g. 4: sizes multiple of 64, true of every released mode)
      keeps the window ceilings, which is where they matter.
- coefficients: the simplified form of one mode, numbers collected by term
  (constant, per crop, per crop row, per crop column, per text token, ...).

Each simplified form is checked equal to the general one where its assumptions hold
(tests/test_forms.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from . import render
from . import symbols as S

FORMS = ("general", "simplified", "coefficients")
# A form is a polynomial in these; everything else (sizes, patch) lives in the coefficients.
TERM_SYMBOLS = (S.w_crop, S.h_crop, S.text_tokens, S.output_tokens)


@dataclass(frozen=True)
class Assumption:
    name: str
    words: str     # for people (printed with the formula)
    latex: str     # the condition, for the paper


@dataclass(frozen=True)
class Term:
    monomial: sp.Expr      # e.g. w_crop*h_crop; 1 for the constant
    coefficient: sp.Expr
    name: str              # "constant", "per crop", "per crop row", ...


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

    @property
    def gens(self) -> list[sp.Symbol]:
        return [s for s in TERM_SYMBOLS if self.expr.has(s)]

    @property
    def is_polynomial(self) -> bool:
        """A polynomial in the layout and sequence symbols, with no floor, ceiling or case left in them."""
        gens = self.gens
        if not gens:  # a constant in the layout and sequence (floors of the sizes may remain)
            return True
        return not self.expr.has(sp.Piecewise) and bool(self.expr.is_polynomial(*gens))

    def terms(self) -> list[Term]:
        if not self.is_polynomial:
            raise ValueError(f"the {self.kind} form of {self.metric}[{self.scope}] is not a polynomial "
                             f"in {', '.join(s.name for s in self.gens)}")
        gens = self.gens
        if not gens:
            return [Term(sp.Integer(1), sp.sympify(self.expr), "constant")]
        poly = sp.Poly(sp.expand(self.expr), *gens)
        out = []
        for powers, coeff in poly.terms():
            mono = sp.Mul(*(g ** k for g, k in zip(gens, powers)))
            out.append(Term(mono, sp.factor_terms(sp.expand(coeff)), term_name(dict(zip(gens, powers)))))
        return sorted(out, key=_term_order)

    # ---- text ---------------------------------------------------------------
    def lhs_latex(self) -> str:
        sup = rf"^{{\mathrm{{{_tex(self.mode)}}}}}" if self.mode else ""
        return rf"\mathrm{{{_tex(self.metric)}}}{sup}_{{\mathrm{{{_tex(self.scope)}}}}}"

    def latex(self) -> str:
        cond = ",\\ ".join(a.latex for a in self.assumptions)
        cond = rf"\qquad \text{{for }} {cond}" if cond else ""
        if self.kind == "general":
            return f"{self.lhs_latex()} = {render.latex(render.closed_form(self.expr))}"
        terms = self.terms()
        parts = render.latex_terms([(t.monomial, t.coefficient) for t in terms])
        if self.kind == "simplified":
            return f"{self.lhs_latex()} = {render.latex_sum(parts)} {cond}".rstrip()
        # coefficients: one term per line, named
        lines = []
        for k, ((sign, body), t) in enumerate(zip(parts, terms)):
            lead = (f"{self.lhs_latex()} ={{}}& " if k == 0 else "&") + \
                   ("-" if sign == "-" and k == 0 else (f"{sign} " if k else ""))
            lines.append(rf"{lead}{body} && \text{{{_tex_text(t.name)}}}")
        if cond:
            lines.append(rf"&{cond}")
        return "\\begin{aligned}\n" + " \\\\\n".join(lines) + "\n\\end{aligned}"

    def plain(self) -> str:
        mode = f" ({self.mode})" if self.mode else ""
        lhs = f"{self.metric}[{self.scope}]{mode}"
        if self.kind == "general":
            return f"{lhs} = {render.plain(render.closed_form(self.expr))}"
        terms = self.terms()
        if self.kind == "simplified":
            return f"{lhs} = {render.plain_terms([(t.monomial, t.coefficient) for t in terms])}"
        rows = [[t.name, render.monomial_plain(t.monomial), render.plain(t.coefficient), _approx(t.coefficient)]
                for t in terms]
        from .cli import table

        return f"{lhs}, collected by term:\n" + table(rows, ["term", "monomial", "coefficient", "approx"])

    def commentary(self) -> list[str]:
        """The assumptions, the excluded cases and the conventions, one line each."""
        lines = [f"assumption: {a.words}" for a in self.assumptions]
        lines += [f"otherwise, {case}: {render.plain(v)}" for case, v in self.otherwise]
        return lines + list(self.notes)

    def to_json(self) -> dict:
        out = {"form": self.kind, "mode": self.mode, "scope": self.scope, "metric": self.metric,
               "expression": render.plain(self.expr), "latex": self.latex(),
               "symbols": sorted(s.name for s in self.expr.free_symbols),
               "polynomial": self.is_polynomial,
               "assumptions": [{"name": a.name, "words": a.words, "latex": a.latex} for a in self.assumptions],
               "otherwise": [{"case": c, "expression": render.plain(v)} for c, v in self.otherwise],
               "notes": list(self.notes)}
        if self.kind != "general":
            out["terms"] = [{"term": t.name, "monomial": render.monomial_plain(t.monomial),
                             "coefficient": render.plain(t.coefficient)} for t in self.terms()]
        return out


def _approx(x) -> str:
    from .cli import human

    x = sp.sympify(x)
    return human(int(x)) if x.is_Integer else (f"{float(x):.6g}" if x.is_number else "")


def _tex_text(name: str) -> str:
    """A term name inside \\text{}: powers and products in math mode."""
    import re

    name = re.sub(r"\^(\d+)", r"$^{\1}$", name)
    return name.replace(" x ", r" $\times$ ")


def _tex(name: str) -> str:
    return name.replace("_", r"\_")


# ---- term names -----------------------------------------------------------------

_FACTOR_NAMES = {S.w_crop: "crop column", S.h_crop: "crop row", S.text_tokens: "text token",
                 S.output_tokens: "output token"}


def term_name(powers: dict) -> str:
    """'constant', 'per crop' (w*h), 'per crop row' (h), 'per crop^2 x text token', ..."""
    p = {s: int(k) for s, k in powers.items() if k}
    if not p:
        return "constant"
    parts = []
    crops = min(p.get(S.w_crop, 0), p.get(S.h_crop, 0))
    if crops:
        parts.append("crop" + (f"^{crops}" if crops > 1 else ""))
        p[S.w_crop] -= crops
        p[S.h_crop] -= crops
    for s in TERM_SYMBOLS:
        if p.get(s):
            parts.append(_FACTOR_NAMES[s] + (f"^{p[s]}" if p[s] > 1 else ""))
    return "per " + " x ".join(parts)


def _term_order(t: Term):
    """Constant, then by degree counting a crop (w*h) as one unit; within a degree: crop, crop row,
    crop column, text token, output token (so the vision form reads constant + per crop)."""
    p = {s: int(k) for s, k in t.monomial.as_powers_dict().items() if s.is_Symbol}
    w, h = p.get(S.w_crop, 0), p.get(S.h_crop, 0)
    crops = min(w, h)
    units = (crops, h - crops, w - crops, p.get(S.text_tokens, 0), p.get(S.output_tokens, 0))
    return (sum(units), tuple(-u for u in units))


# ---- assumptions ----------------------------------------------------------------

def assume_tiled(expr: sp.Expr):
    """w_crop*h_crop >= 2: the crop indicator (0 for the 1x1 no-crop layout) is 1."""
    from graphs.layout import crops_run

    run = crops_run()
    if not expr.has(run):
        return expr, None, ()
    a = Assumption("tiled", "w_crop*h_crop >= 2: the page is tiled (a side over 640 px); the 1x1 layout "
                            "means no crops and is given separately",
                   r"w_{\mathrm{crop}} h_{\mathrm{crop}} \geq 2")
    no_crop = sp.expand(expr.subs({S.w_crop: 1, S.h_crop: 1}))
    return expr.subs(run, 1), a, (("no-crop layout 1x1 (page within 640x640)", no_crop),)


def assume_columns(expr: sp.Expr):
    """w_crop >= 2: stitching the crop batch into one grid copies it (a single column stays a view)."""
    from graphs.deepseek_ocr import stitch_copies

    copies = stitch_copies()
    if not expr.has(copies):
        return expr, None, ()
    a = Assumption("columns", "w_crop >= 2: the stitched crop grid is a copy (a single column of tiles stays "
                              "a view); the w_crop = 1 case is given separately",
                   r"w_{\mathrm{crop}} \geq 2")
    one_column = sp.expand(expr.subs(copies, 0).subs(S.w_crop, 1))
    return expr.subs(copies, 1), a, (("single column w_crop = 1", one_column),)


def assume_every_expert(expr: sp.Expr):
    """min(experts, k*tokens) = experts: the prompt routes at least one row per expert."""
    bounds = [m for m in expr.atoms(sp.Min) if any(a.is_Number for a in m.args)]
    if not bounds:
        return expr, None
    experts = sorted({int(a) for m in bounds for a in m.args if a.is_Number})
    a = Assumption("experts", "every MoE layer's experts loop runs all "
                              f"{', '.join(map(str, experts))} experts: min(experts, k*L) = experts, i.e. the prompt "
                              "routes at least that many rows (any DeepSeek-OCR prompt: k*L >= 6*74 > 64)",
                   r"\min(E, kL) = E")
    return expr.subs({m: next(x for x in m.args if x.is_Number) for m in bounds}), a


def grid_multiple(expr: sp.Expr) -> sp.Expr | None:
    """lcm of the divisors applied to the patch grid S/p inside floors and ceilings (None: none found)."""
    sizes = [s for s in S.SIZES if expr.has(s)]
    grids = {s: sp.Dummy(f"g_{s.name}", integer=True, positive=True) for s in sizes}
    e = expr.subs({s: S.patch_size * g for s, g in grids.items()})
    divisors = []
    for atom in e.atoms(sp.floor, sp.ceiling):
        if atom.free_symbols & set(grids.values()):
            divisors.append(sp.fraction(sp.together(atom.args[0]))[1])
    if not divisors:
        return None
    m = sp.Integer(1)
    for d in divisors:
        m = sp.lcm(m, d)
    return m


def assume_aligned(expr: sp.Expr, multiple=None):
    """Sizes multiples of multiple*patch_size: floors and ceilings of the patch grid become exact."""
    sizes = [s for s in S.SIZES if expr.has(s)]
    if not sizes or not expr.has(sp.floor, sp.ceiling):
        return expr, None, None
    m = sp.sympify(multiple) if multiple is not None else grid_multiple(expr)
    if m is None:
        return expr, None, None
    if not (m.is_integer and m.is_positive):
        raise ValueError(f"grid multiple must be a positive integer, got {m}")
    ks = {s: sp.Dummy(f"k_{s.name}", integer=True, positive=True) for s in sizes}
    e = expr.subs({s: m * S.patch_size * k for s, k in ks.items()})
    e = e.subs({k: s / (m * S.patch_size) for s, k in ks.items()})
    names = " and ".join(s.name for s in sizes)
    texnames = ", ".join(S.LATEX_NAMES[s] for s in sizes)
    released = _released_note(sizes, m)
    a = Assumption(f"aligned-{m}",
                   f"{names} are multiples of {render.plain(m)}*patch_size, so the patch grid S/patch_size is a "
                   f"multiple of {render.plain(m)} and its floors/ceilings are exact{released}",
                   rf"{texnames} \in {render.latex(m * S.patch_size)}\,\mathbb{{N}}")
    return e, a, m


def _released_note(sizes, m) -> str:
    from graphs.config import MODES, VISION

    values = {S.patch_size: VISION.patch_size, S.downsample_ratio: VISION.downsample_ratio}
    step = int(sp.sympify(m * S.patch_size).subs(values))
    ok = [md.name for md in MODES.values() if md.crop_mode and all(
        getattr(md, s.name) % step == 0 for s in sizes)]
    which = ", ".join(ok) if ok else "none of the released crop modes (use --mode for their exact polynomial)"
    return f" (with patch_size 16: multiples of {step} px; holds for {which})"


# ---- the forms ------------------------------------------------------------------

@lru_cache(maxsize=None)
def build(kind: str, mode_name: str | None, scope: str, metric: str, grid_multiple: int | None = None,
          variants=None) -> Form:
    """One form of `metric` over `scope`; `variants` (graphs.decoder.Variants) for the language model."""
    from graphs import deepseek_ocr as model

    if kind not in FORMS:
        raise ValueError(f"unknown form {kind!r} (choose from {', '.join(FORMS)})")
    mode = model.get_mode(mode_name) if mode_name else None
    expr = model.formula(mode, scope, metric, model.VENDOR if variants is None else variants)
    notes = (model.FORMULA_NOTE,)
    if kind == "general":
        return Form(kind, metric, scope, mode_name, expr, notes=notes)
    if kind == "coefficients" and mode is None:
        raise ValueError("the coefficients form needs a mode (--mode): its coefficients are numbers")
    if grid_multiple is not None and mode is not None:
        raise ValueError("--grid-multiple applies to symbolic sizes only (no --mode)")
    assumptions, otherwise = [], ()
    expr, tiled, otherwise = assume_tiled(expr)
    if tiled:
        assumptions.append(tiled)
    expr, columns, one_column = assume_columns(expr)
    if columns:
        assumptions.append(columns)
        otherwise = tuple((case, assume_tiled(v)[0]) for case, v in otherwise) + \
            tuple((case, sp.expand(assume_tiled(v)[0])) for case, v in one_column)
    expr, every_expert = assume_every_expert(expr)
    if every_expert:
        assumptions.append(every_expert)
        otherwise = tuple((case, assume_every_expert(v)[0]) for case, v in otherwise)
    expr, aligned, m = assume_aligned(expr, grid_multiple)
    if aligned:
        assumptions.append(aligned)
        otherwise = tuple((case, assume_aligned(v, m)[0]) for case, v in otherwise)
    expr = sp.expand(expr.doit())
    return Form(kind, metric, scope, mode_name, expr, tuple(assumptions), otherwise, notes)
