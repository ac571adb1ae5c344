"""`costgraph recipes`: one row per fine-tuning recipe of a model (its `Model.recipes`) for one page: what
trains, FLOPs per page of a training step, peak memory and whether it fits common GPU memory sizes, and
the roofline time per 1,000 pages on hardware presets."""
from __future__ import annotations

import json

from costgraph import stages
from costgraph.render import table
from .args import dtype_arg, model_arg, model_of, mode_of, page_args, point_of
from .text import UserError, parse_hardware

MEMORY_SIZES_GIB = (8, 16, 24, 40, 80)
DEFAULT_HARDWARE = "l4,a100-40gb,a100-80gb,h100-sxm"


def rows(model, mode, args, hardware) -> list[dict]:
    out = []
    for label, options in model.recipes:
        options = {**options, **({"optimizer": args.optimizer} if args.optimizer else {}),
                   **({"checkpointing": args.checkpointing} if args.checkpointing else {})}
        variants = model.variants(phase="train", **options)
        point = point_of(model, mode, args)
        values = {**model.mode_values(mode), **point.values, **model.dtype_values(args.dtype)}
        batch = point.record["sequence"].get("batch", 1)
        flops = stages.totals(model, mode, point, ("train",), ("flops",), variants, args.dtype)["train"]["flops"]
        mem = stages.training_memory(model, mode, values, variants)
        fixed = {**model.mode_values(mode), **model.dtype_values(args.dtype)}
        times = stages.roofline(model, mode, fixed, point.values, hardware, variants) if hardware else {}
        out.append({"recipe": label, "variants": variants.as_dict(), "batch": batch,
                    "trainable_params": mem["trainable_params"], "train_flops_per_page": flops // batch,
                    "peak_total_bytes": mem["peak_total_bytes"], "peak_at": mem["peak_at"],
                    "memory": {k: v for k, v in mem.items() if k.endswith("_bytes")},
                    "fits_gib": {str(g): mem["peak_total_bytes"] <= g * 2 ** 30 for g in MEMORY_SIZES_GIB},
                    "seconds_per_1000_pages": {h: 1000 * t["total_seconds"] / batch for h, t in times.items()}})
    return out


def render(rs: list[dict], markdown: bool) -> str:
    hw = list(rs[0]["seconds_per_1000_pages"]) if rs else []
    header = (["recipe", "trainable", "TFLOPs/page", "peak GiB"] + [f"fits {g} GiB" for g in MEMORY_SIZES_GIB]
              + [f"{h} s/1k pages" for h in hw])
    body = [[r["recipe"], f"{r['trainable_params']:,}", f"{r['train_flops_per_page'] / 1e12:,.2f}",
             f"{r['peak_total_bytes'] / 2 ** 30:,.2f}"]
            + ["yes" if r["fits_gib"][str(g)] else "no" for g in MEMORY_SIZES_GIB]
            + [f"{r['seconds_per_1000_pages'][h]:,.1f}" for h in hw] for r in rs]
    if not markdown:
        return table(body, header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def cmd_recipes(args) -> int:
    model = model_of(args)
    if not model.recipes:
        raise UserError(f"{model.name} has no training recipes")
    given = [o for o in ("train", "lora_rank", "lora_alpha", "lora_targets") if getattr(args, o, None) is not None]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')}: each recipe sets what trains")
    args.phase = "train"   # the page's sequence is a training step's (no output tokens)
    mode = mode_of(model, args)
    hardware = parse_hardware(args.hardware, args.dtype) if args.hardware else []
    rs = rows(model, mode, args, hardware)
    point = point_of(model, mode, args)
    if args.json:
        print(json.dumps({"model": model.name, "mode": mode.name, **point.record, "dtype": args.dtype,
                          "recipes": rs}, indent=1))
        return 0
    print(render(rs, args.markdown))
    print(("\n" if args.markdown else "# ") + f"{mode.name}: {point.label}; {args.dtype}; batch {rs[0]['batch']}; "
          f"peak = weights + gradients + optimizer state + master copies + activation peak; "
          f"time: roofline of the whole step / batch")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser("recipes", help="fine-tuning recipes for one page: FLOPs, peak memory, fit, time per 1,000 "
                                       "pages")
    model_arg(q)
    page_args(q)
    dtype_arg(q)
    q.add_argument("--hardware", default=DEFAULT_HARDWARE, metavar="NAME[,NAME...]",
                   help="presets for the time per 1,000 pages (default: %(default)s; '' for none)")
    q.add_argument("--markdown", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_recipes)
