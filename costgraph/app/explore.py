"""`costgraph explore`: one self-contained HTML page that computes a model's costs in the browser.

Everything the page needs is inlined (no network, no server): the template `explore.html` (its
script and styles), the model as data, and the model's formulas compiled to JavaScript once:
- every node's cost over the whole run (its scopes' multiplicities applied, a summed scope summed in
  closed form) as exact BigInt functions (`costgraph.app.jscode`), each distinct expression once;
  a scope's total is the sum of its nodes' (as `CostGraph.total` sums them), a composite its parts';
- every node's cost per execution of its stage as Number functions, for roofline seconds (floats in
  the CLI too), evaluated at every decode step like `costgraph.stages.roofline`;
- the input rule (for DeepSeek-OCR: the crop layout, token counts, valid tokens) from the model's
  `page_rule`: its Python kernels translated to JavaScript (`costgraph.app.pyjs`) and its record
  fields as expressions;
- closed forms (the `simplified` form, else the general one) as MathML from sympy's presentation
  printer, for the variants the page is made with (`--attention ...`): every mode, scope, metric, dtype.

Graphs are the model's own (`Model.graph` for every mode and every combination of the model's variant
options, `Model.variant_sets`, a phase's included): a new option or phase appears in the page as a new control with no
edit of the page. A graph's node list is stored as runs of shared rows (node, costs), so variants that
change a few nodes cost a few rows.

It takes seconds, not under 2 s: building every variant's graph, summing the decode costs in closed
form and the closed forms. Nothing is cached on disk (a cache could go stale when a model changes).
"""
from __future__ import annotations

import json
from importlib import resources

import sympy as sp
from sympy.printing.mathml import mathml

from costgraph import forms
from costgraph import roofline as RL
from costgraph.cost import METRICS
from costgraph.dtypes import STORAGE
from costgraph.hardware import PRESETS
from costgraph.symbols import dtype_bytes
from .jscode import RUNTIME, JSPrinter
from .pyjs import NP_RUNTIME, translate

PLACEHOLDER = "/*COSTGRAPH-DATA*/"


class ExprTable:
    """Distinct expressions, each printed once as a JavaScript function of the symbol values `v`."""

    def __init__(self, exact: bool):
        self.printer = JSPrinter(exact)
        self.index: dict[sp.Expr, int] = {}
        self.code: list[str] = []

    def add(self, e) -> int:
        """Index of an expression; -1 for a literal zero (the page skips it)."""
        e = sp.sympify(e)
        if e == 0:
            return -1
        k = self.index.get(e)
        if k is None:
            k = self.index[e] = len(self.code)
            self.code.append(f"(v) => {self.printer.code(e)}")
        return k

    def js(self) -> str:
        return "[\n" + ",\n".join(self.code) + "\n]"


def combos(model) -> list[dict]:
    """The model's representative variant sets (`Model.variant_sets`; one, empty, for a model without any)."""
    return model.variant_sets() or [{}]


def page_options(model) -> list:
    """The variant options the page offers: those its variant sets set."""
    names = {k for s in combos(model) for k in s}
    return [o for o in model.variant_options if o.name in names]


def combo_key(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


class _Builder:
    """The page's graphs as shared tables: nodes, rows (a node with its cost expressions), expressions."""

    def __init__(self, model, progress=None):
        self.model = model
        self.exact, self.floats = ExprTable(True), ExprTable(False)
        self.nodes: dict[tuple, int] = {}        # (scope, path, kind) -> id
        self.rows: dict[tuple, int] = {}         # (node id, effective eids, per-execution nids) -> id
        self.scope_names: dict[str, int] = {}
        self.graphs: dict[int, int] = {}         # id(CostGraph) -> index
        self.graph_data: list[dict] = []
        self._effective: dict = {}
        self._per_stage: dict = {}
        self.progress = progress or (lambda what: None)

    def scope_id(self, name: str) -> int:
        return self.scope_names.setdefault(name, len(self.scope_names))

    def graph(self, g) -> int:
        key = id(g)
        if key in self.graphs:
            return self.graphs[key]
        self.progress(f"graph {g.name} {g.params}")
        rows = [self._row(g, n) for n in g.g.nodes]
        runs = []                                 # [first row, count] runs
        for r in rows:
            if runs and runs[-1][0] + runs[-1][1] == r:
                runs[-1][1] += 1
            else:
                runs.append([r, 1])
        scopes = [[name, self.scope_id(name), sc.doc] for name, sc in g.scopes.items()]
        self.graphs[key] = len(self.graph_data)
        self.graph_data.append({"name": g.name, "params": {k: str(v) for k, v in g.params.items()},
                                "scopes": scopes, "rows": runs, "summed": self._summed(g)})
        return self.graphs[key]

    def _summed(self, g) -> dict:
        """scope -> [index symbol, lo eid, hi eid] for every summed scope (the roofline walks its steps)."""
        out = {}
        for name, sc in g.scopes.items():
            if sc.sum_over is not None:
                idx, lo, hi = sc.sum_over
                out[name] = [idx.name, self.floats.add(lo), self.floats.add(hi)]   # -1: a literal 0
        return out

    def _row(self, g, n) -> int:
        data = g.g.nodes[n]
        node = self.nodes.setdefault((data["scope"], data["path"], data["kind"]), len(self.nodes))
        self.scope_id(data["scope"])
        cost, chain = g.cost(n), tuple(g.chain(data["scope"]))
        eff = self._effective.get((cost, chain))
        if eff is None:
            total = g.effective_cost(n)
            eff = self._effective[(cost, chain)] = tuple(self.exact.add(total[m]) for m in METRICS)
        k = RL.batch_factor(g, n)
        per = self._per_stage.get((cost, k))
        if per is None:
            per = self._per_stage[(cost, k)] = tuple(self.floats.add(sp.expand(k * e)) for e in (
                cost.flops, cost.elementwise_flops, cost.bytes_read + cost.bytes_written))
        return self.rows.setdefault((node, eff, per), len(self.rows))


def _mathml(expr) -> str:
    return f'<math display="block">{mathml(expr, printer="presentation")}</math>'


def closed_forms(model, variants, progress=None) -> tuple[dict, list[str]]:
    """(key "mode|scope|metric|dtype" -> index, MathML texts) for every mode, scope, Cost metric and dtype;
    the simplified form where the model's rules make one, else the general form. Each text also holds
    the assumptions and the excluded cases."""
    texts: dict[str, int] = {}
    out = {}
    for mode_name, mode in model.modes.items():
        if progress:
            progress(f"closed forms {mode_name}")
        for scope in model.scopes(mode):
            for metric in METRICS:
                first = None
                for dtype in STORAGE:
                    if first is not None and not model.formula(mode, scope, metric, variants).has(dtype_bytes):
                        out[f"{mode_name}|{scope}|{metric}|{dtype}"] = first   # no element size in it
                        continue
                    try:
                        f = forms.build(model, "simplified", mode_name, scope, metric, None, variants, dtype)
                    except (ValueError, NotImplementedError):
                        f = forms.build(model, "general", mode_name, scope, metric, None, variants, dtype)
                    parts = [_mathml(f.expr)]
                    if f.assumptions:
                        parts.append("<p>assuming " + "; ".join(a.words for a in f.assumptions) + "</p>")
                    for case, value in f.otherwise:
                        parts.append(f"<p>{case}:</p>{_mathml(value)}")
                    text = f'<p class="form-kind">{f.kind} form</p>' + "".join(parts)
                    out[f"{mode_name}|{scope}|{metric}|{dtype}"] = first = texts.setdefault(text, len(texts))
    return out, list(texts)


def page_data(model, variants_options: dict | None = None, progress=None) -> tuple[dict, str]:
    """(the page's data as JSON-able values, the JavaScript of its functions)."""
    b = _Builder(model, progress)
    rule = model.page_rule()
    chosen = {o.name: o.default for o in page_options(model)}
    chosen.update(variants_options or {})
    graphs_by_combo = {}
    fixed = {}
    for options in combos(model):
        variants = model.variants(**options)
        graphs_by_combo[combo_key(options)] = {name: b.graph(model.graph(mode, variants))
                                               for name, mode in model.modes.items()}
        for name, mode in model.modes.items():   # a graph's own scopes and stages (a phase has its own)
            d = b.graph_data[graphs_by_combo[combo_key(options)][name]]
            d.setdefault("report_scopes", {})[name] = list(model.scopes(mode, variants))
            d.setdefault("roofline_stages", {})[name] = list(model.roofline_stages(mode, variants))
        fixed[combo_key(options)] = model.sequence_fixed(variants)
    modes = {}
    for name, mode in model.modes.items():
        modes[name] = {
            "name": name,
            "note": getattr(mode, "note", ""),
            "values": {s.name: int(v) for s, v in model.mode_values(mode).items()},
            "scopes": list(model.scopes(mode)),
            "roofline_stages": list(model.roofline_stages(mode)),
            "rule": rule.data.get(name, {}),
            "exprs": {k: b.exact.add(e) if e != 0 else -1 for k, e in rule.exprs.get(name, {}).items()},
        }
    form_index, form_texts = closed_forms(model, model.variants(**chosen), progress)
    data = {
        "model": {"name": model.name, "title": model.title, "label": model.label or model.name,
                  "generates": model.generates, "max_positions": model.max_positions,
                  "default_mode": model.default_mode, "has_layout": rule.kernel is not None,
                  "max_num": list(rule.max_num) if rule.max_num else None},
        "modes": modes,
        "composites": {k: list(v) for k, v in model.composites.items()},
        "report_parts": {k: list(v) for k, v in model.report_parts.items()},
        "variant_options": [{"name": o.name, "choices": list(o.choices), "default": chosen[o.name], "help": o.help}
                            for o in page_options(model)],
        "graphs_by_combo": graphs_by_combo,
        "sequence_fixed": fixed,
        "graphs": b.graph_data,
        "scope_names": list(b.scope_names),
        "nodes": [[b.scope_names[s], path, kind] for (s, path, kind) in b.nodes],
        "rows": [[node, *eff, *per] for (node, eff, per) in b.rows],
        "metrics": list(METRICS),
        "sequence": model.default_sequence(),
        "dtypes": dict(STORAGE),
        "hardware": {name: {"tensor_flops": h.tensor_flops, "vector_flops": h.vector_flops,
                            "bandwidth": h.bandwidth, "memory": h.memory, "source": h.source}
                     for name, h in PRESETS.items()},
        "grids": {str(n): g for n, g in (rule.grids or {}).items()},
        "forms": form_index,
        "forms_variants": combo_key(chosen),
        "form_texts": form_texts,
    }
    code = [RUNTIME, NP_RUNTIME,
            f"const EXACT = {b.exact.js()};", f"const FLOATS = {b.floats.js()};",
            translate(rule.kernel) if rule.kernel else "",
            f"const PAGE_KERNEL = {rule.kernel.__name__ if rule.kernel else 'null'};"]
    return data, "\n".join(code)


def build_page(model, variants_options: dict | None = None, progress=None) -> str:
    """The HTML page: the template with the data and the compiled functions inlined."""
    template = resources.files("costgraph.app").joinpath("explore.html").read_text()
    data, code = page_data(model, variants_options, progress)
    payload = f"const DATA = {json.dumps(data, separators=(',', ':'))};\n{code}"
    if PLACEHOLDER not in template:
        raise RuntimeError("explore.html has no data placeholder")
    # a literal </script> inside the data would end the script element early
    return template.replace(PLACEHOLDER, payload.replace("</", "<\\/"))
