"""Elementwise FLOPs and bytes of a training step, per reference module: the training graph's decoder
nodes (forward and backward) against the aten ops the LM reference dispatched (the recorder of
`costgraph.verify.backward.StepMetrics`, the conventions of `costgraph.conventions`).

Grouping (as `costgraph.verify.lm_profile` compares inference): every graph node runs in one reference
module (`MODULES`, by its path within the decoder; a backward node in its forward's module); a group is
(section, module): predicted = the sum of its nodes, measured = the sum of the module's own ops in that
section (forward "decoder", backward "backward.decoder"). The routed experts' per-expert modules
(`mlp.experts.<i>.gate_proj`, ...) form one group per layer (`mlp.experts.*.gate_proj`): the graph's
routed nodes run all k*T rows over all experts, a data-independent total whatever the routing.
Backward ops go to the module whose forward call created their autograd node; a gradient sum
(autograd adding the gradients of a tensor used twice) to the module of the tensor's producer (the
graph charges it to the producer's backward node); the seed (`ones_like(loss)`) to the loss.
LoRA: the base projection runs in `<target>.base_layer`, the adapters in `<target>.lora_A.default`
and `.lora_B.default`, the casts, scaling and sum in `<target>` itself.
A module with a non-zero measured metric that no node maps to is reported unclaimed.
"""
from __future__ import annotations

import re
from collections import defaultdict

from .backward import ACCUMULATE, SEED, Step
from .compare import Row
from .lm_profile import DECODER_MODULES

METRICS = ("elementwise_flops", "bytes_read", "bytes_written")
_L = "model.layers.{0}"
LOSS_MODULE = ""   # `TrainingLM.forward` (the loss runs there)

# (node path within the decoder scope, the reference module it runs in; "*" for any routed expert)
MODULES: list[tuple[str, str]] = DECODER_MODULES + [   # a path must match exactly one rule: order is free
    (r"image_scatter|image_features|loss\.\w+", ""),
    # the MoE's flattening is two views (the gate's, the experts'): their gradients are summed at the
    # view's input, the post-attention norm's output (the graph's node is the view, costing only that sum)
    (r"layers\.(\d+)\.mlp\.flatten", _L + ".post_attention_layernorm"),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj|act_fn)", _L + ".mlp.experts.*.{1}"),
    (r"layers\.(\d+)\.mlp\.experts\.mul", _L + ".mlp.experts.*"),
    (r"layers\.(\d+)\.mlp\.experts\.(repeat_interleave|rows|write_back|weighted_sum|add_aux_loss|unflatten)",
     _L + ".mlp"),
]
_MODULES = [(re.compile(p), t) for p, t in MODULES]
LORA_PARTS = {"lora_A": ".lora_A.default", "lora_B": ".lora_B.default"}
LORA_OWN = ("lora_input_cast", "lora_scaling", "lora_add", "lora_result_cast")
_EXPERT = re.compile(r"\.experts\.\d+(?=\.|$)")


def module_for(path: str, lora: bool = False) -> str:
    """The reference module a decoder node (by its path) runs in; `lora`: the node's projection carries
    adapters (it then runs in `<target>.base_layer`)."""
    base, _, part = path.rpartition(".")
    if part in LORA_PARTS:
        return module_for(base) + LORA_PARTS[part]
    if part in LORA_OWN:
        return module_for(base)
    hits = [(m, t) for rx, t in _MODULES if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"decoder node path {path!r} matches {len(hits)} training module rules (need exactly 1)")
    m, template = hits[0]
    return template.format(*m.groups()) + (".base_layer" if lora else "")


def group_of(module: str) -> str:
    """A measured module's group: every routed expert of a layer alike."""
    return _EXPERT.sub(".experts.*", module)


def measured_by_module(step: Step) -> dict[tuple[str, str], dict[str, int]]:
    """(section, module group) -> the metrics of its own ops (gradient sums at the producer's module,
    the seed at the loss)."""
    out: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
    for op in step.ops:
        w = op.where
        if w.kind == ACCUMULATE and w.producer is not None:
            module = w.producer.module
        elif w.kind == SEED:
            module = LOSS_MODULE
        else:
            module = w.tag.module
        slot = out[(w.section, group_of(module))]
        for m in METRICS:
            slot[m] += getattr(op, m)
    return dict(out)


def compare_metrics(graph, values: dict, step: Step, scopes: tuple[str, ...], metrics: tuple[str, ...], value,
                    lora_of, module_of=None, values_of=None) -> tuple[list[Row], list[Row], list[tuple[str, str, int]]]:
    """Rows per (section, module group), per-section totals, and measured groups no node claims.
    `value(expr, values)` evaluates a cost; `lora_of(node)` tells whether a node's projection has adapters;
    `module_of(path, lora)` the reference module of a node (default `module_for`: DeepSeek-OCR's reference);
    `values_of(node)`: a node's own values (e.g. the experts its layer ran), default `values` for all."""
    module_of = module_of or module_for
    node_values = values_of or (lambda node: values)
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for scope in scopes:
        for node in graph.nodes(scope):
            d = graph.g.nodes[node]
            if d["scope"] != scope or d["kind"] == "input":
                continue
            groups[(scope, module_of(d["path"], lora_of(node)))].append(node)
    measured = measured_by_module(step)
    rows = []
    for (scope, module), nodes in groups.items():
        got = measured.get((scope, module), dict.fromkeys(METRICS, 0))
        for m in metrics:
            predicted = sum(value(graph.effective_cost(n)[m], node_values(n)) for n in nodes)
            if predicted or got[m]:
                rows.append(Row(_name(scope, module), m, predicted, got[m], f"{len(nodes)} nodes"))
    unclaimed = [(f"{sec}:{mod or '<root>'}", m, got[m]) for (sec, mod), got in sorted(measured.items())
                 if sec in scopes and (sec, mod) not in groups for m in metrics if got[m]]
    totals = []
    for scope in scopes:
        for m in metrics:
            predicted = value(graph.total(scope)[m], values) if values_of is None else \
                sum(value(graph.effective_cost(n)[m], values_of(n)) for n in graph.nodes(scope))
            got = sum(v[m] for (sec, _), v in measured.items() if sec == scope)
            totals.append(Row(scope, m, predicted, got, "all recorded ops"))
    return rows, totals, unclaimed


def _name(scope: str, module: str) -> str:
    return f"{scope}:{module or '<root>'}"


def ratio_table(rows: list[Row]) -> list[list[str]]:
    """Per group and metric: predicted, measured, their ratio (the groups not exact), largest gap first."""
    bad = sorted((r for r in rows if not r.ok), key=lambda r: -abs(r.measured - r.predicted))
    return [[r.node, r.metric, f"{r.predicted:,}", f"{r.measured:,}",
             f"{r.measured / r.predicted:.4f}" if r.predicted else "-"] for r in bad]
