"""`python -m costgraph.verify.trace vision|lm`: the aten trace of a small reference run with its metrics
(what the graph's formulas are written from), one op per line with its module."""
from __future__ import annotations

import argparse

import torch

from costgraph.graphs.deepseek_ocr.config import LMConfig
from .dispatch import MetricRecorder, print_trace
from .lm_profile import run_reference
from .lm_reference import build_language_model
from .reference import build_deep_encoder


def _main() -> None:
    p = argparse.ArgumentParser(description="aten trace of a small reference run, with metrics")
    p.add_argument("what", choices=["vision", "lm"])
    p.add_argument("--side", type=int, default=224, help="vision: the view side")
    p.add_argument("--batch", type=int, default=1, help="vision: views run together (the crops are one batch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--module", default="", help="only modules whose path contains this")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.what == "vision":
        model = build_deep_encoder("cpu", dtype)
        x = torch.randn(args.batch, 3, args.side, args.side, dtype=dtype)
        with MetricRecorder() as rec, torch.no_grad():
            model(x)
    else:
        # a small LM (graphs.decoder is parametric in the config): a prefill over [BOS] + 4 image
        # slots + 3 text tokens, then one cached decode step, as `costgraph.verify.lm_profile` runs it
        cfg = LMConfig(hidden=64, layers=2, heads=4, head_dim=16, vocab=101, dense_intermediate=96,
                       routed_experts=8, experts_per_token=3, moe_intermediate=24, shared_experts=2)
        lm = build_language_model(cfg, dtype)
        rec = MetricRecorder()
        rec.calls = run_reference(lm, prompt_tokens=8, image_slots=4, decode_steps=1, metrics=True).ops
    print_trace(rec.calls, args.module)
    print(rec.totals())


if __name__ == "__main__":
    _main()
