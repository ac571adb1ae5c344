"""DeepSeek-OCR 2's training step against `transformers`' DeepseekOcr2ForConditionalGeneration in train mode
(`costgraph.verify.train_ocr2`), on a small config of the same architecture: forward and backward FLOPs node by
node (vision on meta, the language model on CPU in bf16), trainable parameters against the graph and peft, and
the command's refusals. Full-size runs: `costgraph --model deepseek-ocr-2 verify --phase train` (see the README)."""
from __future__ import annotations

import pytest
import torch

from costgraph.graphs.deepseek_ocr2 import MODEL, layout as L
from costgraph.verify import train_ocr2 as T
from test_deepseek_ocr2 import MODE, SMALL_LM, SMALL_V

NO_CROPS = L.layout_for(700, 500, MODE)
TILED = L.layout_for_grid(2, 1, MODE)


def _req(setting, lay, batch=1, **options):
    return T.TrainRequest(lay, MODEL.variants(phase="train", train=setting, **options), text_tokens=5,
                          batch=batch, lm=SMALL_LM, vision=SMALL_V)


def _assert_ok(c):
    assert c.ok, [(r.node, r.predicted, r.measured) for r in c.failures()][:5] + c.unclaimed[:5]
    assert not c.unclaimed and not c.blind


@pytest.mark.parametrize("setting, lay, batch", [("lm", NO_CROPS, 1), ("full", TILED, 2), ("lora", TILED, 1),
                                                 ("lm+encoder+projector", TILED, 1)])
def test_vision_step_node_by_node_on_meta(setting, lay, batch):
    c = T.verify_vision(_req(setting, lay, batch))
    _assert_ok(c)
    backward = [r for r in c.rows if r.node.startswith("backward.")]
    if setting in ("lm", "lora"):
        assert not backward and all(s.measured == 0 for s in c.subtotals if s.node.startswith("backward"))
    else:
        assert backward and all(r.measured > 0 for r in backward)
        assert any(".sam." in r.node for r in backward) == (setting == "full")


@pytest.mark.parametrize("setting", ["lm", "full", "lora"])
def test_language_model_step_node_by_node_on_cpu(setting):
    """Forward, ForCausalLMLoss and backward of the eager experts loop, attention, projections, LoRA adapters."""
    c = T.verify_decoder(_req(setting, TILED, batch=2 if setting == "full" else 1))
    _assert_ok(c)
    backward = [r for r in c.rows if r.node.startswith("backward.")]
    assert backward and all(r.measured > 0 for r in backward)
    assert any(".experts.gate_up_proj" in r.node for r in backward)
    assert any(r.node.endswith(".lora_A") for r in backward) == (setting == "lora")
    assert c.info["image_features_grad"] == (setting == "full")
    assert c.info["seeds"] == []   # ones_like(loss): no FLOPs


@pytest.mark.parametrize("rank, targets", [(16, "q,k,v,o,gate,up,down"), (8, "q,v")])
def test_lora_trainable_parameters_equal_pefts(rank, targets):
    """The graph's trained weights = the reference's trainable parameters = what peft's own wrapper counts."""
    from peft import LoraConfig, get_peft_model
    from costgraph.verify import deepseek_ocr2 as V

    req = _req("lora", NO_CROPS, lora_rank=rank, lora_alpha=2 * rank, lora_targets=targets)
    model = V.build_reference("meta", cfg=SMALL_V, lm=SMALL_LM)
    T.apply_setting(model, req.variants)
    row = T.params_row(req, model)
    peft_model = get_peft_model(V.build_reference("meta", cfg=SMALL_V, lm=SMALL_LM),
                                LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=T.lora_regex(req.variants)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert row.ok and row.measured == trainable > 0
    assert not any("vision_tower" in n for n, p in peft_model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("argv, message", [
    (["--train", "lm+clip+projector"], "no CLIP"),
    (["--mode", "gundam"], "one mode is default"),
    (["--metrics", "activations"], "checks --metrics flops, elementwise_flops, bytes"),
    (["--train", "lm", "--lora-rank", "8"], "apply to --train lora"),
    (["--device", "cpu"], "counted on meta"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_training_requests_are_refused(cli, argv, message):
    code, out, err = cli("--model", "deepseek-ocr-2", "verify", "--size", "700x500", "--phase", "train", *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# Backward groups not exact in elementwise FLOPs and bytes (reported by `costgraph verify --phase train --metrics
# elementwise_flops,bytes`), in every MoE layer: the eager experts loop's gradient sums of the flattened hidden
# states and the routing weights (gathered once per expert run) are charged to the gathers' backward in the
# graph, to the tensors' producers (`.mlp`, `.mlp.gate`) in the measurement; the fused gate_up output's chunk has
# a one-cat backward in torch, two slices and one gradient sum (k L x 2 I adds) in the graph.
NOT_EXACT_BACKWARD = r"backward\.decoder:model\.language_model\.layers\.\d+\.mlp(\.experts|\.gate)?"


def test_language_model_step_elementwise_and_bytes_per_module():
    """One sequence (B = 1), every language-model weight training: the forward (the packed-sequence check
    transformers runs on the position ids, the loss's labels) exact per module and in total; the backward
    exact per module but the MoE layers' routing groups."""
    import re

    c = T.verify_decoder(_req("lm", NO_CROPS), metrics=("flops", "elementwise_flops", "bytes_read", "bytes_written"))
    rows = [r for r in c.rows if r.metric not in ("flops", "params")]
    forward = [r for r in rows if r.node.startswith("decoder:")]
    backward = [r for r in rows if r.node.startswith("backward.decoder:")]
    assert forward and all(r.ok for r in forward), [(r.node, r.metric, r.predicted, r.measured)
                                                   for r in forward if not r.ok]
    checked = [r for r in backward if not re.fullmatch(NOT_EXACT_BACKWARD, r.node)]
    assert len(checked) > 40 and all(r.ok for r in checked), [(r.node, r.metric, r.predicted, r.measured)
                                                             for r in checked if not r.ok]
    assert all(r.ok for r in c.subtotals if r.node == "decoder")
    assert all(r.ok for r in c.rows if r.metric in ("flops", "params")) and not c.unclaimed
    # the MoE groups of a layer together: the 3-D expert weights' gradients (a zero-filled full-size one per
    # expert run, then hits - 1 adds) counted; what is left over is the chunk's gradient sum alone
    moe = [r for r in backward if r.metric == "elementwise_flops" and re.fullmatch(NOT_EXACT_BACKWARD, r.node)
           and ".layers.1." in r.node]
    rows = SMALL_LM.experts_per_token * (1 + 257 + 5)
    assert sum(r.predicted - r.measured for r in moe) == rows * 2 * SMALL_LM.moe_intermediate
