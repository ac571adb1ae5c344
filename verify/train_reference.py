"""The training reference (SPEC section 7): the inference references (`costgraph.verify.reference` for
vision, `costgraph.verify.lm_reference` for the LM) made to train as the vendor trains.

- **The vendor's training MoE path** replaces every sparse layer's `mlp` (`TrainingMoE`, written
  from SPEC 7 and the DeepSeek-V2 training path as the brief describes it; not `moe_infer`,
  whose `@torch.no_grad` would skip the routed experts and the gate in a backward). Gate
  (`VendorGate`): fp32 `F.linear`, softmax, greedy top-k (no renormalisation), x
  routed_scaling_factor, and in training the sequence auxiliary loss (`seq_aux`, alpha 0.001):
  `ce = zeros(B, E).scatter_add_(1, idx, ones(B, T*k)).div_(T*k/E)`,
  `aux = (ce * scores.view(B, T, E).mean(1)).sum(1).mean() * alpha`. Experts: the tokens
  repeated k times (`repeat_interleave`), `y = empty_like(x)`, then for EVERY expert i
  `y[flat_idx == i] = expert_i(x[flat_idx == i])` (boolean-mask gather, masked write-back), the k
  rows weighted and summed (fp32: the weights are fp32), cast back, `AddAuxiliaryLoss` (returns
  y, gives the aux loss a gradient of one in backward), then + the shared expert.
  The experts are the reference's own weights: each expert is a `DeepseekOcr2TextMLP` (the
  vendor's DeepseekV2MLP: gate_proj, up_proj, down_proj Linear, SiLU) whose three weights are
  views of `transformers`' fused `gate_up_proj[i, :I]`, `gate_up_proj[i, I:]`, `down_proj[i]`
  (no copy; the parameter count is unchanged), so FLOPs and module paths are the vendor's
  (`mlp.experts.<i>.gate_proj` ...) and LoRA targets them as it targets the vendor's.
- **The loss**: `use_cache=False` (without `transformers` 5.x's packed-sequence check of the
  position ids, which the vendor does not run: `_no_packed_sequence_check`), logits of every position, `transformers`' `ForCausalLMLoss`
  (logits.float(), labels padded with -100 and shifted, cross-entropy mean over non-ignored);
  labels are the input ids.
- **What is trainable** (`Variants.train` of the graph's variants, phase "train"): `lm` (the vendor forward: vision under
  `torch.no_grad`, every LM parameter trainable), `full` (everything), `lm+clip+projector` (SAM's
  parameters frozen), `lora` (the base frozen; LoRA by `peft` on the LM's Linear modules named
  by the targets: q,k,v,o -> `self_attn.{q,k,v,o}_proj`, gate,up,down -> `{gate,up,down}_proj` of
  the dense MLP, every routed expert and the shared expert; the router `mlp.gate` is not a target;
  vision under no_grad as in `lm`), adapters in fp32 as `get_peft_model` keeps them by default.

Vision and LM are run apart by the verifier (vision on `meta` for FLOPs, the LM on CPU): the
vision's backward is seeded with a gradient for the image slots (what the LM's masked_scatter
backward hands it), the LM takes the image slots as a leaf that requires grad when vision trains.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from costgraph.graphs.deepseek_ocr.config import LM, LMConfig
from costgraph.graphs.deepseek_ocr.decoder import Variants
from .lm_reference import LanguageModel, build_language_model

AUX_LOSS_ALPHA = 0.001   # the vendor config's aux_loss_alpha (seq_aux true)


def vision_trains(v: Variants) -> bool:
    """Whether any vision parameter trains (CLIP and the projector; SAM too for `full`)."""
    return v.train in ("full", "lm+clip+projector")


def sam_trains(v: Variants) -> bool:
    return v.train == "full"


# ---- the vendor's training MoE ----------------------------------------------------------------

class AddAuxiliaryLoss(torch.autograd.Function):
    """Returns x; in backward the auxiliary loss gets a gradient of one (the vendor's way of adding
    it to the training loss without changing the loss value)."""

    @staticmethod
    def forward(ctx, x, loss):
        assert loss.numel() == 1
        ctx.dtype = loss.dtype
        ctx.required_aux_loss = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_loss = None
        if ctx.required_aux_loss:
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)
        return grad_output, grad_loss


class VendorGate(nn.Module):
    """The vendor's MoE gate in training: scores, greedy top-k, and the sequence auxiliary loss."""

    def __init__(self, weight: nn.Parameter, top_k: int, scaling: float, alpha: float = AUX_LOSS_ALPHA):
        super().__init__()
        self.weight = weight                    # (E, hidden), fp32: the router's own parameter
        self.top_k, self.routed_scaling_factor, self.alpha = top_k, scaling, alpha
        self.n_routed_experts = weight.shape[0]

    def forward(self, hidden_states: torch.Tensor):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        topk_weight = topk_weight * self.routed_scaling_factor
        aux_loss = None
        if self.training and self.alpha > 0.0:
            idx_for_aux = topk_idx.view(bsz, -1)
            scores_for_seq_aux = scores.view(bsz, seq_len, -1)
            ce = torch.zeros(bsz, self.n_routed_experts, device=hidden_states.device)
            ce.scatter_add_(1, idx_for_aux, torch.ones(bsz, seq_len * self.top_k, device=hidden_states.device)) \
                .div_(seq_len * self.top_k / self.n_routed_experts)
            aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * self.alpha
        return topk_idx, topk_weight, aux_loss


class TrainingMoE(nn.Module):
    """The vendor's DeepseekV2MoE forward with `self.training` true (module docstring)."""

    def __init__(self, gate: VendorGate, experts: nn.ModuleList, shared_experts: nn.Module, top_k: int):
        super().__init__()
        self.gate, self.experts, self.shared_experts = gate, experts, shared_experts
        self.num_experts_per_tok = top_k

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if not self.training:
            raise RuntimeError("TrainingMoE runs the training path only (call .train())")
        hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
        y = torch.empty_like(hidden_states)
        for i, expert in enumerate(self.experts):
            y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
        y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        y = y.to(hidden_states.dtype).view(*orig_shape)
        if aux_loss is not None:
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        return y + self.shared_experts(identity)


def _expert_views(moe, config) -> nn.ModuleList:
    """Per-expert SwiGLU modules whose weights are views of the fused expert parameters."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextMLP

    fused = moe.experts
    inter = fused.intermediate_dim
    experts = nn.ModuleList()
    for i in range(fused.num_experts):
        with torch.device("meta"):
            e = DeepseekOcr2TextMLP(config, intermediate_size=inter)
        e.gate_proj.weight = nn.Parameter(fused.gate_up_proj.data[i, :inter])
        e.up_proj.weight = nn.Parameter(fused.gate_up_proj.data[i, inter:])
        e.down_proj.weight = nn.Parameter(fused.down_proj.data[i])
        experts.append(e)
    return experts


def use_training_moe(model: LanguageModel) -> None:
    """Replace every sparse layer's `mlp` with `TrainingMoE` over the same weights, in place."""
    config = model.model.config
    for layer in model.model.layers:
        moe = layer.mlp
        if not hasattr(moe, "experts"):
            continue
        router = moe.gate
        gate = VendorGate(router.weight, router.top_k, router.routed_scaling_factor)
        layer.mlp = TrainingMoE(gate, _expert_views(moe, config), moe.shared_experts, router.top_k)


# ---- the training LM: forward to the loss -------------------------------------------------------

class TrainingLM(LanguageModel):
    """The LM reference with the vendor's training MoE; `forward` returns the causal-LM loss. Module
    paths are `LanguageModel`'s (`model.layers.3.self_attn.q_proj`, `lm_head`)."""

    def forward(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L); image_features (B, slots, hidden) written over the image slots of each
        sequence in place (the vendor's per-sequence `masked_scatter_`)."""
        from transformers.loss.loss_utils import ForCausalLMLoss

        x = self.model.embed_tokens(input_ids)
        if image_features is not None:
            for b in range(input_ids.shape[0]):
                x[b].masked_scatter_(image_mask[b, :, None], image_features[b])
        with _no_packed_sequence_check():
            h = self.model(inputs_embeds=x, use_cache=False).last_hidden_state
        logits = self.lm_head(h)
        return ForCausalLMLoss(logits, input_ids, self.cfg.vocab)


@contextlib.contextmanager
def _no_packed_sequence_check():
    """`transformers` 5.x looks for packed sequences in the position ids whenever no cache and no 2D
    mask are given (training): diff, ne, cumsum, a comparison and `.all()` on the ids, then the
    answer "not packed" (None) for one sequence per row. The vendor's transformers has no such
    check; the reference skips it with the same answer (the mask it builds is unchanged)."""
    from transformers import masking_utils

    found = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


def as_training_lm(lm: LanguageModel) -> TrainingLM:
    """The inference reference turned into the training one, in place (same weights)."""
    use_training_moe(lm)
    lm.__class__ = TrainingLM
    return lm.train()


def build_training_lm(cfg: LMConfig = LM, dtype: torch.dtype = torch.bfloat16, rope: str = "vendor",
                      seed: int = 0) -> TrainingLM:
    return as_training_lm(build_language_model(cfg, dtype, attention="eager", rope=rope, seed=seed))


def lora_target_modules(v: Variants) -> list[str]:
    """peft's target_modules for the setting's targets: q -> q_proj, ..., gate -> gate_proj."""
    return [f"{t}_proj" for t in v.lora_targets.split(",")]


def apply_lora(module: nn.Module, v: Variants, target_modules=None) -> None:
    """peft's LoRA injected in place (module paths `<target>.base_layer`, `<target>.lora_A.default`,
    `<target>.lora_B.default`; dropout 0 is an Identity; B zero-initialised), the adapters upcast to
    fp32 as `get_peft_model` does by default (`autocast_adapter_dtype=True`): on a bf16 model peft then
    casts the input to fp32 for the adapters and the sum back to bf16. `target_modules`: peft's own
    (a list of names or a regex fullmatched against module paths); default the setting's names."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    config = LoraConfig(r=v.lora_rank, lora_alpha=v.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=lora_target_modules(v) if target_modules is None else target_modules)
    inject_adapter_in_model(config, module)
    cast_adapter_dtype(module, "default", autocast_adapter_dtype=True)


def apply_setting(lm: TrainingLM, v: Variants) -> None:
    """requires_grad of the LM per the setting (and LoRA adapters for `lora`), in place."""
    for p in lm.parameters():
        p.requires_grad_(v.train != "lora")
    if v.train == "lora":
        apply_lora(lm, v)
        for name, p in lm.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def set_vision_trainable(vision: nn.Module, v: Variants) -> None:
    """`full`: every vision parameter; `lm+clip+projector`: all but SAM's; otherwise none."""
    for name, p in vision.named_parameters():
        sam = ".sam." in f".{name}"
        p.requires_grad_(sam_trains(v) if sam else vision_trains(v))


def trainable_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters() if p.requires_grad)


def lm_batch(cfg: LMConfig, batch: int, tokens: int, slots: int, seed: int = 0):
    """Random ids (BOS first), the image-slot mask (positions 1..slots) per sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab, (batch, tokens), generator=gen)
    ids[:, 0] = 0
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[:, 1:1 + slots] = True
    return ids, mask
