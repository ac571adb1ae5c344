"""Benchmark: cold graph build + symbolic totals, compiled evaluation of many layouts, and
one FlopCounterMode pass of the meta reference for one layout, with the per-layout ratio.

Run: `costgraph bench` (prints its figures; tests never assert timings).
"""
from __future__ import annotations

import time

import numpy as np


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(layouts: int = 1_000_000) -> dict:
    from graphs import deepseek_ocr as model
    from graphs.config import MODES
    from .evaluate import Compiled

    model.vision_graph.cache_clear()
    model.formula.cache_clear()
    graph, t_build = _timed(lambda: model.vision_graph(True))
    _, t_totals = _timed(lambda: {s: graph.total(s).flops for s in model.SCOPES})
    mode = MODES["gundam"]
    exprs = {s: model.formula(mode, s, "flops") for s in model.SCOPES}
    compiled, t_compile = _timed(lambda: Compiled(exprs))
    rng = np.random.default_rng(0)
    w = rng.integers(1, 10, layouts)
    h = rng.integers(1, 10, layouts)
    result, t_eval = _timed(lambda: compiled(w_crop=w, h_crop=h))

    from verify.profile import count_vision_meta

    layout = model.layout_for(1654, 2339, mode)
    measured, t_ref = _timed(lambda: count_vision_meta(mode, layout).total())
    predicted = model.layout_totals(mode, layout, ["vision"], ["flops"])["vision"]["flops"]

    per_compiled = t_eval / layouts
    figures = {
        "graph_nodes": graph.g.number_of_nodes(),
        "build_graph_s": t_build,
        "symbolic_totals_s": t_totals,
        "compile_s": t_compile,
        "layouts": layouts,
        "compiled_eval_s": t_eval,
        "reference_meta_one_layout_s": t_ref,
        "speedup_per_layout": t_ref / per_compiled,
        "reference_matches": measured == predicted,
    }
    print(f"graph build (cold, {figures['graph_nodes']} nodes): {t_build:.3f} s")
    print(f"symbolic totals ({len(model.SCOPES)} scopes):        {t_totals:.3f} s")
    print(f"compile (lambdify, gundam):              {t_compile:.3f} s")
    print(f"compiled evaluation of {layouts:,} layouts: {t_eval:.3f} s ({per_compiled * 1e9:.1f} ns/layout)")
    print(f"meta reference, one layout (2x3 + global): {t_ref:.3f} s, matches: {figures['reference_matches']}")
    print(f"compiled path is {figures['speedup_per_layout']:,.0f}x faster per layout")
    assert result["vision"].shape == (layouts,)
    figures.update(sweep_figures())
    figures.update(verify_figures())
    return figures


def verify_figures() -> dict:
    """`costgraph verify --all-grids --device meta`: every mode and grid, node by node."""
    from graphs.config import MODES
    from verify.runner import Request, verify_vision

    comps, t = _timed(lambda: verify_vision(Request(modes=list(MODES.values()), all_grids=True)))
    nodes = sum(c.nodes_compared for c in comps)
    ok = all(c.ok for c in comps)
    print(f"verify all grids on meta ({len(comps)} cases, {nodes:,} nodes compared): {t:.3f} s, all exact: {ok}")
    return {"verify_all_grids_s": t, "verify_cases": len(comps), "verify_nodes": nodes, "verify_ok": ok}


def sweep_figures(pages: int = 100_000) -> dict:
    """`costgraph sweep` on random page sizes: the layout rule and tokens and every scope x metric,
    compiled once (timed apart), checked against exact substitution at a few points."""
    from graphs import deepseek_ocr as model
    from graphs.config import MODES
    from graphs.layout import layout_for
    from . import sweep as SW

    rng = np.random.default_rng(0)
    w = rng.integers(100, 6000, pages)
    h = rng.integers(100, 6000, pages)
    SW.compiled.cache_clear()
    _, t_first = _timed(lambda: SW.sweep_pages("gundam", w[:1], h[:1]))
    s, t_sweep = _timed(lambda: SW.sweep_pages("gundam", w, h))
    _, t_csv = _timed(s.to_csv)
    _, t_json = _timed(s.to_json)
    mode = MODES["gundam"]
    checked = 0
    for k in rng.integers(0, pages, 20):
        exact = model.layout_totals(mode, layout_for(int(w[k]), int(h[k]), mode), s.scopes, s.metrics)
        checked += all(int(s.value(sc, m)[k]) == v for sc, ms in exact.items() for m, v in ms.items())
    print(f"sweep of {pages:,} page sizes (layout + tokens + {len(s.scopes)} scopes x {len(s.metrics)} metrics): "
          f"{t_sweep:.3f} s; first call (formulas + compile): {t_first:.3f} s; "
          f"CSV {t_csv:.3f} s, JSON {t_json:.3f} s; {checked}/20 points equal exact substitution")
    return {"sweep_pages": pages, "sweep_s": t_sweep, "sweep_first_call_s": t_first, "sweep_csv_s": t_csv,
            "sweep_json_s": t_json, "sweep_points_checked": checked}
