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
from .dtypes import BOOL, BYTES as DTYPE_BYTES, FLOAT32, INT64, STORAGE


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
    """Register a formula for op kinds; a kind registered twice raises (one formula per kind)."""
    def deco(fn: OpFormula) -> OpFormula:
        for k in kinds:
            if k in OPS:
                raise ValueError(f"op kind {k!r} is already registered ({OPS[k].__name__})")
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


@register("cast")
def cast(x: Shape, *, out_itemsize=None, dtype=None):
    """`.to(dtype)`: a copy into the new element size; none at all when the size is unchanged
    (torch returns the tensor itself): see `converts`."""
    size = sp.sympify(out_itemsize if out_itemsize is not None else DTYPE_BYTES.get(dtype, itemsize(x)))
    out = _out(tuple(x), size)
    return out, Cost(activation_bytes=nbytes(out), **moved([x], [out])) * converts(itemsize(x), size)


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


# ---- 0/1 indicators: costs that run only under a condition of the sizes -----------------------

def indicator(cond) -> sp.Expr:
    """1 where `cond` holds, else 0 (decided now when the sizes are numbers)."""
    return sp.Piecewise((1, cond), (0, True))


def more_than_one(n) -> sp.Expr:
    return indicator(sp.Gt(n, 1))


def unequal(a, b) -> sp.Expr:
    return indicator(sp.Ne(sp.sympify(a), sp.sympify(b)))


@register("rel_pos_coords")
def rel_pos_coords(*, size):
    """A relative-position index for q = k = size (a ViT's decomposed relative positions):
    arange(size)[:, None] * 1.0 - arange(size)[None, :] * 1.0
    + (size - 1) * 1.0, then `.long()`. Two int64 aranges, two multiplies by a Python float (to fp32,
    torch's default float), the broadcast subtract, the scalar add, the cast to int64."""
    s = sp.sympify(size)
    ew = 2 * C.elementwise_flops("mul", s, s) + C.elementwise_flops("sub", s * s, s) \
        + C.elementwise_flops("add", s * s, s * s)
    #       aranges      muls (int64 in, fp32 out)     sub (two fp32 vectors)    add (scalar)    long
    read = (0 + 2 * INT64 * s + 2 * FLOAT32 * s + FLOAT32 * s * s + FLOAT32 * s * s)
    written = (2 * INT64 * s + 2 * FLOAT32 * s + FLOAT32 * s * s + FLOAT32 * s * s + INT64 * s * s)
    return Spec((s, s), INT64), Cost(elementwise_flops=ew, bytes_read=read, bytes_written=written,
                                     activation_bytes=INT64 * s * s)


# ---- transformer language-model ops ----------------------------------------------------------
#
# Written from the aten ops `transformers`' decoder layers run (RMSNorm in fp32, RoPE tables, the eager
# causal mask, an eager MoE experts loop), each under costgraph/conventions.py.


def ew(op: str, elements) -> sp.Expr:
    """Elementwise FLOPs of one aten op over `elements` (its output or input, as the table's basis says)."""
    return C.FLOPS_PER_ELEMENT[op][0] * sp.sympify(elements)


def converts(src, dst) -> sp.Expr:
    """1 when `.to()` from element size `src` to `dst` copies, 0 when it returns its input unchanged.

    With a symbolic size (the storage dtype `dtype_bytes`) the indicator [src != dst] is the
    polynomial that interpolates it on the supported storage sizes (`costgraph.dtypes.STORAGE`: bf16 2,
    fp32 4, so [b != 4] = 2 - b/2): exact on every dtype the model runs in, and closed forms stay
    polynomials (a new storage dtype in DTYPES extends it).
    """
    src, dst = sp.sympify(src), sp.sympify(dst)
    if src == dst:
        return sp.Integer(0)
    if src.is_number and dst.is_number:
        return sp.Integer(1)
    if not src.is_number and not dst.is_number:
        raise ValueError(f"cannot decide whether a cast from {src} to {dst} bytes copies")
    size, fixed = (src, dst) if dst.is_number else (dst, src)
    points = [(v, 0 if v == fixed else 1) for v in sorted(set(STORAGE.values()))]
    return sp.expand(sp.interpolate(points, size))


def _cost(*, flops=0, ew=0, read=0, written=0, out=0) -> Cost:
    x = lambda e: sp.expand(sp.sympify(e))
    return Cost(flops=x(flops), elementwise_flops=x(ew), bytes_read=x(read), bytes_written=x(written),
                activation_bytes=x(out))


def _with_output(cost: Cost, nbytes_out) -> Cost:
    """The node's cost with its output tensor's bytes as activation_bytes (intermediates die inside)."""
    return Cost(**{**cost.as_dict(), "activation_bytes": sp.expand(sp.sympify(nbytes_out))})


def _cast(n, src, dst) -> Cost:
    """`.to()` of n elements: reads src bytes and writes dst bytes each, when it copies at all."""
    k = converts(src, dst)
    return _cost(read=k * n * src, written=k * n * dst, out=k * n * dst)


@register("embedding")
def embedding(ids, *, num_embeddings, embedding_dim, out_itemsize=S.dtype_bytes):
    """aten.embedding: reads the ids and one table row per id (a gather: `C.gather_bytes_read`), not
    the num_embeddings x embedding_dim table; writes the rows."""
    out = (*ids, embedding_dim)
    return out, _cost(read=C.gather_bytes_read(nbytes(ids), numel(out), out_itemsize),
                      written=numel(out) * out_itemsize, out=numel(out) * out_itemsize)


@register("masked_scatter_")
def masked_scatter_(x, source):
    """The image features written over the image slots' embeddings in place (the vendor's masked_scatter_):
    reads the (tokens x 1) bool mask and the source, writes the embeddings."""
    tokens = prod(x[:-1])
    return tuple(x), _cost(read=tokens * BOOL + nbytes(source), written=nbytes(x))


@register("position_ids")
def position_ids(*, tokens):
    """arange(T) + past length (int64)."""
    n = sp.sympify(tokens)
    return (1, n), _cost(ew=ew("add", n), read=INT64 * n, written=2 * INT64 * n, out=INT64 * n)


@register("causal_mask")
def causal_mask(pos, *, keys, out_itemsize=S.dtype_bytes, batch=1):
    """transformers' eager mask: batch and head aranges (B and 1), q and kv aranges plus offsets,
    `kv <= q` (bool, T x K), then `where(mask, 0, min)` into the model dtype, one (T x K) per
    sequence of a batch of B (the bool mask is broadcast over them: read once)."""
    t, k, b, n = sp.sympify(pos[-1]), sp.sympify(keys), out_itemsize, sp.sympify(batch)
    pairs = t * k
    cost = (_cost(written=INT64 * (n + 1))                                            # arange(B), arange(1)
            + _cost(ew=ew("add", t), read=INT64 * t, written=2 * INT64 * t)          # arange(T) + offset
            + _cost(ew=ew("add", k), read=INT64 * k, written=2 * INT64 * k)          # arange(K) + offset
            + _cost(ew=ew("le", pairs), read=INT64 * (t + k), written=BOOL * pairs)
            + _cost(written=2 * b)                                                    # zeros(()), min scalar
            + _cost(ew=ew("where", n * pairs), read=BOOL * pairs + 2 * b, written=b * n * pairs, out=b * n * pairs))
    return (n, 1, t, k), cost


@register("rope_tables")
def rope_tables(pos, *, head_dim, matmul: bool, out_itemsize=S.dtype_bytes):
    """cos and sin tables (stacked: 2 x T x head_dim) in fp32, cast to the model dtype.

    positions to fp32; freqs = inv_freq @ positions (vendor, per layer: a bmm) or positions *
    inv_freq (transformers 5.x, once: a multiply); cat(freqs, freqs); cos, sin; both times
    attention_scaling; both cast.
    """
    t, pairs = sp.sympify(pos[-1]), sp.Integer(head_dim) / 2
    n = t * head_dim
    cost = _cost(read=INT64 * t, written=FLOAT32 * t)                                  # positions.float()
    if matmul:
        cost += _cost(flops=2 * pairs * t, read=FLOAT32 * (pairs + t), written=FLOAT32 * pairs * t)
    else:
        cost += _cost(ew=ew("mul", pairs * t), read=FLOAT32 * (pairs + t), written=FLOAT32 * pairs * t)
    cost += _cost(read=FLOAT32 * n, written=FLOAT32 * n)                                  # cat
    for op in ("cos", "sin"):
        cost += _cost(ew=ew(op, n) + ew("mul", n), read=2 * FLOAT32 * n, written=2 * FLOAT32 * n)
        cost += _cast(n, FLOAT32, out_itemsize)
    return (2, t, head_dim), _with_output(cost, 2 * n * out_itemsize)


@register("rms_norm")
def rms_norm(x, *, eps):
    """x.to(fp32); pow 2; mean; + eps; rsqrt; x * rstd; .to(dtype); weight * x."""
    rows, h = prod(x[:-1]), x[-1]
    n, b = rows * h, itemsize(x)
    cost = (_cast(n, b, FLOAT32)
            + _cost(ew=ew("pow", n), read=FLOAT32 * n, written=FLOAT32 * n)
            + _cost(ew=ew("mean", n), read=FLOAT32 * n, written=FLOAT32 * rows)
            + _cost(ew=ew("add", rows) + ew("rsqrt", rows), read=2 * FLOAT32 * rows, written=2 * FLOAT32 * rows)
            + _cost(ew=ew("mul", n), read=FLOAT32 * (n + rows), written=FLOAT32 * n)
            + _cast(n, FLOAT32, b)
            + _cost(ew=ew("mul", n), read=b * (h + n), written=b * n))
    return tuple(x), _with_output(cost, b * n)


@register("rope_apply")
def rope_apply(x, tables):
    """x * cos + rotate_half(x) * sin; rotate_half = cat(-x2, x1) of the halves (views)."""
    n, b = numel(x), itemsize(x)
    table = prod(tables[1:]) * itemsize(tables)          # one of cos / sin, broadcast over heads
    half = n / 2
    cost = (_cost(ew=ew("mul", n), read=n * b + table, written=n * b)
            + _cost(ew=ew("neg", half), read=half * b, written=half * b)
            + _cost(read=n * b, written=n * b)                                         # cat
            + _cost(ew=ew("mul", n), read=n * b + table, written=n * b)
            + _cost(ew=ew("add", n), read=2 * n * b, written=n * b, out=n * b))
    return tuple(x), cost


@register("cache_update")
def cache_update(past, new):
    """DynamicCache: cat(cache, new) along the sequence (the prefill's cache starts empty)."""
    out = (*new[:-2], past[-2] + new[-2], new[-1])
    return out, _cost(read=nbytes(past) + nbytes(new), written=nbytes(out), out=nbytes(out))


@register("attention_scores")
def attention_scores(q, k, *, causal, q_copy=0):
    """q k^T per head (a bmm): the score half of `ops.sdpa` (same causal rule).

    `q_copy` (0/1, or an indicator): q is materialised before the bmm, as when several sequences'
    (batch, heads) dims cannot fold into one bmm batch dim as a view (q laid out tokens-major)."""
    *batch, lq, _ = q
    _, cost = sdpa(q, k, (*k[:-1], 0), causal=causal)
    out = (*batch, lq, k[-2])
    b = itemsize(q)
    copy = nbytes(q) * sp.sympify(q_copy)
    return out, _cost(flops=cost.flops, read=nbytes(q) + nbytes(k) + copy, written=numel(out) * b + copy,
                      out=numel(out) * b)


@register("attention_values")
def attention_values(probs, v, *, causal):
    """probabilities x values per head (a bmm): the other half of `ops.sdpa`."""
    *batch, lq, lk = probs
    _, cost = sdpa((*batch, lq, 0), v, v, causal=causal)
    out = (*batch, lq, v[-1])
    b = itemsize(v)
    return out, _cost(flops=cost.flops, read=nbytes(probs) + nbytes(v), written=numel(out) * b,
                      out=numel(out) * b)


@register("scalar_mul")
def scalar_mul(x):
    """x * a Python scalar (attention scaling, routed_scaling_factor)."""
    n, b = numel(x), itemsize(x)
    return tuple(x), _cost(ew=ew("mul", n), read=n * b, written=n * b, out=n * b)


@register("softmax_fp32")
def softmax_fp32(x, *, out_itemsize=S.dtype_bytes):
    """softmax(x, dtype=float32).to(out dtype): an upcast, softmax in fp32, a downcast (each only if needed)."""
    n, b = numel(x), itemsize(x)
    cost = (_cast(n, b, FLOAT32)
            + _cost(ew=ew("_softmax", n), read=FLOAT32 * n, written=FLOAT32 * n)
            + _cast(n, FLOAT32, out_itemsize))
    return tuple(x), _with_output(cost, out_itemsize * n)


@register("fused_attention")
def fused_attention(q, k, v, *, causal):
    """One attention kernel (flash): reads q, k, v, writes the output; scale and softmax on the
    computed scores, no mask tensor. causal="none": a profiler blind to it (no FLOPs, no elementwise)."""
    *batch, lq, e = q
    out, cost = sdpa(q, k, v, causal="flash" if causal == "none" else causal)
    pairs = cost.flops / (2 * prod(batch) * (e + v[-1]))     # scores computed per head batch
    work = prod(batch) * pairs * (C.SDPA_SCALE + C.SDPA_SOFTMAX)
    blind = causal == "none"
    b = itemsize(q)
    return tuple(out), _cost(flops=0 if blind else cost.flops, ew=0 if blind else work,
                             read=nbytes(q) + nbytes(k) + nbytes(v), written=numel(out) * b, out=numel(out) * b)


@register("heads_merge")
def heads_merge(x, *, shape, copies: bool):
    """`.transpose(1, 2).contiguous()` then a view: a copy unless the transpose is already contiguous."""
    n, b = numel(x), itemsize(x)
    return tuple(shape), (_cost(read=n * b, written=n * b, out=n * b) if copies else Cost())


@register("router_topk")
def router_topk(scores, *, k):
    """topk(scores, k, sorted=False): fp32 weights and int64 indices (outputs: the weights' shape)."""
    tokens = prod(scores[:-1])
    out = (*scores[:-1], k)
    w = tokens * k * (itemsize(scores) + INT64)
    return out, _cost(ew=ew("topk", numel(scores)), read=nbytes(scores), written=w, out=w)


@register("expert_mask")
def expert_mask(top, *, experts, hits):
    """one_hot(indices, experts + 1) (aminmax range check, two scalar reads, zeros, scatter_),
    permute (a view), sum over (k, T), greater than 0, nonzero: the experts hit."""
    tokens, k = prod(top[:-1]), top[-1]
    slots, classes = tokens * k, experts + 1
    mask = slots * classes * INT64
    cost = (_cost(ew=ew("aminmax", slots), read=INT64 * slots, written=2 * INT64)
            + _cost(read=2 * INT64)                                                      # two .item()
            + _cost(written=mask)                                                        # zeros
            + _cost(read=INT64 * slots, written=mask)                                    # scatter_
            + _cost(ew=ew("sum", slots * classes), read=mask, written=INT64 * classes)
            + _cost(ew=ew("gt", classes), read=INT64 * classes, written=BOOL * classes)
            + _cost(read=BOOL * classes, written=INT64 * hits, out=mask + INT64 * hits))   # nonzero
    return (classes, k, tokens), cost


@register("expert_select")
def expert_select(mask, *, rows, hits):
    """Per expert hit: `expert_idx == num_experts` (eq), its bool read, `expert_mask[idx]`'s index
    read, `torch.where(expert_mask[idx])` (nonzero over the k x T slice: (top_k_pos, token_idx)),
    and the index reads of `gate_up_proj[idx]` and `down_proj[idx]`. `rows` (k per token) in all.
    Indexing by the 0-d `idx` is no gather (`conventions.GATHERS`): torch reads the index as a scalar
    (aten._local_scalar_dense, its 8 bytes) and selects a view, so no table or slice is read there."""
    classes, k, tokens = mask
    scalars = hits * (INT64 + BOOL + 3 * INT64)
    cost = (_cost(ew=ew("eq", hits), read=scalars, written=BOOL * hits)
            + _cost(read=hits * k * tokens * INT64, written=2 * INT64 * rows, out=2 * INT64 * rows))
    return (2, rows), cost


@register("expert_gather")
def expert_gather(x, where, *, rows, width):
    """x[token_idx] per expert hit (aten.index, a gather): reads its token_idx and the rows it takes,
    writes them. Over all the experts hit, one index and one row of x per routed row."""
    b = itemsize(x)
    read = C.gather_bytes_read(rows * INT64, rows * width, b)
    return (rows, width), _cost(read=read, written=rows * width * b, out=rows * width * b)


@register("routed_linear")
def routed_linear(x, *, in_features, out_features, hits):
    """F.linear(rows of one expert, that expert's weight) per expert hit: each expert's weight read once.
    (Node attrs `experts` / `active_experts`: the stored and per-token weight copies, for costgraph.params.)"""
    rows = x[0]
    b = itemsize(x)
    out = (rows, out_features)
    return out, _cost(flops=2 * rows * in_features * out_features,
                      read=rows * in_features * b + hits * in_features * out_features * b,
                      written=rows * out_features * b, out=rows * out_features * b)


@register("promote_mul")
def promote_mul(x, w):
    """rows (model dtype) * their routing weights (fp32, one per row): the product is fp32."""
    n = numel(x)
    return tuple(x), _cost(ew=ew("mul", n), read=nbytes(x) + nbytes(w), written=FLOAT32 * n, out=FLOAT32 * n)


@register("index_add_")
def index_add_(acc, rows, where, *, hits):
    """final.index_add_(0, token_idx, rows) per expert hit: reads the index and the rows, writes
    all of `final` each time (in place: the output is `acc`)."""
    r = rows[0]
    return tuple(acc), _cost(ew=ew("index_add_", numel(rows)), read=r * INT64 + nbytes(rows),
                             written=hits * nbytes(acc))


@register("zeros_init")
def zeros_init(x):
    """torch.zeros_like(x): reads x by the footprint convention, writes zeros."""
    return tuple(x), _cost(read=nbytes(x), written=nbytes(x), out=nbytes(x))


@register("argmax_last")
def argmax_last(logits):
    """logits[:, -1].argmax(-1): greedy choice of the next token from each sequence's last position's row."""
    seqs, row = prod(logits[:-2]), logits[-1]
    return (seqs, 1), _cost(ew=ew("argmax", seqs * row), read=seqs * row * itemsize(logits), written=seqs * INT64,
                            out=seqs * INT64)


@register("routed_gather")
def routed_gather(weights, where, *, rows):
    """top_k_weights[token_idx, top_k_pos, None] per expert hit (aten.index with two index tensors, a
    gather): reads both indices and the one weight each routed row takes, writes them."""
    b = itemsize(weights)
    return (rows, 1), _cost(read=C.gather_bytes_read(2 * INT64 * rows, rows, b), written=rows * b, out=rows * b)


def apply(kind: str, inputs: Sequence[Shape], attrs: dict) -> tuple[Shape, Cost]:
    """Run a formula. Inputs are `Spec`s (plain shapes get the storage itemsize).

    `when` (an indicator expression) is taken off the attrs and scales the whole cost.
    """
    (shape, cost), when = _memoised(OPS, "formula", kind, inputs, attrs)
    return shape, (cost if when is None else cost * when)


def _memoised(registry: dict, what: str, kind: str, inputs: Sequence[Shape], attrs: dict, **extra):
    """(the registered formula's result, the `when` indicator taken off the attrs). Formulas are pure
    functions of shapes and attrs: a layer repeated 12 or 24 times computes its sympy expressions once
    (the key holds the element sizes, which a tuple's hash leaves out)."""
    try:
        fn = registry[kind]
    except KeyError:
        raise ValueError(f"no {what} registered for op kind {kind!r}") from None
    attrs = dict(attrs)
    when = attrs.pop("when", None)
    specs = [x if isinstance(x, Spec) else Spec(x) for x in inputs]
    try:
        key = (what, kind, tuple((tuple(x), x.itemsize) for x in specs), tuple(sorted(attrs.items())),
               tuple(sorted(extra.items())))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _APPLIED:
        return _APPLIED[key], when
    out = fn(*specs, **attrs, **extra)
    if key is not None:
        _APPLIED[key] = out
    return out, when


_APPLIED: dict = {}


# ---- training forward ops: a MoE layer's training path and the loss -------------------------------

@register("moe_repeat")
def moe_repeat(x, *, k):
    """x.repeat_interleave(k, dim=0): every token's row k times (one per routed slot); a copy."""
    rows, width = prod(x[:-1]), x[-1]
    out = _out((rows * k, width), itemsize(x))
    return out, _cost(read=nbytes(x), written=nbytes(out), out=nbytes(out))


@register("expert_rows")
def expert_rows(x, idx, *, experts):
    """x[flat_topk_idx == i] for every expert i: an `eq` over the k*T slots and a boolean-mask gather per
    expert (the mask read whole, each selected row read once: all experts together select every row once)."""
    slots, width = x[0], x[-1]
    b = itemsize(x)
    cost = _cost(ew=experts * ew("eq", slots), read=experts * INT64 * slots, written=experts * BOOL * slots)
    cost += _cost(read=experts * BOOL * slots + slots * width * b, written=slots * width * b,
                  out=slots * width * b)
    return (slots, width), cost


@register("expert_scatter")
def expert_scatter(rows, idx, *, experts):
    """y = empty_like(x) (under the conventions it reads and writes x's footprint); then y[flat_topk_idx ==
    i] = expert_i(rows) for every expert: per expert an `eq`, and index_put_ with a boolean mask, which
    reads the mask and the expert's rows and (in place) writes y whole: the mutated argument's footprint."""
    slots, width = rows[0], rows[-1]
    b = itemsize(rows)
    full = slots * width * b
    cost = _cost(read=full, written=full)
    cost += _cost(ew=experts * ew("eq", slots), read=experts * INT64 * slots, written=experts * BOOL * slots)
    cost += _cost(read=experts * BOOL * slots + full, written=experts * full, out=full)
    return (slots, width), cost


@register("weighted_sum")
def weighted_sum(y, w, *, k, out_itemsize=S.dtype_bytes):
    """(y.view(T, k, H) * topk_weight.unsqueeze(-1)).sum(dim=1).to(dtype): the product is fp32 (the
    weights are), summed over the k slots, cast back."""
    slots, width = y
    tokens = slots / k
    n = slots * width
    cost = (_cost(ew=ew("mul", n), read=nbytes(y) + nbytes(w), written=FLOAT32 * n)
            + _cost(ew=ew("sum", n), read=FLOAT32 * n, written=FLOAT32 * tokens * width)
            + _cast(tokens * width, FLOAT32, out_itemsize))
    return (tokens, width), _with_output(cost, tokens * width * out_itemsize)


@register("aux_loss")
def aux_loss(scores, idx, *, experts, k, batch):
    """The gate's sequence-level balance loss (seq_aux): counts of each expert's slots per sequence
    (zeros, scatter_add_ of ones, divide), the mean routing score per sequence and expert, their
    product summed and averaged, times alpha. Tiny: elementwise work and bytes only."""
    tokens = prod(scores[:-1])
    slots, counts = tokens * k, batch * experts
    f = FLOAT32
    cost = (_cost(written=f * counts + f * slots)                                              # zeros, ones
            + _cost(ew=ew("scatter_add_", slots), read=INT64 * slots + f * slots, written=f * counts)   # in place
            + _cost(ew=ew("div", counts), written=f * counts)                                          # div_
            + _cost(ew=ew("mean", tokens * experts), read=f * tokens * experts, written=f * counts)
            + _cost(ew=ew("mul", counts), read=2 * f * counts, written=f * counts)
            + _cost(ew=ew("sum", counts) + ew("mean", batch) + ew("mul", 1),
                    read=f * (counts + batch + 1), written=f * (batch + 2), out=f))
    return (), cost


@register("attach_loss")
def attach_loss(x, loss):
    """y = AddAuxiliaryLoss.apply(y, aux_loss): y unchanged (no kernel), the auxiliary loss tied to it so
    its backward runs with y's (the gradient of the auxiliary loss is a scalar one)."""
    return tuple(x), Cost()


@register("log_softmax")
def log_softmax(x, **attrs):
    """log_softmax over the last dim (the loss's, on fp32 logits): reads x, writes the log-probabilities."""
    out = _out(tuple(x), itemsize(x))
    return out, Cost(elementwise_flops=_ew("_log_softmax", out, x), activation_bytes=nbytes(out), **moved([x], [out]))


@register("nll_loss")
def nll_loss(log_probs, **attrs):
    """The mean negative log-likelihood of every position's next token (labels shifted by padding with
    the ignore index: the last position counts nothing): one pick per row; reads the picked element
    per row and the int64 labels, writes the scalar loss and its total weight (fp32)."""
    rows = prod(log_probs[:-1])
    b = itemsize(log_probs)
    pad = _cost(read=rows * INT64, written=(rows + log_probs[0]) * INT64)   # labels padded by one per sequence
    return (), pad + _cost(ew=ew("nll_loss_forward", rows), read=nbytes(log_probs) + rows * INT64, written=2 * b,
                           out=b)


# ---- backward formulas ---------------------------------------------------------------------------
#
# Beside the forward registry, keyed by the same op kinds and taking the same shapes and attrs (as
# torch/utils/flop_counter.py keeps its backward formulas beside the forward ones). A backward formula
# also takes `grads` (per input: does it need a gradient) and `weight_grad` (are the op's weights
# trained), and returns the cost of the gradient ops autograd runs for one execution of the node
# and which forward tensors they read (`saved`: input positions, or "out" for the node's output):
# those stay alive from the forward until this backward (costgraph.autodiff, costgraph.liveness).
# FLOPs follow torch's backward formulas (mm: one mm per gradient, each the forward's size;
# convolution_backward: the forward's FLOPs per gradient; SDPA: recomputed scores plus four
# products); elementwise FLOPs and bytes follow the aten ops autograd dispatches, under
# costgraph/conventions.py. The backward node's activation_bytes is the input gradients it writes
# (weight gradients accumulate into `.grad`: training memory counts them as parameter gradients).

class Grad(tuple):
    """(cost, saved): the backward's cost and the forward tensors it reads."""

    def __new__(cls, cost: Cost, saved=()):
        return super().__new__(cls, (cost, tuple(saved)))


BackwardFormula = Callable[..., Grad]
BACKWARD: dict[str, BackwardFormula] = {}
# Op kinds with no gradient: index builders, masks, tables of positions, argmax (integer outputs).
NO_GRADIENT = ("input", "rel_pos_coords", "position_ids", "causal_mask", "rope_tables", "expert_mask",
               "expert_select", "argmax_last", "identity")


# Inputs an op reads only as indices (positions): no gradient flows into them, whatever produced them
# (a router's top-k node carries its weights and its indices; the experts' masks read the indices).
INDEX_INPUTS: dict[str, tuple[int, ...]] = {}


def register_backward(*kinds: str, index_inputs: tuple[int, ...] = ()):
    """Register the backward formula of op kinds; one per kind (a second registration raises).
    `index_inputs`: the input positions the op reads as indices (they get no gradient)."""
    def deco(fn: BackwardFormula) -> BackwardFormula:
        for k in kinds:
            if k in BACKWARD or k in NO_GRADIENT:
                raise ValueError(f"op kind {k!r} already has a backward rule")
            if k not in OPS:
                raise ValueError(f"backward for {k!r}, which has no forward formula")
            BACKWARD[k] = fn
            if index_inputs:
                INDEX_INPUTS[k] = tuple(index_inputs)
        return fn
    return deco


def _gx(n_in, b_in, ew_op=None, reads=0, elements=None) -> Cost:
    """One gradient kernel writing an input's gradient of n_in elements (b_in bytes each)."""
    e = 0 if ew_op is None else ew(ew_op, n_in if elements is None else elements)
    return _cost(ew=e, read=reads, written=n_in * b_in, out=n_in * b_in)


@register_backward("linear")
def linear_backward(x, *, grads, weight_grad, in_features, out_features, bias=True, weight_itemsize=None):
    """grad_x = grad @ W (mm, 2MKN), grad_W = grad^T @ x (mm, 2MKN), grad_b = grad summed over rows."""
    tokens, b, wb = prod(x[:-1]), itemsize(x), _size(weight_itemsize, x)
    g = tokens * out_features * b
    cost, saved = Cost(), []
    if grads[0]:
        cost += _cost(flops=2 * tokens * in_features * out_features, read=g + in_features * out_features * wb,
                      written=nbytes(x), out=nbytes(x))
    if weight_grad:
        cost += _cost(flops=2 * tokens * in_features * out_features, read=g + nbytes(x),
                      written=in_features * out_features * wb)
        if bias:
            cost += _cost(ew=ew("sum", tokens * out_features), read=g, written=out_features * wb)
        saved.append(0)
    return Grad(cost, saved)


@register_backward("routed_linear")
def routed_linear_backward(x, *, grads, weight_grad, in_features, out_features, hits):
    """Per expert run: grad of its rows (mm) and of its weight (mm), each the forward's FLOPs."""
    rows, b = x[0], itemsize(x)
    g = rows * out_features * b
    cost, saved = Cost(), []
    if grads[0]:
        cost += _cost(flops=2 * rows * in_features * out_features, read=g + hits * in_features * out_features * b,
                      written=nbytes(x), out=nbytes(x))
    if weight_grad:
        cost += _cost(flops=2 * rows * in_features * out_features, read=g + nbytes(x),
                      written=hits * in_features * out_features * b)
        saved.append(0)
    return Grad(cost, saved)


@register_backward("conv2d")
def conv2d_backward(x, *, grads, weight_grad, in_channels, out_channels, kernel, stride=1, padding=0, bias=True,
                    weight_itemsize=None):
    """aten.convolution_backward: grad_input and grad_weight each cost the forward's FLOPs
    (torch's conv_backward_flop); it reads the output gradient once, the weight for grad_input and
    the input for grad_weight."""
    out, fwd = conv2d(x, in_channels=in_channels, out_channels=out_channels, kernel=kernel, stride=stride,
                      padding=padding, bias=bias, weight_itemsize=weight_itemsize)
    w = out_channels * in_channels * sp.sympify(kernel) ** 2 * _size(weight_itemsize, x)
    if not (grads[0] or weight_grad):
        return Grad(Cost())
    cost = _cost(read=nbytes(out))
    if grads[0]:
        cost += _cost(flops=fwd.flops, read=w, written=nbytes(x), out=nbytes(x))
    if weight_grad:
        cost += _cost(flops=fwd.flops, read=nbytes(x), written=w)
        if bias:
            cost += _cost(ew=ew("sum", numel(out)), written=out_channels * _size(weight_itemsize, x))
    return Grad(cost, [0] if weight_grad else [])


def _product_backward(operands, out, grads, flops) -> Grad:
    """A two-operand product (bmm, einsum): each needed gradient is one product of the forward's size,
    reading the output gradient and the other operand, writing the operand's gradient."""
    cost, saved = Cost(), set()
    for i, need in enumerate(grads[:2]):
        if need:
            other = operands[1 - i]
            cost += _cost(flops=flops, read=nbytes(out) + nbytes(other), written=nbytes(operands[i]),
                          out=nbytes(operands[i]))
            saved.add(1 - i)
    return Grad(cost, sorted(saved))


@register_backward("bmm", "matmul")
def matmul_backward(a, b, *, grads, weight_grad):
    out, fwd = matmul(a, b)
    return _product_backward((a, b), out, grads, fwd.flops)


@register_backward("einsum")
def einsum_backward(*operands, grads, weight_grad, equation, copies=()):
    out, fwd = einsum(*operands, equation=equation)
    return _product_backward(operands, out, grads, fwd.flops)


@register_backward("attention_scores")
def attention_scores_backward(q, k, *, grads, weight_grad, causal, q_copy=0):
    """The two products' gradients; q's copy (`q_copy`, several sequences' heads) passes its gradient
    through (contiguous's backward is the identity)."""
    out, fwd = attention_scores(q, k, causal=causal)
    return _product_backward((q, k), Spec(out, itemsize(q)), grads, fwd.flops)


@register_backward("attention_values")
def attention_values_backward(probs, v, *, grads, weight_grad, causal):
    out, fwd = attention_values(probs, v, causal=causal)
    return _product_backward((probs, v), Spec(out, itemsize(v)), grads, fwd.flops)


def sdpa_backward_flops(q, k, v, causal: str = "full") -> sp.Expr:
    """torch's sdpa_backward_flop_count: the scores recomputed (q k^T), then grad_scores = grad_out v^T,
    grad_v = P^T grad_out, grad_q = grad_scores k, grad_k = grad_scores^T q: 2 x pairs x (3 d_q + 2 d_v)
    per head. `causal` as in `attention_flops` (torch never discounts a mask; a causal flash kernel
    computes the lower triangle only)."""
    *batch, lq, e = q
    ev = v[-1]
    unit = attention_flops(q, k, (*v[:-1], 0), causal) / (2 * prod(batch) * e) if e != 0 else 0
    pairs = sp.expand(unit)
    return sp.expand(2 * prod(batch) * pairs * (3 * e + 2 * ev))


@register_backward("sdpa")
def sdpa_backward(q, k, v, mask=None, *, grads, weight_grad, causal="full"):
    """The fused attention backward: reads q, k, v, the output, its gradient and the fp32 logsumexp
    (and the mask), writes the three gradients; per score it recomputes the scaled, masked softmax and
    runs its backward (the conventions' SDPA parts plus `_softmax_backward_data`'s)."""
    out, fwd = sdpa(q, k, v, mask, causal=causal)
    *batch, lq, _ = q
    scores = prod(batch) * lq * k[-2]
    lse = prod(batch) * lq * FLOAT32
    per = C.SDPA_SCALE + C.SDPA_SOFTMAX + (C.SDPA_MASK if mask is not None else 0) \
        + C.FLOPS_PER_ELEMENT["_softmax_backward_data"][0]
    reads = nbytes(q) + nbytes(k) + nbytes(v) + 2 * nbytes(out) + lse + (nbytes(mask) if mask is not None else 0)
    written = nbytes(q) + nbytes(k) + nbytes(v)
    saved = [0, 1, 2, "out"] + ([3] if mask is not None else [])
    return Grad(_cost(flops=sdpa_backward_flops(q, k, v, causal), ew=scores * per, read=reads, written=written,
                      out=written), saved)


@register_backward("fused_attention")
def fused_attention_backward(q, k, v, *, grads, weight_grad, causal):
    blind = causal == "none"
    g = sdpa_backward(q, k, v, grads=grads, weight_grad=weight_grad, causal="flash" if blind else causal)
    cost = g[0]
    if blind:
        cost = Cost(bytes_read=cost.bytes_read, bytes_written=cost.bytes_written,
                    activation_bytes=cost.activation_bytes)
    return Grad(cost, g[1])


# elementwise ops: the gradient of each input that needs one is one kernel over its elements
@register_backward("gelu", "silu", "sigmoid", "tanh")
def activation_backward(x, *, grads, weight_grad, out_itemsize=None, **attrs):
    """`<op>_backward(grad, x)`: reads the gradient and the saved input, writes grad_x."""
    n, b = numel(x), itemsize(x)
    return Grad(_gx(n, b, "silu_backward", reads=2 * n * b) if grads[0] else Cost(), [0])


@register_backward("exp", "sqrt", "rsqrt", "pow")
def pointwise_backward(x, *, grads, weight_grad, out_itemsize=None, **attrs):
    """grad times the derivative, from the saved input (pow) or output (exp, sqrt, rsqrt): one op
    computing the derivative and one multiply over the elements."""
    n, b = numel(x), itemsize(x)
    if not grads[0]:
        return Grad(Cost())
    return Grad(_gx(n, b, "mul", reads=2 * n * b) * 2, [0])


@register_backward("neg", "scalar_mul")
def constant_backward(x, *, grads, weight_grad, out_itemsize=None, **attrs):
    """grad times a constant (-1, a Python scalar): one op, nothing saved."""
    n, b = numel(x), itemsize(x)
    return Grad(_gx(n, b, "mul", reads=n * b) if grads[0] else Cost())


def _reduce_to(shape: Shape, out: Shape, b) -> Cost:
    """The gradient of a broadcast input: the output's gradient summed over the broadcast dims."""
    if tuple(sp.sympify(d) for d in shape) == tuple(sp.sympify(d) for d in out):
        return Cost()
    return _cost(ew=ew("sum", numel(out)), read=numel(out) * b, written=numel(shape) * b, out=numel(shape) * b)


def _sum_backward(xs, grads, negated=()) -> Grad:
    out = broadcast(*xs)
    b = itemsize(xs[0])
    cost = Cost()
    for i, need in enumerate(grads):
        if need:
            cost += _reduce_to(xs[i], out, b)
            if i in negated:
                cost += _gx(numel(xs[i]), b, "neg", reads=numel(xs[i]) * b)
    return Grad(cost)


@register_backward("add")
def add_backward(*xs, grads, weight_grad, out_itemsize=None, **attrs):
    """The gradient passes through (no op) to each input, summed over its broadcast dims when it was
    broadcast."""
    return _sum_backward(xs, grads)


@register_backward("sub")
def sub_backward(*xs, grads, weight_grad, out_itemsize=None, **attrs):
    """As add's, the second input's gradient negated (one op)."""
    return _sum_backward(xs, grads, negated=(1,))


@register_backward("mul", "div", "promote_mul")
def mul_backward(*xs, grads, weight_grad, out_itemsize=None, **attrs):
    """grad_a = grad * b, grad_b = grad * a (div: grad / b and -grad * a / b^2: two more ops), each
    reduced over its broadcast dims."""
    out = broadcast(*xs)
    ob = _size(out_itemsize, xs[0])
    n = numel(out)
    cost, saved = Cost(), set()
    for i, need in enumerate(grads[:2]):
        if need:
            other = xs[1 - i] if len(xs) > 1 else xs[0]
            cost += _cost(ew=ew("mul", n), read=n * ob + nbytes(other), written=n * ob, out=n * ob)
            cost += _reduce_to(xs[i], out, ob)
            saved.add(1 - i if len(xs) > 1 else 0)
    return Grad(cost, sorted(saved))


@register_backward("quick_gelu")
def quick_gelu_backward(x, *, grads, weight_grad, **attrs):
    """x * sigmoid(1.702 x): mul's two gradients, sigmoid_backward, the scalar multiply's, and the
    two paths into x added: five ops over the elements."""
    n, b = numel(x), itemsize(x)
    if not grads[0]:
        return Grad(Cost())
    one = _gx(n, b, "mul", reads=2 * n * b)
    return Grad(one * 5, [0])


@register_backward("softmax")
def softmax_backward(x, *, grads, weight_grad, out_itemsize=None, **attrs):
    """_softmax_backward_data(grad, out): reads both, writes grad_x."""
    n, b = numel(x), _size(out_itemsize, x)
    return Grad(_gx(n, itemsize(x), "_softmax_backward_data", reads=2 * n * b) if grads[0] else Cost(), ["out"])


@register_backward("softmax_fp32")
def softmax_fp32_backward(x, *, grads, weight_grad, out_itemsize=S.dtype_bytes):
    """The downcast's backward (grad to fp32), _softmax_backward_data in fp32 on the saved fp32
    output, the upcast's backward (grad back to the input's size)."""
    n, b = numel(x), itemsize(x)
    if not grads[0]:
        return Grad(Cost())
    cost = (_cast(n, out_itemsize, FLOAT32)
            + _gx(n, FLOAT32, "_softmax_backward_data", reads=2 * FLOAT32 * n)
            + _cast(n, FLOAT32, b))
    return Grad(_with_output(cost, n * b), ["out"])


@register_backward("layer_norm")
def layer_norm_backward(x, *, grads, weight_grad, eps=None, out_itemsize=None, **attrs):
    """aten.native_layer_norm_backward: reads grad, x, mean, rstd and the weight; writes grad_x and
    (trained) grad_weight and grad_bias."""
    d, rows = x[-1], prod(x[:-1])
    b, n = itemsize(x), numel(x)
    if not (grads[0] or weight_grad):
        return Grad(Cost())
    cost = _cost(ew=ew("native_layer_norm_backward", n), read=2 * n * b + 2 * rows * b + d * b,
                 written=(n * b if grads[0] else 0) + (2 * d * b if weight_grad else 0),
                 out=n * b if grads[0] else 0)
    return Grad(cost, [0])


@register_backward("rms_norm")
def rms_norm_backward(x, *, grads, weight_grad, eps):
    """The backward of the fp32 composite (weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)): the
    weight multiply's gradients (grad * w; grad * normed, summed over rows when trained), the casts'
    backward, the product's (grad * rstd; grad * x32 summed per row), rsqrt's and mean's per row and
    broadcast back, pow's (x^1, times 2, times grad: aten's pow_backward), and the two paths into x32
    added."""
    rows, h = prod(x[:-1]), x[-1]
    n, b = rows * h, itemsize(x)
    f = FLOAT32
    cost = _cost(ew=ew("mul", n), read=n * b + h * b, written=n * b)                          # grad * weight
    if weight_grad:   # grad * normed, then its row sum (reads the product)
        cost += _cost(ew=ew("mul", n) + ew("sum", n), read=2 * n * b + n * b, written=n * b + h * b)
    cost += (_cast(n, b, f)
             + _cost(ew=ew("mul", n), read=n * f + rows * f, written=n * f)                  # grad * rstd
             + _cost(ew=ew("mul", n) + ew("sum", n), read=2 * n * f + n * f, written=n * f + rows * f)
             + _cost(ew=3 * ew("mul", rows), read=4 * rows * f, written=3 * rows * f)        # rsqrt': pow, mul, mul
             + _cost(ew=ew("div", n), read=rows * f, written=n * f)                          # mean': expand / h
             + _cost(ew=3 * ew("mul", n), read=4 * n * f, written=3 * n * f)                  # pow': x^1, x 2, x grad
             + _cost(ew=ew("add", n), read=2 * n * f, written=n * f)                          # two paths
             + _cast(n, f, b))
    return Grad(_with_output(cost, n * b), [0])


@register_backward("rope_apply")
def rope_apply_backward(x, tables, *, grads, weight_grad):
    """grad * cos, grad * sin, rotate_half's backward (the halves swapped, one negated: neg and cat's
    backward; then each half's slice_backward writes a full-size gradient, zeros elsewhere, and autograd
    adds the two), and the two paths added."""
    n, b = numel(x), itemsize(x)
    table = prod(tables[1:]) * itemsize(tables)
    if not grads[0]:
        return Grad(Cost())
    cost = (_cost(ew=ew("mul", n), read=n * b + table, written=n * b)
            + _cost(ew=ew("mul", n), read=n * b + table, written=n * b)
            + _cost(ew=ew("neg", n / 2), read=n / 2 * b, written=n / 2 * b)
            + _cost(read=n * b, written=2 * n * b)                                  # 2 x slice_backward
            + _cost(ew=ew("add", n), read=2 * n * b, written=n * b)                 # the halves' sum
            + _cost(ew=ew("add", n), read=2 * n * b, written=n * b))
    return Grad(_with_output(cost, n * b), [1])


@register_backward("mean")
def mean_backward(x, *, grads, weight_grad, dim, keepdim=True, out_itemsize=None):
    """grad expanded over the reduced dim and divided by its size: one op over the input's elements."""
    n, b = numel(x), itemsize(x)
    return Grad(_gx(n, b, "div", reads=numel(x) / x[dim] * b) if grads[0] else Cost())


@register_backward("interpolate")
def interpolate_backward(x, *, grads, weight_grad, mode, size, antialias=False, out_itemsize=None):
    """The upsample's backward kernel: every output gradient spread over its taps (the forward's
    FLOPs per output element); reads the gradient, writes grad_x."""
    out, fwd = interpolate(x, mode=mode, size=size, antialias=antialias, out_itemsize=out_itemsize)
    if not grads[0]:
        return Grad(Cost())
    return Grad(_cost(ew=fwd.elementwise_flops, read=nbytes(out), written=nbytes(x), out=nbytes(x)))


@register_backward("cast")
def cast_backward(x, *, grads, weight_grad, out_itemsize=None, dtype=None):
    """The gradient cast back to the input's element size (a copy when the forward copied)."""
    size = sp.sympify(out_itemsize if out_itemsize is not None else DTYPE_BYTES.get(dtype, itemsize(x)))
    return Grad(_cast(numel(x), size, itemsize(x)) if grads[0] else Cost())


@register_backward("reshape", "flatten", "slice", "permute", "window_partition", "window_unpartition", "pad",
                   "cat", "clone", "heads_merge")
def view_backward(*xs, grads, weight_grad, **attrs):
    """A view's gradient is a view of the gradient; clone's and contiguous' pass it through; pad's and
    cat's are slices of it (views): no kernel. One exception: a split into heads (B, L, H*D) ->
    (B, H, L, D) is a view then a transpose, so the gradient reaching the view is transposed and its
    reshape back copies it (`heads_split`)."""
    if grads and grads[0] and heads_split(xs[0], attrs.get("shape")):
        n = numel(xs[0]) * itemsize(xs[0])
        return Grad(_cost(read=n, written=n, out=n))
    return Grad(Cost())


def heads_split(x: Shape, shape) -> bool:
    """Whether a reshape (B, L, H*D) -> (B, H, L, D) (H > 1) is a split into attention heads."""
    if shape is None or len(x) != 3 or len(shape) != 4:
        return False
    same = lambda a, b: sp.simplify(sp.sympify(a) - sp.sympify(b)) == 0
    return (same(shape[0], x[0]) and same(shape[2], x[1]) and same(shape[1] * shape[3], x[2])
            and sp.sympify(shape[1]) != 1)


@register_backward("index")
def index_backward(table, idx, *, grads, weight_grad):
    """table[idx]'s backward: zeros of the table's shape, then index_put_ with accumulate of the
    gradient rows (one add per gathered element); reads the index and the gradient."""
    if not grads[0]:
        return Grad(Cost())
    out = (*idx, *table[1:])
    b = itemsize(table)
    cost = _cost(written=nbytes(table)) + _cost(ew=ew("index_put_acc", numel(out)),
                                               read=nbytes(idx) + numel(out) * b + nbytes(table),
                                               written=nbytes(table), out=nbytes(table))
    return Grad(cost, [1])


@register_backward("embedding")
def embedding_backward(ids, *, grads, weight_grad, num_embeddings, embedding_dim, out_itemsize=S.dtype_bytes):
    """aten.embedding_dense_backward (only when the table trains): one kernel reading the ids and the
    gradient rows, adding each row at its id, writing the table's gradient."""
    if not weight_grad:
        return Grad(Cost())
    table = num_embeddings * embedding_dim * out_itemsize
    n = numel(ids) * embedding_dim
    return Grad(_cost(ew=ew("embedding_dense_backward", n), read=nbytes(ids) + n * out_itemsize, written=table), [0])


@register_backward("masked_scatter_")
def masked_scatter_backward(x, source, *, grads, weight_grad):
    """grad of the embeddings: the gradient with the image slots zeroed (masked_fill); grad of the image
    features: the gradient's image slots (masked_select): each reads the mask and the gradient."""
    tokens = prod(x[:-1])
    cost = Cost()
    if grads[0]:
        cost += _cost(ew=ew("masked_fill_", numel(x)), read=tokens * BOOL + nbytes(x), written=nbytes(x),
                      out=nbytes(x))
    if len(grads) > 1 and grads[1]:
        cost += _cost(read=tokens * BOOL + nbytes(x), written=nbytes(source), out=nbytes(source))
    return Grad(cost)


@register_backward("router_topk")
def router_topk_backward(scores, *, grads, weight_grad, k):
    """topk's backward: `grad.new_zeros(scores' shape)` (reads its receiver, the k weights' gradient, by the
    footprint rule), then `scatter` of that gradient at the indices into the zeros (reads the zeros, the
    indices and the gradient; writes the result)."""
    if not grads[0]:
        return Grad(Cost())
    tokens = prod(scores[:-1])
    b = itemsize(scores)
    grad = tokens * k * b
    return Grad(_cost(read=grad + nbytes(scores) + tokens * k * INT64 + grad, written=2 * nbytes(scores),
                      out=nbytes(scores)))


@register_backward("moe_repeat")
def moe_repeat_backward(x, *, grads, weight_grad, k):
    """repeat_interleave's backward: the k copies' gradients summed per token."""
    if not grads[0]:
        return Grad(Cost())
    return Grad(_cost(ew=ew("sum", numel(x) * k), read=nbytes(x) * k, written=nbytes(x), out=nbytes(x)))


@register_backward("expert_rows", index_inputs=(1,))
def expert_rows_backward(x, idx, *, grads, weight_grad, experts):
    """Per expert, x[mask]'s backward: `new_zeros` of x's shape (called on the rows' gradient: reads it),
    the rows' gradient put at the mask (index_put with accumulate: reads the zeros, the mask and the
    rows, one add per row element, writes x's shape), and the experts' E gradients of x summed by
    autograd (E - 1 adds of x's size)."""
    if not grads[0]:
        return Grad(Cost())
    slots, width = x[0], x[-1]
    b = itemsize(x)
    full = slots * width * b
    cost = (_cost(read=full, written=experts * full)
            + _cost(ew=ew("index_put_acc", slots * width), read=experts * (full + BOOL * slots) + full,
                    written=experts * full)
            + _cost(ew=(experts - 1) * ew("add", slots * width), read=2 * (experts - 1) * full,
                    written=(experts - 1) * full, out=full))
    return Grad(cost, [1])


@register_backward("expert_scatter", index_inputs=(1,))
def expert_scatter_backward(rows, idx, *, grads, weight_grad, experts):
    """Per expert, the gradient of its rows: the output gradient at the expert's mask (a boolean gather).
    Every put but the first (y = empty_like(x) needs no gradient) also hands the y it overwrote a
    gradient: zeros of the put rows' shape, then index_put of them at the mask into the gradient
    (reads it whole, the mask and the zeros; writes y's shape). The zeros' rows are those of experts
    1..E-1: data-dependent; counted as all k*T rows (the data-independent total), so the reference
    reads and writes the first expert's rows x width fewer bytes than predicted (see
    costgraph.verify.train_metrics)."""
    if not grads[0]:
        return Grad(Cost())
    slots, width = rows[0], rows[-1]
    b = itemsize(rows)
    full = slots * width * b
    cost = (_cost(read=experts * BOOL * slots + full, written=full, out=full)
            + _cost(written=full)
            + _cost(read=(experts - 1) * (full + BOOL * slots) + full, written=(experts - 1) * full))
    return Grad(cost, [1])


@register_backward("weighted_sum")
def weighted_sum_backward(y, w, *, grads, weight_grad, k, out_itemsize=S.dtype_bytes):
    """The cast's backward (to fp32), the sum's (a broadcast view), the product's: grad * w (fp32, cast
    to y's size) and grad * y summed over the hidden dim (the routing weights' gradient)."""
    slots, width = y
    tokens = slots / k
    n = slots * width
    cost = _cast(tokens * width, out_itemsize, FLOAT32)
    if grads[0]:
        cost += _cost(ew=ew("mul", n), read=FLOAT32 * tokens * width + nbytes(w), written=FLOAT32 * n)
        cost += _cast(n, FLOAT32, itemsize(y))
    if grads[1]:
        cost += _cost(ew=ew("mul", n) + ew("sum", n), read=FLOAT32 * tokens * width + nbytes(y) + FLOAT32 * n,
                      written=FLOAT32 * n + nbytes(w))
    out = (n * itemsize(y) if grads[0] else 0) + (nbytes(w) if grads[1] else 0)
    return Grad(_with_output(cost, out), [0, 1])


@register_backward("aux_loss", index_inputs=(1,))
def aux_loss_backward(scores, idx, *, grads, weight_grad, experts, k, batch):
    """The balance loss's gradient into the routing scores, op by op back from the scalar: x alpha (mul),
    the batch mean's (div over the batch), the sum's (a broadcast view) and the product's (x counts,
    per sequence and expert), the token mean's (div, expanded over the scores)."""
    if not grads[0]:
        return Grad(Cost())
    n, counts, f = numel(scores), batch * experts, FLOAT32
    cost = (_cost(ew=ew("mul", 1), read=f, written=f)
            + _cost(ew=ew("div", batch), read=f, written=f * batch)
            + _cost(ew=ew("mul", counts), read=f * batch + f * counts, written=f * counts)
            + _cost(ew=ew("div", n), read=f * counts, written=f * n))
    return Grad(_with_output(cost, f * n))


@register_backward("attach_loss")
def attach_loss_backward(x, loss, *, grads, weight_grad):
    """The gradient of y passes through; the auxiliary loss gets a one (torch.ones(1)), which autograd
    sums to the loss's scalar shape (a sum over one element)."""
    if not (len(grads) > 1 and grads[1]):
        return Grad(Cost())
    b = itemsize(loss)
    return Grad(_cost(written=b) + _cost(ew=ew("sum", 1), read=b, written=b, out=b))


@register_backward("log_softmax")
def log_softmax_backward(x, *, grads, weight_grad, **attrs):
    """_log_softmax_backward_data(grad, out): reads both, writes grad_x."""
    n, b = numel(x), itemsize(x)
    return Grad(_gx(n, b, "_log_softmax_backward_data", reads=2 * n * b) if grads[0] else Cost(), ["out"])


@register_backward("nll_loss")
def nll_loss_backward(log_probs, *, grads, weight_grad, **attrs):
    """The seed (`ones_like(loss)`: backward's first gradient), then aten.nll_loss_backward: reads the
    seed, the log-probabilities (its self argument), the labels and the total weight; writes -1/n at
    each row's label, zeros elsewhere."""
    rows = prod(log_probs[:-1])
    b = itemsize(log_probs)
    if not grads[0]:
        return Grad(Cost())
    return Grad(_cost(read=b, written=b) + _cost(ew=ew("nll_loss_backward", rows),
                                                 read=nbytes(log_probs) + rows * INT64 + 2 * b,
                                                 written=nbytes(log_probs), out=nbytes(log_probs)))


def backward(kind: str, inputs: Sequence[Shape], attrs: dict, grads: tuple, weight_grad: bool) -> Grad:
    """The backward formula of a node (its forward's kind, input specs and attrs)."""
    (cost, saved), when = _memoised(BACKWARD, "backward formula", kind, inputs, attrs, grads=tuple(grads),
                                    weight_grad=bool(weight_grad))
    return Grad(cost if when is None else cost * when, saved)
