"""DeepSeek-OCR by stage, beyond per-scope totals: parameters, peak activations, KV cache,
roofline latency and whether a generation fits a device.

Stages of reading one page: the vision encoder (the crop batch, then the global view, then the
assembly of the image slots), one prefill over the prompt, and output_tokens-1 decode forwards
(step t attends over a context of L + t). The numbers come from the one graph the rest of the
tool uses (`graphs.deepseek_ocr.model_graph`); this module only evaluates it:
- parameters: `costgraph.params` (resident = the checkpoint, executed per scope, active per token);
- peak activations: `costgraph.liveness` per stage (vision.global, vision.crops, decoder.prefill,
  decoder.decode at its largest step t = output_tokens-1); a composite scope's peak is the max of
  its stages (they run one after another; what one stage hands the next is a few MB);
- KV cache: the language model's `kv_cache_bytes` (graphs.decoder);
- roofline: `costgraph.roofline` per node, summed per stage.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

from . import liveness as LV
from . import params as P
from . import roofline as RL
from . import symbols as S
from .evaluate import substitute
from .hardware import Hardware

STAGES = ("vision.global", "vision.crops", "decoder.prefill", "decoder.decode")
# Published sizes (SPEC section 5) to set beside ours.
PUBLISHED = {"vision": 380e6, "vision.sam": 80e6, "vision.clip": 300e6, "decoder": 3e9, "decoder.active": 570e6}


def _model():
    from graphs import deepseek_ocr as model
    return model


def graph(mode, variants=None):
    m = _model()
    return m.model_graph(mode.crop_mode, m.VENDOR if variants is None else variants)


def stages_of(mode) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in graph(mode).scopes)


def scope_stages(mode, scope: str) -> tuple[str, ...]:
    """The stages a scope is made of (e2e: all of them; a stage: itself)."""
    parts = _model().COMPOSITE.get(scope, (scope,))
    return tuple(s for s in stages_of(mode) if any(s == p or s.startswith(p + ".") for p in parts))


# ---- parameters -------------------------------------------------------------------------------

def param_totals(mode, scope: str, variants=None) -> P.ParamTotals:
    """Executed weights of a scope (e2e: vision's + the decoder's)."""
    g, m = graph(mode, variants), _model()
    parts = m.COMPOSITE.get(scope, (scope,))
    if len(parts) == 1:
        return P.executed(g, scope)
    ts = [P.executed(g, p) for p in parts]
    return P.ParamTotals(*(sp.Add(*[getattr(t, f) for t in ts]) for f in ("params", "weight_bytes", "active",
                                                                           "active_bytes")),
                         sum(t.modules for t in ts))


def _patch_values() -> dict:
    """Parameter counts hold the (symbolic) SAM patch size; the checkpoint's is the config's."""
    from graphs.config import VISION

    return {S.patch_size: VISION.patch_size, S.downsample_ratio: VISION.downsample_ratio}


def count(expr, values: dict | None = None) -> int:
    """A parameter count or weight bytes as an integer (patch size and, for bytes, the dtype given)."""
    return substitute(expr, {**_patch_values(), **(values or {})})


def param_summary(mode, dtype_values: dict, variants=None) -> dict:
    """Resident (the checkpoint), executed and active parameters, and their bytes at a dtype."""
    g = graph(mode, variants)
    res = P.resident(g)
    num = lambda e: count(e, dtype_values)
    roots = {r: P.resident(g, r) for r in ("vision", "decoder") if r in g.scopes}
    dec = P.executed(g, "decoder") if "decoder" in g.scopes else None
    part = lambda prefix: count(sum((w.count for n, w in P.per_node(g, "vision.global").items()
                                     if g.g.nodes[n]["path"].startswith(prefix)), sp.Integer(0)))
    unexec = {k: count(v) for k, v in P.unexecuted(g).items()}
    out = {
        "resident": count(res.params), "resident_weight_bytes": num(res.weight_bytes),
        "resident_by_part": {r: count(t.params) for r, t in roots.items()},
        "executed": {r: count(P.executed(g, r).params) for r in roots},
        "unexecuted": unexec,
        "vision_parts": {"sam": part("sam."), "clip": part("clip."), "projector": part("projector")},
    }
    if dec is not None:
        emb = [w for n, w in P.per_node(g, "decoder.prefill").items() if g.g.nodes[n]["kind"] == "embedding"]
        out["active_per_token"] = count(dec.active)
        out["active_per_token_weight_bytes"] = num(dec.active_bytes)
        # the published "570M active" leaves the embedding out (a lookup, not a matmul)
        out["active_per_token_without_embedding_row"] = count(dec.active) - sum(count(w.active) for w in emb)
        out["embedding_table"] = sum(count(w.count) for w in emb)
    out["published"] = PUBLISHED
    return out


# ---- peak activations -------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _peak(crop_mode: bool, variants, stage: str) -> LV.Peak:
    m = _model()
    return LV.liveness(m.model_graph(crop_mode, variants), stage)


def stage_peak(mode, stage: str, variants=None) -> LV.Peak:
    m = _model()
    return _peak(mode.crop_mode, m.VENDOR if variants is None else variants, stage)


def peak_values(values: dict, stage: str) -> dict:
    """Symbol values for a stage's peak: the decode stage at its largest step, t = output_tokens - 1."""
    v = {k.name if hasattr(k, "name") else k: x for k, x in values.items()}
    if stage == "decoder.decode":
        v[S.decode_step.name] = max(int(v[S.output_tokens.name]) - 1, 1)
    return v


def peak_formula(mode, scope: str, variants=None) -> sp.Expr:
    """Peak activation bytes of a scope: Max over its stages' peaks (decode at t = output_tokens-1)."""
    exprs = []
    for st in scope_stages(mode, scope):
        e = stage_peak(mode, st, variants).expr
        if st == "decoder.decode":
            e = e.subs(S.decode_step, S.output_tokens - 1)
        exprs.append(e)
    if not exprs:
        return sp.Integer(0)
    return exprs[0] if len(exprs) == 1 else sp.Max(*exprs, evaluate=False)


def peaks(mode, values: dict, variants=None, only=None) -> dict[str, dict]:
    """Peak activation bytes of every stage (or those in `only`) and the node running at the peak, at one point."""
    out = {}
    for st in stages_of(mode):
        if only is not None and st not in only:
            continue
        v = peak_values(values, st)
        if st == "decoder.decode" and int(v[S.output_tokens.name]) < 2:
            out[st] = {"bytes": 0, "node": None, "note": "no decode forward (output_tokens = 1)"}
            continue
        p = stage_peak(mode, st, variants)
        out[st] = {**p.at({k: v[k] for k in p.args}), "factor": str(p.factor)}
        if st == "decoder.decode":
            out[st]["t"] = v[S.decode_step.name]
    return out


def scope_peak(mode, scope: str, stage_peaks: dict) -> int:
    return max((stage_peaks[s]["bytes"] for s in scope_stages(mode, scope) if s in stage_peaks), default=0)


# ---- roofline ---------------------------------------------------------------------------------

ROOFLINE_STAGES = ("vision", "decoder.prefill", "decoder.decode")


def roofline(mode, fixed: dict, values: dict, hws: list[Hardware], output_tokens: int, variants=None,
             top: int = 0) -> dict[str, dict]:
    """Seconds per stage for each hardware: vision, prefill, decode (every step t), per decode token, total."""
    g = graph(mode, variants)
    vals = {k.name if hasattr(k, "name") else k: v for k, v in values.items()}
    steps = RL.decode_steps(output_tokens)
    raws = {}
    for st in ROOFLINE_STAGES:
        if st not in g.scopes:
            continue
        model = RL.stage_model(g, st, fixed)
        v = dict(vals)
        if st == "decoder.decode":
            v[S.decode_step.name] = steps if len(steps) else np.array([1])
        raws[st] = (model, model.raw(v))
    out = {}
    for hw in hws:
        rec = {}
        for st, (model, raw) in raws.items():
            times = RL.node_times(raw, hw, model.nodes)
            if st == "decoder.decode":
                per_step = times.time.sum(axis=0) if len(steps) else np.zeros(0)
                last = RL.NodeTimes(model.nodes, times.compute[:, -1], times.memory[:, -1],
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

def kv_cache_expr(context) -> sp.Expr:
    """Bytes of the KV cache holding `context` tokens (the language model's formula)."""
    from graphs import decoder

    return decoder.kv_cache_bytes(context=context)


def kv_summary(mode, sequence: dict, dtype_values: dict) -> dict:
    per_token = substitute(kv_cache_expr(1), dtype_values)
    prompt, final = sequence["prompt_tokens"], sequence["final_context"]
    return {"per_token_bytes": per_token, "prompt_tokens": prompt, "after_prefill_bytes":
            substitute(kv_cache_expr(prompt), dtype_values), "final_context": final,
            "final_bytes": substitute(kv_cache_expr(final), dtype_values)}


# ---- what `costgraph cost --metrics ... --hardware ...` adds to the totals --------------------

def _names(values: dict) -> dict:
    return {(k.name if hasattr(k, "name") else k): v for k, v in values.items()}


def extra_metrics(mode, layout, scopes, groups, totals: dict, *, text_tokens: int, output_tokens: int, variants,
                  dtype: str, hardware: list, top: int = 0) -> dict:
    """Sections beyond the per-scope sums of node costs (`totals`): `derived` (per scope: bytes =
    read + written, params, weight bytes, resident params, active params per token, peak
    activation bytes, KV cache bytes) and the sections params, activations, kv_cache, roofline."""
    derived = {s: {} for s in scopes}
    if "bytes" in groups:
        for s in scopes:
            derived[s]["bytes"] = totals[s]["bytes_read"] + totals[s]["bytes_written"]
    m = _model()
    dv = m.dtype_values(dtype)
    values = {**m.mode_values(mode), **m.layout_values(layout), **m.sequence_values(text_tokens, output_tokens), **dv}
    sequence = m.sequence_record(mode, layout, text_tokens, output_tokens)
    out = {}
    need_peaks = "activations" in groups or hardware
    wanted = None if hardware else {st for sc in scopes for st in scope_stages(mode, sc)}
    stage_peaks = peaks(mode, values, variants, wanted) if need_peaks else {}
    kv = kv_summary(mode, sequence, dv) if ("kv_cache" in groups or hardware) and "decoder" in graph(mode).scopes \
        else None
    summary = param_summary(mode, dv, variants) if ("params" in groups or hardware) else None
    if "params" in groups:
        g = graph(mode, variants)
        for s in scopes:
            t = param_totals(mode, s, variants)
            roots = [r for r in ("vision", "decoder") if r in g.scopes and (s == r or s.startswith(r + ".")
                                                                         or s in m.COMPOSITE)]
            derived[s]["params"] = count(t.params)
            derived[s]["weight_bytes"] = count(t.weight_bytes, dv)
            derived[s]["resident_params"] = count(sum((P.resident(g, r).params for r in roots), sp.Integer(0)))
            if s.startswith("decoder"):
                derived[s]["active_params_per_token"] = count(t.active)
        out["params"] = summary
    if "activations" in groups:
        for s in scopes:
            derived[s]["peak_activation_bytes"] = scope_peak(mode, s, stage_peaks)
        out["activations"] = {"peak": stage_peaks, "note": "peak live bytes of op outputs per stage (inputs, "
                              "weights and the KV cache excluded); decode at its largest step t = output_tokens-1; "
                              "a scope's peak is the max of its stages'"}
    if "kv_cache" in groups and kv is not None:
        for s in scopes:
            if s == "decoder.prefill":
                derived[s]["kv_cache_bytes"] = kv["after_prefill_bytes"]
            elif s.startswith("decoder") or s in m.COMPOSITE:
                derived[s]["kv_cache_bytes"] = kv["final_bytes"]
        out["kv_cache"] = kv
    if scopes and any(derived.values()):
        out = {"derived": derived, **out}
    if hardware:
        fixed = {**m.mode_values(mode), **dv}
        lay = _names({**m.layout_values(layout), **m.sequence_values(text_tokens, output_tokens)})
        times = roofline(mode, fixed, lay, hardware, output_tokens, variants, top)
        peak = max((p["bytes"] for p in stage_peaks.values()), default=0)
        out["roofline"] = {hw.name: {"hardware": hw.as_dict(), "stages": times[hw.name],
                                     "fit": memory_fit(hw, summary["resident_weight_bytes"],
                                                       kv["final_bytes"] if kv else 0, peak)}
                           for hw in hardware}
    return out


def text_sections(out: dict) -> list[str]:
    """The extra sections of `cost` for people."""
    from .cli import human, table

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
        v = p["vision_parts"]
        lines.append(f"  vision: SAM {v['sam']:,} (published ~80M), CLIP {v['clip']:,} (~300M, its unused conv "
                     f"included), projector {v['projector']:,}; DeepEncoder {p['resident_by_part'].get('vision', 0):,} "
                     f"(published ~380M)")
        if "active_per_token" in p:
            lines.append(f"  decoder active per token: {p['active_per_token']:,} "
                         f"({p['active_per_token_without_embedding_row']:,} without the embedding row; "
                         f"published: 570M)")
    a = out.get("activations")
    if a:
        lines.append("")
        rows = [[s, f"{v['bytes']:,}", human(v["bytes"]), str(v.get("node") or "-")] for s, v in a["peak"].items()]
        lines.append(table(rows, ["stage", "peak activation bytes", "approx", "at node"]))
    kv = out.get("kv_cache")
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
    rows = []
    for name, rec in r.items():
        st, fit = rec["stages"], rec["fit"]
        dec = st.get("decoder.decode", {})
        ms = lambda x: f"{1e3 * x:,.2f}"
        rows.append([name, ms(st["vision"]["seconds"]), ms(st.get("decoder.prefill", {}).get("seconds", 0.0)),
                     ms(dec.get("per_token_mean_seconds", 0.0)), ms(dec.get("seconds", 0.0)),
                     f"{st['total_seconds']:,.3f}", f"{fit['total_bytes'] / 2**30:,.2f}",
                     f"{fit['memory_bytes'] / 2**30:,.0f}", "yes" if fit["fits"] else "NO"])
    return rows


ROOFLINE_HEADER = ["hardware", "vision ms", "prefill ms", "decode ms/token", "decode ms", "total s",
                   "needs GiB", "has GiB", "fits"]


def roofline_table(r: dict) -> str:
    from .cli import table

    return table(roofline_rows(r), ROOFLINE_HEADER)


def roofline_markdown(r: dict) -> str:
    lines = ["| " + " | ".join(ROOFLINE_HEADER) + " |", "|" + "---|" * len(ROOFLINE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in roofline_rows(r)]
    return "\n".join(lines)


# ---- `formula --metric` for the metrics that are not Cost fields ------------------------------

def extra_expr(mode, scope: str, metric: str, variants=None) -> sp.Expr:
    m = _model()
    if metric == "bytes":
        return sp.expand(m.formula(mode, scope, "bytes_read", variants or m.VENDOR)
                         + m.formula(mode, scope, "bytes_written", variants or m.VENDOR))
    if metric in ("params", "weight_bytes", "active_params"):
        t = param_totals(mode if mode is not None else _SYMBOLIC_CROP, scope, variants)
        expr = {"params": t.params, "weight_bytes": t.weight_bytes, "active_params": t.active}[metric]
        return expr.subs(m.mode_values(mode)) if mode is not None else expr
    if metric == "peak_activation_bytes":
        expr = peak_formula(mode if mode is not None else _SYMBOLIC_CROP, scope, variants)
        return expr.subs(m.mode_values(mode)) if mode is not None else expr
    if metric == "kv_cache_bytes":
        if not (scope.startswith("decoder") or scope in m.COMPOSITE):
            raise ValueError(f"kv_cache_bytes is a language-model metric: choose a decoder scope or e2e, "
                             f"not {scope!r}")
        from graphs.decoder import prompt_length

        crop = True if mode is None else mode.crop_mode
        prompt = prompt_length(crop)
        context = prompt if scope == "decoder.prefill" else prompt + S.output_tokens - 1
        expr = kv_cache_expr(context)
        return expr.subs(m.mode_values(mode)) if mode is not None else expr
    raise ValueError(f"unknown metric {metric!r}")


class _SymbolicCrop:
    """Crop mode with every size symbolic (formula without --mode)."""
    crop_mode = True
    name = None


_SYMBOLIC_CROP = _SymbolicCrop()


def extra_form(kind: str, mode, scope: str, metric: str, grid_multiple=None, variants=None):
    """A `costgraph.forms.Form` of a derived metric, through the same assumptions as `forms.build`."""
    from . import forms

    if kind not in forms.FORMS:
        raise ValueError(f"unknown form {kind!r} (choose from {', '.join(forms.FORMS)})")
    expr = extra_expr(mode, scope, metric, variants)
    name = mode.name if mode is not None else None
    notes = (EXTRA_NOTES[metric],)
    if kind == "general":
        return forms.Form(kind, metric, scope, name, expr, notes=notes)
    if kind == "coefficients" and mode is None:
        raise ValueError("the coefficients form needs a mode (--mode): its coefficients are numbers")
    if grid_multiple is not None and mode is not None:
        raise ValueError("--grid-multiple applies to symbolic sizes only (no --mode)")
    assumptions, otherwise = [], ()
    expr, tiled, otherwise = forms.assume_tiled(expr)
    if tiled:
        assumptions.append(tiled)
    expr, aligned, mult = forms.assume_aligned(expr, grid_multiple)
    if aligned:
        assumptions.append(aligned)
        otherwise = tuple((case, forms.assume_aligned(v, mult)[0]) for case, v in otherwise)
    expr = sp.expand(expr.doit()) if not expr.has(sp.Max) else expr.doit()
    form = forms.Form(kind, metric, scope, name, expr, tuple(assumptions), otherwise, notes)
    if kind == "simplified" and not form.is_polynomial:
        # a peak is a Max over live sets: no polynomial to show by term; the exact form instead
        return forms.Form("general", metric, scope, name, extra_expr(mode, scope, metric, variants),
                          notes=notes + ("not a polynomial in the layout (a Max): the general form is shown",))
    return form


EXTRA_NOTES = {
    "bytes": "bytes_read + bytes_written (unfused: every op reads its inputs and weights, writes its outputs; "
             "a gather reads its indices and the rows it takes, not its table).",
    "params": "parameters the scope's nodes execute, each module once (not multiplied by crops or decode steps); "
              "the checkpoint (resident) count is `costgraph cost --metrics params`.",
    "weight_bytes": "bytes of the executed parameters at the storage dtype (the MoE router in fp32).",
    "active_params": "parameters one token uses: routed experts count experts_per_token of routed_experts, the "
                     "embedding table one row.",
    "peak_activation_bytes": "peak live bytes of op outputs (liveness in execution order; inputs, weights and KV "
                             "cache excluded); the crop batch holds w_crop*h_crop views; decode at t = "
                             "output_tokens-1; a scope's peak is the Max of its stages'.",
    "kv_cache_bytes": "KV cache bytes: K and V of every layer for every cached token (prefill: the prompt; decode: "
                      "the final context prompt + output_tokens - 1).",
}
