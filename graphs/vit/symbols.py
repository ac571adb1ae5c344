"""The ViT graph's symbols, declared once (integer, positive).

`image_size` and `patch_size` are declared with the same names and assumptions as DeepSeek-OCR's
(one symbol per name across the project, `costgraph.symbols.declare`); the LaTeX this model prints
for them is its own (`costgraph.graphs.vit.LATEX_NAMES`). `batch` (images run together) is this model's.
The storage element size is the engine's `dtype_bytes`, the default element size of every op formula.
"""
from costgraph.symbols import declare, dtype_bytes

image_size = declare("image_size", latex=r"S", doc="side of the square input image, px")
patch_size = declare("patch_size", latex=r"p", doc="side of a patch (the patchify conv's kernel and stride), px")
batch = declare("batch", latex=r"B", term="image", doc="images per forward")

ALL = (image_size, patch_size, batch, dtype_bytes)
BY_NAME = {s.name: s for s in ALL}
