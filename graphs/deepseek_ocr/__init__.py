"""DeepSeek-OCR as a `costgraph.model.Model`: the vision encoder over a page's views, then the
DeepSeek-V2 MoE language model (prefill, decode).

Files: `config.py` (the model as data), `symbols.py`, `layout.py` (`dynamic_preprocess` and the
token counts), `vision.py` (SAM + CLIP + projector for one view), `decoder.py` (the language
model), `assembly.py` (global + crop branches, token assembly, the whole graph), `published.py`
(the vendor's published figures). This module adapts them to the interface the app uses.
"""
from __future__ import annotations

import itertools

import numpy as np

from costgraph import forms
from costgraph.ops import more_than_one
from costgraph.model import Model, PageRule, Point, VariantOption
from . import assembly, decoder, layout as L, training
from . import symbols as S
from .config import DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, MAX_CROPS, MAX_POSITIONS, MODES, VISION
from .published import PARAM_PARTS, PUBLISHED


def training_options(train: tuple[str, ...], train_help: str) -> tuple[VariantOption, ...]:
    """The variant options of the training phase (`train`: what may train, described by `train_help`)."""
    return (
        VariantOption("phase", decoder.PHASES, "inference",
                      "inference: vision, prefill, decode; train: a fine-tuning step (forward, loss, backward, "
                      "optimizer) per micro-batch of --batch pages"),
        VariantOption("train", train, "lm", train_help),
        VariantOption("lora_rank", (), 16, "LoRA rank r (--train lora)", parse=int),
        VariantOption("lora_alpha", (), 16, "LoRA alpha (scaling alpha/r; --train lora)", parse=int),
        VariantOption("lora_targets", (), ",".join(decoder.LORA_TARGETS),
                      "LoRA targets among q,k,v,o,gate,up,down (the <name>_proj modules; --train lora)"),
        VariantOption("optimizer", decoder.OPTIMIZERS, "adamw",
                      "optimizer state and update (--phase train): AdamW (two fp32 moments), 8-bit AdamW, SGD"),
        VariantOption("checkpointing", decoder.CHECKPOINTING, "none",
                      "gradient checkpointing (--phase train): none, or per decoder layer (recomputed before "
                      "its backward)"),
    )


class CropGridLM(Model):
    """What DeepSeek-OCR and DeepSeek-OCR 2 share as models: views of a page on a crop grid (w_crop x h_crop),
    then a generating language model (prefill, decode), and fine-tuning steps of B pages."""
    generates = True
    lm_scope = "decoder"
    prefill_scope = "decoder.prefill"
    term_symbols = (S.w_crop, S.h_crop, S.text_tokens, S.output_tokens)
    term_groups = {(S.w_crop, S.h_crop): "crop"}
    point_symbols = (S.w_crop, S.h_crop)
    TRAINING_ROOFLINE_STAGES = ("vision", "decoder", "backward", "recompute", "optimizer")

    def sequence_fixed(self, variants) -> dict:
        """Sequence values a variant fixes: a training step generates nothing (output_tokens 1)."""
        return {"output_tokens": 1} if variants.training else {}

    def check_sequence(self, text_tokens, output_tokens, batch=1):
        self.sequence_values(text_tokens, output_tokens, batch)
        check_positions(text_tokens, output_tokens, self.max_positions)

    def sequence_values(self, text_tokens, output_tokens, batch=1):
        """The sequence symbols' values; `batch`: pages per training micro-batch (a training step's B)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        return {**assembly.sequence_values(text_tokens, output_tokens), S.batch: batch}

    def training_run(self, record: dict) -> str:
        """A training step's sequence in words (`describe`)."""
        r, q = record["layout"], record["sequence"]
        return (f"training step: {q.get('batch', 1)} page(s), each a sequence of {q['prompt_tokens']} tokens "
                f"(1 BOS + {r['image_tokens']} image + {q['text_tokens']} text: prompt and answer)")

    def training_peak_samples(self, grids, mode_values: list[dict]) -> dict:
        """A training step's domain for its peak's closed form: the given grids (1x1 included) under each
        of `mode_values`, prompts of 0..7,000 text tokens, batches of 1..32, both storage dtypes."""
        axes = [mode_values, grids, [0, 16, 64, 256, 1024, 2048, 4096, 7000], [1, 2, 4, 8, 32], [2, 4]]
        rows = [{**{k.name: v for k, v in sizes.items()}, "w_crop": w, "h_crop": h, "text_tokens": t, "batch": b,
                 "dtype_bytes": d}
                for sizes in axes[0] for (w, h) in axes[1] for t in axes[2] for b in axes[3] for d in axes[4]]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


class DeepSeekOCR(CropGridLM):
    name = "deepseek-ocr"
    title = "DeepSeek-OCR (SAM ViT-B + CLIP-L + projector, DeepSeek-V2 MoE 3B)"
    modes = MODES
    default_mode = "gundam"
    composites = {**assembly.COMPOSITE, **training.COMPOSITE}
    report_parts = {assembly.E2E: assembly.E2E_PARTS, **training.REPORT_PARTS}
    variant_options = (
        VariantOption("attention", tuple(decoder.ATTENTION), "eager",
                      "eager: full L x L (vendor HF); flash: causal half; uncounted: 0, as profilers "
                      "blind to flash kernels report"),
        VariantOption("lm_head", decoder.LM_HEAD, "all",
                      "prefill lm_head over all prompt positions (vendor HF) or the last (vLLM)"),
        VariantOption("rope", decoder.ROPE, "vendor",
                      "vendor: cos/sin recomputed per layer (a small matmul); once: per forward, "
                      "elementwise (transformers 5.x)"),
    ) + training_options(decoder.TRAIN, "what trains (--phase train): lm (vendor HF: vision under no_grad), full, "
                                        "lm+clip+projector (SAM frozen), lora")
    max_positions = MAX_POSITIONS
    latex_names = {S.base_size: r"S_{\mathrm{base}}", S.image_size: r"S_{\mathrm{crop}}", S.patch_size: r"p"}
    published = PUBLISHED
    recipes = (("LoRA r=16 (Unsloth: q,k,v,o,gate,up,down)", {"train": "lora", "lora_rank": 16}),
               ("LM, vision frozen (vendor HF)", {"train": "lm"}),
               ("LM + CLIP + projector (SAM frozen)", {"train": "lm+clip+projector"}),
               ("full", {"train": "full"}))

    # ---- serving ------------------------------------------------------------------------------
    def serving(self):
        """What `costgraph serve` and `costgraph dataset` need of this model (`serving.SERVED`)."""
        from .serving import SERVED
        return SERVED

    # ---- modes and variants -----------------------------------------------------------------
    def variant_sets(self):
        """Every inference variant (attention x lm_head x rope), and a training step (the vendor HF path) for
        each `--train` setting at its defaults (LoRA r=16, AdamW, no checkpointing, one page)."""
        opts = [o for o in self.variant_options if o.name in ("attention", "lm_head", "rope")]
        names = [o.name for o in opts]
        sets = [{**dict(zip(names, c)), "phase": "inference", "train": "lm"}
                for c in itertools.product(*[o.choices for o in opts])]
        return sets + [{"attention": "eager", "lm_head": "all", "rope": "vendor", "phase": "train", "train": t}
                       for t in decoder.TRAIN]

    def variants(self, **options):
        decoder.check_training_options(options)
        return decoder.Variants(**options)

    def mode_values(self, mode):
        return assembly.mode_values(mode)

    # ---- graph and scopes -------------------------------------------------------------------
    def graph(self, mode, variants):
        crop_mode = True if mode is None else mode.crop_mode
        if variants.training:
            return training.train_graph(crop_mode, variants)[0]
        return assembly.model_graph(crop_mode, variants)

    def scopes(self, mode, variants=None):
        if variants is not None and variants.training:
            return training.scopes_for(mode)
        return assembly.scopes_for(mode)

    def stages(self, mode, variants=None):
        if variants is not None and variants.training:
            return training.STAGES
        g = self.graph(mode, decoder.VENDOR)
        return tuple(s for s in assembly.STAGES if s in g.scopes)

    def roofline_stages(self, mode, variants=None):
        if variants is not None and variants.training:
            return self.TRAINING_ROOFLINE_STAGES
        return assembly.ROOFLINE_STAGES

    def formula(self, mode, scope, metric, variants):
        if variants.training:
            return training.formula(mode, scope, metric, variants)
        return assembly.formula(mode, scope, metric, variants)

    def prompt_length(self, mode):
        return decoder.prompt_length(True if mode is None else mode.crop_mode)

    def peak_samples(self, mode, variants):
        """A training step's domain, for its peak's closed form: every released mode of the graph's kind
        (crop or native), every grid up to 9 crops and 1x1, prompts of 0..7,000 text tokens, batches of
        1..32, both storage dtypes. Inference: None (every undominated candidate)."""
        if not variants.training:
            return None
        crop = True if mode is None else mode.crop_mode
        modes = [m for m in MODES.values() if m.crop_mode == crop]
        grids = [(1, 1)] + (L.candidate_grids(2, MAX_CROPS) if crop else [])
        return self.training_peak_samples(grids, [assembly.mode_values(m) for m in modes])

    def kv_cache_bytes(self, context):
        return decoder.kv_cache_bytes(context=context)

    # ---- closed forms -----------------------------------------------------------------------
    def form_rules(self, mode):
        return FORM_RULES

    def metric_note(self, metric, variants=None):
        training = variants is not None and variants.training
        return METRIC_NOTES.get(metric, "") + " " + (TRAINING_NOTE if training else STRUCTURE_NOTE)

    # ---- inputs -----------------------------------------------------------------------------
    def default_sequence(self):
        return {"text_tokens": DEFAULT_TEXT_TOKENS, "output_tokens": DEFAULT_OUTPUT_TOKENS}

    def point(self, mode, *, size=None, image=None, grid=None, max_num=MAX_CROPS, what_if=False,
              text_tokens=DEFAULT_TEXT_TOKENS, output_tokens=DEFAULT_OUTPUT_TOKENS,
              output_text_tokens=None, batch=None) -> Point:
        """A page (by size, image file or crop grid) and what the language model runs for it;
        `output_text_tokens` (the page's OCR text in tokens) adds the compression ratio."""
        lay, note = page_layout(L, assembly.layout_for_image, mode, size, image, grid, max_num, what_if)
        rec = {"layout": assembly.layout_record(lay, mode, output_text_tokens),
               "sequence": assembly.sequence_record(mode, lay, text_tokens, output_tokens)}
        if note:
            rec["layout"]["what_if"] = note
        if batch is not None:
            rec["sequence"]["batch"] = batch
        values = {**assembly.layout_values(lay), **self.sequence_values(text_tokens, output_tokens, 1 if batch is None else batch)}
        r = rec["layout"]
        label = (f"page {r['width']}x{r['height']} -> grid {r['w_crop']}x{r['h_crop']}, {r['num_crops']} crops, "
                 f"{r['image_tokens']} image tokens ({r['paper_tokens']} without newlines/separator)")
        if note:
            label = f"what-if grid {r['w_crop']}x{r['h_crop']} ({note}), {r['num_crops']} crops, " \
                    f"{r['image_tokens']} image tokens ({r['paper_tokens']} without newlines/separator)"
        return Point(values, rec, label, note)

    def page_rule(self) -> PageRule:
        """The layout rule's kernels (layout.page_point) with each mode's data, the candidate grids per
        --max-num, and the token counts and sequence lengths as expressions in the grid and the sequence."""
        exprs = {}
        for name, mode in MODES.items():
            tokens = L.image_tokens(mode)
            prompt = 1 + S.text_tokens + tokens["total"]
            exprs[name] = {**{f"tokens.{k}": v for k, v in tokens.items()}, "image_tokens": tokens["total"],
                           "paper_tokens": tokens["paper"], "prompt_tokens": prompt,
                           "decode_forwards": S.output_tokens - 1, "final_context": prompt + S.output_tokens - 1,
                           "positions": prompt + S.output_tokens - 1}
        return PageRule(L.page_point, {name: L.page_data(m) for name, m in MODES.items()}, exprs,
                        {n: L.candidate_grids(L.MIN_CROPS, n) for n in range(L.MIN_CROPS, L.MAX_NUM_LIMIT + 1)},
                        (L.MIN_CROPS, L.MAX_NUM_LIMIT, MAX_CROPS))

    def summary_columns(self, layout: dict) -> dict:
        """A layout record's columns for a table of pages."""
        out = {"page": f"{layout['width']}x{layout['height']}", "grid": f"{layout['w_crop']}x{layout['h_crop']}",
               "crops": layout["num_crops"], "image tokens": layout["image_tokens"],
               "paper count": layout["paper_tokens"], "valid tokens": layout["valid_tokens"],
               "valid (paper ceil)": layout["valid_tokens_paper_ceil"]}
        if "compression_ratio" in layout:
            out[f"compression ({layout['output_text_tokens']} / valid)"] = _ratio_text(layout["compression_ratio"])
        return out

    # ---- tables and sweeps --------------------------------------------------------------------
    label = "DeepSeek-OCR"
    default_table_rows = "tiny,small,base,large,gundam:2x2,gundam:2x3,gundam:3x3,gundam:4x2"

    def table_point(self, mode, grid, *, max_num=MAX_CROPS, **options) -> Point:
        """A row is a mode and a grid, not a page: its valid tokens are those of the grid's nominal page
        (image_size*A x image_size*B, as `cost --grid` takes it)."""
        if mode.crop_mode and grid is None:
            raise ValueError(f"mode {mode.name} crops: give its grid, e.g. {mode.name}:2x3")
        return self.point(mode, grid=grid or (1, 1), max_num=max_num, **options)

    def table_cells(self, mode, point):
        r = point.record["layout"]
        if mode.crop_mode:
            views = f"1x{mode.base_size}" + (f" + {r['num_crops']}x{mode.image_size}" if r["tiled"] else "")
        else:
            views = f"1x{mode.image_size}"
        return [("grid", "grid", f"{r['w_crop']}x{r['h_crop']}" if mode.crop_mode else "-"),
                ("views", "views (count x side px)", views), ("image_tokens", "image tokens", r["image_tokens"]),
                ("paper_tokens", "paper count", r["paper_tokens"]), ("valid_tokens", "valid tokens", r["valid_tokens"]),
                ("valid_tokens_paper_ceil", "valid (paper ceil)", r["valid_tokens_paper_ceil"])] + \
            ([("compression_ratio", "compression", r["compression_ratio"])]
             if "compression_ratio" in r else [])

    def point_exprs(self, mode):
        tokens = L.image_tokens(mode)
        return {"image_tokens": tokens["total"], "paper_tokens": tokens["paper"]}

    def grid_columns(self, mode, grids=None, max_num=None, output_text_tokens=None):
        """Every grid the layout can produce under max_num (or the given ones), and the no-crop 1x1.
        Valid tokens need a page: each grid's nominal one (`layout_for_grid`), as `cost --grid` takes it."""
        if not mode.crop_mode:
            raise ValueError(f"mode {mode.name!r} does not crop: a grid sweep needs a crop mode (gundam, gundam-m)")
        max_num = MAX_CROPS if max_num is None else max_num
        cols, values, (one_values, no_crop), meta = crop_grid_columns(
            L, mode, grids, max_num, "a page within 640x640 gets no crops; the vendor reports its grid as 1x1")
        cols.update(_valid_columns(mode.image_size * values["w_crop"], mode.image_size * values["h_crop"],
                                   cols["num_crops"], mode, output_text_tokens))
        one = one_values["w_crop"]
        no_crop.update({k: _json_value(v[0]) for k, v in _valid_columns(
            one * mode.image_size, one * mode.image_size, 0 * one, mode, output_text_tokens).items()})
        meta.update(output_text_tokens=output_text_tokens, valid_tokens_page=GRID_PAGE_NOTE)
        return cols, values, (one_values, no_crop), meta

    def page_columns(self, mode, widths, heights, max_num=None, output_text_tokens=None):
        cols, values, meta = page_layout_columns(L, mode, widths, heights, MAX_CROPS if max_num is None else max_num)
        cols.update(_valid_columns(cols["width"], cols["height"], cols["num_crops"], mode, output_text_tokens))
        meta["output_text_tokens"] = output_text_tokens
        return cols, values, meta

    def unrunnable(self, cols, sequence):
        """Points whose prompt and output exceed the language model's positions."""
        return positions_unrunnable(cols, sequence, MAX_POSITIONS)

    def describe(self, mode, point, variants, dtype):
        r, q = point.record["layout"], point.record["sequence"]
        if variants.training:
            run = self.training_run(point.record)
        else:
            run = (f"prompt {q['prompt_tokens']} tokens (1 BOS + {r['image_tokens']} image + {q['text_tokens']} "
                   f"text), {q['output_tokens']} output tokens (prefill + {q['decode_forwards']} decode forwards)")
        return [f"mode {mode.name} ({mode.note})", point.label, _valid_tokens_line(r), run,
                f"variants: {variants.label()}; storage dtype {dtype}"]

    # ---- parameters -------------------------------------------------------------------------
    def param_parts(self):
        return PARAM_PARTS

    def param_lines(self, p):
        v = p["vision_parts"]
        lines = [f"  vision: SAM {v['sam']:,} (published ~80M), CLIP {v['clip']:,} (~300M, its unused conv "
                 f"included), projector {v['projector']:,}; DeepEncoder {p['resident_by_part'].get('vision', 0):,} "
                 f"(published ~380M)"]
        if "active_per_token" in p:
            lines.append(f"  decoder active per token: {p['active_per_token']:,} "
                         f"({p['active_per_token_without_embedding_row']:,} without the embedding row; "
                         f"published: 570M)")
        return lines


# ---- what DeepSeek-OCR 2 shares (its crop rule is another layout module with the same functions) ------------

def crop_grid_columns(rule, mode, grids, max_num: int, no_crop_note: str):
    """Every grid the layout `rule` (a layout module) produces under max_num (or the given ones) as sweep
    columns, and the no-crop 1x1 (with `no_crop_note`): `Model.grid_columns`' answer, to extend."""
    rule.check_max_num(max_num)
    explicit = grids
    grids = rule.candidate_grids(2, max_num) if grids is None else [tuple(g) for g in grids]
    for g in grids:
        rule.layout_for_grid(*g, mode)
        rule.check_grid(g, mode, max_num)
    w = np.array([g[0] for g in grids], dtype=np.int64)
    h = np.array([g[1] for g in grids], dtype=np.int64)
    cols = {"grid": np.array([f"{a}x{b}" for a, b in grids]), "w_crop": w, "h_crop": h,
            "num_crops": np.where(w * h > 1, w * h, 0)}
    one = np.ones(1, np.int64)
    no_crop = {"grid": "1x1", "w_crop": 1, "h_crop": 1, "num_crops": 0, "note": no_crop_note}
    source = f"every grid for at most {max_num} crops" if explicit is None else "grids " + ", ".join(
        f"{a}x{b}" for a, b in grids)
    return cols, {"w_crop": w, "h_crop": h}, ({"w_crop": one, "h_crop": one}, no_crop), \
        {"max_num": max_num, "source": source}


def page_layout(rule, layout_for_image, mode, size, image, grid, max_num: int, what_if: bool):
    """A page's layout under the layout `rule` (a layout module; `layout_for_image` for a page file), by crop
    grid, image file or size, and the what-if note of a grid the rule does not produce (None otherwise)."""
    if grid is not None:
        return rule.layout_for_grid(*grid, mode), rule.check_grid(grid, mode, max_num, what_if)
    if image is not None:
        return layout_for_image(image, mode, max_num), None
    return rule.layout_for(*size, mode, max_num=max_num), None


def page_layout_columns(rule, mode, widths, heights, max_num: int):
    """Pages' layouts under the layout `rule` as sweep columns: `Model.page_columns`' answer, to extend."""
    lay = rule.layouts_for(widths, heights, mode, max_num=max_num)
    cols = {"width": lay.width, "height": lay.height, "aspect": np.round(lay.width / lay.height, 6),
            "w_crop": lay.w_crop, "h_crop": lay.h_crop, "tiled": lay.tiled, "num_crops": lay.num_crops}
    return cols, {"w_crop": lay.w_crop, "h_crop": lay.h_crop}, {"max_num": max_num}


def positions_unrunnable(cols, sequence, max_positions: int):
    """Points whose prompt (1 + text + image tokens) and output exceed `max_positions`, and why."""
    need = 1 + sequence["text_tokens"] + cols["image_tokens"] + sequence["output_tokens"] - 1
    return need > max_positions, (f"prompt + output tokens exceed the language model's {max_positions:,} "
                                  f"positions (output_tokens {sequence['output_tokens']:,})")


def check_positions(text_tokens: int, output_tokens: int, max_positions: int) -> None:
    if 1 + text_tokens + output_tokens - 1 > max_positions:
        raise ValueError(f"text_tokens {text_tokens:,} and output_tokens {output_tokens:,} exceed the language "
                         f"model's {max_positions:,} positions before any image token")


GRID_PAGE_NOTE = "valid tokens of each grid's nominal page: image_size*w_crop x image_size*h_crop"


def _valid_columns(widths, heights, num_crops, mode, output_text_tokens=None) -> dict:
    """Valid tokens of pages (the vendor's int rule and the paper's ceil) and, with the page's output
    text tokens, the compression ratio (NaN where a page has no valid tokens)."""
    valid = L.valid_tokens_for(widths, heights, num_crops, mode)
    cols = {L.VALID_TOKENS: valid.vendor, L.VALID_TOKENS_PAPER_CEIL: valid.paper_ceil}
    if output_text_tokens is not None:
        cols["compression_ratio"] = L.compression_ratios(output_text_tokens, valid.vendor)
    return cols


def _json_value(x):
    """A numpy scalar as a JSON value: int, float, or None for NaN."""
    x = x.item()
    return None if isinstance(x, float) and x != x else x


def _ratio_text(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _valid_tokens_line(r: dict) -> str:
    """The layout record's valid tokens (and compression ratio) in words."""
    line = (f"valid tokens {r['valid_tokens']} (the vendor's int rule; {r['valid_tokens_paper_ceil']} with the "
            f"paper's ceil)")
    if "compression_ratio" in r:
        line += (f"; compression {_ratio_text(r['compression_ratio'])} = {r['output_text_tokens']} output text "
                 f"tokens / {r['valid_tokens']} valid")
    return line


def _released(step: int, sizes) -> str:
    ok = [m.name for m in MODES.values() if m.crop_mode and all(getattr(m, s.name) % step == 0 for s in sizes)]
    return ", ".join(ok) if ok else "none of the released crop modes (use --mode for their exact polynomial)"


def batch_rule(materialised: str) -> forms.IndicatorRule:
    """The closed forms' case split at batch = 1: for B >= 2, `materialised` (what several sequences copy
    where one's is a view)."""
    return forms.IndicatorRule(
        more_than_one(S.batch),
        forms.Assumption("batched", f"batch >= 2: {materialised}; batch = 1 is given separately", r"B \geq 2"),
        "one sequence, batch = 1", ((S.batch, 1),))


FORM_RULES = (
    forms.IndicatorRule(
        L.crops_run(),
        forms.Assumption("tiled", "w_crop*h_crop >= 2: the page is tiled (a side over 640 px); the 1x1 layout "
                                  "means no crops and is given separately",
                         r"w_{\mathrm{crop}} h_{\mathrm{crop}} \geq 2"),
        "no-crop layout 1x1 (page within 640x640)", ((S.w_crop, 1), (S.h_crop, 1))),
    forms.IndicatorRule(
        assembly.stitch_copies(),
        forms.Assumption("columns", "w_crop >= 2: the stitched crop grid is a copy (a single column of tiles stays "
                                    "a view); the w_crop = 1 case is given separately",
                         r"w_{\mathrm{crop}} \geq 2"),
        "single column w_crop = 1", ((assembly.stitch_copies(), 0), (S.w_crop, 1))),
    batch_rule("several sequences' attention heads are materialised before the score products (one sequence's are "
               "a view)"),
    forms.BoundRule("experts", "every MoE layer's experts loop runs all {values} experts: min(experts, k*L) = "
                               "experts, i.e. the prompt routes at least that many rows (any DeepSeek-OCR prompt: "
                               "k*L >= 6*74 > 64)", r"\min(E, kL) = E"),
    forms.AlignedRule(S.SIZES, S.patch_size, VISION.patch_size, _released,
                      {S.base_size: r"S_{\mathrm{base}}", S.image_size: r"S_{\mathrm{crop}}", S.patch_size: r"p"},
                      {S.patch_size: VISION.patch_size, S.downsample_ratio: VISION.downsample_ratio}),
)

STRUCTURE_NOTE = ("The crop branch runs w_crop*h_crop times; the layout 1x1 (a page within 640x640) means no crops, "
                  "hence the Piecewise factor. The prompt is 1 + text_tokens + image tokens; decode sums forwards "
                  "t = 1..output_tokens-1 over a context of prompt + t.")
TRAINING_NOTE = ("A training step: B pages' views (the crop branch w_crop*h_crop times per page; 1x1 means no "
                 "crops), one forward over B sequences of 1 + image tokens + text_tokens (prompt and answer), the "
                 "loss, the backward of what trains (backward.*), recomputed layers under checkpointing, one "
                 "optimizer update per trained parameter.")
METRIC_NOTES = {
    "flops": "FLOPs in torch's convention (2 per multiply-add), matmul-class ops only.",
    "elementwise_flops": "Elementwise FLOPs per aten op under costgraph/conventions.py (norms, softmax, "
                         "activations, adds; matmul-class ops count 0 here).",
    "bytes_read": "Bytes read, unfused: every op reads its inputs and weights (views move nothing; a gather "
                  "reads its indices and the rows it takes, not its table).",
    "bytes_written": "Bytes written, unfused: every op writes its outputs (views move nothing).",
    "activation_bytes": "Sum of the bytes of every op output written (not a memory need: see "
                        "peak_activation_bytes).",
    "bytes": "bytes_read + bytes_written (unfused: every op reads its inputs and weights, writes its outputs; "
             "a gather reads its indices and the rows it takes, not its table).",
    "params": "parameters the scope's nodes execute, each module once (not multiplied by crops or decode steps); "
              "the checkpoint (resident) count is `costgraph cost --metrics params`.",
    "weight_bytes": "bytes of the executed parameters at the storage dtype (the MoE router in fp32).",
    "active_params": "parameters one token uses: routed experts count experts_per_token of routed_experts, the "
                     "embedding table one row.",
    "peak_activation_bytes": "peak live bytes of op outputs (liveness in execution order; inputs, weights and KV "
                             "cache excluded); the crop batch holds w_crop*h_crop views; decode at t = "
                             "output_tokens-1; a scope's peak is the Max of its stages'.",
    "peak_memory_bytes": "a training step's peak memory: weights, gradients and optimizer state of what trains, "
                         "fp32 master copies (mixed precision), plus the step's activation peak (saved tensors live "
                         "until their gradient op); the peak's candidates are those that win somewhere on the sampled "
                         "domain (every grid the layout rule makes, 0..7,000 text tokens, batch 1..32).",
    "kv_cache_bytes": "KV cache bytes: K and V of every layer for every cached token (prefill: the prompt; decode: "
                      "the final context prompt + output_tokens - 1).",
}

MODEL = DeepSeekOCR()
