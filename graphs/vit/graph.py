"""ViT image classification (`transformers.ViTForImageClassification`, SDPA attention) as a cost graph.

Symbolic in the image side, the patch side and the batch (`costgraph.graphs.vit.symbols`); widths, depth,
heads and labels come from a `VitConfig`. Node paths are the reference's module paths
(`vit.embeddings.patch_embeddings.projection`, `vit.layers.3.attention.q_proj`, `classifier`;
transformers 5 names: separate q/k/v projections, `o_proj`, `vit.layers.N`); an op that runs in
a module's own forward rather than in a child module is named under that module
(`vit.layers.3.residual1`, `vit.embeddings.cat`), and the classification head's CLS slice,
which runs in the top-level forward, is `pooled_output`.

Every aten op the reference runs is a node, views included (they cost nothing), as the CPU run
shows (`python -m costgraph.verify.vit --trace`):

- embeddings: the patchify conv, its flatten and transpose (views), the class token expanded
  over the batch (a stride-0 view: `cat` reads it once), the cat, the position-table add
  (the table broadcast over the batch, read once);
- per layer: LayerNorm, q/k/v projections (each reads the normalised input), their split into
  heads (views: q, k, v stay token-major), the fused CPU SDPA kernel (no mask: ViT attends to
  every token; it writes its fp32 logsumexp), the heads merged again (a view: the kernel lays
  its output out like q, so transformers' `.transpose(1, 2).contiguous()` copies nothing), the
  output projection, residual add, LayerNorm, fc1, GELU, fc2, residual add;
- the final LayerNorm, the CLS row (a view) and the classifier Linear.

Dropout is not an op in eval mode (p = 0, `model.eval()`); the pixels are given in the storage
dtype (ViTModel casts them otherwise). Scopes: `vit` (the whole forward) with `vit.embeddings`,
`vit.encoder` (the layers and the final LayerNorm) and `vit.head` (CLS row and classifier).
"""
from __future__ import annotations

import sympy as sp

from costgraph.graph import CostGraph, ScopeBuilder, Tensor
from costgraph.ops import conv_out_side
from . import symbols as S
from .config import DEFAULT, DTYPES, VitConfig

SCOPES = ("vit", "vit.embeddings", "vit.encoder", "vit.head")
ROOT = "vit"


# ---- token counts: the one implementation ---------------------------------------------------

def grid(image_size=S.image_size, patch_size=S.patch_size) -> sp.Expr:
    """Patches per side: the patchify conv (kernel = stride = patch, no padding) gives floor(S / p)."""
    return conv_out_side(image_size, patch_size, patch_size, 0)


def num_patches(image_size=S.image_size, patch_size=S.patch_size) -> sp.Expr:
    """transformers' `ViTPatchEmbeddings.num_patches` for a square image."""
    return grid(image_size, patch_size) ** 2


def num_tokens(image_size=S.image_size, patch_size=S.patch_size) -> sp.Expr:
    """The sequence the encoder runs: the patches and the class token."""
    return num_patches(image_size, patch_size) + 1


def mode_values(cfg: VitConfig = DEFAULT, batch: int = 1) -> dict[sp.Symbol, int]:
    """The variant's sizes for the graph's symbols (ViT-B/16: image 224, patch 16)."""
    return {S.image_size: cfg.image_size, S.patch_size: cfg.patch_size, S.batch: batch}


def dtype_values(dtype: str) -> dict[sp.Symbol, int]:
    try:
        return {S.dtype_bytes: DTYPES[dtype]}
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})") from None


# ---- the graph --------------------------------------------------------------------------------

def build_graph(cfg: VitConfig = DEFAULT, batch=S.batch, image_size=S.image_size,
                patch_size=S.patch_size) -> CostGraph:
    """One forward of `batch` square images of side `image_size` through `cfg`'s classifier.

    The sizes default to the symbols; pass numbers for a concrete graph."""
    g = CostGraph(f"vit:{cfg.name}", params={"variant": cfg.name})
    g.scope(ROOT, doc="ViTForImageClassification forward: embeddings, encoder, head")
    x = embeddings(g.scope("vit.embeddings", doc="patchify conv, class token, position table"),
                   cfg, batch, image_size, patch_size)
    enc = g.scope("vit.encoder", doc="the transformer layers and the final LayerNorm")
    for i in range(cfg.layers):
        x = layer(enc, x, i, cfg)
    x = enc.op("vit.layernorm", "layer_norm", x, eps=cfg.layer_norm_eps)
    head(g.scope("vit.head", doc="the class token's row through the classifier"), x, cfg)
    return g


def embeddings(b: ScopeBuilder, cfg: VitConfig, batch, image_size, patch_size) -> Tensor:
    d = cfg.hidden
    pixels = b.input("pixel_values", (batch, cfg.in_channels, image_size, image_size))
    x = b.op("vit.embeddings.patch_embeddings.projection", "conv2d", pixels, in_channels=cfg.in_channels,
             out_channels=d, kernel=patch_size, stride=patch_size)
    n = grid(image_size, patch_size)
    patches = n * n
    x = b.op("vit.embeddings.patch_embeddings.flatten", "flatten", x, shape=(batch, d, patches))
    x = b.op("vit.embeddings.patch_embeddings.transpose", "permute", x, shape=(batch, patches, d))
    cls = b.input("vit.embeddings.cls_token", (1, 1, d), param=True)
    cls = b.op("vit.embeddings.cls_token.expand", "reshape", cls, shape=(batch, 1, d))
    x = b.op("vit.embeddings.cat", "cat", cls, x, dim=1, broadcast_inputs=(0,))
    pos = b.input("vit.embeddings.position_embeddings", (1, patches + 1, d), param=True)
    return b.op("vit.embeddings.add", "add", x, pos)


def layer(b: ScopeBuilder, x: Tensor, i: int, cfg: VitConfig) -> Tensor:
    """`ViTLayer`: pre-norm attention and MLP blocks, each with a residual add."""
    p = f"vit.layers.{i}"
    bsz, seq, d = x.shape
    nh, hd = cfg.heads, cfg.head_dim
    h = b.op(f"{p}.layernorm_before", "layer_norm", x, eps=cfg.layer_norm_eps)
    heads = []
    for t in "qkv":
        proj = b.op(f"{p}.attention.{t}_proj", "linear", h, in_features=d, out_features=nh * hd, bias=cfg.qkv_bias)
        heads.append(b.op(f"{p}.attention.{t}_heads", "permute", proj, shape=(bsz, nh, seq, hd)))
    o = b.op(f"{p}.attention.sdpa", "sdpa", *heads)
    o = b.op(f"{p}.attention.merge_heads", "reshape", o, shape=(bsz, seq, nh * hd))
    o = b.op(f"{p}.attention.o_proj", "linear", o, in_features=nh * hd, out_features=d)
    x = b.op(f"{p}.residual1", "add", o, x)
    h = b.op(f"{p}.layernorm_after", "layer_norm", x, eps=cfg.layer_norm_eps)
    h = b.op(f"{p}.mlp.fc1", "linear", h, in_features=d, out_features=cfg.mlp_dim)
    h = b.op(f"{p}.mlp.activation_fn", cfg.hidden_act, h)
    h = b.op(f"{p}.mlp.fc2", "linear", h, in_features=cfg.mlp_dim, out_features=d)
    return b.op(f"{p}.residual2", "add", h, x)


def head(b: ScopeBuilder, x: Tensor, cfg: VitConfig) -> Tensor:
    bsz, _, d = x.shape
    cls = b.op("pooled_output", "slice", x, shape=(bsz, d))  # sequence_output[:, 0, :]: a view
    return b.op("classifier", "linear", cls, in_features=d, out_features=cfg.num_labels)
