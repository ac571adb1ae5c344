"""Closed forms: each simplified form equals the general one wherever its assumptions hold
(exhaustively over grids and sequence lengths for every mode, and over sampled symbolic sizes),
differs where they do not, and renders as LaTeX that parses."""
import io
import itertools
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sympy as sp  # noqa: E402

from costgraph import forms  # noqa: E402
from costgraph.cost import METRICS  # noqa: E402
from costgraph.dtypes import STORAGE  # noqa: E402
from costgraph.evaluate import Compiled, substitute  # noqa: E402
from costgraph.graphs.deepseek_ocr import MODEL  # noqa: E402
from costgraph.graphs.deepseek_ocr import assembly as model  # noqa: E402
from costgraph.graphs.deepseek_ocr import symbols as S  # noqa: E402
from costgraph.graphs.deepseek_ocr.config import MODES  # noqa: E402
from costgraph.graphs.deepseek_ocr.config import LM  # noqa: E402
from costgraph.graphs.deepseek_ocr.decoder import prompt_length  # noqa: E402
from costgraph.graphs.deepseek_ocr.layout import crops_run, layout_for_grid  # noqa: E402

# every grid with w*h >= 2 up to 12 x 12 (beyond the layout's 9: the algebra must hold anyway),
# crossed with prompt-text and output lengths
GRIDS = [(w, h) for w in range(1, 13) for h in range(1, 13) if w * h >= 2]
TEXT = (0, 7, 300)
OUTPUT = (1, 2, 1000)
ALIGNED = MODEL.form_rules(None)[-1]   # the AlignedRule: sizes multiples of M*patch_size


def build(kind, mode, scope, metric, grid_multiple=None, dtype="bf16"):
    return forms.build(MODEL, kind, mode, scope, metric, grid_multiple, dtype=dtype)


def _per_dtype(kind, mode, scope, metric, **kw):
    """{key: form}: one form per storage dtype where the metric has an element size (bytes), else one;
    the bf16 form is keyed `scope:metric`, the others `scope:metric:dtype`."""
    first = build(kind, mode, scope, metric, dtype="bf16", **kw)
    out = {f"{scope}:{metric}": first}
    for d in STORAGE:
        f = build(kind, mode, scope, metric, dtype=d, **kw)
        if d != "bf16" and f.expr != first.expr:
            out[f"{scope}:{metric}:{d}"] = f
    return out


def _points():
    pts = list(itertools.product(GRIDS, TEXT, OUTPUT))
    return {"w_crop": np.array([g[0] for g, *_ in pts]), "h_crop": np.array([g[1] for g, *_ in pts]),
            "text_tokens": np.array([p[1] for p in pts]), "output_tokens": np.array([p[2] for p in pts])}


def _where(pts, mask):
    return {k: v[mask] for k, v in pts.items()}


def test_acceptance_gundam_vision_latex_is_a_polynomial_with_assumptions(cli):
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "flops", "--scope", "vision", "--latex",
                       "--text-width", "0")   # one line (the default breaks a form wider than the page)
    comments = [l for l in out.splitlines() if l.startswith("%")]
    formula, = [l for l in out.splitlines() if not l.startswith("%")]
    assert code == 0
    assert formula.startswith(r"\mathrm{flops}^{\mathrm{gundam}}_{\mathrm{vision}} = 1\,139\,967\,033\,344 + "
                              r"388\,149\,837\,824\, w_{\mathrm{crop}} h_{\mathrm{crop}}")
    assert r"\text{for } w_{\mathrm{crop}} h_{\mathrm{crop}} \geq 2" in formula
    assert not any(k in formula for k in (r"\lceil", r"\lfloor", "cases", "> 1]"))   # no no-crop indicator
    assert any(c.startswith("% assumption: w_crop*h_crop >= 2") for c in comments)
    assert "% otherwise, no-crop layout 1x1 (page within 640x640): 1139967033344" in comments
    code, out, _ = cli("formula", "--mode", "gundam", "--scope", "vision", "--json")
    data = json.loads(out)
    assert data["form"] == "simplified" and data["polynomial"] and set(data["symbols"]) == {"w_crop", "h_crop"}
    assert [a["name"] for a in data["assumptions"]] == ["tiled"]


def test_gundam_vision_coefficients_are_the_global_view_and_one_crop():
    gundam = MODES["gundam"]
    terms = build("coefficients", "gundam", "vision", "flops").terms()
    assert [(t.name, t.monomial) for t in terms] == [("constant", 1), ("per crop", S.w_crop * S.h_crop)]
    one = model.layout_totals(gundam, layout_for_grid(1, 2, gundam), ["vision.global", "vision.crops"], ["flops"])
    assert terms[0].coefficient == one["vision.global"]["flops"] == 1139967033344
    assert terms[1].coefficient * 2 == one["vision.crops"]["flops"]


@pytest.mark.parametrize("mode", list(MODES))
def test_simplified_equals_general_on_every_grid_and_length(mode):
    """Per storage dtype (the forms substitute it): bf16 and fp32 byte forms each checked."""
    m = MODES[mode]
    pts = _points()
    general, simplified, excluded, needs_columns, dtype_of = {}, {}, {}, set(), {}
    for scope in model.scopes_for(m):
        for metric in METRICS:
            gs = _per_dtype("general", mode, scope, metric)
            ss = _per_dtype("simplified", mode, scope, metric)
            cs = _per_dtype("coefficients", mode, scope, metric)
            assert gs.keys() == ss.keys() == cs.keys()
            for k, s in ss.items():
                assert s.is_polynomial and cs[k].expr == s.expr
                assert not s.expr.has(sp.Piecewise, sp.floor, sp.ceiling, S.dtype_bytes)
                general[k], simplified[k] = gs[k].expr, s.expr
                dtype_of[k] = k.split(":")[2] if k.count(":") == 2 else "bf16"
                if "columns" in [a.name for a in s.assumptions]:
                    needs_columns.add(k)
                # each excluded case is printed with its own value: the general form there
                for case, value in s.otherwise:
                    excluded.setdefault(k, {})[case] = value
    # the byte metrics have one form per dtype, the others one
    assert {k for k in general if k.endswith(":fp32")} == \
        {f"{s}:{mt}:fp32" for s in model.scopes_for(m) for mt in METRICS if mt.startswith(("bytes", "activation"))}
    ev_g = Compiled(general)(**pts)
    ev_s = Compiled(simplified)(**pts)
    several_columns = pts["w_crop"] >= 2
    for k in general:
        holds = several_columns if k in needs_columns else np.ones_like(several_columns)
        assert np.array_equal(ev_g[k][holds], ev_s[k][holds]), k
        assert np.any(ev_g[k] != 0) or "crops" in k and not m.crop_mode, k
    if m.crop_mode:
        # the scopes that see the crop indicator get a no-crop value (vision.global does not)
        no_crop = {k: v["no-crop layout 1x1 (page within 640x640)"] for k, v in excluded.items()
                   if "no-crop layout 1x1 (page within 640x640)" in v}
        assert set(no_crop) == {k for k, e in general.items() if e.has(crops_run())} >= \
            {"vision:flops", "e2e:flops", "vision:bytes_read:fp32"}
        one = dict(pts, w_crop=np.ones_like(pts["w_crop"]), h_crop=np.ones_like(pts["h_crop"]))
        at_one_g, at_one_nc = Compiled(general)(**one), Compiled(no_crop)(**one)
        at_one_s = Compiled(simplified)(**one)
        for k in no_crop:
            assert np.array_equal(at_one_g[k], at_one_nc[k]), k
        # and the simplified form alone would be wrong there: the assumption matters
        assert not np.array_equal(at_one_g["vision:flops"], at_one_s["vision:flops"])
        # a single column of tiles (w_crop = 1, h_crop >= 2): its own printed value is the general form
        single = {k: v["single column w_crop = 1"] for k, v in excluded.items() if "single column w_crop = 1" in v}
        assert set(single) == needs_columns and needs_columns
        col = _where(pts, pts["w_crop"] == 1)
        at_col_g, at_col_c = Compiled(general)(**col), Compiled(single)(**col)
        for k in single:
            assert np.array_equal(at_col_g[k], at_col_c[k]), k
    # exact (sympy) spot checks beside the compiled ones; the general form equals the graph's own total
    # (dtype symbolic) with the dtype's element size put in by hand
    values = {S.w_crop: 2, S.h_crop: 3, S.text_tokens: 10, S.output_tokens: 1000}
    for k in general:
        scope, metric = k.split(":")[:2]
        graph_total = model.formula(m, scope, metric)
        by_hand = substitute(graph_total, {**values, S.dtype_bytes: STORAGE[dtype_of[k]]})
        assert substitute(general[k], values) == substitute(simplified[k], values) == by_hand, k


def _symbolic_points(multiple, ks=(1, 2), patches=(1, 2, 16), ratios=(1, 2, 4)):
    """Sizes that satisfy 'multiple of multiple*patch_size' for sampled patch sizes and ratios."""
    rows = []
    for p, r, kb, kc, (w, h), t, n in itertools.product(patches, ratios, ks, ks,
                                                       [(1, 2), (2, 3), (3, 3), (9, 1)], (0, 9), (1, 50)):
        step = int(sp.sympify(multiple).subs({S.patch_size: p, S.downsample_ratio: r})) * p
        rows.append((step * kb, step * kc, p, r, w, h, t, n))
    names = ["base_size", "image_size", "patch_size", "downsample_ratio", "w_crop", "h_crop", "text_tokens",
             "output_tokens"]
    return {nm: np.array(col) for nm, col in zip(names, zip(*rows))}


@pytest.mark.parametrize("scope", model.scopes_for(None))
def test_symbolic_simplified_equals_general_where_sizes_are_aligned(scope):
    for metric in METRICS:
        for key, g in _per_dtype("general", None, scope, metric).items():
            dtype = key.split(":")[2] if key.count(":") == 2 else "bf16"
            s = build("simplified", None, scope, metric, dtype=dtype)
            assert s.is_polynomial and not s.expr.has(sp.floor, sp.ceiling, sp.Piecewise, S.dtype_bytes)
            multiple = ALIGNED.multiple(g.expr)
            tiled = ["tiled"] if g.expr.has(crops_run()) else []
            columns = ["columns"] if g.expr.has(model.stitch_copies()) else []
            experts = ["experts"] if g.expr.has(sp.Min) else []
            assert [a.name for a in s.assumptions] == tiled + columns + experts + [f"aligned-{multiple}"]
            pts = _symbolic_points(multiple)
            if columns:
                pts = _where(pts, pts["w_crop"] >= 2)
            if experts:  # where every expert runs: k * prompt >= experts
                prompt = Compiled({"L": prompt_length()})(**{k: v for k, v in pts.items()
                                                              if k != "output_tokens"})["L"]
                pts = _where(pts, LM.experts_per_token * prompt >= LM.routed_experts)
            ev = Compiled({"g": g.expr, "s": s.expr})(**{k: v for k, v in pts.items()})
            assert np.array_equal(ev["g"], ev["s"]) and np.any(ev["g"] > 0), key  # decode: 0 for one output token
            exact = {S.BY_NAME[k]: int(v[5]) for k, v in pts.items()}
            assert substitute(g.expr, exact) == substitute(s.expr, exact), key


def test_grid_multiple_is_derived_from_the_floors_and_ceilings():
    assert ALIGNED.multiple(model.formula(None, "vision", "flops")) == 28       # lcm(window 14, 2, 4)
    assert ALIGNED.multiple(model.formula(None, "decoder.prefill", "flops")) == S.downsample_ratio
    assert ALIGNED.multiple(model.formula(None, "e2e", "flops")) == 28 * S.downsample_ratio
    assert ALIGNED.multiple(model.formula(MODES["gundam"], "vision", "flops")) is None


def test_assumption_violated_gives_a_different_value():
    """At the released gundam sizes (1024, 640: not multiples of 28*16) the fully simplified vision form is wrong,
    and the form that assumes multiples of 64 only (window ceilings kept) is right."""
    g = build("general", None, "vision", "flops").expr
    full = build("simplified", None, "vision", "flops").expr
    kept = build("simplified", None, "vision", "flops", 4)
    assert kept.expr.has(sp.ceiling) and "holds for gundam, gundam-m" in kept.assumptions[1].words
    values = {S.base_size: 1024, S.image_size: 640, S.patch_size: 16, S.w_crop: 2, S.h_crop: 3}
    assert substitute(kept.expr, values) == substitute(g, values) == 1139967033344 + 6 * 388149837824
    assert substitute(full, values) != substitute(g, values)


def test_term_names():
    w, h, t, n = S.w_crop, S.h_crop, S.text_tokens, S.output_tokens
    name = lambda powers: forms.term_name(powers, MODEL.term_symbols, tuple(MODEL.term_groups.items()))
    assert name({}) == "constant"
    assert name({w: 1, h: 1}) == "per crop"
    assert name({h: 1}) == "per crop row"
    assert name({w: 1}) == "per crop column"
    assert name({w: 2, h: 2}) == "per crop^2"
    assert name({w: 1, h: 2, t: 1}) == "per crop x crop row x text token"
    assert name({n: 2}) == "per output token^2"


@pytest.mark.parametrize("kind, mode, scope", [
    ("general", None, "vision"), ("simplified", None, "vision"), ("simplified", "gundam", "e2e"),
    ("general", "gundam", "e2e"), ("simplified", None, "decoder.decode"), ("simplified", "tiny", "vision"),
])
def test_latex_parses(kind, mode, scope):
    """matplotlib's mathtext parser (a LaTeX subset) accepts the formula: no unbalanced braces, known commands."""
    tex = build(kind, mode, scope, "flops").latex(0)   # one line: mathtext has no aligned (test_latex.py compiles those)
    fig = plt.figure()
    fig.text(0, 0, f"${tex}$")
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
    if kind == "general" and mode is None:
        assert r"\left\lceil" in tex and r"\left\lfloor" in tex and r"[w_{\mathrm{crop}} h_{\mathrm{crop}} > 1]" in tex
        assert r"\mathbb" not in tex   # amsmath only: an Iverson bracket for the no-crop indicator


def test_coefficients_latex_names_each_term(cli):
    code, out, _ = cli("formula", "--mode", "gundam", "--scope", "e2e", "--form", "coefficients", "--latex")
    body = "".join(l + "\n" for l in out.splitlines() if not l.startswith("%"))
    assert code == 0 and body.startswith(r"\begin{aligned}")
    assert r"&& \text{per crop}" in out and r"\text{per crop$^{2}$}" in out and r"\end{aligned}" in out


@pytest.mark.parametrize("argv", [
    ["formula", "--form", "coefficients"],                       # numbers need a mode
    ["formula", "--mode", "gundam", "--grid-multiple", "4"],     # a mode's sizes are numbers already
    ["formula", "--grid-multiple", "0"],
    ["formula", "--form", "closed"],
])
def test_bad_form_arguments_exit_2(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
