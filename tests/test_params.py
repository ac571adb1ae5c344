"""Parameters: resident (the checkpoint) equals the reference's parameter count, built on `meta`;
weights shared by branches and forwards are counted once; active parameters per token."""
import pytest
import sympy as sp
import torch

from costgraph import params as P
from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr.config import LM, LMConfig, VISION
from costgraph.graphs.deepseek_ocr.decoder import decoder_graph

SMALL = LMConfig(hidden=64, layers=3, heads=4, head_dim=16, vocab=101, dense_intermediate=96,
                 routed_experts=8, experts_per_token=3, moe_intermediate=24, shared_experts=2)


def num(e) -> int:
    """A parameter count: the SAM patch embedding's is in the (symbolic) patch size; the checkpoint's is 16."""
    return int(sp.sympify(e).subs(S.patch_size, VISION.patch_size))


def reference_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lm_reference_count(cfg: LMConfig) -> int:
    from costgraph.verify.lm_reference import LanguageModel

    with torch.device("meta"):
        return reference_count(LanguageModel(cfg))


@pytest.fixture(scope="module")
def page_reference():
    from costgraph.verify.reference import build_page_reference

    return build_page_reference("meta")


def test_vision_resident_equals_reference(page_reference):
    g = model.vision_graph(True)
    assert num(P.resident(g).params) == reference_count(page_reference) == 401_372_160
    # native modes (one view) store the same weights
    assert num(P.resident(model.vision_graph(False)).params) == reference_count(page_reference)


def test_clip_conv_patch_embedding_is_resident_not_executed(page_reference):
    g = model.vision_graph(True)
    conv = VISION.clip.width * 3 * VISION.clip.patch_size ** 2   # 3 -> 1024, k=14, no bias
    assert P.unexecuted(g) == {"clip.embeddings.patch_embedding": conv}
    assert reference_count(page_reference.encoder.clip.patch_embedding) == conv
    assert num(P.executed(g, "vision").params) == num(P.resident(g).params) - conv


def test_vision_parts_match_reference_modules(page_reference):
    g = model.vision_graph(True)
    by = lambda prefix: num(sum(w.count for n, w in P.per_node(g, "vision.global").items()
                                if g.g.nodes[n]["path"].startswith(prefix)))
    enc = page_reference.encoder
    assert by("sam.") == reference_count(enc.sam)
    assert by("clip.") == reference_count(enc.clip)   # its unused conv patch embedding included
    assert by("projector") == reference_count(enc.projector)


def test_global_and_crop_branches_share_weights():
    g = model.vision_graph(True)
    glob, crops, vision = (P.executed(g, s) for s in ("vision.global", "vision.crops", "vision"))
    assert glob.params == crops.params > 0
    # the two branches run the same SAM/CLIP/projector modules: once, plus the assembly's two vectors
    assert vision.params == glob.params + 2 * VISION.projector_out
    # per-node weights do not scale with the crop count (they are not a Cost)
    node = "vision.crops.sam.blocks.0.attn.qkv"
    assert g.g.nodes[node]["weights"].count == 768 * 2304 + 2304
    assert not g.effective_cost(node).flops.free_symbols.isdisjoint({S.w_crop, S.h_crop})


def test_stored_table_sizes_not_gathered_ones():
    g = model.vision_graph(True)
    w = lambda n: g.g.nodes[n]["weights"].count
    assert w("vision.global.sam.blocks.0.attn.rel_pos_h") == (2 * 14 - 1) * 64      # window block
    assert w("vision.global.sam.blocks.2.attn.rel_pos_h") == (2 * 64 - 1) * 64      # global block, 64x64 table
    assert w("vision.crops.sam.blocks.2.attn.rel_pos_w") == (2 * 64 - 1) * 64       # resized when used: stored 127
    assert w("vision.global.sam.pos_embed") == 64 * 64 * 768
    assert w("vision.global.clip.embeddings.position_embedding") == 257 * 1024


def test_small_lm_resident_equals_reference():
    g = decoder_graph(SMALL)
    assert P.resident(g).params == lm_reference_count(SMALL)
    # prefill and decode run the same weights: counted once
    assert P.executed(g, "decoder.prefill").params == P.executed(g, "decoder.decode").params \
        == P.executed(g, "decoder").params == P.resident(g).params


def test_full_lm_resident_equals_reference_on_meta():
    g = model.model_graph(True)
    assert P.resident(g, "decoder").params == lm_reference_count(LM) == 2_934_734_080


def test_whole_checkpoint():
    g = model.model_graph(True)
    assert num(P.resident(g).params) == 401_372_160 + 2_934_734_080


def test_active_params_per_token():
    for cfg in (SMALL, LM):
        g = decoder_graph(cfg)
        t = P.executed(g, "decoder.decode")
        routed = 3 * cfg.hidden * cfg.moe_intermediate * cfg.routed_experts * (cfg.layers - cfg.dense_layers)
        idle = routed * (cfg.routed_experts - cfg.experts_per_token) // cfg.routed_experts
        embedding_rows_unused = (cfg.vocab - 1) * cfg.hidden
        assert t.active == t.params - idle - embedding_rows_unused
    # published "570M active": ours without the one embedding row
    assert t.active - LM.hidden == 574_127_360


def test_weight_bytes_follow_dtype_and_fp32_router():
    g = decoder_graph(SMALL)
    t = P.resident(g)
    router = (SMALL.layers - SMALL.dense_layers) * SMALL.routed_experts * SMALL.hidden
    assert sp.expand(t.weight_bytes - (t.params - router) * S.dtype_bytes - 4 * router) == 0
