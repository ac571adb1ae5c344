"""Profiling the reference: FlopCounterMode counts, attributed per module, per torch call and per aten op.

`FlopCounterMode` alone keys its counts by module and aten op. That cannot tell apart two
`aten.bmm` in the same module (SAM's rel-pos einsums and SDPA's math path both run inside
`attn`, not in child modules). `OpCounter` adds two things to every counted op:

- the innermost module running (from the counter's own `ModuleTracker`: module names are
  prefix-extended, so the longest active name is the innermost), and
- the outermost `torch` call it came from (a `TorchFunctionMode` sees `F.linear`,
  `torch.einsum`, `F.scaled_dot_product_attention`...; torch disables a function mode
  while its handler runs, so nested calls inside one of those are attributed to it).
  An einsum is tagged with its equation, which tells SAM's two rel-pos einsums apart.

It also closes a blind spot: on real CPU tensors SDPA runs the fused
`aten._scaled_dot_product_flash_attention_for_cpu`, which torch has no formula for (it would
count 0); `EXTRA_FORMULAS` adds one. Ops that run without a formula are recorded, so the
comparison can fail on a compute op the counter cannot see.
"""
from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from costgraph.graph import within
from .reference import build_deep_encoder

aten = torch.ops.aten


def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU fused SDPA: q k^T and p v, like torch's formulas for the CUDA kernels.

    A float `attn_mask` (SAM's rel-pos bias) is an elementwise add: not counted, as on the
    math path. Causal masking is not discounted (torch's convention for every SDPA kernel).
    """
    return sdpa_flop_count(query_shape, key_shape, value_shape)


EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flop}

# Ops that do matmul-class work: one of these running without a formula is a blind spot.
COMPUTE_OP = re.compile(r"aten\.(\w*mm\w*|matmul|linear|einsum|\w*conv\w*|\w*attention\w*|\w*mkldnn\w*)")

Key = tuple[str, str, str, str]  # (scope, module path, torch call, aten op)


class _CallTags(TorchFunctionMode):
    """The outermost torch call running now (empty outside any)."""

    def __init__(self):
        super().__init__()
        self.tag = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer = self.tag
        self.tag = call_tag(func, args)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.tag = outer


def call_tag(func, args) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "einsum" and args and isinstance(args[0], str):
        return f"einsum:{args[0].replace(' ', '')}"
    return name


class Sections:
    """What runs now, for a dispatch mode to attribute its ops: a label set by the runner's
    `section(...)` (the view batch, prefill, a decode step) and the outermost torch call (`_tags`)."""
    scope: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tags = _CallTags()

    def __enter__(self):
        self._tags.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._tags.__exit__(*exc)

    @contextlib.contextmanager
    def section(self, scope: str):
        outer, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = outer


class OpCounter(Sections, FlopCounterMode):
    """FlopCounterMode that also records (scope, innermost module, torch call, aten op) -> FLOPs.

    `scope` is a label the runner sets with `section(...)` (the view batch being run).
    Module paths are relative to the outermost module run under the counter.
    """

    def __init__(self):
        super().__init__(display=False, custom_mapping=EXTRA_FORMULAS)
        self.records: dict[Key, int] = defaultdict(int)
        self.uncounted: dict[Key, int] = defaultdict(int)  # calls of ops with no formula

    def __enter__(self):
        self.records.clear()
        self.uncounted.clear()
        return super().__enter__()

    def _key(self, func_packet) -> Key:
        return (self.scope, _innermost(self.mod_tracker.parents), self._tags.tag, str(func_packet))

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.records[self._key(func_packet)] += n
        else:
            self.uncounted[self._key(func_packet)] += 1
        return super()._count_flops(func_packet, out, args, kwargs)


def _innermost(parents) -> str:
    names = [p for p in parents if p != "Global"]
    if not names:
        return "<global>"
    name = max(names, key=len)  # fqns extend their parent's: the longest is the innermost
    return name.partition(".")[2]  # relative to the root module ("" for the root itself)


@dataclass
class Measured:
    """Counted FLOPs of one page run, keyed by (scope, module, torch call, aten op)."""
    records: dict[Key, int] = field(default_factory=dict)
    uncounted: dict[Key, int] = field(default_factory=dict)

    def total(self, scope: str | None = None) -> int:
        return sum(n for k, n in self.records.items() if scope is None or within(k[0], scope))

    def blind_spots(self) -> list[Key]:
        """Compute ops that ran without a FLOP formula (they would count 0)."""
        return sorted(k for k in self.uncounted if COMPUTE_OP.fullmatch(k[3]))


# ---- the simple counts the graph tests use ---------------------------------------------------

@lru_cache(maxsize=2)
def meta_encoder():
    return build_deep_encoder("meta")


def count_views(side: int, batch: int, model=None) -> FlopCounterMode:
    """One forward of `batch` square views of `side` through the encoder, counted on `meta`."""
    model = model or meta_encoder()
    x = torch.empty(batch, 3, side, side, device="meta")
    with OpCounter() as fc, torch.no_grad():
        model(x)
    return fc
