"""`costgraph verify`: the graph against profiled runs of the reference, node by node.

Exit code 0 only when every node matches exactly, 1 on any mismatch, 2 for bad input.
The references and counters are `verify/` (imported when a verification runs: they load torch).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
import warnings

from costgraph.io import write_atomic
from costgraph.render import table
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import DEFAULT_TEXT_TOKENS, DTYPES, MAX_CROPS, MODES, get_mode
from costgraph.graphs.deepseek_ocr.decoder import ATTENTION, LM_HEAD, ROPE, Variants
from costgraph.graphs.deepseek_ocr.layout import check_grid, layout_for, layout_for_grid
from costgraph.graphs.pages import PageWarning, page_size
from . import verify_train_cmd
from .args import max_num_arg, model_arg
from .models import get_model
from .text import METRIC_GROUPS, UserError, parse_metrics, parse_size

EXIT_MISMATCH = 1


def add_parser(sub) -> None:
    q = sub.add_parser("verify", help="check the graph against profiled runs of the reference, node by node")
    model_arg(q)
    q.add_argument("--mode", default=None,
                   help=f"one of {', '.join(MODES)} (default: gundam; with --all-grids: every mode)")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", metavar="PATH", help="a page image: real preprocessing (Pillow) and its layout")
    g.add_argument("--size", type=parse_size, metavar="WxH", help="a page size: its layout")
    g.add_argument("--grid", type=parse_size, metavar="AxB", help="a crop grid directly (1x1: no crops)")
    q.add_argument("--what-if", action="store_true",
                   help="accept a --grid the layout cannot produce under --max-num (labelled what-if)")
    g.add_argument("--all-grids", action="store_true",
                   help="every crop grid the layout can produce plus no crops, and every native mode")
    g.add_argument("--symbolic", action="store_true",
                   help="torch's own sympy FLOPs (FakeTensorMode + ShapeEnv) against the graph's expressions")
    g.add_argument("--timing", action="store_true",
                   help="measured time on this CPU against the time model, per stage (costgraph.verify.timing; "
                        "--skip-lm: vision only; the LM needs ~6 GB: run under flock /work/heavy.lock)")
    q.add_argument("--skip-lm", action="store_true", help="--timing: vision only")
    q.add_argument("--device", default="meta", choices=["meta", "cpu"],
                   help="meta: counts only (fast); cpu: a real forward with random weights")
    q.add_argument("--scope", default="vision", help="what to verify: vision, decoder.prefill, decoder.decode, "
                   "decoder, e2e (default: %(default)s)")
    _add_lm_arguments(q)
    verify_train_cmd.add_arguments(q)   # --phase train and its settings
    _add_metric_arguments(q)
    max_num_arg(q)
    q.add_argument("--json", action="store_true", help="JSON on stdout")
    q.add_argument("--report", metavar="FILE.md", help="also write a Markdown report (atomically)")
    q.set_defaults(fn=cmd_verify)


def _add_lm_arguments(q) -> None:
    """Options of the language-model scopes (costgraph.verify.lm_profile): the LM always runs on CPU."""

    q.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="LM scopes: prompt text tokens")
    q.add_argument("--decode-steps", type=int, default=3, help="LM scopes: decode forwards after the prefill")
    q.add_argument("--attention", choices=list(ATTENTION), default="eager",
                   help="LM scopes: only eager has a CPU reference")
    q.add_argument("--lm-head", choices=list(LM_HEAD), default="all", help="LM scopes: prefill lm_head positions")
    q.add_argument("--rope", choices=list(ROPE), default="vendor",
                   help="LM scopes: vendor per-layer RoPE tables, or once per forward (transformers 5.x)")


def _add_metric_arguments(q) -> None:

    q.add_argument("--metrics", default="flops", metavar="LIST",
                   help=f"comma list of {', '.join(METRIC_GROUPS)}, or all (default: %(default)s). flops, "
                        "elementwise_flops, bytes, kv_cache: exact, node by node (all but flops need --device cpu "
                        "for the vision scope); params: every part of both references on meta, exact; "
                        "activations: peak memory per stage, predicted vs measured (a ratio, not pass/fail)")
    q.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="storage dtype of the vision CPU run and of the parameter bytes (default: fp32 for the "
                        "vision reference, bf16 for the language model, as they run)")


# `--metrics` group -> the metric names the comparisons take (costgraph.verify.runner, costgraph.verify.lm_profile)
COMPARED = {"flops": ("flops",), "elementwise_flops": ("elementwise_flops",), "bytes": ("bytes_read", "bytes_written"),
            "kv_cache": ("kv_cache_bytes",), "params": (), "activations": ()}
LM_SCOPES = ("decoder.prefill", "decoder.decode", "decoder", "e2e")


def _metrics(args) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(groups, the metric names passed to the node-by-node comparisons)."""

    groups = parse_metrics(args.metrics)
    return groups, tuple(dict.fromkeys(m for g in groups for m in COMPARED[g])) or ("flops",)


def _lm_extra(args) -> dict:

    if args.decode_steps < 0 or args.text_tokens < 0:
        raise UserError("--decode-steps and --text-tokens must be >= 0")
    return {"text_tokens": args.text_tokens, "decode_steps": args.decode_steps,
            "variants": Variants(attention=args.attention, lm_head=args.lm_head, rope=args.rope)}


def _request(args):
    from costgraph.verify.runner import Request

    if args.max_num is None:
        args.max_num = MAX_CROPS
    if args.mode is None:
        modes = list(MODES.values()) if args.all_grids else [get_mode("gundam")]
    else:
        modes = [get_mode(args.mode)]
    if args.grid:  # the one rule: a grid the layout never produces under --max-num only as a labelled what-if
        for mode in modes:
            layout_for_grid(*args.grid, mode)
            note = check_grid(args.grid, mode, args.max_num, args.what_if)
            if note:
                print(f"costgraph: note: {note}", file=sys.stderr)
    if args.image:  # a missing, unreadable or oversized page is refused before any run (its note comes later)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PageWarning)
            page_size(args.image)
    groups, compared = _metrics(args)
    extra = {**_lm_extra(args), "metrics": compared}
    if args.dtype:
        extra["dtype"] = args.dtype
    return Request(modes=modes, device=args.device, image=args.image, size=args.size, grid=args.grid,
                   all_grids=args.all_grids, max_num=args.max_num, progress=sys.stderr.isatty(),
                   extra=extra, metrics=compared, dtype=args.dtype or "fp32")


def _command(args) -> str:
    """The command line that reproduces this run (for the report)."""
    parts = ["costgraph", "verify", "--scope", args.scope, "--device", args.device]
    if args.mode:
        parts += ["--mode", args.mode]
    if args.all_grids:
        parts.append("--all-grids")
    for flag, v in (("--image", args.image), ("--size", args.size), ("--grid", args.grid)):
        if v:
            parts += [flag, v if isinstance(v, str) else f"{v[0]}x{v[1]}"]
    if args.scope != "vision":
        parts += ["--text-tokens", str(args.text_tokens), "--decode-steps", str(args.decode_steps),
                  "--attention", args.attention, "--lm-head", args.lm_head, "--rope", args.rope]
    parts += ["--metrics", args.metrics] + (["--dtype", args.dtype] if args.dtype else [])
    return " ".join(shlex.quote(p) for p in parts)


def cmd_verify(args) -> int:
    from costgraph.verify import report
    from costgraph.verify.runner import VERIFIERS, peak_rss_mib
    from costgraph.verify import lm_profile

    if getattr(args, "phase", "inference") == "train":
        return verify_train_cmd.run(args)
    verify_train_cmd.refuse_settings(args)
    if getattr(args, "model", "deepseek-ocr") == "vit":
        return _verify_vit(args)
    if args.timing:
        from costgraph.verify import timing
        timing.main((["--skip-lm"] if args.skip_lm else []) + (["--json"] if args.json else []))
        return 0
    if getattr(args, "model", "deepseek-ocr") == "deepseek-ocr-2":
        return _verify_ocr2(args)

    lm_profile.register(VERIFIERS)  # decoder.prefill, decoder.decode, decoder, e2e

    if args.scope not in VERIFIERS:
        raise UserError(f"unknown scope {args.scope!r} (choose from {', '.join(VERIFIERS)})")
    if args.report:  # refuse before any long run: nothing is written unless the run completes
        folder = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(folder):
            raise UserError(f"report folder does not exist: {folder}")
    if args.symbolic:
        return _symbolic(args)
    req = _request(args)
    groups, _ = _metrics(args)
    t = time.perf_counter()
    comps = VERIFIERS[args.scope](req)
    if "params" in groups:
        from costgraph.verify.weights import compare_params

        comps.append(compare_params(True, args.dtype or "bf16"))
    peaks = _peak_memory(args, req) if "activations" in groups else None
    seconds = time.perf_counter() - t
    run = {"seconds": round(seconds, 3), "device": args.device, "scope": args.scope, "metrics": list(groups)}
    not_checked = _not_checked(args, groups)
    if not_checked:
        run["not_checked"] = not_checked
    if args.device == "cpu":
        run["peak_rss_mib"] = peak_rss_mib()
    footer = f"run time {seconds:.1f} s" + (f", peak RSS {run['peak_rss_mib']:,} MiB" if args.device == "cpu" else "")
    peak_text = _peak_text(peaks) if peaks is not None else ""
    if args.report:
        write_atomic(args.report, report.markdown(comps, command=_command(args), footer=footer)
                     + (f"\n## Peak activation memory\n\n```\n{peak_text}\n```\n" if peak_text else ""))
    if args.json:
        extra = {"run": run, **({"peak_memory": peaks} if peaks is not None else {})}
        print(json.dumps(report.to_json(comps, extra), indent=1))
    else:
        print(report.text(comps, footer=footer))
        if peak_text:
            print(peak_text)
        for what, why in not_checked.items():
            print(f"not checked: {what}: {why}")
    return 0 if all(c.ok for c in comps) else EXIT_MISMATCH


def _verify_vit(args) -> int:
    """The ViT classifier against transformers' ViTForImageClassification: FLOPs on meta or CPU, the other
    metrics on CPU; `--size SxS` is the image side (default: the variant's own), `--mode` the variant."""
    from costgraph.verify import report
    from costgraph.verify.vit import verify_vit

    cfg = get_model("vit").get_mode(args.mode or "vit-b16-224")
    if args.image or args.grid or args.all_grids or args.symbolic or args.scope != "vision":
        raise UserError("--model vit verify takes --size SxS (the image side), --mode, --device, --metrics, --dtype")
    side = cfg.image_size
    if args.size:
        if args.size[0] != args.size[1]:
            raise UserError(f"--model vit runs square images: got {args.size[0]}x{args.size[1]}")
        side = args.size[0]
    groups, compared = _metrics(args)
    metrics = ("flops",) + tuple(m for m in compared if m not in ("flops", "kv_cache_bytes"))
    t = time.perf_counter()
    comp = verify_vit(image_size=side, device=args.device, metrics=metrics, dtype=args.dtype or "fp32", cfg=cfg)
    footer = f"run time {time.perf_counter() - t:.1f} s"
    if args.report:
        write_atomic(args.report, report.markdown([comp], command="costgraph --model vit verify", footer=footer))
    print(json.dumps(report.to_json([comp], {"run": {"device": args.device}}), indent=1) if args.json
          else report.text([comp], footer=footer))
    return 0 if comp.ok else EXIT_MISMATCH


def _verify_ocr2(args) -> int:
    """DeepSeek-OCR 2 against transformers' DeepseekOcr2ForConditionalGeneration (random weights).

    --device meta: vision FLOPs node by node (--all-grids: every crop grid and no crops; or one page).
    --device cpu: a real forward in --dtype (default bf16) of the page (--image through the real processor,
    else random pixels of the layout): --scope vision compares the vision tower and the image slots, any
    other scope the whole model (prefill + --decode-steps decode forwards), every metric. --metrics params:
    the checkpoint's parameters part by part (on meta). Full size: needs about 8 GiB on CPU."""
    import torch
    from costgraph.graphs.deepseek_ocr2 import layout as L2
    from costgraph.verify import deepseek_ocr2 as V, report

    if args.symbolic or args.mode not in (None, "default"):
        raise UserError("--model deepseek-ocr-2 verify: no --symbolic; its one mode is default")
    max_num = args.max_num if args.max_num is not None else L2.MAX_CROPS
    groups, compared = _metrics(args)
    lays = verify_train_cmd.ocr2_layouts(args)
    if args.device == "cpu" and len(lays) > 1:
        raise UserError("--all-grids runs on meta (FLOPs); a CPU run takes one page (--image, --size or --grid)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
    t = time.perf_counter()
    comps = []
    if args.device == "meta":
        model = V.meta_reference()
        for lay in lays:
            g, loc = V.synthetic_inputs(lay, "meta")
            comps.append(V.verify_vision_case(model, lay, g, loc, metrics=False, dtype=dtype, device="meta"))
    else:
        model = V.build_reference("cpu", dtype)
        lay = lays[0]
        if args.image:
            lay, g, loc = V.processor_inputs(args.image, max_num)
        else:
            g, loc = V.synthetic_inputs(lay, "cpu")
        if args.scope == "vision":
            comps.append(V.verify_vision_case(model, lay, g, loc, metrics=True, dtype=dtype, device="cpu"))
        else:
            if args.decode_steps < 0 or args.text_tokens < 0:
                raise UserError("--decode-steps and --text-tokens must be >= 0")
            comps.append(V.verify_page(model, lay, g, loc, text_tokens=args.text_tokens,
                                       decode_steps=args.decode_steps, lm_head=args.lm_head,
                                       metrics=len(compared) > 1 or compared != ("flops",)))
    if "params" in groups:
        comps.append(V.compare_params(V.meta_reference()))
    footer = f"run time {time.perf_counter() - t:.1f} s" + (
        f", peak RSS {_peak_rss():,} MiB" if args.device == "cpu" else "")
    if args.report:
        write_atomic(args.report, report.markdown(comps, command="costgraph --model deepseek-ocr-2 verify",
                                                  footer=footer))
    print(json.dumps(report.to_json(comps, {"run": {"device": args.device}}), indent=1) if args.json
          else report.text(comps, footer=footer))
    return 0 if all(c.ok for c in comps) else EXIT_MISMATCH


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _not_checked(args, groups) -> dict[str, str]:
    """Metrics asked for that this scope and device cannot compare, and why (never a silent pass)."""
    out = {}
    if "kv_cache" in groups and args.scope not in LM_SCOPES:
        out["kv_cache"] = "the KV cache is the language model's: --scope decoder.prefill, decoder.decode, decoder or e2e"
    if args.device == "meta" and args.scope in ("vision", "e2e"):
        for g in ("elementwise_flops", "bytes"):
            if g in groups:
                out[f"{g} (vision)"] = "defined on real CPU kernels: --device cpu"
    return out


PEAK_NOTE = ("peak activation memory is reported, not checked: the graph frees a tensor after its last "
             "consumer and sees no scratch memory inside an op; the run frees it when Python drops its last "
             "reference (see verify/memory.py)")


def _peak_memory(args, req) -> dict:
    """Predicted (costgraph.liveness) vs measured (costgraph.verify.memory.LiveBytes) peak per stage."""
    from costgraph.verify import memory
    from costgraph.verify.preprocess import random_views, views_from_file
    from costgraph.verify.reference import build_page_reference
    from costgraph.verify.runner import TORCH_DTYPES

    out = {"note": PEAK_NOTE, "cases": []}
    for mode in req.modes:
        if req.image:
            layout = model_graph.layout_for_image(req.image, mode, req.max_num)
        elif req.grid:
            layout = layout_for_grid(*req.grid, mode)
        elif req.size:
            layout = layout_for(*req.size, mode, max_num=req.max_num)
        else:
            out["skipped"] = "peak memory is measured for one page (--image, --size or --grid), not --all-grids"
            break
        case = {"mode": mode.name, "grid": f"{layout.w_crop}x{layout.h_crop}", "stages": []}
        if args.scope in ("vision", "e2e"):
            if args.device != "cpu":
                case["vision_skipped"] = "the vision peak needs a real run: --device cpu"
            else:
                dtype = args.dtype or "fp32"
                views = views_from_file(req.image, mode, req.max_num) if req.image else random_views(mode, layout)
                model = build_page_reference("cpu", TORCH_DTYPES[dtype])
                case["vision_dtype"] = dtype
                case["stages"] += [r.as_dict() for r in memory.vision_peaks(views.to(TORCH_DTYPES[dtype]), model)]
                del model
        if args.scope in LM_SCOPES:
            lm = _lm_extra(args)
            case["lm_dtype"] = "bf16"
            case["stages"] += [r.as_dict() for r in memory.lm_peaks(mode, layout, lm["text_tokens"],
                                                                     lm["decode_steps"], lm["variants"])]
        out["cases"].append(case)
    return out


def _peak_text(peaks: dict) -> str:

    lines = []
    for case in peaks.get("cases", []):
        rows = [[s["stage"], f"{s['predicted_bytes']:,}", f"{s['measured_bytes']:,}",
                 "-" if s["ratio"] is None else f"{s['ratio']:.3f}", s["predicted_at"].split(".", 2)[-1],
                 s["measured_at_op"]] for s in case["stages"]]
        lines.append(f"peak activation memory, {case['mode']} {case['grid']} (measured / predicted):")
        if rows:
            lines.append(table(rows, ["stage", "predicted bytes", "measured bytes", "ratio", "predicted at",
                                      "measured at op"]))
        for k in ("vision_skipped",):
            if k in case:
                lines.append(f"  {case[k]}")
    if "skipped" in peaks:
        lines.append(peaks["skipped"])
    lines.append(f"note: {peaks['note']}")
    return "\n".join(lines)


def _symbolic(args) -> int:
    from costgraph.verify.symbolic import summary

    if args.scope != "vision" or args.device != "meta" or args.mode:
        raise ValueError("--symbolic checks the vision graph of gundam (crop batch) and one view (side); "
                         "it takes no --mode, --device or --scope")
    t = time.perf_counter()
    out = summary(side=True)
    out["seconds"] = round(time.perf_counter() - t, 1)
    crop, side = out["crop_batch"], out["image_side"]
    ok = crop["ok"] and side["expressions_agree"]
    lines = [
        f"crop batch: torch {crop['torch']} with {crop['batch_symbol']} -> w_crop*h_crop; ours {crop['ours']}",
        f"  simplify(ours - torch's) = {crop['difference']}; {crop['nodes']} nodes, "
        f"{len(crop['nodes_differing'])} differing; guards on the batch: {crop['guards'] or 'none'}",
        f"image side: torch's expression {'equals' if side['expressions_agree'] else 'DIFFERS FROM'} ours on every "
        f"grid g = side//16 >= 2 ({side['nodes']} nodes, {len(side['nodes_differing'])} differing)",
        f"  but torch recorded {side['guards']} guards, pinning ones: {'; '.join(side['pinning_guards']) or 'none'}"
        f" (int() in transformers' SAM get_rel_pos): a symbolic side is not a symbolic result",
        f"{'PASS' if ok else 'FAIL'} ({out['seconds']} s)",
    ]
    text = "\n".join(lines)
    if args.report:
        write_atomic(args.report, "# costgraph verify --symbolic\n\n```\n" + text + "\n```\n")
    print(json.dumps(out, indent=1) if args.json else text)
    return 0 if ok else EXIT_MISMATCH
