"""Op formulas: small pure functions from symbolic shapes to (output shape, Cost).

In the style of `torch.utils.flop_counter`: one function per op kind, registered by
name, taking only shapes and the op's static attributes. Because they never look at
data, the same functions give exact integers for concrete shapes and sympy
expressions for symbolic ones.
"""
from __future__ import annotations

from typing import Callable, Sequence

import sympy as sp

from .cost import Cost

from . import symbols as S


class Spec(tuple):
    """A symbolic shape that also knows its element size in bytes.

    It is a tuple, so formulas index and unpack it like a shape; `itemsize` is what bytes
    formulas read (the storage dtype `dtype_bytes` unless the graph says otherwise: fp32
    router logits, int64 indices, ...).
    """
    itemsize: sp.Expr

    def __new__(cls, shape, itemsize=S.dtype_bytes):
        obj = super().__new__(cls, tuple(shape))
        obj.itemsize = sp.sympify(itemsize)
        return obj


Shape = tuple  # of sympy expressions (or ints); op formulas receive `Spec`s


def itemsize(x) -> sp.Expr:
    return getattr(x, "itemsize", S.dtype_bytes)


def numel(x) -> sp.Expr:
    return prod(x)


def nbytes(x) -> sp.Expr:
    """Bytes of a tensor of this spec (its footprint: a broadcast input is given by its own shape)."""
    return prod(x) * itemsize(x)
OpFormula = Callable[..., tuple[Shape, Cost]]
OPS: dict[str, OpFormula] = {}


def register(*kinds: str):
    def deco(fn: OpFormula) -> OpFormula:
        for k in kinds:
            OPS[k] = fn
        return fn
    return deco


def prod(xs) -> sp.Expr:
    return sp.Mul(*[sp.sympify(x) for x in xs])


def ceil_div(x, s) -> sp.Expr:
    """ceil(x / s); folds ceil(ceil(q)/s) into ceil(q/s), exact for any real q and integer s > 0."""
    x, s = sp.sympify(x), sp.sympify(s)
    if isinstance(x, sp.ceiling):
        return sp.ceiling(x.args[0] / s)
    return sp.ceiling(x / s)


def _same(a, b) -> None:
    if sp.sympify(a) != sp.sympify(b):
        raise ValueError(f"shape mismatch: {a} vs {b}")


def conv_out_side(side, kernel, stride, padding) -> sp.Expr:
    side = sp.sympify(side)
    if padding == 0 and stride == kernel:
        # patchify: floor((n - k) / k) + 1 == floor(n / k)
        return sp.floor(side / stride)
    if 2 * padding == kernel - 1:
        # "same"-padded: floor((n - 1) / s) + 1 == ceil(n / s) for integer n >= 1.
        return ceil_div(side, stride)
    return sp.floor((side + 2 * padding - kernel) / sp.sympify(stride)) + 1


# ---- matmul-class ops (the `flops` metric) ---------------------------------------

@register("linear")
def linear(x: Shape, *, in_features, out_features, bias: bool = True) -> tuple[Shape, Cost]:
    # torch counts addmm/mm as 2*M*K*N; the bias add is not counted.
    _same(x[-1], in_features)
    tokens = prod(x[:-1])
    return (*x[:-1], out_features), Cost(flops=2 * tokens * in_features * out_features)


@register("conv2d")
def conv2d(x: Shape, *, in_channels, out_channels, kernel, stride=1, padding=0, bias: bool = True):
    b, c, h, w = x
    _same(c, in_channels)
    ho = conv_out_side(h, kernel, stride, padding)
    wo = conv_out_side(w, kernel, stride, padding)
    flops = 2 * prod((b, out_channels, ho, wo)) * in_channels * sp.sympify(kernel) ** 2
    return (b, out_channels, ho, wo), Cost(flops=flops)


@register("bmm", "matmul")
def matmul(a: Shape, b: Shape):
    *batch, n, k = a
    k2, m = b[-2:]
    _same(k, k2)
    return (*batch, n, m), Cost(flops=2 * prod(batch) * n * k * m)


@register("einsum")
def einsum(*operands: Shape, equation: str):
    # Two-operand contraction, as torch lowers it to bmm: 2 x the product of all index sizes.
    lhs, out = equation.replace(" ", "").split("->")
    sizes: dict[str, sp.Expr] = {}
    for spec, shape in zip(lhs.split(","), operands):
        assert len(spec) == len(shape), (spec, shape)
        for ch, n in zip(spec, shape):
            sizes.setdefault(ch, sp.sympify(n))
    return tuple(sizes[ch] for ch in out), Cost(flops=2 * prod(sizes.values()))


@register("sdpa")
def sdpa(q: Shape, k: Shape, v: Shape, mask: Shape | None = None, *, causal: str = "full"):
    """Scaled dot-product attention: scores q k^T and probabilities x values.

    causal="full": every score is computed (eager attention, SDPA's math path, a float mask);
    causal="flash": only the unmasked lower triangle (a causal flash kernel);
    causal="none": nothing counted (a profiler blind to the kernel).
    """
    *batch, lq, e = q
    lk, ev = k[-2], v[-1]
    if causal == "full":
        pairs = lq * lk
    elif causal == "flash":
        # query i (of lq, aligned to the end of lk) sees lk - lq + i + 1 keys.
        pairs = lq * lk - lq * (lq - 1) / 2
    elif causal == "none":
        pairs = 0
    else:
        raise ValueError(f"unknown attention variant {causal!r}")
    flops = 2 * prod(batch) * pairs * (e + ev)
    return (*batch, lq, ev), Cost(flops=sp.expand(flops))


# ---- shape-only ops: no matmul FLOPs (elementwise work is a later metric) ---------

@register("layer_norm", "rms_norm", "gelu", "quick_gelu", "silu", "softmax", "add", "mul",
          "interpolate", "cast", "identity")
def elementwise(x: Shape, *others: Shape, **attrs):
    return tuple(x), Cost()


@register("input")
def input_(*, shape: Shape):
    return tuple(shape), Cost()


@register("reshape", "pad", "window_partition", "window_unpartition", "slice", "flatten")
def reshape(x: Shape, *, shape: Shape):
    return tuple(shape), Cost()


@register("cat")
def cat(*xs: Shape, dim: int):
    out = list(xs[0])
    out[dim] = sp.Add(*[x[dim] for x in xs])
    return tuple(out), Cost()


def apply(kind: str, inputs: Sequence[Shape], attrs: dict) -> tuple[Shape, Cost]:
    """Run a formula. Inputs are `Spec`s (plain shapes get the storage itemsize)."""
    try:
        fn = OPS[kind]
    except KeyError:
        raise ValueError(f"no formula registered for op kind {kind!r}") from None
    specs = [x if isinstance(x, Spec) else Spec(x) for x in inputs]
    return fn(*specs, **attrs)
