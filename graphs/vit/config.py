"""ViT image classifiers as data: `transformers`' `ViTForImageClassification` configurations.

`VitConfig` holds what the cost graph needs (widths, depth, heads, the image and patch sides a
checkpoint was trained for, labels); `transformers.ViTConfig()` defaults are `vit-b16-224`.
The graph is symbolic in the image side, the patch side and the batch: `image_size` and
`patch_size` here are only the values a variant substitutes (`costgraph.graphs.vit.graph.mode_values`).
The position table is (1, (image_size // patch_size)^2 + 1, hidden): each variant's table is
trained at its own size (the 384 checkpoint has its own table), so the reference runs at its
configured size and never interpolates the table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VitConfig:
    name: str = "vit-b16-224"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "gelu"         # exact erf GELU: one aten.gelu
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_labels: int = 1000           # ImageNet-1k

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def note(self) -> str:
        return (f"{self.layers} layers of width {self.hidden}, {self.heads} heads, MLP {self.mlp_dim}; "
                f"{self.image_size}x{self.image_size} px in patches of {self.patch_size}, {self.num_labels} labels")


VARIANTS: dict[str, VitConfig] = {c.name: c for c in (
    VitConfig(),
    VitConfig(name="vit-b16-384", image_size=384),
    VitConfig(name="vit-l16-224", hidden=1024, layers=24, heads=16, mlp_dim=4096),
)}
DEFAULT_VARIANT = "vit-b16-224"
DEFAULT = VARIANTS[DEFAULT_VARIANT]

# Storage dtypes: bytes per element (the engine's `dtype_bytes`).
DTYPES = {"fp32": 4, "bf16": 2}


def get_variant(name: str) -> VitConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown ViT variant {name!r} (choose from {', '.join(VARIANTS)})") from None
