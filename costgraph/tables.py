"""The per-mode table: view sizes, image tokens (slots and the paper's count), valid tokens and every
metric per scope, for the native modes and Gundam on typical grids; as Markdown, CSV or LaTeX (booktabs).

A row is a mode and a grid, not a page: its valid tokens are those of the grid's nominal page
(image_size*A x image_size*B, as `costgraph cost --grid` takes it).

Values are exact (`layout_totals`); Markdown and LaTeX show them scaled (default 10^9), CSV exact.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from .cost import METRICS

DEFAULT_ROWS = "tiny,small,base,large,gundam:2x2,gundam:2x3,gundam:3x3,gundam:4x2"
FORMATS = ("md", "csv", "latex")
SCALES = {"1": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}


@dataclass(frozen=True)
class Row:
    mode: str
    grid: str            # "2x3"; "-" for the native modes (one view)
    views: str           # "1x1024 + 6x640"
    image_tokens: int
    paper_tokens: int
    valid_tokens: int    # the vendor's int rule, of the grid's nominal page
    valid_tokens_paper_ceil: int
    totals: dict         # scope -> metric -> int
    compression_ratio: float | None = None   # output_text_tokens / valid_tokens, when given


def parse_rows(text: str) -> list[tuple[str, tuple[int, int] | None]]:
    """'tiny,base,gundam:2x3,...' -> [(mode, grid or None)]."""
    from .cli import UserError, parse_size

    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        mode, _, grid = item.partition(":")
        out.append((mode.strip(), parse_size(grid) if grid else None))
    if not out:
        raise UserError(f"no rows in {text!r}: expected e.g. {DEFAULT_ROWS}")
    return out


def build_rows(spec, text_tokens=None, output_tokens=None, variants=None, metrics=METRICS,
               dtype: str | None = None, output_text_tokens: int | None = None) -> list[Row]:
    from graphs import deepseek_ocr as model
    from graphs.config import DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS
    from graphs.layout import layout_for_grid

    text_tokens = DEFAULT_TEXT_TOKENS if text_tokens is None else text_tokens
    output_tokens = DEFAULT_OUTPUT_TOKENS if output_tokens is None else output_tokens
    variants = model.VENDOR if variants is None else variants
    rows = []
    for mode_name, grid in spec:
        mode = model.get_mode(mode_name)
        if mode.crop_mode and grid is None:
            raise ValueError(f"mode {mode_name} crops: give its grid, e.g. {mode_name}:2x3")
        layout = layout_for_grid(*(grid or (1, 1)), mode)
        rec = model.layout_record(layout, mode, output_text_tokens)
        totals = model.layout_totals(mode, layout, model.scopes_for(mode), metrics, text_tokens=text_tokens,
                                     output_tokens=output_tokens, variants=variants,
                                     **({"dtype": dtype} if dtype else {}))
        if mode.crop_mode:
            views = f"1x{mode.base_size}" + (f" + {layout.num_crops}x{mode.image_size}" if layout.tiled else "")
        else:
            views = f"1x{mode.image_size}"
        rows.append(Row(mode.name, f"{layout.w_crop}x{layout.h_crop}" if mode.crop_mode else "-", views,
                        rec["image_tokens"], rec["paper_tokens"], rec["valid_tokens"], rec["valid_tokens_paper_ceil"],
                        totals, rec.get("compression_ratio")))
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


HEAD = ["mode", "grid", "views (count x side px)", "image tokens", "paper count", "valid tokens",
        "valid (paper ceil)"]
COMPRESSION_HEAD = "compression"


def _has_ratio(rows: list[Row]) -> bool:
    return any(r.compression_ratio is not None for r in rows)


def _ratio(r: Row, missing: str = "-") -> str:
    return missing if r.compression_ratio is None else f"{r.compression_ratio:.2f}"


def _token_cells(r: Row, ratio: bool) -> list[str]:
    """image tokens, paper count, valid tokens (int, ceil) and, with a ratio, the compression."""
    cells = [f"{v:,}" for v in (r.image_tokens, r.paper_tokens, r.valid_tokens, r.valid_tokens_paper_ceil)]
    return cells + ([_ratio(r)] if ratio else [])


def markdown(rows: list[Row], metrics=METRICS, scale: str = "G", context: str = "") -> str:
    scopes, k, ratio = scopes_of(rows), SCALES[scale], _has_ratio(rows)
    blocks = []
    for m in metrics:
        head = HEAD + ([COMPRESSION_HEAD] if ratio else []) + scopes
        lines = [f"**{m}{_scale_note(scale)} per page**" + (f" ({context})" if context else ""), "",
                 "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
        for r in rows:
            cells = [r.mode, r.grid, r.views] + _token_cells(r, ratio)
            lines.append("| " + " | ".join(cells + _cells(r, scopes, m, k, _number)) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def to_csv(rows: list[Row], metrics=METRICS) -> str:
    """Exact integers, one column per scope:metric."""
    scopes, ratio = scopes_of(rows), _has_ratio(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mode", "grid", "views", "image_tokens", "paper_tokens", "valid_tokens", "valid_tokens_paper_ceil"]
               + (["compression_ratio"] if ratio else []) + [f"{s}:{m}" for s in scopes for m in metrics])
    for r in rows:
        w.writerow([r.mode, r.grid, r.views, r.image_tokens, r.paper_tokens, r.valid_tokens, r.valid_tokens_paper_ceil]
                   + ([_ratio_exact(r)] if ratio else [])
                   + [r.totals.get(s, {}).get(m, "") for s in scopes for m in metrics])
    return buf.getvalue()


def _ratio_exact(r: Row) -> str:
    """CSV: the float as Python writes it (shortest round-trip), empty when there is none."""
    return "" if r.compression_ratio is None else repr(r.compression_ratio)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(a, b)
    return text


def _tex_number(v: int, scale: int) -> str:
    return _number(v, scale).replace(",", "{,}")


def latex(rows: list[Row], metrics=METRICS, scale: str = "G", context: str = "") -> str:
    """One booktabs table per metric, ready to \\input."""
    scopes, k, ratio = scopes_of(rows), SCALES[scale], _has_ratio(rows)
    unit = "" if scale == "1" else rf" ($10^{{{len(str(k)) - 1}}}$)"
    blocks = []
    for m in metrics:
        cols = "lll" + "r" * (4 + ratio + len(scopes))
        head = ["Mode", "Grid", r"Views (count$\times$side)", "Image tokens", "Paper count", "Valid tokens",
                "Valid (paper ceil)"] + (["Compression"] if ratio else []) + \
            [r"\texttt{" + _tex(s) + "}" for s in scopes]
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 rf"\caption{{DeepSeek-OCR: {_tex(m)}{unit} per page by scope"
                 + (f"; {_tex(context)}" if context else "") + ".}",
                 rf"\label{{tab:costgraph-{m}}}",
                 rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
        for r in rows:
            cells = [_tex(r.mode), r.grid.replace("x", r"$\times$") if r.grid != "-" else "--",
                     r.views.replace("x", r"$\times$")] + \
                [c.replace(",", "{,}") if c != "-" else "--" for c in _token_cells(r, ratio)]
            lines.append(" & ".join(cells + _cells(r, scopes, m, k, _tex_number, "--")) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def render(rows: list[Row], fmt: str, metrics=METRICS, scale: str = "G", context: str = "") -> str:
    if fmt == "md":
        return markdown(rows, metrics, scale, context)
    if fmt == "csv":
        return to_csv(rows, metrics)
    if fmt == "latex":
        return latex(rows, metrics, scale, context)
    raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


# ---- command line ------------------------------------------------------------------------

def sequence_args(q) -> None:
    """--text-tokens/--output-tokens with the model's defaults (as `costgraph cost` has them), and
    --output-text-tokens for the compression ratio."""
    from graphs.config import DEFAULT_DTYPE, DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, DTYPES
    from .cli import output_text_tokens_option

    q.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                   help="prompt text after the image (default: %(default)s, an estimate of the OCR prompt)")
    q.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS,
                   help="generated tokens, >= 1: the prefill yields the first (default: %(default)s)")
    output_text_tokens_option(q)
    q.add_argument("--dtype", default=DEFAULT_DTYPE, help="storage dtype of the bytes metrics: "
                   f"{', '.join(DTYPES)} (default: %(default)s)")


def context_line(args, variants) -> str:
    return (f"text_tokens={args.text_tokens}, output_tokens={args.output_tokens}, dtype={args.dtype}, "
            f"{variants.label()}; "
            "FLOPs: 2 per multiply-add, matmul-class ops; valid tokens (vendor int rule, paper ceil) of each "
            "grid's nominal page, image_size per tile"
            + ("" if args.output_text_tokens is None else
               f"; compression = {args.output_text_tokens} output text tokens / valid tokens (int rule)"))


def add_parser(sub, max_num_arg, variant_args) -> None:
    q = sub.add_parser("table", help="per-mode table: views, image tokens, every metric per scope (md, csv, latex)")
    q.add_argument("--rows", default=DEFAULT_ROWS, metavar="MODE[:GRID],...",
                   help="rows: a native mode, or a crop mode with its grid (default: %(default)s)")
    q.add_argument("--format", choices=FORMATS, default="md")
    q.add_argument("--metric", action="append", metavar="METRIC", help="repeatable (default: every metric)")
    q.add_argument("--scale", choices=list(SCALES), default="G",
                   help="md and latex show values divided by this (default: %(default)s = 10^9); csv is exact")
    sequence_args(q)
    variant_args(q)
    max_num_arg(q)
    q.add_argument("--out", metavar="FILE", help="write here (atomically) instead of printing")
    q.set_defaults(fn=cmd_table)


def cmd_table(args) -> int:
    from .cli import UserError, _variants_from_args
    from .io import write_atomic

    metrics = tuple(dict.fromkeys(args.metric)) if args.metric else METRICS
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRICS)})")
    spec = parse_rows(args.rows)
    for mode, grid in spec:
        if grid and grid[0] * grid[1] > args.max_num:
            raise UserError(f"grid {grid[0]}x{grid[1]} has more than --max-num {args.max_num} crops: "
                            "the layout never produces it")
    variants = _variants_from_args(args)
    rows = build_rows(spec, args.text_tokens, args.output_tokens, variants, metrics, args.dtype,
                      args.output_text_tokens)
    text = render(rows, args.format, metrics, args.scale, context_line(args, variants))
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out} ({len(rows)} rows, {args.format})")
    else:
        print(text, end="")
    return 0
