"""The profiled reference of the language model (SPEC section 6): `DeepseekOcr2TextModel` from
`transformers`, configured from `graphs.config.LMConfig`, plus a separate `lm_head` Linear.

- MHA (no GQA, no MLA), `mlp_layer_types = ["dense"] * dense_layers + ["sparse"] * ...`, greedy
  top-k without renormalisation, no biases, eager attention, eager experts: the default
  `grouped_mm` experts path is invisible to FlopCounterMode (all routed-expert FLOPs missing).
- The router weight is created fp32 by `transformers` whatever the default dtype; the model is
  built in the default dtype given (bf16 for the full size), so the router stays fp32 as in the
  vendor. `build_language_model` checks it.
- RoPE: `transformers` 5.x computes cos/sin once per forward with an elementwise multiply (no
  matmul FLOPs). The vendor recomputes them in every attention layer with a small matmul
  `inv_freq (pairs x 1) @ positions (1 x T)`. `rope="vendor"` gives each attention layer a
  `rotary_emb` submodule that recomputes the tables that way (same values) and feeds them to
  the layer, and switches the model's own once-per-forward table off (the vendor has none): the
  profiler then sees the vendor's per-layer work only. `rope="once"` is `transformers` unchanged.
- Image slots: the vendor writes the image features into the embeddings in place
  (`masked_scatter_`); so does `LanguageModel.forward`. The features must already be in the
  model dtype (the vendor's vision tower runs in it; `costgraph.verify.lm_profile` casts them beforehand).
- Fast build of the 2.9B-parameter model: modules are created on `meta` (no storage, no random
  init), then given uninitialised CPU storage and filled by tiling one seeded random block per
  dtype (memory-bandwidth bound; the block length is prime, so no weight row repeats another).
  FLOPs do not depend on the values; the router's choices do, and random weights route fine.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from costgraph.graphs.deepseek_ocr.config import LM, LMConfig

MAX_POSITIONS = 8192   # rotary cache size in the config; not a cost parameter
_BLOCK = 1_000_003     # prime length of the random block tiled over every weight
INIT_STD = 0.02


def text_config(cfg: LMConfig = LM, attention: str = "eager"):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig

    c = DeepseekOcr2TextConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.dense_intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        n_routed_experts=cfg.routed_experts, num_experts_per_tok=cfg.experts_per_token,
        moe_intermediate_size=cfg.moe_intermediate, n_shared_experts=cfg.shared_experts,
        routed_scaling_factor=cfg.routed_scaling, topk_method="greedy", mlp_layer_types=list(cfg.mlp_layer_types),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=MAX_POSITIONS, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        attn_implementation=attention, experts_implementation="eager",
    )
    if c.head_dim != cfg.head_dim:
        raise ValueError(f"config gives head_dim {c.head_dim}, LMConfig says {cfg.head_dim}")
    return c


class VendorRotary(nn.Module):
    """Per-layer cos/sin as the vendor computes them: a matmul of inv_freq with the positions.

    The ops of `transformers` 4.4x's `LlamaRotaryEmbedding` (the rotary module of the Llama
    attention the vendor's MHA configuration runs; the release pins transformers 4.46), in order,
    in fp32: positions cast, inv_freq @ positions, transpose, cat, cos, sin, both tables times
    `attention_scaling` (1.0 for default RoPE: still two multiplies, present since 4.45), casts
    to the model dtype. Not read from the vendor code (unavailable here): if its transformers
    predates the scaling, the two multiplies are 2 x T x head_dim elementwise FLOPs per layer
    too many, and nothing else changes.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b = position_ids.shape[0]
        inv = self.inv_freq[None, :, None].float().expand(b, -1, 1)
        freqs = torch.matmul(inv, position_ids[:, None, :].float()).transpose(1, 2)  # (B, T, pairs): 2*pairs*T FLOPs
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _no_tables(x, position_ids):
    """The model-level rotary table, switched off in rope="vendor" (every layer makes its own)."""
    return None, None


def _use_vendor_rope(attn: nn.Module, inv_freq: torch.Tensor) -> None:
    attn.rotary_emb = VendorRotary(inv_freq)

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        kwargs["position_embeddings"] = module.rotary_emb(kwargs["position_ids"], hidden.dtype)
        return args, kwargs

    attn.register_forward_pre_hook(hook, with_kwargs=True)


class LanguageModel(nn.Module):
    """DeepseekV2-style causal LM: `model` (embeddings, layers, final norm) and `lm_head`."""

    def __init__(self, cfg: LMConfig = LM, attention: str = "eager", rope: str = "vendor"):
        super().__init__()
        from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

        if rope not in ("vendor", "once"):
            raise ValueError(f"unknown rope variant {rope!r}")
        self.cfg, self.rope = cfg, rope
        self.model = DeepseekOcr2TextModel(text_config(cfg, attention))
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if rope == "vendor":
            for layer in self.model.layers:
                _use_vendor_rope(layer.self_attn, self.model.rotary_emb.inv_freq)
            self.model.rotary_emb.forward = _no_tables

    def forward(self, input_ids: torch.Tensor, cache, image_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, lm_head: str = "all") -> torch.Tensor:
        """One forward (prefill or decode) over the cache; returns the logits.

        Prefill: the image slots' embeddings are replaced by the image features in place (the
        vendor's `masked_scatter_`; features in the model dtype). lm_head "all": every position
        (vendor HF), "last": the last one (vLLM).
        """
        x = self.model.embed_tokens(input_ids)
        if image_features is not None:
            if image_features.dtype != x.dtype:
                raise ValueError(f"image features are {image_features.dtype}, the model runs {x.dtype}")
            if x.shape[0] == 1:
                x[0].masked_scatter_(image_mask[0, :, None], image_features)
            else:   # a batch of pages: each sequence's slots in order, features stacked page after page
                x.masked_scatter_(image_mask[..., None], image_features)
        h = self.model(inputs_embeds=x, cache=cache, use_cache=True).last_hidden_state
        return self.lm_head(h if lm_head == "all" else h[:, -1:])

    def reset_rope_buffers(self) -> None:
        """inv_freq buffers are computed, not loaded: recompute them after `to_empty`."""
        rot = self.model.rotary_emb
        inv, _ = rot.compute_default_rope_parameters(rot.config)
        rot.inv_freq = inv.to(rot.inv_freq.device)
        rot.original_inv_freq = inv.clone().to(rot.inv_freq.device)
        if self.rope == "vendor":
            for layer in self.model.layers:
                layer.self_attn.rotary_emb.inv_freq = inv.clone().to(rot.inv_freq.device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _fill(tensors: list[torch.Tensor], seed: int) -> None:
    """Tile one seeded random block (per dtype) over every tensor."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(_BLOCK, generator=gen) * INIT_STD
    blocks: dict[torch.dtype, torch.Tensor] = {}
    for t in tensors:
        block = blocks.setdefault(t.dtype, base.to(t.dtype))
        flat = t.view(-1)
        n = flat.numel()
        q, r = divmod(n, _BLOCK)
        if q:
            flat[: q * _BLOCK].view(q, _BLOCK).copy_(block.expand(q, _BLOCK))
        flat[q * _BLOCK:].copy_(block[:r])


def build_language_model(cfg: LMConfig = LM, dtype: torch.dtype = torch.bfloat16, attention: str = "eager",
                         rope: str = "vendor", seed: int = 0) -> LanguageModel:
    """The reference LM on CPU with random weights, built without the slow random initialisation."""
    with torch.device("meta"), _default_dtype(dtype):
        model = LanguageModel(cfg, attention, rope)
    model = model.to_empty(device="cpu")
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    _fill([p.data for n, p in model.named_parameters() if not n.endswith("norm.weight")], seed)
    for p in norms:
        p.data.fill_(1.0)
    model.reset_rope_buffers()
    check_dtypes(model, dtype)
    return model.eval()


def check_dtypes(model: LanguageModel, dtype: torch.dtype) -> None:
    """Router weights fp32 (vendor), every other weight in the model dtype."""
    for name, p in model.named_parameters():
        want = torch.float32 if name.endswith("mlp.gate.weight") else dtype
        if p.dtype != want:
            raise RuntimeError(f"reference weight {name} is {p.dtype}, expected {want}")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
