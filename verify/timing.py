"""Roofline prediction against measured time on this machine (CPU): `python -m costgraph.verify.timing`.

The preset `this-machine` is calibrated first (`costgraph.hardware.calibrate`: matmul in the run's
dtype, fp32 elementwise in cache, DRAM copy; best of a few samples). Then the references run
and each stage is timed with `time.perf_counter` around it (best of `--repeats` runs after one
warm-up run, as the calibration takes its best sample too):
- vision (the page reference, fp32 as `costgraph verify` runs it): the crop batch and the global
  view of a few layouts, each stage against the roofline of `vision.crops` / `vision.global`;
- language model (the full-size reference, bf16, the vendor's dtype): the prefill of a short and
  of a page-sized prompt, and a few decode steps (mean per step) against `decoder.prefill` and
  `decoder.decode` at those steps.
Nothing is tuned to agree: the ratio measured / predicted is the result.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from costgraph import roofline as RL
from costgraph import stages
from costgraph import symbols as S
from costgraph.hardware import calibrate
from costgraph.graphs.deepseek_ocr import MODEL
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import MODES
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid, tokens_for

VISION_CASES = (("tiny", (1, 1)), ("base", (1, 1)), ("gundam", (2, 1)))
LM_CASES = (("tiny", (1, 1)), ("gundam", (2, 3)))


def predicted(mode, scope: str, dtype: str, values: dict, hw, steps=None) -> float:
    """Roofline seconds of one execution of `scope` (decode: the mean over `steps`)."""
    g = stages.graph(MODEL, mode)
    fixed = {**model_graph.mode_values(mode), **model_graph.dtype_values(dtype)}
    v = {(k.name if hasattr(k, "name") else k): x for k, x in values.items()}
    if steps is not None:
        v[S.decode_step.name] = np.asarray(steps)
    times = RL.per_node(g, scope, fixed, v, hw)
    per = times.time.sum(axis=0)
    return float(np.mean(per))


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, first-touch page faults
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def vision(repeats: int, hw) -> list[dict]:
    from .preprocess import random_views
    from .reference import build_page_reference

    model = build_page_reference("cpu", torch.float32)
    rows = []
    for mode_name, grid in VISION_CASES:
        mode = MODES[mode_name]
        layout = layout_for_grid(*grid, mode)
        views = random_views(mode, layout)
        values = {**model_graph.layout_values(layout)}
        batches = [("vision.crops", views.crops)] if views.crops is not None else []
        batches.append(("vision.global", views.global_view))
        for scope, x in batches:
            with torch.no_grad():
                seconds = _best(lambda: model.encoder(x), repeats)
            pred = predicted(mode, scope, "fp32", values, hw)
            rows.append({"case": f"{mode_name} {grid[0]}x{grid[1]}", "stage": scope, "views": int(x.shape[0]),
                         "side": int(x.shape[-1]), "predicted_s": pred, "measured_s": seconds,
                         "ratio": seconds / pred})
    return rows


def language_model(repeats: int, hw, decode_steps: int = 4) -> list[dict]:
    from transformers import DynamicCache
    from .lm_reference import build_language_model

    model = build_language_model(dtype=torch.bfloat16)
    rows = []
    for mode_name, grid in LM_CASES:
        mode = MODES[mode_name]
        layout = layout_for_grid(*grid, mode)
        text = model_graph.DEFAULT_TEXT_TOKENS
        slots = tokens_for(layout, mode)["total"]
        prompt = 1 + text + slots
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1, model.cfg.vocab, (1, prompt), generator=gen)
        mask = torch.zeros(1, prompt, dtype=torch.bool)
        mask[0, 1:1 + slots] = True
        feats = torch.randn(slots, model.cfg.hidden, generator=gen).to(torch.bfloat16)
        values = {**model_graph.layout_values(layout), S.text_tokens: text}

        def prefill():
            cache = DynamicCache(config=model.model.config)
            logits = model(ids, cache, mask, feats.clone())
            return cache, logits[:, -1].argmax(-1, keepdim=True)

        with torch.no_grad():
            seconds = _best(prefill, repeats)
            cache, nxt = prefill()
            step_times = []
            for _ in range(decode_steps):
                t = time.perf_counter()
                nxt = model(nxt, cache)[:, -1].argmax(-1, keepdim=True)
                step_times.append(time.perf_counter() - t)
        pred = predicted(mode, "decoder.prefill", "bf16", values, hw)
        rows.append({"case": f"{mode_name} {grid[0]}x{grid[1]}", "stage": "decoder.prefill", "tokens": prompt,
                     "predicted_s": pred, "measured_s": seconds, "ratio": seconds / pred})
        steps = list(range(2, decode_steps + 1))   # step 1 pays one-time costs: not timed
        pred = predicted(mode, "decoder.decode", "bf16", values, hw, steps=steps)
        meas = float(np.mean(step_times[1:]))
        rows.append({"case": f"{mode_name} {grid[0]}x{grid[1]}", "stage": "decoder.decode (per step)",
                     "tokens": prompt, "steps": steps, "predicted_s": pred, "measured_s": meas, "ratio": meas / pred})
    return rows


def main(argv=None) -> None:
    from costgraph.render import table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for calibration and runs alike (default: torch's); 1 is robust on a "
                        "shared machine: a multi-threaded op waits for its slowest, possibly descheduled, thread")
    p.add_argument("--skip-lm", action="store_true", help="vision only (the LM needs ~6 GB and minutes)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = {d: calibrate(d) for d in ("fp32", "bf16")}
    rows = vision(args.repeats, hw["fp32"])
    if not args.skip_lm:
        rows += language_model(args.repeats, hw["bf16"])
    out = {"threads": torch.get_num_threads(), "hardware": {d: h.as_dict() for d, h in hw.items()}, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for d, h in hw.items():
        print(f"this-machine ({d}): matmul {h.tensor_flops / 1e9:,.1f} GFLOP/s, vector {h.vector_flops / 1e9:,.1f} "
              f"GFLOP/s, bandwidth {h.bandwidth / 1e9:,.1f} GB/s; medians: "
              + ", ".join(f"{m.median / 1e9:,.1f}" for m in h.measurements))
    print(table([[r["case"], r["stage"], f"{1e3 * r['predicted_s']:,.1f}", f"{1e3 * r['measured_s']:,.1f}",
                  f"{r['ratio']:.2f}"] for r in rows], ["case", "stage", "predicted ms", "measured ms",
                                                         "measured/predicted"]))


if __name__ == "__main__":
    main()
