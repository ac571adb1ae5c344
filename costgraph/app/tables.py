"""The per-mode table: the model's description of each row's input (DeepSeek-OCR: grid, view sizes,
image tokens: slots and the paper's count) and every metric per scope, for the rows asked (default:
the model's, e.g. the native modes and Gundam on typical grids); as Markdown, CSV or LaTeX (booktabs).

Values are exact (exact substitution); Markdown and LaTeX show them scaled (default 10^9), CSV exact.
Each metric's caption says what it counts (`METRIC_CAPTIONS`). The LaTeX starts with the preamble it
needs (as % comments: booktabs); a table wider than `--text-width` (default: the article class's
\textwidth) is split into stacked tabulars, each repeating the row's key columns (mode and grid).
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

from costgraph.cost import METRICS
from costgraph.io import write_atomic
from costgraph.render import TABLE_PREAMBLE, TEXT_WIDTH
from costgraph.stages import totals as exact_totals
from .args import (dtype_arg, input_options, max_num_arg, model_arg, model_of, output_text_tokens_arg, sequence_args,
                   sequence_of, variant_args, variants_of)
from .models import get_model
from .text import UserError, parse_size

FORMATS = ("md", "csv", "latex")
SCALES = {"1": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}
# What each metric counts, for its caption (the models' conventions; `Model.metric_note` has the long form).
METRIC_CAPTIONS = {
    "flops": "FLOPs: 2 per multiply-add, matmul-class ops (linear, conv, matmul, attention)",
    "elementwise_flops": "elementwise FLOPs: norms, softmax, activations, adds (matmul-class ops excluded)",
    "bytes_read": "bytes read, unfused: every op reads its inputs and weights (views read nothing)",
    "bytes_written": "bytes written, unfused: every op writes its outputs (views write nothing)",
    "activation_bytes": "bytes of every op output written, summed over the run (not a memory need: the peak is)",
}


def metric_caption(metric: str) -> str:
    return METRIC_CAPTIONS.get(metric, metric)


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
               model=None, max_num: int | None = None, **options) -> list[Row]:
    """One row per (mode, grid or None): the model's table input for it, every scope x metric exact."""
    model = get_model() if model is None else model
    variants = model.variants() if variants is None else variants
    seq = {**model.default_sequence(), **(sequence or {})}
    rows = []
    for mode_name, grid in spec:
        mode = model.get_mode(mode_name)
        point = model.table_point(mode, grid, **({} if max_num is None else {"max_num": max_num}), **seq, **options)
        totals = exact_totals(model, mode, point, model.scopes(mode, variants), metrics, variants, dtype or "bf16")
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
        lines = [f"**{m}{_scale_note(scale)} per page** (" + "; ".join(filter(None, (context, metric_caption(m))))
                 + ")", "",
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
    return re.sub(r"(\w) x (\w)", r"\1$\\times$\2", _tex(label))


# widths in pt at \small (9 pt) of what a cell holds, for splitting a table to the text width
_COLUMN_SEP = 12.0    # \tabcolsep on both sides


def _tex_width(cell: str) -> float:
    """Estimated width in pt of a cell's LaTeX at \\small (a little generous); a nested tabular: its widest line."""
    nested = re.fullmatch(r"\\begin\{tabular\}\[b\]\{@\{\}\w@\{\}\}(.*)\\end\{tabular\}", cell)
    if nested:
        return max(_tex_width(line.strip()) for line in nested.group(1).split(r"\\"))
    w = 7.5 * cell.count(r"$\times$")
    cell = cell.replace(r"$\times$", "")
    for tt in re.findall(r"\\texttt\{([^}]*)\}", cell):
        w += 4.8 * len(tt.replace("\\_", "_"))
    cell = re.sub(r"\\texttt\{[^}]*\}", "", cell).replace("{,}", ",").replace("\\_", "_").replace("--", "\u2013")
    return w + sum(8.4 if c in "MW" else 7.7 if c == "m" else 7.0 if c == "+" else 6.8 if c.isupper() or c == "w"
                   else 2.6 if c in ",.()-'il " else 3.6 if c in "frt" else 4.6 if c.isdigit() or c == "\u2013"
                   else 5.0 for c in cell)


def _header_lines(label: str) -> list[str]:
    """A header's label in one or two lines: split at a space outside parentheses (else any space, or
    after a dot), nearest the middle."""
    depth, outside, inside = 0, [], []
    for i, c in enumerate(label):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == " ":
            (inside if depth else outside).append(i)
    cuts = outside or inside or [i + 1 for i, c in enumerate(label[:-1]) if c == "."]
    if not cuts:
        return [label]
    i = min(cuts, key=lambda i: max(i, len(label) - i))
    return [label[:i].strip(), label[i:].strip()]


def _header(label: str, align: str, width_of_data: float, tt: bool = False) -> str:
    """A header cell: on two lines (a nested tabular, bottom-aligned) where one line would widen its column."""
    if tt:
        tex = lambda t, first=True: r"\texttt{" + _tex(t) + "}"
    else:
        tex = lambda t, first=True: _tex_label(t[0].upper() + t[1:] if first else t)
    one = tex(label)
    lines = _header_lines(label)
    if len(lines) == 1 or _tex_width(one) <= width_of_data:
        return one
    return rf"\begin{{tabular}}[b]{{@{{}}{align}@{{}}}}{tex(lines[0])}\\ {tex(lines[1], False)}\end{{tabular}}"


def _column_groups(widths: list[float], keys: int, text_width: float) -> list[list[int]]:
    """Column indices per tabular: the first `keys` in each, the others packed in order to fit."""
    if not text_width or sum(widths) <= text_width:
        return [list(range(len(widths)))]
    key_w = sum(widths[:keys])
    groups, cur, used = [], [], key_w
    for i in range(keys, len(widths)):
        if cur and used + widths[i] > text_width:
            groups.append(cur)
            cur, used = [], key_w
        cur.append(i)
        used += widths[i]
    groups.append(cur)
    return [list(range(keys)) + g for g in groups]


def latex(rows: list[Row], metrics=METRICS, scale: str = "G", context: str = "", model_label: str = "",
          text_width: float = TEXT_WIDTH) -> str:
    """One booktabs table per metric, ready to \\input, after its preamble (% comments). A table wider
    than `text_width` pt (0: never) is split into stacked tabulars that repeat the key columns."""
    scopes, k = scopes_of(rows), SCALES[scale]
    unit = "" if scale == "1" else rf" ($10^{{{len(str(k)) - 1}}}$)"
    blocks = [f"% needs: {line}" for line in TABLE_PREAMBLE]
    keys = 1 + min(1, len(rows[0].cells))          # the mode and the row's first cell (a grid)
    for m in metrics:
        kinds = ["l" if isinstance(v, str) else "r" for _, _, v in rows[0].cells]
        cols = "l" + "".join(kinds) + "r" * len(scopes)
        body = [[_tex(r.mode)] + [_tex_cell(v) for _, _, v in r.cells] + _cells(r, scopes, m, k, _tex_number, "--")
                for r in rows]
        data = [max(_tex_width(c) for c in col) for col in zip(*body)]
        labels = [("mode", False)] + [(label, False) for _, label, _ in rows[0].cells] + [(s, True) for s in scopes]
        head = [_header(label, cols[i], data[i] if text_width else float("inf"), tt)   # 0: one-line headers
                for i, (label, tt) in enumerate(labels)]
        widths = [max(_tex_width(h), d) + _COLUMN_SEP for h, d in zip(head, data)]
        caption = f"{_tex(model_label)}: {_tex(m)}{unit} per page by scope; {_tex(metric_caption(m))}" + \
            (f"; {_tex(context)}" if context else "") + "."
        lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}",
                 rf"\label{{tab:costgraph-{m}}}"]
        for n, group in enumerate(_column_groups(widths, keys, text_width * 0.95)):
            if n:
                lines += ["", r"\medskip"]
            lines += [rf"\begin{{tabular}}{{{''.join(cols[i] for i in group)}}}", r"\toprule",
                      " & ".join(head[i] for i in group) + r" \\", r"\midrule"]
            lines += [" & ".join(cells[i] for i in group) + r" \\" for cells in body]
            lines += [r"\bottomrule", r"\end{tabular}"]
        lines.append(r"\end{table}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def render(rows: list[Row], fmt: str, metrics=METRICS, scale: str = "G", context: str = "",
           model_label: str = "", text_width: float = TEXT_WIDTH) -> str:
    if fmt == "md":
        return markdown(rows, metrics, scale, context)
    if fmt == "csv":
        return to_csv(rows, metrics)
    if fmt == "latex":
        return latex(rows, metrics, scale, context, model_label, text_width)
    raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


# ---- command line ------------------------------------------------------------------------

def context_line(sequence: dict, dtype: str, variants) -> str:
    seq = "".join(f"{k}={v}, " for k, v in sequence.items())
    """The inputs every table shares (what each metric counts is its own caption: `metric_caption`)."""
    return f"{seq}dtype={dtype}, {variants.label()}"


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
    q.add_argument("--text-width", type=float, default=TEXT_WIDTH, metavar="PT",
                   help="latex: a table wider than this many pt is split into stacked tabulars, each repeating "
                        "the mode and grid columns; 0 never splits (default: %(default)g, the article class's "
                        "\\textwidth)")
    q.add_argument("--out", metavar="FILE", help="write here (atomically) instead of printing")
    q.set_defaults(fn=cmd_table)


def cmd_table(args) -> int:
    model = model_of(args)
    metrics = tuple(dict.fromkeys(args.metric)) if args.metric else METRICS
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRICS)})")
    if not 0 <= args.text_width < float("inf"):
        raise UserError(f"--text-width must be a width in pt >= 0 (0: never split), got {args.text_width}")
    spec = parse_rows(args.rows or model.default_table_rows)
    variants = variants_of(model, args)
    seq = sequence_of(model, args)
    rows = build_rows(spec, seq, variants, metrics, args.dtype, model, args.max_num, **input_options(args))
    text = render(rows, args.format, metrics, args.scale, context_line(seq, args.dtype, variants), model.label,
                  args.text_width)
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out} ({len(rows)} rows, {args.format})")
    else:
        print(text, end="")
    return 0
