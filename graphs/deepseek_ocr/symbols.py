"""DeepSeek-OCR's symbols, declared once (integer, positive) with their names for papers.

Sizes are in pixels. The layout symbols (`w_crop`, `h_crop`) are what `dynamic_preprocess`
chooses for a page; the sizes and patch parameters are fixed by a mode (or left symbolic for a
general formula). The sequence symbols (text_tokens, output_tokens, ...) and the storage dtype
are the engine's (`costgraph.symbols`), re-exported here so the model reads from one place.
"""
from costgraph.symbols import (batch, context, declare, decode_step, dtype_bytes, experts_hit,  # noqa: F401
                               output_tokens, text_tokens)

base_size = declare("base_size", latex=r"S_{\mathrm{base}}", doc="side of the global view (crop mode)")
image_size = declare("image_size", latex=r"S_{\mathrm{crop}}", doc="side of a crop tile; the view side in native modes")
w_crop = declare("w_crop", latex=r"w_{\mathrm{crop}}", term="crop column", doc="tiles across")
h_crop = declare("h_crop", latex=r"h_{\mathrm{crop}}", term="crop row", doc="tiles down")
patch_size = declare("patch_size", latex=r"p", doc="SAM patch side (16)")
downsample_ratio = declare("downsample_ratio", latex=r"r_{\mathrm{ds}}",
                           doc="SAM grid -> token grid (4: two stride-2 convs)")

LAYOUT = (w_crop, h_crop)
SIZES = (base_size, image_size)
PATCH = (patch_size, downsample_ratio)
ALL = (base_size, image_size, w_crop, h_crop, patch_size, downsample_ratio, text_tokens, output_tokens, dtype_bytes, batch,
       experts_hit)
BY_NAME = {s.name: s for s in ALL}
