"""The per-mode table: the model's description of each row's input (DeepSeek-OCR: grid, view sizes,
image tokens: slots and the paper's count) and every metric per scope, for the rows asked (default:
the model's, e.g. the native modes and Gundam on typical grids); as Markdown, CSV or LaTeX (booktabs).

Values are exact (exact substitution); Markdown and LaTeX show them scaled (default 10^9), CSV exact.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

from costgraph.cost import METRICS
from costgraph.io import write_atomic
from costgraph.stages import totals as exact_totals
from .args import (dtype_arg, input_options, max_num_arg, model_arg, model_of, output_text_tokens_arg, sequence_args,
                   sequence_of, variant_args, variants_of)
from .models import get_model
from .text import UserError, parse_size

FORMATS = ("md", "csv", "latex")
SCALES = {"1": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}


@dataclass(frozen=True)
class Row:
    mode: str
    cells: tuple         # the model's description: (csv key, label, value), e.g. ("grid", "grid", "2x3")
    totals: dict         # scope -> metric -> int


def parse_rows(text: str) -> list[tuple[str, tuple[int, int] | None]]:
    """'tiny,base,gundam:2x3,...' -> [(mode, grid or None)]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        mode, _, grid = item.partition(":")
        out.append((mode.strip(), parse_size(grid) if grid else None))
    if not out:
        raise UserError(f"no rows in {text!r}: expected e.g. MODE or MODE:GRID, comma-separated")
    return out


def build_rows(spec, sequence: dict | None = None, variants=None, metrics=METRICS, dtype: str | None = None,
               model=None, max_num: int = 9, **options) -> list[Row]:
    """One row per (mode, grid or None): the model's table input for it, every scope x metric exact."""
    model = get_model() if model is None else model
    variants = model.variants() if variants is None else variants
    seq = {**model.default_sequence(), **(sequence or {})}
    rows = []
    for mode_name, grid in spec:
        mode = model.get_mode(mode_name)
        point = model.table_point(mode, grid, max_num=max_num, **seq, **options)
        totals = exact_totals(model, mode, point, model.scopes(mode), metrics, variants, dtype or "bf16")
        rows.append(Row(mode.name, tuple(model.table_cells(mode, point)), totals))
    return rows


def scopes_of(rows: list[Row]) -> list[str]:
    """Every scope any row has, in the order of the row with the most (native modes lack the crop scope)."""
    ordered = sorted(rows, key=lambda r: -len(r.totals))
    return list(dict.fromkeys(s for r in ordered for s in r.totals))


def _cells(row: Row, scopes, metric, scale, fmt, missing="-") -> list[str]:
    out = []
    for s in scopes:
        v = row.totals.get(s, {}).get(metric)
        out.append(missing if v is None else fmt(v, scale))
    return out


def _number(v: int, scale: int) -> str:
    return f"{v:,}" if scale == 1 else f"{v / scale:,.1f}"


def _scale_note(scale_name: str) -> str:
    return "" if scale_name == "1" else f" (x10^{len(str(SCALES[scale_name])) - 1})"


def _text(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: list[Row], metrics=METRICS, scale: str = "G", context: str = "") -> str:
    scopes, k = scopes_of(rows), SCALES[scale]
    blocks = []
    for m in metrics:
        head = ["mode"] + [label for _, label, _ in rows[0].cells] + scopes
        left = 1 + sum(isinstance(v, str) for _, _, v in rows[0].cells)
        lines = [f"**{m}{_scale_note(scale)} per page**" + (f" ({context})" if context else ""), "",
                 "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"]
        for r in rows:
            cells = [r.mode] + [_text(v) for _, _, v in r.cells]
            lines.append("| " + " | ".join(cells + _cells(r, scopes, m, k, _number)) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def to_csv(rows: list[Row], metrics=METRICS) -> str:
    """Exact integers, one column per scope:metric."""
    scopes = scopes_of(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mode"] + [key for key, _, _ in rows[0].cells] + [f"{s}:{m}" for s in scopes for m in metrics])
    for r in rows:
        w.writerow([r.mode] + [v for _, _, v in r.cells]
                   + [r.totals.get(s, {}).get(m, "") for s in scopes for m in metrics])
    return buf.getvalue()


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(a, b)
    return text


def _tex_number(v: int, scale: int) -> str:
    return _number(v, scale).replace(",", "{,}")


def _tex_cell(v) -> str:
    if v is None or isinstance(v, float):
        return _text(v).replace("-", "--")
    if isinstance(v, int):
        return f"{v:,}".replace(",", "{,}")
    v = str(v)
    return "--" if v == "-" else re.sub(r"(\d)x(\d)", r"\1$\\times$\2", _tex(v))


def _tex_label(label: str) -> str:
    text = _tex(label[0].upper() + label[1:])
    return text.replace("count x side", r"count$\times$side")


def latex(rows: list[Row], metrics=METRICS, scale: str = "G", context: str = "", model_label: str = "") -> str:
    """One booktabs table per metric, ready to \\input."""
    scopes, k = scopes_of(rows), SCALES[scale]
    unit = "" if scale == "1" else rf" ($10^{{{len(str(k)) - 1}}}$)"
    blocks = []
    for m in metrics:
        kinds = ["l" if isinstance(v, str) else "r" for _, _, v in rows[0].cells]
        cols = "l" + "".join(kinds) + "r" * len(scopes)
        head = ["Mode"] + [_tex_label(label) for _, label, _ in rows[0].cells] + \
            [r"\texttt{" + _tex(s) + "}" for s in scopes]
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 rf"\caption{{{_tex(model_label)}: {_tex(m)}{unit} per page by scope"
                 + (f"; {_tex(context)}" if context else "") + ".}",
                 rf"\label{{tab:costgraph-{m}}}",
                 rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
        for r in rows:
            cells = [_tex(r.mode)] + [_tex_cell(v) for _, _, v in r.cells]
            lines.append(" & ".join(cells + _cells(r, scopes, m, k, _tex_number, "--")) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def render(rows: list[Row], fmt: str, metrics=METRICS, scale: str = "G", context: str = "",
           model_label: str = "") -> str:
    if fmt == "md":
        return markdown(rows, metrics, scale, context)
    if fmt == "csv":
        return to_csv(rows, metrics)
    if fmt == "latex":
        return latex(rows, metrics, scale, context, model_label)
    raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


# ---- command line ------------------------------------------------------------------------

def context_line(sequence: dict, dtype: str, variants) -> str:
    seq = "".join(f"{k}={v}, " for k, v in sequence.items())
    return f"{seq}dtype={dtype}, {variants.label()}; FLOPs: 2 per multiply-add, matmul-class ops"


def add_parser(sub) -> None:
    q = sub.add_parser("table", help="per-mode table: views, image tokens, every metric per scope (md, csv, latex)")
    model_arg(q)
    q.add_argument("--rows", default=None, metavar="MODE[:GRID],...",
                   help="rows: a native mode, or a crop mode with its grid (default: the model's, e.g. "
                        "tiny,small,base,large,gundam:2x2,gundam:2x3,gundam:3x3,gundam:4x2)")
    q.add_argument("--format", choices=FORMATS, default="md")
    q.add_argument("--metric", action="append", metavar="METRIC", help="repeatable (default: every metric)")
    q.add_argument("--scale", choices=list(SCALES), default="G",
                   help="md and latex show values divided by this (default: %(default)s = 10^9); csv is exact")
    sequence_args(q)
    output_text_tokens_arg(q)
    dtype_arg(q)
    variant_args(q)
    max_num_arg(q)
    q.add_argument("--out", metavar="FILE", help="write here (atomically) instead of printing")
    q.set_defaults(fn=cmd_table)


def cmd_table(args) -> int:
    model = model_of(args)
    metrics = tuple(dict.fromkeys(args.metric)) if args.metric else METRICS
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRICS)})")
    spec = parse_rows(args.rows or model.default_table_rows)
    variants = variants_of(model, args)
    seq = sequence_of(model, args)
    rows = build_rows(spec, seq, variants, metrics, args.dtype, model, args.max_num, **input_options(args))
    text = render(rows, args.format, metrics, args.scale, context_line(seq, args.dtype, variants), model.label)
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out} ({len(rows)} rows, {args.format})")
    else:
        print(text, end="")
    return 0
