"""Verification: the graph against profiled runs of the reference, node by node, exactly."""
import json
import re

import pytest
import torch

from costgraph.graph import CostGraph
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr import vision
from costgraph.graphs.deepseek_ocr.config import MODES, ClipConfig, SamConfig, VisionConfig
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid, tokens_for
from costgraph.verify import mapping
from costgraph.verify.compare import Row
from costgraph.verify.preprocess import meta_views, views_from_file
from costgraph.verify.profile import COMPUTE_OP, count_views
from costgraph.verify.reference import DeepSeekOCRVision, build_page_reference
from costgraph.verify.runner import SEQUENCE_NODE, compare_page, measure_page, verify_views

GUNDAM = MODES["gundam"]
PER_VIEW_COSTED = 210  # SAM 1 + 12*7 + 4 convs, CLIP 24*5, projector 1


@pytest.mark.parametrize("mode,w,h", [("gundam", 1, 1), ("gundam", 2, 3), ("gundam", 1, 9), ("gundam", 3, 3),
                                      ("tiny", 1, 1)])
def test_meta_page_matches_graph_node_by_node(mode, w, h):
    m = MODES[mode]
    layout = layout_for_grid(w, h, m)
    c = verify_views(meta_views(m, layout))
    assert c.ok, c.failures()[:5]
    views = 2 if m.crop_mode else 1
    assert c.nodes_compared == views * PER_VIEW_COSTED + 1  # + the slot count of the assembled sequence
    slots = next(r for r in c.rows if r.node == SEQUENCE_NODE)
    assert slots.measured == slots.predicted == tokens_for(layout, m)["total"]
    totals = {r.node: r.measured for r in c.subtotals}
    assert totals["vision"] == model.layout_totals(m, layout, ["vision"], ["flops"])["vision"]["flops"] > 0
    if m.crop_mode:
        crop_rows = [r for r in c.rows if r.node.startswith("vision.crops.") and r.metric == "flops"]
        assert all(r.measured > 0 for r in crop_rows) == layout.tiled
        assert totals["vision.crops"] == (count_views(640, w * h).get_total_flops() if layout.tiled else 0)


def test_a4_slots_are_903():
    c = verify_views(views_from_file("graphs/samples/a4_page.png", GUNDAM).to("meta"))
    assert c.ok and c.info["layout"]["num_crops"] == 6
    assert next(r for r in c.rows if r.node == SEQUENCE_NODE).measured == 903


def test_attribution_loses_nothing():
    """The per (module, call, op) records add up to FlopCounterMode's own total."""
    fc = count_views(512, 1)
    assert sum(fc.records.values()) == fc.get_total_flops() > 0
    calls = {k[2] for k in fc.records}
    assert {"linear", "conv2d", "scaled_dot_product_attention", "einsum:bhwc,hkc->bhwk",
            "einsum:bhwc,wkc->bhwk"} <= calls


# ---- the mapping ------------------------------------------------------------------------

def test_every_costed_node_maps_to_existing_modules():
    """A renamed module (in the reference or the graph) makes this fail."""
    modules = dict(build_page_reference("meta").named_modules())
    used_rules = set()
    for crop_mode in (True, False):
        g = model.vision_graph(crop_mode)
        for scope in [s for s in model.SCOPES if s in g.scopes and s != "vision"]:
            claims = mapping.node_claims(g, scope)
            assert len(claims) == PER_VIEW_COSTED
            seen = set()
            for node, cs in claims.items():
                for c in cs:
                    assert c.module in modules, f"{node} claims missing module {c.module}"
                    assert (c.module, c.call) not in seen, f"{c} claimed twice"
                    seen.add((c.module, c.call))
                path = g.g.nodes[node]["path"]
                used_rules |= {p for p, _ in mapping.RULES if re.fullmatch(p, path)}
    assert used_rules == {p for p, _ in mapping.RULES}, "a rule no node uses"


def test_flopless_nodes_need_no_flop_claim_and_costed_ones_do():
    g = model.vision_graph(True)
    node = "vision.global.sam.blocks.0.norm1"
    assert not mapping.has_cost(g, node) and mapping.has_metrics(g, node)
    # the vendor's fused CLIP qkv projection (the reference runs it fused too)
    assert mapping.claims_for("clip.transformer.layers.7.self_attn.qkv_proj") == (
        mapping.Claim("encoder.clip.encoder.layers.7.self_attn.qkv_proj", "linear"),)
    with pytest.raises(KeyError):
        mapping.claims_for("sam.blocks.0.attn.qkv_renamed")


def test_every_counted_flop_is_claimed():
    views = meta_views(GUNDAM, layout_for_grid(2, 3, GUNDAM))
    measured, _ = measure_page(views)
    c = compare_page(views, measured, 0)
    assert not c.unclaimed and not c.blind
    claimed = {(s, cl.module, cl.call) for s in ("vision.global", "vision.crops")
               for cls in mapping.node_claims(model.vision_graph(True), s).values() for cl in cls}
    counted = {k[:3] for k, n in measured.records.items() if n}
    assert counted == claimed


def test_comparison_failure_modes():
    """Renaming a measured module: its node reads 0 (fails) and the renamed op is unclaimed (fails)."""
    views = meta_views(GUNDAM, layout_for_grid(2, 3, GUNDAM))
    measured, seq = measure_page(views)
    target = "encoder.sam.layers.3.attn.qkv"
    measured.records = {(k[0], k[1] + "_renamed" if k[1] == target else k[1], *k[2:]): n
                        for k, n in measured.records.items()}
    c = compare_page(views, measured, int(seq.shape[0]))
    bad = {r.node: r.status for r in c.failures()}
    assert bad == {"vision.global.sam.blocks.3.attn.qkv": "measured-zero",
                   "vision.crops.sam.blocks.3.attn.qkv": "measured-zero"}
    assert len(c.unclaimed) == 2 and not c.ok
    assert Row("x", "flops", 5, 7).status == "mismatch" and Row("x", "flops", 0, 0).ok
    assert COMPUTE_OP.fullmatch("aten._scaled_dot_product_flash_attention_for_cpu")
    assert not COMPUTE_OP.fullmatch("aten.upsample_linear1d")


# ---- a real CPU run (small widths, the real structure and preprocessing) ------------------------

SMALL = VisionConfig(sam=SamConfig(width=48, depth=3, heads=3, mlp_dim=96, global_blocks=(2,), neck_channels=16,
                                   compressor_channels=(24, 32)),
                     clip=ClipConfig(width=32, depth=2, heads=2, mlp_dim=64), projector_out=40)


def test_cpu_forward_counts_attention_and_matches_graph():
    """Real pixels through Pillow, a real CPU forward: SDPA runs the fused CPU kernel, which
    torch alone counts as 0; with our formula every node matches the graph exactly."""
    mode = MODES["tiny"]
    views = views_from_file("graphs/samples/small_note.png", mode)
    torch.manual_seed(0)
    ref = DeepSeekOCRVision(SMALL).eval()
    measured, seq = measure_page(views, ref)
    ops = {k[3] for k in measured.records}
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops and not measured.blind_spots()
    assert torch.isfinite(seq).all() and seq.shape == (tokens_for(views.layout, mode)["total"], 40)

    g = CostGraph("small")
    g.scope("vision")
    vision.view(g.scope("vision.global"), mode.image_size, patch=16, cfg=SMALL)
    claims = mapping.node_claims(g, "vision.global")
    claimed = set()
    for node, cs in claims.items():
        keys = {("vision.global", c.module, c.call) for c in cs}
        claimed |= keys
        got = sum(n for k, n in measured.records.items() if k[:3] in keys)
        assert got == int(g.cost(node).flops) > 0, node
    assert {k[:3] for k, n in measured.records.items() if n} == claimed


# ---- the command line --------------------------------------------------------------------

def test_cli_json_and_markdown_report(cli, tmp_path):
    out = tmp_path / "verify.md"
    code, text, _ = cli("verify", "--grid", "2x3", "--json", "--report", str(out))
    data = json.loads(text)
    assert code == 0 and data["ok"] and data["nodes_compared"] == 2 * PER_VIEW_COSTED + 1
    sub = {r["node"]: r for r in data["results"][0]["subtotals"]}
    assert sub["vision.crops"]["measured"] == count_views(640, 6).get_total_flops()
    text = out.read_text()
    assert text.startswith("# costgraph verify") and "**PASS**" in text and "| vision.crops | flops |" in text


def test_cli_exit_1_and_failing_rows_on_mismatch(cli, monkeypatch):
    import costgraph.verify.runner as runner

    real = runner.measure_page

    def skewed(views, model=None):
        measured, seq = real(views, model)
        key = next(k for k in measured.records if k[1] == "encoder.projector")
        measured.records[key] += 2
        return measured, seq

    monkeypatch.setattr(runner, "measure_page", skewed)
    code, out, _ = cli("verify", "--grid", "1x1")
    assert code == 1 and "FAIL" in out and "vision.global.projector" in out and "mismatch" in out
