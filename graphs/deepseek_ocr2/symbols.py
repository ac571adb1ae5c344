"""DeepSeek-OCR 2's symbols. The view sides are the release's numbers (1024 global, 768 tiles): the graph
is symbolic in the crop grid and the sequence only. `w_crop`, `h_crop` are the same symbols as
DeepSeek-OCR's (`declare` returns the one symbol of a name); the sequence symbols and the storage
dtype are the engine's."""
from costgraph.symbols import batch, declare, dtype_bytes, experts_hit, output_tokens, text_tokens  # noqa: F401

w_crop = declare("w_crop", latex=r"w_{\mathrm{crop}}", term="crop column", doc="tiles across")
h_crop = declare("h_crop", latex=r"h_{\mathrm{crop}}", term="crop row", doc="tiles down")

LAYOUT = (w_crop, h_crop)
ALL = (w_crop, h_crop, text_tokens, output_tokens, dtype_bytes, batch, experts_hit)
BY_NAME = {s.name: s for s in ALL}
