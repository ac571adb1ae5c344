"""`costgraph verify --phase train`: a fine-tuning step of the graph against the training reference
(`costgraph.verify.training`): forward and backward FLOPs node by node, per scope, PASS/FAIL exactly;
the peak memory of the language model's step predicted vs measured (a ratio); trainable parameters.

Scopes: `vision` (the vision encoder on meta: forward, and backward when it trains), `decoder` (the
full-size language model on CPU: forward, loss, backward; then the memory run), `train` (both).
"""
from __future__ import annotations

import json
import sys
import time

from costgraph.graphs.deepseek_ocr import MODEL
from costgraph.graphs.deepseek_ocr.config import MAX_CROPS, get_mode
from costgraph.graphs.deepseek_ocr.decoder import TRAIN
from costgraph.graphs.deepseek_ocr2.decoder import TRAIN as TRAIN_OCR2
from costgraph.graphs.deepseek_ocr.layout import layout_for, layout_for_grid
from costgraph.render import table
from .text import UserError

TRAIN_SCOPES = ("vision", "decoder", "train")
EXIT_MISMATCH = 1


def add_arguments(q) -> None:
    q.add_argument("--phase", choices=["inference", "train"], default="inference",
                   help="train: a fine-tuning step (forward, loss, backward) against the training reference")
    q.add_argument("--train", choices=list(dict.fromkeys(TRAIN + TRAIN_OCR2)), default=None,
                   help="--phase train: what trains (default lm; lm+clip+projector: deepseek-ocr, "
                        "lm+encoder+projector: deepseek-ocr-2)")
    q.add_argument("--lora-rank", type=int, default=None, help="--train lora: rank (default 16)")
    q.add_argument("--lora-alpha", type=int, default=None, help="--train lora: alpha (default 16)")
    q.add_argument("--lora-targets", default=None, help="--train lora: comma list of q,k,v,o,gate,up,down")
    q.add_argument("--batch", type=int, default=1, help="--phase train: pages per micro-batch (default 1)")


def _variants(args, model=MODEL, **options):
    """The training step's variants of `model` from the arguments (`options`: the model's own ones)."""
    options = {"phase": "train", "attention": args.attention, **options}
    for name in ("train", "lora_rank", "lora_alpha", "lora_targets"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.lm_head != "all":
        raise UserError("a training step computes the logits of every position (--lm-head all)")
    try:
        return model.variants(**options)
    except ValueError as e:
        raise UserError(str(e)) from None


def _layout(args, mode):
    max_num = MAX_CROPS if args.max_num is None else args.max_num
    if args.image:
        from costgraph.graphs.deepseek_ocr import assembly
        return assembly.layout_for_image(args.image, mode, max_num)
    if args.grid:
        return layout_for_grid(*args.grid, mode)
    return layout_for(*args.size, mode, max_num=max_num)


def ocr2_layouts(args) -> list:
    """DeepSeek-OCR 2's pages of a request: --all-grids, --grid (a what-if noted), --image or --size."""
    from costgraph.graphs.deepseek_ocr2 import MODEL as OCR2, assembly as A2, layout as L2

    max_num = args.max_num if args.max_num is not None else L2.MAX_CROPS
    mode = OCR2.get_mode("default")
    if args.all_grids:
        return [L2.layout_for_grid(w, h, mode) for w, h in L2.all_grids(max_num)]
    if args.grid:
        note = L2.check_grid(args.grid, mode, max_num, args.what_if)
        if note:
            print(f"costgraph: note: {note}", file=sys.stderr)
        return [L2.layout_for_grid(*args.grid, mode)]
    if args.image:
        return [A2.layout_for_image(args.image, mode, max_num)]
    return [L2.layout_for(*args.size, mode, max_num=max_num)]


def check(args) -> None:
    """Bad requests, refused before anything runs."""
    model = getattr(args, "model", "deepseek-ocr")
    if model not in ("deepseek-ocr", "deepseek-ocr-2"):
        raise UserError("--phase train verifies deepseek-ocr and deepseek-ocr-2")
    if model == "deepseek-ocr-2":
        if args.mode not in (None, "default"):
            raise UserError("--model deepseek-ocr-2 --phase train: its one mode is default")
        if args.train == "lm+clip+projector":
            raise UserError("--model deepseek-ocr-2 has no CLIP: --train lm|full|lm+encoder+projector|lora")
    if args.all_grids or args.symbolic:
        raise UserError("--phase train verifies one page: give --image, --size or --grid")
    if args.scope not in TRAIN_SCOPES:
        raise UserError(f"unknown scope {args.scope!r} for --phase train (choose from {', '.join(TRAIN_SCOPES)})")
    if args.scope in ("vision", "train") and args.device != "meta":
        raise UserError("the vision training step is counted on meta (--device meta); the decoder always runs on CPU")
    if args.batch < 1 or args.text_tokens < 0:
        raise UserError("--batch must be >= 1 and --text-tokens >= 0")
    if args.train != "lora" and any(getattr(args, k) is not None for k in ("lora_rank", "lora_alpha", "lora_targets")):
        raise UserError("--lora-rank, --lora-alpha and --lora-targets apply to --train lora")


def refuse_settings(args) -> None:
    """Training settings given to an inference verification: one clear line."""
    given = [k for k in ("train", "lora_rank", "lora_alpha", "lora_targets") if getattr(args, k, None) is not None]
    if given or getattr(args, "batch", 1) != 1:
        name = given[0] if given else "batch"
        raise UserError(f"--{name.replace('_', '-')} applies to --phase train")


def run(args) -> int:
    from costgraph.verify import report, training as T
    from costgraph.verify.train_reference import apply_setting, build_training_lm

    check(args)
    if getattr(args, "model", "deepseek-ocr") == "deepseek-ocr-2":
        return run_ocr2(args)
    variants = _variants(args, rope=args.rope)
    mode = get_mode(args.mode or "gundam")
    if mode.crop_mode is False:
        raise UserError("--phase train: the training graph is built for crop mode (gundam, gundam-m) only for now")
    layout = _layout(args, mode)
    metrics = _train_metrics(args)
    req = T.TrainRequest(mode, layout, variants, text_tokens=args.text_tokens, batch=args.batch)
    t = time.perf_counter()
    comps, memory = [], None
    if args.scope in ("vision", "train"):
        comps.append(T.verify_vision(req))
    if args.scope in ("decoder", "train"):
        model = build_training_lm(rope=variants.rope)
        apply_setting(model, variants)
        comps.append(T.verify_decoder(req, model, metrics))
        memory = T.lm_memory_rows(req, model)
        del model
    seconds = time.perf_counter() - t
    ok = all(c.ok for c in comps)
    if args.json:
        print(json.dumps(report.to_json(comps, {"run": {"seconds": round(seconds, 1), "phase": "train",
                                                        "scope": args.scope}, "peak_memory": memory}), indent=1))
    else:
        print(report.text(comps, footer=f"run time {seconds:.1f} s"))
        for c in comps:
            if "trainable_parameters" in c.info:
                print(f"trainable parameters of the reference ({variants.train}): {c.info['trainable_parameters']:,}")
        if memory is not None:
            print(memory_text(memory))
    return 0 if ok else EXIT_MISMATCH


def run_ocr2(args) -> int:
    """DeepSeek-OCR 2's step against transformers' model (`costgraph.verify.train_ocr2`): vision on meta, the
    language model on CPU (bf16), FLOPs node by node and the trainable parameters of every setting."""
    from costgraph.graphs.deepseek_ocr2 import MODEL as OCR2
    from costgraph.verify import report, train_ocr2 as T

    variants = _variants(args, OCR2)
    metrics = _train_metrics(args)
    req = T.TrainRequest(ocr2_layouts(args)[0], variants, text_tokens=args.text_tokens, batch=args.batch)
    t = time.perf_counter()
    comps = []
    if args.scope in ("vision", "train"):
        comps.append(T.verify_vision(req))
    if args.scope in ("decoder", "train"):
        comps.append(T.verify_decoder(req, metrics=metrics))
    seconds = time.perf_counter() - t
    if args.json:
        print(json.dumps(report.to_json(comps, {"run": {"seconds": round(seconds, 1), "phase": "train",
                                                        "scope": args.scope}}), indent=1))
    else:
        print(report.text(comps, footer=f"run time {seconds:.1f} s"))
        row = next(r for r in comps[-1].rows if r.node == "trainable_parameters")
        print(f"trainable parameters ({variants.train}): reference {row.measured:,}, graph {row.predicted:,}")
        hits = comps[-1].info.get("experts_hit")
        if hits:   # FLOPs do not depend on it; the elementwise and byte counts of the experts loop do
            print(f"routed experts hit per MoE layer: {min(hits.values())} to {max(hits.values())} "
                  f"(the graph's bound: {comps[-1].info['experts_hit_bound']})")
    return 0 if all(c.ok for c in comps) else EXIT_MISMATCH


def _train_metrics(args) -> tuple[str, ...]:
    """--metrics for a training step: flops (node by node; the default) and elementwise_flops, bytes
    (per reference module, the decoder only: vision runs on meta)."""
    from .text import parse_metrics

    names = {"flops": ("flops",), "elementwise_flops": ("elementwise_flops",),
             "bytes": ("bytes_read", "bytes_written")}
    out = ["flops"]
    for group in parse_metrics(args.metrics):
        if group not in names:
            raise UserError(f"--phase train checks --metrics flops, elementwise_flops, bytes (not {group!r})")
        out += [m for m in names[group] if m not in out]
    return tuple(out)


def memory_text(memory: dict) -> str:
    m, p = memory["measured"], memory["predicted"]
    rows = [["live op outputs (activations + gradients made so far)", f"{m['peak_bytes']:,}", m["peak_in"]],
            ["activations only (parameter gradients left out)", f"{m['activations_peak_bytes']:,}",
             m["activations_peak_in"]],
            ["parameter gradients at the end", f"{m['gradient_bytes']:,}", ""],
            ["graph liveness (decoder + backward.decoder)", f"{p['bytes']:,}", p["node"]]]
    lines = ["peak memory of the language model's step (CPU run; weights and inputs not counted):",
             table(rows, ["", "bytes", "where"]),
             f"measured / predicted: {memory['ratio']:.3f} (live op outputs), "
             f"{memory['activations_ratio']:.3f} (activations only); reported, not pass/fail"]
    return "\n".join(lines)
