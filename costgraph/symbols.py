"""Every symbol of the cost model, declared once with its assumptions.

Sizes are in pixels, counts are integers; all of them positive. The layout symbols
(`w_crop`, `h_crop`) are what `dynamic_preprocess` chooses for a page; the others are
fixed by a mode (or left symbolic for a general formula).
"""
import sympy as sp

_int = dict(integer=True, positive=True)

base_size = sp.Symbol("base_size", **_int)          # side of the global view (crop mode)
image_size = sp.Symbol("image_size", **_int)        # side of a crop tile; the view side in native modes
w_crop = sp.Symbol("w_crop", **_int)                # tiles across
h_crop = sp.Symbol("h_crop", **_int)                # tiles down
patch_size = sp.Symbol("patch_size", **_int)        # SAM patch (16)
downsample_ratio = sp.Symbol("downsample_ratio", **_int)  # SAM grid -> token grid (4: two stride-2 convs)

# Sequence symbols (language model).
text_tokens = sp.Symbol("text_tokens", **_int)      # prompt text after the image
output_tokens = sp.Symbol("output_tokens", **_int)  # generated tokens (first from prefill)
decode_step = sp.Symbol("t", **_int)                # decode forward index, 1..output_tokens-1
context = sp.Symbol("context", **_int)              # attended length in one decode step

# Storage: bytes per element of the activations and weights (bf16: 2, fp32: 4). Parts the
# model keeps in fp32 whatever the storage dtype (router, softmax upcasts) use 4 directly.
dtype_bytes = sp.Symbol("dtype_bytes", **_int)

# Routing (data-dependent): distinct routed experts one MoE layer runs in one prefill forward.
# The router decides which experts the prompt's tokens meet; routed rows are exactly k per token
# whatever it decides, but the eager experts loop pays per expert it runs (the expert's weights
# read once, the bookkeeping ops, a full read of the hidden states and a full write of the
# output). At most min(routed_experts, k * tokens) (the default prediction,
# `graphs.decoder.experts_hit_bound`); a decode forward (one token) runs exactly k. Costs are
# linear in it, so a total over the MoE layers is exact at the layers' mean.
experts_hit = sp.Symbol("experts_hit", **_int)

LAYOUT = (w_crop, h_crop)
SIZES = (base_size, image_size)
PATCH = (patch_size, downsample_ratio)
ALL = (base_size, image_size, w_crop, h_crop, patch_size, downsample_ratio, text_tokens, output_tokens, dtype_bytes,
       experts_hit)
BY_NAME = {s.name: s for s in ALL}

# LaTeX names for papers: upright subscripts.
LATEX_NAMES = {
    base_size: r"S_{\mathrm{base}}",
    image_size: r"S_{\mathrm{crop}}",
    w_crop: r"w_{\mathrm{crop}}",
    h_crop: r"h_{\mathrm{crop}}",
    patch_size: r"p",
    downsample_ratio: r"r_{\mathrm{ds}}",
    text_tokens: r"T_{\mathrm{text}}",
    output_tokens: r"N_{\mathrm{out}}",
    decode_step: r"t",
    context: r"C",
    dtype_bytes: r"b",
    experts_hit: r"E_{\mathrm{hit}}",
}
