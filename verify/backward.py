"""Attributing backward ops to the module whose forward created them, and counting a training step.

torch's own attribution in backward (`ModuleTracker` / FlopCounterMode's module tracker) follows
gradient hooks on module inputs and outputs: an op runs "inside" a module from the first
gradient reaching the module's outputs to the last leaving its inputs, so ops of modules that
interleave in backward (a residual branch, a parameter-free op between two modules, the
gradient of a tensor used twice) land in the wrong module. Here the attribution is by the
autograd graph itself, exactly:

1. Forward. `Attribution` is a `TorchFunctionMode` (it sees every outermost torch call:
   `F.linear`, `torch.matmul`, `Tensor.__getitem__`, ...; torch disables a function mode while
   its handler runs, so the calls nested inside one are part of it) with a stack of the module
   forwards running (global forward pre/post hooks; paths relative to the root module). Each call gets a `Tag`: (section, module, call,
   occurrence = how many calls of that name ran before in that module and section). After the
   call returns, the autograd nodes it created are tagged: a walk from its outputs' `grad_fn`
   through `next_functions`, stopping at nodes already tagged (a node made by an earlier call
   cannot depend on one made by a later call, so every node the call made is reached, and no
   older one is re-tagged). `AccumulateGrad` nodes (a parameter's gradient store) take the tag
   of the first call that uses the parameter. The nodes are kept (so their Python objects, and
   identities, live on).
2. Backward. The autograd engine records which node it is evaluating
   (`torch._C._current_autograd_node()`, the engine's thread-local `NodeGuard`; CPU and meta
   backward run in the calling thread): every aten op dispatched while node N runs belongs to
   N's tag. The engine also sums the gradients of a tensor used several times (its InputBuffer
   adds) while evaluating the consumer whose gradient arrives second, after that node's
   post-hooks: a post-hook on every tagged node marks what follows as `accumulate`; the
   gradient being summed belongs to the forward tensor's producer, found exactly by counting,
   per (producer node, input slot), the gradients already delivered (the producer's tag is
   kept in `Where.producer`). The first gradient (`ones_like(loss)`, made by `backward()` before
   any node runs) is `seed`. Module forwards that run during backward (checkpoint recompute)
   are tagged as in forward, phase `recompute`.

`counting()` counts FLOPs (`StepFlops`: FlopCounterMode's formulas, plus the CPU flash-attention
forward and backward) and, with `metrics`, elementwise FLOPs and bytes (`StepMetrics`:
`costgraph.verify.dispatch.op_metrics`) per aten op, each op with its `Where`. `VendorSdpaOnMeta` makes `meta` runs take
the fused SDPA kernel the vendor runs (meta tensors always take SDPA's math path: 4 bmm in
backward where a fused kernel's backward counts 5 by torch's formula, which recomputes the
scores): the CPU flash kernel, or, when the mask needs a gradient (SAM's rel-pos bias under
`--train full`), the memory-efficient kernel the vendor's GPU runs, which also returns the
mask's gradient (no FLOPs beyond torch's `sdpa_backward_flop_count`: it is the score gradient).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from .dispatch import op_metrics
from .profile import EXTRA_FORMULAS, call_tag

aten = torch.ops.aten
FORWARD, BACKWARD, RECOMPUTE = "forward", "backward", "recompute"
OP, ACCUMULATE, SEED = "op", "accumulate", "seed"


def _cpu_flash_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    """CPU fused SDPA backward: torch's formula for the fused kernels' backward (it recomputes the
    scores: 5 matmuls of the forward's size, 2.5x the forward)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FORMULAS = {**EXTRA_FORMULAS, aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_sdpa_backward_flop}


@dataclass(frozen=True)
class Tag:
    section: str       # the forward section ("decoder", "vision.global", ...)
    module: str        # innermost module path, relative to the root module run
    call: str          # outermost torch call
    occurrence: int    # index among the calls of that name in that module and section


@dataclass(frozen=True)
class Where:
    phase: str                 # forward | backward | recompute
    tag: Tag
    kind: str = OP             # op | accumulate (a gradient sum) | seed (the first gradient)
    producer: Tag | None = None  # accumulate: the forward call whose output's gradients are summed

    @property
    def section(self) -> str:
        return self.tag.section if self.phase == FORWARD else f"{self.phase}.{self.tag.section}"


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


_SEED_TAG = Tag("", "<loss>", "backward", 0)


class Attribution(TorchFunctionMode):
    """Tags forward calls and the autograd nodes they create; answers `where()` for any op."""

    def __init__(self):
        super().__init__()
        self.section = ""
        self.tags: dict = {}                   # autograd node -> Tag
        self._count: dict[tuple, int] = defaultdict(int)
        self._current: Tag | None = None
        self._backward = False
        self._stack: list = []                 # modules whose forward is running, outermost first
        self._names: dict = {}                 # module -> path relative to the root module
        self._hooks: list = []
        self._after: object = None             # the node whose post-hook ran last
        self._delivered: dict[tuple, int] = defaultdict(int)   # (producer node id, input slot) -> gradients
        self._pending: list[Tag] = []          # producers of the gradient sums still to run

    # -- context --------------------------------------------------------------------------
    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._hooks = [register_module_forward_pre_hook(self._enter_module),
                       register_module_forward_hook(self._leave_module, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self._hooks:
                h.remove()

    def _enter_module(self, module, args):
        if module not in self._names:   # a new root: name its whole tree relative to it
            if self._stack:
                raise RuntimeError(f"module {type(module).__name__} runs inside a module tree that does not hold it")
            self._names = {m: n for n, m in module.named_modules(remove_duplicate=False)}
        self._stack.append(module)

    def _leave_module(self, module, args, out):
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    @contextlib.contextmanager
    def in_section(self, label: str):
        outer, self.section = self.section, label
        try:
            yield
        finally:
            self.section = outer

    @contextlib.contextmanager
    def backward(self):
        """Wrap `loss.backward()` (or `tensor.backward(grad)`)."""
        self._backward = True
        try:
            yield
        finally:
            self._backward = False
            self._after, self._pending = None, []

    # -- forward: tagging -----------------------------------------------------------------------
    def module(self) -> str:
        """The innermost module running ("" for the root, "<global>" outside every module)."""
        return self._names.get(self._stack[-1], "?") if self._stack else "<global>"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = call_tag(func, args)
        if name == "__get__" or (self._backward and not self._stack):
            # attribute reads (shape, grad_fn): no op of their own; Python code of a custom
            # backward (no module forward running): its ops belong to the node being evaluated
            return func(*args, **kwargs)
        phase = RECOMPUTE if self._backward else FORWARD
        module = self.module()
        key = (phase, self.section, module, name)
        tag = Tag(self.section, module, name, self._count[key])
        self._count[key] += 1
        outer, self._current = self._current, tag
        try:
            out = func(*args, **kwargs)
        finally:
            self._current = outer
        if torch.is_grad_enabled():
            self._tag_nodes(out, tag)
        return out

    def _tag_nodes(self, out, tag: Tag) -> None:
        stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in self.tags:
                continue
            self.tags[node] = tag
            node.register_hook(self._post_hook(node))
            stack.extend(f for f, _ in node.next_functions if f is not None)

    def _post_hook(self, node):
        def hook(grad_inputs, grad_outputs):
            self._after = node
            self._pending = []
            for (producer, slot), g in zip(node.next_functions, grad_inputs):
                if producer is None or g is None:
                    continue
                key = (id(producer), slot)
                if self._delivered[key]:
                    self._pending.append(self.tags.get(producer, _SEED_TAG))
                self._delivered[key] += 1
        return hook

    # -- any op: where it belongs ------------------------------------------------------------------
    def where(self, consume: bool = True) -> Where:
        """Where the op being dispatched belongs. A gradient sum's producer is handed out once:
        only one dispatch mode may `consume` it (the others ask with consume=False)."""
        if not self._backward:
            return Where(FORWARD, self._current or Tag(self.section, self.module(), "", 0))
        if self._current is not None:          # a module forward re-run inside backward (checkpoint)
            return Where(RECOMPUTE, self._current)
        node = torch._C._current_autograd_node()
        if node is None:
            return Where(BACKWARD, Tag(self.section, "<loss>", "backward", 0), SEED)
        tag = self.tags.get(node)
        if tag is None:
            tag = Tag(self.section, "<untagged>", node.name(), 0)
        if node is self._after:
            producer = (self._pending.pop(0) if consume else self._pending[0]) if self._pending else None
            return Where(BACKWARD, tag, ACCUMULATE, producer)
        return Where(BACKWARD, tag)


# ---- counting a training step ---------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    where: Where
    op: str
    flops: int = 0
    elementwise_flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def section(self) -> str:
        return self.where.section

    @property
    def module(self) -> str:
        return self.where.tag.module


class StepFlops(FlopCounterMode):
    """FlopCounterMode (its formulas and decompositions, plus the CPU flash-attention forward and
    backward) keeping every counted op with its `Where`. Ops that ran without a formula are kept
    in `uncounted` (a matmul-class one is a blind spot: the comparison fails on it)."""

    def __init__(self, attribution: Attribution):
        super().__init__(display=False, custom_mapping=FORMULAS)
        self.att = attribution
        self.ops: list[Op] = []
        self.uncounted: list[tuple[Where, str]] = []

    def _count_flops(self, func_packet, out, args, kwargs):
        where = self.att.where(consume=False)
        if func_packet in self.flop_registry:
            self.ops.append(Op(where, func_packet.__name__, int(self.flop_registry[func_packet](
                *args, **kwargs, out_val=out))))
        else:
            self.uncounted.append((where, str(func_packet)))
        return out


class StepMetrics(TorchDispatchMode):
    """Every aten op with elementwise FLOPs and bytes (`costgraph.verify.dispatch.op_metrics`) and its `Where`."""

    def __init__(self, attribution: Attribution):
        super().__init__()
        self.att = attribution
        self.ops: list[Op] = []
        self.no_convention: dict[str, int] = defaultdict(int)   # aten op -> calls (elementwise FLOPs unknown)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ew, r, w = op_metrics(func, args, kwargs, out, strict=False)
        if ew is None:
            self.no_convention[func.overloadpacket.__name__] += 1
            ew = 0
        self.ops.append(Op(self.att.where(), func.overloadpacket.__name__, 0, ew, r, w))
        return out


@dataclass
class Step:
    """What a counted training step ran: FLOP-counted ops, and (with metrics) every aten op."""
    flops: list[Op]
    uncounted: list[tuple[Where, str]]
    ops: list[Op]
    no_convention: dict[str, int] = field(default_factory=dict)   # ops the elementwise conventions lack


@contextlib.contextmanager
def counting(metrics: bool = False, fused_sdpa_on_meta: bool = True):
    """`with counting() as (att, step):` run the forward under `att.in_section(...)` and the backward
    under `att.backward()`; `step` holds the ops when the block ends."""
    att = Attribution()
    fl = StepFlops(att)
    rec = StepMetrics(att) if metrics else contextlib.nullcontext()
    sdpa = VendorSdpaOnMeta() if fused_sdpa_on_meta else contextlib.nullcontext()
    step = Step([], [], [])
    with sdpa, att, fl, rec:   # att above sdpa: it tags the caller's F.scaled_dot_product_attention
        yield att, step
    step.flops, step.uncounted = fl.ops, fl.uncounted
    if metrics:
        step.ops, step.no_convention = rec.ops, dict(rec.no_convention)


# ---- meta runs take the vendor's SDPA kernel ---------------------------------------------------

class VendorSdpaOnMeta(TorchFunctionMode):
    """On `meta`, `F.scaled_dot_product_attention` always takes the math path (bmm, softmax, bmm;
    4 bmm in backward, 2x the forward). The vendor's GPU runs a fused kernel, whose backward
    recomputes the scores (torch's `sdpa_backward_flop_count`: 5 products of the forward's size,
    2.5x the forward). This mode makes a meta run take a fused kernel with meta kernels for
    forward and backward, which torch's counter covers with those formulas:
    - no mask gradient needed: `aten._scaled_dot_product_flash_attention_for_cpu` (what a CPU run
      takes too: the CPU flash kernel);
    - a mask that needs a gradient (SAM's rel-pos bias when SAM trains, `--train full`):
      `aten._scaled_dot_product_efficient_attention` with `compute_log_sumexp` (what the vendor's
      CUDA run takes: the flash kernel accepts no mask, the memory-efficient one does and
      returns the bias gradient). Forward: `sdpa_flop_count`; backward: `sdpa_backward_flop_count`
      (q, k, v gradients, the scores recomputed); the mask's gradient is the score gradient the
      kernel computes anyway and writes out: no FLOPs beyond the formula. A CPU run with such a
      mask still takes the math path (CPU has no memory-efficient kernel); the vision training
      reference is counted on meta, so it counts as the vendor runs.
    Dropout (none in the references) or `enable_gqa` keep torch's own path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            needs_mask_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
            if q.device.type == "meta" and not dropout and "enable_gqa" not in kwargs:
                if needs_mask_grad:
                    return aten._scaled_dot_product_efficient_attention(
                        q, k, v, mask, True, 0.0, bool(causal), scale=kwargs.get("scale"))[0]
                return aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, bool(causal), attn_mask=mask, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)
