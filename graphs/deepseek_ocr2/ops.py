"""Op formulas only DeepSeek-OCR 2 runs, registered in the engine's one op registry (`costgraph.ops.register`;
a kind registered twice raises). Written from the aten ops `transformers`' implementation runs
(`python -m costgraph.verify.deepseek_ocr2 trace` prints them), under `costgraph.conventions`.
"""
from __future__ import annotations

import sympy as sp

from costgraph.cost import Cost
from costgraph.dtypes import BOOL, INT64
from costgraph import params
from costgraph.ops import OPS, ew, itemsize, nbytes, numel, prod, register
from . import symbols as S


def _cost(*, ew_flops=0, read=0, written=0, out=0) -> Cost:
    x = lambda e: sp.expand(sp.sympify(e))
    return Cost(flops=sp.Integer(0), elementwise_flops=x(ew_flops), bytes_read=x(read), bytes_written=x(written),
                activation_bytes=x(out))


@register("arange_ids")
def arange_ids(*, tokens):
    """`torch.arange(N)` (int64) as position ids."""
    n = sp.sympify(tokens)
    return (1, n), _cost(written=INT64 * n, out=INT64 * n)


@register("block_causal_mask")
def block_causal_mask(pos, *, batch, patches):
    """The encoder's hybrid mask (`create_causal_mask` with `block_sequence_ids`, SDPA's boolean mask):
    block ids `full((B, N), -1)` with the first `patches` set to 0 (`fill_`), then `sdpa_mask`: batch,
    head and offset q/kv aranges, `kv <= q` (causal) or-ed into a scalar False, the two block-id
    gathers, `q_group == kv_group`, `q_group >= 0`, their `and`, or-ed with the causal part.
    Output: bool (B, 1, N, N): image tokens see each other, queries see the image and earlier queries."""
    n, bsz, k = sp.sympify(pos[-1]), sp.sympify(batch), sp.sympify(patches)
    bn, nn_, bnn = bsz * n, n * n, bsz * n * n
    cost = (_cost(written=INT64 * bn)                                           # full
            + _cost(read=INT64, written=INT64 * bsz * k)                        # [:, :patches] = 0
            + _cost(written=INT64 * (bsz + 1))                                  # batch, head aranges
            + 2 * _cost(ew_flops=ew("add", n), read=INT64 * n, written=2 * INT64 * n)   # q, kv aranges + offsets
            + _cost(read=INT64 * n, written=BOOL)                               # new_zeros(()) (False)
            + _cost(ew_flops=ew("le", nn_), read=2 * INT64 * n, written=BOOL * nn_)
            + _cost(ew_flops=ew("bitwise_or", nn_), read=BOOL + BOOL * nn_, written=BOOL * nn_)
            + 2 * _cost(read=INT64 * (bsz + n) + INT64 * bn, written=INT64 * bn)   # block ids of q, of kv
            + _cost(ew_flops=ew("eq", bnn), read=2 * INT64 * bn, written=BOOL * bnn)
            + _cost(ew_flops=ew("ge", bn), read=INT64 * bn, written=BOOL * bn)
            + _cost(ew_flops=ew("bitwise_and", bnn), read=BOOL * (bnn + bn), written=BOOL * bnn)
            + _cost(ew_flops=ew("bitwise_or", bnn), read=BOOL * (nn_ + bnn), written=BOOL * bnn, out=BOOL * bnn))
    return (bsz, 1, n, n), cost


@register("mask_to_float")
def mask_to_float(mask):
    """SDPA turns a boolean mask into an additive one in the query's dtype: two scalars, then
    `where(mask, 0, -inf)`."""
    n, b = numel(mask), S.dtype_bytes
    return tuple(mask), _cost(ew_flops=ew("where", n), read=BOOL * n + 2 * b, written=2 * b + b * n, out=b * n)


@register("repeat_kv")
def repeat_kv(x, *, groups):
    """transformers' `repeat_kv`: the (B, kv_heads, N, d) keys or values expanded to every query head
    and reshaped (a copy): reads the kv heads once, writes them `groups` times."""
    bsz, kvh, n, d = x
    out = (bsz, kvh * groups, n, d)
    return out, _cost(read=nbytes(x), written=prod(out) * itemsize(x), out=prod(out) * itemsize(x))


@register("placeholder_scatter")
def placeholder_scatter(x, source):
    """`DeepseekOcr2Model.forward` merging the image features: `input_ids == image_token_id` (bool mask),
    its sum, the token-count check (`n * hidden == numel`: a multiply and a compare of 0-d tensors, the
    count formatted into the message (one int64 read), `_is_all_true` (a reduction of one element, the
    `all` convention) and its `item`), then the out-of-place `masked_scatter` (reads the embeddings, the
    mask and the features; writes new embeddings)."""
    tokens = prod(x[:-1])
    check = (_cost(ew_flops=ew("eq", tokens), read=INT64 * tokens, written=BOOL * tokens)
             + _cost(ew_flops=ew("sum", tokens), read=BOOL * tokens, written=INT64)
             + _cost(ew_flops=ew("mul", 1), read=INT64, written=INT64)
             + _cost(ew_flops=ew("eq", 1), read=INT64, written=BOOL)
             + _cost(read=INT64)                                   # the count formatted (item)
             + _cost(ew_flops=ew("all", 1), read=BOOL, written=BOOL)
             + _cost(read=BOOL))                                   # item of the check
    scatter = _cost(read=nbytes(x) + BOOL * tokens + nbytes(source), written=nbytes(x), out=nbytes(x))
    return tuple(x), check + scatter


@register("linear_bias_apart")
def linear_bias_apart(x, *, in_features, out_features, bias: bool = True, weight_itemsize=None):
    """`F.linear` on a non-contiguous 3-D input: torch runs a matmul without the bias (this node: the
    copy of the input is a reshape node before it) and adds the bias in place afterwards (an `add` node).
    The module's weights are the Linear's, bias included (`costgraph.params`' linear rule)."""
    return OPS["linear"](x, in_features=in_features, out_features=out_features, bias=False,
                         weight_itemsize=weight_itemsize)


params.register("linear_bias_apart")(params.linear)
