"""The ViT graph's symbols, declared once with their assumptions (integer, positive).

`image_size` and `patch_size` carry the engine's names and assumptions, so they ARE
`costgraph.symbols.image_size` / `patch_size` (sympy symbols with equal names and assumptions are
equal): a formula from either graph substitutes the same way. `batch` (images run together) is
this model's own. The storage element size is the engine's `dtype_bytes`, the default element size
of every op formula.
"""
import sympy as sp

from costgraph.symbols import dtype_bytes

_int = dict(integer=True, positive=True)

image_size = sp.Symbol("image_size", **_int)   # side of the square input image, px
patch_size = sp.Symbol("patch_size", **_int)   # side of a patch (the patchify conv's kernel and stride), px
batch = sp.Symbol("batch", **_int)             # images per forward

ALL = (image_size, patch_size, batch, dtype_bytes)
BY_NAME = {s.name: s for s in ALL}
