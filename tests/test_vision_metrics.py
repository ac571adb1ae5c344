"""Elementwise FLOPs and bytes of the vision graph against real CPU runs of the reference, node by node.

A small configuration (narrow widths, few layers, the real structure) keeps a run to a second; the
sides are chosen to cover every size-dependent branch: window padding (g = 16 -> 28) and none
(g = 14, 28), one window per side and several, a crop batch (> 1) and the global view (batch 1),
resized position and rel-pos tables (pretraining grid 64) and unresized ones (pretraining grid
matching g), a stitch copy (w_crop > 1) and a stitch view (w_crop == 1), and no crops at all.
The full model is checked by `costgraph verify --device cpu` (see verify/runner.py).
"""
import copy
import re
from dataclasses import replace

import pytest

from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.graphs.deepseek_ocr.config import ClipConfig, Mode, SamConfig, VisionConfig, get_mode
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid, tokens_for
from costgraph.verify import mapping
from costgraph.verify.dispatch import Call, MetricRecorder
from costgraph.verify.preprocess import random_views
from costgraph.verify.reference import build_page_reference
from costgraph.verify.runner import (TORCH_DTYPES, compare_metrics, compare_page, measure_page, predictor, verify_views)

SMALL = VisionConfig(sam=SamConfig(width=32, depth=3, heads=2, mlp_dim=64, global_blocks=(2,), neck_channels=16,
                                   compressor_channels=(24, 32)),
                     clip=ClipConfig(width=32, depth=2, heads=2, mlp_dim=64), projector_out=40)
# Pretraining grids equal to those of 448 views (g = 28, n = 7): no table is resized there.
NATIVE_GRIDS = replace(SMALL, sam=replace(SMALL.sam, pretrain_grid=28), clip=replace(SMALL.clip, pretrain_grid=7))
METRICS = mapping.METRICS


class References(dict):
    """Small page references by (cfg, dtype), built on first use; a bf16 one is a cast copy."""

    def __missing__(self, key):
        cfg, dtype = key
        self[key] = build_page_reference("cpu", cfg=cfg) if dtype == "fp32" else \
            copy.deepcopy(self[(cfg, "fp32")]).to(TORCH_DTYPES[dtype])
        return self[key]


@pytest.fixture(scope="module")
def references():
    return References()


def run(references, cfg, dtype, base, tile, grid):
    mode = Mode(f"test{base}-{tile}", base, tile, True)
    layout = layout_for_grid(*grid, mode)
    comp = verify_views(random_views(mode, layout), references[(cfg, dtype)], metrics=True, dtype=dtype, cfg=cfg)
    return mode, layout, comp


def rows(comp, metric):
    return {r.node: r for r in comp.rows if r.metric == metric}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_padded_global_view_and_crop_batch_match_node_by_node(references, dtype):
    """Global view 256 (g=16: padded to 28, 2x2 windows, tables resized), a batch of six 224 crops
    (g=14: no padding, one window), stitched 2 wide."""
    mode, layout, c = run(references, SMALL, dtype, 256, 224, (2, 3))
    assert c.ok, (c.failures()[:5], c.unclaimed[:5])
    ew, read = rows(c, "elementwise_flops"), rows(c, "bytes_read")
    # every metric node of both views and the assembly was compared, and the branches were taken
    assert {s: sum(1 for n in read if n.startswith(s + ".")) for s in ("vision.global", "vision.crops")} == \
        {s: len(predictor(mode, dtype, SMALL).metric_claims[s]) for s in ("vision.global", "vision.crops")}
    on = lambda n: read[n].measured > 0
    assert on("vision.global.sam.blocks.0.window_partition.pad") and not on("vision.crops.sam.blocks.0.window_partition.pad")
    assert on("vision.global.sam.blocks.0.window_partition") and not on("vision.crops.sam.blocks.0.window_partition")
    assert on("vision.global.sam.blocks.2.attn.rel_pos_h.resize") and on("vision.global.sam.pos_embed.resize")
    assert on("vision.crops.sam.blocks.0.attn.split_heads") and on("vision.crops.sam.blocks.0.attn.merge_heads")
    assert "vision.global.sam.blocks.2.attn.split_heads" not in read  # one sequence: a view, statically
    assert on("vision.assemble.crop_stitch") and on("vision.assemble.sequence")
    assert on("vision.global.sam.pos_embed.to_fp32") == (dtype == "bf16")  # .to(float32) is a no-op at fp32
    assert ew["vision.global.sam.blocks.0.attn.sdpa"].measured > 0
    slots = next(r for r in c.rows if r.metric == "slots")
    assert slots.measured == slots.predicted == tokens_for(layout, mode)["total"]
    subs = {(r.node, r.metric): r for r in c.subtotals}
    for m in METRICS:
        assert subs[("vision", m)].measured == subs[("vision.global", m)].measured + \
            subs[("vision.crops", m)].measured + sum(r.measured for n, r in rows(c, m).items()
                                                     if n.startswith("vision.assemble."))


def test_unpadded_views_without_resizes_and_a_single_column(references):
    """Pretraining grids equal to the views' (no resize anywhere), g = 28 (2x2 windows, no padding),
    crops in a single column (the stitch is a view)."""
    _, _, c = run(references, NATIVE_GRIDS, "fp32", 448, 448, (1, 2))
    assert c.ok, (c.failures()[:5], c.unclaimed[:5])
    read = rows(c, "bytes_read")
    assert all(read[n].measured == 0 for n in read if n.endswith(".resize") or n.endswith("to_fp32"))
    assert read["vision.assemble.crop_stitch"].measured == 0 < read["vision.crops.sam.blocks.0.window_partition"].measured
    assert read["vision.crops.sam.blocks.0.window_partition.pad"].measured == 0


def test_no_crops_and_bf16_casts(references):
    """A page within 640x640 in crop mode: only the global view and its assembly run."""
    _, layout, c = run(references, NATIVE_GRIDS, "bf16", 320, 224, (1, 1))
    assert c.ok and not layout.tiled
    read = rows(c, "bytes_read")
    assert all(r.measured == r.predicted == 0 for n, r in read.items() if n.startswith("vision.crops."))
    assert read["vision.global.sam.pos_embed.to_fp32"].measured > 0  # g = 20 != 28: resized in fp32


def test_compressor_clone_is_measured_like_the_vendor(references):
    """The vendor's `net_3(x2.clone())` (SPEC section 4 step 5) runs in the reference (costgraph.verify.reference
    item 7) as one aten.clone in `proj`, matched by the graph's `sam.net_2.clone` node. Sizes by hand
    (SMALL: net_2 gives 24 channels at half the grid): the global view 256 -> g = 16 -> 24 x 8 x 8,
    the six 224 crops -> g = 14 -> 6 x 24 x 7 x 7; 4 bytes each in fp32."""
    _, _, c = run(references, SMALL, "fp32", 256, 224, (2, 3))
    assert c.ok, (c.failures()[:5], c.unclaimed[:5])
    for scope, copy_bytes in (("vision.global", 24 * 8 * 8 * 4), ("vision.crops", 6 * 24 * 7 * 7 * 4)):
        node = f"{scope}.sam.net_2.clone"
        got = {m: rows(c, m)[node] for m in METRICS}
        assert {m: (r.predicted, r.measured) for m, r in got.items()} == \
            {"elementwise_flops": (0, 0), "bytes_read": (copy_bytes, copy_bytes),
             "bytes_written": (copy_bytes, copy_bytes)}
        assert got["bytes_read"].reference == "encoder.sam.proj call=clone op=clone"


def test_failures_are_caught(references):
    """A missing op reads 0 against a prediction; a measured op nobody claims fails; a rule that
    claims one op twice raises."""
    mode = Mode("test256-224", 256, 224, True)
    views = random_views(mode, layout_for_grid(2, 1, mode))
    rec = MetricRecorder()
    measured, seq = measure_page(views, references[(SMALL, "fp32")], rec)
    target = "encoder.sam.layers.1.attn.rel_pos"
    renamed = [Call(c.section, c.module + "_renamed" if c.module == target and c.op == "add" else c.module,
                    *(getattr(c, f) for f in ("call", "op", "elementwise_flops", "bytes_read", "bytes_written",
                                              "out_shapes", "in_shapes")))
               for c in rec.calls]
    comp = compare_page(views, measured, int(seq.shape[0]), calls=renamed, dtype="fp32", cfg=SMALL)
    bad = {(r.node, r.metric): r.status for r in comp.failures()}
    assert bad == {(f"vision.{s}.sam.blocks.1.attn.rel_pos_mask", m): "measured-zero"
                   for s in ("global", "crops") for m in METRICS}
    assert len(comp.unclaimed) == 2 and not comp.ok
    p = predictor(mode, "fp32", SMALL)
    node = "vision.global.sam.blocks.1.attn.rel_pos_mask"
    p.metric_claims["vision.global"]["vision.global.sam.blocks.1.attn.proj"] = p.metric_claims["vision.global"][node]
    try:
        with pytest.raises(ValueError, match="claimed by"):
            compare_metrics(p, p(views.layout, metrics=True), rec.calls)
    finally:
        p._metrics = None  # rebuild the claims on next use


def test_every_metric_rule_is_used_and_its_modules_exist():
    """A renamed module in the reference or a renamed node in the graph makes this fail."""
    modules = dict(build_page_reference("meta").named_modules())
    used = set()
    for crop_mode in (True, False):
        g = model.vision_graph(crop_mode)
        for scope in [s for s in model.SCOPES if s in g.scopes]:
            for node, claims in mapping.metric_claims(g, scope).items():
                assert all(c.module in modules for c in claims), (node, claims)
                used |= {p for p, _ in mapping.METRIC_RULES if re.fullmatch(p, g.g.nodes[node]["path"])}
    assert used == {p for p, _ in mapping.METRIC_RULES}, "a rule no node uses"


# Measured on the full model: `costgraph verify --image graphs/samples/a4_page.png --device cpu --scope vision
# --metrics flops,elementwise_flops,bytes --dtype bf16|fp32` (gundam, 2x3 crops of 640 + the 1024 global view),
# every node exact; pinned here so that the symbolic formulas keep producing them without the minutes-long run.
# Two changes since that run, each added to the measured figure:
# - the vendor's compressor clone (SPEC section 4 step 5), read once and written once: 1 x 512 x 32 x 32 (global)
#   and 6 x 512 x 20 x 20 (crops) elements, e.g. bf16 global 5_523_837_192 + 1_048_576 = 5_524_885_768;
# - bytes_read under the gather rule (conventions.gather_bytes_read): the change of the 25 gathers each view batch
#   runs, recorded from the full-size reference on `meta` (bytes depend on shapes only): +4,410,368 global /
#   +1,903,616 crops at bf16, twice that at fp32 (the SAM rel-pos lookups take s x s rows of a 2s - 1 row table:
#   2 x (8 x 169 + 4 x (s^2 - (2s - 1))) x 64 x dtype_bytes, s = 64 global, 40 crops).
A4_MEASURED = {
    "bf16": {"vision.global": (8_286_156_608, 5_524_885_768 + 4_410_368, 4_324_629_956),
             "vision.crops": (9_913_414_848, 9_479_648_520 + 1_903_616, 7_753_267_960)},
    "fp32": {"vision.global": (8_286_156_608, 11_049_177_352 + 8_820_736, 8_645_605_000),
             "vision.crops": (9_913_414_848, 18_920_270_600 + 3_807_232, 15_460_673_264)},
}


def test_rel_pos_and_position_lookups_read_the_rows_they_gather():
    """A gather reads its index and the rows it takes, repeats counted: SAM's rel-pos lookup takes s x s
    rows of head_dim 64 from a (2s - 1)-row table (more than the table), CLIP's position lookup each of
    its 257 rows once. Full-size gundam views at bf16; the old rule (table + index) gives other numbers
    for SAM's."""
    from costgraph.evaluate import substitute

    g = model.vision_graph(True)
    at = {**model.mode_values(get_mode("gundam")), S.dtype_bytes: 2}
    read = lambda n: substitute(g.cost(n).bytes_read, at)
    for scope, s in (("global", 1024 // 16), ("crops", 640 // 16)):
        assert read(f"vision.{scope}.sam.blocks.2.attn.rel_pos_h.gather") == s * s * 8 + s * s * 64 * 2  # global block
        assert read(f"vision.{scope}.sam.blocks.0.attn.rel_pos_w.gather") == 14 * 14 * 8 + 14 * 14 * 64 * 2  # window
        assert read(f"vision.{scope}.clip.embeddings.position_embedding.lookup") == 257 * 8 + 257 * 1024 * 2


def test_symbolic_formulas_give_the_full_size_measurements():
    """One expression per metric and scope, symbolic in the sides, patch size and dtype, gives the
    full-size page's measured numbers once substituted."""
    gundam = get_mode("gundam")
    layout = layout_for_grid(2, 3, gundam)
    general = model.formula(None, "vision.global", "bytes_read")
    assert {S.base_size, S.patch_size, S.dtype_bytes} <= general.free_symbols
    for dtype, scopes in A4_MEASURED.items():
        got = model.layout_totals(gundam, layout, list(scopes), list(METRICS), dtype=dtype)
        assert {s: tuple(got[s][m] for m in METRICS) for s in scopes} == scopes
