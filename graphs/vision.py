"""The DeepEncoder for one view of side `side`: SAM ViT-B, CLIP-L on SAM's features, projector.

Nodes are named by the vendor's module paths (`sam.blocks.3.attn.qkv`). Every op of SPEC
section 4 is a node, including the shape-only ones (norms, activations, residual adds,
window padding), which cost no matmul FLOPs but carry the other metrics.
"""
from __future__ import annotations

import sympy as sp

from costgraph import symbols as S
from costgraph.graph import ScopeBuilder, Tensor
from costgraph.ops import ceil_div
from .config import VISION, VisionConfig


def sam_grid(side, patch=S.patch_size) -> sp.Expr:
    """g = side // patch: SAM's patch grid."""
    return sp.floor(sp.sympify(side) / patch)


def sam(b: ScopeBuilder, pixels: Tensor, patch, cfg: VisionConfig = VISION) -> Tensor:
    c = cfg.sam
    x = b.op("sam.patch_embed.proj", "conv2d", pixels, in_channels=c.in_channels, out_channels=c.width,
             kernel=patch, stride=patch)
    bsz, _, g, _ = x.shape
    x = b.op("sam.patch_embed.permute", "reshape", x, shape=(bsz, g, g, c.width))
    # The 64x64 table is resized (bicubic, antialias) to g x g when g != 64.
    pos = b.input("sam.pos_embed", (1, c.pretrain_grid, c.pretrain_grid, c.width))
    pos = b.op("sam.pos_embed.resize", "interpolate", pos, mode="bicubic", size=(g, g))
    x = b.op("sam.pos_embed.add", "add", x, pos)
    for i in range(c.depth):
        x = sam_block(b, x, i, cfg)
    p = "sam.neck"
    x = b.op(f"{p}.permute", "reshape", x, shape=(bsz, c.width, g, g))
    x = b.op(f"{p}.0", "conv2d", x, in_channels=c.width, out_channels=c.neck_channels, kernel=1, bias=False)
    x = b.op(f"{p}.1", "layer_norm", x, eps=c.layer_norm_eps)
    x = b.op(f"{p}.2", "conv2d", x, in_channels=c.neck_channels, out_channels=c.neck_channels, kernel=3,
             padding=1, bias=False)
    x = b.op(f"{p}.3", "layer_norm", x, eps=c.layer_norm_eps)
    ch = c.neck_channels
    for k, out_ch in enumerate(c.compressor_channels):  # vendor names: net_2, net_3
        x = b.op(f"sam.net_{k + 2}", "conv2d", x, in_channels=ch, out_channels=out_ch, kernel=3,
                 stride=c.compressor_stride, padding=1, bias=False)
        ch = out_ch
    return x


def sam_block(b: ScopeBuilder, x: Tensor, i: int, cfg: VisionConfig) -> Tensor:
    c = cfg.sam
    p = f"sam.blocks.{i}"
    bsz, g, _, d = x.shape
    shortcut = x
    h = b.op(f"{p}.norm1", "layer_norm", x, eps=c.layer_norm_eps)
    if i in c.global_blocks:
        seqs, side = bsz, g
    else:
        # Zero-pad the grid to a multiple of the window; the padded tokens are NOT masked:
        # qkv, attention and proj run on them.
        win = c.window
        padded = win * ceil_div(g, win)
        nwin = bsz * (padded / win) ** 2
        h = b.op(f"{p}.window_partition", "window_partition", h, shape=(nwin, win, win, d))
        seqs, side = nwin, sp.Integer(win)
    h = attention(b, h, f"{p}.attn", seqs, side, cfg)
    if i not in c.global_blocks:
        h = b.op(f"{p}.window_unpartition", "window_unpartition", h, shape=(bsz, g, g, d))
    x = b.op(f"{p}.residual1", "add", shortcut, h)
    h = b.op(f"{p}.norm2", "layer_norm", x, eps=c.layer_norm_eps)
    h = b.op(f"{p}.mlp.lin1", "linear", h, in_features=d, out_features=c.mlp_dim)
    h = b.op(f"{p}.mlp.act", "gelu", h)
    h = b.op(f"{p}.mlp.lin2", "linear", h, in_features=c.mlp_dim, out_features=d)
    return b.op(f"{p}.residual2", "add", x, h)


def attention(b: ScopeBuilder, x: Tensor, p: str, seqs, side, cfg: VisionConfig) -> Tensor:
    """SAM attention over `seqs` square grids of `side` x `side` tokens, decomposed rel-pos."""
    c = cfg.sam
    nh, hd, d = c.heads, c.head_dim, c.width
    n = side * side
    qkv = b.op(f"{p}.qkv", "linear", x, in_features=d, out_features=3 * d)
    q = b.op(f"{p}.split_heads", "reshape", qkv, shape=(seqs * nh, side, side, hd))
    # Tables (2*side-1, hd) gathered to (side, side, hd); the einsums use the unscaled q.
    rel_h = b.input(f"{p}.rel_pos_h", (side, side, hd))
    rel_w = b.input(f"{p}.rel_pos_w", (side, side, hd))
    eh = b.op(f"{p}.rel_h", "einsum", q, rel_h, equation="bhwc,hkc->bhwk")
    ew = b.op(f"{p}.rel_w", "einsum", q, rel_w, equation="bhwc,wkc->bhwk")
    # Their broadcast sum is materialised as a float mask (B, heads, N, N).
    mask = b.op(f"{p}.rel_pos_mask", "add", eh, ew)
    mask = b.op(f"{p}.rel_pos_mask.view", "reshape", mask, shape=(seqs, nh, n, n))
    qh = b.op(f"{p}.heads", "reshape", qkv, shape=(seqs, nh, n, hd))
    o = b.op(f"{p}.sdpa", "sdpa", qh, qh, qh, mask)
    o = b.op(f"{p}.merge_heads", "reshape", o, shape=(seqs, side, side, d))
    return b.op(f"{p}.proj", "linear", o, in_features=d, out_features=d)


def clip(b: ScopeBuilder, sam_out: Tensor, cfg: VisionConfig = VISION) -> Tensor:
    """CLIP-L whose patch embedding IS SAM's output (its own conv never runs)."""
    c = cfg.clip
    bsz, ch, n, _ = sam_out.shape
    tokens = n * n
    x = b.op("clip.embeddings.flatten", "flatten", sam_out, shape=(bsz, tokens, ch))
    cls = b.input("clip.embeddings.class_embedding", (bsz, 1, c.width))
    x = b.op("clip.embeddings.cat", "cat", cls, x, dim=1)
    pos = b.input("clip.embeddings.position_embedding", (1, c.pretrain_grid ** 2 + 1, c.width))
    pos = b.op("clip.embeddings.position_embedding.resize", "interpolate", pos, mode="bicubic",
               size=(1, tokens + 1, c.width))
    x = b.op("clip.embeddings.add", "add", x, pos)
    x = b.op("clip.pre_layrnorm", "layer_norm", x, eps=c.layer_norm_eps)
    seq = tokens + 1
    for i in range(c.depth):
        p = f"clip.transformer.layers.{i}"
        h = b.op(f"{p}.layer_norm1", "layer_norm", x, eps=c.layer_norm_eps)
        qkv = b.op(f"{p}.self_attn.qkv_proj", "linear", h, in_features=c.width, out_features=3 * c.width)
        qh = b.op(f"{p}.self_attn.heads", "reshape", qkv, shape=(bsz, c.heads, seq, c.head_dim))
        o = b.op(f"{p}.self_attn.sdpa", "sdpa", qh, qh, qh)
        o = b.op(f"{p}.self_attn.merge_heads", "reshape", o, shape=(bsz, seq, c.width))
        o = b.op(f"{p}.self_attn.out_proj", "linear", o, in_features=c.width, out_features=c.width)
        x = b.op(f"{p}.residual1", "add", x, o)
        h = b.op(f"{p}.layer_norm2", "layer_norm", x, eps=c.layer_norm_eps)
        h = b.op(f"{p}.mlp.fc1", "linear", h, in_features=c.width, out_features=c.mlp_dim)
        h = b.op(f"{p}.mlp.act", "quick_gelu", h)
        h = b.op(f"{p}.mlp.fc2", "linear", h, in_features=c.mlp_dim, out_features=c.width)
        x = b.op(f"{p}.residual2", "add", x, h)
    return x


def view(b: ScopeBuilder, side, patch=S.patch_size, cfg: VisionConfig = VISION) -> tuple[Tensor, sp.Expr]:
    """One view (batch 1) through SAM, CLIP, fusion and projector.

    Returns the projected tokens (1, n*n, projector_out) and the token grid side n.
    """
    pixels = b.input("pixels", (1, cfg.sam.in_channels, side, side))
    s = sam(b, pixels, patch, cfg)
    c = clip(b, s, cfg)
    bsz, ch, n, _ = s.shape
    tokens = n * n
    c = b.op("fusion.drop_class", "slice", c, shape=(bsz, tokens, cfg.clip.width))
    s = b.op("fusion.sam_flatten", "flatten", s, shape=(bsz, tokens, ch))
    x = b.op("fusion.cat", "cat", c, s, dim=-1)
    return b.op("projector", "linear", x, in_features=cfg.clip.width + ch, out_features=cfg.projector_out), n
