"""Serving: batches of pages (B = 1 is the per-page graph exactly; batched FLOPs, bytes, KV cache and kernel
counts exact against batched reference runs of a small LM), the vLLM graph, the time model's structure, the
continuous-batching simulator on schedules worked out by hand, and the serve / dataset / calibrate commands.
No timing is asserted."""
import collections
import json

import numpy as np
import pytest
import sympy as sp
import torch

from costgraph import symbols as ES
from costgraph import timemodel as TM
from costgraph.evaluate import substitute
from costgraph.hardware import GPU_DEFAULT, PRESETS, Efficiency, get_hardware
from costgraph.simulate import Limits, Request, StepTimes, simulate
from costgraph.graphs.deepseek_ocr import assembly
from costgraph.graphs.deepseek_ocr import serving as SV
from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.graphs.deepseek_ocr.config import LM, MODES, LMConfig
from costgraph.graphs.deepseek_ocr.decoder import (VENDOR, Variants, decoder_graph, expected_experts_hit,
                                                   experts_hit_bound)
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid
from costgraph.verify.lm_profile import LMRequest, lm_graph, run_reference, verify_lm
from costgraph.verify.lm_reference import build_language_model

TINY, GUNDAM = MODES["tiny"], MODES["gundam"]
SMALL = LMConfig(hidden=64, layers=3, heads=4, head_dim=16, vocab=101, dense_intermediate=96,
                 routed_experts=8, experts_per_token=3, moe_intermediate=24, shared_experts=2)

# ---- B = 1 is the per-page graph ---------------------------------------------------------------------

@pytest.mark.parametrize("variants", [VENDOR, Variants(attention="flash", lm_head="last", rope="once")])
def test_batch_one_is_the_per_page_graph(variants):
    one = decoder_graph(LM, variants, True)
    sym = decoder_graph(LM, variants, True, batch=ES.batch)
    assert list(one.g.nodes) == list(sym.g.nodes)
    for n in one.g.nodes:
        a, b = one.cost(n), sym.cost(n)
        for m in ("flops", "elementwise_flops", "bytes_read", "bytes_written", "activation_bytes"):
            assert sp.expand(b[m].subs(ES.batch, 1) - a[m]) == 0, (n, m)
    # and the totals the command line prints (closed forms over the decode steps)
    values = {**assembly.mode_values(GUNDAM), S.w_crop: 2, S.h_crop: 3, ES.text_tokens: 10, ES.output_tokens: 50,
              ES.dtype_bytes: 2, ES.batch: 1}
    for scope in ("decoder.prefill", "decoder.decode"):
        for m in ("flops", "bytes_read"):
            assert substitute(sym.total(scope)[m], values) == substitute(one.total(scope)[m], values)


def test_batch_scales_work_not_weights():
    """B sequences: twice the matmul FLOPs of the token-wise work, the weights read once per step."""
    g = SV.SERVED.batched_graph(GUNDAM, "vllm")
    values = {**assembly.mode_values(GUNDAM), S.w_crop: 2, S.h_crop: 3, ES.text_tokens: 10, ES.dtype_bytes: 2,
              ES.decode_step: 5}
    node = "decoder.decode.layers.3.self_attn.q_proj"
    at = lambda b, m: substitute(g.cost(node)[m], {**values, ES.batch: b})
    assert at(8, "flops") == 8 * at(1, "flops")
    w = 1280 * 1280 * 2
    assert at(8, "bytes_read") - w == 8 * (at(1, "bytes_read") - w)
    # a KV cache each: the attention's reads grow with B, the paged cache is written in place
    att = "decoder.decode.layers.3.self_attn.attention"
    assert substitute(g.cost(att).bytes_read, {**values, ES.batch: 4}) == \
        4 * substitute(g.cost(att).bytes_read, {**values, ES.batch: 1})
    upd = g.cost("decoder.decode.layers.3.self_attn.cache_key")
    assert substitute(upd.bytes_written, {**values, ES.batch: 4}) == 4 * 10 * 128 * 2


def test_expected_experts():
    assert expected_experts_hit(LM, 1) == 6
    e = [float(expected_experts_hit(LM, b)) for b in (1, 2, 8, 64)]
    assert e == sorted(e) and all(x <= min(64, 6 * b) for x, b in zip(e, (1, 2, 8, 64)))
    assert e[1] == pytest.approx(64 * (1 - (58 / 64) ** 2))
    d = SV.SERVED.decode_experts(8)
    assert d["bound"] == int(experts_hit_bound(LM, 8)) == 48 and d["expected_uniform"] < 48


# ---- batched reference runs ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,variants,dtype,batch", [
    (SMALL, Variants(), torch.bfloat16, 3),
    (SMALL, Variants(rope="once", lm_head="last"), torch.float32, 2),
])
def test_batched_lm_exact(cfg, variants, dtype, batch):
    """A prefill of B prompts and two decode steps of B sequences: every metric of every module, the KV
    cache, the totals, against the reference run with the same batch."""
    comp = verify_lm(LMRequest(TINY, layout_for_grid(1, 1, TINY), text_tokens=5, decode_steps=2, variants=variants,
                               cfg=cfg, dtype=dtype, metrics=("all",), batch=batch))
    assert comp.ok and not comp.unclaimed and not comp.blind, comp.failures()[:5]
    subs = {(r.node, r.metric): r for r in comp.subtotals}
    for m in ("flops", "elementwise_flops", "bytes_read", "bytes_written"):
        for scope in ("decoder.prefill", "decoder.decode"):
            r = subs[(scope, m)]
            assert r.measured > 0 and r.predicted == r.measured
    kv = subs[("decoder.decode[t=2].kv_cache", "kv_cache_bytes")]
    assert kv.measured == kv.predicted == batch * (comp.info["prompt_tokens"] + 2) * cfg.kv_values_per_token * \
        (2 if dtype == torch.bfloat16 else 4)


def _kernels_run(batch: int):
    lm = build_language_model(SMALL, torch.bfloat16)
    run = run_reference(lm, prompt_tokens=79, image_slots=73, decode_steps=1, metrics=True, batch=batch)
    measured = collections.Counter(c.section for c in run.ops if c.bytes_read or c.bytes_written or c.elementwise_flops)
    g = lm_graph(SMALL, Variants(), False, batch)
    fixed = {**assembly.mode_values(TINY), ES.dtype_bytes: 2}
    out = {}
    for scope, step, sec in (("decoder.prefill", 0, "decoder.prefill"), ("decoder.decode", 1, "decoder.decode[t=1]")):
        st = TM.stage_times(g, scope, fixed)
        hits = list(run.experts_hit[step].values())
        assert len(set(hits)) == 1, hits    # every MoE layer the same count: one value predicts them all
        v = {"text_tokens": 5, "t": step, "experts_hit": hits[0]}
        _, k = st.evaluate({a: v[a] for a in st.args})
        out[scope] = (int(k.sum()), measured[sec])
    return out


@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_counts_exact(batch):
    """The time model's launches per forward: the kernels the reference dispatches (non-view aten ops)."""
    for scope, (predicted, measured) in _kernels_run(batch).items():
        assert predicted == measured, (scope, predicted, measured)


def test_vision_batch_of_pages():
    """Three pages of different layouts through the vision reference (meta: FLOPs), image by image as
    both engines run them: the sum of the per-page predictions, exactly."""
    from costgraph.verify.preprocess import meta_views
    from costgraph.verify.runner import measure_page

    layouts = [SV.SERVED.page(GUNDAM, w, h, SV.ENGINES["vllm"], 10, 10).layout for w, h in ((1654, 2339), (700, 600), (640, 480))]
    assert [(l.w_crop, l.h_crop, l.tiled) for l in layouts] == [(2, 3, True), (2, 2, True), (1, 1, False)]
    measured = sum(measure_page(meta_views(GUNDAM, l))[0].total() for l in layouts)
    assert measured == SV.SERVED.vision_batch(GUNDAM, layouts) > 0


# ---- the time model -------------------------------------------------------------------------------

def test_time_model_parts():
    g = SV.SERVED.batched_graph(GUNDAM, "vllm")
    fixed = {**assembly.mode_values(GUNDAM), ES.dtype_bytes: 2}
    v = {"w_crop": 2, "h_crop": 3, "text_tokens": 10, "t": 100, "batch": np.array([1, 8, 64])}
    hw = PRESETS["a100-40gb"]
    p = TM.stage_prediction(g, "decoder.decode", fixed, v, hw)
    q = TM.stage_prediction(g, "decoder.decode", fixed, v, hw, launch=False)
    assert np.allclose(p.total() - q.total(), p.kernels.sum(axis=0) * GPU_DEFAULT.launch)
    t = q.total()
    assert t[0] < t[1] < t[2] < 64 * t[0]       # a batch shares the weight reads
    # twice the efficiencies: the node times halve (no launch term)
    fast = Efficiency(**{**GPU_DEFAULT.as_dict(), **{k: 2 * getattr(GPU_DEFAULT, k) for k in
                                                      ("gemm", "attention", "vector", "stream", "elementwise", "copy")}})
    r = TM.stage_prediction(g, "decoder.decode", fixed, v, hw, fast, launch=False)
    assert np.allclose(r.total(), t / 2)
    assert set(p.by_class()) == {"matmul", "attention", "elementwise", "copy", "launch"}


def test_presets_and_cpu_preset():
    for name in ("t4", "a10", "l40s", "rtx-3090", "rtx-5090", "h20"):
        h = PRESETS[name]
        assert h.tensor_flops > h.vector_flops > 0 and h.bandwidth > 0 and h.memory > 0 and h.source
    cpu = get_hardware("cpu", "bf16")
    assert isinstance(cpu.efficiency, Efficiency) and "measured" in cpu.source
    assert TM.efficiency_for(PRESETS["a100-40gb"]) is GPU_DEFAULT


# ---- the simulator on schedules worked out by hand ----------------------------------------------------

def _times(prefill=1.0, decode=0.5):
    return StepTimes(lambda keys, lens: prefill * len(keys), lambda n, ctx: decode)


def test_simulator_continuous():
    """4 requests of 3 tokens, 2 at a time: prefill(2) 2 s -> 2 decode steps (1 s) -> both done at 3 s;
    then the same again: 6 s. TTFT 2 s and 5 s; TPOT 0.5 s."""
    reqs = [Request(10, 3) for _ in range(4)]
    res = simulate(reqs, _times(), Limits(max_num_seqs=2, block_size=4))
    s = res.summary()
    assert res.makespan == 6.0 and s["pages"] == 4 and res.max_running == 2
    assert sorted(res.ttft) == [2.0, 2.0, 5.0, 5.0] and np.allclose(res.tpot, 0.5)
    assert s["output_tokens_per_second"] == 12 / 6 and res.steps == {"prefill": 2, "decode": 4}


def test_simulator_kv_limit_and_preemption():
    # blocks of 4 tokens: a 10-token prompt takes 3 blocks (11 slots); 6 blocks hold two such prompts
    reqs = [Request(10, 3) for _ in range(3)]
    res = simulate(reqs, _times(), Limits(max_num_seqs=8, block_size=4, kv_blocks=6, kv_block_bytes=1))
    assert res.max_running == 2 and res.finished == 3
    # growing past a block with none free preempts the latest sequence (recomputed later)
    res = simulate([Request(7, 4), Request(7, 4)], _times(), Limits(max_num_seqs=8, block_size=4, kv_blocks=4))
    assert res.finished == 2 and res.preemptions >= 1
    with pytest.raises(ValueError, match="does not fit"):
        simulate([Request(100, 2)], _times(), Limits(block_size=4, kv_blocks=4))


def test_simulator_static_batches():
    """HF: a new batch only when the last one has finished."""
    reqs = [Request(10, 3), Request(10, 5), Request(10, 3)]
    res = simulate(reqs, _times(), Limits(max_num_seqs=2, batching="static"))
    # batch 1: prefill 2 s, 4 decode steps of 0.5 s (the longest; the short one decodes padding) -> both
    # returned at 4 s; batch 2: prefill 1 s, 2 steps -> 6 s
    assert res.makespan == 6.0 and sorted(res.latency) == [4.0, 4.0, 6.0]
    assert res.steps == {"prefill": 2, "decode": 6} and res.output_tokens == 11


# ---- commands ------------------------------------------------------------------------------------------

def test_serve_json(cli):
    code, out, _ = cli("serve", "--mode", "gundam", "--size", "1654x2339", "--output-tokens", "200", "--hardware",
                       "a100-40gb", "--engine", "vllm", "--pages", "60", "--json")
    assert code == 0
    rec = json.loads(out)
    for k in ("pages_per_second", "pages_per_day", "output_tokens_per_second", "ttft_seconds", "tpot_seconds",
              "max_concurrent_sequences", "memory", "paper"):
        assert k in rec
    assert rec["engine"]["engine"] == "vllm" and rec["engine"]["max_num"] == 6 and rec["pages"] == 60
    assert rec["pages_per_day"] == pytest.approx(86400 * rec["pages_per_second"])
    assert rec["output_tokens_per_second"] == pytest.approx(200 * rec["pages_per_second"])
    tl = rec["timeline"]
    assert len(tl["time"]) == len(tl["kv_bytes"]) == len(tl["running"]) > 10 and max(tl["running"]) <= 60
    assert "batch" in rec["decode_step_formulas"]["bytes_read"]


def test_serve_text_names_engine_and_paper(cli):
    code, out, _ = cli("serve", "--size", "1654x2339", "--output-tokens", "100", "--pages", "20", "--engine", "hf")
    assert code == 0 and "engine hf" in out and "200,000 pages/day" in out


@pytest.mark.parametrize("argv,msg", [
    (["serve", "--size", "1654x2339", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["serve", "--size", "1654x2339", "--output-tokens", "0"], "--output-tokens"),
    (["serve", "--size", "1654x2339", "--output-tokens", "9000"], "positions"),
    (["serve", "--size", "1654x2339", "--hardware", "nope"], "unknown hardware"),
    (["dataset", "--folder", "/nonexistent"], "not a folder"),
])
def test_bad_input(cli, argv, msg):
    code, out, err = cli(*argv)
    assert code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dataset_csv(cli, tmp_path):
    src = tmp_path / "pages.csv"
    src.write_text("file,width,height,output_tokens\na,1654,2339,300\nb,640,480,100\nbad,x,1,\n")
    out_csv = tmp_path / "out.csv"
    code, out, err = cli("dataset", "--csv", str(src), "--out", str(out_csv), "--json")
    assert code == 0 and "bad" in err   # the bad row is reported, the rest go on
    rec = json.loads(out)
    assert [p["file"] for p in rec["pages"]] == ["a", "b"] and rec["total"]["pages"] == 2
    a, b = rec["pages"]
    assert a["grid"] == "2x3" and b["grid"] == "none" and a["output_tokens"] == 300 and b["output_tokens"] == 100
    assert rec["total"]["flops"] == a["flops"] + b["flops"] and a["flops"] > b["flops"]
    assert out_csv.read_text().splitlines()[0].startswith("file,width,height,grid")
