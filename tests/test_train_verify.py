"""The training verification: the training reference (vendor training MoE, loss, trainable settings,
LoRA by peft), the attribution of backward ops, and the training graph against it node by node on a
small language model (the full-size runs are `costgraph verify --phase train`)."""
import pytest
import torch
from torch import nn

from costgraph.graphs.deepseek_ocr import MODEL
from costgraph.graphs.deepseek_ocr.config import LM, MODES, LMConfig
from costgraph.graphs.deepseek_ocr.layout import layout_for
from costgraph.verify.backward import ACCUMULATE, BACKWARD, FORWARD, counting
from costgraph.verify import training as T
from costgraph.verify.train_reference import (apply_setting, as_training_lm, build_training_lm,
                                              trainable_parameters)

SMALL = LMConfig(hidden=64, layers=3, heads=4, head_dim=16, vocab=101, dense_intermediate=96, routed_experts=8,
                 experts_per_token=2, moe_intermediate=32, shared_experts=1)
GUNDAM = MODES["gundam"]
PAGE = layout_for(600, 600, GUNDAM)   # no crops: 273 image slots


def _train(setting, **kw):
    return MODEL.variants(phase="train", train=setting, **kw)


@pytest.mark.parametrize("rank, expected", [(16, 77_509_632)])
def test_lora_trainable_parameters_are_the_published_ones(rank, expected):
    """SPEC 7: Unsloth LoRA r=16 on q,k,v,o,gate,up,down prints 77,509,632 (ms-swift's r=8, 38.75M:
    `costgraph verify --phase train --train lora --lora-rank 8 --scope decoder` prints it)."""
    from costgraph.verify.lm_reference import LanguageModel

    with torch.device("meta"):
        lm = LanguageModel(LM)
    lm = as_training_lm(lm)
    apply_setting(lm, _train("lora", lora_rank=rank, lora_alpha=2 * rank))
    assert trainable_parameters(lm) == expected
    assert round(expected / 1e6, 2) == (77.51 if rank == 16 else 38.75)


def test_training_moe_computes_what_the_inference_moe_computes():
    """The vendor's training path (repeat_interleave, masked rows per expert, weighted sum) over the
    reference's own expert weights gives transformers' eager experts' output; the aux loss reaches
    the router weight."""
    from costgraph.verify.lm_reference import build_language_model

    torch.manual_seed(0)
    ref = build_language_model(SMALL, torch.float32)
    x = torch.randn(2, 9, SMALL.hidden)
    with torch.no_grad():
        want = ref.model.layers[1].mlp(x)
    trained = as_training_lm(ref)
    moe = trained.model.layers[1].mlp
    assert type(moe).__name__ == "TrainingMoE"
    got = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    e0 = moe.experts[0]
    assert e0.gate_proj.weight.shape == (SMALL.moe_intermediate, SMALL.hidden)
    got.sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return (h + self.b(h)).pow(2).sum()   # h feeds two consumers: its gradients are summed


def test_backward_ops_belong_to_the_module_that_created_them():
    from torch.utils.flop_counter import FlopCounterMode

    m = _Residual()
    x = torch.randn(4, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        m(x).backward()
    with counting(metrics=True) as (att, step), att.in_section("s"):
        loss = m(x)
        with att.backward():
            loss.backward()
    assert sum(o.flops for o in step.flops) == fc.get_total_flops()
    per = {}
    for o in step.flops:
        per[(o.where.phase, o.module)] = per.get((o.where.phase, o.module), 0) + o.flops
    # forward: 2*4*8*8 per linear; backward: input and weight gradients (a's input too: x requires grad)
    assert per == {(FORWARD, "a"): 512, (FORWARD, "b"): 512, (BACKWARD, "a"): 1024, (BACKWARD, "b"): 1024}
    sums = [o for o in step.ops if o.where.kind == ACCUMULATE]
    assert [(o.op, o.where.producer.module, o.where.producer.call) for o in sums] == [("add", "a", "linear")]
    assert all(o.section == "backward.s" for o in step.ops if o.where.phase == BACKWARD)


def test_meta_runs_take_the_vendors_fused_sdpa_kernel():
    """On meta, SDPA takes a fused kernel (backward counted 2.5x the forward, torch's formula, which
    recomputes the scores): the CPU flash kernel when the mask needs no gradient (as a CPU run
    does), the memory-efficient kernel (the vendor's GPU) when it needs one (SAM's rel-pos bias
    under --train full), which hands back the mask's gradient. CPU has no such kernel: with a mask
    that needs a gradient it takes the math path (2x)."""
    def count(device, mask_grad):
        q, k, v = (torch.randn(1, 2, 16, 8, device=device, requires_grad=True) for _ in range(3))
        mask = torch.randn(1, 2, 16, 16, device=device, requires_grad=mask_grad)
        with counting() as (att, step), att.in_section("s"):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            with att.backward():
                out.backward(torch.ones_like(out))
        ops = sorted({o.op for o in step.flops})
        fwd = sum(o.flops for o in step.flops if o.where.phase == FORWARD)
        bwd = sum(o.flops for o in step.flops if o.where.phase == BACKWARD)
        assert {o.where.tag.call for o in step.flops} == {"scaled_dot_product_attention"}
        assert (mask.grad is not None) == mask_grad and (not mask_grad or mask.grad.shape == mask.shape)
        return ops, fwd, bwd

    forward = 2 * 2 * 2 * 16 * 16 * 8
    meta, cpu = count("meta", False), count("cpu", False)
    assert meta == cpu and meta[2] == 2.5 * meta[1] == 2.5 * forward
    meta, cpu = count("meta", True), count("cpu", True)
    assert meta[0] == ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"]
    assert meta[1:] == (forward, 2.5 * forward)
    assert cpu[0] == ["bmm"] and cpu[1:] == (forward, 2 * forward)


def test_full_vision_training_step_matches_the_graph_node_by_node():
    """--train full on meta (one 600x600 page: the global view): SAM trains, so its rel-pos mask
    needs a gradient; every node, SAM's SDPA backward included, equals the graph exactly."""
    comp = T.verify_vision(T.TrainRequest(GUNDAM, PAGE, _train("full")))
    assert comp.ok, [(r.node, r.predicted, r.measured) for r in comp.failures()][:5] + comp.unclaimed[:5]
    sdpa = [r for r in comp.rows if r.node.startswith("backward.") and "sam." in r.node and r.node.endswith(".sdpa")]
    assert len(sdpa) == 12 and all(r.measured > 0 for r in sdpa)


@pytest.mark.parametrize("setting", ["full", "lora"])
def test_small_lm_training_step_matches_the_graph_node_by_node(setting):
    v = _train(setting)
    model = build_training_lm(SMALL, torch.float32)
    apply_setting(model, v)
    req = T.TrainRequest(GUNDAM, PAGE, v, text_tokens=6, batch=2, cfg=SMALL, dtype=torch.float32)
    comp = T.verify_decoder(req, model)
    assert comp.ok, [(r.node, r.predicted, r.measured) for r in comp.failures()][:5] + comp.unclaimed[:5]
    backward = [r for r in comp.rows if r.node.startswith("backward.")]
    assert backward and all(r.measured > 0 for r in backward)
    if setting == "lora":
        assert any(r.node.endswith(".lora_A") for r in backward)
    assert comp.info["image_slots_grad"] == (setting == "full")


def test_small_lm_training_memory_against_the_graph():
    """Measured live bytes over forward + backward against the graph's liveness: a ratio, reported;
    here the two agree within 10 % and both peak in the backward."""
    v = _train("full")
    model = build_training_lm(SMALL, torch.float32)
    apply_setting(model, v)
    req = T.TrainRequest(GUNDAM, PAGE, v, text_tokens=6, batch=2, cfg=SMALL, dtype=torch.float32)
    mem = T.lm_memory_rows(req, model)
    assert mem["measured"]["activations_peak_in"] == "backward"
    assert mem["predicted"]["node"].startswith("backward.")
    assert 0.9 < mem["activations_ratio"] < 1.1
    assert mem["measured"]["gradient_bytes"] == 4 * sum(p.numel() for p in model.parameters())   # fp32


@pytest.mark.parametrize("argv, message", [
    (["--train", "lora"], "--train applies to --phase train"),
    (["--phase", "train", "--scope", "decoder.prefill"], "unknown scope"),
    (["--phase", "train", "--train", "lm", "--lora-rank", "8"], "apply to --train lora"),
    (["--phase", "train", "--device", "cpu"], "counted on meta"),
])
def test_bad_training_requests_are_refused(cli, argv, message):
    code, out, err = cli("verify", "--size", "600x600", *argv)
    assert code == 2 and message in err and "Traceback" not in err


# modules whose backward is not exact yet (see costgraph.verify.train_metrics): the root's in-place
# masked_scatter_ on a per-sequence view (CopySlices), the MoE's write-back (the first expert's rows:
# data-dependent)
NOT_EXACT_BACKWARD = (r"backward\.decoder:<root>", r"backward\.decoder:model\.layers\.\d+\.mlp")


@pytest.mark.parametrize("dtype", [torch.bfloat16])   # fp32: see NOT_EXACT_BACKWARD's note in the report
def test_small_lm_training_elementwise_and_bytes_are_exact_per_module(dtype):
    """Forward (the training MoE path, loss, every module) exact in elementwise FLOPs and bytes read and
    written; backward exact for every module but the listed ones (norms, attention with RoPE and the
    heads' copies, projections, experts, shared experts, lm_head, loss, embedding)."""
    import re

    v = _train("full")
    model = build_training_lm(SMALL, dtype)
    apply_setting(model, v)
    req = T.TrainRequest(GUNDAM, PAGE, v, text_tokens=6, batch=1, cfg=SMALL, dtype=dtype)
    comp = T.verify_decoder(req, model, ("flops", "elementwise_flops", "bytes_read", "bytes_written"))
    metric_rows = [r for r in comp.rows if r.metric != "flops"]
    forward = [r for r in metric_rows if r.node.startswith("decoder:")]
    backward = [r for r in metric_rows if r.node.startswith("backward.decoder:")]
    assert forward and all(r.ok for r in forward), [(r.node, r.metric, r.predicted, r.measured)
                                                   for r in forward if not r.ok]
    checked = [r for r in backward if not any(re.fullmatch(p, r.node) for p in NOT_EXACT_BACKWARD)]
    assert len(checked) > 40 and all(r.ok for r in checked), [(r.node, r.metric, r.predicted, r.measured)
                                                             for r in checked if not r.ok]
    totals = {(r.node, r.metric): r for r in comp.subtotals}
    assert all(totals[("decoder", m)].ok for m in ("elementwise_flops", "bytes_read", "bytes_written"))
    assert not comp.unclaimed
