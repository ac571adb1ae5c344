"""costgraph: exact costs of a model from its cost graph: layouts, costs, closed forms, tables, sweeps, roofline and verification (DeepSeek-OCR by default; --model vit for the ViT).

Bad input never produces a traceback: one line on stderr and exit code 2. A batch (`layout` with
many sizes) reports its bad items and finishes the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from costgraph import forms, render, stages
from costgraph.cost import METRICS
from costgraph.dtypes import DEFAULT_STORAGE, STORAGE
from costgraph.io import write_atomic
from costgraph.render import human, table
from costgraph.graphs.pages import PageWarning
from . import bench, compare, dataset, recipes, serve, sweep, tables, verify_cmd
from .args import (Parser, dtype_arg, hardware_arg, input_options, max_num_arg, max_num_option, mode_arg, mode_of, model_arg,
                   model_of, output_text_tokens_arg, page_args, point_of, scopes_of, variant_args, variants_of)
from .text import (DEFAULT_GROUPS, EXIT_BAD_INPUT, FORMULA_METRICS, METRIC_GROUPS, UserError, parse_hardware,
                   parse_metrics, parse_size)

__version__ = "0.2.0"


# ---- commands ---------------------------------------------------------------------------

def cmd_layout(args) -> int:
    """Layouts of many page sizes; a bad size is reported (an error record) and the rest go on."""
    model = model_of(args)
    mode = mode_of(model, args)
    records, bad = [], 0
    for w, h in args.size:
        try:
            p = model.point(mode, size=(w, h), **max_num_option(args), **input_options(args))
            records.append(model.layout_record(p))
        except ValueError as e:
            bad += 1
            records.append({"width": w, "height": h, "error": str(e)})
            print(f"costgraph: error: {w}x{h}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        good = [r for r in records if "error" not in r]
        if good:
            cols = list(model.summary_columns(good[0]))
            print(table([[str(v) for v in model.summary_columns(r).values()] for r in good], cols))
    return EXIT_BAD_INPUT if bad == len(records) else 0


def cmd_cost(args) -> int:
    model = model_of(args)
    # no --metrics: every sum of node costs (METRICS) and no extra sections
    groups = parse_metrics(args.metrics) if args.metrics is not None else DEFAULT_GROUPS
    mode = mode_of(model, args)
    variants = variants_of(model, args)
    hardware = parse_hardware(args.hardware, args.dtype)
    point = point_of(model, mode, args)
    scopes = scopes_of(model, mode, args, variants)
    cost_metrics = [m for g in groups for m in METRIC_GROUPS[g]] if args.metrics is not None else list(METRICS)
    totals = stages.totals(model, mode, point, scopes, cost_metrics, variants, args.dtype)
    out = {"model": model.name, "mode": mode.name, **point.record, "variants": variants.as_dict(),
           "dtype": args.dtype, "metrics": list(groups), "totals": totals}
    out.update(stages.extra_metrics(model, mode, point, scopes, groups, totals, variants=variants, dtype=args.dtype,
                                    hardware=hardware))
    notes = _cost_notes(out)
    if notes:
        out["notes"] = notes
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for line in model.describe(mode, point, variants, args.dtype):
        print(line)
    derived = out.get("derived", {})
    rows = [[scope, m, f"{v:,}", human(v)] for scope, ms in totals.items()
            for m, v in {**ms, **derived.get(scope, {})}.items()]
    print(table(rows, ["scope", "metric", "value", "approx"]))
    for metric, note in notes.items():
        print(f"# {metric}: {note}")
    for line in stages.text_sections(model, out):
        print(line)
    return 0


def _cost_notes(out: dict) -> dict[str, str]:
    """What a metric of the table is when its name could be misread (`cost --json`: "notes")."""
    shown = {m for ms in out["totals"].values() for m in ms}
    if "activation_bytes" not in shown:
        return {}
    peak = any("peak_activation_bytes" in ms for ms in out.get("derived", {}).values())
    return {"activation_bytes": "sum of every op's output bytes over the run, not memory held at once; the memory "
                                "need is the peak, peak_activation_bytes" +
                                (" (above)" if peak else " (`costgraph cost --metrics activations`)")}


def cmd_roofline(args) -> int:
    """Roofline latency per stage and memory fit, for presets (a table; Markdown for the README)."""
    model = model_of(args)
    mode = mode_of(model, args)
    variants = variants_of(model, args)
    hardware = parse_hardware(args.hardware, args.dtype)
    if args.nodes < 0:
        raise UserError(f"--nodes must be >= 0, got {args.nodes}")
    point = point_of(model, mode, args)
    out = stages.extra_metrics(model, mode, point, (), ("params", "activations", "kv_cache"), {},
                               variants=variants, dtype=args.dtype, hardware=hardware, top=args.nodes)
    out = {"model": model.name, "mode": mode.name, **point.record, "variants": variants.as_dict(),
           "dtype": args.dtype, **out}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    context = f"{mode.name}: {point.label}; {args.dtype}, {variants.label()}"
    print(stages.roofline_markdown(out["roofline"]) if args.markdown else stages.roofline_table(out["roofline"]))
    print(f"\n{context}" if args.markdown else f"# {context}")
    if args.nodes:
        for name, rec in out["roofline"].items():
            print(f"\n{name}: slowest nodes per stage (one execution; a summed stage at its last step)")
            for st, srec in rec["stages"].items():
                srec = srec.get("last_step", srec) if isinstance(srec, dict) else srec
                if not isinstance(srec, dict) or "top_nodes" not in srec:
                    continue
                rows = [[n["node"], f"{1e6 * n['seconds']:,.1f}", n["bound"],
                         "-" if n["intensity"] is None else f"{n['intensity']:,.2f}"] for n in srec["top_nodes"]]
                print(table(rows, [st, "us", "bound", "FLOP/byte"]))
    return 0


def cmd_formula(args) -> int:
    model = model_of(args)
    if args.mode == "":
        raise UserError("--mode '' names no mode (leave --mode out for the symbolic form)")
    mode = mode_of(model, args, allow_none=True)
    variants = variants_of(model, args)
    if args.metric not in FORMULA_METRICS:
        raise UserError(f"unknown metric {args.metric!r} (choose from {', '.join(FORMULA_METRICS)})")
    scopes = model.scopes(mode, variants)
    scope = args.scope or scopes[0]
    if scope not in scopes:
        raise UserError(f"unknown scope {scope!r} (choose from {', '.join(scopes)})")
    if not 0 <= args.text_width < float("inf"):
        raise UserError(f"--text-width must be a width in pt >= 0 (0: one line), got {args.text_width}")
    dtypes = list(STORAGE) if args.dtype == "all" else [args.dtype]
    built = [forms.build(model, args.form, mode.name if mode else None, scope, args.metric, args.grid_multiple,
                         variants, d) for d in dtypes]
    if len(built) > 1 and built[0].expr == built[1].expr:  # no element size in this metric
        built, dtypes = built[:1], dtypes[:1]
    if args.json:
        records = [{**f.to_json(args.text_width), "dtype": d, "variants": variants.as_dict(),
                    "note": " ".join(f.notes)} for f, d in zip(built, dtypes)]
        print(json.dumps(records[0] if args.dtype != "all" else records, indent=1))
        return 0
    c = "%" if args.latex else "#"
    if args.latex:  # what a paper needs: the preamble and what each symbol is
        for line in forms.LATEX_PREAMBLE:
            print(f"% needs: {line}")
        print("% set in a display: \\[ ... \\] (a form wider than --text-width is an aligned block, broken at terms)")
        print("% symbols:")
        legend = dict.fromkeys(item for f in built for item in f.legend(type(model).__module__))
        for tex, name, words in legend:
            print(f"%   {tex} = {name}" + (f": {words}" if words else ""))
    for k, (form, d) in enumerate(zip(built, dtypes)):
        if len(built) > 1:
            print(("\n" if k else "") + f"{c} storage dtype {d}")
        text = form.latex(args.text_width) if args.latex else form.plain()
        print(text)
        if args.latex and render.tex_height(text) > 0.85 * render.TEXT_HEIGHT:
            print(f"% about {render.tex_height(text):,.0f} pt tall, likely more than a page ({render.TEXT_HEIGHT:g} pt): "
                  "to break it across pages, use align* for aligned (outside \\[ \\]) with \\allowdisplaybreaks")
        print(f"{c} form: {form.kind}")
        for line in form.commentary():
            print(f"{c} {line}")
        print(f"{c} variants: {variants.label()}")
    return 0


def cmd_graph(args) -> int:
    model = model_of(args)
    mode = mode_of(model, args)
    variants = variants_of(model, args)
    info = {"model": model.name, "mode": mode.name, "variants": variants.as_dict(),
            "note": f"the {mode.name} mode's sizes are substituted (see substituted); every expression is "
                    "symbolic only in free_symbols: what an input gives (e.g. a page's crop grid, the sequence "
                    "lengths) and the storage element size (dtype_bytes)"}
    text = model.graph(mode, variants).dumps(model.mode_values(mode), info)
    if args.out:
        write_atomic(args.out, text)
    else:
        print(text)
    return 0


def cmd_explore(args) -> int:
    """One self-contained HTML page computing the model's costs in the browser (costgraph.app.explore)."""
    from tqdm import tqdm

    from . import explore

    model = model_of(args)
    variants_of(model, args)  # refuses an option the model does not have
    chosen = {o.name: getattr(args, o.name) for o in model.variant_options if getattr(args, o.name, None) is not None}
    offered = {o.name for o in explore.page_options(model)}
    beyond = [k for k in chosen if k not in offered]
    if beyond:
        raise UserError(f"--{beyond[0].replace('_', '-')}: the page offers {', '.join(sorted(offered)) or 'no variants'} "
                        f"(the training phase is the CLI's: cost/formula/recipes --phase train)")
    out = args.out or f"costgraph-explorer-{model.name}.html"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):   # before the seconds of building the page, not after
        raise UserError(f"output folder does not exist: {folder}")
    with tqdm(desc="explore", unit=" step", disable=None, file=sys.stderr) as bar:
        def progress(what):
            bar.set_postfix_str(what[:60])
            bar.update()
        text = explore.build_page(model, chosen, progress)
    write_atomic(out, text)
    print(f"wrote {out} ({len(text.encode()) / 2**20:.1f} MiB): open it in a browser, offline")
    return 0


def cmd_bench(args) -> int:
    if args.layouts < 1 or args.layouts > 100_000_000:
        raise UserError(f"--layouts must be from 1 to 100,000,000, got {args.layouts}")
    bench.main(layouts=args.layouts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="costgraph", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"costgraph {__version__}")
    model_arg(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    q = sub.add_parser("layout", help="crop grid and image tokens of page sizes")
    model_arg(q)
    q.add_argument("--size", type=parse_size, action="append", required=True, metavar="WxH")
    mode_arg(q)
    max_num_arg(q)
    output_text_tokens_arg(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_layout)

    q = sub.add_parser("cost", help="layout and cost totals of one page")
    model_arg(q)
    page_args(q)
    q.add_argument("--scope", action="append", metavar="SCOPE[,SCOPE...]",
                   help="repeatable or comma list (default: every scope of the mode)")
    q.add_argument("--metrics", default=None, metavar="LIST",
                   help=f"comma list of {', '.join(METRIC_GROUPS)}, or all (default: every per-scope sum: "
                        f"{', '.join(METRICS)}, and bytes = read + written)")
    dtype_arg(q)
    hardware_arg(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_cost)

    q = sub.add_parser("roofline", help="roofline latency per stage and whether a generation fits, per hardware")
    model_arg(q)
    page_args(q)
    dtype_arg(q)
    q.add_argument("--hardware", default="all", metavar="NAME[,NAME...]",
                   help="presets, this-machine (calibrates now) or all (default: %(default)s: every datasheet preset)")
    q.add_argument("--nodes", type=int, default=0, metavar="N", help="also list the N slowest nodes per stage")
    q.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_roofline)

    q = sub.add_parser("formula", help="closed form of a metric over a scope")
    model_arg(q)
    q.add_argument("--mode", default=None, help="substitute this mode's sizes (default: all symbolic)")
    q.add_argument("--metric", default="flops", help="(default: %(default)s)")
    q.add_argument("--scope", default=None, help="(default: the model's first, vision for DeepSeek-OCR)")
    variant_args(q)
    q.add_argument("--form", choices=list(forms.FORMS), default="simplified",
                   help="general: exact, with floor/ceiling and the no-crop case; simplified: a polynomial in the "
                        "layout under the printed assumptions; coefficients: numbers by term (needs --mode) "
                        "(default: %(default)s)")
    q.add_argument("--grid-multiple", type=int, default=None, metavar="M",
                   help="simplified, symbolic sizes: assume sizes are multiples of M*patch_size (default: the "
                        "smallest M that removes every floor/ceiling; 4 keeps the window ceilings)")
    q.add_argument("--dtype", choices=list(STORAGE) + ["all"], default=DEFAULT_STORAGE,
                   help="storage dtype substituted in byte metrics, or all: one form per dtype (default: %(default)s)")
    q.add_argument("--latex", action="store_true",
                   help="LaTeX for a display (amsmath only), after its preamble and a legend of its symbols as "
                        "%% comments")
    q.add_argument("--text-width", type=float, default=render.TEXT_WIDTH, metavar="PT",
                   help="--latex: a form wider than this many pt is an aligned block broken at its terms (a peak: "
                        "one candidate per line, each broken the same way); 0 keeps one line (default: %(default)g, "
                        "the article class's \\textwidth; 229 fits a column of a two-column page)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_formula)

    q = sub.add_parser("graph", help="export the cost graph as node-link JSON")
    model_arg(q)
    mode_arg(q)
    variant_args(q)
    q.add_argument("--out", metavar="FILE")
    q.set_defaults(fn=cmd_graph)

    q = sub.add_parser("explore", help="one self-contained HTML page to explore costs in a browser (offline)")
    model_arg(q)
    variant_args(q)
    q.add_argument("--out", metavar="FILE.html", help="(default: costgraph-explorer-MODEL.html)")
    q.set_defaults(fn=cmd_explore)

    q = sub.add_parser("bench", help="timings: graph build, compiled evaluation, reference count")
    q.add_argument("--layouts", type=int, default=1_000_000)
    q.set_defaults(fn=cmd_bench)

    tables.add_parser(sub)
    recipes.add_parser(sub)
    sweep.add_parser(sub)
    verify_cmd.add_parser(sub)
    compare.add_parser(sub)
    serve.add_parser(sub)
    dataset.add_parser(sub)
    return p


# options whose value is a size: `--size -1x5` must reach parse_size (and its "positive" message), not
# be taken by argparse for an unknown option
SIZE_OPTIONS = ("--size", "--grid", "--area")
_SIZE_LIKE = re.compile(r"-?\d+\s*[xX]\s*-?\d+")


def _join_size_values(argv: list[str]) -> list[str]:
    out = []
    for k, tok in enumerate(argv):
        if k and argv[k - 1] in SIZE_OPTIONS and tok.startswith("-") and _SIZE_LIKE.fullmatch(tok):
            out[-1] = f"{argv[k - 1]}={tok}"
            continue
        out.append(tok)
    return out


def _shown_as_note(show):
    def note(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PageWarning):
            print(f"costgraph: note: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return note


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if not argv:  # a bare `costgraph`: what it can do
            parser.print_help()
            code = 0
        else:
            with warnings.catch_warnings():  # a note on a page (a very large one): one line on stderr
                warnings.simplefilter("always", PageWarning)
                warnings.showwarning = _shown_as_note(warnings.showwarning)
                args = parser.parse_args(_join_size_values(argv))
                code = args.fn(args)
        sys.stdout.flush()  # here, not at exit: a reader that left ends in the branch below
        return code
    except BrokenPipeError:  # `costgraph graph | head`: the reader left; end quietly like Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UserError, ValueError, OSError) as e:
        print(f"costgraph: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("costgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
