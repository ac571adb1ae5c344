"""Parameters and weight bytes of the graph against the references' own counts, part by part.

The references are built on `meta` (no storage, no init: a second or two): `DeepSeekOCRVision`
(`costgraph.verify.reference`, CLIP's unused conv patch embedding included) and the LM reference
(`costgraph.verify.lm_reference.LanguageModel`, created in the storage dtype as `build_language_model`
does, so the router stays fp32). Each count is `sum(p.numel())` over the part's parameters;
weight bytes `sum(p.numel() * p.element_size())`. The graph's side is `costgraph.params.resident`
grouped by the same parts: the first component of a node's module path (`layers.<i>` for a
decoder layer). Exact equality is the only pass.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from costgraph.dtypes import STORAGE, torch_dtype
from costgraph import params as P
from costgraph.evaluate import substitute
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import DTYPES, LM, MODES
from .compare import Comparison, Row

TORCH_DTYPES = {name: torch_dtype(name) for name in STORAGE}


def _part(path: str) -> str:
    head = path.split(".")
    return ".".join(head[:2]) if head[0] == "layers" else head[0]


def graph_parts(graph, root: str, dtype: str) -> dict[str, tuple[int, int]]:
    """(params, weight bytes) per part of the resident weights under `root` (vision or decoder)."""
    out: dict[str, list] = defaultdict(lambda: [0, 0])
    dv = model_graph.dtype_values(dtype)
    for (r, path), w in P.by_module(graph, graph.nodes(root), executed_only=False).items():
        slot = out[_part(path)]
        slot[0] += count(w.count)
        slot[1] += count(w.nbytes, dv)
    return {k: (v[0], v[1]) for k, v in out.items()}


def count(expr, values: dict | None = None) -> int:
    """A parameter count or weight bytes as an integer: the weights hold the (symbolic) SAM patch size;
    the checkpoint's is the config's (any mode's values give it)."""
    return substitute(expr, {**model_graph.mode_values(MODES["gundam"]), **(values or {})})


def _count(params) -> tuple[int, int]:
    ps = list(params)
    return sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps)


def vision_reference_parts(dtype: str) -> dict[str, tuple[int, int]]:
    from .reference import build_page_reference

    page = build_page_reference("meta", TORCH_DTYPES[dtype])
    enc = page.encoder
    return {"sam": _count(enc.sam.parameters()), "clip": _count(enc.clip.parameters()),
            "projector": _count(enc.projector.parameters()),
            "assemble": _count([page.image_newline, page.view_seperator])}


def lm_reference_parts(dtype: str, cfg=LM) -> dict[str, tuple[int, int]]:
    from .lm_reference import LanguageModel, _default_dtype

    with torch.device("meta"), _default_dtype(TORCH_DTYPES[dtype]):
        lm = LanguageModel(cfg)
    out = {"embed_tokens": _count(lm.model.embed_tokens.parameters()), "norm": _count(lm.model.norm.parameters()),
           "lm_head": _count(lm.lm_head.parameters())}
    for i, layer in enumerate(lm.model.layers):
        out[f"layers.{i}"] = _count(layer.parameters())
    named = {id(p) for m in (lm.model.embed_tokens, lm.model.norm, lm.lm_head, *lm.model.layers) for p in m.parameters()}
    left = [n for n, p in lm.named_parameters() if id(p) not in named]
    if left:
        raise RuntimeError(f"LM reference parameters outside the compared parts: {left}")
    return out


REFERENCE_NAMES = {"sam": "encoder.sam", "clip": "encoder.clip (patch_embedding included)",
                   "projector": "encoder.projector", "assemble": "image_newline + view_seperator",
                   "embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def compare_params(crop_mode: bool = True, dtype: str = "bf16", lm: bool = True) -> Comparison:
    """Rows per part (params and weight bytes at `dtype`), subtotals per root and the checkpoint."""
    import time

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    t0 = time.perf_counter()
    graph = model_graph.model_graph(crop_mode)
    roots = [("vision", vision_reference_parts(dtype))] + ([("decoder", lm_reference_parts(dtype))] if lm else [])
    rows, subtotals = [], []
    total_pred = total_ref = 0
    for root, ref in roots:
        pred = graph_parts(graph, root, dtype)
        for part in sorted(set(pred) | set(ref), key=lambda k: (k.split(".")[0], int(k.split(".")[1])
                                                                 if k.startswith("layers.") else 0)):
            p, r = pred.get(part, (0, 0)), ref.get(part, (0, 0))
            name = REFERENCE_NAMES.get(part, f"model.{part}")
            rows.append(Row(f"{root}.{part}", "params", p[0], r[0], name))
            rows.append(Row(f"{root}.{part}", f"weight_bytes[{dtype}]", p[1], r[1], name))
        res = P.resident(graph, root)
        ref_total = sum(v[0] for v in ref.values())
        subtotals.append(Row(root, "params", count(res.params), ref_total, f"resident: the {root} checkpoint"))
        subtotals.append(Row(root, f"weight_bytes[{dtype}]", count(res.weight_bytes, model_graph.dtype_values(dtype)),
                             sum(v[1] for v in ref.values()), "resident"))
        total_pred += count(res.params)
        total_ref += ref_total
    if lm:
        subtotals.insert(0, Row("checkpoint", "params", total_pred, total_ref, "vision + decoder references"))
    unexec = P.unexecuted(graph)
    info = {"device": "meta", "dtype": dtype, "seconds": round(time.perf_counter() - t0, 3), "unexecuted": {k: count(v) for k, v in unexec.items()},
            "executed": {r: count(P.executed(graph, r).params) for r, _ in roots}}
    if lm:
        info["active_per_token"] = count(P.executed(graph, "decoder").active)
    return Comparison(f"parameters ({dtype})", rows, subtotals, [], [], info)
