"""Running the reference for a page and comparing it with the graph, node by node.

`measure_page` runs the page reference (crop batch, global view, assembly) under `OpCounter`
(FLOPs) and, on CPU with metrics asked for, under `costgraph.verify.dispatch.MetricRecorder` as well
(elementwise FLOPs, bytes read and written of every aten op). `Predictor` compiles the graph's
per-node, per-scope and slot expressions once per mode and dtype (`costgraph.evaluate.Compiled`:
no sympy `subs` per layout). `compare_page` joins the two through `costgraph.verify.mapping`. Every case
runs its own page forward: nothing is reused between layouts, even where two grids run the same
crop batch (1x6 and 2x3).

Elementwise FLOPs and bytes are defined on real CPU kernels (the fused CPU SDPA, real strides and
copies): a `meta` run has no kernels (SDPA takes its math path there), so on `meta` only FLOPs are
compared, and the comparison says so (`info["metrics_skipped"]`).

Scopes: `VERIFIERS` maps a `--scope` name to a function `(Request) -> list[Comparison]`;
the vision verifier is here, later scopes (decoder, end to end) register theirs.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import sympy as sp
import torch

from costgraph.graph import within
from costgraph.dtypes import STORAGE, torch_dtype
from costgraph.evaluate import Compiled
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import DEFAULT_DTYPE, DTYPES, MAX_CROPS, MODES, VISION, Mode, VisionConfig
from costgraph.graphs.deepseek_ocr.layout import Layout, all_grids, layout_for, layout_for_grid
from .compare import Comparison, Row
from .dispatch import Call, MetricRecorder
from .mapping import METRICS as OP_METRICS, metric_claims, node_claims
from .preprocess import Views, check_views, meta_views, random_views, views_from_file
from .profile import Measured, OpCounter
from .reference import build_page_reference

SEQUENCE_NODE = "vision.assemble.sequence"


# ---- measuring ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def meta_page_reference():
    return build_page_reference("meta")


def measure_page(views: Views, model=None, recorder: MetricRecorder | None = None) -> tuple[Measured, torch.Tensor]:
    """Run the page reference on `views` under the counter (and `recorder`, if given: it keeps the
    aten ops with their metrics); returns the counts and the image slots."""
    check_views(views)
    model = model if model is not None else meta_page_reference()
    counter = OpCounter()
    rec = recorder if recorder is not None else contextlib.nullcontext()
    section = (lambda s: _both(counter.section(s), recorder.section(s))) if recorder is not None else counter.section

    def encode(scope, page, x):
        with section(scope):
            return page.encoder(x)

    with counter, rec, torch.no_grad(), section("vision"):
        seq = model(views.global_view, views.crops, views.grid, encode=encode)
    return Measured(dict(counter.records), dict(counter.uncounted)), seq


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


# ---- predicting --------------------------------------------------------------------------

class Predictor:
    """The graph's numbers for one mode and storage dtype, compiled once: per node, per scope, and
    the slot count. FLOPs for every node with FLOPs; elementwise FLOPs and bytes for every node
    that has them (the crop and global views and the page assembly)."""

    def __init__(self, mode: Mode, dtype: str = DEFAULT_DTYPE, cfg: VisionConfig = VISION):
        self.mode, self.dtype = mode, dtype
        self.graph = model_graph.vision_graph(mode.crop_mode, cfg)
        self.scopes = [s for s in model_graph.SCOPES if s in self.graph.scopes]
        self.view_scopes = [s for s in self.scopes if s != "vision"]
        self.claims = {s: node_claims(self.graph, s) for s in self.view_scopes}
        exprs = {f"node:{n}": self.graph.effective_cost(n).flops
                 for s in self.view_scopes for n in self.claims[s]}
        exprs.update({f"scope:{s}": self.graph.total(s).flops for s in self.scopes})
        exprs["slots"] = self.graph.g.nodes[SEQUENCE_NODE]["out_shape"][0]
        self._fixed = {**model_graph.mode_values(mode), **model_graph.dtype_values(dtype)}
        self._flops = _Deduped(exprs, self._fixed)
        self._metrics = None  # compiled on first use: a meta run compares FLOPs only

    @property
    def metric_claims(self) -> dict[str, dict]:
        return self._metric_parts()[0]

    def _metric_parts(self):
        if self._metrics is None:
            claims = {s: metric_claims(self.graph, s) for s in self.scopes}
            exprs = {}
            for s in self.scopes:
                cost = self.graph.total(s)
                exprs.update({f"scope:{s}:{m}": cost[m] for m in OP_METRICS})
                for n in claims[s]:
                    cost = self.graph.effective_cost(n)
                    exprs.update({f"node:{n}:{m}": cost[m] for m in OP_METRICS})
            self._metrics = claims, _Deduped(exprs, self._fixed)
        return self._metrics

    def __call__(self, layout: Layout, metrics: bool = False) -> dict[str, int]:
        values = {k.name: v for k, v in model_graph.layout_values(layout).items()}
        out = self._flops(**values)
        return {**out, **self._metric_parts()[1](**values)} if metrics else out


class _Deduped:
    """`Compiled`, with each distinct expression compiled once (every CLIP layer, most SAM blocks
    share theirs)."""

    def __init__(self, exprs: dict, fixed: dict):
        unique: dict[str, str] = {}
        self._key = {name: unique.setdefault(sp.srepr(sp.sympify(e)), name) for name, e in exprs.items()}
        self._compiled = Compiled({name: exprs[name] for name in set(self._key.values())}, fixed=fixed)

    def __call__(self, **values) -> dict[str, int]:
        out = self._compiled(**values)
        return {name: int(out[key]) for name, key in self._key.items()}


@lru_cache(maxsize=None)
def predictor(mode: Mode | str, dtype: str = DEFAULT_DTYPE, cfg: VisionConfig = VISION) -> Predictor:
    return Predictor(MODES[mode] if isinstance(mode, str) else mode, dtype, cfg)


# ---- comparing ---------------------------------------------------------------------------

def compare_page(views: Views, measured: Measured, slots: int, seconds: float = 0.0,
                 calls: list[Call] | None = None, dtype: str = "fp32", cfg: VisionConfig = VISION) -> Comparison:
    """FLOPs node by node; with `calls` (a CPU run's aten ops) also elementwise FLOPs and bytes."""
    mode, layout = views.mode, views.layout
    p = predictor(mode, dtype, cfg)
    pred = p(layout, metrics=calls is not None)
    rows, claimed = [], set()
    for scope in p.view_scopes:
        for node, claims in p.claims[scope].items():
            keys = {(scope, c.module, c.call) for c in claims}
            claimed |= keys
            got = sum(n for k, n in measured.records.items() if k[:3] in keys)
            rows.append(Row(node, "flops", pred[f"node:{node}"], int(got), "; ".join(map(str, claims))))
    rows.append(Row(SEQUENCE_NODE, "slots", pred["slots"], slots, "DeepSeekOCRVision.assemble output rows"))
    subtotals = [Row(s, "flops", pred[f"scope:{s}"], int(measured.total(s)), "all counted ops") for s in p.scopes]
    unclaimed = sorted((f"{k[0]}:{k[1] or '<root>'}", f"{k[2]}/{k[3]}", int(n))
                       for k, n in measured.records.items() if n and k[:3] not in claimed)
    if calls is not None:
        m_rows, m_sub, m_unclaimed = compare_metrics(p, pred, calls)
        rows += m_rows
        subtotals += m_sub
        unclaimed += m_unclaimed
    blind = [f"{k[0]}:{k[1] or '<root>'} {k[2]}/{k[3]}" for k in measured.blind_spots()]
    grid = f"{layout.w_crop}x{layout.h_crop}" if layout.tiled else "no crops"
    info = {"mode": mode.name, "layout": layout.as_dict(), "grid": grid, "seconds": round(seconds, 3),
            "metrics": ["flops"] + (list(OP_METRICS) if calls is not None else []), "dtype": dtype}
    return Comparison(f"{mode.name} {layout.width}x{layout.height} ({grid})", rows, subtotals, unclaimed, blind, info)


def occurrences(calls: list[Call]) -> list[int]:
    """For each call, its index among the calls with the same (section, module, call, op)."""
    seen: dict[tuple, int] = {}
    out = []
    for c in calls:
        key = (c.section, c.module, c.call, c.op)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def _moves(c: Call) -> bool:
    return bool(c.elementwise_flops or c.bytes_read or c.bytes_written)


def compare_metrics(p: Predictor, pred: dict[str, int], calls: list[Call]) -> tuple[list[Row], list[Row], list]:
    """Rows per node and metric, subtotals per scope and metric, and the measured ops no node claims.

    A call is claimed by at most one node (two claims on one op are a mapping error and raise).
    """
    occ = occurrences(calls)
    by_module: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault((c.section, c.module), []).append(i)
    owner: dict[int, str] = {}
    rows = []
    for scope in p.scopes:
        for node, claims in p.metric_claims[scope].items():
            mine = [i for cl in claims for i in by_module.get((scope, cl.module), [])
                    if cl.matches(calls[i].module, calls[i].call, calls[i].op, occ[i])]
            for i in mine:
                if owner.setdefault(i, node) != node:
                    raise ValueError(f"aten op {calls[i]} claimed by {owner[i]} and {node}")
            ref = "; ".join(map(str, claims))
            for m in OP_METRICS:
                rows.append(Row(node, m, pred[f"node:{node}:{m}"], sum(getattr(calls[i], m) for i in mine), ref))
    subtotals = [Row(s, m, pred[f"scope:{s}:{m}"], sum(getattr(c, m) for c in calls if within(c.section, s)),
                     "all aten ops") for s in p.scopes for m in OP_METRICS]
    unclaimed = [(f"{c.section}:{c.module or '<root>'}", f"{c.call}/{c.op}#{occ[i]}",
                  c.bytes_read + c.bytes_written + c.elementwise_flops)
                 for i, c in enumerate(calls) if _moves(c) and i not in owner]
    return rows, subtotals, unclaimed


def verify_views(views: Views, model=None, metrics: bool = False, dtype: str = "fp32",
                 cfg: VisionConfig = VISION) -> Comparison:
    """One page: FLOPs; with `metrics` (a CPU model of `dtype`) also elementwise FLOPs and bytes.
    The pixels are cast to the model's dtype before the run (the vendor feeds bf16 images)."""
    t = time.perf_counter()
    if not metrics:
        measured, seq = measure_page(views, model)
        return compare_page(views, measured, int(seq.shape[0]), time.perf_counter() - t, dtype=dtype, cfg=cfg)
    rec = MetricRecorder()
    measured, seq = measure_page(views.to(TORCH_DTYPES[dtype]), model, rec)
    return compare_page(views, measured, int(seq.shape[0]), time.perf_counter() - t, rec.calls, dtype, cfg)


TORCH_DTYPES = {name: torch_dtype(name) for name in STORAGE}


# ---- requests: what the command line asks for --------------------------------------------

@dataclass
class Request:
    modes: list[Mode]
    device: str = "meta"
    image: str | None = None
    size: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    all_grids: bool = False
    max_num: int = MAX_CROPS
    progress: bool = False
    extra: dict = field(default_factory=dict)  # options of later scopes
    # Metrics to compare (costgraph.cost.METRICS names). Beyond flops only on CPU: elementwise
    # FLOPs and bytes need real kernels. `dtype`: the storage dtype of the CPU run (graphs.config.DTYPES).
    metrics: tuple[str, ...] = ("flops",)
    dtype: str = "fp32"


def all_grid_cases(modes: list[Mode], max_num: int = MAX_CROPS) -> list[tuple[Mode, Layout]]:
    """Every crop grid the layout can produce (1x1 = no crops) for crop modes; the one view for native modes."""
    cases = []
    for mode in modes:
        grids = all_grids(max_num=max_num) if mode.crop_mode else [(1, 1)]
        cases += [(mode, layout_for_grid(w, h, mode)) for w, h in grids]
    return cases


def _views(req: Request, mode: Mode, layout: Layout | None) -> Views:
    if req.image:
        views = views_from_file(req.image, mode, req.max_num)
        return views.to("meta") if req.device == "meta" else views
    return meta_views(mode, layout) if req.device == "meta" else random_views(mode, layout)


def _cases(req: Request) -> list[tuple[Mode, Layout]]:
    if req.all_grids:
        return all_grid_cases(req.modes, req.max_num)
    if req.grid:
        return [(m, layout_for_grid(*req.grid, m)) for m in req.modes]
    return [(m, layout_for(*req.size, m, max_num=req.max_num)) for m in req.modes]


def verify_vision(req: Request) -> list[Comparison]:
    if req.device not in ("meta", "cpu"):
        raise ValueError(f"unknown device {req.device!r} (choose meta or cpu)")
    metrics = tuple(req.extra.get("metrics", req.metrics))
    dtype = req.extra.get("dtype", req.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    wanted = [m for m in metrics if m in OP_METRICS]
    on_cpu = bool(wanted) and req.device == "cpu"
    if req.image:  # preprocess first: a bad image fails before any model is built
        pages = [_views(req, m, None) for m in req.modes]
        makers = [lambda v=v: v for v in pages]
    else:
        makers = [lambda m=m, lay=lay: _views(req, m, lay) for m, lay in _cases(req)]
    if req.device == "meta":
        model = meta_page_reference()
    else:
        model = build_page_reference("cpu", TORCH_DTYPES[dtype] if on_cpu else torch.float32)
    out = []
    from tqdm import tqdm
    for make in tqdm(makers, desc="verify", disable=not req.progress or len(makers) < 2):
        comp = verify_views(make(), model, metrics=on_cpu, dtype=dtype)
        comp.info["device"] = req.device
        if wanted and not on_cpu:
            comp.info["metrics_skipped"] = (f"{', '.join(wanted)}: defined on real CPU kernels; a meta run has "
                                            "none (use --device cpu); only flops compared")
        if req.device == "cpu":
            comp.info["peak_rss_mib"] = peak_rss_mib()
        out.append(comp)
    return out


def peak_rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB


VERIFIERS: dict[str, Callable[[Request], list[Comparison]]] = {"vision": verify_vision}


def count_vision_meta(mode: Mode, layout: Layout) -> Measured:
    """The views the vendor runs for a page, counted on `meta`."""
    return measure_page(meta_views(mode, layout))[0]
