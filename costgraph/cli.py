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


# ---- metrics beyond the per-scope Cost totals ---------------------------------------------

# `--metrics` names a group; a group is some Cost fields summed per scope plus, for some, a
# section of its own (params, peak activations, KV cache).
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "flops": ("flops",),
    "elementwise_flops": ("elementwise_flops",),
    "bytes": ("bytes_read", "bytes_written"),       # shown with their sum, `bytes`
    "params": (),                                   # resident / executed / active (costgraph.params)
    "activations": ("activation_bytes",),           # + peak per stage (costgraph.liveness)
    "kv_cache": (),                                 # per token and at the final context
}
# Without --metrics, `cost` shows every Cost field per scope (activation_bytes included) and the
# derived bytes; the groups below add nothing slower (no liveness pass, no parameter section).
DEFAULT_GROUPS = ("flops", "elementwise_flops", "bytes")
# `formula --metric`: every Cost field, and these derived metrics.
EXTRA_FORMULA_METRICS = ("bytes", "params", "weight_bytes", "active_params", "peak_activation_bytes",
                         "kv_cache_bytes")


def parse_metrics(text: str) -> tuple[str, ...]:
    """'flops,bytes' or 'all' -> metric groups, in a fixed order; unknown names are a UserError."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise UserError(f"no metrics in {text!r} (choose from {', '.join(METRIC_GROUPS)}, all)")
    if "all" in items:
        return tuple(METRIC_GROUPS)
    bad = [t for t in items if t not in METRIC_GROUPS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRIC_GROUPS)}, all)")
    return tuple(g for g in METRIC_GROUPS if g in items)


def parse_hardware(text: str | None, dtype: str) -> list:
    """--hardware NAME[,NAME...] or all (presets; `this-machine` calibrates now)."""
    from .hardware import PRESETS, get_hardware, names

    if not text:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in items:
        items = [i for i in items if i != "all"] + [n for n in PRESETS if n not in items]
    bad = [t for t in items if t not in names()]
    if bad or not items:
        raise UserError(f"unknown hardware {(bad or [text])[0]!r} (choose from {', '.join(names())}, all)")
    return [get_hardware(n, dtype) for n in dict.fromkeys(items)]


def output_text_tokens_option(q) -> None:
    """--output-text-tokens N: the compression ratio N / valid tokens (SPEC section 3) in the layout records."""
    q.add_argument("--output-text-tokens", type=int, default=None, metavar="N",
                   help="tokens of the page's OCR text: adds compression_ratio = N / valid_tokens (the vendor's "
                        "int rule), as the vendor's test_compress prints it (default: none)")


# ---- commands ---------------------------------------------------------------------------

def cmd_layout(args) -> int:
    from graphs import deepseek_ocr as model

    mode = model.get_mode(args.mode)
    n = args.output_text_tokens
    records = [model.layout_record(model.layout_for(w, h, mode, max_num=args.max_num), mode, n)
               for w, h in args.size]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        ratio = [] if n is None else [f"compression ({n} / valid)"]
        print(table([[f"{r['width']}x{r['height']}", f"{r['w_crop']}x{r['h_crop']}", r["num_crops"],
                      r["image_tokens"], r["paper_tokens"], r["valid_tokens"], r["valid_tokens_paper_ceil"]]
                     + ([] if n is None else [ratio_text(r["compression_ratio"])]) for r in records],
                    ["page", "grid", "crops", "image tokens", "paper count", "valid tokens", "valid (paper ceil)"]
                    + ratio))
    return 0


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def valid_tokens_line(r: dict) -> str:
    """The layout record's valid tokens (and compression ratio) in words."""
    line = (f"valid tokens {r['valid_tokens']} (the vendor's int rule; {r['valid_tokens_paper_ceil']} with the "
            f"paper's ceil)")
    if "compression_ratio" in r:
        line += (f"; compression {ratio_text(r['compression_ratio'])} = {r['output_text_tokens']} output text "
                 f"tokens / {r['valid_tokens']} valid")
    return line


def _layout_from_args(args, mode):
    from graphs import deepseek_ocr as model

    if args.grid:
        return model.layout_for_grid(*args.grid, mode)
    if args.image:
        return model.layout_for_image(args.image, mode, max_num=args.max_num)
    return model.layout_for(*args.size, mode, max_num=args.max_num)


def _variants_from_args(args):
    from graphs.decoder import Variants

    return Variants(attention=args.attention, lm_head=args.lm_head, rope=args.rope)


def _scopes_from_args(args, mode) -> tuple[str, ...]:
    """--scope is repeatable and takes comma lists; default: every scope of the mode."""
    from graphs import deepseek_ocr as model

    allowed = model.scopes_for(mode)
    if not args.scope:
        return allowed
    scopes = tuple(dict.fromkeys(s.strip() for item in args.scope for s in item.split(",") if s.strip()))
    bad = [s for s in scopes if s not in allowed]
    if bad or not scopes:
        raise UserError(f"unknown scope {', '.join(bad) or repr('')} for mode {mode.name} "
                        f"(choose from {', '.join(allowed)})")
    if model.E2E in scopes:  # e2e comes with its parts: vision, prefill, decode
        scopes = tuple(dict.fromkeys([s for s in scopes if s != model.E2E] + list(model.E2E_PARTS) + [model.E2E]))
    return scopes


def cmd_cost(args) -> int:
    from graphs import deepseek_ocr as model

    # no --metrics: every sum of node costs (METRICS), as before issue 5, and no extra sections
    groups = parse_metrics(args.metrics) if args.metrics is not None else DEFAULT_GROUPS
    mode = model.get_mode(args.mode)
    variants = _variants_from_args(args)
    hardware = parse_hardware(args.hardware, args.dtype)
    layout = _layout_from_args(args, mode)
    scopes = _scopes_from_args(args, mode)
    sequence = model.sequence_record(mode, layout, args.text_tokens, args.output_tokens)
    cost_metrics = [m for g in groups for m in METRIC_GROUPS[g]] if args.metrics is not None else list(METRICS)
    totals = model.layout_totals(mode, layout, scopes, cost_metrics, text_tokens=args.text_tokens,
                                 output_tokens=args.output_tokens, variants=variants, dtype=args.dtype)
    out = {"mode": mode.name, "layout": model.layout_record(layout, mode, args.output_text_tokens),
           "sequence": sequence, "variants": variants.as_dict(), "dtype": args.dtype, "metrics": list(groups),
           "totals": totals}
    from . import stages

    out.update(stages.extra_metrics(mode, layout, scopes, groups, totals, text_tokens=args.text_tokens,
                                    output_tokens=args.output_tokens, variants=variants, dtype=args.dtype,
                                    hardware=hardware))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    r = out["layout"]
    print(f"mode {mode.name} ({mode.note})")
    print(f"page {r['width']}x{r['height']} -> grid {r['w_crop']}x{r['h_crop']}, {r['num_crops']} crops, "
          f"{r['image_tokens']} image tokens ({r['paper_tokens']} without newlines/separator)")
    print(valid_tokens_line(r))
    print(f"prompt {sequence['prompt_tokens']} tokens (1 BOS + {r['image_tokens']} image + {sequence['text_tokens']} "
          f"text), {sequence['output_tokens']} output tokens (prefill + {sequence['decode_forwards']} decode forwards)")
    print(f"variants: {variants.label()}; storage dtype {args.dtype}")
    derived = out.get("derived", {})
    rows = [[scope, m, f"{v:,}", human(v)] for scope, ms in totals.items()
            for m, v in {**ms, **derived.get(scope, {})}.items()]
    print(table(rows, ["scope", "metric", "value", "approx"]))
    for line in stages.text_sections(out):
        print(line)
    return 0


def cmd_roofline(args) -> int:
    """Roofline latency per stage and memory fit, for presets (a table; Markdown for the README)."""
    from graphs import deepseek_ocr as model
    from . import stages

    mode = model.get_mode(args.mode)
    variants = _variants_from_args(args)
    hardware = parse_hardware(args.hardware, args.dtype)
    if args.nodes < 0:
        raise UserError(f"--nodes must be >= 0, got {args.nodes}")
    layout = _layout_from_args(args, mode)
    sequence = model.sequence_record(mode, layout, args.text_tokens, args.output_tokens)
    out = stages.extra_metrics(mode, layout, (), ("params", "activations", "kv_cache"), {},
                               text_tokens=args.text_tokens, output_tokens=args.output_tokens, variants=variants,
                               dtype=args.dtype, hardware=hardware, top=args.nodes)
    out = {"mode": mode.name, "layout": model.layout_record(layout, mode, args.output_text_tokens),
           "sequence": sequence, "variants": variants.as_dict(), "dtype": args.dtype, **out}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    r = out["layout"]
    context = (f"{mode.name} {r['width']}x{r['height']} (grid {r['w_crop']}x{r['h_crop']}, {r['image_tokens']} image "
               f"tokens), prompt {sequence['prompt_tokens']} tokens, {sequence['output_tokens']} output tokens, "
               f"{args.dtype}, {variants.label()}")
    print(stages.roofline_markdown(out["roofline"]) if args.markdown else stages.roofline_table(out["roofline"]))
    print(f"\n{context}" if args.markdown else f"# {context}")
    if args.nodes:
        for name, rec in out["roofline"].items():
            print(f"\n{name}: slowest nodes per stage (one execution; decode at its last step)")
            for st, srec in rec["stages"].items():
                srec = srec.get("last_step", srec) if isinstance(srec, dict) else srec
                if not isinstance(srec, dict) or "top_nodes" not in srec:
                    continue
                rows = [[n["node"], f"{1e6 * n['seconds']:,.1f}", n["bound"],
                         "-" if n["intensity"] is None else f"{n['intensity']:,.2f}"] for n in srec["top_nodes"]]
                print(table(rows, [st, "us", "bound", "FLOP/byte"]))
    return 0


def cmd_formula(args) -> int:
    from graphs import deepseek_ocr as model

    mode = model.get_mode(args.mode) if args.mode else None
    variants = _variants_from_args(args)
    if args.metric not in METRICS + EXTRA_FORMULA_METRICS:
        raise UserError(f"unknown metric {args.metric!r} (choose from {', '.join(METRICS + EXTRA_FORMULA_METRICS)})")
    scopes = model.scopes_for(mode)
    if args.scope not in scopes:
        raise UserError(f"unknown scope {args.scope!r} (choose from {', '.join(scopes)})")
    from . import forms

    if args.metric in METRICS:
        form = forms.build(args.form, mode.name if mode else None, args.scope, args.metric, args.grid_multiple,
                           variants)
    else:
        from . import stages

        form = stages.extra_form(args.form, mode, args.scope, args.metric, args.grid_multiple, variants)
    if args.json:
        print(json.dumps({**form.to_json(), "variants": variants.as_dict(), "note": model.FORMULA_NOTE}, indent=1))
    else:
        print(form.latex() if args.latex else form.plain())
        c = "%" if args.latex else "#"
        print(f"{c} form: {form.kind}")
        for line in form.commentary():
            print(f"{c} {line}")
        print(f"{c} variants: {variants.label()}")
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
    from graphs.config import DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS, MAX_CROPS, MODES

    p = _Parser(prog="costgraph", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modes = list(MODES)

    def mode_arg(q, default="gundam"):
        q.add_argument("--mode", default=default, help=f"one of {', '.join(modes)} (default: %(default)s)")

    def max_num_arg(q):
        q.add_argument("--max-num", type=int, default=MAX_CROPS, help="most crops (HF 9, vLLM 6)")

    def variant_args(q):
        from graphs.decoder import ATTENTION, LM_HEAD, ROPE

        q.add_argument("--attention", choices=list(ATTENTION), default="eager",
                       help="eager: full L x L (vendor HF); flash: causal half; uncounted: 0, as profilers "
                            "blind to flash kernels report (default: %(default)s)")
        q.add_argument("--lm-head", choices=list(LM_HEAD), default="all",
                       help="prefill lm_head over all prompt positions (vendor HF) or the last (vLLM) "
                            "(default: %(default)s)")
        q.add_argument("--rope", choices=list(ROPE), default="vendor",
                       help="vendor: cos/sin recomputed per layer (a small matmul); once: per forward, "
                            "elementwise (transformers 5.x) (default: %(default)s)")

    def metrics_arg(q):
        q.add_argument("--metrics", default=None, metavar="LIST",
                       help=f"comma list of {', '.join(METRIC_GROUPS)}, or all (default: every per-scope sum: "
                            f"{', '.join(METRICS)}, and bytes = read + written)")

    def dtype_arg(q):
        from graphs.config import DEFAULT_DTYPE, DTYPES

        q.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE,
                       help="storage dtype of weights and activations (default: %(default)s)")

    def hardware_arg(q):
        from .hardware import names

        q.add_argument("--hardware", default=None, metavar="NAME[,NAME...]",
                       help=f"roofline latency and memory fit on {', '.join(names())} or all "
                            "(this-machine: a short calibration now)")

    q = sub.add_parser("layout", help="crop grid and image tokens of page sizes")
    q.add_argument("--size", type=parse_size, action="append", required=True, metavar="WxH")
    mode_arg(q)
    max_num_arg(q)
    output_text_tokens_option(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_layout)

    def page_args(q):
        """One page (by size, image or grid) and what the language model runs for it."""
        mode_arg(q)
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--size", type=parse_size, metavar="WxH")
        g.add_argument("--image", metavar="PATH")
        g.add_argument("--grid", type=parse_size, metavar="AxB", help="crop grid directly (1x1: no crops)")
        max_num_arg(q)
        q.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                       help="prompt text after the image (default: %(default)s, an estimate of the OCR prompt)")
        q.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS,
                       help="generated tokens, >= 1: the prefill yields the first (default: %(default)s)")
        output_text_tokens_option(q)
        variant_args(q)

    q = sub.add_parser("cost", help="layout and cost totals of one page")
    page_args(q)
    q.add_argument("--scope", action="append", metavar="SCOPE[,SCOPE...]",
                   help="repeatable or comma list (default: every scope of the mode)")
    metrics_arg(q)
    dtype_arg(q)
    hardware_arg(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_cost)

    q = sub.add_parser("roofline", help="roofline latency per stage and whether a generation fits, per hardware")
    page_args(q)
    dtype_arg(q)
    q.add_argument("--hardware", default="all", metavar="NAME[,NAME...]",
                   help="presets, this-machine (calibrates now) or all (default: %(default)s: every datasheet preset)")
    q.add_argument("--nodes", type=int, default=0, metavar="N", help="also list the N slowest nodes per stage")
    q.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_roofline)

    q = sub.add_parser("formula", help="closed form of a metric over a scope")
    q.add_argument("--mode", default=None, help="substitute this mode's sizes (default: all symbolic)")
    q.add_argument("--metric", default="flops")
    q.add_argument("--scope", default="vision")
    variant_args(q)
    q.add_argument("--form", choices=["general", "simplified", "coefficients"], default="simplified",
                   help="general: exact, with floor/ceiling and the no-crop case; simplified: a polynomial in the "
                        "layout under the printed assumptions; coefficients: numbers by term (needs --mode) "
                        "(default: %(default)s)")
    q.add_argument("--grid-multiple", type=int, default=None, metavar="M",
                   help="simplified, symbolic sizes: assume sizes are multiples of M*patch_size (default: the "
                        "smallest M that removes every floor/ceiling; 4 keeps the window ceilings)")
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

    from verify.cli import add_parser as add_verify_parser  # parser and handler live in verify/cli.py
    add_verify_parser(sub)
    from .tables import add_parser as add_table_parser  # parsers and handlers in tables.py, sweep.py
    from .sweep import add_parser as add_sweep_parser
    add_table_parser(sub, max_num_arg, variant_args)
    add_sweep_parser(sub, max_num_arg, variant_args)
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
