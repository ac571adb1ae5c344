"""Predicted against measured time on this machine (CPU): `python -m costgraph.verify.timing`
(or `costgraph verify --timing`).

This CPU is calibrated first (`costgraph.calibrate.measure`: the peaks, and per op class the achieved
efficiencies and per-kernel overhead of `costgraph.timemodel`; best samples), unless `--preset` takes
the saved `cpu` preset. Then the references run and each stage is timed with `time.perf_counter`
around it (best of `--repeats` runs after one warm-up run, as the calibration takes its best too):
- vision (the page reference, fp32 as `costgraph verify` runs it): the crop batch and the global
  view of a few layouts, against `vision.crops` / `vision.global`;
- language model (the full-size reference, bf16, the vendor's dtype; about 6 GB: run it under
  `flock /work/heavy.lock`): the prefill at several prompt lengths, and decode steps after each (the
  mean of steps 2.. per step; step 1 pays one-time costs) at contexts prompt + t, against
  `decoder.prefill` and `decoder.decode` at those steps.
Two predictions per row: the time model (`costgraph.timemodel`: efficiencies + kernel overhead) and
the roofline (`costgraph.roofline`: peaks, a bound). Nothing is tuned to agree with these runs: the
ratio measured / predicted is the result. The load average is printed beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from costgraph import roofline as RL
from costgraph import stages
from costgraph import symbols as S
from costgraph import timemodel as TM
from costgraph.graphs.deepseek_ocr import MODEL
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import MODES
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid, tokens_for

VISION_CASES = (("tiny", (1, 1)), ("base", (1, 1)), ("gundam", (2, 1)), ("gundam", (2, 3)))
# (mode, grid, text tokens): prompts of 84, 284, 913 and 1,813 tokens
LM_CASES = (("tiny", (1, 1), 10), ("base", (1, 1), 10), ("gundam", (2, 3), 10), ("gundam", (2, 3), 910))
DECODE_STEPS = 8


def predicted(mode, scope: str, dtype: str, values: dict, hw, steps=None) -> dict:
    """Seconds of one execution of `scope` (decode: the mean over `steps`): the time model and the roofline."""
    g = stages.graph(MODEL, mode)
    fixed = {**model_graph.mode_values(mode), **model_graph.dtype_values(dtype)}
    v = {(k.name if hasattr(k, "name") else k): x for k, x in values.items()}
    if steps is not None:
        v[S.decode_step.name] = np.asarray(steps)
    p = TM.stage_prediction(g, scope, fixed, v, hw)
    roof = RL.per_node(g, scope, fixed, v, hw).time.sum(axis=0)
    return {"model": float(np.mean(p.total())), "roofline": float(np.mean(roof)),
            "kernels": float(np.mean(p.kernels.sum(axis=0))), "by_class": p.by_class()}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, first-touch page faults
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def _row(case: str, stage: str, pred: dict, seconds: float, **extra) -> dict:
    return {"case": case, "stage": stage, **extra, "measured_s": seconds, "predicted_s": pred["model"],
            "ratio": seconds / pred["model"], "roofline_s": pred["roofline"],
            "roofline_ratio": seconds / pred["roofline"], "kernels": pred["kernels"], "by_class": pred["by_class"],
            "load_average": os.getloadavg()[0]}


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
            rows.append(_row(f"{mode_name} {grid[0]}x{grid[1]}", scope, predicted(mode, scope, "fp32", values, hw),
                             seconds, views=int(x.shape[0]), side=int(x.shape[-1])))
    return rows


def language_model(repeats: int, hw, decode_steps: int = DECODE_STEPS, cases=LM_CASES) -> list[dict]:
    from transformers import DynamicCache
    from .lm_reference import build_language_model

    model = build_language_model(dtype=torch.bfloat16)
    rows = []
    for mode_name, grid, text in cases:
        mode = MODES[mode_name]
        layout = layout_for_grid(*grid, mode)
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
        case = f"{mode_name} {grid[0]}x{grid[1]} +{text} text"
        rows.append(_row(case, "decoder.prefill", predicted(mode, "decoder.prefill", "bf16", values, hw), seconds,
                         tokens=prompt))
        steps = list(range(2, decode_steps + 1))   # step 1 pays one-time costs: not timed
        # the best step, as for every other figure (a step is short: one descheduled thread doubles it)
        rows.append(_row(case, "decoder.decode (per step)",
                         predicted(mode, "decoder.decode", "bf16", values, hw, steps=steps),
                         float(np.min(step_times[1:])), tokens=prompt, context=prompt + steps[len(steps) // 2]))
    return rows


def hardware(preset: bool) -> dict:
    """The time model's presets per dtype: calibrated now, or the saved `cpu` preset."""
    from costgraph import calibrate as C

    out = {}
    for d in ("fp32", "bf16"):
        if preset:
            out[d] = C.load(d)
        else:
            hw, eff, _ = C.measure(d)
            out[d] = TM.with_efficiency(hw, eff)
    return out


def run(repeats: int = 2, threads: int | None = None, skip_lm: bool = False, preset: bool = False,
        lm_cases=LM_CASES) -> dict:
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    hw = hardware(preset)
    rows = vision(repeats, hw["fp32"])
    if not skip_lm:
        rows += language_model(repeats, hw["bf16"], cases=lm_cases)
    return {"threads": torch.get_num_threads(), "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()), "hardware": {d: h.as_dict() for d, h in hw.items()},
            "rows": rows}


def print_report(out: dict) -> None:
    from costgraph.render import table

    for d, h in out["hardware"].items():
        e = h["efficiency"]
        print(f"cpu ({d}): matmul {h['tensor_flops'] / 1e9:,.1f} GFLOP/s, vector {h['vector_flops'] / 1e9:,.1f} "
              f"GFLOP/s, bandwidth {h['bandwidth'] / 1e9:,.1f} GB/s; efficiency gemm {e['gemm']:.2f} attention "
              f"{e['attention']:.2f} stream {e['stream']:.2f} elementwise {e['elementwise']:.2f} copy {e['copy']:.2f}"
              f", {e['launch'] * 1e6:.1f} us/kernel")
    rows = out["rows"]
    print(table([[r["case"], r["stage"], f"{1e3 * r['measured_s']:,.1f}", f"{1e3 * r['predicted_s']:,.1f}",
                  f"{r['ratio']:.2f}", f"{1e3 * r['roofline_s']:,.1f}", f"{r['roofline_ratio']:.2f}",
                  f"{r['kernels']:,.0f}", f"{r['load_average']:.2f}"] for r in rows],
                ["case", "stage", "measured ms", "predicted ms", "measured/predicted", "roofline ms",
                 "measured/roofline", "kernels", "load"]))
    ratios = np.array([r["ratio"] for r in rows])
    within = np.abs(ratios - 1) <= 0.15
    print(f"time model: {int(within.sum())}/{len(rows)} stages within +-15 % (measured/predicted "
          f"{ratios.min():.2f}-{ratios.max():.2f}); threads {out['threads']}, load average "
          f"{out['load_average_before'][0]:.2f} before, {out['load_average_after'][0]:.2f} after")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for calibration and runs alike (default: torch's)")
    p.add_argument("--skip-lm", action="store_true", help="vision only (the LM needs ~6 GB and minutes)")
    p.add_argument("--preset", action="store_true", help="use the saved cpu preset instead of calibrating now")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = run(args.repeats, args.threads, args.skip_lm, args.preset)
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    else:
        print_report(out)


if __name__ == "__main__":
    main()
