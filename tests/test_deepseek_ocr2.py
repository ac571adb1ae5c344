"""DeepSeek-OCR 2 (`--model deepseek-ocr-2`): the layout against the processor's own functions, the graph
against `transformers`' DeepseekOcr2ForConditionalGeneration node by node at small sizes (vision FLOPs on
meta; the whole page, vision and language model, every metric on CPU in bf16), the released parameter count,
and the commands. Full-size runs are `costgraph --model deepseek-ocr-2 verify` (see the README)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from costgraph.graphs.deepseek_ocr.config import LMConfig, SamConfig
from costgraph.graphs.deepseek_ocr2 import MODEL, RELEASED_PARAMETERS, assembly, layout as L
from costgraph.graphs.deepseek_ocr2.config import EncoderConfig, VisionConfig

MODE = MODEL.get_mode("default")
SMALL_V = VisionConfig(sam=SamConfig(width=48, depth=3, heads=2, mlp_dim=192, global_blocks=(1,), neck_channels=24,
                                     compressor_channels=(32, 40)),
                       encoder=EncoderConfig(width=40, depth=2, heads=4, kv_heads=2, mlp_dim=56), projector_out=64)
SMALL_LM = LMConfig(hidden=64, layers=2, heads=4, head_dim=16, vocab=512, dense_layers=1, dense_intermediate=96,
                    routed_experts=8, experts_per_token=2, moe_intermediate=32, shared_experts=2)


def test_layout_acceptance(cli):
    code, out, _ = cli("--model", "deepseek-ocr-2", "layout", "--size", "1024x1024", "--size", "700x500", "--json")
    assert code == 0
    a, b = json.loads(out)
    assert (a["w_crop"], a["h_crop"], a["num_crops"], a["image_tokens"]) == (2, 2, 4, 833)
    assert (b["tiled"], b["num_crops"], b["image_tokens"]) == (False, 0, 257)


def test_layout_follows_the_processor():
    """The grid and crop count of the processor's own functions (the torchvision processor's logic: crops only
    when the longest side exceeds 768), on random pages and on the boundaries."""
    from transformers.models.deepseek_ocr2 import image_processing_pil_deepseek_ocr2 as P

    assert L.candidate_grids(2, 6) == list(P.get_all_supported_aspect_ratios(2, 6))
    rng = np.random.default_rng(0)
    sizes = [(768, 768), (769, 768), (768, 769), (100, 769), (4000, 600), (1357, 1357), (1920, 1080)] + \
        [tuple(int(x) for x in rng.integers(50, 5000, 2)) for _ in range(300)]
    w, h = np.array(sizes).T
    got = L.layouts_for(w, h, MODE)
    for k, (pw, ph) in enumerate(sizes):
        if max(pw, ph) > 768:
            want = P.get_optimal_tiled_canvas((ph, pw), (768, 768), 2, 6)
            assert (got.w_crop[k], got.h_crop[k], got.num_crops[k]) == (*want, want[0] * want[1]), (pw, ph)
        else:
            assert got.num_crops[k] == 0 and not got.tiled[k]


def test_bad_pages():
    with pytest.raises(ValueError, match="too elongated"):
        L.layout_for(1, 5000, MODE)
    with pytest.raises(ValueError, match="--what-if"):
        L.check_grid((3, 3), MODE)


def _small_reference(device, dtype):
    from costgraph.verify import deepseek_ocr2 as V
    return V, V.build_reference(device, dtype, SMALL_V, SMALL_LM)


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (6, 1)])
def test_vision_flops_node_by_node_on_meta(grid):
    V, model = _small_reference("meta", torch.bfloat16)
    lay = L.layout_for_grid(*grid, MODE)
    g, loc = V.synthetic_inputs(lay, "meta", torch.bfloat16)
    c = V.verify_vision_case(model, lay, g, loc, metrics=False, dtype=torch.bfloat16, device="meta", cfg=SMALL_V)
    assert c.ok, c.failures()[:5] + c.unclaimed[:5]
    assert c.nodes_compared >= 40


def test_whole_page_every_metric_on_cpu():
    """Vision node by node, the language model group by group (prefill + 2 decode forwards), e2e, KV cache."""
    V, model = _small_reference("cpu", torch.bfloat16)
    lay = L.layout_for_grid(2, 1, MODE)
    g, loc = V.synthetic_inputs(lay, "cpu")
    c = V.verify_page(model, lay, g, loc, text_tokens=5, decode_steps=2, lm_head="last", lm=SMALL_LM, cfg=SMALL_V)
    assert c.ok, c.failures()[:5] + c.unclaimed[:5]
    metrics = {r.metric for r in c.rows + c.subtotals}
    assert {"flops", "elementwise_flops", "bytes_read", "bytes_written", "kv_cache_bytes"} <= metrics
    assert (c.info["image_tokens"], c.info["prompt_tokens"]) == (144 * 2 + 256 + 1, 1 + 545 + 5)


def test_released_parameters():
    from costgraph.verify import deepseek_ocr2 as V
    c = V.compare_params()
    assert c.ok, c.failures()
    assert {r.measured for r in c.rows if r.node in ("params", "params (release)")} == {RELEASED_PARAMETERS}


def test_closed_form_vision_flops():
    """The vision FLOPs per crop equal the crop scope of a 2x1 page over its two crops (the graph's own
    structure), and the whole-page form is linear in the crops."""
    f = {n: MODEL.formula(MODE, "vision", "flops", MODEL.variants()).subs({L.S.w_crop: n, L.S.h_crop: 1})
         for n in (1, 2, 3)}
    assert f[3] - f[2] == f[2] - f[1] - (f[2] - f[1] - (f[3] - f[2]))
    per_crop = assembly.formula("vision.crops", "flops").subs({L.S.w_crop: 2, L.S.h_crop: 1}) / 2
    assert f[3] - f[2] == per_crop


def test_compare(cli, tmp_path):
    code, out, _ = cli("compare", "--size", "1024x1024", "--size", "700x500", "--json",
                       "--plot", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 1000
    recs = {(r["page"], r["model"]): r for r in json.loads(out)["pages"]}
    assert recs[("1024x1024", "deepseek-ocr-2")]["image_tokens"] == 833
    assert recs[("1024x1024", "deepseek-ocr")]["image_tokens"] == 693
    assert recs[("700x500", "deepseek-ocr-2")]["valid_tokens"] is None
    assert recs[("700x500", "deepseek-ocr-2")]["flops"]["e2e"] > recs[("700x500", "deepseek-ocr-2")]["flops"]["vision"]


@pytest.mark.parametrize("argv", [("--models", "deepseek-ocr,nope", "--size", "800x600"),
                                  ("--size", "0x600"), ("--models", "vit,deepseek-ocr", "--size", "800x600")])
def test_compare_bad_input(cli, argv):
    code, out, err = cli("compare", *argv)
    assert code == 2 and "error" in err and "Traceback" not in err
