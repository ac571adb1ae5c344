"""A second model on the same engine: the ViT image classifier of `transformers`
(`ViTForImageClassification`), symbolic in image side, patch side and batch.

`costgraph.graphs.vit.config` (the variants as data), `costgraph.graphs.vit.symbols`, `costgraph.graphs.vit.graph`
(`build_graph`, token counts, the variants' values); verified by `costgraph.verify.vit`. `MODEL` is the
`costgraph.model.Model` the app uses (`costgraph --model vit ...`): a mode is a variant
(vit-b16-224, ...); an image of any size is resized by the processor to the variant's side, so its
cost is the variant's.
"""
from __future__ import annotations

from functools import lru_cache

from costgraph import forms
from costgraph.model import Model, PageRule, Point
from costgraph.graphs.pages import page_size
from . import symbols as S
from .config import DEFAULT, DEFAULT_VARIANT, VARIANTS, VitConfig, get_variant
from .graph import SCOPES, build_graph, dtype_values, grid, mode_values, num_patches, num_tokens

__all__ = ["DEFAULT", "VARIANTS", "VitConfig", "get_variant", "build_graph", "dtype_values", "grid",
           "mode_values", "num_patches", "num_tokens", "MODEL"]


@lru_cache(maxsize=None)
def _graph(cfg: VitConfig):
    return build_graph(cfg)


class _Variants:
    """ViT has no run variants (SDPA attention, as transformers runs it)."""

    def as_dict(self) -> dict:
        return {}

    def label(self) -> str:
        return "sdpa attention"

    def __eq__(self, other):
        return isinstance(other, _Variants)

    def __hash__(self):
        return 0


class ViT(Model):
    name = "vit"
    label = "ViT"
    title = "ViT image classifier (transformers ViTForImageClassification, SDPA attention)"
    modes = VARIANTS
    default_mode = DEFAULT_VARIANT
    term_symbols = (S.batch,)
    latex_names = {S.image_size: r"S", S.patch_size: r"p", S.batch: r"B"}
    default_table_rows = ",".join(VARIANTS)
    point_symbols = ()

    def variants(self, **options):
        if options:
            raise ValueError(f"{self.name} has no variant options (got {', '.join(options)})")
        return _Variants()

    def mode_values(self, mode):
        return mode_values(mode)

    def graph(self, mode, variants):
        return _graph(DEFAULT if mode is None else mode)

    def scopes(self, mode, variants=None):
        return SCOPES

    def stages(self, mode, variants=None):
        return ("vit",)

    def formula(self, mode, scope, metric, variants):
        g = self.graph(mode, variants)
        if scope not in g.scopes:
            raise ValueError(f"unknown scope {scope!r} (choose from {', '.join(SCOPES)})")
        expr = g.total(scope)[metric]
        # symbolic: keep the sizes, one image; with a mode: its sizes
        return expr.subs(mode_values(mode)) if mode is not None else expr.subs(S.batch, 1)

    def form_rules(self, mode):
        return (forms.AlignedRule((S.image_size,), S.patch_size, DEFAULT.patch_size, None, self.latex_names),)

    def metric_note(self, metric, variants=None):
        return {"flops": "FLOPs in torch's convention (2 per multiply-add), matmul-class ops only."}.get(metric, "") \
            + " One image of side image_size in (image_size // patch_size)^2 + 1 tokens."

    def point(self, mode, *, size=None, image=None, grid=None, max_num=None, what_if=False, **sequence) -> Point:
        if sequence:
            raise ValueError(f"{self.name} generates no text: no {', '.join(sequence)}")
        if grid is not None:
            raise ValueError(f"{self.name} has no crop grid: give --size or --image")
        if image is not None:
            size = page_size(image)
        w, h = size if size is not None else (mode.image_size, mode.image_size)
        if w <= 0 or h <= 0:
            raise ValueError(f"image size must be positive integers, got {w}x{h}")
        tokens = int(num_tokens(mode.image_size, mode.patch_size))
        rec = {"image": {"width": w, "height": h, "resized_to": mode.image_size, "patch_size": mode.patch_size,
                         "tokens": tokens}}
        label = (f"image {w}x{h} -> resized to {mode.image_size}x{mode.image_size} by the processor, "
                 f"{tokens} tokens ({tokens - 1} patches of {mode.patch_size} px + the class token)")
        return Point({}, rec, label)

    def page_rule(self):
        """An image of any size is resized to the mode's side: the size changes nothing."""
        return PageRule(None, {name: {} for name in VARIANTS},
                        {name: {"resized_to": m.image_size, "patch_size": m.patch_size,
                                "tokens": num_tokens(m.image_size, m.patch_size)} for name, m in VARIANTS.items()})

    def summary_columns(self, record):
        return {"image": f"{record['width']}x{record['height']}", "resized to": record["resized_to"],
                "tokens": record["tokens"]}

    def layout_record(self, point):
        return point.record["image"]

    def describe(self, mode, point, variants, dtype):
        return [f"model {self.title}", f"mode {mode.name} ({mode.note})", point.label,
                f"variants: {variants.label()}; storage dtype {dtype}"]

    def table_point(self, mode, grid, *, max_num=None, **sequence):
        if grid is not None:
            raise ValueError(f"{self.name} has no crop grid: a row is a variant name")
        return self.point(mode)

    def table_cells(self, mode, point):
        r = point.record["image"]
        return [("image", "image side (px)", r["resized_to"]), ("patch", "patch (px)", r["patch_size"]),
                ("tokens", "tokens", r["tokens"])]

    def point_exprs(self, mode):
        return {"tokens": num_tokens(mode.image_size, mode.patch_size)}

    def page_columns(self, mode, widths, heights, max_num=None):
        return {"width": widths, "height": heights}, {}, {"resized_to": mode.image_size}

    def unrunnable(self, cols, sequence):
        return None

    def param_lines(self, p):
        return []


MODEL = ViT()
