"""Pages as the serving commands take them (`serve`, `dataset`): sizes from --size, a folder of page
images or a CSV; output lengths as N or a range; the shared options; figures written whole."""
from __future__ import annotations

import csv
import os
import sys

import numpy as np

from costgraph.io import write_atomic
from costgraph.graphs.pages import page_size
from .models import DEFAULT_MODEL, MODELS, get_model
from .text import UserError, parse_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")


def folder_sizes(folder: str, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    if not os.path.isdir(folder):
        raise UserError(f"not a folder: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserError(f"no page images in {folder} ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in tqdm(files, desc="reading page sizes", disable=not progress or not sys.stderr.isatty(), file=sys.stderr):
        try:
            w, h = page_size(os.path.join(folder, f))
            out.append({"file": f, "width": w, "height": h})
        except (OSError, ValueError) as e:
            print(f"costgraph: error: {f}: {e}", file=sys.stderr)
            out.append({"file": f, "error": str(e)})
    return [r for r in out if "error" not in r] if any("error" not in r for r in out) else _none(folder)


def _none(where):
    raise UserError(f"no readable page in {where}")


def csv_sizes(path: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    out = []
    for i, r in enumerate(rows, 2):
        try:
            rec = {"file": r.get("file") or f"row {i}", "width": int(r["width"]), "height": int(r["height"])}
            if r.get("output_tokens"):
                rec["output_tokens"] = int(r["output_tokens"])
            out.append(rec)
        except (KeyError, TypeError, ValueError):
            print(f"costgraph: error: {path}:{i} ({r.get('file') or 'no file'}): needs integer width,height "
                  "columns", file=sys.stderr)
    return out or _none(path)


def output_tokens_of(text: str, n: int, seed: int = 0) -> np.ndarray:
    """`N` -> n copies; `A:B` -> n draws uniform in A..B (seeded)."""
    try:
        if ":" in text:
            a, b = (int(x) for x in text.split(":"))
            if not 1 <= a <= b:
                raise ValueError
            return np.random.default_rng(seed).integers(a, b + 1, n)
        v = int(text)
        if v < 1:
            raise ValueError
        return np.full(n, v)
    except ValueError:
        raise UserError(f"--output-tokens must be N or A:B with 1 <= A <= B, got {text!r}") from None


def page_sizes(args) -> tuple[list[tuple[int, int]], list[str]]:
    """(sizes, names) from --size, --folder or --csv."""
    if args.folder:
        recs = folder_sizes(args.folder, progress=not args.json)
        return [(r["width"], r["height"]) for r in recs], [r["file"] for r in recs]
    if args.csv:
        recs = csv_sizes(args.csv)
        return [(r["width"], r["height"]) for r in recs], [r["file"] for r in recs]
    sizes = [parse_size(s) for s in args.size.split(",")]
    return sizes, [f"{w}x{h}" for w, h in sizes]


def page_input_args(q, sizes_default=None) -> None:
    g = q.add_mutually_exclusive_group(required=sizes_default is None)
    g.add_argument("--size", default=sizes_default, metavar="WxH[,WxH...]", help="page sizes (cycled)")
    g.add_argument("--folder", metavar="DIR", help="every page image in a folder")
    g.add_argument("--csv", metavar="FILE", help="a CSV of page sizes: width,height[,output_tokens]")
    q.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model with a serving model: {', '.join(served_models())} (default: %(default)s)")
    q.add_argument("--mode", default=None, help="a mode of the model (default: the model's: DeepSeek-OCR gundam, "
                                               "DeepSeek-OCR 2 default)")
    q.add_argument("--engine", default="vllm", choices=engine_names(), help="hf or vllm (default: vllm)")
    q.add_argument("--output-tokens", default="1000", help="N, or A:B uniform (default: 1000)")
    q.add_argument("--text-tokens", type=int, default=None, help="prompt text tokens (default: the model's, 10)")
    q.add_argument("--json", action="store_true", help="JSON on stdout")


def served_models() -> list[str]:
    return [n for n, m in MODELS.items() if getattr(m, "serving", None) is not None]


def engine_names() -> list[str]:
    """Every engine some served model has, in order."""
    names = {}
    for m in MODELS.values():
        served = getattr(m, "serving", None)
        if served is not None:
            names.update(dict.fromkeys(served().engines))
    return list(names)


def named(model) -> bool:
    """Outputs name the model when it is not the default one (DeepSeek-OCR's outputs are as they were)."""
    return model.name != DEFAULT_MODEL


def served_of(args):
    """(model, its serving record, mode, engine, text tokens) of `serve` / `dataset`; a model without a
    serving model is refused (one line)."""
    model = get_model(args.model)
    hook = getattr(model, "serving", None)
    if hook is None:
        raise UserError(f"{model.name} has no serving model (serve and dataset take: {', '.join(served_models())})")
    sv = hook()
    name = sv.default_mode if args.mode is None else args.mode
    if name not in sv.modes:
        raise UserError(f"unknown mode {name!r} (choose from {', '.join(sv.modes)})")
    text = args.text_tokens if args.text_tokens is not None else model.default_sequence()["text_tokens"]
    return model, sv, sv.modes[name], sv.engine(args.engine), text


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """The figure in the format its name says (png by default), written whole or not at all."""
    import io
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.rsplit(".", 1)[-1] if "." in path else "png")
    pyplot().close(fig)
    write_atomic(path, buf.getvalue())
