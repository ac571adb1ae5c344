"""Benchmark: cold graph build + symbolic totals, compiled evaluation of many layouts, and
one FlopCounterMode pass of the meta reference for one layout, with the per-layout ratio.

Run: `costgraph bench` (prints its figures; tests never assert timings).
"""
from __future__ import annotations

import time

import numpy as np

from costgraph import forms
from costgraph.evaluate import Compiled
from costgraph.cost import METRICS
from costgraph.stages import DERIVED, totals
from costgraph.graphs.deepseek_ocr import assembly, layout as L
from . import sweep as SW
from .models import get_model


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(layouts: int = 1_000_000) -> dict:
    model = get_model("deepseek-ocr")
    assembly.vision_graph.cache_clear()
    assembly.formula.cache_clear()
    graph, t_build = _timed(lambda: assembly.vision_graph(True))
    _, t_totals = _timed(lambda: {s: graph.total(s).flops for s in assembly.SCOPES})
    mode = model.get_mode("gundam")
    exprs = {s: assembly.formula(mode, s, "flops") for s in assembly.SCOPES}
    compiled, t_compile = _timed(lambda: Compiled(exprs))
    rng = np.random.default_rng(0)
    w = rng.integers(1, 10, layouts)
    h = rng.integers(1, 10, layouts)
    result, t_eval = _timed(lambda: compiled(w_crop=w, h_crop=h))

    from costgraph.verify.runner import count_vision_meta  # torch: loaded only when the benchmark runs

    layout = L.layout_for(1654, 2339, mode)
    measured, t_ref = _timed(lambda: count_vision_meta(mode, layout).total())
    point = model.point(mode, size=(1654, 2339))
    predicted = totals(model, mode, point, ["vision"], ["flops"], model.variants(), "bf16")["vision"]["flops"]

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
    print(f"symbolic totals ({len(assembly.SCOPES)} scopes):        {t_totals:.3f} s")
    print(f"compile (lambdify, gundam):              {t_compile:.3f} s")
    print(f"compiled evaluation of {layouts:,} layouts: {t_eval:.3f} s ({per_compiled * 1e9:.1f} ns/layout)")
    print(f"meta reference, one layout (2x3 + global): {t_ref:.3f} s, matches: {figures['reference_matches']}")
    print(f"compiled path is {figures['speedup_per_layout']:,.0f}x faster per layout")
    assert result["vision"].shape == (layouts,)
    figures.update(sweep_figures())
    figures.update(formula_figures())
    figures.update(verify_figures())
    return figures


def _clear_caches() -> None:
    """Everything a formula computes and keeps: the graphs, their totals, liveness passes, op results."""
    from costgraph import liveness, ops, stages

    assembly.vision_graph.cache_clear()
    assembly.model_graph.cache_clear()
    assembly.formula.cache_clear()
    forms._build.cache_clear()
    stages._PEAKS.clear()
    ops._APPLIED.clear()
    liveness._nonnegative_monomial.cache_clear()


def _forms(model):
    for mode_name in [None] + list(model.modes):
        mode = model.get_mode(mode_name) if mode_name else None
        for scope in model.scopes(mode):
            for metric in METRICS + DERIVED:
                if metric == "kv_cache_bytes" and not (scope.startswith("decoder") or scope in model.composites):
                    continue
                if metric == "peak_memory_bytes":   # a training step's metric: these are inference forms
                    continue
                for kind in forms.FORMS:
                    if kind == "coefficients" and mode is None:
                        continue
                    yield mode_name, scope, metric, kind


def _time_form(model, mode_name, scope, metric, kind) -> float:
    t = time.perf_counter()
    f = forms.build(model, kind, mode_name, scope, metric)
    f.latex()
    f.plain()
    return time.perf_counter() - t


def formula_figures(cold_scopes=("e2e",)) -> dict:
    """Every `formula` (metric x scope x mode x form): each one cold (every cache cleared before it) for
    the whole-run scopes, where the graphs, totals and liveness passes are all built; the others in one
    process (their graphs are the same). The slowest of each; the target is under 10 s cold."""
    model = get_model("deepseek-ocr")
    todo = list(_forms(model))
    cold, warm = [], []
    for case in todo:
        if case[1] in cold_scopes:
            _clear_caches()
            cold.append((_time_form(model, *case), " ".join(str(c) for c in case)))
    for case in todo:
        if case[1] not in cold_scopes:
            warm.append((_time_form(model, *case), " ".join(str(c) for c in case)))
    cold.sort(reverse=True)
    warm.sort(reverse=True)
    print(f"formula, {len(cold)} forms of {', '.join(cold_scopes)} each cold: slowest {cold[0][0]:.2f} s "
          f"({cold[0][1]}); {len(warm)} more in one process: slowest {warm[0][0]:.2f} s ({warm[0][1]})")
    return {"formula_cold_forms": len(cold), "formula_cold_slowest_s": cold[0][0], "formula_cold_slowest": cold[0][1],
            "formula_warm_forms": len(warm), "formula_warm_slowest_s": warm[0][0]}


def verify_figures() -> dict:
    """`costgraph verify --all-grids --device meta`: every mode and grid, node by node."""
    from costgraph.verify.runner import Request, verify_vision  # torch: loaded only when the benchmark runs

    model = get_model("deepseek-ocr")
    comps, t = _timed(lambda: verify_vision(Request(modes=list(model.modes.values()), all_grids=True)))
    nodes = sum(c.nodes_compared for c in comps)
    ok = all(c.ok for c in comps)
    print(f"verify all grids on meta ({len(comps)} cases, {nodes:,} nodes compared): {t:.3f} s, all exact: {ok}")
    return {"verify_all_grids_s": t, "verify_cases": len(comps), "verify_nodes": nodes, "verify_ok": ok}


def sweep_figures(pages: int = 100_000) -> dict:
    """`costgraph sweep` on random page sizes: the layout rule and tokens and every scope x metric,
    compiled once (timed apart), checked against exact substitution at a few points."""
    model = get_model("deepseek-ocr")
    rng = np.random.default_rng(0)
    w = rng.integers(100, 6000, pages)
    h = rng.integers(100, 6000, pages)
    SW.compiled.cache_clear()
    _, t_first = _timed(lambda: SW.sweep_pages("gundam", w[:1], h[:1]))
    s, t_sweep = _timed(lambda: SW.sweep_pages("gundam", w, h))
    _, t_csv = _timed(s.to_csv)
    _, t_json = _timed(s.to_json)
    mode = model.get_mode("gundam")
    checked = 0
    for k in rng.integers(0, pages, 20):
        point = model.point(mode, size=(int(w[k]), int(h[k])))
        exact = totals(model, mode, point, s.scopes, s.metrics, model.variants(), "bf16")
        checked += all(int(s.value(sc, m)[k]) == v for sc, ms in exact.items() for m, v in ms.items())
    print(f"sweep of {pages:,} page sizes (layout + tokens + {len(s.scopes)} scopes x {len(s.metrics)} metrics): "
          f"{t_sweep:.3f} s; first call (formulas + compile): {t_first:.3f} s; "
          f"CSV {t_csv:.3f} s, JSON {t_json:.3f} s; {checked}/20 points equal exact substitution")
    return {"sweep_pages": pages, "sweep_s": t_sweep, "sweep_first_call_s": t_first, "sweep_csv_s": t_csv,
            "sweep_json_s": t_json, "sweep_points_checked": checked}
