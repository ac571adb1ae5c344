"""`costgraph dataset --folder DIR` (or `--csv FILE`): what a dataset of pages costs.

Per page: its size (EXIF orientation applied), layout, image and prompt tokens, FLOPs of the whole
generation (vision + prefill + decode, the engine's variants), and predicted seconds at batch 1 on a
preset (time model: vision, prefill, every decode step). Totals: the batch-1 time, and the time and
pages/day when the dataset is served on that preset (`costgraph serve`'s simulation over its pages).
A bad page file is reported and skipped; the rest go on. Output: a table, `--out FILE.csv|.json`, `--plot`.
`--model`: DeepSeek-OCR (the default) or DeepSeek-OCR 2 (any model whose `serving()` gives a serving record);
outputs name the model when it is not the default one.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from costgraph import symbols as ES
from costgraph.evaluate import Compiled
from costgraph.io import write_atomic
from costgraph.render import table
from costgraph.graphs.serving import ServeConfig, StepModel
from .page_inputs import (csv_sizes, named, output_tokens_of, page_input_args, page_sizes, pyplot, save_figure,
                          served_of)
from .text import UserError

SERVE_LIMIT = 5000   # pages the serving simulation takes (a sample of a larger dataset, every n-th page)


def page_costs(sv, mode, eng, hw, recs: list[dict], text_tokens: int, outputs: np.ndarray) -> list[dict]:
    """Per page: layout, tokens, FLOPs (compiled once, vectorised) and batch-1 seconds (per layout)."""
    good, pages = [], []
    for r, n in zip(recs, outputs):
        try:
            p = sv.page(mode, r["width"], r["height"], eng, text_tokens, int(r.get("output_tokens", n)))
        except ValueError as e:
            print(f"costgraph: error: {r['file']}: {e}", file=sys.stderr)
            continue
        good.append(r)
        pages.append(p)
    if not pages:
        raise UserError("no page can be costed")
    flops = Compiled({"f": sv.e2e_formula(mode, "flops", eng.variants)}, fixed=sv.dtype_values("bf16"))
    lv = [sv.layout_values(p.layout) for p in pages]
    arr = {s.name: np.array([v[s] for v in lv]) for s in lv[0]}
    arr.update({ES.text_tokens.name: np.array([p.text_tokens for p in pages]),
                ES.output_tokens.name: np.array([p.output_tokens for p in pages])})
    f = flops(**{a.name: arr[a.name] for a in flops.args})["f"]
    sm = StepModel(sv, mode, eng, hw)
    seconds: dict = {}
    for p in pages:
        k = (p.key, p.output_tokens)
        if k not in seconds:
            L = sv.prompt_tokens(mode, p)
            steps = np.arange(1, p.output_tokens)
            dec = float(sm.decode(p, 1, L + steps).sum()) if len(steps) else 0.0
            seconds[k] = (sm.vision(p), float(sm.prefill(p, 1)[()]), dec)
    out = []
    for r, p, fl in zip(good, pages, f):
        v, pre, dec = seconds[(p.key, p.output_tokens)]
        lay = p.layout
        out.append({"file": r["file"], "width": r["width"], "height": r["height"],
                    "grid": f"{lay.w_crop}x{lay.h_crop}" if lay.tiled else "none",
                    "image_tokens": sv.image_tokens(lay, mode), "prompt_tokens": sv.prompt_tokens(mode, p),
                    "output_tokens": p.output_tokens, "flops": int(fl), "vision_s": v, "prefill_s": pre,
                    "decode_s": dec, "batch1_s": v + pre + dec, "_page": p})
    return out


def cmd_dataset(args) -> int:
    from costgraph.hardware import get_hardware

    model, sv, mode, eng, text_tokens = served_of(args)
    hw = get_hardware(args.hardware, "bf16")
    if args.csv:   # keeps a CSV's own output lengths
        recs = csv_sizes(args.csv)
    else:
        sizes, names = page_sizes(args)
        recs = [{"file": n, "width": w, "height": h} for (w, h), n in zip(sizes, names)]
    outs = output_tokens_of(args.output_tokens, len(recs))
    rows = page_costs(sv, mode, eng, hw, recs, text_tokens, outs)
    pages = [r.pop("_page") for r in rows]
    step = max(1, -(-len(pages) // SERVE_LIMIT))
    sample = pages[::step]
    served = sv.serve(mode, sample, eng, hw, ServeConfig())
    served.pop("timeline")
    total = {"pages": len(rows), "flops": int(sum(r["flops"] for r in rows)),
             "image_tokens": int(sum(r["image_tokens"] for r in rows)),
             "output_tokens": int(sum(r["output_tokens"] for r in rows)),
             "batch1_seconds": float(sum(r["batch1_s"] for r in rows)),
             "served_pages_per_day": served["pages_per_day"],
             "served_seconds": len(rows) / served["pages_per_second"],
             "served_sample": f"{len(sample)} of {len(rows)} pages" if step > 1 else "every page"}
    rec = {**({"model": model.name} if named(model) else {}), "engine": eng.as_dict(), "hardware": hw.name, "mode": mode.name, "pages": rows, "total": total}
    if args.out:
        write_out(rec, args.out)
    if args.plot:
        write_plot(rec, args.plot)
    if args.json:
        print(json.dumps(rec, indent=1))
        return 0
    show = rows if len(rows) <= args.show else rows[:args.show]
    print((f"model {model.name}; " if named(model) else "") + f"engine {eng.name}; hardware {hw.name}; mode {mode.name}; {len(rows)} pages")
    print(table([[r["file"], f"{r['width']}x{r['height']}", r["grid"], str(r["image_tokens"]), str(r["output_tokens"]),
                  f"{r['flops'] / 1e12:,.2f}", f"{r['batch1_s']:,.2f}"] for r in show],
                ["page", "size", "grid", "image tokens", "output tokens", "TFLOPs", "batch-1 s"]))
    if len(show) < len(rows):
        print(f"... {len(rows) - len(show)} more pages (--out FILE.csv for all)")
    print(f"total: {total['flops'] / 1e15:,.3f} PFLOPs, {total['output_tokens']:,} output tokens; batch 1: "
          f"{total['batch1_seconds'] / 3600:,.2f} h; served ({eng.name}, {total['served_sample']}): "
          f"{total['served_seconds'] / 3600:,.3f} h at {total['served_pages_per_day']:,.0f} pages/day")
    return 0


def write_out(rec: dict, path: str) -> None:
    if path.endswith(".json"):
        write_atomic(path, json.dumps(rec, indent=1))
        return
    if not path.endswith(".csv"):
        raise UserError(f"--out must end in .csv or .json: {path}")
    cols = [k for k in rec["pages"][0]]

    def chunks():
        yield ",".join(cols) + "\n"
        for r in rec["pages"]:
            yield ",".join(str(r[c]) for c in cols) + "\n"
    write_atomic(path, chunks())


def write_plot(rec: dict, path: str) -> None:
    plt = pyplot()

    rows = rec["pages"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist([r["image_tokens"] for r in rows], bins=30)
    a.set_xlabel("image tokens per page")
    a.set_ylabel("pages")
    b.scatter([r["image_tokens"] for r in rows], [r["batch1_s"] for r in rows], s=8)
    b.set_xlabel("image tokens")
    b.set_ylabel(f"batch-1 seconds on {rec['hardware']}")
    fig.suptitle(f"{len(rows)} pages, {rec['mode']}, engine {rec['engine']['engine']}")
    save_figure(fig, path)


def add_parser(sub) -> None:
    q = sub.add_parser("dataset", help="per-page layout, tokens, FLOPs and time of a dataset, and its totals")
    page_input_args(q)
    q.add_argument("--hardware", default="a100-40gb", help="a preset (default: a100-40gb)")
    q.add_argument("--out", metavar="FILE.csv|FILE.json", help="every page's row (written whole or not at all)")
    q.add_argument("--plot", metavar="FILE.png", help="image tokens and batch-1 time per page")
    q.add_argument("--show", type=int, default=20, help="pages printed (default 20)")
    q.set_defaults(fn=cmd_dataset)
