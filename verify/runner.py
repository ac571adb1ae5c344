"""Running the reference for a page and comparing it with the graph, node by node.

`measure_page` runs the page reference (crop batch, global view, assembly) under `OpCounter`.
`Predictor` compiles the graph's per-node, per-scope and slot expressions once per mode
(`costgraph.evaluate.Compiled`: no sympy `subs` per layout). `compare_page` joins the two
through `verify.mapping`. Every case runs its own page forward: nothing is reused between
layouts, even where two grids run the same crop batch (1x6 and 2x3).

Scopes: `VERIFIERS` maps a `--scope` name to a function `(Request) -> list[Comparison]`;
the vision verifier is here, later scopes (decoder, end to end) register theirs.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from costgraph.evaluate import Compiled
from graphs import deepseek_ocr as model_graph
from graphs.config import MAX_CROPS, MODES, Mode
from graphs.layout import Layout, all_grids, layout_for, layout_for_grid
from .compare import Comparison, Row
from .mapping import node_claims
from .preprocess import Views, check_views, meta_views, random_views, views_from_file
from .profile import Measured, OpCounter
from .reference import build_page_reference

SEQUENCE_NODE = "vision.assemble.sequence"


# ---- measuring ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def meta_page_reference():
    return build_page_reference("meta")


def measure_page(views: Views, model=None) -> tuple[Measured, torch.Tensor]:
    """Run the page reference on `views` under the counter; returns the counts and the image slots."""
    check_views(views)
    model = model if model is not None else meta_page_reference()
    counter = OpCounter()

    def encode(scope, page, x):
        with counter.section(scope):
            return page.encoder(x)

    with counter, torch.no_grad(), counter.section("vision"):
        seq = model(views.global_view, views.crops, views.grid, encode=encode)
    return Measured(dict(counter.records), dict(counter.uncounted)), seq


# ---- predicting --------------------------------------------------------------------------

class Predictor:
    """The graph's numbers for one mode, compiled once: per node, per scope, and the slot count."""

    def __init__(self, mode: Mode):
        self.mode = mode
        self.graph = model_graph.vision_graph(mode.crop_mode)
        self.scopes = [s for s in model_graph.SCOPES if s in self.graph.scopes]
        self.view_scopes = [s for s in self.scopes if s != "vision"]
        self.claims = {s: node_claims(self.graph, s) for s in self.view_scopes}
        exprs = {f"node:{n}": self.graph.effective_cost(n).flops
                 for s in self.view_scopes for n in self.claims[s]}
        exprs.update({f"scope:{s}": self.graph.total(s).flops for s in self.scopes})
        exprs["slots"] = self.graph.g.nodes[SEQUENCE_NODE]["out_shape"][0]
        self._compiled = Compiled(exprs, fixed=model_graph.mode_values(mode))

    def __call__(self, layout: Layout) -> dict[str, int]:
        out = self._compiled(**{k.name: v for k, v in model_graph.layout_values(layout).items()})
        return {k: int(v) for k, v in out.items()}


@lru_cache(maxsize=None)
def predictor(mode_name: str) -> Predictor:
    return Predictor(MODES[mode_name])


# ---- comparing ---------------------------------------------------------------------------

def compare_page(views: Views, measured: Measured, slots: int, seconds: float = 0.0) -> Comparison:
    mode, layout = views.mode, views.layout
    pred = predictor(mode.name)(layout)
    rows, claimed = [], set()
    for scope in predictor(mode.name).view_scopes:
        for node, claims in predictor(mode.name).claims[scope].items():
            keys = {(scope, c.module, c.call) for c in claims}
            claimed |= keys
            got = sum(n for k, n in measured.records.items() if k[:3] in keys)
            rows.append(Row(node, "flops", pred[f"node:{node}"], int(got), "; ".join(map(str, claims))))
    rows.append(Row(SEQUENCE_NODE, "slots", pred["slots"], slots, "DeepSeekOCRVision.assemble output rows"))
    subtotals = [Row(s, "flops", pred[f"scope:{s}"], int(measured.total(s)), "all counted ops")
                 for s in predictor(mode.name).scopes]
    unclaimed = sorted((f"{k[0]}:{k[1] or '<root>'}", f"{k[2]}/{k[3]}", int(n))
                       for k, n in measured.records.items() if n and k[:3] not in claimed)
    blind = [f"{k[0]}:{k[1] or '<root>'} {k[2]}/{k[3]}" for k in measured.blind_spots()]
    grid = f"{layout.w_crop}x{layout.h_crop}" if layout.tiled else "no crops"
    info = {"mode": mode.name, "layout": layout.as_dict(), "grid": grid, "seconds": round(seconds, 3),
            "nonzero_rows": sum(1 for r in rows if r.predicted or r.measured)}
    return Comparison(f"{mode.name} {layout.width}x{layout.height} ({grid})", rows, subtotals, unclaimed, blind, info)


def verify_views(views: Views, model=None) -> Comparison:
    t = time.perf_counter()
    measured, seq = measure_page(views, model)
    return compare_page(views, measured, int(seq.shape[0]), time.perf_counter() - t)


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
    if req.image:  # preprocess first: a bad image fails before any model is built
        pages = [_views(req, m, None) for m in req.modes]
        makers = [lambda v=v: v for v in pages]
    else:
        makers = [lambda m=m, lay=lay: _views(req, m, lay) for m, lay in _cases(req)]
    model = meta_page_reference() if req.device == "meta" else build_page_reference("cpu")
    out = []
    from tqdm import tqdm
    for make in tqdm(makers, desc="verify", disable=not req.progress or len(makers) < 2):
        comp = verify_views(make(), model)
        comp.info["device"] = req.device
        if req.device == "cpu":
            comp.info["peak_rss_mib"] = peak_rss_mib()
        out.append(comp)
    return out


def peak_rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB


VERIFIERS: dict[str, Callable[[Request], list[Comparison]]] = {"vision": verify_vision}
