"""DeepSeek-OCR as data: widths, heads, windows, global blocks, modes (SPEC sections 1, 4, 5).

Graph builders and the profiled reference read these values; no other file spells them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from costgraph.dtypes import DEFAULT_STORAGE, STORAGE


@dataclass(frozen=True)
class SamConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    window: int = 14
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    pretrain_grid: int = 64          # abs-pos table and global rel-pos tables are for a 64x64 grid
    in_channels: int = 3
    neck_channels: int = 256
    compressor_channels: tuple[int, ...] = (512, 1024)  # two 3x3 stride-2 convs
    compressor_stride: int = 2
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class ClipConfig:
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    pretrain_grid: int = 16          # (257, 1024) position table: class token + 16x16
    patch_size: int = 14             # its own conv patch embedding, loaded but never run
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class VisionConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector_out: int = 1280        # = LM hidden size
    patch_size: int = 16
    downsample_ratio: int = 4        # = compressor_stride ** len(compressor_channels)


@dataclass(frozen=True)
class Mode:
    name: str
    base_size: int
    image_size: int
    crop_mode: bool
    note: str = ""


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("tiny", 512, 512, False, "one 512x512 view, image stretched"),
    Mode("small", 640, 640, False, "one 640x640 view, image stretched"),
    Mode("base", 1024, 1024, False, "one 1024x1024 view, padded"),
    Mode("large", 1280, 1280, False, "one 1280x1280 view, padded"),
    Mode("gundam", 1024, 640, True, "1024 global view + w_crop x h_crop crops of 640 (HF default)"),
    Mode("gundam-m", 1280, 1024, True, "variant: 1280 global + 1024 crops; vLLM only, the HF code cannot run it"),
)}

# dynamic_preprocess constants (SPEC section 2)
MIN_CROPS = 2
MAX_CROPS = 9                 # HF; vLLM caps at 6
NO_CROP_THRESHOLD = 640       # hard-coded in the vendor code, whatever the tile size
PAD_FILL = (127, 127, 127)
NORM_MEAN = NORM_STD = (0.5, 0.5, 0.5)

VISION = VisionConfig()

# Storage dtypes: the engine's one table (bf16, the vendor's, is the default).
DTYPES, DEFAULT_DTYPE = STORAGE, DEFAULT_STORAGE


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (choose from {', '.join(MODES)})") from None


# ---- language model (SPEC section 5) -------------------------------------------------------

@dataclass(frozen=True)
class LMConfig:
    """The DeepSeek-V2 decoder as DeepSeek-OCR configures it: MHA (no GQA, no MLA), no biases,
    one dense SwiGLU layer then MoE layers. Small instances drive the unit tests."""
    hidden: int = 1280
    layers: int = 12
    heads: int = 10
    head_dim: int = 128              # = hidden // heads (the reference derives it so)
    rope_theta: float = 10000.0      # RoPE over all head_dim dims: inv_freq has head_dim // 2 entries
    rms_norm_eps: float = 1e-6
    vocab: int = 129280
    dense_layers: int = 1            # layers 0 .. dense_layers-1 are dense, the rest MoE
    dense_intermediate: int = 6848
    routed_experts: int = 64
    experts_per_token: int = 6       # greedy top-k, no renormalisation
    routed_scaling: float = 1.0
    moe_intermediate: int = 896
    shared_experts: int = 2          # one shared SwiGLU of shared_experts * moe_intermediate = 1792
    router_dtype: str = "float32"    # the router Linear runs in fp32 whatever the model dtype

    @property
    def shared_intermediate(self) -> int:
        return self.shared_experts * self.moe_intermediate

    @property
    def rope_pairs(self) -> int:
        return self.head_dim // 2

    @property
    def mlp_layer_types(self) -> tuple[str, ...]:
        return ("dense",) * self.dense_layers + ("sparse",) * (self.layers - self.dense_layers)

    @property
    def kv_values_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim


LM = LMConfig()

# Positions the language model runs (max_position_embeddings; vLLM's max_model_len): a prompt plus
# its generated tokens, prompt + output_tokens - 1 cached at the last step, must fit.
MAX_POSITIONS = 8192

# Prompt text after the image slots. The vendor's default OCR prompt,
# "\n<|grounding|>Convert the document to markdown.", is a handful of tokens; the tokenizer is
# not available here, so 10 is an estimate (newline, <|grounding|>, about 7 word pieces, the
# period). Pass --text-tokens for an exact prompt.
DEFAULT_TEXT_TOKENS = 10
# Generated tokens when none are given: a round figure for one page of markdown
# (dense pages run to 1,000-2,000+). Pass --output-tokens.
DEFAULT_OUTPUT_TOKENS = 1000
