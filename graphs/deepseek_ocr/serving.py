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

from costgraph import symbols as ES
from costgraph.graph import CostGraph
from costgraph.graphs.serving import Engine, Page, Served, ServeConfig, StepModel as _StepModel, vllm_graph  # noqa: F401
from . import assembly, layout as layout_module
from .config import LM, MAX_POSITIONS, Mode
from .decoder import Variants, decoder_graph, expected_experts_hit, experts_hit_bound, kv_cache_bytes_per_token
from .layout import Layout, layout_for, tokens_for  # noqa: F401


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
    `assembly`) have the same functions."""
    layout = None
    assembly = None

    def layout_for(self, width, height, mode, max_num):
        return self.layout.layout_for(width, height, mode, max_num=max_num)

    def image_tokens(self, layout, mode):
        return self.layout.tokens_for(layout, mode)["total"]

    def layout_values(self, layout):
        return self.assembly.layout_values(layout)

    def dtype_values(self, dtype):
        return self.assembly.dtype_values(dtype)


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

    def vision_formula(self, mode, metric):
        return assembly.formula(mode, "vision", metric)

    def e2e_formula(self, mode, metric, variants):
        return assembly.formula(mode, assembly.E2E, metric, variants)

    def lm_graph(self, mode, variants, batch):
        return _lm(mode.crop_mode, variants, batch)

    def batched_graph(self, mode, engine_name, batch=ES.batch):
        return batched_graph(mode.crop_mode, engine_name, batch)

    def prompt_length(self, mode):
        from .decoder import prompt_length
        return prompt_length(mode.crop_mode)

    def kv_bytes_per_token(self, dtype="bf16"):
        return kv_bytes_per_token(dtype)

    def decode_experts(self, batch):
        return decode_experts(batch)


SERVED = DeepSeekOCRServed()


def engine(name: str) -> Engine:
    return SERVED.engine(name)


# ---- the batched graph --------------------------------------------------------------------------

@lru_cache(maxsize=None)
def batched_graph(crop_mode: bool, engine_name: str, batch=ES.batch) -> CostGraph:
    """The language model of `engine` with `batch` sequences per step (symbolic B by default)."""
    e = engine(engine_name)
    g = _lm(crop_mode, e.variants, batch)
    return vllm_graph(g) if e.paged else g


def decode_step_formula(mode: Mode, engine_name: str, metric: str, dtype: str = "bf16"):
    """One decode step of B sequences at context C (each sequence's attended length), in closed form:
    symbolic in B and C (`costgraph.symbols.batch`, `context`); decode costs depend on the page only
    through its context. The weights' share is the term without B (the routed experts' part grows
    with B as 1 - (58/64)^B); every term in B is per sequence (its KV cache, its tokens)."""
    return SERVED.decode_step_formula(mode, engine_name, metric, dtype)


def vision_batch(mode: Mode, layouts: list[Layout], metric: str = "flops", dtype: str = "bf16") -> int:
    """A batch of pages through the vision encoders: both engines encode image by image (the global
    view, then the page's crop batch), so the batch costs the sum of its pages' `vision` totals."""
    return SERVED.vision_batch(mode, layouts, metric, dtype)


def decode_experts(batch: int) -> dict:
    """Distinct experts one MoE layer runs in a decode step of `batch` sequences: the prediction and the bound."""
    return {"expected_uniform": float(expected_experts_hit(LM, batch)),
            "bound": int(experts_hit_bound(LM, batch)), "used": "expected_uniform"}


# ---- pages, step times, memory, the simulation (the generic ones, for DeepSeek-OCR) ----------------------

def page(mode: Mode, width: int, height: int, eng: Engine, text_tokens: int, output_tokens: int) -> Page:
    return SERVED.page(mode, width, height, eng, text_tokens, output_tokens)


def prompt_tokens(mode: Mode, p: Page) -> int:
    return SERVED.prompt_tokens(mode, p)


class StepModel(_StepModel):
    """Predicted seconds of serving steps on one preset: vision per page, batched prefill, batched decode."""

    def __init__(self, mode: Mode, eng: Engine, hw, dtype: str = "bf16", eff=None):
        super().__init__(SERVED, mode, eng, hw, dtype, eff)


def weight_bytes(mode: Mode, dtype: str = "bf16") -> int:
    return SERVED.weight_bytes(mode, dtype)


def kv_bytes_per_token(dtype: str = "bf16") -> int:
    from costgraph.evaluate import substitute
    return substitute(kv_cache_bytes_per_token(LM), assembly.dtype_values(dtype))


def activation_bytes(mode: Mode, p: Page, tokens: int, eng: Engine, dtype: str = "bf16") -> int:
    return SERVED.activation_bytes(mode, p, tokens, eng, dtype)


def serve(mode: Mode, pages: list[Page], eng: Engine, hw, cfg: ServeConfig = ServeConfig(), dtype: str = "bf16",
          progress=None) -> dict:
    """Simulate serving `pages` (in order) on one preset; returns the summary with its inputs."""
    return SERVED.serve(mode, pages, eng, hw, cfg, dtype, progress)
