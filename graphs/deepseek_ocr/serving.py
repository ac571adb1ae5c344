"""Serving DeepSeek-OCR (SPEC section 8): its engines, its batched language model, its published claims.

The simulation itself is model-generic (`costgraph.graphs.serving`); this module is DeepSeek-OCR's `Served`
record (`SERVED`, handed to the app by `DeepSeekOCR.serving()`) and the module-level API over it.

Engines (`--engine`), each a set of variants; every output names its engine:
- `hf`: the vendor's HF path: eager attention (full L x L scores), logits at every prompt position,
  per-layer RoPE tables, `DynamicCache` (every decode step concatenates the whole cache: a copy), up
  to 9 crops, every kernel launched from Python (eager), static batches (a batch ends when its longest
  sequence does; prompts padded to the longest).
- `vllm`: the vendor's vLLM script: flash/paged attention (the causal half; decode reads the paged
  cache), logits only at the sampled position, RoPE from a cached table, the new tokens' K and V written
  into the paged cache in place (no copy of the cache), at most 6 crops, CUDA graphs for decode steps
  (no per-kernel launch cost; prefill steps run eagerly), continuous batching with `max_num_seqs`,
  `gpu_memory_utilization`, `max_model_len` and KV blocks of `block_size` (256) tokens.
Both run the vision encoders per image (the global view, then the crop batch), so a batch of pages
costs the sum of its pages' vision costs.

Batches: `batched_graph` is the language model with `costgraph.symbols.batch` (B) sequences per step,
symbolic in B: weights read once per step for all sequences, each sequence its own KV cache; a decode
step's B tokens meet E (1 - ((E - k) / E)^B) distinct experts (`decoder.expected_experts_hit`, the
expectation under uniform routing; the bound min(E, k B) beside it), a prefill's B L tokens the bound
(64). B = 1 is exactly the per-page graph. Batched prefill: HF pads every prompt to the longest and
runs one (B, L_max) forward; vLLM concatenates them (ragged, varlen attention per sequence). For pages
of one layout both are the (B, L) graph; for mixed pages the simulator uses the padded cost (HF) or
the mean of the per-layout costs at that batch size (vLLM: exact for the linear parts, the attention
of a mixed batch approximated).

KV memory: vLLM allocates whole blocks of 256 tokens; a decode step reads the cached tokens it
attends (the kernel reads the filled part of a block), so bytes follow the context, memory the blocks.
"""
from __future__ import annotations

from functools import lru_cache

from costgraph.evaluate import substitute
from costgraph.graph import CostGraph
from costgraph.graphs.serving import Engine, Served
from . import assembly, layout as layout_module
from .config import LM, MAX_POSITIONS, LMConfig
from .decoder import Variants, decoder_graph, expected_experts_hit, experts_hit_bound, kv_cache_bytes_per_token


ENGINES = {
    "hf": Engine("hf", Variants(), 9, False, False, "static", 1,
                 "vendor HF: eager attention, logits at every prompt position, DynamicCache, eager kernels, "
                 "static padded batches"),
    "vllm": Engine("vllm", Variants(attention="flash", lm_head="last", rope="once"), 6, True, True, "continuous",
                   256, "vendor vLLM script: flash/paged attention, logits at the sampled position, CUDA graphs "
                        "for decode, continuous batching, KV blocks of 256"),
}
PAPER = {"pages_per_day": 200_000, "output_tokens_per_second": 2_500,
         "source": "paper: 200k+ pages/day on one A100-40G; README: PDF mode ~2,500 tokens/s at concurrency "
                   "on an A100-40G (vLLM)"}


@lru_cache(maxsize=None)
def _lm(crop_mode: bool, variants: Variants, batch) -> CostGraph:
    return decoder_graph(LM, variants, crop_mode, batch=batch)


class CropGridServed(Served):
    """The hooks DeepSeek-OCR and DeepSeek-OCR 2 fill alike: their layout and assembly modules (`layout`,
    `assembly`) have the same functions, and their language models are DeepSeek-V2 blocks (`lm`)."""
    layout = None
    assembly = None
    lm: LMConfig = LM

    def layout_for(self, width, height, mode, max_num):
        return self.layout.layout_for(width, height, mode, max_num=max_num)

    def image_tokens(self, layout, mode):
        return self.layout.tokens_for(layout, mode)["total"]

    def layout_values(self, layout):
        return self.assembly.layout_values(layout)

    def dtype_values(self, dtype):
        return self.assembly.dtype_values(dtype)

    def vision_formula(self, mode, metric):
        return self.model.formula(mode, "vision", metric, self.model.variants())

    def prompt_length(self, mode):
        return self.model.prompt_length(mode)

    def kv_bytes_per_token(self, dtype="bf16"):
        return substitute(kv_cache_bytes_per_token(self.lm), self.dtype_values(dtype))

    def decode_experts(self, batch):
        """Distinct experts one MoE layer runs in a decode step of `batch` sequences: the prediction and the bound."""
        return {"expected_uniform": float(expected_experts_hit(self.lm, batch)),
                "bound": int(experts_hit_bound(self.lm, batch)), "used": "expected_uniform"}


class DeepSeekOCRServed(CropGridServed):
    engines = ENGINES
    published = PAPER
    max_positions = MAX_POSITIONS
    layout = layout_module
    assembly = assembly

    @property
    def model(self):
        from . import MODEL
        return MODEL

    def check_sequence(self, mode, layout, text_tokens, output_tokens):
        assembly.sequence_record(mode, layout, text_tokens, output_tokens)

    def vision_graph(self, mode):
        return assembly.vision_graph(mode.crop_mode)

    def vision_scopes(self, mode):
        return ("vision.global", "vision.crops") if mode.crop_mode else ("vision.global",)

    def lm_graph(self, mode, variants, batch):
        return _lm(mode.crop_mode, variants, batch)


SERVED = DeepSeekOCRServed()
