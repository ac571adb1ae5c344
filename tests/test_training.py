"""The training phase: backward formulas against torch's own counts, what trains under each setting,
trainable parameter counts against the published ones, checkpointing, memory, and the CLI."""
import json

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from costgraph import autodiff, ops
from costgraph.graphs.deepseek_ocr import MODEL, symbols as S, training
from costgraph.graphs.deepseek_ocr.decoder import Variants

dim = st.integers(1, 7)
settings.register_profile("fast", max_examples=20, deadline=None)
settings.load_profile("fast")


def backward_flops(fn, *tensors) -> int:
    """FLOPs torch counts for the backward alone (forward counted apart and subtracted)."""
    with FlopCounterMode(display=False) as fwd:
        out = fn(*tensors)
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    return bwd.get_total_flops()


@given(b=dim, t=dim, i=dim, o=dim, need_x=st.booleans(), need_w=st.booleans())
def test_linear_backward(b, t, i, o, need_x, need_w):
    if not (need_x or need_w):
        need_w = True
    x = torch.randn(b, t, i, requires_grad=need_x)
    w = torch.randn(o, i, requires_grad=need_w)
    got = backward_flops(lambda x, w: F.linear(x, w), x, w)
    cost, saved = ops.backward("linear", [(b, t, i)], dict(in_features=i, out_features=o, bias=False), (need_x,),
                               need_w)
    assert cost.flops == got
    assert saved == ((0,) if need_w else ())


@given(b=st.integers(1, 2), c=st.integers(1, 4), o=st.integers(1, 4), h=st.integers(4, 9),
       k=st.sampled_from([1, 2, 3]), s=st.sampled_from([1, 2]), need_x=st.booleans())
def test_conv2d_backward(b, c, o, h, k, s, need_x):
    """convolution_backward: grad_input only when the input needs one (a first conv's pixels never do)."""
    p = (k - 1) // 2
    x = torch.randn(b, c, h, h, requires_grad=need_x)
    w = torch.randn(o, c, k, k, requires_grad=True)
    got = backward_flops(lambda x, w: F.conv2d(x, w, stride=s, padding=p), x, w)
    cost, _ = ops.backward("conv2d", [(b, c, h, h)], dict(in_channels=c, out_channels=o, kernel=k, stride=s,
                                                          padding=p, bias=False), (need_x,), True)
    assert cost.flops == got


@given(b=dim, n=dim, k=dim, m=dim, need_a=st.booleans())
def test_bmm_backward(b, n, k, m, need_a):
    a = torch.randn(b, n, k, requires_grad=need_a)
    bb = torch.randn(b, k, m, requires_grad=True)
    got = backward_flops(torch.bmm, a, bb)
    cost, saved = ops.backward("bmm", [(b, n, k), (b, k, m)], {}, (need_a, True), False)
    assert cost.flops == got
    assert saved == ((0, 1) if need_a else (0,))


@given(b=st.integers(1, 2), h=st.integers(1, 3), lq=dim, lk=dim, e=dim, ev=dim)
def test_sdpa_backward_is_torch_fused_formula(b, h, lq, lk, e, ev):
    """The fused attention backward (flash / efficient / cudnn kernels: what the vendor's GPU runs):
    torch's own sdpa_backward_flop_count."""
    cost, saved = ops.backward("sdpa", [(b, h, lq, e), (b, h, lk, e), (b, h, lk, ev)], {}, (True,) * 3, False)
    assert cost.flops == sdpa_backward_flop_count((b, h, lq, ev), (b, h, lq, e), (b, h, lk, e), (b, h, lk, ev))
    assert "out" in saved


def test_every_forward_kind_has_a_backward_rule_or_none():
    """Every op kind DeepSeek-OCR and DeepSeek-OCR 2 run has a backward rule (or none needed), but the
    inference-only ones (the KV cache; the experts loop's gathers, whose training kinds name their runs);
    every kind of a training step has one."""
    from costgraph.graphs.deepseek_ocr import assembly
    from costgraph.graphs.deepseek_ocr2 import assembly as assembly2, training as training2, decoder as decoder2

    def kinds(*graphs):
        return {d["kind"] for g in graphs for _, d in g.g.nodes(data=True)
                if "." not in d["kind"] and d["kind"] != "optimizer_step"}

    steps = [training.train_graph(True, Variants(phase="train", train="full"))[0],
             training2.train_graph(decoder2.variants(phase="train", train="full"))[0]]
    used = kinds(assembly.model_graph(True), assembly.model_graph(False), assembly2.model_graph(), *steps)
    inference_only = {"cache_update", "expert_gather", "routed_gather"}
    assert used - set(ops.BACKWARD) - set(ops.NO_GRADIENT) == inference_only
    assert not kinds(*steps) & inference_only
    with pytest.raises(ValueError, match="already"):
        ops.register_backward("linear")(lambda *a, **k: None)


# ---- the DeepSeek-OCR training step -------------------------------------------------------------

PAGE = {S.w_crop: 2, S.h_crop: 3, S.text_tokens: 100, S.batch: 1, S.dtype_bytes: 2}


def at(expr, **more):
    values = {**MODEL.mode_values(MODEL.get_mode("gundam")), **PAGE, **{getattr(S, k): v for k, v in more.items()}}
    return int(sp.sympify(expr).xreplace(values))


def total(train, scope, metric="flops", batch=1, **v):
    return at(training.formula(None, scope, metric, Variants(phase="train", train=train, **v)), batch=batch)


@pytest.mark.parametrize("rank, published", [(16, 77_509_632), (8, 38_754_816)])
def test_lora_trainable_parameters_match_published(rank, published):
    """Unsloth prints 77,509,632 for r=16 on q,k,v,o,gate,up,down (SPEC section 7); ms-swift reports 38.75M
    for r=8 all-linear with vision and aligner frozen."""
    g, step = training.train_graph(True, Variants(phase="train", train="lora", lora_rank=rank))
    assert at(autodiff.trained_weights(g, step.trained).params) == published


def test_what_trains():
    for train, sam, clip in (("lm", False, False), ("lm+clip+projector", False, True), ("full", True, True),
                             ("lora", False, False)):
        g, step = training.train_graph(True, Variants(phase="train", train=train))
        back = [n for n in g.nodes("backward.vision")]
        assert any(".sam." in n for n in back) == sam, train
        assert any(".clip." in n for n in back) == clip, train
    g, _ = training.train_graph(True, Variants(phase="train", train="full"))
    conv = g.g.nodes["backward.vision.global.sam.patch_embed.proj"]["attrs"]
    assert conv["grads"] == (False,) and conv["weight_grad"] is True   # pixels need no gradient


def test_full_training_backward_of_the_decoder_is_twice_its_matmuls():
    """Every LM matmul trains and passes a gradient: each backward is two matmuls of its forward's size; the
    vendor's per-layer RoPE matmul (inv_freq x positions: 2 x 64 x L per layer, SPEC section 5) needs none."""
    tokens = 1 + 903 + 100
    rope = 12 * 2 * 64 * tokens
    assert total("full", "backward.decoder") == 2 * (total("full", "decoder") - rope)
    assert total("lm", "backward.vision") == 0 and total("lm", "optimizer") == 0


def test_lora_backward_skips_frozen_weight_gradients():
    """Frozen base weights: one matmul per base linear (its input gradient; none in layer 0's attention
    projections, whose input needs none) plus the adapters': between half and all of full LM training."""
    lm, lora = total("lm", "backward.decoder"), total("lora", "backward.decoder")
    assert lm // 2 < lora < lm
    g, _ = training.train_graph(True, Variants(phase="train", train="lora"))
    assert "backward.decoder.layers.0.self_attn.q_proj" not in g.g      # frozen, and its input needs no grad
    a0 = g.g.nodes["backward.decoder.layers.0.self_attn.q_proj.lora_A"]["attrs"]
    assert a0["grads"] == (False,) and a0["weight_grad"] is True
    q1 = g.g.nodes["backward.decoder.layers.1.self_attn.q_proj"]["attrs"]
    assert q1["grads"] == (True,) and q1["weight_grad"] is False
    assert "backward.decoder.embed_tokens" not in g.g


def test_checkpointing_recomputes_layers_and_lowers_the_peak():
    plain = Variants(phase="train", train="lm")
    ckpt = Variants(phase="train", train="lm", checkpointing="layer")
    assert total("lm", "recompute", checkpointing="layer") > 0
    assert total("lm", "recompute") == 0
    values = {s.name: v for s, v in {**MODEL.mode_values(MODEL.get_mode("gundam")), **PAGE}.items()}
    from costgraph import liveness as LV
    peaks = [LV.peak_at(training.train_graph(True, v)[0], training.STEP, values)["bytes"] for v in (plain, ckpt)]
    assert peaks[1] < peaks[0]


def test_batch_scales_the_vision_and_token_work():
    one, two = total("lm", "train"), total("lm", "train", batch=2)
    assert 1.9 * one < two < 2 * one + 1   # weights are shared; only the per-token work doubles


def test_numeric_peak_equals_the_symbolic_one():
    from costgraph import liveness as LV
    g, _ = training.train_graph(True, Variants(phase="train", train="lora"))
    scopes = ("decoder", "backward.decoder")
    values = {s.name: v for s, v in {**MODEL.mode_values(MODEL.get_mode("gundam")), **PAGE}.items()}
    sym = LV.liveness(g, scopes, samples=MODEL.peak_samples(MODEL.get_mode("gundam"), Variants(phase="train")))
    assert LV.peak_at(g, scopes, values)["bytes"] == sym.at(values)["bytes"]


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_train_lora_prints_the_trainable_count(cli):
    code, out, _ = cli("cost", "--mode", "gundam", "--size", "1654x2339", "--phase", "train", "--train", "lora",
                       "--metrics", "params", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["training_memory"]["trainable_params"] == 77_509_632
    assert set(d["totals"]) >= {"forward", "backward", "optimizer", "train"}


@pytest.mark.parametrize("argv, words", [
    (["--lora-rank", "0", "--phase", "train", "--train", "lora"], "lora_rank"),
    (["--lora-rank", "8", "--phase", "train"], "--train lora"),
    (["--train", "full"], "--phase train"),
    (["--batch", "2"], "--phase train"),
    (["--phase", "train", "--output-tokens", "5"], "--output-tokens"),
    (["--phase", "train", "--lora-targets", "q,x", "--train", "lora"], "LoRA target"),
    (["--phase", "train", "--attention", "uncounted"], "uncounted"),
])
def test_cli_bad_training_options(cli, argv, words):
    code, out, err = cli("cost", "--mode", "gundam", "--size", "1654x2339", *argv)
    assert code == 2 and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_backward_formulas_take_their_forwards_attrs():
    """A backward formula is called with its forward node's attrs: every keyword its forward takes."""
    import inspect
    for kind, back in ops.BACKWARD.items():
        params = inspect.signature(back).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        forward = {n for n, p in inspect.signature(ops.OPS[kind]).parameters.items() if p.kind == p.KEYWORD_ONLY}
        assert forward <= set(params), (kind, forward - set(params))


@pytest.mark.parametrize("argv, words", [
    (["--batch", "0"], "batch must be an integer >= 1"),
    (["--text-tokens", "8000"], "exceeds the language model's 8,192 positions"),
])
def test_cli_bad_training_sequences(cli, argv, words):
    code, out, err = cli("cost", "--mode", "gundam", "--size", "1654x2339", "--phase", "train", *argv)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_peak_memory_is_a_whole_steps(cli):
    code, out, err = cli("formula", "--mode", "gundam", "--phase", "train", "--metric", "peak_memory_bytes",
                         "--scope", "vision")
    assert code == 2 and "whole step" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("formula", "--mode", "gundam", "--metric", "peak_memory_bytes", "--scope", "e2e")
    assert code == 2 and "training metric" in err
