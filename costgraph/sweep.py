"""Sweeps: every crop grid, or many page sizes through the real layout rule, with tokens (slots,
the paper's count, valid tokens) and every metric of every scope per point.

The expressions are compiled once per mode (`costgraph.evaluate.Compiled`) and evaluated on
numpy arrays; the layout rule runs vectorised (`graphs.layout.layouts_for`). No per-point `subs`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .cost import METRICS
from .evaluate import Compiled

CHUNK = 1 << 16          # points per evaluation step (and per progress-bar tick)
PROGRESS_FROM = 200_000  # show a progress bar from this many points on (and only on a terminal)

# Paper sizes in millimetres (ISO 216 A/B series, US), portrait.
PAPER_MM = {"A3": (297, 420), "A4": (210, 297), "A5": (148, 210), "A6": (105, 148), "B4": (250, 353),
            "B5": (176, 250), "Letter": (215.9, 279.4), "Legal": (215.9, 355.6), "Tabloid": (279.4, 431.8)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def _column_name(scope: str, metric: str) -> str:
    return f"{scope}:{metric}"


def whole_scope(scopes) -> str:
    """The scope covering the whole run: a composite one (e2e) if present, else the first top-level scope."""
    from graphs.deepseek_ocr import COMPOSITE

    return next((s for s in scopes if s in COMPOSITE), next(s for s in scopes if "." not in s))


@dataclass
class Sweep:
    """One row per point: identity (grid or page), layout, tokens, then `scope:metric` columns."""
    mode: str
    kind: str                       # "grids" or "pages"
    columns: dict[str, np.ndarray]
    scopes: tuple[str, ...]
    metrics: tuple[str, ...]
    params: dict = field(default_factory=dict)   # max_num, sequence values, source
    no_crop: dict | None = None     # grid sweeps of a crop mode: the 1x1 (no crops) baseline record

    def __len__(self) -> int:
        return len(self.columns["w_crop"])

    def value(self, scope: str, metric: str) -> np.ndarray:
        return self.columns[_column_name(scope, metric)]

    def records(self) -> list[dict]:
        """JSON records; `totals` has the shape of `costgraph cost --json`."""
        names = list(self.columns)
        at = {c: k for k, c in enumerate(names)}
        ident = [(c, at[c]) for c in names if ":" not in c]
        totals = [(s, [(m, at[_column_name(s, m)]) for m in self.metrics]) for s in self.scopes]
        out = []
        for row in zip(*(self.columns[c].tolist() for c in names)):
            rec = {c: row[k] for c, k in ident}
            rec["totals"] = {s: {m: row[k] for m, k in ms} for s, ms in totals}
            out.append(rec)
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(self.columns))
        w.writerows(zip(*(c.tolist() for c in self.columns.values())))
        return buf.getvalue()

    def to_json(self) -> str:
        """The sweep's settings, then `points` (the `records()`), one point per line.

        Built from per-column JSON encodings and one row template: a 100,000-point sweep
        serialises in a fraction of a second.
        """
        names = list(self.columns)
        ident = [c for c in names if ":" not in c]
        fields = [json.dumps(c) + ":%s" for c in ident]
        totals = ",".join(json.dumps(s) + ":{" + ",".join(json.dumps(m) + ":%s" for m in self.metrics) + "}"
                          for s in self.scopes)
        template = "{" + ",".join(fields) + ',"totals":{' + totals + "}}"
        order = ident + [_column_name(s, m) for s in self.scopes for m in self.metrics]
        points = ",\n".join(template % row for row in zip(*(_json_column(self.columns[c]) for c in order)))
        head = json.dumps({"mode": self.mode, "kind": self.kind, "params": self.params, "scopes": list(self.scopes),
                           "metrics": list(self.metrics), "no_crop": self.no_crop}, indent=1)
        return head[:-2] + ',\n "points": [\n' + points + "\n ]\n}\n"

    def write(self, out_dir: str, plots: bool = True) -> list[str]:
        from .io import write_atomic

        os.makedirs(out_dir, exist_ok=True)
        written = []
        for name, text in (("sweep.csv", self.to_csv()), ("sweep.json", self.to_json())):
            path = os.path.join(out_dir, name)
            write_atomic(path, text)
            written.append(path)
        if plots:
            from . import plots as P

            written += P.plots_for(self, out_dir)
        return written


def _json_column(a: np.ndarray) -> list[str]:
    if a.dtype == bool:
        return ["true" if x else "false" for x in a.tolist()]
    if a.dtype.kind in "iu":
        return list(map(str, a.tolist()))
    if a.dtype.kind == "f":  # NaN (a compression ratio without valid tokens) is null
        return ["null" if x != x else repr(x) for x in a.tolist()]
    return [json.dumps(x) for x in a.tolist()]


# ---- compiled evaluation -----------------------------------------------------------

def _mode(mode_name: str):
    from graphs import deepseek_ocr as model

    return model.get_mode(mode_name)


@dataclass(frozen=True)
class Sequence:
    """What the language model runs besides the layout: prompt text, generated tokens, variants."""
    text_tokens: int | None = None      # None: the model's default
    output_tokens: int | None = None
    variants: object = None             # graphs.decoder.Variants; None: the vendor's
    dtype: str | None = None            # storage dtype of the bytes metrics; None: the default (bf16)

    def resolved(self) -> "Sequence":
        from graphs import deepseek_ocr as model
        from graphs.config import DEFAULT_DTYPE, DEFAULT_OUTPUT_TOKENS, DEFAULT_TEXT_TOKENS

        seq = Sequence(DEFAULT_TEXT_TOKENS if self.text_tokens is None else self.text_tokens,
                       DEFAULT_OUTPUT_TOKENS if self.output_tokens is None else self.output_tokens,
                       model.VENDOR if self.variants is None else self.variants,
                       DEFAULT_DTYPE if self.dtype is None else self.dtype)
        model.sequence_values(seq.text_tokens, seq.output_tokens)  # validates
        model.dtype_values(seq.dtype)
        return seq

    def values(self) -> dict:
        from graphs import deepseek_ocr as model

        return {**model.sequence_values(self.text_tokens, self.output_tokens), **model.dtype_values(self.dtype)}

    def as_dict(self) -> dict:
        return {"text_tokens": self.text_tokens, "output_tokens": self.output_tokens, "dtype": self.dtype,
                "variants": self.variants.as_dict() if self.variants is not None else None}


@lru_cache(maxsize=None)
def compiled(mode_name: str, scopes: tuple[str, ...], metrics: tuple[str, ...], seq: Sequence) -> Compiled:
    """Tokens and every scope:metric of a mode, compiled once, the sequence values fixed."""
    from graphs import deepseek_ocr as model
    from graphs.layout import image_tokens

    mode = _mode(mode_name)
    tokens = image_tokens(mode)
    exprs = {"image_tokens": tokens["total"], "paper_tokens": tokens["paper"]}
    for s in scopes:
        for m in metrics:
            exprs[_column_name(s, m)] = model.formula(mode, s, m, seq.variants)
    c = Compiled(exprs, fixed=seq.values())
    left = [a.name for a in c.args if a.name not in ("w_crop", "h_crop")]
    if left:
        raise ValueError(f"the sweep needs values for: {', '.join(left)}")
    return c


def evaluate(mode_name: str, w_crop: np.ndarray, h_crop: np.ndarray, scopes, metrics, seq: Sequence,
             progress: bool | None = None) -> dict[str, np.ndarray]:
    """Tokens and scope:metric columns for arrays of grids, in chunks (a tqdm bar for long sweeps)."""
    from tqdm import tqdm

    c = compiled(mode_name, tuple(scopes), tuple(metrics), seq)
    n = len(w_crop)
    out = {name: np.empty(n, dtype=np.int64) for name in c.names}
    show = n >= PROGRESS_FROM if progress is None else progress
    with tqdm(total=n, unit="pt", desc=f"sweep {mode_name}", disable=None if show else True,
              leave=False) as bar:
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            part = c(w_crop=w_crop[lo:hi], h_crop=h_crop[lo:hi])
            for name, arr in part.items():
                out[name][lo:hi] = np.broadcast_to(arr, (hi - lo,))
            bar.update(hi - lo)
    return out


def _scopes(mode_name: str, scopes=None) -> tuple[str, ...]:
    from graphs import deepseek_ocr as model

    allowed = model.scopes_for(_mode(mode_name))
    if scopes is None:
        return tuple(allowed)
    bad = [s for s in scopes if s not in allowed]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r} for mode {mode_name} (choose from {', '.join(allowed)})")
    return tuple(scopes)


def _metrics(metrics=None) -> tuple[str, ...]:
    if metrics is None:
        return METRICS
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRICS)})")
    return tuple(metrics)


# ---- sweeps --------------------------------------------------------------------------

GRID_PAGE_NOTE = "valid tokens of each grid's nominal page: image_size*w_crop x image_size*h_crop"


def token_columns(evaluated: dict, widths, heights, num_crops, mode, output_text_tokens: int | None) -> dict:
    """image_tokens and paper_tokens (moved out of `evaluated`), then the valid tokens of the pages
    (`graphs.layout.valid_tokens_for`) and, with output_text_tokens, the compression ratio (NaN without
    valid tokens)."""
    from graphs.layout import VALID_TOKENS, VALID_TOKENS_PAPER_CEIL, compression_ratios, valid_tokens_for

    valid = valid_tokens_for(widths, heights, num_crops, mode)
    cols = {k: evaluated.pop(k) for k in ("image_tokens", "paper_tokens")}
    cols.update({VALID_TOKENS: valid.vendor, VALID_TOKENS_PAPER_CEIL: valid.paper_ceil})
    if output_text_tokens is not None:
        cols["compression_ratio"] = compression_ratios(output_text_tokens, valid.vendor)
    return cols


def _check_output_text_tokens(n):
    from graphs.layout import check_output_text_tokens

    return None if n is None else check_output_text_tokens(n)

def sweep_grids(mode_name: str, grids=None, max_num: int | None = None, seq: Sequence = Sequence(),
                scopes=None, metrics=None, output_text_tokens: int | None = None) -> Sweep:
    """Every given crop grid (default: all the layout can produce for max_num, 1x1 excluded).

    Valid tokens need a page: each grid's nominal one (`layout_for_grid`), as `cost --grid` takes it.
    """
    from graphs.config import MAX_CROPS
    from graphs.layout import candidate_grids, layout_for_grid

    mode = _mode(mode_name)
    if not mode.crop_mode:
        raise ValueError(f"mode {mode_name!r} does not crop: a grid sweep needs a crop mode (gundam, gundam-m)")
    max_num = MAX_CROPS if max_num is None else max_num
    if max_num < 2:
        raise ValueError(f"max_num must be at least 2, got {max_num}")
    explicit = grids
    grids = candidate_grids(2, max_num) if grids is None else [tuple(g) for g in grids]
    for g in grids:
        layout_for_grid(*g, mode)  # validates
    scopes, metrics, seq = _scopes(mode_name, scopes), _metrics(metrics), seq.resolved()
    output_text_tokens = _check_output_text_tokens(output_text_tokens)
    w = np.array([g[0] for g in grids], dtype=np.int64)
    h = np.array([g[1] for g in grids], dtype=np.int64)
    tiled = w * h > 1
    cols = {"grid": np.array([f"{a}x{b}" for a, b in grids]), "w_crop": w, "h_crop": h,
            "num_crops": np.where(tiled, w * h, 0)}
    ev = evaluate(mode_name, w, h, scopes, metrics, seq)
    cols.update(token_columns(ev, mode.image_size * w, mode.image_size * h, cols["num_crops"], mode,
                              output_text_tokens))
    cols.update(ev)
    one = np.ones(1, np.int64)
    base = evaluate(mode_name, one, one, scopes, metrics, seq)
    base_tokens = token_columns(base, one * mode.image_size, one * mode.image_size, 0 * one, mode, output_text_tokens)
    no_crop = {"grid": "1x1", "w_crop": 1, "h_crop": 1, "num_crops": 0,
               **{k: _json_value(v[0]) for k, v in base_tokens.items()},
               "totals": {s: {m: int(base[_column_name(s, m)][0]) for m in metrics} for s in scopes},
               "note": "a page within 640x640 gets no crops; the vendor reports its grid as 1x1"}
    source = f"every grid for at most {max_num} crops" if explicit is None else "grids " + ", ".join(
        f"{a}x{b}" for a, b in grids)
    params = {"max_num": max_num, **seq.as_dict(), "source": source, "output_text_tokens": output_text_tokens,
              "valid_tokens_page": GRID_PAGE_NOTE}
    return Sweep(mode_name, "grids", cols, scopes, metrics, params, no_crop)


def _json_value(x):
    """A numpy scalar as a JSON value: int, float, or None for NaN."""
    x = x.item()
    return None if isinstance(x, float) and x != x else x


def sweep_pages(mode_name: str, widths, heights, max_num: int | None = None, seq: Sequence = Sequence(),
                labels=None,
                scopes=None, metrics=None, source: str = "pages", progress: bool | None = None,
                curve: bool = False, output_text_tokens: int | None = None) -> Sweep:
    """Page sizes through the vendor's layout rule, then tokens (valid tokens from each page's own size)
    and every metric; with output_text_tokens, the compression ratio per page.

    `curve`: the pages are one series (an aspect sweep), which the plots draw as a line with its grid switches.
    """
    from graphs.config import MAX_CROPS
    from graphs.layout import layouts_for

    max_num = MAX_CROPS if max_num is None else max_num
    widths = np.asarray(widths, dtype=np.int64).ravel()
    heights = np.asarray(heights, dtype=np.int64).ravel()
    if widths.shape != heights.shape or widths.size == 0:
        raise ValueError("a page sweep needs as many widths as heights, at least one")
    scopes, metrics, seq = _scopes(mode_name, scopes), _metrics(metrics), seq.resolved()
    output_text_tokens = _check_output_text_tokens(output_text_tokens)
    mode = _mode(mode_name)
    lay = layouts_for(widths, heights, mode, max_num=max_num)
    cols = {}
    if labels is not None:
        cols["page"] = np.asarray(labels)
    cols.update({"width": lay.width, "height": lay.height, "aspect": np.round(lay.width / lay.height, 6),
                 "w_crop": lay.w_crop, "h_crop": lay.h_crop, "tiled": lay.tiled, "num_crops": lay.num_crops})
    ev = evaluate(mode_name, lay.w_crop, lay.h_crop, scopes, metrics, seq, progress)
    cols.update(token_columns(ev, lay.width, lay.height, lay.num_crops, mode, output_text_tokens))
    cols.update(ev)
    params = {"max_num": max_num, **seq.as_dict(), "source": source, "curve": curve,
              "output_text_tokens": output_text_tokens}
    return Sweep(mode_name, "pages", cols, scopes, metrics, params)


# ---- page sources --------------------------------------------------------------------

def parse_range(text: str) -> np.ndarray:
    """'A:B:STEP' (inclusive of B when on the step), 'A:B' (step 1) or a single 'A'."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*(?::\s*(\d+)\s*)?)?", text)
    if not m:
        raise ValueError(f"malformed range {text!r}: expected A:B:STEP with positive integers, e.g. 600:3000:10")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) else a
    step = int(m.group(3)) if m.group(3) else 1
    if a <= 0 or b < a or step <= 0:
        raise ValueError(f"range {text!r} must have 0 < A <= B and STEP > 0")
    return np.arange(a, b + 1, step, dtype=np.int64)


def range_pages(widths: str, heights: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (width, height) pair of two ranges."""
    w, h = np.meshgrid(parse_range(widths), parse_range(heights), indexing="ij")
    return w.ravel(), h.ravel()


def paper_pages(dpis=(150, 200, 300), landscape: bool = True):
    """Standard paper sizes scanned at each DPI, portrait (and landscape): labels, widths, heights."""
    labels, ws, hs = [], [], []
    for dpi in dpis:
        if dpi <= 0:
            raise ValueError(f"DPI must be positive, got {dpi}")
        for name, (wmm, hmm) in PAPER_MM.items():
            w, h = round(wmm / 25.4 * dpi), round(hmm / 25.4 * dpi)
            for tag, (a, b) in (("portrait", (w, h)), ("landscape", (h, w)))[: 2 if landscape else 1]:
                labels.append(f"{name} {tag} {dpi}dpi")
                ws.append(a)
                hs.append(b)
    return labels, np.array(ws, dtype=np.int64), np.array(hs, dtype=np.int64)


def aspect_pages(lo: float, hi: float, n: int, area: int):
    """n pages of a fixed pixel area with aspect W/H spread geometrically over [lo, hi]."""
    if not (0 < lo <= hi) or n <= 0 or area <= 0:
        raise ValueError(f"aspect sweep needs 0 < LO <= HI, N > 0 and a positive area, got {lo}:{hi}:{n}")
    a = np.geomspace(lo, hi, n)
    w = np.maximum(1, np.rint(np.sqrt(area * a))).astype(np.int64)
    h = np.maximum(1, np.rint(np.sqrt(area / a))).astype(np.int64)
    return w, h


def parse_aspects(text: str) -> tuple[float, float, int]:
    m = re.fullmatch(r"\s*([\d.]+)\s*:\s*([\d.]+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"malformed aspect range {text!r}: expected LO:HI:N, e.g. 0.25:4:400")
    try:
        return float(m.group(1)), float(m.group(2)), int(m.group(3))
    except ValueError:
        raise ValueError(f"malformed aspect range {text!r}: expected LO:HI:N, e.g. 0.25:4:400") from None


def folder_pages(folder: str):
    """Every image in a folder (sizes read from the headers): labels, widths, heights."""
    from graphs.pages import open_page

    if not os.path.isdir(folder):
        raise ValueError(f"not a folder: {folder}")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    ws, hs = [], []
    for name in names:
        with open_page(os.path.join(folder, name)) as img:
            ws.append(img.width)
            hs.append(img.height)
    return names, np.array(ws, dtype=np.int64), np.array(hs, dtype=np.int64)


# ---- command line ------------------------------------------------------------------------

def add_parser(sub, max_num_arg, variant_args) -> None:
    from .cli import parse_size
    from .tables import sequence_args

    q = sub.add_parser("sweep", help="tokens and every metric over crop grids or page sizes: CSV, JSON, plots")
    q.add_argument("--mode", default="gundam", help="(default: %(default)s)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--grids", metavar="all|AxB[,AxB...]",
                     help="every grid the layout can produce for --max-num (22 for 9; the no-crop 1x1 is "
                          "reported beside them), or a list")
    src.add_argument("--widths", metavar="A:B:STEP", help="page widths in px (with --heights): every pair")
    src.add_argument("--paper-sizes", action="store_true",
                     help="A3-A6, B4, B5, Letter, Legal, Tabloid at each --dpi, portrait and landscape")
    src.add_argument("--aspects", metavar="LO:HI:N", help="N aspect ratios W/H from LO to HI at the pixel "
                                                          "area of --area")
    src.add_argument("--folder", metavar="DIR", help="every image in a folder")
    q.add_argument("--heights", metavar="A:B:STEP", help="page heights in px (with --widths)")
    q.add_argument("--dpi", default="150,200,300", metavar="DPI[,DPI...]", help="for --paper-sizes")
    q.add_argument("--area", type=parse_size, default=(1654, 2339), metavar="WxH",
                   help="for --aspects: keep this page's pixel area (default: A4 at 200 dpi, 1654x2339)")
    q.add_argument("--out", required=True, metavar="DIR", help="sweep.csv, sweep.json and the plots go here")
    q.add_argument("--no-plots", action="store_true")
    sequence_args(q)
    variant_args(q)
    max_num_arg(q)
    q.add_argument("--json", action="store_true", help="print a JSON summary")
    q.set_defaults(fn=cmd_sweep)


def _grid_list(text: str):
    from .cli import parse_size

    if text.strip() == "all":
        return None
    return [parse_size(t) for t in text.split(",") if t.strip()]


def run_from_args(args) -> Sweep:
    from .cli import UserError, _variants_from_args

    seq = Sequence(args.text_tokens, args.output_tokens, _variants_from_args(args), args.dtype)
    n = _check_output_text_tokens(args.output_text_tokens)
    if args.heights and not args.widths:
        raise UserError("--heights needs --widths")
    if args.grids:
        return sweep_grids(args.mode, _grid_list(args.grids), args.max_num, seq, output_text_tokens=n)
    if args.widths:
        if not args.heights:
            raise UserError("--widths needs --heights")
        w, h = range_pages(args.widths, args.heights)
        return sweep_pages(args.mode, w, h, args.max_num, seq, output_text_tokens=n,
                           source=f"widths {args.widths} x heights {args.heights} px")
    if args.paper_sizes:
        try:
            dpis = [int(d) for d in args.dpi.split(",") if d.strip()]
        except ValueError:
            raise UserError(f"malformed --dpi {args.dpi!r}: expected integers, e.g. 150,200,300") from None
        labels, w, h = paper_pages(dpis)
        return sweep_pages(args.mode, w, h, args.max_num, seq, labels=labels, output_text_tokens=n,
                           source=f"paper sizes at {', '.join(map(str, dpis))} dpi")
    if args.aspects:
        lo, hi, n = parse_aspects(args.aspects)
        aw, ah = args.area
        w, h = aspect_pages(lo, hi, n, aw * ah)
        return sweep_pages(args.mode, w, h, args.max_num, seq, output_text_tokens=n,
                           source=f"aspect W/H {lo:g}..{hi:g} at the pixel area of {aw}x{ah}", curve=True)
    labels, w, h = folder_pages(args.folder)
    return sweep_pages(args.mode, w, h, args.max_num, seq, labels=labels, output_text_tokens=n,
                       source=f"images in {args.folder}")


def cmd_sweep(args) -> int:
    import time

    t0 = time.perf_counter()
    s = run_from_args(args)
    t_eval = time.perf_counter() - t0
    written = s.write(args.out, plots=not args.no_plots)
    t_all = time.perf_counter() - t0
    summary = {"mode": s.mode, "kind": s.kind, "points": len(s), "params": s.params, "files": written,
               "evaluate_s": round(t_eval, 3), "total_s": round(t_all, 3)}
    if s.no_crop:
        summary["no_crop"] = s.no_crop
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    from .cli import human, table

    print(f"{s.mode}: {len(s):,} {'grids' if s.kind == 'grids' else 'pages'} ({s.params['source']}), "
          f"layout + tokens + {len(s.scopes)} scopes x {len(s.metrics)} metrics in {t_eval:.3f} s; "
          f"written in {t_all:.3f} s:")
    for path in written:
        print(f"  {path}")
    if s.kind == "grids":
        top = whole_scope(s.scopes)
        rows = [[g, n, t, v] + [human(int(s.value(top, m)[k])) for m in s.metrics]
                for k, (g, n, t, v) in enumerate(zip(s.columns["grid"], s.columns["num_crops"],
                                                     s.columns["image_tokens"], s.columns["valid_tokens"]))]
        if s.no_crop:
            nc = s.no_crop
            rows.insert(0, ["1x1 (no crops)", 0, nc["image_tokens"], nc["valid_tokens"]]
                        + [human(nc["totals"][top][m]) for m in s.metrics])
        print(table(rows, ["grid", "crops", "image tokens", "valid tokens*"] + [f"{m}[{top}]" for m in s.metrics]))
        print(f"* {GRID_PAGE_NOTE}")
    return 0
