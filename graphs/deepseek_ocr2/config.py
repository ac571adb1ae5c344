"""DeepSeek-OCR 2 as data: the released sizes (SPEC section 9), read from `transformers`'
`convert_deepseek_ocr2_weights_to_hf.py` and the release's config (its `language_config`), and the
image processor's defaults (`DeepseekOcr2ImageProcessor`, `DeepseekOcr2Processor`).

Graph builders and the profiled reference read these values; no other file spells them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from costgraph.dtypes import DEFAULT_STORAGE, STORAGE
from costgraph.graphs.deepseek_ocr.config import LMConfig, SamConfig, VisionConfig as SamVisionConfig


@dataclass(frozen=True)
class EncoderConfig:
    """The Qwen2-style encoder over SAM tokens + learned queries (`DeepseekOcr2VisionEncoder`):
    GQA, RoPE, SwiGLU, RMSNorm; q/k/v projections with bias, o_proj without."""
    width: int = 896
    depth: int = 24
    heads: int = 14
    kv_heads: int = 2
    mlp_dim: int = 4864
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class VisionConfig:
    # SAM ViT-B exactly as DeepSeek-OCR's, but the second compressor conv has 896 channels (= encoder width)
    sam: SamConfig = field(default_factory=lambda: SamConfig(compressor_channels=(512, 896)))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector_out: int = 1280           # multi_modal_projector: Linear(896, 1280) with bias = LM hidden
    patch_size: int = 16
    downsample_ratio: int = 4           # two stride-2 convs
    # learned queries per view side: query_1024_resolution (16x16), query_768_resolution (12x12); the
    # model picks by SAM tokens (<= 144: the 768 table)
    queries: tuple[tuple[int, int], ...] = ((1024, 256), (768, 144))

    @property
    def sam_view(self) -> SamVisionConfig:
        """The SAM part in the shape DeepSeek-OCR's SAM builder takes."""
        return SamVisionConfig(sam=self.sam, patch_size=self.patch_size, downsample_ratio=self.downsample_ratio)

    def num_queries(self, side: int) -> int:
        return dict(self.queries)[side]


@dataclass(frozen=True)
class Mode:
    """The release's one mode ("Default: (0-6)x768x768 + 1x1024x1024"): a global view of base_size,
    padded (aspect kept), plus tiles of image_size when the longest side exceeds image_size."""
    name: str
    base_size: int
    image_size: int
    crop_mode: bool = True
    note: str = ""


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("default", 1024, 768, True, "1024 global view + 0 or 2..6 crops of 768 (the release's only mode)"),
)}
DEFAULT_MODE = "default"

# DeepseekOcr2ImageProcessor: crop_to_patches, min_patches 2, max_patches 6, tile 768; crops only when
# max(W, H) > tile_size; the global view resized so its longest side is 1024, padded grey 127.
MIN_CROPS = 2
MAX_CROPS = 6

VISION = VisionConfig()

# The language model: DeepSeek-V2 MoE exactly as DeepSeek-OCR configures it (the release's language_config:
# hidden 1280, 12 layers, 10 heads, first_k_dense_replace 1, 6848 dense, 64 routed experts of 896, top-6,
# n_shared_experts 2, vocab 129280, max_position_embeddings 8192). `transformers` runs it as
# `DeepseekOcr2TextModel`; what differs from DeepSeek-OCR's vendor code is in `decoder.py`.
LM = LMConfig()
MAX_POSITIONS = 8192
IMAGE_TOKEN_ID = 128815

DTYPES, DEFAULT_DTYPE = STORAGE, DEFAULT_STORAGE

# Prompt text after the image slots (the processor's "<image>\n<|grounding|>Convert the document to
# markdown."): a handful of tokens, as for DeepSeek-OCR; pass --text-tokens for an exact prompt.
DEFAULT_TEXT_TOKENS = 10
DEFAULT_OUTPUT_TOKENS = 1000


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (choose from {', '.join(MODES)})") from None
