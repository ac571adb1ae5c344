"""Measured activation memory: live bytes of op outputs over a real run, and their peak per section.

`LiveBytes` is a `TorchDispatchMode`. Every aten op's outputs that own new storage (not a view
or an in-place result of an argument) are added to the live total when the op returns; a
`weakref.finalize` on the storage (torch keeps one Python object per storage for its whole
life) subtracts them when the last tensor using that storage is gone. Tensors made before the
run (weights, the input pixels, the KV cache of earlier steps) are never op outputs here, so
they are not counted: the same definition as the graph's liveness pass
(`costgraph.liveness`), which excludes inputs and weights.

What it cannot see, and why the measured peak differs from the predicted one:
- scratch memory inside one aten op (the CPU flash-attention kernel's blocks, oneDNN
  reorders) is allocated and freed within the op: neither side counts it;
- storage is freed when Python drops the last reference, not at the tensor's last use: a
  module that keeps `residual = x` or a tuple of outputs holds tensors past their last
  consumer (the graph frees at the last consumer), so measured >= predicted is expected;
- allocator rounding is not counted (bytes are `storage.nbytes()`).

`section(label)` scopes a part of the run; each section records the live bytes when it began
and the most it reached, so its own peak is `peak - start` (what the section added on top of
what was already live, e.g. the crop batch's features while the global view runs).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from costgraph.dtypes import STORAGE, torch_dtype
from costgraph import stages
from costgraph.graphs.deepseek_ocr import MODEL


@dataclass
class Section:
    label: str
    start: int = 0          # live bytes when the section began
    peak: int = 0           # the most live bytes during the section
    peak_op: str = ""       # the aten op that returned at the peak

    @property
    def own_peak(self) -> int:
        return self.peak - self.start

    def as_dict(self) -> dict:
        return {"label": self.label, "start_bytes": self.start, "peak_bytes": self.peak,
                "own_peak_bytes": self.own_peak, "peak_op": self.peak_op}


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Live bytes of op outputs during a run; `.peak` overall, `.sections[label]` per section."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.sections: dict[str, Section] = {}
        self._open: list[Section] = []
        self.ops = 0

    def _free(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def open(self, label: str) -> Section:
        s = self.sections.setdefault(label, Section(label))
        s.start, s.peak = self.current, self.current
        self._open.append(s)
        return s

    def close(self, label: str) -> None:
        self._open.remove(self.sections[label])

    @contextlib.contextmanager
    def section(self, label: str):
        s = self.open(label)
        try:
            yield s
        finally:
            self.close(label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        seen = {id(t.untyped_storage()) for t in _tensors((args, kwargs)) if t.device.type != "meta"}
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in seen or key in self.live:
                continue  # a view or in-place result of an argument, or already counted
            nbytes = st.nbytes()
            self.live[key] = nbytes
            self.current += nbytes
            weakref.finalize(st, self._free, key, nbytes)
            seen.add(key)
        if self.current > self.peak:
            self.peak = self.current
        for s in self._open:
            if self.current > s.peak:
                s.peak, s.peak_op = self.current, func.overloadpacket.__name__
        return out


# ---- the references, run with sections ------------------------------------------------------------

def measure_vision(views, model) -> LiveBytes:
    """The page reference on `views` (real tensors) with one section per view batch and the assembly."""
    rec = LiveBytes()

    def encode(scope, page, x):
        with rec.section(scope):
            return page.encoder(x)

    with torch.no_grad(), rec, rec.section("vision"):
        out = model(views.global_view, views.crops, views.grid, encode=encode)
        del out
    return rec


def measure_lm(model, prompt_tokens: int, image_slots: int, decode_steps: int, lm_head: str = "all",
               image_features=None, seed: int = 0) -> LiveBytes:
    """The LM reference's greedy generation (`costgraph.verify.lm_profile.run_reference`: prefill, then
    `decode_steps` forwards of one token), one section per forward: `decoder.prefill`,
    `decoder.decode[t=k]`. Sections open and close with the model's forward (hooks), so the
    logits of a forward count in its section. The KV cache of earlier steps is live when a
    decode step begins: its own peak (`peak - start`) leaves it out.
    """
    from .lm_profile import run_reference

    rec = LiveBytes()
    labels = []

    def pre(module, args, kwargs):
        labels.append("decoder.prefill" if not labels else f"decoder.decode[t={len(labels)}]")
        rec.open(labels[-1])

    def post(module, args, kwargs, out):
        rec.close(labels[-1])

    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
             model.register_forward_hook(post, with_kwargs=True)]
    try:
        with rec:
            run_reference(model, prompt_tokens, image_slots, decode_steps, lm_head, image_features, seed)
    finally:
        for h in hooks:
            h.remove()
    return rec


# ---- predicted (costgraph.liveness) against measured ---------------------------------------------

@dataclass
class PeakRow:
    stage: str
    predicted: int        # bytes: the graph's liveness pass
    measured: int         # bytes: the section's own peak in the run
    node: str = ""        # the graph node running at the predicted peak
    op: str = ""          # the aten op that returned at the measured peak

    @property
    def ratio(self) -> float | None:
        return self.measured / self.predicted if self.predicted else None

    def as_dict(self) -> dict:
        return {"stage": self.stage, "predicted_bytes": self.predicted, "measured_bytes": self.measured,
                "ratio": None if self.ratio is None else round(self.ratio, 4), "predicted_at": self.node,
                "measured_at_op": self.op}


def _predicted(mode, stage: str, values: dict, variants=None) -> dict:
    p = stages.stage_peak(MODEL, mode, stage, variants)
    names = {(k.name if hasattr(k, "name") else k): v for k, v in values.items()}
    return p.at({k: names[k] for k in p.args})


DTYPE_NAMES = {torch_dtype(name): name for name in STORAGE}


def vision_peaks(views, model=None) -> list[PeakRow]:
    """Peak per view batch of the page reference on CPU (its dtype: the weights') against the graph."""
    from costgraph.graphs.deepseek_ocr import assembly as model_graph
    from .reference import build_page_reference

    model = build_page_reference("cpu") if model is None else model
    dtype = DTYPE_NAMES[next(model.parameters()).dtype]
    rec = measure_vision(views, model)
    values = {**model_graph.mode_values(views.mode), **model_graph.layout_values(views.layout),
              **model_graph.dtype_values(dtype)}
    rows = []
    for stage in ("vision.crops", "vision.global"):
        if stage not in rec.sections:
            continue
        pred = _predicted(views.mode, stage, values)
        s = rec.sections[stage]
        rows.append(PeakRow(stage, pred["bytes"], s.own_peak, pred["node"], s.peak_op))
    return rows


def lm_peaks(mode, layout, text_tokens: int, decode_steps: int, variants, model=None, dtype: str = "bf16",
             image_features=None) -> list[PeakRow]:
    """Peaks of the prefill and of each decode step of the LM reference (CPU) against the graph."""
    from costgraph import symbols as S
    from costgraph.graphs.deepseek_ocr import assembly as model_graph
    from costgraph.graphs.deepseek_ocr.layout import tokens_for
    from .lm_reference import build_language_model

    if model is None:
        model = build_language_model(dtype=torch_dtype(dtype),
                                     attention="eager", rope=variants.rope)
    slots = tokens_for(layout, mode)["total"]
    rec = measure_lm(model, 1 + text_tokens + slots, slots, decode_steps, variants.lm_head, image_features)
    values = {**model_graph.mode_values(mode), **model_graph.layout_values(layout),
              **model_graph.dtype_values(dtype), S.text_tokens: text_tokens}
    rows = []
    for label, s in rec.sections.items():
        t = None if label == "decoder.prefill" else int(label[:-1].split("=")[1])
        stage = "decoder.prefill" if t is None else "decoder.decode"
        pred = _predicted(mode, stage, {**values, **({S.decode_step: t} if t else {})}, variants)
        rows.append(PeakRow(label, pred["bytes"], s.own_peak, pred["node"], s.peak_op))
    return rows
