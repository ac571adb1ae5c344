"""A model by stage, beyond per-scope totals: parameters, peak activations, KV cache, roofline
latency and whether a run fits a device; and every metric a closed form can be asked for.

Generic over `costgraph.model.Model`. A stage is a scope that runs as one step (a batch of views,
the prefill, the decode forwards). The numbers come from the one
graph of the model; this module only evaluates it:
- parameters: `costgraph.params` (resident = the checkpoint, executed per scope, active per token);
- peak activations: `costgraph.liveness` per stage; a stage summed over an index (the decode
  forwards, t = 1..output_tokens-1) is taken at its last index, its largest context; a composite
  scope's peak is the max of its stages' (they run one after another);
- KV cache: the model's `kv_cache_bytes`;
- roofline: `costgraph.roofline` per node, summed per stage (a summed stage at every index).
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from . import autodiff
from . import liveness as LV
from . import params as P
from . import roofline as RL
from . import symbols as S
from .cost import METRICS
from .evaluate import substitute
from .hardware import Hardware
from .maxima import over_max
from .render import human, table

# `formula --metric` beyond the Cost fields
DERIVED = ("bytes", "params", "weight_bytes", "active_params", "peak_activation_bytes", "kv_cache_bytes",
           "peak_memory_bytes")


def graph(model, mode, variants=None):
    return model.graph(mode, model.variants() if variants is None else variants)


def scope_stages(model, mode, scope: str, variants=None) -> tuple[str, ...]:
    """The stages a scope is made of (a composite: all of its parts', or itself when it is a stage; a
    stage: itself)."""
    parts = model.composites.get(scope, (scope,))
    return tuple(s for s in model.stages(mode, variants)
                 if s == scope or any(s == p or s.startswith(p + ".") for p in parts))


def _names(values: dict) -> dict:
    return {(k.name if hasattr(k, "name") else k): v for k, v in values.items()}


def _summed(g, stage: str):
    """(index, lo, hi) of the innermost summed scope around a stage, or None."""
    for s in reversed(g.chain(stage)):
        if s.sum_over is not None:
            return s.sum_over
    return None


def totals(model, mode, point, scopes, metrics, variants, dtype: str) -> dict[str, dict[str, int]]:
    """Exact integers of every scope x metric at one input (exact substitution; a sweep compiles instead)."""
    values = {**point.values, **model.dtype_values(dtype)}
    return {s: {m: substitute(model.formula(mode, s, m, variants), values) for m in metrics} for s in scopes}


# ---- parameters -------------------------------------------------------------------------------

def roots(g) -> list[str]:
    """The top-level scopes of a graph (e.g. vision, decoder)."""
    return [s for s in g.scopes if "." not in s]


def param_totals(model, mode, scope: str, variants=None) -> P.ParamTotals:
    """Executed weights of a scope (a composite: its parts' together)."""
    g = graph(model, mode, variants)
    parts = model.composites.get(scope, (scope,))
    if len(parts) == 1:
        return P.executed(g, scope)
    ts = [P.executed(g, p) for p in parts]
    return P.ParamTotals(*(sp.Add(*[getattr(t, f) for t in ts]) for f in ("params", "weight_bytes", "active",
                                                                           "active_bytes")),
                         sum(t.modules for t in ts))


def count(model, mode, expr, values: dict | None = None) -> int:
    """A parameter count or weight bytes as an integer (the mode's sizes and, for bytes, the dtype given)."""
    return substitute(expr, {**model.mode_values(mode), **(values or {})})


def param_summary(model, mode, dtype_values: dict, variants=None) -> dict:
    """Resident (the checkpoint), executed and active parameters, and their bytes at a dtype."""
    g = graph(model, mode, variants)
    num = lambda e: count(model, mode, e, dtype_values)
    cnt = lambda e: count(model, mode, e)
    res = P.resident(g)
    tops = {r: P.resident(g, r) for r in roots(g)}
    out = {
        "resident": cnt(res.params), "resident_weight_bytes": num(res.weight_bytes),
        "resident_by_part": {r: cnt(t.params) for r, t in tops.items()},
        "executed": {r: cnt(P.executed(g, r).params) for r in tops},
        "unexecuted": {k: cnt(v) for k, v in P.unexecuted(g).items()},
    }
    for group, parts in model.param_parts().items():
        out[group] = {name: cnt(sum((w.count for n, w in P.per_node(g, scope).items()
                                     if g.g.nodes[n]["path"].startswith(prefix)), sp.Integer(0)))
                      for name, (scope, prefix) in parts.items()}
    lm = model.lm_scope
    if lm in g.scopes:
        dec = P.executed(g, lm)
        first = next((s for s in model.stages(mode, variants) if s.startswith(lm + ".")), lm)
        emb = [w for n, w in P.per_node(g, first).items() if g.g.nodes[n]["kind"] == "embedding"]
        out["active_per_token"] = cnt(dec.active)
        out["active_per_token_weight_bytes"] = num(dec.active_bytes)
        # a published "active parameters" figure leaves the embedding out (a lookup, not a matmul)
        out["active_per_token_without_embedding_row"] = cnt(dec.active) - sum(cnt(w.active) for w in emb)
        out["embedding_table"] = sum(cnt(w.count) for w in emb)
    out["published"] = dict(model.published)
    return out


# ---- peak activations -------------------------------------------------------------------------

_PEAKS: dict = {}


def stage_peak(model, mode, stage: str, variants=None) -> LV.Peak:
    """The liveness pass of a stage, once per graph (modes that share a graph share it)."""
    g = graph(model, mode, variants)
    key = (id(g), stage)
    if key not in _PEAKS:
        _PEAKS[key] = (g, LV.liveness(g, _stage_target(model, g, stage),
                                      samples=model.peak_samples(mode, variants)))
    return _PEAKS[key][1]


def _stage_target(model, g, stage: str):
    """A stage's liveness target: its scope, or (a composite stage: a training step) all of its parts."""
    return stage if stage in g.scopes else tuple(model.composites[stage])


def peak_formula(model, mode, scope: str, variants=None) -> sp.Expr:
    """Peak activation bytes of a scope: Max over its stages' peaks (a summed stage at its last index)."""
    g = graph(model, mode, variants)
    exprs = []
    for st in scope_stages(model, mode, scope, variants):
        e = stage_peak(model, mode, st, variants).expr
        summed = _summed(g, st)
        if summed is not None:
            e = over_max(e, lambda x: x.xreplace({summed[0]: summed[2]}))
        exprs.append(e)
    if not exprs:
        return sp.Integer(0)
    return exprs[0] if len(exprs) == 1 else sp.Max(*exprs, evaluate=False)


def peaks(model, mode, values: dict, variants=None, only=None) -> dict[str, dict]:
    """Peak activation bytes of every stage (or those in `only`) and the node running at the peak, at one point."""
    g = graph(model, mode, variants)
    out = {}
    for st in model.stages(mode, variants):
        if only is not None and st not in only:
            continue
        v = _names(values)
        summed = _summed(g, st)
        if summed is not None:
            idx, lo, hi = summed
            last = substitute(hi, values)
            if last < substitute(lo, values):
                out[st] = {"bytes": 0, "node": None, "note": f"no {st} step ({hi} = {last})"}
                continue
            v[idx.name] = last
        target = _stage_target(model, g, st)
        out[st] = {**LV.peak_at(g, target, v), "factor": str(LV.plan(g, target).factor)}
        if summed is not None:
            out[st][summed[0].name] = v[summed[0].name]
    return out


def scope_peak(model, mode, scope: str, stage_peaks: dict, variants=None) -> int:
    return max((stage_peaks[s]["bytes"] for s in scope_stages(model, mode, scope, variants) if s in stage_peaks),
               default=0)


# ---- roofline ---------------------------------------------------------------------------------

def roofline(model, mode, fixed: dict, values: dict, hws: list[Hardware], variants=None,
             top: int = 0) -> dict[str, dict]:
    """Seconds per roofline stage for each hardware; a summed stage (decode) at every index: its
    total, the mean per step, the first and last step."""
    g = graph(model, mode, variants)
    vals = _names(values)
    raws = {}
    for st in model.roofline_stages(mode, variants):
        if st not in g.scopes:
            continue
        sm = RL.stage_model(g, st, fixed)
        v = dict(vals)
        summed = _summed(g, st)
        steps = None
        if summed is not None:
            idx, lo, hi = summed
            steps = np.arange(substitute(lo, {**fixed, **values}), substitute(hi, {**fixed, **values}) + 1,
                              dtype=np.int64)
            v[idx.name] = steps if len(steps) else np.array([1])
        raws[st] = (sm, sm.raw(v), steps)
    out = {}
    for hw in hws:
        rec = {}
        for st, (sm, raw, steps) in raws.items():
            times = RL.node_times(raw, hw, sm.nodes)
            if steps is not None:
                per_step = times.time.sum(axis=0) if len(steps) else np.zeros(0)
                last = RL.NodeTimes(sm.nodes, times.compute[:, -1], times.memory[:, -1],
                                    {k: a[:, -1] for k, a in raw.items()})
                rec[st] = {"seconds": float(per_step.sum()), "steps": int(len(steps)),
                           "last_step": RL.stage_report(last, top),
                           "per_token_mean_seconds": float(per_step.mean()) if len(steps) else 0.0,
                           "last_step_seconds": float(per_step[-1]) if len(steps) else 0.0,
                           "first_step_seconds": float(per_step[0]) if len(steps) else 0.0}
            else:
                rec[st] = RL.stage_report(times, top)
        rec["total_seconds"] = sum(r["seconds"] for r in rec.values())
        out[hw.name] = rec
    return out


def memory_fit(hw: Hardware, weight_bytes: int, kv_bytes: int, peak_bytes: int) -> dict:
    need = weight_bytes + kv_bytes + peak_bytes
    return {"weights_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "peak_activation_bytes": peak_bytes,
            "total_bytes": need, "memory_bytes": int(hw.memory), "fits": need <= hw.memory,
            "headroom_bytes": int(hw.memory) - need}


# ---- KV cache ---------------------------------------------------------------------------------

def kv_summary(model, sequence: dict, dtype_values: dict) -> dict:
    kv = lambda context: substitute(model.kv_cache_bytes(context), dtype_values)
    prompt, final = sequence["prompt_tokens"], sequence["final_context"]
    return {"per_token_bytes": kv(1), "prompt_tokens": prompt, "after_prefill_bytes": kv(prompt),
            "final_context": final, "final_bytes": kv(final)}


# ---- what `cost --metrics ... --hardware ...` adds to the totals ------------------------------

def extra_metrics(model, mode, point, scopes, groups, totals: dict, *, variants, dtype: str, hardware: list,
                  top: int = 0) -> dict:
    """Sections beyond the per-scope sums of node costs (`totals`): `derived` (per scope: bytes =
    read + written, params, weight bytes, resident params, active params per token, peak
    activation bytes, KV cache bytes) and the sections params, activations, kv_cache, roofline."""
    derived = {s: {} for s in scopes}
    if "bytes" in groups:
        for s in scopes:
            derived[s]["bytes"] = totals[s]["bytes_read"] + totals[s]["bytes_written"]
    dv = model.dtype_values(dtype)
    values = {**model.mode_values(mode), **point.values, **dv}
    sequence = point.record.get("sequence")
    g = graph(model, mode, variants)
    out = {}
    need_peaks = "activations" in groups or hardware
    wanted = None if hardware else {st for sc in scopes for st in scope_stages(model, mode, sc, variants)}
    stage_peaks = peaks(model, mode, values, variants, wanted) if need_peaks else {}
    kv = kv_summary(model, sequence, dv) if ("kv_cache" in groups or hardware) and model.generates else None
    summary = param_summary(model, mode, dv, variants) if ("params" in groups or hardware) else None
    lm = model.lm_scope
    if "params" in groups:
        for s in scopes:
            t = param_totals(model, mode, s, variants)
            tops = [r for r in roots(g) if s == r or s.startswith(r + ".") or s in model.composites]
            derived[s]["params"] = count(model, mode, t.params)
            derived[s]["weight_bytes"] = count(model, mode, t.weight_bytes, dv)
            derived[s]["resident_params"] = count(model, mode, sum((P.resident(g, r).params for r in tops),
                                                                   sp.Integer(0)))
            if lm and s.startswith(lm):
                derived[s]["active_params_per_token"] = count(model, mode, t.active)
        out["params"] = summary
    if "activations" in groups:
        for s in scopes:
            if scope_stages(model, mode, s, variants):  # a scope inside a stage has no liveness pass of its own
                derived[s]["peak_activation_bytes"] = scope_peak(model, mode, s, stage_peaks, variants)
        out["activations"] = {"peak": stage_peaks, "note": "peak live bytes of op outputs per stage (inputs, "
                              "weights and the KV cache excluded); a summed stage (decode) at its last step "
                              "(t = output_tokens-1); a scope's peak is the max of its stages'"}
    if "kv_cache" in groups and kv is not None:
        for s in scopes:
            if lm and s == model.prefill_scope:
                derived[s]["kv_cache_bytes"] = kv["after_prefill_bytes"]
            elif lm and (s.startswith(lm) or s in model.composites):
                derived[s]["kv_cache_bytes"] = kv["final_bytes"]
        out["kv_cache"] = kv
    training = autodiff.trained_nodes(g) or "recompute" in g.scopes
    if training and ("activations" in groups or "params" in groups or hardware):
        out["training_memory"] = training_memory(model, mode, values, variants, stage_peaks)
    if scopes and any(derived.values()):
        out = {"derived": derived, **out}
    if hardware:
        fixed = {**model.mode_values(mode), **dv}
        times = roofline(model, mode, fixed, point.values, hardware, variants, top)
        peak = max((p["bytes"] for p in stage_peaks.values()), default=0)
        out["roofline"] = {hw.name: {"hardware": hw.as_dict(), "stages": times[hw.name],
                                     "fit": (training_fit(hw, out["training_memory"]) if training else
                                             memory_fit(hw, summary["resident_weight_bytes"],
                                                        kv["final_bytes"] if kv else 0, peak))}
                           for hw in hardware}
    return out


def training_memory(model, mode, values: dict, variants, stage_peaks: dict | None = None) -> dict:
    """A training step's memory: weights, gradients, optimizer state, fp32 master copies
    (`autodiff.static_memory`) and the activation peak of the step's liveness pass (saved tensors live
    until their gradient op), with the node running at the peak; the peak total is their sum."""
    g = graph(model, mode, variants)
    static = {k: substitute(e, values) for k, e in autodiff.static_memory(g).items()}
    stage_peaks = stage_peaks if stage_peaks else peaks(model, mode, values, variants)
    act = max(stage_peaks.values(), key=lambda p: p["bytes"], default={"bytes": 0, "node": None})
    trained = autodiff.trained_weights(g, autodiff.trained_nodes(g))
    return {"trainable_params": count(model, mode, trained.params),
            **{f"{k}_bytes": v for k, v in static.items()},
            "peak_activation_bytes": act["bytes"], "peak_at": act["node"],
            "peak_total_bytes": sum(static.values()) + act["bytes"],
            "note": "gradients counted whole (all alive at the optimizer step); activations: the step's liveness "
                    "peak (saved tensors live until their gradient op)"}


def training_fit(hw: Hardware, mem: dict) -> dict:
    need = mem["peak_total_bytes"]
    return {**{k: v for k, v in mem.items() if k.endswith("_bytes")}, "total_bytes": need,
            "memory_bytes": int(hw.memory), "fits": need <= hw.memory, "headroom_bytes": int(hw.memory) - need}


def text_sections(model, out: dict) -> list[str]:
    """The extra sections of `cost` for people."""
    lines = []
    p = out.get("params")
    if p:
        lines.append("")
        lines.append(f"parameters: resident (checkpoint) {p['resident']:,} ({human(p['resident'])}), "
                     f"{p['resident_weight_bytes']:,} bytes; by part "
                     + ", ".join(f"{k} {v:,}" for k, v in p["resident_by_part"].items()))
        lines.append("  executed: " + ", ".join(f"{k} {v:,}" for k, v in p["executed"].items())
                     + "; loaded, never run: " + (", ".join(f"{k} {v:,}" for k, v in p["unexecuted"].items())
                                                  or "none"))
        lines += model.param_lines(p)
    a = out.get("activations")
    if a:
        lines.append("")
        rows = [[s, f"{v['bytes']:,}", human(v["bytes"]), str(v.get("node") or "-")] for s, v in a["peak"].items()]
        lines.append(table(rows, ["stage", "peak activation bytes", "approx", "at node"]))
    t = out.get("training_memory")
    if t:
        lines.append("")
        parts = [("weights", "weights_bytes"), ("gradients", "gradients_bytes"),
                 ("optimizer state", "optimizer_state_bytes"), ("fp32 master copies", "master_weights_bytes"),
                 ("activations at the peak", "peak_activation_bytes")]
        rows = [[name, f"{t[k]:,}", human(t[k])] for name, k in parts]
        rows.append(["peak total", f"{t['peak_total_bytes']:,}", human(t["peak_total_bytes"])])
        lines.append(f"training memory: {t['trainable_params']:,} trainable parameters; activation peak at "
                     f"{t['peak_at']}")
        lines.append(table(rows, ["part", "bytes", "approx"]))
    kv = out.get("kv_cache") if not t else None
    if kv:
        lines.append("")
        lines.append(f"KV cache: {kv['per_token_bytes']:,} bytes per token; {kv['after_prefill_bytes']:,} after the "
                     f"prefill ({kv['prompt_tokens']} tokens); {kv['final_bytes']:,} at the final context "
                     f"({kv['final_context']} tokens)")
    r = out.get("roofline")
    if r:
        lines.append("")
        lines.extend(roofline_table(r).splitlines())
    return lines


def roofline_rows(r: dict) -> list[list[str]]:
    """One row per hardware: each roofline stage's seconds (a summed stage: per step and in all), total, fit."""
    rows = []
    for name, rec in r.items():
        st, fit = rec["stages"], rec["fit"]
        ms = lambda x: f"{1e3 * x:,.2f}"
        cells = [name]
        for s, v in st.items():
            if s == "total_seconds":
                continue
            if "per_token_mean_seconds" in v:
                cells += [ms(v["per_token_mean_seconds"]), ms(v["seconds"])]
            else:
                cells.append(ms(v["seconds"]))
        cells += [f"{st['total_seconds']:,.3f}", f"{fit['total_bytes'] / 2**30:,.2f}",
                  f"{fit['memory_bytes'] / 2**30:,.0f}", "yes" if fit["fits"] else "NO"]
        rows.append(cells)
    return rows


def roofline_header(r: dict) -> list[str]:
    first = next(iter(r.values()))["stages"]
    cols = ["hardware"]
    for s, v in first.items():
        if s == "total_seconds":
            continue
        short = s.rpartition(".")[2]
        cols += [f"{short} ms/token", f"{short} ms"] if "per_token_mean_seconds" in v else [f"{short} ms"]
    return cols + ["total s", "needs GiB", "has GiB", "fits"]


def roofline_table(r: dict) -> str:
    return table(roofline_rows(r), roofline_header(r))


def roofline_markdown(r: dict) -> str:
    header = roofline_header(r)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in roofline_rows(r)]
    return "\n".join(lines)


# ---- every metric `formula` can show ---------------------------------------------------------

def metric_expr(model, mode, scope: str, metric: str, variants) -> sp.Expr:
    """The exact total of a metric over a scope: a Cost field, or a derived metric (DERIVED)."""
    if metric in METRICS:
        return model.formula(mode, scope, metric, variants)
    # xreplace: a structural replacement of symbols by numbers (floors of numbers evaluate), much
    # cheaper than subs on the many candidates of a peak
    sub = (lambda e: over_max(e, lambda x: x.xreplace(model.mode_values(mode)))) if mode is not None else (lambda e: e)
    if metric == "bytes":
        return sp.expand(model.formula(mode, scope, "bytes_read", variants)
                         + model.formula(mode, scope, "bytes_written", variants))
    if metric in ("params", "weight_bytes", "active_params"):
        t = param_totals(model, mode, scope, variants)
        return sub({"params": t.params, "weight_bytes": t.weight_bytes, "active_params": t.active}[metric])
    if metric == "peak_activation_bytes":
        return sub(peak_formula(model, mode, scope, variants))
    if metric == "peak_memory_bytes":
        g = graph(model, mode, variants)
        if not autodiff.trained_nodes(g):
            raise ValueError("peak_memory_bytes is a training metric (--phase train): weights, gradients, optimizer "
                             "state, master copies and the step's activation peak")
        if not scope_stages(model, mode, scope, variants):
            stages_ = ", ".join(model.stages(mode, variants))
            raise ValueError(f"peak_memory_bytes is a whole step's memory: choose the scope of a step ({stages_}), "
                             f"not {scope!r}")
        static = sp.expand(sp.Add(*autodiff.static_memory(g).values()))
        # the static part added to each candidate: a peak of several candidates stays a Max of polynomials
        return sub(over_max(peak_formula(model, mode, scope, variants), lambda e: static + e))
    if metric == "kv_cache_bytes":
        lm = model.lm_scope
        if not model.generates or not (scope.startswith(lm) or scope in model.composites):
            raise ValueError(f"kv_cache_bytes is a language-model metric: choose a {lm or 'language-model'} scope "
                             f"or a composite, not {scope!r}")
        prompt = model.prompt_length(mode)
        context = prompt if scope == model.prefill_scope else prompt + S.output_tokens - 1
        return sub(model.kv_cache_bytes(context))
    raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS + DERIVED)})")
