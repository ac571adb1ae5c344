"""DeepSeek-OCR 2 as a `costgraph.model.Model`: the vision tower (SAM + Qwen2-style encoder with learned
queries + projector) over a page's global view and crops, then the DeepSeek-V2 MoE language model
(prefill, decode). The ground truth is `transformers`' own `DeepseekOcr2ForConditionalGeneration`.

Files: `config.py` (the release as data), `symbols.py`, `layout.py` (the processor's crop rule and token
counts), `ops.py` (op formulas only this model runs), `vision.py` (one batch of views), `decoder.py` (the
language model: DeepSeek-OCR's blocks, what differs), `assembly.py` (scopes, the image slots, the whole
graph). This module adapts them to the interface the app uses.
"""
from __future__ import annotations

from costgraph import forms
from costgraph.graphs.deepseek_ocr import (METRIC_NOTES, CropGridLM, batch_rule, crop_grid_columns, page_layout,
                                            page_layout_columns, positions_unrunnable, training_options)
from costgraph.graphs.deepseek_ocr.layout import crops_run
from costgraph.model import Point, VariantOption
from . import assembly, decoder, layout as L, training
from . import symbols as S
from .config import DEFAULT_MODE, DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, MAX_CROPS, MAX_POSITIONS, MODES

RELEASED_PARAMETERS = 3_389_119_360   # the release's count (Unsloth's OCR-2 figure minus its LoRA parameters)


class DeepSeekOCR2(CropGridLM):
    name = "deepseek-ocr-2"
    label = "DeepSeek-OCR 2"
    title = "DeepSeek-OCR 2 (SAM ViT-B + Qwen2 encoder with learned queries + projector, DeepSeek-V2 MoE 3B)"
    modes = MODES
    default_mode = DEFAULT_MODE
    composites = {**assembly.COMPOSITE, **training.COMPOSITE}
    report_parts = {assembly.E2E: assembly.E2E_PARTS, **training.REPORT_PARTS}
    variant_options = (
        VariantOption("attention", tuple(decoder.ATTENTION), decoder.DEFAULT.attention,
                      "eager: full L x L (the CPU reference); flash: causal half; uncounted: 0"),
        VariantOption("lm_head", decoder.LM_HEAD, decoder.DEFAULT.lm_head,
                      "prefill lm_head over all prompt positions (a plain forward) or the last (generate); a "
                      "training step computes all"),
    ) + training_options(decoder.TRAIN, "what trains (--phase train): lm (vision frozen), full, lm+encoder+projector "
                                        "(SAM frozen), lora (on the language model's Linear modules)")
    recipes = (("LoRA r=16 (q,k,v,o,gate,up,down of the LM; routed experts are not Linear modules)",
                {"train": "lora", "lora_rank": 16}),
               ("LM, vision frozen", {"train": "lm"}),
               ("LM + encoder + projector (SAM frozen)", {"train": "lm+encoder+projector"}),
               ("full", {"train": "full"}))
    max_positions = MAX_POSITIONS
    default_table_rows = "default:1x1,default:2x1,default:2x2,default:2x3,default:3x2,default:6x1"
    published = {"parameters": RELEASED_PARAMETERS}

    # ---- serving ------------------------------------------------------------------------------
    def serving(self):
        """What `costgraph serve` and `costgraph dataset` need of this model (`serving.SERVED`)."""
        from .serving import SERVED
        return SERVED

    # ---- modes and variants -----------------------------------------------------------------
    def variants(self, **options):
        return decoder.variants(**options)

    def variant_sets(self):
        """Every inference variant (attention x lm_head), and a training step for each `--train` setting at
        its defaults (LoRA r=16, AdamW, no checkpointing, one page)."""
        sets = [{"attention": a, "lm_head": h, "phase": "inference", "train": "lm"}
                for a in decoder.ATTENTION for h in decoder.LM_HEAD]
        return sets + [{"attention": "eager", "lm_head": "all", "phase": "train", "train": t} for t in decoder.TRAIN]

    def mode_values(self, mode):
        return {}   # the view sides are the release's numbers in the graph

    # ---- graph and scopes -------------------------------------------------------------------
    def graph(self, mode, variants):
        if variants.training:
            return training.train_graph(variants)[0]
        return assembly.model_graph(variants)

    def scopes(self, mode, variants=None):
        if variants is not None and variants.training:
            return training.scopes_for(mode)
        return assembly.scopes_for(mode)

    def stages(self, mode, variants=None):
        return training.STAGES if variants is not None and variants.training else assembly.STAGES

    def roofline_stages(self, mode, variants=None):
        if variants is not None and variants.training:
            return self.TRAINING_ROOFLINE_STAGES
        return assembly.ROOFLINE_STAGES

    def formula(self, mode, scope, metric, variants):
        if variants.training:
            return training.formula(scope, metric, variants)
        return assembly.formula(scope, metric, variants)

    def peak_samples(self, mode, variants):
        """A training step's domain (every grid up to 6 crops and 1x1; see `training_peak_samples`);
        inference: None (every undominated candidate)."""
        if not variants.training:
            return None
        return self.training_peak_samples([(1, 1)] + L.candidate_grids(2, MAX_CROPS), [{}])

    def prompt_length(self, mode):
        return 1 + S.text_tokens + assembly.image_slots()

    def kv_cache_bytes(self, context):
        return decoder.kv_cache_bytes(context)

    # ---- closed forms -----------------------------------------------------------------------
    def form_rules(self, mode):
        return FORM_RULES

    def metric_note(self, metric, variants=None):
        training_step = variants is not None and variants.training
        return METRIC_NOTES.get(metric, "") + " " + (TRAINING_NOTE if training_step else STRUCTURE_NOTE)

    # ---- inputs -----------------------------------------------------------------------------
    def default_sequence(self):
        return {"text_tokens": DEFAULT_TEXT_TOKENS, "output_tokens": DEFAULT_OUTPUT_TOKENS}

    def point(self, mode, *, size=None, image=None, grid=None, max_num=MAX_CROPS, what_if=False,
              text_tokens=DEFAULT_TEXT_TOKENS, output_tokens=DEFAULT_OUTPUT_TOKENS, output_text_tokens=None,
              batch=None) -> Point:
        """A page (by size, image file or crop grid) and what the language model runs for it."""
        if output_text_tokens is not None:
            raise ValueError("DeepSeek-OCR 2 defines no valid-token rule: no compression ratio "
                             "(--output-text-tokens is DeepSeek-OCR's)")
        mode = mode or MODES[DEFAULT_MODE]
        lay, note = page_layout(L, assembly.layout_for_image, mode, size, image, grid, max_num, what_if)
        rec = {"layout": assembly.layout_record(lay, mode),
               "sequence": assembly.sequence_record(lay, text_tokens, output_tokens, mode)}
        if note:
            rec["layout"]["what_if"] = note
        if batch is not None:
            rec["sequence"]["batch"] = batch
        values = {**assembly.layout_values(lay),
                  **self.sequence_values(text_tokens, output_tokens, 1 if batch is None else batch)}
        r = rec["layout"]
        what = f"what-if grid {r['w_crop']}x{r['h_crop']} ({note})" if note else \
            f"page {r['width']}x{r['height']} -> grid {r['w_crop']}x{r['h_crop']}"
        label = f"{what}, {r['num_crops']} crops, {r['image_tokens']} image tokens (256 + 144 x crops + 1 separator)"
        return Point(values, rec, label, note)

    def summary_columns(self, layout: dict) -> dict:
        return {"page": f"{layout['width']}x{layout['height']}", "grid": f"{layout['w_crop']}x{layout['h_crop']}",
                "crops": layout["num_crops"], "image tokens": layout["image_tokens"],
                "without separator": layout["paper_tokens"]}

    def describe(self, mode, point, variants, dtype):
        r, q = point.record["layout"], point.record["sequence"]
        run = self.training_run(point.record) if variants.training else (
            f"prompt {q['prompt_tokens']} tokens (1 BOS + {r['image_tokens']} image + {q['text_tokens']} "
            f"text), {q['output_tokens']} output tokens (prefill + {q['decode_forwards']} decode forwards)")
        return [f"mode {mode.name} ({mode.note})", point.label, run, f"variants: {variants.label()}; storage dtype {dtype}"]

    # ---- tables and sweeps --------------------------------------------------------------------
    def table_point(self, mode, grid, *, max_num=MAX_CROPS, **options) -> Point:
        if grid is None:
            raise ValueError(f"mode {mode.name} crops: give its grid, e.g. {mode.name}:2x3 (1x1: no crops)")
        return self.point(mode, grid=grid, max_num=max_num, **options)

    def table_cells(self, mode, point):
        r = point.record["layout"]
        views = f"1x{mode.base_size}" + (f" + {r['num_crops']}x{mode.image_size}" if r["tiled"] else "")
        return [("grid", "grid", f"{r['w_crop']}x{r['h_crop']}"), ("views", "views (count x side px)", views),
                ("image_tokens", "image tokens", r["image_tokens"]),
                ("paper_tokens", "without separator", r["paper_tokens"])]

    def point_exprs(self, mode):
        tokens = L.image_tokens(mode)
        return {"image_tokens": tokens["total"], "paper_tokens": tokens["paper"]}

    def grid_columns(self, mode, grids=None, max_num=None, **options):
        return crop_grid_columns(L, mode, grids, MAX_CROPS if max_num is None else max_num,
                                 f"a page within {mode.image_size}x{mode.image_size} gets no crops; reported as 1x1")

    def page_columns(self, mode, widths, heights, max_num=None, **options):
        return page_layout_columns(L, mode, widths, heights, MAX_CROPS if max_num is None else max_num)

    def unrunnable(self, cols, sequence):
        return positions_unrunnable(cols, sequence, MAX_POSITIONS)

    # ---- parameters -------------------------------------------------------------------------
    def param_parts(self):
        return {"vision_parts": {"sam": ("vision.global", "sam."), "encoder": ("vision.global", "encoder."),
                                 "projector": ("vision.global", "projector")}}

    def param_lines(self, p):
        v = p["vision_parts"]
        total = p["resident"]
        lines = [f"  vision: SAM {v['sam']:,}, encoder {v['encoder']:,} (both query tables included), projector "
                 f"{v['projector']:,}; checkpoint {total:,} (release: {RELEASED_PARAMETERS:,}"
                 f"{', equal' if total == RELEASED_PARAMETERS else ', DIFFERENT'})"]
        if "active_per_token" in p:
            lines.append(f"  decoder active per token: {p['active_per_token']:,} "
                         f"({p['active_per_token_without_embedding_row']:,} without the embedding row)")
        return lines


FORM_RULES = (
    forms.IndicatorRule(
        crops_run(),
        forms.Assumption("tiled", "w_crop*h_crop >= 2: the page is tiled (its longest side over 768 px); the 1x1 "
                                  "layout means no crops and is given separately",
                         r"w_{\mathrm{crop}} h_{\mathrm{crop}} \geq 2"),
        "no-crop layout 1x1 (page within 768x768)", ((S.w_crop, 1), (S.h_crop, 1))),
    batch_rule("several pages' global views are a non-contiguous batch for the projector (a copy, the bias added "
               "apart) and SAM's global-attention heads are materialised (one view's are views)"),
    forms.BoundRule("experts", "every MoE layer's experts loop runs all {values} experts: min(experts, k*L) = "
                               "experts, i.e. the prompt routes at least that many rows (any DeepSeek-OCR 2 prompt: "
                               "k*L >= 6*258 > 64)", r"\min(E, kL) = E"),
)

STRUCTURE_NOTE = ("The global view (1024) runs first, then a batch of w_crop*h_crop crops (768); the layout 1x1 (a "
                  "page within 768x768) means no crops, hence the Piecewise factor. The prompt is 1 + text_tokens + "
                  "256 + 144*crops + 1; decode sums forwards t = 1..output_tokens-1 over a context of prompt + t.")

TRAINING_NOTE = ("A training step as transformers runs it: B pages' global views in one batch and their crops in "
                 "another (1x1 means no crops), one forward over B sequences of 1 + image tokens + text_tokens "
                 "(prompt and answer), the loss, the backward of what trains (backward.*), recomputed layers under "
                 "checkpointing, one optimizer update per trained parameter.")

MODEL = DeepSeekOCR2()
