"""Which part of the reference each costed graph node is: explicit, one rule per node family.

A claim is (module path, torch call): the FLOPs the profiler records for ops whose innermost
module is that path and whose outermost torch call has that tag (`verify.profile`). Module
paths are relative to `DeepSeekOCRVision` (the page reference). Names differ on purpose:
the graph uses the vendor's module names (`sam.blocks.3`, `sam.neck.0`, `sam.net_2`,
`clip.transformer`), the reference the `transformers` ones (`sam.layers.3`, `sam.neck.conv1`,
`sam.proj.conv1`, `clip.encoder`).

Where the reference has no child module for an op, the call tag selects it inside the module:
SAM's rel-pos einsums and SDPA all run in `attn` itself (told apart by the einsum equation and
`scaled_dot_product_attention`). One graph node may claim several modules: the vendor's fused
CLIP qkv projection is `q_proj`, `k_proj`, `v_proj` in `transformers`.

Nodes that cost nothing (shape-only ops) need no claim; any FLOPs the reference counts that no
node claims fail the comparison, so a costed op cannot hide among them.
The tests check that every costed node has exactly one rule, that every claimed module exists
in the reference, and that claims are disjoint and cover every counted FLOP.
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
    (r"sam\.blocks\.(\d+)\.attn\.rel_h", [(SAM + ".layers.{0}.attn", "einsum:bhwc,hkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_w", [(SAM + ".layers.{0}.attn", "einsum:bhwc,wkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.sdpa", [(SAM + ".layers.{0}.attn", SDPA)]),
    (r"sam\.blocks\.(\d+)\.attn\.proj", [(SAM + ".layers.{0}.attn.proj", LINEAR)]),
    (r"sam\.blocks\.(\d+)\.mlp\.(lin[12])", [(SAM + ".layers.{0}.mlp.{1}", LINEAR)]),
    (r"sam\.neck\.0", [(f"{SAM}.neck.conv1", CONV)]),
    (r"sam\.neck\.2", [(f"{SAM}.neck.conv2", CONV)]),
    (r"sam\.net_2", [(f"{SAM}.proj.conv1", CONV)]),
    (r"sam\.net_3", [(f"{SAM}.proj.conv2", CONV)]),
    (r"clip\.transformer\.layers\.(\d+)\.self_attn\.qkv_proj",
     [(CLIP + ".{0}.self_attn.q_proj", LINEAR), (CLIP + ".{0}.self_attn.k_proj", LINEAR),
      (CLIP + ".{0}.self_attn.v_proj", LINEAR)]),
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
    """A node that costs something in any metric (symbolically non-zero)."""
    return any(e != 0 for e in graph.cost(node).as_dict().values())


def node_claims(graph, scope: str) -> dict[str, tuple[Claim, ...]]:
    """Every costed node of a view scope with its claims; a costed node without a rule raises."""
    out = {}
    for node in graph.nodes(scope):
        if graph.g.nodes[node]["scope"] == scope and has_cost(graph, node):
            out[node] = claims_for(graph.g.nodes[node]["path"])
    return out
