"""DeepSeek-OCR 2's training step (`costgraph.graphs.deepseek_ocr2.training`): what trains, the batched
vision, the eager experts loop's gradients, memory, and the CLI. Node-by-node exactness against
`transformers`' own step is `tests/test_train_verify_ocr2.py`'s."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sympy as sp

from costgraph import autodiff, liveness as LV, ops
from costgraph.graphs.deepseek_ocr2 import MODEL, RELEASED_PARAMETERS, training
from costgraph.graphs.deepseek_ocr2 import symbols as S
from costgraph.graphs.deepseek_ocr2.config import LM
from costgraph.graphs.deepseek_ocr2.decoder import variants

STEP = ("vision", "decoder", "backward", "recompute", "optimizer")
A4 = {S.w_crop: 2, S.h_crop: 3, S.text_tokens: 100, S.batch: 1, S.dtype_bytes: 2}


def step(train="lm", **v):
    return training.train_graph(variants(phase="train", train=train, **v))


def total(train, scope, metric="flops", batch=1, **v):
    values = {**A4, S.batch: batch}
    return int(sp.sympify(training.formula(scope, metric, variants(phase="train", train=train, **v))).xreplace(values))


def test_full_fine_tuning_trains_the_released_parameters():
    """Every parameter of the release trains under `full` (its count: 3,389,119,360)."""
    g, s = step("full")
    assert int(sp.sympify(autodiff.trained_weights(g, s.trained).params).xreplace(A4)) == RELEASED_PARAMETERS


def test_what_trains():
    for train, sam, encoder in (("lm", False, False), ("lm+encoder+projector", False, True), ("full", True, True),
                                ("lora", False, False)):
        g, _ = step(train)
        back = list(g.nodes("backward.vision"))
        assert any(".sam." in n for n in back) == sam, train
        assert any(".encoder." in n for n in back) == encoder, train
    g, _ = step("full")
    conv = g.g.nodes["backward.vision.global.sam.patch_embed.proj"]["attrs"]
    assert conv["grads"] == (False,) and conv["weight_grad"] is True   # pixels need no gradient
    # the learned query tables and the separator are parameters: they train, and get no backward node
    trained = set(step("full")[1].trained)
    assert {"vision.global.encoder.query_256", "vision.crops.encoder.query_144",
            "vision.assemble.view_separator"} <= trained


def test_lora_reaches_the_linear_modules_only():
    """PEFT's target_modules reach Linear modules: attention, the dense MLP, the shared experts; the routed
    experts are 3-D parameters (no adapters, no weight gradient)."""
    g, s = step("lora")
    adapters = {n.rsplit(".", 1)[0] for n in s.trained}
    assert "decoder.layers.1.mlp.shared_experts.gate_proj" in adapters
    assert "decoder.layers.0.mlp.down_proj" in adapters
    assert not any(".experts." in n for n in adapters)
    routed = g.g.nodes["backward.decoder.layers.1.mlp.experts.gate_up_proj"]["attrs"]
    assert routed["weight_grad"] is False and routed["grads"] == (True,)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in s.trained)


def test_full_decoder_backward_is_twice_its_matmuls():
    """Every LM matmul trains and passes a gradient: its backward is two matmuls of its size (RoPE tables
    are elementwise here: no matmul to skip)."""
    assert total("full", "backward.decoder") == 2 * total("full", "decoder")
    assert total("lm", "backward.vision") == 0 and total("lora", "backward.vision") == 0


def test_flops_scale_with_the_batch_exactly():
    """Every matmul is per view or per token: B pages cost B times one page (weights once: bytes less)."""
    for train in ("lm", "full"):
        assert total(train, "train", batch=3) == 3 * total(train, "train")
    assert total("full", "train", "bytes_read", batch=3) < 3 * total("full", "train", "bytes_read")


def test_experts_gathers_put_their_gradients_back_per_run():
    """The eager loop's row gather runs once per expert: its backward writes a zeroed gradient of all tokens
    per run and adds the runs' (64 at any training prompt)."""
    g, _ = step("lm")
    node = g.g.nodes["backward.decoder.layers.1.mlp.experts.gather"]
    tokens = 1 + 1121 + 100
    full = tokens * 1280 * 2
    cost = node["cost"]
    assert int(cost.bytes_written.xreplace(A4)) == 64 * full + 64 * full + 63 * full
    assert int(cost.elementwise_flops.xreplace(A4)) == 6 * tokens * 1280 + 63 * tokens * 1280


def test_checkpointing_recomputes_the_layers_and_lowers_the_peak():
    values = {s.name: v for s, v in A4.items()}
    plain, ckpt = step("lm")[0], step("lm", checkpointing="layer")[0]
    assert total("lm", "recompute") == 0
    lm_head = 2 * (1 + 1121 + 100) * LM.hidden * LM.vocab   # the one matmul outside the layers
    assert total("lm", "recompute", checkpointing="layer") == total("lm", "decoder") - lm_head
    peaks = [LV.peak_at(g, STEP, values)["bytes"] for g in (plain, ckpt)]
    assert peaks[1] < peaks[0]


def test_peak_memory_form_equals_the_numeric_peak_on_the_domain():
    """The closed form (a Max of the candidates that win somewhere) against the numeric liveness pass."""
    from costgraph import stages
    v = variants(phase="train", train="lora")
    mode = MODEL.get_mode("default")
    expr = stages.metric_expr(MODEL, mode, "train", "peak_memory_bytes", v)
    f = sp.lambdify([S.w_crop, S.h_crop, S.text_tokens, S.batch, S.dtype_bytes], expr, "numpy")
    g = training.train_graph(v)[0]
    static = sp.Add(*autodiff.static_memory(g).values())
    for w, h, t, b in ((1, 1, 0, 1), (2, 3, 100, 1), (3, 2, 2000, 2), (6, 1, 16, 4)):
        values = {"w_crop": w, "h_crop": h, "text_tokens": t, "batch": b, "dtype_bytes": 2}
        numeric = LV.peak_at(g, STEP, values)["bytes"]
        fixed = int(static.xreplace({getattr(S, k): x for k, x in values.items()}))
        assert int(np.asarray(f(w, h, t, b, 2))) == numeric + fixed, values


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_cost_train(cli):
    code, out, err = cli("cost", "--model", "deepseek-ocr-2", "--size", "1654x2339", "--phase", "train", "--train",
                         "full", "--metrics", "flops,params", "--text-tokens", "100", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["training_memory"]["trainable_params"] == RELEASED_PARAMETERS
    assert d["totals"]["train"]["flops"] == total("full", "train")


@pytest.mark.parametrize("model, train", [("deepseek-ocr-2", "lm+clip+projector"),
                                          ("deepseek-ocr", "lm+encoder+projector")])
def test_cli_training_settings_are_the_models(cli, model, train):
    code, out, err = cli("cost", "--model", model, "--size", "1654x2339", "--phase", "train", "--train", train)
    assert code == 2 and "unknown train variant" in err and len(err.strip().splitlines()) == 1


def test_cli_recipes(cli):
    code, out, err = cli("recipes", "--model", "deepseek-ocr-2", "--size", "1654x2339", "--json")
    assert code == 0, err
    rs = {r["variants"]["train"]: r for r in json.loads(out)["recipes"]}
    assert rs["full"]["trainable_params"] == RELEASED_PARAMETERS
    assert rs["lora"]["trainable_params"] < rs["lm"]["trainable_params"] < rs["full"]["trainable_params"]


def test_ocr2_kinds_have_backward_rules():
    g, _ = step("full")
    kinds = {d["kind"] for _, d in g.g.nodes(data=True) if not d["kind"].endswith(".backward")}
    assert {"repeat_kv", "linear_bias_apart", "projector_linear", "placeholder_scatter", "expert_gather_each",
            "routed_gather_each", "index_add_"} <= set(ops.BACKWARD)
    assert kinds - {"optimizer_step"} <= set(ops.BACKWARD) | set(ops.NO_GRADIENT)
