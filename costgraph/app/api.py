"""The Python API: the few calls a notebook needs, over the `Model` interface (the README's "Python API").

    >>> from costgraph.app import api
    >>> model = api.model()                                   # DeepSeek-OCR (api.model("vit") for ViT)
    >>> api.closed_form("flops", "vision", mode="gundam").plain()
    'flops[vision] (gundam) = 1139967033344 + 388149837824*w_crop*h_crop'

Everything else is the model's and the engine's own objects: `api.graph(...)` is a `CostGraph`
(networkx inside, `.g`), a form is a `costgraph.forms.Form`, a sweep's `columns` are numpy arrays
(`pandas.DataFrame(sweep.columns)` is a table).
"""
from __future__ import annotations

import sympy as sp

from costgraph import forms, stages
from costgraph.cost import METRICS
from costgraph.dtypes import DEFAULT_STORAGE
from costgraph.evaluate import substitute
from . import sweep as SW
from .models import get_model


def model(name: str | None = None):
    """A model by name: "deepseek-ocr" (default) or "vit"."""
    return get_model(name)


def _mode(m, mode):
    return m.get_mode(mode or m.default_mode) if not hasattr(mode, "name") else mode


def graph(mode: str | None = None, model_name: str | None = None, **variants):
    """The cost graph of a mode, symbolic in the model's sizes and layout (a `costgraph.graph.CostGraph`)."""
    m = model(model_name)
    return m.graph(_mode(m, mode), m.variants(**variants))


def closed_form(metric: str, scope: str, mode: str | None = None, form: str = "simplified",
                model_name: str | None = None, dtype: str = DEFAULT_STORAGE, **variants) -> forms.Form:
    """The closed form of a metric over a scope: `mode` None keeps every size symbolic."""
    m = model(model_name)
    return forms.build(m, form, mode, scope, metric, None, m.variants(**variants), dtype)


def page_cost(mode: str | None = None, *, size=None, image=None, grid=None, scopes=None, metrics=METRICS,
              model_name: str | None = None, dtype: str = DEFAULT_STORAGE, **options) -> dict:
    """Exact integers for one input (a page size, an image file or a crop grid): the input's record
    and every scope x metric. `options`: the model's sequence values (text_tokens, output_tokens),
    `max_num`, `what_if`, `output_text_tokens`, and its variants (attention=...)."""
    m = model(model_name)
    md = _mode(m, mode)
    names = {o.name for o in m.variant_options}
    variants = m.variants(**{k: v for k, v in options.items() if k in names})
    rest = {k: v for k, v in options.items() if k not in names}
    point = m.point(md, size=size, image=image, grid=grid, **rest)
    scopes = tuple(scopes or m.scopes(md))
    return {**point.record, "totals": stages.totals(m, md, point, scopes, metrics, variants, dtype)}


def nodes(mode: str | None = None, scope: str | None = None, metric: str = "flops", *, size=None, grid=None,
          model_name: str | None = None, dtype: str = DEFAULT_STORAGE, **options) -> list[tuple[str, str, object]]:
    """(node, op kind, cost) of every node under a scope over the whole run (multiplicities and sums
    applied): a sympy expression, or an exact integer when an input (`size` or `grid`) is given."""
    m = model(model_name)
    md = _mode(m, mode)
    g = m.graph(md, m.variants())
    scope = scope or m.scopes(md)[0]
    values = None
    if size is not None or grid is not None:
        point = m.point(md, size=size, grid=grid, **options)
        values = {**m.mode_values(md), **point.values, **m.dtype_values(dtype)}
    out = []
    for n in g.nodes(scope):
        e = g.effective_cost(n)[metric]
        e = substitute(e, values) if values is not None else sp.sympify(e).subs(m.mode_values(md))
        out.append((n, g.g.nodes[n]["kind"], e))
    return out


def sweep_pages(widths, heights, mode: str | None = None, model_name: str | None = None, **options) -> SW.Sweep:
    """Many page sizes through the model's layout rule, every scope x metric (compiled once, vectorised)."""
    m = model(model_name)
    seq = SW.Sequence(m.name)
    return SW.sweep_pages(mode or m.default_mode, widths, heights, seq=seq, **options)
