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
    (["--metrics", "bytes"], "checks --metrics flops"),
    (["--train", "lm", "--lora-rank", "8"], "apply to --train lora"),
    (["--device", "cpu"], "counted on meta"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_training_requests_are_refused(cli, argv, message):
    code, out, err = cli("--model", "deepseek-ocr-2", "verify", "--size", "700x500", "--phase", "train", *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
