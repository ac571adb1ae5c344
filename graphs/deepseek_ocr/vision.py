"""The DeepEncoder for a batch of square views of side `side`: SAM ViT-B, CLIP-L on SAM's features,
projector.

Nodes are named by the vendor's module paths (`sam.blocks.3.attn.qkv`). Every aten op the vendor
runs is a node (SPEC section 4), including those that cost no matmul FLOPs but move bytes or do
elementwise work: norms, activations, residual adds, the rel-pos index arithmetic and gathers,
window padding and the copies torch makes (`.contiguous()` of permuted windows, `.reshape` of a
permuted tensor, einsum's operand copy, the vendor's clone between the compressor convs), fp32
casts around position-table resizes. Which of those run depends on the sizes; the conditions are
symbolic indicators (`when`):

- window padding (and cropping it off again): only when g % 14 != 0;
- the window (un)partition copies: only when there is more than one window per side (g > 14);
- the split of qkv into heads copies when the attention runs more than one sequence (the crop
  batch, or more than one window): `reshape(3, B*heads, N, hd)` of a permuted tensor; q, k, v are
  then head-major, so merging the heads after the fused CPU attention copies too, and the `w`
  rel-pos einsum can use q as it is (with one sequence it copies q, like the `h` one always does);
- the position tables are resized only when the grid differs from the pretraining grid (SAM
  64x64, CLIP 16x16); the global rel-pos tables only when 2*g - 1 != 127.

`batch` is the number of views run together (1 for the global view, w_crop*h_crop for the crops):
weights and the position/rel-pos tables are read once per batch, not once per view. `min_batch`:
the least batch that ever runs (the crops: 2, as a 1x1 layout runs no crops), which decides the
"more than one sequence" copies of a symbolic batch.

`impl`: whose SAM code runs. "vendor" (the default: DeepSeek-OCR's deepencoder) as above;
"transformers" is `transformers`' own SAM (`DeepseekOcr2SamVisionEncoder`, DeepSeek-OCR 2's ground
truth), which differs in bookkeeping only: it always pads the windows (`F.pad`, a copy even with
nothing to pad), always resizes the rel-pos tables (linear, in the storage dtype, no fp32 casts),
sums the two rel-pos einsums first and copies the (non-contiguous) sum into the float mask, runs a
fused `native_layer_norm` between permutes in the neck, and has no clone between the compressor convs.
"""
from __future__ import annotations

import sympy as sp

from costgraph.dtypes import FLOAT32, INT64
from costgraph.graph import ScopeBuilder, Tensor
from costgraph.ops import ceil_div, more_than_one, unequal
from . import symbols as S
from .config import VISION, VisionConfig


def sam_grid(side, patch=S.patch_size) -> sp.Expr:
    """g = side // patch: SAM's patch grid."""
    return sp.floor(sp.sympify(side) / patch)


def cast(b: ScopeBuilder, path: str, x: Tensor, size, **attrs) -> Tensor:
    return b.op(path, "cast", x, out_itemsize=size, **attrs)


# ---- SAM ------------------------------------------------------------------------------------------

IMPLS = ("vendor", "transformers")


def sam(b: ScopeBuilder, pixels: Tensor, patch, cfg: VisionConfig = VISION, min_batch: int = 1,
        impl: str = "vendor") -> Tensor:
    c = cfg.sam
    x = b.op("sam.patch_embed.proj", "conv2d", pixels, in_channels=c.in_channels, out_channels=c.width,
             kernel=patch, stride=patch)
    bsz, _, g, _ = x.shape
    x = b.op("sam.patch_embed.permute", "permute", x, shape=(bsz, g, g, c.width))
    x = b.op("sam.pos_embed.add", "add", x, position_table(b, g, c.width, c.pretrain_grid))
    if impl not in IMPLS:
        raise ValueError(f"unknown SAM implementation {impl!r} (choose from {', '.join(IMPLS)})")
    for i in range(c.depth):
        x = sam_block(b, x, i, cfg, min_batch, impl)
    return neck(b, x, cfg, impl)


def position_table(b: ScopeBuilder, g, width, grid) -> Tensor:
    """The (1, grid, grid, width) table, bicubic-resized (antialias, in fp32) to g x g when g != grid."""
    resize = unequal(g, grid)
    pos = b.input("sam.pos_embed", (1, grid, grid, width), param=True)
    pos = b.op("sam.pos_embed.nchw", "permute", pos, shape=(1, width, grid, grid))
    pos = cast(b, "sam.pos_embed.to_fp32", pos, FLOAT32, when=resize)
    pos = b.op("sam.pos_embed.resize", "interpolate", pos, mode="bicubic", antialias=True, size=(g, g), when=resize)
    pos = cast(b, "sam.pos_embed.to_storage", pos, S.dtype_bytes, when=resize)
    return b.op("sam.pos_embed.nhwc", "permute", pos, shape=(1, g, g, width))


def sam_block(b: ScopeBuilder, x: Tensor, i: int, cfg: VisionConfig, min_batch: int = 1,
              impl: str = "vendor") -> Tensor:
    c = cfg.sam
    p = f"sam.blocks.{i}"
    bsz, g, _, d = x.shape
    shortcut = x
    h = b.op(f"{p}.norm1", "layer_norm", x, eps=c.layer_norm_eps)
    if i in c.global_blocks:
        seqs, side = bsz, g
    else:
        # Zero-pad the grid to a multiple of the window (only when needed); the padded tokens
        # are NOT masked: qkv, attention and proj run on them.
        win = c.window
        per_side = ceil_div(g, win)
        padded, several = win * per_side, more_than_one(per_side)
        pad = unequal(padded, g)
        h = b.op(f"{p}.window_partition.pad", "pad", h, shape=(bsz, padded, padded, d),
                 when=pad if impl == "vendor" else 1)   # transformers pads (copies) even by 0
        seqs, side = bsz * per_side ** 2, sp.Integer(win)
        h = b.op(f"{p}.window_partition", "window_partition", h, shape=(seqs, win, win, d), copy=several)
    table = c.window if i not in c.global_blocks else c.pretrain_grid
    many = 1 if min_batch > 1 else more_than_one(seqs)  # more than one sequence
    h = attention(b, h, f"{p}.attn", seqs, side, cfg, table, many, impl)
    if i not in c.global_blocks:
        h = b.op(f"{p}.window_unpartition", "window_unpartition", h, shape=(bsz, padded, padded, d), copy=several)
        h = b.op(f"{p}.window_unpartition.unpad", "slice", h, shape=(bsz, g, g, d), copy=pad)
    x = b.op(f"{p}.residual1", "add", shortcut, h)
    h = b.op(f"{p}.norm2", "layer_norm", x, eps=c.layer_norm_eps)
    h = b.op(f"{p}.mlp.lin1", "linear", h, in_features=d, out_features=c.mlp_dim)
    h = b.op(f"{p}.mlp.act", "gelu", h)
    h = b.op(f"{p}.mlp.lin2", "linear", h, in_features=c.mlp_dim, out_features=d)
    return b.op(f"{p}.residual2", "add", x, h)


def attention(b: ScopeBuilder, x: Tensor, p: str, seqs, side, cfg: VisionConfig, table: int, several,
              impl: str = "vendor") -> Tensor:
    """SAM attention over `seqs` square grids of `side` x `side` tokens, decomposed rel-pos.

    `table`: the grid the stored rel-pos tables (2*table - 1, head_dim) were trained for;
    `several`: 1 when seqs > 1, else 0 (an indicator).
    """
    c = cfg.sam
    nh, hd, d = c.heads, c.head_dim, c.width
    n = side * side
    qkv = b.op(f"{p}.qkv", "linear", x, in_features=d, out_features=3 * d)
    # (seqs, N, 3, heads, hd) permuted to (3, seqs, heads, N, hd) and reshaped to (3, seqs*heads, N, hd):
    # folding seqs into heads needs a copy as soon as there is more than one sequence. That copy
    # decides the layouts downstream: q, k, v contiguous per head (else views into qkv).
    qkv = b.op(f"{p}.split_heads", "reshape", qkv, shape=(3, seqs * nh, n, hd), copy=several)
    q = b.op(f"{p}.q", "slice", qkv, shape=(seqs * nh, side, side, hd))
    rel = [rel_pos_table(b, f"{p}.rel_pos_{axis}", side, table, hd, impl) for axis in "hw"]
    # The einsums use the unscaled q. torch lines up the batch dim of each for bmm: for `h` it
    # always copies q; for `w` only when q is a view into qkv (one sequence).
    eh = b.op(f"{p}.rel_h", "einsum", q, rel[0], equation="bhwc,hkc->bhwk", copies=(0,))
    ew = b.op(f"{p}.rel_w", "einsum", q, rel[1], equation="bhwc,wkc->bhwk", copies=((0, 1 - several),))
    # Both come out as permuted views; the vendor reshapes each (a copy) before the broadcast
    # sum, which materialises the float mask (seqs*heads, N, side, side), contiguous.
    # transformers adds the permuted einsum results as they are and copies the sum into the mask.
    vendor = impl == "vendor"
    eh = b.op(f"{p}.rel_h.flat", "reshape", eh, shape=(seqs * nh, n, side, 1), copy=vendor)
    ew = b.op(f"{p}.rel_w.flat", "reshape", ew, shape=(seqs * nh, n, 1, side), copy=vendor)
    mask = b.op(f"{p}.rel_pos_mask", "add", eh, ew)
    mask = b.op(f"{p}.rel_pos_mask.view", "reshape", mask, shape=(seqs, nh, n, n), copy=not vendor)
    heads = [b.op(f"{p}.{t}_heads", "slice", qkv, shape=(seqs, nh, n, hd)) for t in "qkv"]
    o = b.op(f"{p}.sdpa", "sdpa", *heads, mask)
    # The CPU kernel lays its output out like q: heads interleaved per token when q is a view into
    # qkv (merging the heads is then a view), head-major when q was copied (merging copies).
    o = b.op(f"{p}.merge_heads", "reshape", o, shape=(seqs, side, side, d), copy=several)
    return b.op(f"{p}.proj", "linear", o, in_features=d, out_features=d)


def rel_pos_table(b: ScopeBuilder, p: str, side, table: int, hd, impl: str = "vendor") -> Tensor:
    """The stored (2*table - 1, hd) table, linearly resized (in fp32) to 2*side - 1 rows when the
    lengths differ, gathered to (side, side, hd) by the relative coordinates. transformers'
    SAM resizes always, in the storage dtype."""
    stored, length = 2 * table - 1, 2 * side - 1
    vendor = impl == "vendor"
    resize = unequal(length, stored) if vendor else 1
    t = b.input(p, (stored, hd), param=True)
    if vendor:
        t = cast(b, f"{p}.to_fp32", t, FLOAT32, when=resize)
    t = b.op(f"{p}.ncl", "permute", t, shape=(1, hd, stored))
    t = b.op(f"{p}.resize", "interpolate", t, mode="linear", size=(length,), when=resize)
    if vendor:
        t = cast(b, f"{p}.to_storage", t, S.dtype_bytes, when=resize)
    t = b.op(f"{p}.rows", "permute", t, shape=(length, hd))
    idx = b.op(f"{p}.coords", "rel_pos_coords", size=side, itemsize=INT64)
    return b.op(f"{p}.gather", "index", t, idx)


def neck(b: ScopeBuilder, x: Tensor, cfg: VisionConfig, impl: str = "vendor") -> Tensor:
    c = cfg.sam
    bsz, g, _, _ = x.shape
    p = "sam.neck"
    x = b.op(f"{p}.nchw", "permute", x, shape=(bsz, c.width, g, g))
    x = b.op(f"{p}.0", "conv2d", x, in_channels=c.width, out_channels=c.neck_channels, kernel=1, bias=False)
    norm = layer_norm_2d if impl == "vendor" else channel_layer_norm
    x = norm(b, f"{p}.1", x, c.layer_norm_eps)
    x = b.op(f"{p}.2", "conv2d", x, in_channels=c.neck_channels, out_channels=c.neck_channels, kernel=3,
             padding=1, bias=False)
    x = norm(b, f"{p}.3", x, c.layer_norm_eps)
    ch = c.neck_channels
    for k, out_ch in enumerate(c.compressor_channels):  # vendor names: net_2, net_3
        if k > 0 and impl == "vendor":
            # The vendor runs `net_3(x2.clone())` (SPEC section 4, step 5): one copy of net_2's
            # output (B, 512, g/2, g/2) at the storage dtype between the two convs.
            x = b.op(f"sam.net_{k + 1}.clone", "clone", x)
        x = b.op(f"sam.net_{k + 2}", "conv2d", x, in_channels=ch, out_channels=out_ch, kernel=3,
                 stride=c.compressor_stride, padding=1, bias=False)
        ch = out_ch
    return x


def channel_layer_norm(b: ScopeBuilder, p: str, x: Tensor, eps) -> Tensor:
    """transformers' channels-first LayerNorm: a fused layer norm over the channels between two permutes."""
    bsz, ch, h, w = x.shape
    x = b.op(f"{p}.nhwc", "permute", x, shape=(bsz, h, w, ch))
    x = b.op(p, "layer_norm", x, eps=eps)
    return b.op(f"{p}.nchw", "permute", x, shape=(bsz, ch, h, w))


def layer_norm_2d(b: ScopeBuilder, p: str, x: Tensor, eps) -> Tensor:
    """The vendor's LayerNorm2d over the channels of (B, C, H, W), op by op:
    u = mean(x); var = mean((x - u)^2); y = (x - u) / sqrt(var + eps); weight * y + bias."""
    ch = x.shape[1]
    u = b.op(f"{p}.mean", "mean", x, dim=1)
    sq = b.op(f"{p}.square", "pow", b.op(f"{p}.centre", "sub", x, u))
    var = b.op(f"{p}.var", "mean", sq, dim=1)
    centred = b.op(f"{p}.centre_again", "sub", x, u)
    std = b.op(f"{p}.std", "sqrt", b.op(f"{p}.eps", "add", var))
    y = b.op(f"{p}.normalise", "div", centred, std)
    weight = b.input(f"{p}.weight", (ch, 1, 1), param=(ch,))
    bias = b.input(f"{p}.bias", (ch, 1, 1), param=(ch,))
    return b.op(f"{p}.shift", "add", b.op(f"{p}.scale", "mul", weight, y), bias)


# ---- CLIP -----------------------------------------------------------------------------------------

def clip(b: ScopeBuilder, sam_out: Tensor, cfg: VisionConfig = VISION) -> Tensor:
    """CLIP-L whose patch embedding IS SAM's output (its own conv is loaded but never runs)."""
    c = cfg.clip
    bsz, ch, n, _ = sam_out.shape
    tokens = n * n
    seq = tokens + 1
    b.input("clip.embeddings.patch_embedding", (c.width, 3, c.patch_size, c.patch_size), param=True)
    x = b.op("clip.embeddings.flatten", "flatten", sam_out, shape=(bsz, tokens, ch))
    cls = b.input("clip.embeddings.class_embedding", (c.width,), param=True)
    cls = b.op("clip.embeddings.class_embedding.expand", "reshape", cls, shape=(bsz, 1, c.width))
    x = b.op("clip.embeddings.cat", "cat", cls, x, dim=1, broadcast_inputs=(0,))
    x = b.op("clip.embeddings.add", "add", x, clip_positions(b, n, c.width, c.pretrain_grid))
    x = b.op("clip.pre_layrnorm", "layer_norm", x, eps=c.layer_norm_eps)
    for i in range(c.depth):
        p = f"clip.transformer.layers.{i}"
        h = b.op(f"{p}.layer_norm1", "layer_norm", x, eps=c.layer_norm_eps)
        qkv = b.op(f"{p}.self_attn.qkv_proj", "linear", h, in_features=c.width, out_features=3 * c.width)
        heads = [b.op(f"{p}.self_attn.{t}_heads", "slice", qkv, shape=(bsz, c.heads, seq, c.head_dim)) for t in "qkv"]
        o = b.op(f"{p}.self_attn.sdpa", "sdpa", *heads)
        o = b.op(f"{p}.self_attn.merge_heads", "reshape", o, shape=(bsz, seq, c.width))
        o = b.op(f"{p}.self_attn.out_proj", "linear", o, in_features=c.width, out_features=c.width)
        x = b.op(f"{p}.residual1", "add", x, o)
        h = b.op(f"{p}.layer_norm2", "layer_norm", x, eps=c.layer_norm_eps)
        h = b.op(f"{p}.mlp.fc1", "linear", h, in_features=c.width, out_features=c.mlp_dim)
        h = b.op(f"{p}.mlp.act", "quick_gelu", h)
        h = b.op(f"{p}.mlp.fc2", "linear", h, in_features=c.mlp_dim, out_features=c.width)
        x = b.op(f"{p}.residual2", "add", x, h)
    return x


def clip_positions(b: ScopeBuilder, n, width, grid) -> Tensor:
    """(1, n*n + 1, width): the table looked up by position ids (an embedding gather of every row),
    its grid part made contiguous (NCHW), bicubic-resized in fp32 to n x n and joined to the class
    position again, when n != grid."""
    resize = unequal(n, grid)
    rows = grid * grid + 1
    table = b.input("clip.embeddings.position_embedding", (rows, width), param=True)
    ids = b.input("clip.embeddings.position_ids", (1, rows), itemsize=INT64)
    pos = b.op("clip.embeddings.position_embedding.lookup", "index", table, ids)
    cls = b.op("clip.embeddings.position_embedding.class", "slice", pos, shape=(1, width))
    t = b.op("clip.embeddings.position_embedding.nchw", "reshape", pos, shape=(1, width, grid, grid),
             copy=resize)
    t = cast(b, "clip.embeddings.position_embedding.to_fp32", t, FLOAT32, when=resize)
    t = b.op("clip.embeddings.position_embedding.resize", "interpolate", t, mode="bicubic", antialias=True,
             size=(n, n), when=resize)
    t = cast(b, "clip.embeddings.position_embedding.to_storage", t, S.dtype_bytes, when=resize)
    t = b.op("clip.embeddings.position_embedding.rows", "permute", t, shape=(n * n, width))
    t = b.op("clip.embeddings.position_embedding.cat", "cat", cls, t, dim=0, when=resize)
    return b.op("clip.embeddings.position_embedding.view", "reshape", t, shape=(1, n * n + 1, width))


# ---- one batch of views -------------------------------------------------------------------------

def view(b: ScopeBuilder, side, patch=S.patch_size, cfg: VisionConfig = VISION, batch=1,
         min_batch: int = 1) -> tuple[Tensor, sp.Expr]:
    """`batch` views of side `side` through SAM, CLIP, fusion and projector (`min_batch`: see the
    module docstring).

    Returns the projected tokens (batch, n*n, projector_out) and the token grid side n.
    """
    pixels = b.input("pixels", (batch, cfg.sam.in_channels, side, side))
    s = sam(b, pixels, patch, cfg, min_batch)
    c = clip(b, s, cfg)
    bsz, ch, n, _ = s.shape
    tokens = n * n
    c = b.op("fusion.drop_class", "slice", c, shape=(bsz, tokens, cfg.clip.width))
    s = b.op("fusion.sam_flatten", "flatten", s, shape=(bsz, tokens, ch))
    x = b.op("fusion.cat", "cat", c, s, dim=-1)
    return b.op("projector", "linear", x, in_features=cfg.clip.width + ch, out_features=cfg.projector_out), n
