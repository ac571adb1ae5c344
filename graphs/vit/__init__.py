"""A second model on the same engine: the ViT image classifier of `transformers`
(`ViTForImageClassification`), symbolic in image side, patch side and batch.

`graphs.vit.config` (the variants as data), `graphs.vit.symbols`, `graphs.vit.graph`
(`build_graph`, token counts, the variants' values); verified by `verify.vit`.
"""
from .config import DEFAULT, VARIANTS, VitConfig, get_variant
from .graph import build_graph, dtype_values, grid, mode_values, num_patches, num_tokens

__all__ = ["DEFAULT", "VARIANTS", "VitConfig", "get_variant", "build_graph", "dtype_values", "grid",
           "mode_values", "num_patches", "num_tokens"]
