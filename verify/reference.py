"""The profiled reference: DeepSeek-OCR's vision stack assembled from `transformers` modules
(SPEC section 6), random weights, runnable on `meta` (counts only) or on CPU.

SAM: `DeepseekOcr2SamVisionEncoder` with compressor channels [512, 1024] and SDPA attention.
CLIP-L: `CLIPEncoder`, fed with class token + SAM tokens + position table after the
pre-LayerNorm (CLIP's own conv patch embedding is loaded by the vendor but never runs).
Projector: `nn.Linear(2048, 1280)`. Widths and depths come from `graphs.config`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphs.config import VISION, VisionConfig


def _sam(cfg: VisionConfig):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder

    c = cfg.sam
    sc = DeepseekOcr2SamVisionConfig(
        hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.heads, mlp_dim=c.mlp_dim,
        window_size=c.window, global_attn_indexes=list(c.global_blocks), output_channels=c.neck_channels,
        downsample_channels=list(c.compressor_channels), image_size=c.pretrain_grid * cfg.patch_size,
        patch_size=cfg.patch_size, layer_norm_eps=c.layer_norm_eps, hidden_act="gelu",
    )
    sc._attn_implementation = "sdpa"
    return DeepseekOcr2SamVisionEncoder(sc)


def _clip_config(cfg: VisionConfig):
    from transformers import CLIPVisionConfig

    c = cfg.clip
    cc = CLIPVisionConfig(
        hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.depth, num_attention_heads=c.heads,
        image_size=c.pretrain_grid * c.patch_size, patch_size=c.patch_size, hidden_act="quick_gelu",
        layer_norm_eps=c.layer_norm_eps,
    )
    cc._attn_implementation = "sdpa"
    return cc


class ClipOnSam(nn.Module):
    """CLIP-L whose patch embeddings are SAM's output tokens."""

    def __init__(self, cfg: VisionConfig = VISION):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoder

        c = cfg.clip
        self.grid = c.pretrain_grid
        self.class_embedding = nn.Parameter(torch.randn(c.width))
        self.position_embedding = nn.Embedding(c.pretrain_grid ** 2 + 1, c.width)
        self.pre_layrnorm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(_clip_config(cfg))

    def positions(self, n: int) -> torch.Tensor:
        table = self.position_embedding.weight
        cls, grid = table[:1], table[1:]
        if n != self.grid:
            grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(n, n), mode="bicubic", antialias=True, align_corners=False)
            grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(n * n, -1)
        return torch.cat([cls, grid], dim=0)

    def forward(self, sam_out: torch.Tensor) -> torch.Tensor:
        b, c, n, _ = sam_out.shape
        tokens = sam_out.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(b, 1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.positions(n)
        x = self.pre_layrnorm(x)
        return self.encoder(inputs_embeds=x).last_hidden_state


class DeepEncoder(nn.Module):
    """SAM -> CLIP -> fusion -> projector for a batch of square views of one side."""

    def __init__(self, cfg: VisionConfig = VISION):
        super().__init__()
        self.sam = _sam(cfg)
        self.clip = ClipOnSam(cfg)
        self.projector = nn.Linear(cfg.clip.width + cfg.sam.compressor_channels[-1], cfg.projector_out)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.sam(pixels).last_hidden_state
        c = self.clip(s)
        x = torch.cat([c[:, 1:], s.flatten(2).transpose(1, 2)], dim=-1)
        return self.projector(x)


def build_deep_encoder(device: str = "meta", dtype=torch.float32, seed: int = 0) -> DeepEncoder:
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepEncoder().to(dtype)
    return model.eval()
