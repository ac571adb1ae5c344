"""Op formulas: small pure functions from symbolic shapes to (output shape, Cost).

In the style of `torch.utils.flop_counter`: one function per op kind, registered by
name, taking only shapes and the op's static attributes. Because they never look at
data, the same functions give exact integers for concrete shapes and sympy
expressions for symbolic ones.

Every metric follows aten semantics, unfused (costgraph/conventions.py is the table):
- `flops`: matmul-class work (linear, conv, bmm, einsum, attention products);
- `elementwise_flops`: `FLOPS_PER_ELEMENT[aten op] x elements` from the conventions table;
- `bytes_read` / `bytes_written`: an op reads the footprint of each input tensor and of its
  weights and writes each of its outputs (auxiliary ones included: LayerNorm's mean/rstd,
  fused SDPA's fp32 logsumexp); a view or alias moves nothing; a gather (`index`) reads its
  index tensor and the rows it takes, not its whole table;
- `activation_bytes`: the bytes of the node's main output tensor (0 for a view).

Every op takes an optional `when` attribute (an indicator: 0/1, or a sympy Piecewise) that
scales the whole cost: for ops that run only under a condition (a windowed attention's padding runs
only when g % 14 != 0). Reshape-family ops take `copy` (torch materialises the result:
`.reshape` of a permuted tensor, `.contiguous()`): then they read and write its elements.
"""
from __future__ import annotations

from typing import Callable, Sequence

import sympy as sp

from . import conventions as C
from . import symbols as S
from .cost import Cost


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

from .dtypes import BYTES as DTYPE_BYTES, FLOAT32, INT64, STORAGE  # noqa: E402  (fixed element sizes)


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


def broadcast(*shapes: Shape) -> Shape:
    """torch's broadcast of shapes (right-aligned; a literal 1 stretches)."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = {sp.sympify(s[i - rank + len(s)]) for s in shapes if i - rank + len(s) >= 0}
        big = dims - {sp.Integer(1)}
        if len(big) > 1:
            raise ValueError(f"shapes do not broadcast: {shapes}")
        out.append(big.pop() if big else sp.Integer(1))
    return tuple(out)


def moved(reads=(), writes=(), extra_read=0, extra_written=0) -> dict:
    """bytes_read / bytes_written of tensors given as specs (plus bytes given directly)."""
    return {"bytes_read": sum((nbytes(x) for x in reads), sp.sympify(extra_read)),
            "bytes_written": sum((nbytes(x) for x in writes), sp.sympify(extra_written))}


def _out(shape, size) -> Spec:
    return Spec(shape, size)


def _ew(aten_op: str, out: Shape = (), inp: Shape = ()) -> sp.Expr:
    """Elementwise FLOPs of one aten op under the conventions table."""
    return sp.sympify(C.elementwise_flops(aten_op, numel(out), numel(inp)))


def _size(out_itemsize, x) -> sp.Expr:
    return itemsize(x) if out_itemsize is None else sp.sympify(out_itemsize)


# ---- matmul-class ops (the `flops` metric) ---------------------------------------

@register("linear")
def linear(x: Shape, *, in_features, out_features, bias: bool = True, weight_itemsize=None) -> tuple[Shape, Cost]:
    # torch counts addmm/mm as 2*M*K*N; the bias add is not counted (it is part of addmm).
    _same(x[-1], in_features)
    tokens = prod(x[:-1])
    w = _size(weight_itemsize, x)
    out = _out((*x[:-1], out_features), itemsize(x))
    weights = (in_features * out_features + (out_features if bias else 0)) * w
    return out, Cost(flops=2 * tokens * in_features * out_features, activation_bytes=nbytes(out),
                     **moved([x], [out], extra_read=weights))


@register("conv2d")
def conv2d(x: Shape, *, in_channels, out_channels, kernel, stride=1, padding=0, bias: bool = True,
           weight_itemsize=None):
    b, c, h, w = x
    _same(c, in_channels)
    ho = conv_out_side(h, kernel, stride, padding)
    wo = conv_out_side(w, kernel, stride, padding)
    out = _out((b, out_channels, ho, wo), itemsize(x))
    k2 = sp.sympify(kernel) ** 2
    weights = (out_channels * in_channels * k2 + (out_channels if bias else 0)) * _size(weight_itemsize, x)
    flops = 2 * prod((b, out_channels, ho, wo)) * in_channels * k2
    return out, Cost(flops=flops, activation_bytes=nbytes(out), **moved([x], [out], extra_read=weights))


@register("bmm", "matmul")
def matmul(a: Shape, b: Shape):
    *batch, n, k = a
    k2, m = b[-2:]
    _same(k, k2)
    out = _out((*batch, n, m), itemsize(a))
    return out, Cost(flops=2 * prod(batch) * n * k * m, activation_bytes=nbytes(out), **moved([a, b], [out]))


@register("einsum")
def einsum(*operands: Shape, equation: str, copies: tuple = ()):
    """Two-operand contraction, as torch lowers it to bmm: 2 x the product of all index sizes.

    `copies`: the operands (by position) torch materialises before its bmm, because their
    batch dimensions cannot be folded as a view (a relative-position einsum copies q): each is read
    and written once more, and the bmm reads the copy. An entry `(position, indicator)` copies
    only where the indicator is 1 (whether torch can fold depends on the operand's strides).
    """
    lhs, out_spec = equation.replace(" ", "").split("->")
    sizes: dict[str, sp.Expr] = {}
    for spec, shape in zip(lhs.split(","), operands):
        assert len(spec) == len(shape), (spec, shape)
        for ch, n in zip(spec, shape):
            sizes.setdefault(ch, sp.sympify(n))
    out = _out(tuple(sizes[ch] for ch in out_spec), itemsize(operands[0]))
    copy = sum((nbytes(operands[c]) if isinstance(c, int) else nbytes(operands[c[0]]) * c[1] for c in copies),
               sp.Integer(0))
    return out, Cost(flops=2 * prod(sizes.values()), activation_bytes=nbytes(out),
                     **moved(operands, [out], extra_read=copy, extra_written=copy))


def attention_flops(q: Shape, k: Shape, v: Shape, causal: str = "full") -> sp.Expr:
    """q k^T and probabilities x values (torch's convention: 2 per multiply-add).

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
    return sp.expand(2 * prod(batch) * pairs * (e + ev))


@register("sdpa")
def sdpa(q: Shape, k: Shape, v: Shape, mask: Shape | None = None, *, causal: str = "full"):
    """Scaled dot-product attention as the fused CPU flash kernel runs it.

    FLOPs: `attention_flops`. Elementwise, per score (every one of Lq x Lk, whatever the
    causal variant: the kernel's convention in conventions.py): scale, the float mask's add when
    there is one, softmax. Reads q, k, v (and the mask), writes the output and the kernel's
    fp32 logsumexp (batch x heads x Lq).
    """
    *batch, lq, _ = q
    out = _out((*batch, lq, v[-1]), itemsize(q))
    scores = prod(batch) * lq * k[-2]
    per = C.SDPA_SCALE + C.SDPA_SOFTMAX + (C.SDPA_MASK if mask is not None else 0)
    lse = _out((*batch, lq), FLOAT32)
    ins = [q, k, v] + ([mask] if mask is not None else [])
    return out, Cost(flops=attention_flops(q, k, v, causal), elementwise_flops=scores * per,
                     activation_bytes=nbytes(out), **moved(ins, [out, lse]))


# ---- normalisation and elementwise ops ---------------------------------------------------

@register("layer_norm")
def layer_norm(x: Shape, *, eps=None, out_itemsize=None, **attrs):
    """aten.native_layer_norm over the last dim: reads x, weight and bias; writes y and the
    per-row mean and rstd (kept for a backward pass; written in inference too). The CPU kernel
    writes the statistics in the input's dtype (CUDA's in fp32): the CPU one is what is measured."""
    d = x[-1]
    out = _out(tuple(x), _size(out_itemsize, x))
    stats = _out((*x[:-1], 1), itemsize(x))
    return out, Cost(elementwise_flops=_ew("native_layer_norm", out, x), activation_bytes=nbytes(out),
                     **moved([x, Spec((d,), itemsize(x)), Spec((d,), itemsize(x))], [out, stats, stats]))


# op kind -> the aten op it is (for the conventions table)
UNARY = {"gelu": "gelu", "silu": "silu", "sigmoid": "sigmoid", "sqrt": "sqrt", "rsqrt": "rsqrt", "exp": "exp",
         "pow": "pow", "neg": "neg", "tanh": "tanh"}
BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}


def _elementwise(aten_op: str, xs: Sequence[Shape], out_itemsize=None):
    out = _out(broadcast(*xs), _size(out_itemsize, xs[0]))
    return out, Cost(elementwise_flops=_ew(aten_op, out, xs[0]), activation_bytes=nbytes(out), **moved(xs, [out]))


for _kind, _aten in {**UNARY, **BINARY}.items():
    def _make(aten_op):
        def formula(*xs: Shape, out_itemsize=None, **attrs):
            """One aten elementwise op: tensor inputs broadcast (a Python scalar operand is not an
            input), 1 FLOP per output element, reads every input's footprint, writes the output."""
            return _elementwise(aten_op, xs, out_itemsize)
        return formula
    register(_kind)(_make(_aten))


@register("quick_gelu")
def quick_gelu(x: Shape, **attrs):
    """quick GELU, x * sigmoid(1.702 * x): three aten ops (mul by a scalar, sigmoid, mul)."""
    _, scaled = _elementwise("mul", [x])
    _, sig = _elementwise("sigmoid", [x])
    out, prod_ = _elementwise("mul", [x, x])
    return out, Cost(elementwise_flops=scaled.elementwise_flops + sig.elementwise_flops + prod_.elementwise_flops,
                     bytes_read=scaled.bytes_read + sig.bytes_read + prod_.bytes_read,
                     bytes_written=scaled.bytes_written + sig.bytes_written + prod_.bytes_written,
                     activation_bytes=nbytes(out))


@register("softmax")
def softmax(x: Shape, *, out_itemsize=None, **attrs):
    out = _out(tuple(x), _size(out_itemsize, x))
    return out, Cost(elementwise_flops=_ew("_softmax", out, x), activation_bytes=nbytes(out), **moved([x], [out]))


@register("mean")
def mean(x: Shape, *, dim: int, keepdim: bool = True, out_itemsize=None):
    """A mean over one dim: 1 FLOP per input element (conventions: reductions count their input)."""
    shape = list(x)
    if keepdim:
        shape[dim] = sp.Integer(1)
    else:
        del shape[dim]
    out = _out(tuple(shape), _size(out_itemsize, x))
    return out, Cost(elementwise_flops=_ew("mean", out, x), activation_bytes=nbytes(out), **moved([x], [out]))


@register("interpolate")
def interpolate(x: Shape, *, mode: str, size: Shape, antialias: bool = False, out_itemsize=None):
    """F.interpolate over the trailing len(size) dims (NCHW / NCL): per output element, the
    conventions' FLOPs of the aten kernel; reads the input, writes the output."""
    aten_op = {("bicubic", True): "_upsample_bicubic2d_aa", ("bicubic", False): "upsample_bicubic2d",
               ("linear", False): "upsample_linear1d"}[(mode, bool(antialias))]
    out = _out((*x[:len(x) - len(size)], *size), _size(out_itemsize, x))
    return out, Cost(elementwise_flops=_ew(aten_op, out, x), activation_bytes=nbytes(out), **moved([x], [out]))


def differs(a, b) -> sp.Expr:
    """1 where two element sizes differ, else 0. Between the storage dtype and fp32 it is the
    polynomial (4 - dtype_bytes) / 2, exact on the storage dtypes there are (graphs.config.DTYPES:
    bf16 2, fp32 4), so closed forms stay polynomials; otherwise a Piecewise."""
    a, b = sp.sympify(a), sp.sympify(b)
    if a.is_number and b.is_number:
        return sp.Integer(int(a != b))
    if {a, b} == {S.dtype_bytes, sp.Integer(FLOAT32)}:
        return (FLOAT32 - S.dtype_bytes) / 2
    return sp.Piecewise((0, sp.Eq(a, b)), (1, True))


@register("cast")
def cast(x: Shape, *, out_itemsize=None, dtype=None):
    """`.to(dtype)`: a copy into the new element size; none at all when the size is unchanged
    (torch returns the tensor itself): see `differs`."""
    size = sp.sympify(out_itemsize if out_itemsize is not None else DTYPE_BYTES.get(dtype, itemsize(x)))
    out = _out(tuple(x), size)
    return out, Cost(activation_bytes=nbytes(out), **moved([x], [out])) * differs(itemsize(x), size)


@register("identity")
def identity(x: Shape, *others: Shape, **attrs):
    return tuple(x), Cost()


# ---- data movement ------------------------------------------------------------------------

@register("input")
def input_(*, shape: Shape):
    return tuple(shape), Cost()


@register("reshape", "flatten", "slice", "permute", "window_partition", "window_unpartition")
def reshape(x: Shape, *, shape: Shape, copy=False):
    """A view (no cost), or with `copy` the elements of the result read and written once
    (`.reshape`/`.contiguous()` of a non-viewable layout; a slice copies only what it keeps)."""
    out = _out(tuple(shape), itemsize(x))
    if copy is False:
        return out, Cost()
    cost = Cost(activation_bytes=nbytes(out), **moved([out], [out]))
    return out, (cost if copy is True else cost * copy)


@register("clone")
def clone(x: Shape):
    """`Tensor.clone()` (aten.clone): a fresh copy of the same shape and element size; reads the
    input's footprint, writes the copy (0 FLOPs: data movement in the conventions table). The
    copy is a new activation, whatever the input's layout."""
    out = _out(tuple(x), itemsize(x))
    return out, Cost(elementwise_flops=_ew("clone", out, x), activation_bytes=nbytes(out), **moved([x], [out]))


@register("pad")
def pad(x: Shape, *, shape: Shape):
    """aten.constant_pad_nd: reads the input, writes the padded output."""
    out = _out(tuple(shape), itemsize(x))
    return out, Cost(activation_bytes=nbytes(out), **moved([x], [out]))


@register("cat")
def cat(*xs: Shape, dim: int, broadcast_inputs: tuple = ()):
    """Reads every input's footprint, writes the output. `broadcast_inputs`: inputs (by position)
    that are stride-0 expansions along dim 0 (`.expand` of one row): their footprint is one row."""
    out = list(xs[0])
    out[dim] = sp.Add(*[x[dim] for x in xs])
    out = _out(tuple(out), itemsize(xs[0]))
    read = sum((numel(x[1:] if i in broadcast_inputs else x) * itemsize(x) for i, x in enumerate(xs)), sp.Integer(0))
    return out, Cost(activation_bytes=nbytes(out), bytes_read=read, bytes_written=nbytes(out))


@register("index")
def index(table: Shape, idx: Shape):
    """table[idx] (aten.index / aten.embedding): gathers rows; reads the index tensor and the rows
    it takes (one per index element, at the table's element size: conventions.gather_bytes_read),
    writes idx.shape + table.shape[1:]."""
    out = _out((*idx, *table[1:]), itemsize(table))
    read = C.gather_bytes_read(nbytes(idx), numel(out), itemsize(table))
    return out, Cost(activation_bytes=nbytes(out), bytes_read=read, bytes_written=nbytes(out))


def apply(kind: str, inputs: Sequence[Shape], attrs: dict) -> tuple[Shape, Cost]:
    """Run a formula. Inputs are `Spec`s (plain shapes get the storage itemsize).

    `when` (an indicator expression) is taken off the attrs and scales the whole cost.
    """
    try:
        fn = OPS[kind]
    except KeyError:
        raise ValueError(f"no formula registered for op kind {kind!r}") from None
    attrs = dict(attrs)
    when = attrs.pop("when", None)
    specs = [x if isinstance(x, Spec) else Spec(x) for x in inputs]
    shape, cost = fn(*specs, **attrs)
    return shape, (cost if when is None else cost * when)
