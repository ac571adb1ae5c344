"""`costgraph`: layouts, costs, closed forms and benchmarks of DeepSeek-OCR from its cost graph.

Bad input never produces a traceback: one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from . import render
from .cost import METRICS

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage + message; we want one line
        raise UserError(message)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UserError(f"malformed size {text!r}: expected WxH with positive integers, e.g. 1654x2339")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        raise UserError(f"size {text!r} must be positive in both dimensions")
    return w, h


def human(n: int) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.3f} {unit}"
    return f"{n:,}"


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


# ---- commands ---------------------------------------------------------------------------

def cmd_layout(args) -> int:
    from graphs import deepseek_ocr as model

    mode = model.get_mode(args.mode)
    records = [model.layout_record(model.layout_for(w, h, mode, max_num=args.max_num), mode)
               for w, h in args.size]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(table([[f"{r['width']}x{r['height']}", f"{r['w_crop']}x{r['h_crop']}", r["num_crops"],
                      r["image_tokens"], r["paper_tokens"]] for r in records],
                    ["page", "grid", "crops", "image tokens", "paper count"]))
    return 0


def _layout_from_args(args, mode):
    from graphs import deepseek_ocr as model

    if args.grid:
        return model.layout_for_grid(*args.grid, mode)
    if args.image:
        return model.layout_for_image(args.image, mode, max_num=args.max_num)
    return model.layout_for(*args.size, mode, max_num=args.max_num)


def cmd_cost(args) -> int:
    from graphs import deepseek_ocr as model

    mode = model.get_mode(args.mode)
    layout = _layout_from_args(args, mode)
    totals = model.layout_totals(mode, layout, model.scopes_for(mode), METRICS)
    out = {"mode": mode.name, "layout": model.layout_record(layout, mode), "totals": totals}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    r = out["layout"]
    print(f"mode {mode.name} ({mode.note})")
    print(f"page {r['width']}x{r['height']} -> grid {r['w_crop']}x{r['h_crop']}, {r['num_crops']} crops, "
          f"{r['image_tokens']} image tokens ({r['paper_tokens']} without newlines/separator)")
    rows = [[scope, m, f"{v:,}", human(v)] for scope, ms in totals.items() for m, v in ms.items()]
    print(table(rows, ["scope", "metric", "value", "approx"]))
    return 0


def cmd_formula(args) -> int:
    from graphs import deepseek_ocr as model

    mode = model.get_mode(args.mode) if args.mode else None
    if args.metric not in METRICS:
        raise UserError(f"unknown metric {args.metric!r} (choose from {', '.join(METRICS)})")
    scopes = model.scopes_for(mode)
    if args.scope not in scopes:
        raise UserError(f"unknown scope {args.scope!r} (choose from {', '.join(scopes)})")
    expr = render.closed_form(model.formula(mode, args.scope, args.metric))
    text = render.latex(expr) if args.latex else render.plain(expr)
    if args.json:
        print(json.dumps({"mode": mode.name if mode else None, "scope": args.scope, "metric": args.metric,
                          "expression": render.plain(expr), "latex": render.latex(expr),
                          "symbols": sorted(s.name for s in expr.free_symbols),
                          "note": model.FORMULA_NOTE}, indent=1))
    else:
        print(text)
        print(f"% {model.FORMULA_NOTE}" if args.latex else f"# {model.FORMULA_NOTE}")
    return 0


def cmd_graph(args) -> int:
    from graphs import deepseek_ocr as model

    mode = model.get_mode(args.mode)
    text = model.graph_for(mode).dumps()
    if args.out:
        from .io import write_atomic
        write_atomic(args.out, text)
    else:
        print(text)
    return 0


def cmd_bench(args) -> int:
    from . import bench

    bench.main(layouts=args.layouts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from graphs.config import MAX_CROPS, MODES

    p = _Parser(prog="costgraph", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modes = list(MODES)

    def mode_arg(q, default="gundam"):
        q.add_argument("--mode", default=default, help=f"one of {', '.join(modes)} (default: %(default)s)")

    def max_num_arg(q):
        q.add_argument("--max-num", type=int, default=MAX_CROPS, help="most crops (HF 9, vLLM 6)")

    q = sub.add_parser("layout", help="crop grid and image tokens of page sizes")
    q.add_argument("--size", type=parse_size, action="append", required=True, metavar="WxH")
    mode_arg(q)
    max_num_arg(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_layout)

    q = sub.add_parser("cost", help="layout and cost totals of one page")
    mode_arg(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", type=parse_size, metavar="WxH")
    g.add_argument("--image", metavar="PATH")
    g.add_argument("--grid", type=parse_size, metavar="AxB", help="crop grid directly (1x1: no crops)")
    max_num_arg(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_cost)

    q = sub.add_parser("formula", help="closed form of a metric over a scope")
    q.add_argument("--mode", default=None, help="substitute this mode's sizes (default: all symbolic)")
    q.add_argument("--metric", default="flops")
    q.add_argument("--scope", default="vision")
    q.add_argument("--latex", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_formula)

    q = sub.add_parser("graph", help="export the cost graph as node-link JSON")
    mode_arg(q)
    q.add_argument("--out", metavar="FILE")
    q.set_defaults(fn=cmd_graph)

    q = sub.add_parser("bench", help="timings: graph build, compiled evaluation, reference count")
    q.add_argument("--layouts", type=int, default=1_000_000)
    q.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except UserError as e:
        print(f"costgraph: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as e:
        print(f"costgraph: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("costgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
