"""A fine-tuning step of DeepSeek-OCR 2 as `transformers` runs it (`DeepseekOcr2ForConditionalGeneration`
in train mode, `labels` given): one micro-batch of B pages of one layout forward, the loss, the backward
of whatever trains, the optimizer update.

What differs from DeepSeek-OCR's step (`costgraph.graphs.deepseek_ocr.training`, whose pieces this reuses):
- vision: no `torch.no_grad` anywhere; the B pages' global views run as ONE batch of B and their crops
  as one batch of B x w_crop x h_crop (DeepSeek-OCR's vendor loops over the pages); per page the crops'
  tokens, the global view's and the separator are concatenated, then the B pages' lists again;
- the MoE: `transformers` has one path for training and inference, the eager experts loop (no
  `repeat_interleave` training path, no auxiliary balance loss: the router logits are returned, not
  added to the loss);
- the loss: `ForCausalLMLoss`: the logits in fp32, the labels padded by one and shifted (a copy),
  cross entropy (log_softmax, nll) over every position, mean over the labelled ones;
- the image features are merged out of place (`placeholder_scatter`); RoPE tables once per forward.

What trains (`Variants.train`):
- `lm`: vision frozen (its parameters `requires_grad=False`: nothing upstream of the image features needs
  a gradient, so no backward runs through it); every language-model weight trains (the default, as
  DeepSeek-OCR's);
- `full`: everything (SAM's first conv never gets an input gradient);
- `lm+encoder+projector`: SAM frozen;
- `lora`: LoRA adapters (PEFT: fp32 adapters, base(x) + B(A(x)) * alpha/r) on the language model's
  Linear modules named by `lora_targets`: attention q,k,v,o, the dense layer's and the shared experts'
  gate/up/down. The routed experts are 3-D parameters (`gate_up_proj`, `down_proj`), not Linear
  modules: PEFT's `target_modules` cannot reach them. The vision encoder's own q/k/v/o and gate/up/down
  modules are left out (LoRA on the language model, as for DeepSeek-OCR).

Scopes as DeepSeek-OCR's step: `vision`, `vision.global`, `vision.crops`, `decoder`, `backward...`,
`recompute`, `optimizer`; composites `forward`, `train`.
"""
from __future__ import annotations

from functools import lru_cache, partial

import sympy as sp

from costgraph.dtypes import INT64
from costgraph.graph import CostGraph, Tensor
from costgraph.graphs.deepseek_ocr import decoder as blocks, training as steps
from costgraph.graphs.deepseek_ocr.layout import crops_run
from costgraph.graphs.deepseek_ocr.training import COMPOSITE, REPORT_PARTS, STAGES, scopes_for  # noqa: F401
from . import assembly, vision
from . import ops  # noqa: F401  (registers the training kinds)
from . import symbols as S
from .config import LM, VISION, VisionConfig
from .decoder import Variants

TRAIN = ("lm", "full", "lm+encoder+projector", "lora")
# the eager experts loop's per-run ops as a training step runs them (their backward counts every run's)
EACH_RUN = {"rows": "expert_gather_each", "weights": "routed_gather_each", "experts": "routed_linear_each"}


def sequence_length() -> sp.Expr:
    """Tokens of one training sequence: [BOS] + image slots + text tokens (prompt and answer)."""
    return 1 + S.text_tokens + assembly.image_slots()


def _add_vision(g: CostGraph, cfg: VisionConfig = VISION) -> Tensor:
    """B pages through the vision tower as `get_image_features` runs them: the global views in one batch,
    all crops in another, then each page's crops, global and separator, then the pages' lists joined."""
    mode = assembly.MODE
    g.scope("vision", doc="the vision tower for the micro-batch's views, then the image slots")
    out_global = vision.view(g.scope("vision.global", doc="the B pages' global views (1024), one batch"),
                             mode.base_size, cfg, batch=S.batch)
    run = crops_run()
    crops = g.scope("vision.crops", multiplicity=run,
                    doc="the B pages' crops (768), one batch of B*w_crop*h_crop; none for pages within 768x768")
    out_crops = vision.view(crops, mode.image_size, cfg, batch=S.batch * S.w_crop * S.h_crop, min_batch=2)
    a = g.builder("vision")
    width = cfg.projector_out
    _, qc, _ = out_crops.shape
    local = a.op("assemble.crops_flat", "reshape", out_crops,
                 shape=(run * S.batch * S.w_crop * S.h_crop * qc, width))
    glob = a.op("assemble.global_flat", "reshape", out_global, shape=(S.batch * out_global.shape[1], width))
    # the separator is read once per page (one cat per page: B cats, the sum of their sizes)
    sep = a.input("assemble.view_separator", (S.batch, width), param=(width,))
    seq = a.op("assemble.sequence", "cat", local, glob, sep, dim=0)
    return a.op("assemble.batch_cat", "cat", seq, dim=0)


def moe_eager(linear, experts_hit=None):
    """The MoE layer as `transformers` trains it: DeepSeek-OCR's eager experts loop over the B sequences'
    tokens (`experts_hit` experts run per layer; None: the bound, every expert: a prompt routes k x L >= 64
    rows), LoRA through the shared experts."""
    def block(b, h, p, cfg, tokens, batch):
        hits = blocks.experts_hit_bound(cfg, batch * tokens) if experts_hit is None else experts_hit
        return blocks.moe(b, h, p, cfg, tokens, hits, batch, linear=linear, kinds=EACH_RUN)
    return block


@lru_cache(maxsize=None)
def train_graph(variants: Variants, cfg=LM, vision_cfg: VisionConfig = VISION, experts_hit=None):
    """The training step's graph (symbolic in the grid, text_tokens, batch and dtype) and what trained;
    `experts_hit`: None predicts the bound, `costgraph.symbols.experts_hit` keeps it free (the verifier's)."""
    if variants.phase != "train":
        raise ValueError("train_graph needs phase='train'")
    if blocks.ATTENTION[variants.attention] == "none":
        raise ValueError("a training step cannot leave the attention uncounted (--attention eager|flash)")
    g = CostGraph("deepseek-ocr-2.train", params={"mode": assembly.MODE.name, **variants.as_dict()})
    image = _add_vision(g, vision_cfg)
    tokens = sequence_length()
    d = g.scope("decoder", doc="one language-model forward over B training sequences, and the loss")
    loss = steps.forward(d, cfg, variants, tokens=tokens, batch=S.batch, image=image, slots=assembly.image_slots(),
                         moe_block=partial(moe_eager, experts_hit=experts_hit), scatter="placeholder_scatter")
    # transformers 5.x checks the position ids for packed sequences (no cache, no 2-D mask): the text model's
    # own ops before the mask, in the graph after the forward (nothing reads its result)
    d.op("packed_sequence_check", "packed_sequence_check", Tensor("decoder.position_ids", (1, tokens), INT64),
         batch=S.batch)
    labels = d.input("labels", (S.batch, tokens), itemsize=INT64)
    d.op("loss.shift_labels", "shift_labels", labels)
    return g, steps.add_step(g, loss.node, variants, steps.trains(variants))


@lru_cache(maxsize=None)
def formula(scope: str, metric: str, variants: Variants) -> sp.Expr:
    """Total of `metric` over a scope of the training step (a composite: the sum of its parts)."""
    if scope in COMPOSITE:
        return sp.Add(*[formula(s, metric, variants) for s in COMPOSITE[scope]])
    g = train_graph(variants)[0]
    if scope not in g.scopes:
        raise ValueError(f"unknown scope {scope!r} for a training step (choose from {', '.join(scopes_for(None))})")
    return g.total(scope)[metric]
