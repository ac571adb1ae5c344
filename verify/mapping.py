"""Which part of the reference each costed graph node is: explicit, one rule per node family.

FLOPs (`RULES`): a claim is (module path, torch call): the FLOPs the profiler records for ops
whose innermost module is that path and whose outermost torch call has that tag
(`costgraph.verify.profile`). Module paths are relative to `DeepSeekOCRVision` (the page reference). Names
differ on purpose: the graph uses the vendor's module names (`sam.blocks.3`, `sam.neck.0`,
`sam.net_2`, `clip.transformer`), the reference the `transformers` ones (`sam.layers.3`,
`sam.neck.conv1`, `sam.proj.conv1`, `clip.encoder`). Where the reference has no child module for
an op, the call tag selects it inside the module: SAM's rel-pos einsums run in `attn.rel_pos`
(told apart by the einsum equation), SDPA in `attn`.

Elementwise FLOPs and bytes (`METRIC_RULES`, below): claims on the aten ops of a real CPU run.

Nodes that cost nothing need no claim; anything the reference measures that no node claims fails
the comparison, so a costed op cannot hide among them. The tests check that every costed node has
exactly one rule, that every claimed module exists in the reference, and that claims are disjoint
and cover every measured op.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

LINEAR, CONV, SDPA = "linear", "conv2d", "scaled_dot_product_attention"
SAM, CLIP = "encoder.sam", "encoder.clip.encoder.layers"


@dataclass(frozen=True)
class Claim:
    module: str
    call: str

    def __str__(self) -> str:
        return f"{self.module} [{self.call}]"


# (node path pattern (without the scope), [(module template, call)]); groups fill the templates.
RULES: list[tuple[str, list[tuple[str, str]]]] = [
    (r"sam\.patch_embed\.proj", [(f"{SAM}.patch_embed.projection", CONV)]),
    (r"sam\.blocks\.(\d+)\.attn\.qkv", [(SAM + ".layers.{0}.attn.qkv", LINEAR)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_h", [(SAM + ".layers.{0}.attn.rel_pos", "einsum:bhwc,hkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_w", [(SAM + ".layers.{0}.attn.rel_pos", "einsum:bhwc,wkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.sdpa", [(SAM + ".layers.{0}.attn", SDPA)]),
    (r"sam\.blocks\.(\d+)\.attn\.proj", [(SAM + ".layers.{0}.attn.proj", LINEAR)]),
    (r"sam\.blocks\.(\d+)\.mlp\.(lin[12])", [(SAM + ".layers.{0}.mlp.{1}", LINEAR)]),
    (r"sam\.neck\.0", [(f"{SAM}.neck.conv1", CONV)]),
    (r"sam\.neck\.2", [(f"{SAM}.neck.conv2", CONV)]),
    (r"sam\.net_2", [(f"{SAM}.proj.conv1", CONV)]),
    (r"sam\.net_3", [(f"{SAM}.proj.conv2", CONV)]),
    (r"clip\.transformer\.layers\.(\d+)\.self_attn\.qkv_proj", [(CLIP + ".{0}.self_attn.qkv_proj", LINEAR)]),
    (r"clip\.transformer\.layers\.(\d+)\.self_attn\.sdpa", [(CLIP + ".{0}.self_attn", SDPA)]),
    (r"clip\.transformer\.layers\.(\d+)\.self_attn\.out_proj", [(CLIP + ".{0}.self_attn.out_proj", LINEAR)]),
    (r"clip\.transformer\.layers\.(\d+)\.mlp\.(fc[12])", [(CLIP + ".{0}.mlp.{1}", LINEAR)]),
    (r"projector", [("encoder.projector", LINEAR)]),
]
_COMPILED = [(re.compile(p), claims) for p, claims in RULES]


def claims_for(path: str) -> tuple[Claim, ...]:
    """The reference parts a node (by its path within a view, e.g. `sam.blocks.3.attn.qkv`) maps to."""
    hits = [(m, claims) for rx, claims in _COMPILED if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"node path {path!r} matches {len(hits)} mapping rules (need exactly 1)")
    m, claims = hits[0]
    return tuple(Claim(t.format(*m.groups()), call) for t, call in claims)


def has_cost(graph, node: str) -> bool:
    """A node with matmul FLOPs (symbolically non-zero): what the FLOP comparison maps."""
    return graph.cost(node).flops != 0


def node_claims(graph, scope: str) -> dict[str, tuple[Claim, ...]]:
    """Every node of a view scope with FLOPs, with its claims; such a node without a rule raises."""
    out = {}
    for node in graph.nodes(scope):
        if graph.g.nodes[node]["scope"] == scope and has_cost(graph, node):
            out[node] = claims_for(graph.g.nodes[node]["path"])
    return out


# ---- elementwise FLOPs and bytes: aten ops of a real CPU run ------------------------------------
#
# `costgraph.verify.dispatch.MetricRecorder` records every aten op with (section, innermost module, outermost
# torch call, aten op). A metric claim selects ops by module and optionally by call tag, aten op and
# occurrence (the k-th op with that module, call and aten op in the section): one module may run
# several ops of one kind (a block's two residual adds; the vendor's LayerNorm2d, op by op). Steps
# that run only under a condition (window padding, resizes) sit in modules or calls of their own in
# the reference, so an occurrence never shifts. Each rule maps one node to its ops: the comparison
# is node by node; the few nodes that stand for several aten ops (`quick_gelu`: mul, sigmoid, mul;
# `rel_pos_coords`: two aranges, two muls, sub, add, cast to int64; einsum: its operand copy and bmm)
# claim all of them.


@dataclass(frozen=True)
class OpClaim:
    module: str
    call: str | None = None
    op: str | None = None
    occurrence: int | None = None

    def matches(self, module: str, call: str, op: str, occurrence: int) -> bool:
        return (module == self.module and self.call in (None, call) and self.op in (None, op)
                and self.occurrence in (None, occurrence))

    def __str__(self) -> str:
        parts = [self.module or "<root>"] + [f"{k}={v}" for k, v in
                                             (("call", self.call), ("op", self.op), ("#", self.occurrence)) if v is not None]
        return " ".join(parts)


def _c(module, call=None, op=None, occurrence=None):
    return (module, call, op, occurrence)


L, ATTN, LOOK = SAM + ".layers.{0}", SAM + ".layers.{0}.attn", SAM + ".layers.{0}.attn.rel_pos.lookup_{1}"
CL, POS, ENC = CLIP + ".{0}", "encoder.clip", "encoder"
LN2D = {"mean": ("mean", 0), "centre": ("sub", 0), "square": ("pow", 0), "var": ("mean", 1),
        "centre_again": ("sub", 1), "eps": ("add", 0), "std": ("sqrt", 0), "normalise": ("div", 0),
        "scale": ("mul", 0), "shift": ("add", 1)}
NECK_NORM = {"1": "layer_norm1", "3": "layer_norm2"}

METRIC_RULES: list[tuple[str, list[tuple]]] = [
    (r"sam\.patch_embed\.proj", [_c(f"{SAM}.patch_embed.projection")]),
    (r"sam\.pos_embed\.to_fp32", [_c(SAM, "to", "_to_copy", 0)]),
    (r"sam\.pos_embed\.resize", [_c(SAM, "interpolate")]),
    (r"sam\.pos_embed\.to_storage", [_c(SAM, "to", "_to_copy", 1)]),
    (r"sam\.pos_embed\.add", [_c(SAM, "add", "add")]),
    (r"sam\.blocks\.(\d+)\.norm1", [_c(L + ".layer_norm1")]),
    (r"sam\.blocks\.(\d+)\.window_partition\.pad", [_c(L + ".partition", "pad")]),
    (r"sam\.blocks\.(\d+)\.window_partition", [_c(L + ".partition", "contiguous")]),
    (r"sam\.blocks\.(\d+)\.attn\.qkv", [_c(ATTN + ".qkv")]),
    (r"sam\.blocks\.(\d+)\.attn\.split_heads", [_c(ATTN, "reshape", "clone", 0)]),
    (r"sam\.blocks\.(\d+)\.attn\.merge_heads", [_c(ATTN, "reshape", "clone", 1)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_([hw])\.to_fp32", [_c(LOOK, "to", "_to_copy", 0)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_([hw])\.resize", [_c(LOOK, "interpolate")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_([hw])\.to_storage", [_c(LOOK, "to", "_to_copy", 1)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_([hw])\.coords",
     [_c(LOOK, call) for call in ("arange", "mul", "sub", "add", "long")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_([hw])\.gather", [_c(LOOK, "__getitem__")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_h", [_c(ATTN + ".rel_pos", "einsum:bhwc,hkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_w", [_c(ATTN + ".rel_pos", "einsum:bhwc,wkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_h\.flat", [_c(ATTN + ".rel_pos", "reshape", "clone", 0)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_w\.flat", [_c(ATTN + ".rel_pos", "reshape", "clone", 1)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_mask", [_c(ATTN + ".rel_pos", "add")]),
    (r"sam\.blocks\.(\d+)\.attn\.sdpa", [_c(ATTN, SDPA)]),
    (r"sam\.blocks\.(\d+)\.attn\.proj", [_c(ATTN + ".proj")]),
    (r"sam\.blocks\.(\d+)\.window_unpartition", [_c(L + ".unpartition", "contiguous")]),
    (r"sam\.blocks\.(\d+)\.window_unpartition\.unpad", [_c(L, "contiguous")]),
    (r"sam\.blocks\.(\d+)\.residual1", [_c(L, "add", "add", 0)]),
    (r"sam\.blocks\.(\d+)\.residual2", [_c(L, "add", "add", 1)]),
    (r"sam\.blocks\.(\d+)\.norm2", [_c(L + ".layer_norm2")]),
    (r"sam\.blocks\.(\d+)\.mlp\.(lin[12]|act)", [_c(L + ".mlp.{1}")]),
    (r"sam\.neck\.0", [_c(f"{SAM}.neck.conv1")]),
    (r"sam\.neck\.2", [_c(f"{SAM}.neck.conv2")]),
    *[(rf"sam\.neck\.{k}\.{step}", [_c(f"{SAM}.neck.{norm}", call, None, occ)])
      for k, norm in NECK_NORM.items() for step, (call, occ) in LN2D.items()],
    (r"sam\.net_2", [_c(f"{SAM}.proj.conv1")]),
    # the vendor's `net_3(x2.clone())`, run in the reference's `proj` itself (costgraph.verify.reference item 7)
    (r"sam\.net_2\.clone", [_c(f"{SAM}.proj", "clone", "clone")]),
    (r"sam\.net_3", [_c(f"{SAM}.proj.conv2")]),
    (r"clip\.embeddings\.cat", [_c(POS, "cat", "cat", 0)]),
    (r"clip\.embeddings\.position_embedding\.lookup", [_c(POS + ".position_embedding")]),
    (r"clip\.embeddings\.position_embedding\.nchw", [_c(POS, "contiguous")]),
    (r"clip\.embeddings\.position_embedding\.to_fp32", [_c(POS, "to", "_to_copy", 0)]),
    (r"clip\.embeddings\.position_embedding\.resize", [_c(POS, "interpolate")]),
    (r"clip\.embeddings\.position_embedding\.to_storage", [_c(POS, "to", "_to_copy", 1)]),
    (r"clip\.embeddings\.position_embedding\.cat", [_c(POS, "cat", "cat", 1)]),
    (r"clip\.embeddings\.add", [_c(POS, "add")]),
    (r"clip\.pre_layrnorm", [_c(POS + ".pre_layrnorm")]),
    (r"clip\.transformer\.layers\.(\d+)\.(layer_norm[12])", [_c(CL + ".{1}")]),
    (r"clip\.transformer\.layers\.(\d+)\.self_attn\.(qkv_proj|out_proj)", [_c(CL + ".self_attn.{1}")]),
    (r"clip\.transformer\.layers\.(\d+)\.self_attn\.sdpa", [_c(CL + ".self_attn", SDPA)]),
    (r"clip\.transformer\.layers\.(\d+)\.residual1", [_c(CL, "add", "add", 0)]),
    (r"clip\.transformer\.layers\.(\d+)\.residual2", [_c(CL, "add", "add", 1)]),
    (r"clip\.transformer\.layers\.(\d+)\.mlp\.(fc[12])", [_c(CL + ".mlp.{1}")]),
    (r"clip\.transformer\.layers\.(\d+)\.mlp\.act", [_c(CL + ".mlp.activation_fn")]),
    (r"fusion\.cat", [_c(ENC, "cat")]),
    (r"projector", [_c(ENC + ".projector")]),
    # the page assembly (scope `vision`; the reference's root module is "")
    (r"assemble\.crop_stitch", [_c("", "reshape")]),
    (r"assemble\.crop_newlines", [_c("crop_rows", "cat")]),
    (r"assemble\.global_newlines", [_c("global_rows", "cat")]),
    (r"assemble\.sequence", [_c("", "cat")]),
]
_METRIC_COMPILED = [(re.compile(p), claims) for p, claims in METRIC_RULES]
METRICS = ("elementwise_flops", "bytes_read", "bytes_written")


def metric_claims_for(path: str) -> tuple[OpClaim, ...]:
    hits = [(m, claims) for rx, claims in _METRIC_COMPILED if (m := rx.fullmatch(path))]
    if len(hits) != 1:
        raise KeyError(f"node path {path!r} matches {len(hits)} metric mapping rules (need exactly 1)")
    m, claims = hits[0]
    return tuple(OpClaim(mod.format(*m.groups()), call, op, occ) for mod, call, op, occ in claims)


def has_metrics(graph, node: str) -> bool:
    """A node with elementwise FLOPs or bytes (symbolically non-zero): what the metric comparison maps."""
    cost = graph.cost(node)
    return any(cost[m] != 0 for m in METRICS)


def metric_claims(graph, scope: str) -> dict[str, tuple[OpClaim, ...]]:
    """Every node of `scope` itself (not its sub-scopes) that moves bytes or does elementwise work,
    with its op claims; such a node without a rule raises."""
    return {node: metric_claims_for(graph.g.nodes[node]["path"]) for node in graph.nodes(scope)
            if graph.g.nodes[node]["scope"] == scope and has_metrics(graph, node)}
