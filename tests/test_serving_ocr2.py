"""Serving DeepSeek-OCR 2 (`costgraph serve --model deepseek-ocr-2`, `costgraph dataset --model ...`): its
batched language model is the per-page graph at B = 1 and equals batched runs of `transformers`' model
exactly (every metric, a small config on CPU); the commands' outputs for it; bad input; and DeepSeek-OCR's
serving outputs unchanged by the model-generic simulation (the text written by the code before it, in
tests/golden/). No timing is asserted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sympy as sp
import torch

from costgraph import symbols as ES
from costgraph.evaluate import substitute
from costgraph.graphs.deepseek_ocr2 import MODEL, RELEASED_PARAMETERS, assembly, layout as L
from costgraph.graphs.deepseek_ocr2 import symbols as S
from costgraph.graphs.deepseek_ocr2.serving import ENGINES, SERVED

GOLDEN = Path(__file__).parent / "golden"
MODE = MODEL.get_mode("default")
OCR2 = ("--model", "deepseek-ocr-2")


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_batch_one_is_the_per_page_graph(engine):
    """The batched LM with symbolic B, at B = 1: node by node the language model of the whole per-page graph
    (`model_graph`, vision output wired in), whose only extra node here is the image-features input (free)."""
    variants = ENGINES[engine].variants
    one = assembly.model_graph(variants)
    sym = assembly.lm_graph(variants, batch=ES.batch)
    lm_nodes = [n for n in one.g.nodes if n.startswith("decoder.")]
    assert [n for n in sym.g.nodes if n != "decoder.prefill.image_features"] == lm_nodes
    assert sym.cost("decoder.prefill.image_features").flops == 0
    for n in lm_nodes:
        a, b = one.cost(n), sym.cost(n)
        for m in ("flops", "elementwise_flops", "bytes_read", "bytes_written", "activation_bytes"):
            assert sp.expand(b[m].subs(ES.batch, 1) - a[m]) == 0, (n, m)
    values = {S.w_crop: 2, S.h_crop: 3, ES.text_tokens: 10, ES.output_tokens: 50, ES.dtype_bytes: 2, ES.batch: 1}
    for scope in ("decoder.prefill", "decoder.decode"):
        for m in ("flops", "bytes_read"):
            assert substitute(sym.total(scope)[m], values) == substitute(one.total(scope)[m], values) > 0


def test_batch_shares_the_weights():
    """B sequences of a decode step: the q projection's FLOPs B times, its weight read once."""
    g = SERVED.batched_graph(MODE, "vllm")
    node = "decoder.decode.layers.3.self_attn.q_proj"
    values = {S.w_crop: 2, S.h_crop: 3, ES.text_tokens: 10, ES.dtype_bytes: 2, ES.decode_step: 5}
    at = lambda b, m: substitute(g.cost(node)[m], {**values, ES.batch: b})
    w = 1280 * 1280 * 2
    assert at(8, "flops") == 8 * at(1, "flops") and at(8, "bytes_read") - w == 8 * (at(1, "bytes_read") - w)


def test_batched_lm_exact(grid=(1, 1), batch=2):
    """B copies of a page through transformers' DeepseekOcr2ForConditionalGeneration together (small sizes,
    bf16, CPU): prefill and two decode forwards, every metric of every node group, the totals and the KV cache,
    against the batched graph serving runs (the hf engine's; vLLM's flash attention has no CPU reference)."""
    from costgraph.verify import deepseek_ocr2 as V
    from test_deepseek_ocr2 import SMALL_LM, SMALL_V

    model = V.build_reference("cpu", torch.bfloat16, SMALL_V, SMALL_LM)
    lay = L.layout_for_grid(*grid, MODE)
    g, loc = V.synthetic_inputs(lay, "cpu")
    c = V.verify_lm_batch(model, lay, g, loc, batch=batch, text_tokens=5, decode_steps=2, lm=SMALL_LM)
    assert c.ok and not c.unclaimed and not c.blind, c.failures()[:5]
    subs = {(r.node, r.metric): r for r in c.subtotals}
    for m in ("flops", "elementwise_flops", "bytes_read", "bytes_written"):
        for scope in ("decoder.prefill", "decoder.decode"):
            assert subs[(scope, m)].measured > 0 and subs[(scope, m)].predicted == subs[(scope, m)].measured
    kv = subs[("decoder.decode[t=2].kv_cache", "kv_cache_bytes")]
    assert kv.measured == kv.predicted == batch * (c.info["prompt_tokens"] + 2) * SMALL_LM.kv_values_per_token * 2


# ---- commands ------------------------------------------------------------------------------------------

def test_serve_json(cli):
    code, out, _ = cli("serve", *OCR2, "--size", "1654x2339", "--output-tokens", "200", "--hardware", "a100-40gb",
                       "--pages", "60", "--json")
    assert code == 0
    rec = json.loads(out)
    assert rec["model"] == "deepseek-ocr-2" and rec["mode"] == "default" and rec["pages"] == 60
    assert rec["engine"]["engine"] == "vllm" and rec["engine"]["max_num"] == 6 and rec["engine"]["attention"] == "flash"
    assert rec["pages_per_day"] > 0 and rec["pages_per_day"] == pytest.approx(86400 * rec["pages_per_second"])
    m = rec["memory"]
    # the release's parameters in bf16, the routers' (11 MoE layers x 64 x 1280) kept in fp32
    assert m["weight_bytes"] == 2 * RELEASED_PARAMETERS + 2 * 11 * 64 * 1280
    assert m["kv_bytes_per_token"] == 61_440                    # SPEC section 8 (the same LM)
    assert m["activation_bytes"] > 0 and m["kv_blocks"] > 0 and m["kv_block_tokens"] == 256
    assert rec["paper"] is None and rec["compared_with_paper"] is None     # nothing published for OCR 2
    assert "batch" in rec["decode_step_formulas"]["bytes_read"]


def test_serve_text_hf(cli):
    code, out, _ = cli("serve", *OCR2, "--size", "1654x2339", "--output-tokens", "100", "--pages", "20",
                       "--engine", "hf")
    assert code == 0
    assert out.startswith("model deepseek-ocr-2; engine hf (transformers generate") and "mode default" in out
    assert "no published throughput" in out and "paper" not in out and "claim" not in out


def test_dataset(cli, tmp_path):
    src = tmp_path / "pages.csv"
    src.write_text("file,width,height,output_tokens\na,1654,2339,300\nb,640,480,100\n")
    code, out, _ = cli("dataset", *OCR2, "--csv", str(src), "--json")
    assert code == 0
    rec = json.loads(out)
    a, b = rec["pages"]
    assert rec["model"] == "deepseek-ocr-2" and (a["grid"], b["grid"]) == ("2x3", "none")
    assert (a["image_tokens"], b["image_tokens"]) == (256 + 144 * 6 + 1, 256 + 1)
    assert a["prompt_tokens"] == 1 + 10 + 1121 and rec["total"]["served_pages_per_day"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["serve", "--model", "nope", "--size", "1654x2339"], "unknown model 'nope'"),
    (["serve", "--model", "vit", "--size", "1654x2339"], "vit has no serving model"),
    (["dataset", "--model", "vit", "--size", "1654x2339"], "vit has no serving model"),
    (["serve", *OCR2, "--mode", "gundam", "--size", "1654x2339"], "unknown mode 'gundam' (choose from default)"),
    (["dataset", *OCR2, "--mode", "tiny", "--size", "1654x2339"], "unknown mode 'tiny'"),
    (["serve", *OCR2, "--size", "0x2339"], "positive"),
    (["serve", *OCR2, "--size", "1654x2339", "--output-tokens", "8000"], "positions"),
    (["serve", *OCR2, "--size", "1654x2339", "--max-model-len", "9000"], "max_model_len"),
    (["serve", *OCR2, "--size", "1654x2339", "--engine", "sglang"], "invalid choice"),
])
def test_bad_input(cli, argv, msg):
    code, out, err = cli(*argv)
    assert code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,argv", [
    ("serve_vllm", ["serve", "--size", "1654x2339,640x480", "--output-tokens", "200", "--pages", "40", "--engine",
                    "vllm"]),
    ("dataset_hf", ["dataset", "--csv", "{csv}", "--hardware", "l4", "--engine", "hf"]),   # hf: static batches
])
def test_deepseek_ocr_unchanged(cli, tmp_path, name, argv):
    """DeepSeek-OCR's outputs (the default model) are the text the code wrote before serving became generic."""
    src = tmp_path / "g.csv"
    src.write_text("file,width,height,output_tokens\na,1654,2339,300\nb,640,480,100\nc,600,4000,50\n")
    code, out, _ = cli(*[a.format(csv=src) for a in argv])
    assert code == 0 and out == (GOLDEN / f"deepseek_ocr_{name}.txt").read_text()
    if name == "dataset_hf":   # naming the default model changes nothing
        assert cli(*[a.format(csv=src) for a in argv], "--model", "deepseek-ocr")[1] == out
