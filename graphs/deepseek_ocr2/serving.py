"""Serving DeepSeek-OCR 2: its engines and its batched language model, for the model-generic simulation
(`costgraph.graphs.serving`; `costgraph serve --model deepseek-ocr-2`, `costgraph dataset --model ...`).

Engines (`--engine`), each a set of variants; every output names its engine:
- `hf`: `transformers`' `generate` path, the ground truth (`DeepseekOcr2ForConditionalGeneration`): eager
  attention (full L x L scores, as the CPU reference runs it), lm_head at the last position (`generate`
  passes `logits_to_keep=1`), RoPE tables once per forward, `DynamicCache` (every decode step
  concatenates the whole cache: a copy), the placeholder merge of the image features, every kernel
  launched from Python (eager), static batches (a batch ends when its longest sequence does; prompts
  padded to the longest), at most 6 crops (the processor's `max_patches`, `config.MAX_CROPS`).
- `vllm`: SPEC gives no serving settings specific to DeepSeek-OCR 2, so DeepSeek-OCR's vendor vLLM script's
  are assumed (SPEC section 8): flash/paged attention (the causal half; decode reads the paged cache),
  logits only at the sampled position, RoPE from a cached table, K and V written into the paged cache in
  place, at most 6 crops, CUDA graphs for decode steps (prefill eager), continuous batching with
  `max_num_seqs` 100, `gpu_memory_utilization` 0.9, `max_model_len` 8192 and KV blocks of 256 tokens.
Both encode the pages image by image (the global view, then the crop batch).

Batches: the language model (DeepSeek-OCR's DeepSeek-V2 blocks, `decoder.py`) with `costgraph.symbols.batch`
(B) sequences per step: weights read once per step, a KV cache each, a decode step's B tokens meeting
E (1 - ((E - k) / E)^B) distinct experts (expected under uniform routing; the bound min(E, k B) beside it).
B = 1 is the per-page graph's language model exactly.

No throughput is published for DeepSeek-OCR 2 (SPEC): `published` is None and nothing is compared.
"""
from __future__ import annotations

from costgraph.graphs.deepseek_ocr.serving import CropGridServed
from costgraph.graphs.serving import Engine
from . import assembly, decoder, layout as layout_module
from .config import LM, MAX_CROPS, MAX_POSITIONS
from .decoder import Variants

ENGINES = {
    "hf": Engine("hf", decoder.DEFAULT, MAX_CROPS, False, False, "static", 1,
                 "transformers generate: eager attention, logits at the last position, RoPE once, DynamicCache, "
                 "eager kernels, static padded batches"),
    "vllm": Engine("vllm", Variants(attention="flash", lm_head="last", rope="once"), MAX_CROPS, True, True,
                   "continuous", 256,
                   "DeepSeek-OCR's vendor vLLM settings assumed: flash/paged attention, logits at the sampled "
                   "position, CUDA graphs for decode, continuous batching, KV blocks of 256"),
}


class DeepSeekOCR2Served(CropGridServed):
    engines = ENGINES
    published = None          # SPEC publishes no throughput for DeepSeek-OCR 2
    max_positions = MAX_POSITIONS
    layout = layout_module
    assembly = assembly
    lm = LM

    @property
    def model(self):
        from . import MODEL
        return MODEL

    def check_sequence(self, mode, layout, text_tokens, output_tokens):
        assembly.sequence_record(layout, text_tokens, output_tokens, mode)

    def vision_graph(self, mode):
        return assembly.vision_graph()

    def vision_scopes(self, mode):
        return ("vision.global", "vision.crops")   # the crop scope runs only for a tiled page (multiplicity)

    def lm_graph(self, mode, variants, batch):
        return assembly.lm_graph(variants, batch=batch)


SERVED = DeepSeekOCR2Served()
