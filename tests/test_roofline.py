"""Roofline latency: the per-node max(compute, memory) on a hand-made graph, batched and summed
scopes, the stage totals of the real graph, the memory fit, and calibration (numbers, no timings)."""
import numpy as np
import pytest
import sympy as sp

from costgraph import roofline as RL
from costgraph import stages
from costgraph import symbols as S
from costgraph.cost import Cost
from costgraph.graph import CostGraph
from costgraph.hardware import PRESETS, Hardware, calibrate, get_hardware
from graphs.deepseek_ocr import assembly as model
from graphs.deepseek_ocr.config import MODES

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


def test_generation_stages_add_up():
    mode = MODES["gundam"]
    fixed = {**model.mode_values(mode), **model.dtype_values("bf16")}
    values = {"w_crop": 2, "h_crop": 3, "text_tokens": 10, "output_tokens": 5}
    hw = [PRESETS["h100-sxm"], PRESETS["l4"]]
    out = stages.roofline(mode, fixed, values, hw, 5)
    for name in ("h100-sxm", "l4"):
        r = out[name]
        dec = r["decoder.decode"]
        assert dec["steps"] == 4
        assert dec["seconds"] == pytest.approx(4 * dec["per_token_mean_seconds"])
        assert dec["first_step_seconds"] <= dec["last_step_seconds"]      # the context grows
        assert r["total_seconds"] == pytest.approx(r["vision"]["seconds"] + r["decoder.prefill"]["seconds"]
                                                   + dec["seconds"])
        assert all(r[s]["seconds"] > 0 for s in ("vision", "decoder.prefill"))
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
