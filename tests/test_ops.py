"""Each op formula against the real torch op, for random shapes: FLOPs against FlopCounterMode;
elementwise FLOPs and bytes against `costgraph.verify.dispatch.MetricRecorder` on CPU, at fp32 and bf16."""
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from costgraph import ops
from costgraph import symbols as S
from costgraph.verify.dispatch import MetricRecorder

dim = st.integers(1, 9)
settings.register_profile("fast", max_examples=25, deadline=None)
settings.load_profile("fast")


def counted(fn, *args, **kw) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args, **kw)
    return fc.get_total_flops()


@given(b=dim, t=dim, i=dim, o=dim, bias=st.booleans())
def test_linear(b, t, i, o, bias):
    x, w = torch.randn(b, t, i), torch.randn(o, i)
    shape, cost = ops.linear((b, t, i), in_features=i, out_features=o, bias=bias)
    assert cost.flops == counted(F.linear, x, w, torch.randn(o) if bias else None)
    assert shape == (b, t, o)


@given(b=st.integers(1, 3), c=dim, o=dim, h=st.integers(1, 20), k=st.integers(1, 5), s=st.integers(1, 3),
       p=st.integers(0, 2))
def test_conv2d(b, c, o, h, k, s, p):
    if h + 2 * p < k:
        return
    x, w = torch.randn(b, c, h, h + 1), torch.randn(o, c, k, k)
    out = F.conv2d(x, w, stride=s, padding=p)
    shape, cost = ops.conv2d((b, c, h, h + 1), in_channels=c, out_channels=o, kernel=k, stride=s, padding=p)
    assert tuple(int(d) for d in shape) == tuple(out.shape)
    assert cost.flops == counted(F.conv2d, x, w, stride=s, padding=p)


@given(b=dim, n=dim, k=dim, m=dim)
def test_bmm(b, n, k, m):
    _, cost = ops.matmul((b, n, k), (b, k, m))
    assert cost.flops == counted(torch.bmm, torch.randn(b, n, k), torch.randn(b, k, m))


@given(b=dim, h=dim, w=dim, c=st.integers(2, 9), k=dim)
def test_einsum_relpos(b, h, w, c, k):
    # With a contracted size of 1 torch lowers the einsum to an elementwise mul, which
    # FlopCounterMode does not count; the model's contractions are over 64 channels.
    q, r = torch.randn(b, h, w, c), torch.randn(h, k, c)
    shape, cost = ops.einsum((b, h, w, c), (h, k, c), equation="bhwc,hkc->bhwk")
    assert cost.flops == counted(torch.einsum, "bhwc,hkc->bhwk", q, r)
    assert shape == (b, h, w, k)


@given(b=dim, h=dim, lq=dim, lk=dim, e=dim, mask=st.booleans())
def test_sdpa_math_path(b, h, lq, lk, e, mask):
    # On `meta` SDPA lowers to its math path (bmm), which FlopCounterMode sees.
    q = torch.empty(b, h, lq, e, device="meta")
    k = v = torch.empty(b, h, lk, e, device="meta")
    m = torch.empty(b, h, lq, lk, device="meta") if mask else None
    _, cost = ops.sdpa((b, h, lq, e), (b, h, lk, e), (b, h, lk, e))
    assert cost.flops == counted(F.scaled_dot_product_attention, q, k, v, attn_mask=m)
    assert cost.flops > 0


def test_ceil_div_folds_nested_ceilings():
    import sympy as sp
    g = sp.Symbol("g", integer=True, positive=True)
    folded = ops.ceil_div(ops.ceil_div(g, 2), 2)
    assert folded == sp.ceiling(g / 4)
    for n in range(1, 200):
        assert folded.subs(g, n) == -(-(-(-n // 2)) // 2)


# ---- elementwise FLOPs and bytes: the formulas against every aten op a real CPU run records ------

DTYPES = {"fp32": (torch.float32, 4), "bf16": (torch.bfloat16, 2)}
dtypes = st.sampled_from(sorted(DTYPES))
small = st.integers(2, 6)


def measured(fn, *args, **kw) -> dict:
    """Elementwise FLOPs and bytes of every aten op `fn` runs (CPU), and the ops themselves."""
    with MetricRecorder() as rec, torch.no_grad():
        fn(*args, **kw)
    return {**rec.totals(), "ops": [c.op for c in rec.calls if c.bytes_read or c.bytes_written]}


def predicted(cost, size) -> dict:
    at = lambda e: int(sp.sympify(e).subs(S.dtype_bytes, size))
    return {"elementwise_flops": at(cost.elementwise_flops), "bytes_read": at(cost.bytes_read),
            "bytes_written": at(cost.bytes_written)}


def check(cost, size, got, ops_seen=None):
    m = {k: v for k, v in got.items() if k != "ops"}
    assert predicted(cost, size) == m, (got["ops"], predicted(cost, size), m)
    assert m["bytes_read"] > 0 and m["bytes_written"] > 0  # a run that measured nothing proves nothing
    if ops_seen is not None:
        assert got["ops"] == ops_seen


def t(shape, dtype):
    return torch.randn(*shape).to(dtype)


@given(b=dim, t_=dim, i=dim, o=dim, bias=st.booleans(), d=dtypes)
def test_linear_bytes(b, t_, i, o, bias, d):
    dt, size = DTYPES[d]
    x, w = t((b, t_, i), dt), t((o, i), dt)
    _, cost = ops.linear((b, t_, i), in_features=i, out_features=o, bias=bias)
    check(cost, size, measured(F.linear, x, w, t((o,), dt) if bias else None), ["addmm" if bias else "mm"])
    assert cost.activation_bytes.subs(S.dtype_bytes, size) == b * t_ * o * size


@given(b=st.integers(1, 2), c=dim, o=dim, h=st.integers(3, 12), k=st.integers(1, 3), s=st.integers(1, 2),
       p=st.integers(0, 1), bias=st.booleans(), d=dtypes)
def test_conv2d_bytes(b, c, o, h, k, s, p, bias, d):
    dt, size = DTYPES[d]
    x, w = t((b, c, h, h + 1), dt), t((o, c, k, k), dt)
    _, cost = ops.conv2d((b, c, h, h + 1), in_channels=c, out_channels=o, kernel=k, stride=s, padding=p, bias=bias)
    check(cost, size, measured(F.conv2d, x, w, t((o,), dt) if bias else None, stride=s, padding=p), ["convolution"])


@given(b=dim, n=dim, k=dim, m=dim, d=dtypes)
def test_bmm_bytes(b, n, k, m, d):
    dt, size = DTYPES[d]
    _, cost = ops.matmul(ops.Spec((b, n, k)), ops.Spec((b, k, m)))
    check(cost, size, measured(torch.bmm, t((b, n, k), dt), t((b, k, m), dt)), ["bmm"])


@given(b=small, h=small, w=small, c=small, k=small, d=dtypes)
def test_einsum_operand_copies(b, h, w, c, k, d):
    """SAM's rel-pos einsums: torch copies q for `h` always; for `w` only when q is the head-
    interleaved view into the unsplit qkv (one sequence), not when q is contiguous."""
    dt, size = DTYPES[d]
    q = t((b, h, w, c), dt)
    view_q = t((h, w, 3, b, c), dt)[:, :, 1].permute(2, 0, 1, 3)  # (heads, h, w, c), heads innermost
    shape, table = (b, h, w, c), t((h, k, c), dt)
    for eq, qq, copies in (("bhwc,hkc->bhwk", q, (0,)), ("bhwc,wkc->bhwk", q, ()),
                           ("bhwc,wkc->bhwk", view_q, (0,)), ("bhwc,wkc->bhwk", view_q, ((0, 1),))):
        tab = table if eq.endswith("hkc->bhwk") else t((w, k, c), dt)
        _, cost = ops.einsum(shape, tab.shape, equation=eq, copies=copies)
        check(cost, size, measured(torch.einsum, eq, qq, tab))


@given(b=st.integers(1, 3), h=st.integers(1, 3), lq=st.integers(1, 20), lk=st.integers(1, 20),
       e=st.sampled_from([8, 16, 64]), mask=st.booleans(), d=dtypes)
def test_sdpa_fused_cpu_kernel(b, h, lq, lk, e, mask, d):
    dt, size = DTYPES[d]
    q, k, v = t((b, h, lq, e), dt), t((b, h, lk, e), dt), t((b, h, lk, e), dt)
    m = t((b, h, lq, lk), dt) if mask else None
    spec = [ops.Spec(x.shape) for x in (q, k, v)] + ([ops.Spec(m.shape)] if mask else [])
    _, cost = ops.sdpa(*spec)
    check(cost, size, measured(F.scaled_dot_product_attention, q, k, v, attn_mask=m),
          ["_scaled_dot_product_flash_attention_for_cpu"])


@given(rows=dim, n=dim, d=dtypes)
def test_layer_norm_bytes(rows, n, d):
    dt, size = DTYPES[d]
    x = t((2, rows, n), dt)
    _, cost = ops.layer_norm(ops.Spec(x.shape), eps=1e-6)
    check(cost, size, measured(F.layer_norm, x, (n,), t((n,), dt), t((n,), dt)), ["native_layer_norm"])


shape3 = st.tuples(small, small, small)


@given(a=shape3, ones=st.tuples(st.booleans(), st.booleans(), st.booleans()), kind=st.sampled_from(sorted(ops.BINARY)),
       d=dtypes)
def test_binary_broadcast(a, ones, kind, d):
    dt, size = DTYPES[d]
    bshape = tuple(1 if one else n for n, one in zip(a, ones))
    x, y = t(a, dt), t(bshape, dt)
    _, cost = ops.OPS[kind](ops.Spec(a), ops.Spec(bshape))
    check(cost, size, measured(getattr(torch, kind), x, y), [kind])


@given(a=shape3, kind=st.sampled_from(["gelu", "sigmoid", "sqrt", "exp", "tanh"]), d=dtypes)
def test_unary(a, kind, d):
    dt, size = DTYPES[d]
    x = t(a, dt).abs()
    fn = F.gelu if kind == "gelu" else getattr(torch, kind)
    _, cost = ops.OPS[kind](ops.Spec(a))
    check(cost, size, measured(fn, x), [kind])
    _, cost = ops.OPS["pow"](ops.Spec(a))
    check(cost, size, measured(torch.pow, x, 2), ["pow"])
    _, cost = ops.OPS["add"](ops.Spec(a))  # a Python scalar operand is no input
    check(cost, size, measured(torch.add, x, 1e-6), ["add"])


@given(a=shape3, d=dtypes)
def test_quick_gelu_softmax_mean(a, d):
    dt, size = DTYPES[d]
    x = t(a, dt)
    _, cost = ops.quick_gelu(ops.Spec(a))
    check(cost, size, measured(lambda v: v * torch.sigmoid(1.702 * v), x), ["mul", "sigmoid", "mul"])
    _, cost = ops.softmax(ops.Spec(a))
    check(cost, size, measured(F.softmax, x, dim=-1), ["_softmax"])
    _, cost = ops.mean(ops.Spec(a), dim=1)
    check(cost, size, measured(torch.mean, x, 1, keepdim=True), ["mean"])


@given(rows=small, n=small, w=small, d=dtypes)
def test_cat_with_an_expanded_row(rows, n, w, d):
    """The newline `cat`: a (w,) vector expanded to (rows, 1, w) is read once."""
    dt, size = DTYPES[d]
    grid, vec = t((rows, n, w), dt), t((w,), dt)
    _, cost = ops.cat(ops.Spec((rows, n, w)), ops.Spec((rows, 1, w)), dim=1, broadcast_inputs=(1,))
    check(cost, size, measured(lambda: torch.cat([grid, vec[None, None, :].expand(rows, 1, w)], dim=1)), ["cat"])


@given(b=small, g=st.integers(2, 20), c=small, win=st.integers(3, 7), d=dtypes)
def test_pad_and_window_copies(b, g, c, win, d):
    dt, size = DTYPES[d]
    x = t((b, g, g, c), dt)
    gp = -(-g // win) * win
    _, cost = ops.pad(ops.Spec(x.shape), shape=(b, gp, gp, c))
    if gp != g:
        check(cost, size, measured(F.pad, x, (0, 0, 0, gp - g, 0, gp - g)), ["constant_pad_nd"])
    y = t((b, gp, gp, c), dt)
    n = gp // win
    part = lambda: y.view(b, n, win, n, win, c).permute(0, 1, 3, 2, 4, 5).contiguous()
    _, cost = ops.reshape(ops.Spec(y.shape), shape=(b * n * n, win, win, c), copy=True)
    got = measured(part)
    if n > 1:  # one window per side: already contiguous, nothing runs
        check(cost, size, got, ["clone"])
    else:
        assert got["ops"] == []
    _, cost = ops.reshape(ops.Spec(y.shape), shape=(b, g, g, c), copy=True)  # cropping the padding off
    if gp != g:
        check(cost, size, measured(lambda: y[:, :g, :g, :].contiguous()), ["clone"])


@given(b=small, c=small, g=st.integers(1, 12), d=dtypes, permuted=st.booleans())
def test_clone(b, c, g, d, permuted):
    """`x.clone()` (SAM's compressor clones net_2's output): one aten.clone reading and writing the
    tensor, whether it is contiguous or a permuted view."""
    dt, size = DTYPES[d]
    x = t((b, c, g, g + 1), dt)
    x = x.permute(0, 2, 3, 1) if permuted else x
    shape, cost = ops.OPS["clone"](ops.Spec(tuple(x.shape)))
    assert shape == tuple(x.shape)
    check(cost, size, measured(torch.clone, x), ["clone"])
    assert cost.activation_bytes.subs(S.dtype_bytes, size) == b * c * g * (g + 1) * size


@given(c=small, g=st.integers(2, 20), n=st.integers(1, 20), d=dtypes)
def test_interpolate_and_casts(c, g, n, d):
    dt, size = DTYPES[d]
    x = t((1, c, g, g), torch.float32)
    _, cost = ops.interpolate(ops.Spec(x.shape, 4), mode="bicubic", antialias=True, size=(n, n))
    check(cost, 4, measured(F.interpolate, x, size=(n, n), mode="bicubic", antialias=True, align_corners=False))
    line = t((1, c, g), torch.float32)
    _, cost = ops.interpolate(ops.Spec(line.shape, 4), mode="linear", size=(n,))
    check(cost, 4, measured(F.interpolate, line, size=n, mode="linear"), ["upsample_linear1d"])
    y = t((c, g), dt)
    _, cost = ops.cast(ops.Spec(y.shape), out_itemsize=4)
    if size != 4:
        check(cost, size, measured(lambda: y.to(torch.float32)), ["_to_copy"])
    else:  # no copy at all: `.to` returns the tensor itself
        assert measured(lambda: y.to(torch.float32))["ops"] == [] and predicted(cost, size)["bytes_read"] == 0


@given(rows=small, w=small, n=small, d=dtypes)
def test_index_gather(rows, w, n, d):
    dt, size = DTYPES[d]
    table, idx = t((rows, w), dt), torch.randint(0, rows, (n, n))
    _, cost = ops.index(ops.Spec(table.shape), ops.Spec(idx.shape, 8))
    check(cost, size, measured(lambda: table[idx]), ["index"])


@given(rows=st.integers(50, 300), w=small, n=small, d=dtypes)
def test_gathers_read_the_rows_they_take_not_the_table(rows, w, n, d):
    """embedding, index, index_select and gather read their index tensors and one source element per
    output element, repeats counted (conventions.gather_bytes_read): n rows of a 50-300 row table read
    n rows, not the table. Under the old rule (every argument's footprint) each read the table too."""
    dt, size = DTYPES[d]
    table, idx = t((rows, w), dt), torch.randint(0, rows, (n,))
    idx[-1] = idx[0]                                   # a row taken twice is read twice
    taken = {"bytes_read": n * 8 + n * w * size, "bytes_written": n * w * size, "elementwise_flops": 0}
    for op, fn in (("embedding", lambda: F.embedding(idx, table)), ("index", lambda: table[idx]),
                   ("index_select", lambda: table.index_select(0, idx))):
        assert measured(fn) == {**taken, "ops": [op]}
    cols = torch.randint(0, w, (rows, 2))              # gather: one element per index element
    assert measured(lambda: torch.gather(table, 1, cols)) == {
        "bytes_read": rows * 2 * 8 + rows * 2 * size, "bytes_written": rows * 2 * size, "elementwise_flops": 0,
        "ops": ["gather"]}
    _, cost = ops.index(ops.Spec((rows, w)), ops.Spec((n,), 8))    # the graph's formula counts alike
    assert predicted(cost, size) == {k: v for k, v in taken.items()}


def test_boolean_mask_index_reads_the_whole_mask_and_the_selected_rows():
    """x[mask] (aten.index with a bool index): the mask is scanned whole (1 byte per element), and each
    selected row is read once; the count is the data's (4 of 7 rows here)."""
    x = torch.randn(7, 3)
    mask = torch.tensor([True, False, True, True, False, False, True])
    assert measured(lambda: x[mask]) == {"bytes_read": 7 * 1 + 4 * 3 * 4, "bytes_written": 4 * 3 * 4,
                                         "elementwise_flops": 0, "ops": ["index"]}
