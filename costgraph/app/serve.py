"""`costgraph serve`: throughput of a model (`--model`: DeepSeek-OCR, the default, or DeepSeek-OCR 2) under
continuous batching (vLLM) or static batches (HF); `costgraph calibrate`: microbenchmark this CPU into the
`cpu` preset of the time model.

    costgraph serve --mode gundam --size 1654x2339 --output-tokens 1000 --hardware a100-40gb --engine vllm [--json]
    costgraph serve --model deepseek-ocr-2 --size 1654x2339 --output-tokens 1000 --hardware a100-40gb

The model's `serving()` gives its serving record (`costgraph.graphs.serving.Served`); the simulation is
model-generic. Outputs name the model when it is not the default one.

Pages: `--size WxH[,WxH...]` (cycled over `--pages` pages), `--folder DIR` (every page image in it),
or `--csv FILE` (columns width,height and optionally output_tokens). `--output-tokens N` or `A:B` (uniform,
seeded). A model's published claim (DeepSeek-OCR's paper) is printed beside the prediction for the same
setting; a model without one (DeepSeek-OCR 2) gets none.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from costgraph.hardware import GPU_DEFAULT
from costgraph.render import table
from costgraph.graphs.serving import Page, ServeConfig
from .page_inputs import named, output_tokens_of, page_input_args, page_sizes, pyplot, save_figure, served_of
from .text import UserError

DEFAULT_PAGES = 400
TIMELINE_POINTS = 200   # steps of the memory timeline kept in the JSON


def pages_of(args, sv, mode, eng, text_tokens) -> list[Page]:
    sizes, _ = page_sizes(args)
    n = args.pages if args.size else len(sizes)
    if n < 1:
        raise UserError("no pages to serve")
    outs = output_tokens_of(args.output_tokens, n)
    return [sv.page(mode, *sizes[i % len(sizes)], eng, text_tokens, int(outs[i])) for i in range(n)]


def cmd_serve(args) -> int:
    from costgraph.hardware import get_hardware
    from tqdm import tqdm

    model, sv, mode, eng, text_tokens = served_of(args)
    hw = get_hardware(args.hardware, "bf16")
    pages = pages_of(args, sv, mode, eng, text_tokens)
    cfg = ServeConfig(args.max_num_seqs, args.gpu_memory_utilization, args.max_model_len, args.block_size,
                         args.max_num_batched_tokens, args.rate)
    with tqdm(total=len(pages), desc="pages served", disable=args.json or not sys.stderr.isatty(),
              file=sys.stderr) as bar:
        out = sv.serve(mode, pages, eng, hw, cfg, progress=bar)
    timeline = out.pop("timeline")
    rec = {**({"model": model.name} if named(model) else {}), "engine": eng.as_dict(), "hardware": hw.name,
           "mode": mode.name, "efficiency": (hw.efficiency or GPU_DEFAULT).as_dict(), **out, "paper": sv.published,
           "compared_with_paper": compare_with_paper(out, sv.published)}
    if args.plot:
        write_plot(timeline, rec, args.plot)
    every = max(1, len(timeline["time"]) // TIMELINE_POINTS)   # the memory timeline, every n-th step
    rec["timeline"] = {k: v[::every] for k, v in timeline.items()}
    if args.json:
        print(json.dumps(rec, indent=1, default=str))
        return 0
    print("\n".join(lines(rec, pages, sv)))
    return 0


def compare_with_paper(out: dict, paper: dict | None) -> dict | None:
    """Predicted over claimed; None for a model with no published claim."""
    if paper is None:
        return None
    return {"pages_per_day_ratio": out["pages_per_day"] / paper["pages_per_day"],
            "tokens_per_second_ratio": out["output_tokens_per_second"] / paper["output_tokens_per_second"]}


WHY = ("The prediction is the GPU work alone, at the time model's documented default efficiencies (no GPU here "
       "to calibrate them): it leaves out the engine's host work per step (scheduling, sampling, "
       "detokenisation), image decoding, resizing and cropping on the CPU, PDF rendering, and kernels slower "
       "than the defaults (measured GPU kernel time has been 1.4-3x the roofline, decode worst). The claims "
       "also come from real documents (varied layouts, output lengths and concurrency), not one page size.")
WHY_ALONE = WHY.rsplit(" The claims", 1)[0]   # the same caveats, without a claim to compare


def lines(rec: dict, pages, sv) -> list[str]:
    m = rec["memory"]
    pct = lambda d: " / ".join(f"{1e3 * d[k]:,.1f}" for k in ("p50", "p90", "p99"))
    out = [(f"model {rec['model']}; " if "model" in rec else "") +
           f"engine {rec['engine']['engine']} ({sv.engines[rec['engine']['engine']].note}); hardware "
           f"{rec['hardware']}; mode {rec['mode']}; {rec['pages']} pages, arrival {rec['limits']['arrival']}",
           f"memory: {m['gpu_bytes'] / 2**30:.0f} GiB x {m['utilization']} - weights {m['weight_bytes'] / 2**30:.2f} GiB"
           f" - activations {m['activation_bytes'] / 2**30:.2f} GiB -> {m['kv_blocks']:,} KV blocks of "
           f"{m['kv_block_tokens']} tokens ({m['kv_capacity_tokens']:,} tokens, {m['max_sequences_by_kv']} sequences "
           f"of this length); max_num_seqs {rec['limits']['max_num_seqs']}"
           + (f", batch that fits {rec['limits']['batch_that_fits']}"
              if rec['limits']['batch_that_fits'] < rec['limits']['max_num_seqs'] else ""),
           ""]
    rows = [["pages/s", f"{rec['pages_per_second']:,.2f}"], ["pages/day", f"{rec['pages_per_day']:,.0f}"],
            ["output tokens/s", f"{rec['output_tokens_per_second']:,.0f}"],
            ["TTFT p50/p90/p99 ms", pct(rec["ttft_seconds"])], ["TPOT p50/p90/p99 ms", pct(rec["tpot_seconds"])],
            ["max concurrent sequences", str(rec["max_concurrent_sequences"])],
            ["peak KV cache GiB", f"{rec['peak_kv_bytes'] / 2**30:,.2f}"], ["preemptions", str(rec["preemptions"])],
            ["steps (prefill / decode)", f"{rec['steps']['prefill']:,} / {rec['steps']['decode']:,}"]]
    out += table(rows, ["predicted", "value"]).splitlines()
    f = rec["decode_step_formulas"]
    out += ["", f"one decode step of B sequences at context C ({rec['engine']['engine']}, closed form; weights once, "
                f"a KV cache each):", f"  flops = {f['flops']}", f"  bytes_read = {f['bytes_read']}",
            f"  bytes_written = {f['bytes_written']}"]
    c, paper = rec["compared_with_paper"], rec["paper"]
    if paper is None:
        return out + ["", f"no published throughput for {rec.get('model', 'this model')}: nothing to compare "
                          "with", WHY_ALONE]
    out += ["", f"paper: {paper['pages_per_day']:,} pages/day, ~{paper['output_tokens_per_second']:,} tokens/s "
                f"({paper['source']}); predicted/claimed: {c['pages_per_day_ratio']:.2f} (pages/day), "
                f"{c['tokens_per_second_ratio']:.2f} (tokens/s)", WHY]
    return out


def write_plot(timeline: dict, rec: dict, path: str) -> None:
    plt = pyplot()

    t = np.asarray(timeline["time"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, np.asarray(timeline["kv_bytes"]) / 2**30, label="KV cache (GiB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax2 = ax.twinx()
    ax2.plot(t, timeline["running"], color="tab:orange", label="running sequences")
    ax2.set_ylabel("running sequences")
    ax.set_title(f"{rec['engine']['engine']} on {rec['hardware']}: {rec['pages']} pages ({rec['mode']})")
    save_figure(fig, path)


def cmd_calibrate(args) -> int:
    from costgraph import calibrate as C
    from costgraph.hardware import user_path
    from pathlib import Path

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in C.DTYPES]
    if bad or not dtypes:
        raise UserError(f"unknown dtype {(bad or [args.dtype])[0]!r} (choose from {', '.join(C.DTYPES)})")
    res = C.run(tuple(dtypes), args.threads)
    path = Path(args.out) if args.out else user_path()
    C.write(res, path)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    rows = []
    for d, p in res["presets"].items():
        h, e = p["hardware"], p["efficiency"]
        rows.append([d, f"{h['tensor_flops'] / 1e9:,.1f}", f"{h['bandwidth'] / 1e9:,.1f}", f"{e['gemm']:.2f}",
                     f"{e['attention']:.2f}", f"{e['stream']:.2f}", f"{e['elementwise']:.2f}", f"{e['copy']:.2f}",
                     f"{e['launch'] * 1e6:.1f}"])
    print(table(rows, ["dtype", "matmul GFLOP/s", "GB/s", "gemm", "attention", "stream", "elementwise", "copy",
                       "us/kernel"]))
    print(f"written {path} (threads {res['threads']}, load average {res['load_average'][0]}, {res['measured']}); "
          "the preset `cpu` reads it")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("serve", help="throughput under continuous batching (vLLM) or static batches (HF)")
    page_input_args(q)
    q.add_argument("--hardware", default="a100-40gb", help="a preset (default: a100-40gb)")
    q.add_argument("--pages", type=int, default=DEFAULT_PAGES, help=f"pages simulated with --size "
                                                                   f"(default {DEFAULT_PAGES})")
    q.add_argument("--max-num-seqs", type=int, default=100, help="running sequences at most (vendor script: 100)")
    q.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    q.add_argument("--max-model-len", type=int, default=8192)
    q.add_argument("--block-size", type=int, default=None, help="KV block tokens (default: the engine's, vLLM 256)")
    q.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens per prefill step (default: max(max_model_len, 2048))")
    q.add_argument("--rate", type=float, default=None, help="pages/s arriving (default: all at once)")
    q.add_argument("--plot", metavar="FILE.png", help="memory and running sequences over time")
    q.set_defaults(fn=cmd_serve)

    q = sub.add_parser("calibrate", help="microbenchmark this CPU into the time model's `cpu` preset")
    q.add_argument("--dtype", default="fp32,bf16", help="storage dtypes to calibrate (default: fp32,bf16)")
    q.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    q.add_argument("--out", metavar="FILE.json", help="where to write (default: ~/.cache/costgraph/cpu.json)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_calibrate)
