"""A dispatch-level recorder: every aten op of a real run, with the metrics of
`costgraph.conventions` (elementwise FLOPs, bytes read and written), attributed like
`costgraph.verify.profile.OpCounter` to (section, innermost module, outermost torch call).

Run a reference under `MetricRecorder()`; `calls` keeps every op in order, so a graph node
can claim the k-th call of a kind inside a module when one module runs several alike.
`python -m costgraph.verify.trace` prints the trace of a small vision view or LM forward, module by
module: the material the graph's formulas are written from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.module_tracker import ModuleTracker

from costgraph import conventions as C
from .profile import Sections, _innermost

aten = torch.ops.aten
FUSED_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu.default}
# ops whose conventions count per "source" element: the argument that is (index_add_'s source, the
# loss's targets: one per row)
SOURCE_ARG = {"index_add_": 3, "scatter_add_": 3, "nll_loss_forward": 1, "nll_loss_backward": 2}


@dataclass(frozen=True)
class Call:
    section: str
    module: str
    call: str
    op: str
    elementwise_flops: int
    bytes_read: int
    bytes_written: int
    out_shapes: tuple
    in_shapes: tuple


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view reaches (stride-0 dims count once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _is_alias(func) -> bool:
    if func.is_view or func.overloadpacket.__name__ in C.ALIASING:
        return True
    return False


def _written_args(func, args, kwargs) -> list[torch.Tensor]:
    """Arguments an op mutates (in-place and out= ops)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = kwargs.get(a.name) if a.kwarg_only or a.name in kwargs else (args[i] if i < len(args) else None)
            out += _tensors(v)
    return out


def op_metrics(func, args, kwargs, out, strict: bool = True) -> tuple[int | None, int, int]:
    """(elementwise FLOPs, bytes read, bytes written) of one aten op under the conventions
    (a gather reads its indices and the elements it takes: `conventions.gather_bytes_read`).
    An op with no elementwise convention raises, or with `strict=False` gives None FLOPs."""
    name = func.overloadpacket.__name__
    if _is_alias(func):
        return 0, 0, 0
    written = _written_args(func, args, kwargs)
    ins = [t for t in _tensors((args, kwargs)) if not any(t is w for w in written)]
    outs = written or _tensors(out)
    if name in C.GATHERS:
        # the source is the first argument; every other tensor argument is an index (a bool mask included)
        source, index = args[0], [t for t in ins if t is not args[0]]
        read = C.gather_bytes_read(sum(footprint(t) for t in index), sum(t.numel() for t in outs),
                                   source.element_size())
    else:
        read = sum(footprint(t) for t in ins)
    wrote = sum(footprint(t) for t in outs)
    if func in FUSED_SDPA:
        q, k = args[0], args[1]
        scores = q.numel() // q.shape[-1] * k.shape[-2]
        has_mask = kwargs.get("attn_mask") is not None or (len(args) > 5 and args[5] is not None)
        return scores * (C.SDPA_SCALE + C.SDPA_MASK * has_mask + C.SDPA_SOFTMAX), read, wrote
    first_in = next((t.numel() for t in _tensors(args)), 0)
    at = SOURCE_ARG.get(name)
    source = kwargs.get("source", args[at] if at is not None and len(args) > at else None)
    if name in ("index_put", "index_put_") and kwargs.get("accumulate", len(args) > 3 and args[3]):
        name, source = "index_put_acc", args[2]   # accumulate: one add per value element
    try:
        ew = C.elementwise_flops(name, sum(t.numel() for t in outs[:1]), first_in,
                                 source.numel() if isinstance(source, torch.Tensor) else 0)
    except KeyError:
        if strict:
            raise
        ew = None
    return ew, read, wrote


class MetricRecorder(Sections, TorchDispatchMode):
    """Records every aten op of a run with its metrics; `section(label)` tags what runs now."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []
        self._modules = ModuleTracker()

    def __enter__(self):
        self.calls.clear()
        self._modules.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._modules.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ew, read, wrote = op_metrics(func, args, kwargs, out)
        self.calls.append(Call(
            self.scope, _innermost(self._modules.parents), self._tags.tag, func.overloadpacket.__name__,
            ew, read, wrote, tuple(tuple(t.shape) for t in _tensors(out)),
            tuple(tuple(t.shape) for t in _tensors((args, kwargs)))))
        return out

    def totals(self, section: str | None = None) -> dict[str, int]:
        sel = [c for c in self.calls if section is None or c.section == section or c.section.startswith(section + ".")]
        return {"elementwise_flops": sum(c.elementwise_flops for c in sel),
                "bytes_read": sum(c.bytes_read for c in sel), "bytes_written": sum(c.bytes_written for c in sel)}

    def by_module(self) -> dict[tuple[str, str], dict[str, int]]:
        """Exclusive totals per (section, innermost module)."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for c in self.calls:
            slot = out.setdefault((c.section, c.module), {"elementwise_flops": 0, "bytes_read": 0, "bytes_written": 0})
            slot["elementwise_flops"] += c.elementwise_flops
            slot["bytes_read"] += c.bytes_read
            slot["bytes_written"] += c.bytes_written
        return out


def print_trace(calls: list[Call], module_filter: str = "") -> None:
    for c in calls:
        if module_filter and module_filter not in c.module:
            continue
        if c.elementwise_flops or c.bytes_read or c.bytes_written:
            print(f"{c.section:14} {c.module:45} {c.call:28} {c.op:32} ew={c.elementwise_flops:<10} "
                  f"r={c.bytes_read:<10} w={c.bytes_written:<10} in={c.in_shapes} out={c.out_shapes}")
