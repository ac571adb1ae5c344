"""Sweeps: every crop grid, or many page sizes through the model's own layout rule, with its
per-point columns (tokens) and every metric of every scope per point.

The expressions are compiled once per mode (`costgraph.evaluate.Compiled`) and evaluated on
numpy arrays; the model turns arrays of page sizes into arrays of its symbols vectorised
(`Model.page_columns`; DeepSeek-OCR: `layout.layouts_for`). No per-point `subs`. The size of the
work is checked before anything is allocated (`MAX_POINTS`); points the model cannot run (a
context past its positions) and unreadable images of a folder are reported and left out.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from costgraph.cost import METRICS
from costgraph.evaluate import Compiled
from costgraph.io import write_atomic
from costgraph.render import human, table
from costgraph.graphs.pages import page_size
from .args import (dtype_arg, input_options, max_num_arg, mode_arg, model_arg, model_of, output_text_tokens_arg,
                   sequence_args, sequence_of, variant_args, variants_of)
from .models import get_model
from .text import UserError, parse_size

CHUNK = 1 << 16          # points per evaluation step (and per progress-bar tick)
PROGRESS_FROM = 200_000  # show a progress bar from this many points on (and only on a terminal)
MAX_POINTS = 10_000_000  # a sweep's points: about 100 B per point and column; beyond this, refused up front

# Paper sizes in millimetres (ISO 216 A/B series, US), portrait.
PAPER_MM = {"A3": (297, 420), "A4": (210, 297), "A5": (148, 210), "A6": (105, 148), "B4": (250, 353),
            "B5": (176, 250), "Letter": (215.9, 279.4), "Legal": (215.9, 355.6), "Tabloid": (279.4, 431.8)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def _column_name(scope: str, metric: str) -> str:
    return f"{scope}:{metric}"


def whole_scope(scopes, composites) -> str:
    """The scope covering the whole run: a composite one (e2e) if present, else the first top-level scope."""
    return next((s for s in scopes if s in composites), next(s for s in scopes if "." not in s))


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
    model: str = ""
    label: str = ""                 # the model as papers name it (plot titles)
    composites: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)   # points left out: {"page"/"width"/..., "error"}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

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
        return "".join(self.csv_chunks())

    def csv_chunks(self, done=None):
        """The CSV in pieces of CHUNK rows; `done(rows)` after each (the progress bar)."""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(list(self.columns))
        yield buf.getvalue()
        n = len(self)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(zip(*(c[lo:hi].tolist() for c in self.columns.values())))
            yield buf.getvalue()
            if done is not None:
                done(hi - lo)

    def to_json(self) -> str:
        return "".join(self.json_chunks())

    def json_chunks(self, done=None):
        """The sweep's settings, then `points` (the `records()`), one point per line; in pieces of CHUNK
        points, `done(points)` after each.

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
        head = json.dumps({"model": self.model, "mode": self.mode, "kind": self.kind, "params": self.params,
                           "scopes": list(self.scopes), "metrics": list(self.metrics), "no_crop": self.no_crop,
                           "errors": self.errors}, indent=1)
        yield head[:-2] + ',\n "points": [\n'
        n = len(self)
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            rows = zip(*(_json_column(self.columns[c][lo:hi]) for c in order))
            yield (",\n" if lo else "") + ",\n".join(template % row for row in rows)
            if done is not None:
                done(hi - lo)
        yield "\n ]\n}\n"

    def file_names(self, plots: bool = True) -> list[str]:
        """The files one run writes into its folder, the manifest last."""
        names = ["sweep.csv", "sweep.json"]
        if plots:
            from . import plots as P  # matplotlib: loaded only when plots are drawn

            names += [f"{stem}.{ext}" for stem in P.plot_names(self) for ext in P.FORMATS]
        return names + [MANIFEST]

    def write(self, out_dir: str, plots: bool = True, progress: bool | None = None) -> list[str]:
        """This run's complete set of files in out_dir (see `file_names`); returns their paths.

        The files are made in a hidden staging folder inside out_dir and moved into place only when all
        are done, then `sweep.manifest.json` lists them, and the files an earlier run's manifest listed
        that this run did not write (another sweep's plots) are removed: the folder always holds one run's
        consistent set. An error or an interrupt while writing leaves the folder as it was, and removes
        it if this call created it. A progress bar covers the writing of long sweeps (as `evaluate`).
        """
        from tqdm import tqdm

        names = self.file_names(plots)
        created = _missing_folders(out_dir)
        n = len(self)
        per_plot = max(1, n // 16)  # drawing a figure takes about as long as writing n/16 rows
        # progress None: a bar for long sweeps, on a terminal only; True/False: a bar or none
        disable = (None if n >= PROGRESS_FROM else True) if progress is None else not progress
        bar = tqdm(total=2 * n + per_plot * (len(names) - 3), unit="", desc="write", leave=False, disable=disable)
        stage = None
        try:
            os.makedirs(out_dir, exist_ok=True)
            stage = tempfile.mkdtemp(dir=out_dir, prefix=".sweep-partial-")
            with bar:
                for name, chunks in (("sweep.csv", self.csv_chunks), ("sweep.json", self.json_chunks)):
                    bar.set_postfix_str(name)
                    write_atomic(os.path.join(stage, name), chunks(bar.update))
                if plots:
                    from . import plots as P

                    bar.set_postfix_str("plots")
                    P.plots_for(self, stage, done=lambda path: bar.update(per_plot))
            previous = _manifest_files(out_dir)
            for name in names[:-1]:
                os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
            manifest = {"written_by": "costgraph sweep", "model": self.model, "mode": self.mode, "kind": self.kind,
                        "points": n, "source": self.params.get("source"), "files": names}
            write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
            for name in previous - set(names):
                path = os.path.join(out_dir, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    os.remove(path)
        except BaseException as e:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            for folder in created:  # deepest first; a folder holding anything else stays
                try:
                    os.rmdir(folder)
                except OSError:
                    break
            if stage is not None and isinstance(e, OSError) and isinstance(e.filename, str) \
                    and e.filename.startswith(stage + os.sep):  # name the file the user asked for
                raise type(e)(e.errno, e.strerror, os.path.join(out_dir, os.path.relpath(e.filename, stage))) from None
            raise
        os.rmdir(stage)
        return [os.path.join(out_dir, name) for name in names]


MANIFEST = "sweep.manifest.json"


def _missing_folders(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would create, deepest first."""
    path, out = os.path.abspath(path), []
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _manifest_files(out_dir: str) -> set[str]:
    """The files an earlier sweep's manifest in out_dir lists (plain names in that folder only)."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            files = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(files, list):
        return set()
    return {f for f in files if isinstance(f, str) and f and f == os.path.basename(f)
            and not f.startswith(".") and f != MANIFEST}


def _json_column(a: np.ndarray) -> list[str]:
    if a.dtype == bool:
        return ["true" if x else "false" for x in a.tolist()]
    if a.dtype.kind in "iu":
        return list(map(str, a.tolist()))
    if a.dtype.kind == "f":  # NaN (a compression ratio without valid tokens) is null
        return ["null" if x != x else repr(x) for x in a.tolist()]
    return [json.dumps(x) for x in a.tolist()]


# ---- compiled evaluation -----------------------------------------------------------

@dataclass(frozen=True)
class Sequence:
    """What the model runs besides the per-point symbols: its sequence values (prompt text, generated
    tokens), variants and the storage dtype. None: the model's defaults."""
    model: str | None = None
    values: tuple = ()                  # (("text_tokens", 10), ("output_tokens", 1000)); () = defaults
    variants: object = None
    dtype: str | None = None

    def resolved(self) -> "Sequence":
        m = get_model(self.model)
        values = {**m.default_sequence(), **dict(self.values)}
        seq = Sequence(m.name, tuple(values.items()), m.variants() if self.variants is None else self.variants,
                       "bf16" if self.dtype is None else self.dtype)
        m.check_sequence(**values)
        m.dtype_values(seq.dtype)
        return seq

    def symbol_values(self) -> dict:
        m = get_model(self.model)
        return {**m.sequence_values(**dict(self.values)), **m.dtype_values(self.dtype)}

    def as_dict(self) -> dict:
        return {**dict(self.values), "dtype": self.dtype,
                "variants": self.variants.as_dict() if self.variants is not None else None}


@lru_cache(maxsize=None)
def compiled(mode_name: str, scopes: tuple[str, ...], metrics: tuple[str, ...], seq: Sequence) -> Compiled:
    """The model's per-point columns and every scope:metric of a mode, compiled once, the sequence fixed."""
    model = get_model(seq.model)
    mode = model.get_mode(mode_name)
    exprs = dict(model.point_exprs(mode))
    for s in scopes:
        for m in metrics:
            exprs[_column_name(s, m)] = model.formula(mode, s, m, seq.variants)
    c = Compiled(exprs, fixed=seq.symbol_values())
    free = {x.name for x in model.point_symbols}
    left = [a.name for a in c.args if a.name not in free]
    if left:
        raise ValueError(f"the sweep needs values for: {', '.join(left)}")
    return c


def evaluate(mode_name: str, points: dict[str, np.ndarray], scopes, metrics, seq: Sequence,
             progress: bool | None = None, n: int = 1) -> dict[str, np.ndarray]:
    """Per-point and scope:metric columns for arrays of the model's point symbols (by name), in chunks
    (a tqdm bar for long sweeps)."""
    from tqdm import tqdm

    c = compiled(mode_name, tuple(scopes), tuple(metrics), seq)
    n = len(next(iter(points.values()))) if points else n
    out = {name: np.empty(n, dtype=np.int64) for name in c.names}
    show = n >= PROGRESS_FROM if progress is None else progress
    with tqdm(total=n, unit="pt", desc=f"sweep {mode_name}", disable=None if show else True,
              leave=False) as bar:
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            part = c(**{a.name: points[a.name][lo:hi] for a in c.args})
            for name, arr in part.items():
                out[name][lo:hi] = np.broadcast_to(arr, (hi - lo,))
            bar.update(hi - lo)
    return out


def _scopes(model, mode, scopes=None, variants=None) -> tuple[str, ...]:
    allowed = model.scopes(mode, variants)
    if scopes is None:
        return tuple(allowed)
    bad = [s for s in scopes if s not in allowed]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r} for mode {mode.name} (choose from {', '.join(allowed)})")
    return tuple(scopes)


def _metrics(metrics=None) -> tuple[str, ...]:
    if metrics is None:
        return METRICS
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRICS)})")
    return tuple(metrics)


def _sweep(model, mode, kind, cols, points, scopes, metrics, seq, params, progress=None, no_crop=None,
           errors=()) -> Sweep:
    """Evaluate, then leave out (and report) the points the model cannot run."""
    cols = dict(cols)
    cols.update(evaluate(mode.name, points, scopes, metrics, seq, progress, n=len(next(iter(cols.values())))))
    errors = list(errors)
    bad = model.unrunnable(cols, dict(seq.values))
    if bad is not None and bad[0].any():
        mask, why = bad
        ident = [c for c in ("page", "grid", "width", "height") if c in cols]
        for k in np.flatnonzero(mask)[:1000]:
            errors.append({**{c: cols[c][k].item() for c in ident}, "error": why})
        if mask.all():
            raise ValueError(f"no point of the sweep can run: {why}")
        cols = {c: a[~mask] for c, a in cols.items()}
    return Sweep(mode.name, kind, cols, scopes, metrics, params, no_crop, model.name, model.label,
                 dict(model.composites), errors)


# ---- sweeps --------------------------------------------------------------------------

def sweep_grids(mode_name: str, grids=None, max_num: int | None = None, seq: Sequence = Sequence(),
                scopes=None, metrics=None, **options) -> Sweep:
    """Every given crop grid (default: all the layout can produce for max_num, 1x1 excluded); `options`
    go to the model (DeepSeek-OCR: output_text_tokens for the compression ratio)."""
    seq = seq.resolved()
    model = get_model(seq.model)
    mode = model.get_mode(mode_name)
    cols, points, baseline, params = model.grid_columns(mode, grids, max_num, **options)
    scopes, metrics = _scopes(model, mode, scopes, seq.variants), _metrics(metrics)
    no_crop = None
    if baseline is not None:
        base_points, record = baseline
        base = evaluate(mode_name, base_points, scopes, metrics, seq)
        extra = {k: int(v[0]) for k, v in base.items() if ":" not in k}
        no_crop = {**record, **extra, "totals": {s: {m: int(base[_column_name(s, m)][0]) for m in metrics}
                                                 for s in scopes}}
    return _sweep(model, mode, "grids", cols, points, scopes, metrics, seq, {**params, **seq.as_dict()},
                  no_crop=no_crop)


def sweep_pages(mode_name: str, widths, heights, max_num: int | None = None, seq: Sequence = Sequence(),
                labels=None, scopes=None, metrics=None, source: str = "pages", progress: bool | None = None,
                curve: bool = False, errors=(), **options) -> Sweep:
    """Page sizes through the model's layout rule, then its per-point columns and every metric.

    `curve`: the pages are one series (an aspect sweep), which the plots draw as a line with its grid switches.
    """
    seq = seq.resolved()
    model = get_model(seq.model)
    mode = model.get_mode(mode_name)
    widths = np.asarray(widths, dtype=np.int64).ravel()
    heights = np.asarray(heights, dtype=np.int64).ravel()
    if widths.shape != heights.shape or widths.size == 0:
        raise ValueError("a page sweep needs as many widths as heights, at least one")
    scopes, metrics = _scopes(model, mode, scopes, seq.variants), _metrics(metrics)
    cols, points, params = model.page_columns(mode, widths, heights, max_num, **options)
    if labels is not None:
        cols = {"page": np.asarray(labels), **cols}
    params = {**params, **seq.as_dict(), "source": source, "curve": curve}
    return _sweep(model, mode, "pages", cols, points, scopes, metrics, seq, params, progress, errors=errors)


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
    check_points((b - a) // step + 1, f"range {text!r}")
    return np.arange(a, b + 1, step, dtype=np.int64)


def check_points(n: int, what: str) -> None:
    """Refuse a sweep too large to hold before anything is allocated."""
    if n > MAX_POINTS:
        raise ValueError(f"{what} has {n:,} points; a sweep takes at most {MAX_POINTS:,} (about 1 KiB of memory "
                         f"and output per point): narrow it or raise the step")


def range_pages(widths: str, heights: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (width, height) pair of two ranges."""
    ws, hs = parse_range(widths), parse_range(heights)
    check_points(len(ws) * len(hs), f"widths {widths} x heights {heights}")
    w, h = np.meshgrid(ws, hs, indexing="ij")
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
    check_points(n, f"aspect range {lo:g}:{hi:g}:{n}")
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
    """Every image in a folder: labels, widths, heights, and the files that could not be read
    (`{"page": name, "error": why}`: reported, the rest go on)."""
    if not os.path.isdir(folder):
        raise ValueError(f"not a folder: {folder}")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    labels, ws, hs, errors = [], [], [], []
    for name in names:
        try:  # a folder or other non-file named like an image is reported as unreadable
            w, h = page_size(os.path.join(folder, name))
            labels.append(name)
            ws.append(w)
            hs.append(h)
        except ValueError as e:
            errors.append({"page": name, "error": str(e)})
    if not labels:
        raise ValueError(f"no readable image in {folder} ({len(errors)} unreadable: {errors[0]['error']})")
    return labels, np.array(ws, dtype=np.int64), np.array(hs, dtype=np.int64), errors


# ---- command line ------------------------------------------------------------------------

def add_parser(sub) -> None:
    q = sub.add_parser("sweep", help="tokens and every metric over crop grids or page sizes: CSV, JSON, plots")
    model_arg(q)
    mode_arg(q)
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--grids", metavar="all|AxB[,AxB...]",
                     help="every grid the layout can produce for --max-num (22 for 9; the no-crop 1x1 is "
                          "reported beside them), or a list")
    src.add_argument("--widths", metavar="A:B:STEP", help="page widths in px (with --heights): every pair")
    src.add_argument("--paper-sizes", action="store_true",
                     help="A3-A6, B4, B5, Letter, Legal, Tabloid at each --dpi, portrait and landscape")
    src.add_argument("--aspects", metavar="LO:HI:N", help="N aspect ratios W/H from LO to HI at the pixel "
                                                          "area of --area")
    src.add_argument("--folder", metavar="DIR", help="every image in a folder (unreadable files are reported)")
    q.add_argument("--heights", metavar="A:B:STEP", help="page heights in px (with --widths)")
    q.add_argument("--dpi", default="150,200,300", metavar="DPI[,DPI...]", help="for --paper-sizes")
    q.add_argument("--area", type=parse_size, default=(1654, 2339), metavar="WxH",
                   help="for --aspects: keep this page's pixel area (default: A4 at 200 dpi, 1654x2339)")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="folder for sweep.csv, sweep.json, the plots and sweep.manifest.json (the list of this "
                        "run's files). Each run leaves one complete, consistent set: the files an earlier "
                        "sweep's manifest lists that this run does not write are removed; an error or interrupt "
                        "leaves the folder as it was (and no folder it created)")
    q.add_argument("--no-plots", action="store_true")
    sequence_args(q)
    output_text_tokens_arg(q)
    dtype_arg(q)
    variant_args(q)
    max_num_arg(q)
    q.add_argument("--json", action="store_true", help="print a JSON summary")
    q.set_defaults(fn=cmd_sweep)


def _grid_list(text: str):
    if text.strip() == "all":
        return None
    return [parse_size(t) for t in text.split(",") if t.strip()]


def run_from_args(args) -> Sweep:
    model = model_of(args)
    mode = (args.mode or model.default_mode)
    seq = Sequence(model.name, tuple(sequence_of(model, args).items()), variants_of(model, args), args.dtype)
    opts = input_options(args)
    if args.heights and not args.widths:
        raise UserError("--heights needs --widths")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a folder")
    if args.grids:
        return sweep_grids(mode, _grid_list(args.grids), args.max_num, seq, **opts)
    if args.widths:
        if not args.heights:
            raise UserError("--widths needs --heights")
        w, h = range_pages(args.widths, args.heights)
        return sweep_pages(mode, w, h, args.max_num, seq, **opts, source=f"widths {args.widths} x heights {args.heights} px")
    if args.paper_sizes:
        try:
            dpis = [int(d) for d in args.dpi.split(",") if d.strip()]
        except ValueError:
            raise UserError(f"malformed --dpi {args.dpi!r}: expected integers, e.g. 150,200,300") from None
        labels, w, h = paper_pages(dpis)
        return sweep_pages(mode, w, h, args.max_num, seq, labels=labels, **opts,
                           source=f"paper sizes at {', '.join(map(str, dpis))} dpi")
    if args.aspects:
        lo, hi, n = parse_aspects(args.aspects)
        aw, ah = args.area
        w, h = aspect_pages(lo, hi, n, aw * ah)
        return sweep_pages(mode, w, h, args.max_num, seq, **opts,
                           source=f"aspect W/H {lo:g}..{hi:g} at the pixel area of {aw}x{ah}", curve=True)
    labels, w, h, errors = folder_pages(args.folder)
    return sweep_pages(mode, w, h, args.max_num, seq, labels=labels, source=f"images in {args.folder}",
                       errors=errors, **opts)


def cmd_sweep(args) -> int:
    t0 = time.perf_counter()
    s = run_from_args(args)
    t_eval = time.perf_counter() - t0
    written = s.write(args.out, plots=not args.no_plots)
    t_all = time.perf_counter() - t0
    for e in s.errors:
        what = e.get("page") or e.get("grid") or f"{e.get('width')}x{e.get('height')}"
        print(f"costgraph: skipped {what}: {e['error']}", file=sys.stderr)
    summary = {"model": s.model, "mode": s.mode, "kind": s.kind, "points": len(s), "params": s.params,
               "files": written, "evaluate_s": round(t_eval, 3), "total_s": round(t_all, 3)}
    if s.no_crop:
        summary["no_crop"] = s.no_crop
    if s.errors:
        summary["errors"] = s.errors
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{s.mode}: {len(s):,} {'grids' if s.kind == 'grids' else 'pages'} ({s.params['source']}), "
          f"layout + tokens + {len(s.scopes)} scopes x {len(s.metrics)} metrics in {t_eval:.3f} s; "
          f"written in {t_all - t_eval:.3f} s:")
    for path in written:
        print(f"  {path}")
    if s.kind == "grids":
        top = whole_scope(s.scopes, s.composites)
        rows = [[g, n, t] + [human(int(s.value(top, m)[k])) for m in s.metrics]
                for k, (g, n, t) in enumerate(zip(s.columns["grid"], s.columns["num_crops"],
                                                  s.columns["image_tokens"]))]
        if s.no_crop:
            nc = s.no_crop
            rows.insert(0, ["1x1 (no crops)", 0, nc["image_tokens"]] + [human(nc["totals"][top][m]) for m in s.metrics])
        print(table(rows, ["grid", "crops", "image tokens"] + [f"{m}[{top}]" for m in s.metrics]))
    return 0
