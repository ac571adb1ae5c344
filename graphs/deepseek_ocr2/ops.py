"""Op formulas only DeepSeek-OCR 2 runs, registered in the engine's one op registry (`costgraph.ops.register`;
a kind registered twice raises). Written from the aten ops `transformers`' implementation runs
(`python -m costgraph.verify.deepseek_ocr2 trace` prints them), under `costgraph.conventions`.

Backward formulas (`costgraph.ops.register_backward`, beside the forward ones) for this model's kinds and
for the kinds of `transformers`' eager experts loop (zeros_like, gather, routing-weight gather,
index_add_): DeepSeek-OCR 2 is the one model whose training step runs that loop (DeepSeek-OCR's vendor
trains through its own `moe_train` path), so their gradients are registered here, with the model.
FLOPs are exact (none of these runs a matmul but the projector's); elementwise work and bytes follow the
aten ops autograd dispatches.
"""
from __future__ import annotations

import sympy as sp

from costgraph.cost import Cost
from costgraph import conventions as C
from costgraph.dtypes import BOOL, FLOAT32, INT64
from costgraph import params
from costgraph.ops import BACKWARD, OPS, Grad, ew, itemsize, nbytes, numel, prod, register, register_backward
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


@register("projector_linear")
def projector_linear(x, *, in_features, out_features, apart):
    """`multi_modal_projector` over a batch of global views (B, queries, 896), the batch symbolic: one view
    is a contiguous 2-D problem (`addmm`: reads the bias inside); more than one (`apart` = 1) hands
    F.linear a non-contiguous slice: a copy of the input, the matmul without bias, the bias added in place
    (one add per output element, reading the output and the bias, writing the output). FLOPs alike."""
    out, mm = OPS["linear"](x, in_features=in_features, out_features=out_features, bias=False)
    bias = out_features * itemsize(x)
    tokens = prod(x[:-1])
    n = tokens * out_features * itemsize(x)
    together = _cost(read=bias)
    separate = (_cost(read=nbytes(x), written=nbytes(x), out=nbytes(x))
                + _cost(ew_flops=ew("add", tokens * out_features), read=n + bias, written=n))
    return out, mm + together * (1 - apart) + separate * apart


params.register("projector_linear")(params.linear)


@register("shift_labels")
def shift_labels(labels):
    """`ForCausalLMLoss`'s labels after the pad (`pad(labels, (0, 1), value=-100)`, (B, L + 1): the engine's
    `nll_loss` counts it, as every model's loss runs it): `[..., 1:].contiguous()`, a copy of B x L int64 for
    B > 1; for one sequence the (1, L) slice is contiguous already (a dimension of size 1 has no stride) and
    nothing is copied. No FLOPs."""
    bsz, n = labels
    copies = sp.Piecewise((0, sp.Eq(bsz, 1)), (1, True))
    return (bsz * n,), _cost(read=INT64 * bsz * n * copies, written=INT64 * bsz * n * copies, out=INT64 * bsz * n)


@register("packed_sequence_check")
def packed_sequence_check(pos, *, batch):
    """`transformers`' `find_packed_sequence_indices` (masking_utils), which `create_causal_mask` runs when no
    cache and no 2-D mask are given (a training forward), on the position ids expanded to (B, L) (a view of the
    (1, L) int64 ids: read once): `pos[:, :1] - 1`, `diff(pos, prepend=...)` (a cat of B x (L + 1), then a sub
    of B x L), `!= 1`, `cumsum` (no elementwise convention: counted 0, as the recorder counts it),
    `[:, -1] == 0`, `.all()` and its read-back to Python (one sequence per row: not packed, the mask
    unchanged). No FLOPs."""
    n, b = sp.sympify(pos[-1]), sp.sympify(batch)
    bn = b * n
    cost = (_cost(ew_flops=ew("sub", b), read=INT64, written=INT64 * b)                  # pos[:, :1] - 1
            + _cost(read=INT64 * (b + n), written=INT64 * (bn + b))                        # diff: prepend (cat)
            + _cost(ew_flops=ew("sub", bn), read=2 * INT64 * bn, written=INT64 * bn)       # diff: sub
            + _cost(ew_flops=ew("ne", bn), read=INT64 * bn, written=BOOL * bn)
            + _cost(read=BOOL * bn, written=INT64 * bn)                                    # cumsum
            + _cost(ew_flops=ew("eq", b), read=INT64 * b, written=BOOL * b)
            + _cost(ew_flops=ew("all", b), read=BOOL * b, written=BOOL)
            + _cost(read=BOOL))                                                            # .item()
    return (), cost


# ---- backward formulas ------------------------------------------------------------------------------

@register_backward("repeat_kv")
def repeat_kv_backward(x, *, grads, weight_grad, groups):
    """The reshape's gradient is a view; the expand's sums the `groups` copies of each kv head (a sum
    reading the heads' gradient, writing the kv heads')."""
    if not grads[0]:
        return Grad(Cost())
    n = numel(x) * groups
    return Grad(_cost(ew_flops=ew("sum", n), read=n * itemsize(x), written=nbytes(x), out=nbytes(x)))


@register_backward("linear_bias_apart")
def linear_bias_apart_backward(x, *, grads, weight_grad, in_features, out_features, bias: bool = True,
                               weight_itemsize=None):
    """The matmul's two gradients and the in-place bias add's (the bias gradient: the output gradient
    summed over the rows), as one Linear's."""
    return BACKWARD["linear"](x, grads=grads, weight_grad=weight_grad, in_features=in_features,
                              out_features=out_features, bias=bias, weight_itemsize=weight_itemsize)


@register_backward("projector_linear")
def projector_linear_backward(x, *, grads, weight_grad, in_features, out_features, apart):
    """addmm's gradients and the bias's (the same kernels on either path; the copy's gradient is a view)."""
    return BACKWARD["linear"](x, grads=grads, weight_grad=weight_grad, in_features=in_features,
                              out_features=out_features, bias=True)


@register_backward("placeholder_scatter")
def placeholder_scatter_backward(x, source, *, grads, weight_grad):
    """The out-of-place masked_scatter's gradients are the in-place one's: the embeddings' gradient with
    the image slots zeroed, the features' the gradient's image slots (the count check has none)."""
    return BACKWARD["masked_scatter_"](x, source, grads=grads, weight_grad=weight_grad)


@register_backward("zeros_init", index_inputs=(0,))
def zeros_init_backward(x, *, grads, weight_grad):
    """zeros_like reads its input for the shape only: no gradient."""
    return Grad(Cost())


def _put_back(rows, width, full_rows, hits, b) -> Cost:
    """An index's backward summed over the `hits` expert runs: each run's `new_zeros` of the source's
    shape (`full_rows` x width) and an `index_put_` with accumulate of its gathered rows' gradient (one
    add per element; reads the index, the rows' gradient and the zeros), then autograd adds the runs'
    gradients of the one source (hits - 1 adds of its size)."""
    full = full_rows * width * b
    return (_cost(written=hits * full)
            + _cost(ew_flops=ew("index_put_acc", rows * width), read=rows * INT64 + rows * width * b + hits * full,
                    written=hits * full)
            + _cost(ew_flops=(hits - 1) * ew("add", full_rows * width), read=2 * (hits - 1) * full,
                    written=(hits - 1) * full, out=full))


# The eager loop's two gathers, as a training step runs them: the forward's formulas, but the node's
# expert runs (`launches`) named, so the backward (given the forward's attrs) knows how many
# zero-filled gradients it writes and adds.
@register("expert_gather_each")
def expert_gather_each(x, where, *, rows, width, launches):
    """`costgraph.ops.expert_gather`, one per expert run (`launches`)."""
    return OPS["expert_gather"](x, where, rows=rows, width=width)


@register("routed_gather_each")
def routed_gather_each(weights, where, *, rows, launches):
    """`costgraph.ops.routed_gather`, one per expert run (`launches`)."""
    return OPS["routed_gather"](weights, where, rows=rows)


@register("routed_linear_each")
def routed_linear_each(x, *, in_features, out_features, hits, experts):
    """`costgraph.ops.routed_linear` (one F.linear per expert run on `weight[i]` of the 3-D parameter), its
    stored copies (`experts`) named for the backward."""
    return OPS["routed_linear"](x, in_features=in_features, out_features=out_features, hits=hits)


params.register("routed_linear_each")(params.routed_linear)


@register_backward("expert_gather_each", index_inputs=(1,))
def expert_gather_each_backward(x, where, *, grads, weight_grad, rows, width, launches):
    """hidden_states[token_idx] per expert run: zeros of the tokens' shape, the rows' gradient put back at
    their tokens, the runs' gradients added."""
    if not grads[0]:
        return Grad(Cost())
    return Grad(_put_back(rows, width, x[0], launches, itemsize(x)), [1])


@register_backward("routed_gather_each", index_inputs=(1,))
def routed_gather_each_backward(weights, where, *, grads, weight_grad, rows, launches):
    """top_k_weights[token_idx, top_k_pos] per expert run: zeros of (tokens, k), the rows' weight
    gradients put back, the runs' gradients added."""
    if not grads[0]:
        return Grad(Cost())
    tokens, k = prod(weights[:-1]), weights[-1]
    return Grad(_put_back(rows, 1, tokens * k, launches, itemsize(weights)), [1])


@register_backward("index_add_", index_inputs=(2,))
def index_add_backward(acc, rows, where, *, grads, weight_grad, hits):
    """final.index_add_(0, token_idx, rows) per expert hit: final's gradient passes through; the rows'
    is the gradient's rows at their tokens (`index_select`, a gather: reads the index and the rows it
    takes, writes them)."""
    if not (len(grads) > 1 and grads[1]):
        return Grad(Cost())
    r, b = rows[0], itemsize(rows)
    n = numel(rows) * b
    return Grad(_cost(read=C.gather_bytes_read(r * INT64, numel(rows), b), written=n, out=n), [2])


@register_backward("arange_ids", "block_causal_mask", "mask_to_float", "shift_labels", "packed_sequence_check")
def no_gradient(*inputs, grads, weight_grad, **attrs):
    """Positions, masks (a boolean mask made additive: a constant of the mask) and labels: nothing upstream
    needs their gradient (integer or boolean sources)."""
    return Grad(Cost())


@register_backward("routed_linear_each")
def routed_linear_each_backward(x, *, grads, weight_grad, in_features, out_features, hits, experts):
    """The per-run matmuls' gradients (`routed_linear`'s), and, when the experts train, the 3-D parameter's
    gradient as autograd builds it from `weight[i]`: each run's select backward writes a zero-filled
    gradient of the whole parameter (all `experts`) and copies its slice in; the runs' gradients are then
    added (hits - 1 adds of the parameter's size)."""
    cost, saved = BACKWARD["routed_linear"](x, grads=grads, weight_grad=weight_grad, in_features=in_features,
                                            out_features=out_features, hits=hits)
    if weight_grad:
        one = in_features * out_features * itemsize(x)
        full = experts * one
        cost = (cost + _cost(written=hits * full) + _cost(read=hits * one, written=hits * one)
                + _cost(ew_flops=(hits - 1) * ew("add", experts * in_features * out_features),
                        read=2 * (hits - 1) * full, written=(hits - 1) * full))
    return Grad(cost, saved)
