"""The vision graph: symbolic totals, compiled evaluation, and exact equality with the meta reference."""
import random

import numpy as np
import pytest
import sympy as sp

from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.evaluate import Compiled, substitute
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr.config import MODES
from costgraph.graphs.deepseek_ocr.layout import all_grids, layout_for_grid
from costgraph.verify.profile import count_views

GUNDAM = MODES["gundam"]


@pytest.mark.parametrize("side", [512, 640, 1024, 1280])
def test_one_view_equals_meta_reference(side):
    """Per-view vision FLOPs == FlopCounterMode of the transformers reference, to the integer."""
    expr = model.vision_graph(False).total("vision").flops
    predicted = substitute(expr, {S.image_size: side, S.patch_size: 16})
    assert predicted == count_views(side, 1).get_total_flops()
    assert predicted > 0


def test_symbolic_total_is_sum_of_node_costs():
    g = model.vision_graph(True)
    values = model.mode_values(GUNDAM)
    rng = random.Random(1)
    total = g.total("vision").flops
    for w, h in [(1, 1)] + [(rng.randint(1, 6), rng.randint(1, 6)) for _ in range(4)]:
        at = {**values, S.w_crop: w, S.h_crop: h}
        by_node = sum(substitute(g.effective_cost(n).flops, at) for n in g.nodes())
        assert substitute(total, at) == by_node
        # the crop scope is one batch of w*h views (the batch is in the shapes), run once unless 1x1
        crops_nodes = sum(substitute(g.cost(n).flops, at) for n in g.nodes("vision.crops"))
        assert substitute(g.total("vision.crops").flops, at) == crops_nodes * (1 if w * h > 1 else 0)


def test_scopes_add_up_symbolically():
    g = model.vision_graph(True)
    parts = g.total("vision.global").flops + g.total("vision.crops").flops
    assert sp.simplify(g.total("vision").flops - parts) == 0


def test_crop_branch_is_per_view_cost_times_crops():
    """No effective batch: the crop branch is exactly w*h copies of one view at image_size."""
    g = model.vision_graph(True)
    one_view = model.vision_graph(False).total("vision.global").flops  # a single view at image_size
    crops = g.total("vision.crops").flops.subs({S.w_crop: 2, S.h_crop: 3})
    assert sp.simplify(crops - 6 * one_view) == 0


def test_compiled_equals_substitution_on_every_grid():
    exprs = {s: model.formula(GUNDAM, s, "flops") for s in model.SCOPES}
    compiled = Compiled(exprs)
    grids = all_grids()
    out = compiled(w_crop=np.array([w for w, _ in grids]), h_crop=np.array([h for _, h in grids]))
    for k, (w, h) in enumerate(grids):
        exact = model.layout_totals(GUNDAM, layout_for_grid(w, h, GUNDAM), model.SCOPES, ["flops"])
        assert {s: int(out[s][k]) for s in model.SCOPES} == {s: exact[s]["flops"] for s in model.SCOPES}


def test_general_formula_matches_every_mode():
    general = model.formula(None, "vision", "flops")
    for mode in MODES.values():
        if not mode.crop_mode:
            continue
        at = {**model.mode_values(mode), S.w_crop: 3, S.h_crop: 2}
        assert substitute(general, at) == substitute(model.formula(mode, "vision", "flops"), at)


def test_token_grid_of_graph_matches_token_count():
    from costgraph.graphs.deepseek_ocr.layout import image_tokens
    g = model.vision_graph(True)
    seq = [n for n in g.nodes() if n.endswith("assemble.sequence")][0]
    slots = g.g.nodes[seq]["out_shape"][0]
    for mode in (GUNDAM, MODES["gundam-m"]):
        at = {**model.mode_values(mode)}
        for w, h in all_grids():
            expected = image_tokens(mode, w, h)["total"]
            assert substitute(slots, {**at, S.w_crop: w, S.h_crop: h}) == expected


def test_graph_export_is_json_with_string_expressions():
    import json
    data = json.loads(model.vision_graph(True).dumps())
    node = next(n for n in data["nodes"] if n["id"] == "vision.crops.sam.blocks.3.attn.qkv")
    assert node["kind"] == "linear" and "image_size" in node["cost"]["flops"]
    assert {s["name"] for s in data["scopes"]} == set(model.SCOPES)


def test_compressor_clones_net_2_output_like_the_vendor():
    """SPEC section 4 step 5: the vendor runs `net_3(x2.clone())`, one copy of (B, 512, g/2, g/2) at the
    storage dtype between the two compressor convs (0 FLOPs). Gundam in bf16, 2x3 crops: the global view
    has g = 1024/16 = 64, so 1 x 512 x 32 x 32 x 2 bytes; the crop batch g = 640/16 = 40, so
    6 x 512 x 20 x 20 x 2 bytes; read once and written once."""
    g = model.vision_graph(True)
    at = {**model.mode_values(GUNDAM), **model.dtype_values("bf16"), S.w_crop: 2, S.h_crop: 3}
    for scope, copy_bytes in (("vision.global", 1 * 512 * 32 * 32 * 2), ("vision.crops", 6 * 512 * 20 * 20 * 2)):
        node = f"{scope}.sam.net_2.clone"
        assert g.g.nodes[node]["kind"] == "clone"
        assert list(g.g.predecessors(node)) == [f"{scope}.sam.net_2"]
        assert list(g.g.predecessors(f"{scope}.sam.net_3")) == [node]
        cost = g.cost(node)
        assert {m: substitute(cost[m], at) for m in ("flops", "elementwise_flops", "bytes_read", "bytes_written",
                                                      "activation_bytes")} == \
            {"flops": 0, "elementwise_flops": 0, "bytes_read": copy_bytes, "bytes_written": copy_bytes,
             "activation_bytes": copy_bytes}
