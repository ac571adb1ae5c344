"""Counting conventions beyond matmul FLOPs: one table, used by the graph's formulas and by the
dispatch-level profiler alike (`verify/dispatch.py`), so both count the same way.

Elementwise FLOPs are counted per aten op as `FLOPS_PER_ELEMENT[op] x elements`, where the
elements are the op's output (`OUT`) or its first input (`IN`, for reductions and fused
normalisations). Matmul-class ops (mm, addmm, bmm, convolution, SDPA's products) are the
`flops` metric and count 0 here, their bias add included, as in torch's flop counter.

The choices (documented, not measured):
- every arithmetic or transcendental elementwise op is 1 FLOP per output element
  (add, mul, div, exp, rsqrt, pow, sigmoid, silu, gelu, ...): one op, one FLOP;
- a reduction is 1 FLOP per input element (sum, mean, amax, topk's comparisons);
- fused kernels are the sum of their parts: softmax 5 per element (max, subtract, exp, sum,
  divide); layer_norm 7 (mean, centre, square, variance sum, normalise, scale, shift);
- interpolation: 2 FLOPs (a multiply-add) per tap: linear 1-D 2 taps -> 4, bicubic 4x4 -> 32,
  antialiased bicubic counted like plain bicubic per output element (its support widens when
  it shrinks; the convention does not follow that);
- data movement (copies, casts, padding, cat, gather/scatter, index, embedding lookup, arange,
  fills) is 0 FLOPs: it is bytes only; index_add_ adds 1 per source element.
- fused SDPA (CPU flash kernel): per score 1 (scale) + 1 (mask add, when a mask is given)
  + 5 (softmax); its two products are the `flops` metric.

Bytes: an op reads the memory footprint of every tensor argument and writes that of every
output (an in-place op writes its mutated argument); views and aliases move nothing. The
footprint of a tensor counts each distinct element once (a broadcast, stride-0 view of a
vector is the vector).

Gathers (`GATHERS`: aten.embedding, aten.index with index tensors, aten.index_select,
aten.gather) are the one exception on the read side (`gather_bytes_read`): they read the
footprint of their index tensors and one source element per output element (the rows they
take, a row taken twice counted twice), not the source's footprint. Why: a lookup touches only
the rows its indices name; charging it the whole table made a decode step's token embedding
(one row of the 129,280 x 1,280 vocabulary) read 331 MB of the ~1.66 GB the step read, and
made every MoE expert re-read all of the hidden states for its few routed rows. The count is
the output's element count at the source's element size: it depends on shapes only (meta
tensors and symbolic shapes give it), whatever the index values. Repeats count because each is
a load the kernel issues (caches are not modelled anywhere in these conventions), so a gather
can read more than its source: a relative-position lookup takes s x s rows of a (2s - 1)-row table.
Boolean-mask indexing (`x[mask]`: aten.index with a bool or uint8 index) follows the same rule
with the mask as the index: the mask is read whole (the kernel scans every element) and each
selected element is one element read; the selected count depends on the data (it is the
output's size, which a real run has and meta tensors cannot give), so no graph formula models
one (a model that scatters into masked slots uses masked_scatter_, which reads all its
arguments). Writes are unchanged: the output.
"""
from __future__ import annotations

OUT, IN = "out", "in"

ONE_PER_OUT = (
    "add", "sub", "mul", "div", "neg", "exp", "log", "rsqrt", "sqrt", "pow", "reciprocal", "sigmoid",
    "tanh", "abs", "clamp", "clamp_min", "maximum", "minimum", "where", "masked_fill", "eq", "ne", "gt", "ge",
    "lt", "le", "silu", "gelu", "erf", "cos", "sin", "add_", "mul_", "div_", "sub_", "masked_fill_",
    "bitwise_not", "logical_not", "bitwise_and", "bitwise_or",
)
ONE_PER_IN = ("sum", "mean", "amax", "amin", "max", "min", "topk", "argmax", "var", "std", "any", "all",
              "_is_all_true")
ZERO = (
    "clone", "_to_copy", "copy_", "contiguous", "cat", "stack", "constant_pad_nd", "index", "index_select",
    "gather", "scatter", "embedding", "arange", "fill_", "zero_", "zeros", "zeros_like", "empty", "empty_like",
    "full", "ones", "ones_like", "new_zeros", "new_empty", "one_hot", "nonzero", "slice_scatter",
    "masked_scatter", "index_put_", "repeat", "lift_fresh", "scalar_tensor", "_local_scalar_dense", "item",
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "_unsafe_view", "view", "permute",
    "transpose", "t", "expand", "unsqueeze", "squeeze", "select", "slice", "unbind", "split",
    "split_with_sizes", "chunk", "alias", "detach", "as_strided", "reshape", "_reshape_alias",
    "resize_", "set_", "scatter_", "masked_scatter_",
    # backward data movement: a slice's/select's gradient written into zeros of the input's shape, the
    # uninitialised buffer in-place ops' backward copy into, masked_scatter's source gradient (a select)
    "slice_backward", "select_backward", "new_empty_strided", "masked_scatter_backward",
)

FLOPS_PER_ELEMENT: dict[str, tuple[int, str]] = {
    **{op: (1, OUT) for op in ONE_PER_OUT},
    **{op: (1, IN) for op in ONE_PER_IN},
    **{op: (0, OUT) for op in ZERO},
    "_softmax": (5, IN),
    "_safe_softmax": (5, IN),
    "softmax": (5, IN),
    "native_layer_norm": (7, IN),
    "upsample_linear1d": (4, OUT),
    "upsample_bicubic2d": (32, OUT),
    "_upsample_bicubic2d_aa": (32, OUT),
    "index_add_": (1, "source"),
    "aminmax": (2, IN),  # two reductions in one pass (one_hot's range check): min and max
    # backward kernels (autograd's aten ops): an activation's derivative times the incoming gradient
    # is one op (1 per element, like its forward); fused ones are the sum of their parts
    **{op: (1, OUT) for op in ("gelu_backward", "silu_backward", "sigmoid_backward", "tanh_backward",
                               "threshold_backward", "masked_fill_")},
    # index_put(_) with accumulate=True (the dispatch recorder names it so): one add per value put
    "index_put_acc": (1, "source"),
    "index_put": (0, OUT),
    "embedding_dense_backward": (1, IN),     # one add per gradient element, into its id's row                   # without accumulate: a write of the values (data movement)
    "_softmax_backward_data": (4, OUT),      # grad * out, row sum, subtract, multiply
    "_log_softmax": (5, IN),                 # max, subtract, exp, sum, log-subtract
    "_log_softmax_backward_data": (4, OUT),  # exp(out), row sum of grad, multiply, subtract
    "nll_loss_forward": (1, "source"),       # one pick and accumulate per target row
    "nll_loss_backward": (1, "source"),      # one write of -1/n per target row
    "native_layer_norm_backward": (12, IN),  # x-hat (2), g*w (1), two row sums (2), combine (4), dw, db (3)
    "scatter_add_": (1, "source"),
    "_foreach_adamw": (12, OUT),             # AdamW per parameter element: decay, two moments, bias corrections, update
    "_foreach_adamw8bit": (16, OUT),         # + dequantise and requantise both moments
    "_foreach_sgd": (2, OUT),                # p -= lr * g
}

# Per attention score inside a fused SDPA kernel (the CPU flash kernel).
SDPA_SCALE, SDPA_MASK, SDPA_SOFTMAX = 1, 1, 5

# Aten ops that gather elements of their first argument (the source) by index tensors.
GATHERS = ("embedding", "index", "index_select", "gather")


def gather_bytes_read(index_bytes, gathered_elements, source_itemsize):
    """Bytes a gather (`GATHERS`) reads: its index tensors' footprint (`index_bytes`) plus one
    source element per output element, not the source's footprint (see the module docstring).
    Works alike on ints (the dispatch recorder) and sympy expressions (the graph's formulas)."""
    return index_bytes + gathered_elements * source_itemsize


# Aten ops that return an alias of an input although their schema does not say so.
ALIASING = ("_unsafe_view", "lift_fresh")


def elementwise_flops(op: str, elements_out: int, elements_in: int, elements_source: int = 0) -> int:
    """FLOPs of one aten op (by its packet name, e.g. 'add') under the table; unknown ops raise."""
    try:
        per, basis = FLOPS_PER_ELEMENT[op]
    except KeyError:
        raise KeyError(f"no elementwise convention for aten op {op!r}: add it to costgraph/conventions.py") from None
    n = {OUT: elements_out, IN: elements_in, "source": elements_source}[basis]
    return per * n
