"""The model interface: what a model package gives the engine's analyses and the app.

A model (`graphs/<model>/`) knows its config, its symbols, how an input (a page, an image size, a
grid) becomes a substitution, and how to build its cost graph for a mode. Everything else (totals,
closed forms, parameters, peaks, roofline, tables, sweeps, plots, the CLI) is generic over this
interface; a new model is a new package that subclasses `Model`, never an edit of the engine.

Vocabulary:
- mode: a named configuration of the model (an image side, a view layout; e.g. vit-b16-224): an
  object with `name` and `note`; `mode_values(mode)` is its substitution (sizes, patch).
- scope: a subgraph (`encoder.layers`) or a composite, a sum of scopes (`e2e` = encoder + decoder);
  `composites` maps a composite to its parts and `report_parts` to what a report breaks it into.
- stage: a scope that runs as one step (one liveness pass, one roofline row).
- variants: how the model is run (attention kernel, lm_head positions...): a hashable record with
  `as_dict()` and `label()`, built by `variants(**options)` from `variant_options`.
- point: the values of the model's free symbols for one input (a page's layout, the sequence
  lengths, the storage dtype), and a record describing that input for people and JSON.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import sympy as sp

from .dtypes import storage_values


@dataclass(frozen=True)
class VariantOption:
    """One command-line choice of how the model runs (e.g. --attention eager|flash). No `choices`: a
    free value, read by `parse` (e.g. int for a LoRA rank)."""
    name: str
    choices: tuple[str, ...]
    default: Any
    help: str
    parse: Any = str


@dataclass(frozen=True)
class Point:
    """One input of the model: symbol values and what they describe.

    `values`: every free symbol of the model's formulas except the storage dtype's (that comes
    from the dtype option). `record`: a JSON-able description (page size, grid, tokens...).
    `label`: one line for people. `what_if`: the input is not one the model's own rules would
    produce (an explicit grid beyond the layout rule), labelled so in every output."""
    values: Mapping[sp.Symbol, int]
    record: dict
    label: str
    what_if: str | None = None


@dataclass(frozen=True)
class PageRule:
    """How an input's size becomes a point, for a page that computes it in the browser (`costgraph explore`).

    `kernel(width, height, data, grids)`: the model's own rule, written in the elementwise-numpy
    subset that the app translates to JavaScript (costgraph.app.pyjs); it returns a dict of integers (and
    booleans): the point symbols' values by name and what the page shows of the input (`too_elongated`:
    an input the model refuses). None: the size changes nothing (an image resized to the mode's side).
    `data`: per mode, the plain values the kernel reads; `grids`: per max_num, the candidates it walks.
    `exprs`: per mode, record fields as expressions in the point symbols and the sequence symbols (token
    counts, the prompt, the positions a generation needs: `positions`, checked against max_positions).
    `max_num`: (lowest, highest, default) of a `--max-num` control, or None."""
    kernel: Callable | None
    data: Mapping[str, dict]
    exprs: Mapping[str, Mapping[str, sp.Expr]]
    grids: Mapping[int, list] | None = None
    max_num: tuple[int, int, int] | None = None


class Model:
    """Subclass and fill in; the defaults describe a model with one scope and no language model."""

    name: str = ""                 # the --model name
    title: str = ""
    modes: Mapping[str, Any] = {}
    default_mode: str = ""
    composites: Mapping[str, tuple[str, ...]] = {}
    report_parts: Mapping[str, tuple[str, ...]] = {}
    variant_options: tuple[VariantOption, ...] = ()
    generates: bool = False        # a language model: text/output tokens, decode, KV cache
    max_positions: int | None = None
    # symbols a closed form is a polynomial in (the term symbols), in the order terms are spelled,
    # and products of them that have a name of their own ((w, h) -> "tile")
    term_symbols: tuple[sp.Symbol, ...] = ()
    term_groups: Mapping[tuple[sp.Symbol, ...], str] = {}
    latex_names: Mapping = {}      # symbol -> LaTeX where this model's differs from the registry's
    label: str = ""                # the model as a paper names it ("ViT")
    default_table_rows: str = ""   # `table --rows` default
    point_symbols: tuple = ()      # the symbols a sweep varies per point (the rest are fixed)
    lm_scope: str | None = None    # the language model's root scope (generating models)
    prefill_scope: str | None = None

    # ---- modes and variants -----------------------------------------------------------------
    def get_mode(self, name: str):
        if not name or name not in self.modes:
            raise ValueError(f"unknown mode {name!r} for {self.name} (choose from {', '.join(self.modes)})")
        return self.modes[name]

    def variants(self, **options):
        raise NotImplementedError

    def variant_sets(self) -> list[dict]:
        """Representative sets of variant options (what an explorer page offers): by default every
        combination of the options that have choices."""
        opts = [o for o in self.variant_options if o.choices]
        return [dict(zip([o.name for o in opts], c)) for c in itertools.product(*[o.choices for o in opts])]

    def sequence_fixed(self, variants) -> dict:
        """Sequence values a variant fixes whatever is asked (a training step: no output tokens)."""
        return {}

    def mode_values(self, mode) -> dict[sp.Symbol, int]:
        raise NotImplementedError

    def dtype_values(self, dtype: str) -> dict[sp.Symbol, int]:
        return storage_values(dtype)

    # ---- graph and scopes -------------------------------------------------------------------
    def graph(self, mode, variants):
        """The cost graph of a mode (symbolic in the mode's sizes; `mode_values` substitutes them)."""
        raise NotImplementedError

    def scopes(self, mode, variants=None) -> tuple[str, ...]:
        """The scopes of a mode (under these variants: a training phase has its own)."""
        raise NotImplementedError

    def stages(self, mode, variants=None) -> tuple[str, ...]:
        raise NotImplementedError

    def roofline_stages(self, mode, variants=None) -> tuple[str, ...]:
        """The rows of a latency table (a stage or a scope made of stages)."""
        return self.stages(mode, variants)

    def formula(self, mode, scope: str, metric: str, variants) -> sp.Expr:
        """Total of a Cost metric over a scope; mode None: every size symbolic."""
        raise NotImplementedError

    def expand_scopes(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        """A composite comes with the parts a report breaks it into (e2e: vision, prefill, decode)."""
        out = []
        for s in scopes:
            if s in self.report_parts:
                out += list(self.report_parts[s])
            out.append(s)
        return tuple(dict.fromkeys(out))

    # ---- closed forms -----------------------------------------------------------------------
    def form_rules(self, mode) -> tuple:
        """The assumptions (costgraph.forms rules) that turn a total into a polynomial, in order."""
        return ()

    def metric_note(self, metric: str, variants=None) -> str:
        return ""

    # ---- inputs -----------------------------------------------------------------------------
    def point(self, mode, *, size=None, image=None, grid=None, max_num=None, what_if: bool = False,
              **sequence) -> Point:
        raise NotImplementedError

    def default_sequence(self) -> dict:
        """Sequence values (text_tokens, output_tokens) with their defaults; {} for a model that generates nothing."""
        return {}

    def check_sequence(self, **sequence) -> None:
        if sequence:
            raise ValueError(f"{self.name} generates no text: no {', '.join(sequence)}")

    def sequence_values(self, **sequence) -> dict:
        self.check_sequence(**sequence)
        return {}

    def page_rule(self) -> PageRule:
        """The input rule as data and a translatable kernel, for the explorer page."""
        raise NotImplementedError(f"{self.name} has no page rule for the explorer")

    def layout_record(self, point: Point) -> dict:
        """What the `layout` command prints for one input."""
        return point.record["layout"]

    # ---- tables and sweeps ------------------------------------------------------------------
    def table_point(self, mode, grid, **options) -> Point:
        """The input of one `table` row (`MODE[:GRID]`)."""
        raise NotImplementedError

    def table_cells(self, mode, point: Point) -> list[tuple[str, str, object]]:
        """(csv key, label, value) describing a row's input."""
        return []

    def point_exprs(self, mode) -> dict:
        """Per-point columns of a sweep beyond the metrics (e.g. token counts), as expressions."""
        return {}

    def page_columns(self, mode, widths, heights, max_num=None, **options):
        """Arrays of page sizes -> (columns, {point symbol name: array}, params) for a sweep."""
        raise ValueError(f"{self.name} has no page layout to sweep")

    def grid_columns(self, mode, grids=None, max_num=None, **options):
        """Grids -> (columns, {point symbol name: array}, (baseline point arrays, baseline record) or None,
        params) for a sweep; the baseline is a case reported beside the grids (e.g. a layout that runs no tiles)."""
        raise ValueError(f"{self.name} has no grids to sweep")

    def unrunnable(self, columns, sequence):
        """(mask of sweep points the model cannot run, why), or None."""
        return None

    def summary_columns(self, layout: dict) -> dict:
        """Columns of one input's layout record in a table of inputs (the `layout` command)."""
        return dict(layout)

    def describe(self, mode, point: Point, variants, dtype: str) -> list[str]:
        """Lines for people above a cost table."""
        return [point.label]

    # ---- parameters and memory --------------------------------------------------------------
    def peak_samples(self, mode, variants) -> dict | None:
        """Points of the model's domain (symbol name -> array) on which a peak's closed form keeps the
        candidates that win somewhere (`costgraph.liveness.liveness`'s `samples`); None: keep every
        undominated one (exact, and fine when they are few)."""
        return None

    def kv_cache_bytes(self, context) -> sp.Expr:
        raise NotImplementedError(f"{self.name} has no KV cache")

    def param_parts(self) -> Mapping[str, Mapping[str, tuple[str, str]]]:
        """Named groups of checkpoint parts for the parameter summary: group -> name -> (scope, path prefix)."""
        return {}

    def param_lines(self, summary: dict) -> list[str]:
        """Lines for people about the parameter summary (published figures beside ours)."""
        return []

    published: Mapping[str, float] = {}
    # fine-tuning recipes for `costgraph recipes`: (label, variant options of a training step)
    recipes: tuple[tuple[str, Mapping[str, Any]], ...] = ()


