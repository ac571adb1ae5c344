"""The ViT graph (`costgraph.graphs.vit`) against `transformers.ViTForImageClassification`, node by node, exactly.

The reference is transformers' own model, random weights, built from the variant's data
(`costgraph.graphs.vit.config`) at the image side being checked (each size has its own position table, as
the 224 and 384 checkpoints do: nothing is interpolated). Attention is SDPA, transformers'
default for ViT: on CPU it runs the fused `aten._scaled_dot_product_flash_attention_for_cpu`, which
`costgraph.verify.profile.OpCounter` counts (its `EXTRA_FORMULAS`; stock FlopCounterMode would count it 0)
and `costgraph.verify.dispatch.MetricRecorder` costs under the conventions (scale + softmax per score, the
fp32 logsumexp written); on `meta` SDPA takes the math path, whose bmm FLOPs are the same. Eager
attention would add, per layer, copies of q and k^T for the bmm, a scale, an fp32 softmax with
casts and a copy of the merged heads: a different (costlier) reference, not the one a user of
ViT gets by default.

- FLOPs (`FLOP_RULES`): a node claims (module, torch call) from `OpCounter`'s records; on `meta`
  (any size, cheap) or CPU.
- Elementwise FLOPs, bytes read and written, activation bytes (`METRIC_RULES`): a node claims aten
  ops of a real CPU run (module, call, aten op, occurrence), recorded by `MetricRecorder`;
  activation bytes are the bytes of the claimed op's main (first) output, which `ActivationRecorder`
  adds to the recorder. Only on CPU: a `meta` run has no kernels.
- Parameters: the graph's resident count against the reference's `named_parameters`.

A node measured 0 against a non-zero prediction fails; so does a measured op no node claims and a
compute op that ran without a FLOP formula. `python -m costgraph.verify.vit` runs the default suite (FLOPs on
`meta` at 224 and 384; every metric on CPU at 64 px in fp32 and bf16, batch 2).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from functools import lru_cache

import sympy as sp
import torch

from costgraph.dtypes import STORAGE, torch_dtype
from costgraph import params as cg_params
from costgraph.cost import METRICS as ALL_METRICS
from costgraph.graphs.vit import symbols as S
from costgraph.graphs.vit.config import DEFAULT, VitConfig, get_variant
from costgraph.graphs.vit.graph import SCOPES, build_graph, dtype_values, mode_values
from .compare import Comparison, Row
from .dispatch import MetricRecorder, _is_alias, _tensors, print_trace
from .mapping import Claim, OpClaim
from .profile import Measured, OpCounter
from .runner import occurrences

LINEAR, CONV, SDPA = "linear", "conv2d", "scaled_dot_product_attention"
OP_METRICS = ("elementwise_flops", "bytes_read", "bytes_written", "activation_bytes")
TORCH_DTYPES = {name: torch_dtype(name) for name in STORAGE}
L = "vit.layers.{0}"

# ---- which part of the reference each node is ---------------------------------------------------
# Node paths are module paths, so most rules are the identity; they are written out anyway, one per
# node family, so that a node without a rule (or with two) raises instead of passing unchecked.

FLOP_RULES: list[tuple[str, list[tuple[str, str]]]] = [
    (r"vit\.embeddings\.patch_embeddings\.projection", [("vit.embeddings.patch_embeddings.projection", CONV)]),
    (r"vit\.layers\.(\d+)\.attention\.([qkvo]_proj)", [(L + ".attention.{1}", LINEAR)]),
    (r"vit\.layers\.(\d+)\.attention\.sdpa", [(L + ".attention", SDPA)]),
    (r"vit\.layers\.(\d+)\.mlp\.(fc[12])", [(L + ".mlp.{1}", LINEAR)]),
    (r"classifier", [("classifier", LINEAR)]),
]

# (node path pattern, [(module template, call, aten op, occurrence)]): None matches any.
METRIC_RULES: list[tuple[str, list[tuple]]] = [
    (r"vit\.embeddings\.patch_embeddings\.projection", [("vit.embeddings.patch_embeddings.projection", None, None, None)]),
    (r"vit\.embeddings\.cat", [("vit.embeddings", "cat", "cat", None)]),
    (r"vit\.embeddings\.add", [("vit.embeddings", "add", "add", None)]),
    (r"vit\.layers\.(\d+)\.(layernorm_before|layernorm_after)", [(L + ".{1}", None, None, None)]),
    (r"vit\.layers\.(\d+)\.attention\.([qkvo]_proj)", [(L + ".attention.{1}", None, None, None)]),
    (r"vit\.layers\.(\d+)\.attention\.sdpa", [(L + ".attention", SDPA, None, None)]),
    # the two residual adds run in ViTLayer.forward itself: the first and the second `add` there
    (r"vit\.layers\.(\d+)\.residual1", [(L, "add", "add", 0)]),
    (r"vit\.layers\.(\d+)\.residual2", [(L, "add", "add", 1)]),
    (r"vit\.layers\.(\d+)\.mlp\.(fc[12]|activation_fn)", [(L + ".mlp.{1}", None, None, None)]),
    (r"vit\.layernorm", [("vit.layernorm", None, None, None)]),
    (r"classifier", [("classifier", None, None, None)]),
]

# The reference modules whose ops each scope's nodes stand for (for the per-scope subtotals):
# "" is ViTForImageClassification.forward itself (the CLS row).
SCOPE_MODULES = {"vit": None, "vit.embeddings": ("vit.embeddings",), "vit.encoder": ("vit.layers", "vit.layernorm"),
                 "vit.head": ("", "classifier")}


def _rule(rules, path: str):
    hits = [(m, claims) for rx, claims in rules if (m := re.fullmatch(rx, path))]
    if len(hits) != 1:
        raise KeyError(f"node path {path!r} matches {len(hits)} rules (need exactly 1)")
    return hits[0]


def flop_claims_for(path: str) -> tuple[Claim, ...]:
    m, claims = _rule(FLOP_RULES, path)
    return tuple(Claim(t.format(*m.groups()), call) for t, call in claims)


def metric_claims_for(path: str) -> tuple[OpClaim, ...]:
    m, claims = _rule(METRIC_RULES, path)
    return tuple(OpClaim(t.format(*m.groups()), call, op, occ) for t, call, op, occ in claims)


def flop_nodes(graph) -> dict[str, tuple[Claim, ...]]:
    """Every node with matmul FLOPs (symbolically non-zero) with its claims."""
    return {n: flop_claims_for(graph.g.nodes[n]["path"]) for n in graph.nodes() if graph.cost(n).flops != 0}


def metric_nodes(graph) -> dict[str, tuple[OpClaim, ...]]:
    """Every node with elementwise FLOPs, bytes or an activation (symbolically non-zero) with its claims."""
    return {n: metric_claims_for(graph.g.nodes[n]["path"]) for n in graph.nodes()
            if any(graph.cost(n)[m] != 0 for m in OP_METRICS)}


def _in_scope(module: str, scope: str) -> bool:
    prefixes = SCOPE_MODULES[scope]
    return prefixes is None or any(module == p or (p and module.startswith(p + ".")) for p in prefixes)


# ---- the reference ---------------------------------------------------------------------------------

def build_reference(cfg: VitConfig = DEFAULT, image_size: int | None = None, device: str = "meta",
                    dtype: str = "fp32", patch_size: int | None = None, seed: int = 0):
    """`ViTForImageClassification` for `cfg` at `image_size` (default: the variant's), SDPA attention,
    eval mode, random weights (on `meta`: none at all)."""
    from transformers import ViTConfig as HFViTConfig, ViTForImageClassification

    hf = HFViTConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     intermediate_size=cfg.mlp_dim, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
                     qkv_bias=cfg.qkv_bias, image_size=image_size or cfg.image_size,
                     patch_size=patch_size or cfg.patch_size, num_channels=cfg.in_channels, num_labels=cfg.num_labels)
    hf._attn_implementation = "sdpa"
    if device == "meta":
        with torch.device("meta"):
            model = ViTForImageClassification(hf)
    else:
        torch.manual_seed(seed)
        model = ViTForImageClassification(hf).to(device=device, dtype=TORCH_DTYPES[dtype])
    return model.eval()


class ActivationRecorder(MetricRecorder):
    """`MetricRecorder` that also keeps, per op, the bytes of its main (first) output (0 for a view
    or alias): the graph's `activation_bytes` of the node that claims it."""

    def __init__(self):
        super().__init__()
        self.out_bytes: list[int] = []

    def __enter__(self):
        self.out_bytes.clear()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        outs = _tensors(out)
        self.out_bytes.append(0 if _is_alias(func) or not outs else outs[0].numel() * outs[0].element_size())
        return out


def run_reference(model, pixels: torch.Tensor, metrics: bool) -> tuple[Measured, ActivationRecorder | None]:
    """One forward under the FLOP counter (and the metric recorder with `metrics`)."""
    counter = OpCounter()
    rec = ActivationRecorder() if metrics else None
    with counter, (rec if rec is not None else contextlib.nullcontext()), torch.no_grad():
        model(pixels)
    return Measured(dict(counter.records), dict(counter.uncounted)), rec


# ---- predictions -----------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def graph_for(cfg: VitConfig):
    return build_graph(cfg)


class _Values:
    """Exact integers of expressions at fixed values, each distinct expression substituted once
    (the layers share theirs)."""

    def __init__(self, values: dict):
        self.values, self._done = values, {}

    def __call__(self, e) -> int:
        e = sp.sympify(e)
        if e not in self._done:
            v = e.subs(self.values)
            if v.free_symbols or not v.is_integer:
                raise ValueError(f"not an integer at {self.values}: {v}")
            self._done[e] = int(v)
        return self._done[e]


# ---- comparing -------------------------------------------------------------------------------------

def verify_vit(image_size: int = 224, device: str = "meta", metrics=("flops",), dtype: str = "fp32",
               cfg: VitConfig = DEFAULT, batch: int = 1, patch_size: int | None = None, model=None) -> Comparison:
    """The graph against the reference at one size: FLOPs (any device); on CPU also the other
    metrics asked for. `metrics`: names of `costgraph.cost.METRICS`, or "all"; `model`: a reference
    built by `build_reference` for this size and dtype (built here if not given)."""
    metrics = ALL_METRICS if metrics == "all" else tuple(metrics)
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(sorted(unknown))} (choose from {', '.join(ALL_METRICS)})")
    if device not in ("meta", "cpu"):
        raise ValueError(f"unknown device {device!r} (choose meta or cpu)")
    patch_size = patch_size or cfg.patch_size
    wanted = [m for m in metrics if m in OP_METRICS]
    on_cpu = device == "cpu" and bool(wanted)
    t = time.perf_counter()
    model = model if model is not None else build_reference(cfg, image_size, device, dtype, patch_size)
    pixels = torch.randn(batch, cfg.in_channels, image_size, image_size, dtype=TORCH_DTYPES[dtype], device=device) \
        if device != "meta" else torch.empty(batch, cfg.in_channels, image_size, image_size, device="meta")
    measured, rec = run_reference(model, pixels, on_cpu)
    seconds = time.perf_counter() - t

    graph = graph_for(cfg)
    value = _Values({**mode_values(cfg, batch), S.image_size: image_size, S.patch_size: patch_size,
                     **dtype_values(dtype)})
    rows, subtotals = [], []
    claimed = set()
    for node, claims in flop_nodes(graph).items():
        keys = {(c.module, c.call) for c in claims}
        claimed |= keys
        got = sum(n for k, n in measured.records.items() if k[1:3] in keys)
        rows.append(Row(node, "flops", value(graph.effective_cost(node).flops), int(got), "; ".join(map(str, claims))))
    for s in SCOPES:
        got = sum(n for k, n in measured.records.items() if _in_scope(k[1], s))
        subtotals.append(Row(s, "flops", value(graph.total(s).flops), int(got), "all counted ops"))
    unclaimed = sorted((k[1] or "<root>", f"{k[2]}/{k[3]}", int(n)) for k, n in measured.records.items()
                       if n and k[1:3] not in claimed)
    if on_cpu:
        m_rows, m_sub, m_unclaimed = _compare_ops(graph, value, rec, wanted)
        rows, subtotals, unclaimed = rows + m_rows, subtotals + m_sub, unclaimed + m_unclaimed
    ref_params = sum(p.numel() for p in model.parameters())
    subtotals.append(Row(ROOT_PARAMS, "params", value(cg_params.resident(graph).params), ref_params,
                         "sum of named_parameters numel"))
    info = {"variant": cfg.name, "image_size": image_size, "patch_size": patch_size, "batch": batch,
            "device": device, "dtype": dtype, "attention": "sdpa", "seconds": round(seconds, 3),
            "metrics": ["flops"] + (wanted if on_cpu else [])}
    if wanted and not on_cpu:
        info["metrics_skipped"] = f"{', '.join(wanted)}: defined on real CPU kernels; a meta run has none"
    blind = [f"{k[1] or '<root>'} {k[2]}/{k[3]}" for k in measured.blind_spots()]
    title = f"{cfg.name} {image_size}px/{patch_size} x{batch} {device} {dtype if device != 'meta' else ''}".rstrip()
    return Comparison(title, rows, subtotals, unclaimed, blind, info)


ROOT_PARAMS = "vit"


def _compare_ops(graph, value, rec: ActivationRecorder, metrics) -> tuple[list[Row], list[Row], list]:
    """Per node and metric rows from the recorded aten ops; a call claimed twice raises."""
    calls = rec.calls
    occ = occurrences(calls)
    by_module: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault(c.module, []).append(i)

    def measure(i: int, m: str) -> int:
        return rec.out_bytes[i] if m == "activation_bytes" else getattr(calls[i], m)

    owner: dict[int, str] = {}
    rows = []
    for node, claims in metric_nodes(graph).items():
        mine = [i for cl in claims for i in by_module.get(cl.module, [])
                if cl.matches(calls[i].module, calls[i].call, calls[i].op, occ[i])]
        for i in mine:
            if owner.setdefault(i, node) != node:
                raise ValueError(f"aten op {calls[i]} claimed by {owner[i]} and {node}")
        cost, ref = graph.effective_cost(node), "; ".join(map(str, claims))
        rows += [Row(node, m, value(cost[m]), sum(measure(i, m) for i in mine), ref) for m in metrics]
    subtotals = [Row(s, m, value(graph.total(s)[m]),
                     sum(measure(i, m) for i, c in enumerate(calls) if _in_scope(c.module, s)), "all aten ops")
                 for s in SCOPES for m in metrics]
    unclaimed = [(c.module or "<root>", f"{c.call}/{c.op}#{occ[i]}",
                  c.elementwise_flops + c.bytes_read + c.bytes_written + rec.out_bytes[i])
                 for i, c in enumerate(calls) if i not in owner
                 and (c.elementwise_flops or c.bytes_read or c.bytes_written or rec.out_bytes[i])]
    return rows, subtotals, unclaimed


# ---- the command -----------------------------------------------------------------------------------

DEFAULT_SUITE = (  # (image side, device, metrics, dtype, batch)
    (224, "meta", ("flops",), "fp32", 1),
    (384, "meta", ("flops",), "fp32", 1),
    (64, "cpu", "all", "fp32", 2),
    (64, "cpu", "all", "bf16", 2),
)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    right = [i > 1 for i in range(len(header))]
    fmt = lambda r: "  ".join(str(x).rjust(w) if ri else str(x).ljust(w) for x, w, ri in zip(r, widths, right))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def render(comps: list[Comparison]) -> str:
    lines = []
    for c in comps:
        nodes = {m: sum(1 for r in c.rows if r.metric == m) for m in dict.fromkeys(r.metric for r in c.rows)}
        lines.append(f"{c.title}: {c.nodes_compared} nodes, rows per metric "
                     + ", ".join(f"{m} {n}" for m, n in nodes.items()) + f" ({c.info['seconds']:.2f} s)")
        lines.append(_table([[r.node, r.metric, f"{r.predicted:,}", f"{r.measured:,}", r.status]
                             for r in c.subtotals], ["scope", "metric", "predicted", "measured", "status"]))
        bad = c.failures()
        lines += [f"FAILING {r.node} {r.metric}: predicted {r.predicted:,} measured {r.measured:,} ({r.reference})"
                  for r in bad]
        lines += [f"FAILING measured op with no node: {m} {o} = {n:,}" for m, o, n in c.unclaimed]
        lines += [f"FAILING compute op without a FLOP formula: {b}" for b in c.blind]
        if "metrics_skipped" in c.info:
            lines.append(f"note: {c.info['metrics_skipped']}")
        lines.append("")
    ok = all(c.ok for c in comps)
    rows = sum(len(c.rows) for c in comps)
    failing = sum(len(c.failures()) + len(c.unclaimed) + len(c.blind) for c in comps)
    lines.append(f"{'PASS' if ok else 'FAIL'}: {len(comps)} case(s), {rows:,} node rows compared, exact equality, "
                 f"{failing} failing")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m costgraph.verify.vit", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default=DEFAULT.name, help="costgraph.graphs.vit.config.VARIANTS (default %(default)s)")
    p.add_argument("--image-size", type=int, help="one case at this side (default: the suite of the docstring)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="meta", choices=["meta", "cpu"])
    p.add_argument("--metrics", default="flops", help="comma-separated costgraph metrics, or 'all'")
    p.add_argument("--dtype", default="fp32", choices=list(TORCH_DTYPES))
    p.add_argument("--trace", action="store_true", help="print the aten trace of the CPU run instead")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = get_variant(a.variant)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if a.trace:
        model = build_reference(cfg, a.image_size or 64, "cpu", a.dtype)
        pixels = torch.randn(a.batch, cfg.in_channels, a.image_size or 64, a.image_size or 64,
                             dtype=TORCH_DTYPES[a.dtype])
        print_trace(run_reference(model, pixels, True)[1].calls)
        return 0
    metrics = "all" if a.metrics == "all" else tuple(a.metrics.split(","))
    cases = [(a.image_size, a.device, metrics, a.dtype, a.batch)] if a.image_size else DEFAULT_SUITE
    try:
        comps = [verify_vit(size, dev, ms, dt, cfg, batch) for size, dev, ms, dt, batch in cases]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"ok": all(c.ok for c in comps), "results": [c.to_json() for c in comps]}, indent=1))
    else:
        print(render(comps))
    return 0 if all(c.ok for c in comps) else 1


if __name__ == "__main__":
    sys.exit(main())
