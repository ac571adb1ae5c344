"""The profiled reference: DeepSeek-OCR's vision stack assembled from `transformers` modules
(SPEC section 6), random weights, runnable on `meta` (counts only) or on CPU.

SAM: `DeepseekOcr2SamVisionEncoder` with compressor channels [512, 1024] and SDPA attention.
CLIP-L: `CLIPEncoder`, fed with class token + SAM tokens + position table after the
pre-LayerNorm (CLIP's own conv patch embedding is loaded by the vendor but never runs).
Projector: `nn.Linear(2048, 1280)`. Widths and depths come from `graphs.config`.
Page level (`DeepSeekOCRVision`): the crop batch, the global view, and the newline/separator
assembly of the image slots.
"""
from __future__ import annotations

import math

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


def _encode(scope: str, model: "DeepSeekOCRVision", views: torch.Tensor) -> torch.Tensor:
    return model.encoder(views)


class DeepSeekOCRVision(nn.Module):
    """The views the vendor runs for one page, then the image slots of the prompt (SPEC section 3).

    One batch of `w_crop*h_crop` crops (none when the page is not tiled), then the global view
    (batch 1), then the assembly: the crop tiles stitched row-major into one grid with an
    `image_newline` after every stitched row, the global grid with a newline after every row,
    and one `view_seperator` (the vendor's spelling). Returns (slots, projector_out).

    `encode(scope, model, views)` runs the encoder on one batch; the profiler passes its own
    to label the batches ("vision.crops", "vision.global"). The order is the vendor's.
    """

    def __init__(self, cfg: VisionConfig = VISION):
        super().__init__()
        self.encoder = DeepEncoder(cfg)
        self.image_newline = nn.Parameter(torch.randn(cfg.projector_out))
        self.view_seperator = nn.Parameter(torch.randn(cfg.projector_out))

    def forward(self, global_view: torch.Tensor, crops: torch.Tensor | None = None,
                grid: tuple[int, int] = (1, 1), encode=_encode) -> torch.Tensor:
        crop_features = encode("vision.crops", self, crops) if crops is not None else None
        global_features = encode("vision.global", self, global_view)
        return self.assemble(global_features, crop_features, grid)

    def assemble(self, global_features: torch.Tensor, crop_features: torch.Tensor | None,
                 grid: tuple[int, int]) -> torch.Tensor:
        parts = []
        if crop_features is not None:
            w, h = grid
            tiles, n2, d = crop_features.shape
            n = math.isqrt(n2)
            if tiles != w * h or n * n != n2:
                raise ValueError(f"{tiles} crop views of {n2} tokens do not tile a {w}x{h} grid")
            # tile k sits at row k // w, column k % w: (h, w, n, n, d) -> (h*n, w*n, d)
            stitched = crop_features.view(h, w, n, n, d).permute(0, 2, 1, 3, 4).reshape(h * n, w * n, d)
            parts.append(self._with_newlines(stitched))
        _, n2, d = global_features.shape
        n = math.isqrt(n2)
        parts.append(self._with_newlines(global_features.view(n, n, d)))
        parts.append(self.view_seperator[None, :])
        return torch.cat(parts, dim=0)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        rows, _, d = grid.shape
        newline = self.image_newline[None, None, :].expand(rows, 1, d)
        return torch.cat([grid, newline], dim=1).reshape(-1, d)


def build_page_reference(device: str = "meta", dtype=torch.float32, seed: int = 0) -> DeepSeekOCRVision:
    """The page-level reference with random weights (`meta`: shapes only, no storage)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepSeekOCRVision().to(dtype)
    return model.eval()
