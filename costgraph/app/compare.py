"""`costgraph compare`: several models on the same pages, side by side (generic over `costgraph.model.Model`).

Per page and model: the crop grid, image tokens, valid tokens where the model defines them, FLOPs per
scope (the model's whole-run composite and the parts a report breaks it into), peak activation memory and
the roofline time on a hardware preset. `--plot FILE`: image tokens and end-to-end FLOPs against the page
aspect ratio (a fixed-area aspect sweep through each model's own layout rule, the given pages marked).
`--latex`: each model's closed forms of the compared scopes, one after another, for a paper.

FLOPs come from `costgraph.app.sweep` (compiled once per model, evaluated on arrays of pages); the peak
and the time are the engine's per-point evaluations (`costgraph.stages`: compiled once per stage).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from costgraph import forms, stages
from costgraph.hardware import Hardware
from costgraph.io import write_atomic
from costgraph.render import human, table
from costgraph.graphs.pages import PageWarning, page_size
from .args import dtype_arg, max_num_option, model_arg
from .models import MODELS, get_model
from .sweep import Sequence, aspect_pages, folder_pages, sweep_pages
from .text import UserError, parse_hardware, parse_size, split_list

DEFAULT_MODELS = "deepseek-ocr,deepseek-ocr-2"
DEFAULT_HARDWARE = "a100-40gb"
# the aspect sweep of --plot: pages of an A4 scan's area at 200 dpi, W/H from 1:5 to 5:1
PLOT_AREA = 1654 * 2339
PLOT_ASPECTS = (0.2, 5.0, 400)


def add_parser(sub) -> None:
    q = sub.add_parser("compare", help="models side by side on the same pages: tokens, FLOPs, memory, time")
    model_arg(q)
    q.add_argument("--models", default=DEFAULT_MODELS, metavar="A,B", help="comma list (default: %(default)s)")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", type=parse_size, action="append", metavar="WxH", help="a page size (repeatable)")
    g.add_argument("--image", action="append", metavar="PATH", help="a page image (repeatable)")
    g.add_argument("--folder", metavar="DIR", help="every image in a folder")
    q.add_argument("--max-num", type=int, default=None, help="most crops (default: each model's own)")
    q.add_argument("--text-tokens", type=int, default=None, help="prompt text tokens (default: each model's)")
    q.add_argument("--output-tokens", type=int, default=None, help="generated tokens (default: each model's)")
    q.add_argument("--hardware", default=DEFAULT_HARDWARE, metavar="NAME",
                   help="the preset of the predicted time (default: %(default)s)")
    dtype_arg(q)
    q.add_argument("--json", action="store_true", help="JSON on stdout")
    q.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    q.add_argument("--plot", metavar="FILE", help="image tokens and FLOPs against the page aspect ratio (PNG, PDF, SVG)")
    q.add_argument("--latex", action="store_true", help="the closed forms of the compared scopes, model by model")
    q.set_defaults(fn=cmd_compare)


def _pages(args) -> tuple[list[str], np.ndarray, np.ndarray, list[dict]]:
    if args.folder:
        labels, w, h, errors = folder_pages(args.folder)
        return list(labels), w, h, errors
    if args.image:
        labels, ws, hs, errors = [], [], [], []
        for path in args.image:
            try:
                w, h = page_size(path)
            except ValueError as e:
                errors.append({"page": path, "error": str(e)})
                continue
            labels.append(os.path.basename(path))
            ws.append(w)
            hs.append(h)
        if not labels:
            raise UserError(f"no readable image: {errors[0]['error']}")
        return labels, np.array(ws, dtype=np.int64), np.array(hs, dtype=np.int64), errors
    for w, h in args.size:
        if w <= 0 or h <= 0:
            raise UserError(f"image size must be positive integers, got {w}x{h}")
    return ([f"{w}x{h}" for w, h in args.size], np.array([s[0] for s in args.size], dtype=np.int64),
            np.array([s[1] for s in args.size], dtype=np.int64), [])


def _models(text: str):
    names = split_list([text], "model")
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise UserError(f"unknown model {bad[0]!r} (choose from {', '.join(MODELS)})")
    models = [get_model(n) for n in dict.fromkeys(names)]
    dumb = [m.name for m in models if not m.generates]
    if dumb:
        raise UserError(f"compare takes models that read pages into a language model; {dumb[0]} does not")
    return models


def _sequence(model, args) -> Sequence:
    values = dict(model.default_sequence())
    for k in ("text_tokens", "output_tokens"):
        v = getattr(args, k)
        if v is not None:
            values[k] = v
    return Sequence(model.name, tuple(values.items()), None, args.dtype)


def compare_models(models, labels, widths, heights, *, args, hw: Hardware) -> dict:
    """Every page through every model: one record per (page, model)."""
    out = {"models": [m.name for m in models], "hardware": hw.name, "dtype": args.dtype, "pages": [],
           "errors": []}
    per_model = {}
    for m in models:
        mode = m.get_mode(m.default_mode)
        scopes = m.expand_scopes(tuple(c for c in m.composites if c in m.scopes(mode)))
        seq = _sequence(m, args)
        try:
            sw = sweep_pages(mode.name, widths, heights, args.max_num, seq, labels=labels, scopes=scopes,
                             metrics=("flops",), progress=False)
        except ValueError as e:
            raise UserError(f"{m.name}: {e}") from None
        out["errors"] += [{"model": m.name, **e} for e in sw.errors]
        per_model[m.name] = (m, mode, scopes, sw, seq.resolved())
    for k, label in enumerate(labels):
        for name, (m, mode, scopes, sw, seq) in per_model.items():
            rows = np.flatnonzero(sw.columns["page"] == label)
            if not len(rows):
                continue
            i = rows[0]
            w, h = int(widths[k]), int(heights[k])
            point = m.point(mode, size=(w, h), **max_num_option(args), **dict(seq.values))
            lay = m.layout_record(point)
            values = {**point.values}
            fixed = {**m.mode_values(mode), **m.dtype_values(seq.dtype)}
            peaks = stages.peaks(m, mode, {**values, **fixed}, seq.variants)
            peak = max(p["bytes"] for p in peaks.values())
            roof = stages.roofline(m, mode, fixed, values, [hw], seq.variants)[hw.name]
            out["pages"].append({
                "page": label, "width": w, "height": h, "aspect": round(w / h, 4), "model": m.name,
                "mode": mode.name, "grid": f"{lay['w_crop']}x{lay['h_crop']}", "crops": lay["num_crops"],
                "image_tokens": lay["image_tokens"], "valid_tokens": lay.get("valid_tokens"),
                "prompt_tokens": point.record["sequence"]["prompt_tokens"],
                "flops": {s: int(sw.value(s, "flops")[i]) for s in scopes},
                "peak_activation_bytes": int(peak),
                "seconds": {st: r["seconds"] for st, r in roof.items() if isinstance(r, dict)},
                "total_seconds": roof["total_seconds"],
                "sequence": dict(seq.values), "variants": seq.variants.as_dict()})
    return out


def _rows(out: dict) -> tuple[list[str], list[list[str]]]:
    header = ["page", "model", "grid", "image tokens", "valid tokens", "vision FLOPs", "prefill FLOPs",
              "decode FLOPs", "e2e FLOPs", "peak activations", f"time on {out['hardware']} (s)"]
    rows = []
    for r in out["pages"]:
        f = r["flops"]
        rows.append([r["page"], r["model"], r["grid"], str(r["image_tokens"]),
                     "-" if r["valid_tokens"] is None else str(r["valid_tokens"]),
                     human(f.get("vision", 0)), human(f.get("decoder.prefill", 0)), human(f.get("decoder.decode", 0)),
                     human(f.get("e2e", 0)), human(r["peak_activation_bytes"]) + "B", f"{r['total_seconds']:.3f}"])
    return header, rows


def _context(out: dict) -> str:
    seqs = {r["model"]: r["sequence"] for r in out["pages"]}
    parts = [f"{m}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for m, s in seqs.items()]
    variants = {r["model"]: " ".join(f"{k}={v}" for k, v in r["variants"].items()) for r in out["pages"]}
    return (f"storage {out['dtype']}; " + "; ".join(parts) + "; variants: " +
            "; ".join(f"{m}: {v}" for m, v in variants.items()) + f". Time: roofline on {out['hardware']} (vision "
            "+ prefill + every decode forward); peak: the largest stage's live activations")


def markdown(out: dict) -> str:
    header, rows = _rows(out)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n{_context(out)}"


def latex(models, scopes=("vision", "e2e"), dtype: str = "bf16") -> str:
    lines = [f"% needs: {line}" for line in forms.LATEX_PREAMBLE]
    for scope in scopes:
        for m in models:
            f = forms.build(m, "simplified", m.default_mode, scope, "flops", None, m.variants(), dtype)
            lines.append(f"% {m.label or m.name}, mode {m.default_mode}: FLOPs of {scope}")
            lines += [f"%   {c}" for c in f.commentary()]
            lines.append(f"\\[ {f.latex(0)} \\]" if not f.latex(0).lstrip().startswith("\\[") else f.latex(0))
    return "\n".join(lines)


def plot(models, out: dict, path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi, n = PLOT_ASPECTS
    w, h = aspect_pages(lo, hi, n, PLOT_AREA)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for m in models:
        mode = m.get_mode(m.default_mode)
        sw = sweep_pages(mode.name, w, h, args.max_num, _sequence(m, args), scopes=("vision", "e2e"),
                         metrics=("flops",), progress=False, curve=True)
        aspect = sw.columns["width"] / sw.columns["height"]
        line, = ax1.plot(aspect, sw.columns["image_tokens"], label=m.label or m.name)
        ax2.plot(aspect, sw.value("e2e", "flops") / 1e12, color=line.get_color(), label=f"{m.label or m.name} e2e")
        ax2.plot(aspect, sw.value("vision", "flops") / 1e12, color=line.get_color(), ls="--",
                 label=f"{m.label or m.name} vision")
        mine = [r for r in out["pages"] if r["model"] == m.name]
        ax1.scatter([r["aspect"] for r in mine], [r["image_tokens"] for r in mine], color=line.get_color(), zorder=3)
        ax2.scatter([r["aspect"] for r in mine], [r["flops"]["e2e"] / 1e12 for r in mine], color=line.get_color(),
                    zorder=3)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks([0.2, 0.25, 1 / 3, 0.5, 0.75, 1, 4 / 3, 2, 3, 4, 5])
        ax.set_xticklabels(["1:5", "1:4", "1:3", "1:2", "3:4", "1:1", "4:3", "2:1", "3:1", "4:1", "5:1"])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("image tokens")
    ax2.set_ylabel("TFLOPs")
    ax2.set_xlabel(f"page aspect W/H (pages of {PLOT_AREA:,} px; dots: the compared pages at their own size)")
    ax1.set_title("Cost against page aspect ratio, each model's own layout rule")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg"):
        raise UserError(f"--plot: unknown image format {fmt!r} (png, pdf or svg)")
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def cmd_compare(args) -> int:
    import warnings

    models = _models(args.models)
    hw = parse_hardware(args.hardware, args.dtype)
    if not hw or len(hw) != 1:
        raise UserError("--hardware takes one preset")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise UserError(f"plot folder does not exist: {os.path.dirname(os.path.abspath(args.plot))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PageWarning)
        labels, widths, heights, errors = _pages(args)
    out = compare_models(models, labels, widths, heights, args=args, hw=hw[0])
    out["errors"] = errors + out["errors"]
    for e in out["errors"]:
        print(f"costgraph: error: {e.get('model', '')} {e.get('page', '')}: {e['error']}".replace("  ", " "),
              file=sys.stderr)
    if args.plot:
        plot(models, out, args.plot, args)
    if args.json:
        print(json.dumps(out, indent=1))
    elif args.markdown:
        print(markdown(out))
    else:
        header, rows = _rows(out)
        print(table(rows, header))
        print(f"# {_context(out)}")
    if args.latex:
        print(latex(models, dtype=args.dtype))
    return 0 if out["pages"] else 2

