"""Each op formula against FlopCounterMode on the real torch op, for random shapes."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from costgraph import ops

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
