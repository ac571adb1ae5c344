"""Roofline latency: the per-node max(compute, memory) on a hand-made graph, batched and summed
scopes, the stage totals of the real graph, the memory fit, and calibration (numbers, no timings)."""
import numpy as np
import pytest
import sympy as sp

from costgraph import roofline as RL
from costgraph import stages
from costgraph import symbols as S
from costgraph.cost import METRICS, Cost
from costgraph.graph import CostGraph
from costgraph.hardware import PRESETS, Hardware, calibrate, get_hardware
from costgraph.graphs.deepseek_ocr import MODEL
from costgraph.graphs.deepseek_ocr.config import MODES

HW = Hardware("toy", tensor_flops=1e12, vector_flops=1e10, bandwidth=1e11, memory=1e9)
k = sp.Symbol("k", integer=True, positive=True)


def _toy():
    """A matmul-heavy node, an elementwise node, a view; a batched scope (k copies) and a summed one."""
    g = CostGraph("toy")
    g.scope("a")
    a = g.builder("a")
    x = a.input("x", (4,))
    m = a.op("mm", "gelu", x)
    e = a.op("ew", "gelu", m)
    a.op("view", "reshape", e, shape=(4,))
    g.g.nodes["a.mm"]["cost"] = Cost(flops=sp.Integer(2 * 10 ** 9), bytes_read=sp.Integer(10 ** 6))   # compute 2 ms
    g.g.nodes["a.ew"]["cost"] = Cost(elementwise_flops=sp.Integer(10 ** 6), bytes_read=sp.Integer(4 * 10 ** 8),
                                     bytes_written=sp.Integer(10 ** 8))                              # memory 5 ms
    g.scope("a.batch", multiplicity=k)
    b = g.builder("a.batch")
    b.op("mm", "gelu", b.input("y", (4,)))
    g.g.nodes["a.batch.mm"]["cost"] = Cost(flops=sp.Integer(10 ** 9), bytes_read=sp.Integer(10 ** 9))  # 1 ms / 10 ms
    g.scope("d", sum_over=(S.decode_step, 1, S.output_tokens - 1))
    d = g.builder("d")
    d.op("step", "gelu", d.input("z", (4,)))
    g.g.nodes["d.step"]["cost"] = Cost(bytes_read=10 ** 8 * S.decode_step)                            # t ms
    return g


def test_node_time_is_max_of_compute_and_memory():
    g = _toy()
    times = RL.per_node(g, "a", {}, {"k": 3}, HW)
    assert times.nodes == ["a.mm", "a.ew", "a.batch.mm"]          # the view and the inputs cost nothing
    assert np.allclose(times.compute, [2e-3, 1e-4, 3e-3])
    assert np.allclose(times.memory, [1e-5, 5e-3, 3e-2])
    assert np.allclose(times.time, [2e-3, 5e-3, 3e-2])
    assert list(times.compute_bound) == [True, False, False]
    assert np.allclose(times.intensity, [2e9 / 1e6, 1e6 / 5e8, 3e9 / 3e9])
    rep = RL.stage_report(times, top=1)
    assert rep["seconds"] == pytest.approx(0.037)
    assert rep["compute_bound_seconds"] == pytest.approx(2e-3) and rep["compute_bound_nodes"] == 1
    assert rep["top_nodes"][0]["node"] == "a.batch.mm" and rep["top_nodes"][0]["bound"] == "memory"


def test_vectorised_over_steps():
    g = _toy()
    times = RL.per_node(g, "d", {}, {"t": np.arange(1, 5)}, HW)
    assert np.allclose(times.time[0], [1e-3, 2e-3, 3e-3, 4e-3])
    # vectorised over the batch size too: one compiled evaluation for many values
    times = RL.per_node(g, "a", {}, {"k": np.array([1, 2, 10])}, HW)
    assert np.allclose(times.time.sum(axis=0), [2e-3 + 5e-3 + 1e-2, 2e-3 + 5e-3 + 2e-2, 2e-3 + 5e-3 + 1e-1])


def test_ridge_point():
    r = RL.ridge(HW)
    assert r == {"tensor": 10.0, "vector": 0.1}


def _bounds(totals: dict, hw: Hardware) -> tuple[float, float]:
    """Roofline seconds of a stage from its totals alone: each node takes max(compute, memory), so the
    stage takes at least max(all compute, all memory) and at most their sum."""
    compute = totals["flops"] / hw.tensor_flops + totals["elementwise_flops"] / hw.vector_flops
    memory = (totals["bytes_read"] + totals["bytes_written"]) / hw.bandwidth
    return max(compute, memory), compute + memory


def test_generation_stages_against_hand_counts():
    """A page of grid 2x3, 10 text tokens, 5 output tokens (bf16): the lm_head nodes timed from their
    FLOPs and bytes counted by hand (SPEC: hidden 1280, vocab 129280), and every stage within the
    bounds its exact totals (`cost`) allow."""
    mode = MODES["gundam"]
    point = MODEL.point(mode, grid=(2, 3), text_tokens=10, output_tokens=5)
    fixed = {**MODEL.mode_values(mode), **MODEL.dtype_values("bf16")}
    hws = [PRESETS["h100-sxm"], PRESETS["l4"]]
    out = stages.roofline(MODEL, mode, fixed, point.values, hws, None, 3)
    totals = stages.totals(MODEL, mode, point, ("vision", "decoder.prefill", "decoder.decode", "e2e"), METRICS,
                           MODEL.variants(), "bf16")
    hidden, vocab, b = 1280, 129280, 2
    prompt = 1 + 10 + 903                      # BOS + text + the 2x3 page's image tokens
    prefill_head = (2 * prompt * hidden * vocab, b * (hidden * vocab + prompt * hidden + prompt * vocab))
    decode_head = (2 * hidden * vocab, b * (hidden * vocab + hidden + vocab))
    for hw in hws:
        r = out[hw.name]
        dec = r["decoder.decode"]
        assert dec["steps"] == 4                                     # t = 1..output_tokens-1
        assert dec["first_step_seconds"] < dec["last_step_seconds"]  # the context grows
        for node, (flops, nbytes), rec in (("decoder.prefill.lm_head", prefill_head, r["decoder.prefill"]),
                                           ("decoder.decode.lm_head", decode_head, dec["last_step"])):
            top = {n["node"]: n for n in rec["top_nodes"]}
            assert (top[node]["flops"], top[node]["bytes"]) == (flops, nbytes)
            assert top[node]["seconds"] == pytest.approx(max(flops / hw.tensor_flops, nbytes / hw.bandwidth))
        for st in ("vision", "decoder.prefill", "decoder.decode"):
            lo, hi = _bounds(totals[st], hw)
            assert lo * (1 - 1e-9) <= r[st]["seconds"] <= hi * (1 + 1e-9), (hw.name, st)
        lo, hi = _bounds(totals["e2e"], hw)
        assert lo * (1 - 1e-9) <= r["total_seconds"] <= hi * (1 + 1e-9)
    # h100: the prefill lm_head is compute-bound, one decode step's is memory-bound (about 1 FLOP/byte)
    assert out["h100-sxm"]["decoder.prefill"]["top_nodes"][0]["bound"] == "compute"
    assert out["h100-sxm"]["decoder.decode"]["last_step"]["top_nodes"][0]["bound"] == "memory"
    # a faster memory system is never slower
    assert out["h100-sxm"]["total_seconds"] < out["l4"]["total_seconds"]


def test_memory_fit():
    fit = stages.memory_fit(HW, weight_bytes=6 * 10 ** 8, kv_bytes=3 * 10 ** 8, peak_bytes=2 * 10 ** 8)
    assert fit["total_bytes"] == 1.1e9 and fit["fits"] is False and fit["headroom_bytes"] == -10 ** 8


def test_unknown_hardware_is_a_value_error():
    with pytest.raises(ValueError, match="unknown hardware"):
        get_hardware("tpu-v9")


def test_calibration_returns_positive_figures():
    hw = calibrate("bf16", samples=2, matmul_n=256, copy_mib=16)   # small: a check of the numbers, not a preset
    assert hw.name == "this-machine"
    assert hw.tensor_flops > 0 and hw.vector_flops > 0 and hw.bandwidth > 0 and hw.memory > 0
    assert len(hw.measurements) == 3 and all(m.best >= m.median > 0 for m in hw.measurements)
