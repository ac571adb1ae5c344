"""Profiling the reference: FlopCounterMode counts per module and per aten op."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from graphs.config import Mode
from graphs.layout import Layout
from .reference import build_deep_encoder


@dataclass
class Counts:
    """FLOPs per module path (inclusive of children) and per aten op, for one run."""
    total: int = 0
    by_module: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, prefix: str, fc: FlopCounterMode) -> None:
        self.total += fc.get_total_flops()
        for mod, ops in fc.get_flop_counts().items():
            key = f"{prefix}.{mod}" if mod != "Global" else prefix
            slot = self.by_module.setdefault(key, {})
            for op, n in ops.items():
                slot[str(op)] = slot.get(str(op), 0) + n


@lru_cache(maxsize=2)
def meta_encoder():
    return build_deep_encoder("meta")


def count_views(side: int, batch: int, model=None) -> FlopCounterMode:
    """One forward of `batch` square views of `side` through the reference, counted on `meta`."""
    model = model or meta_encoder()
    x = torch.empty(batch, 3, side, side, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc


def count_vision_meta(mode: Mode, layout: Layout) -> Counts:
    """The views the vendor runs for a page: one batch of crops (if tiled), then the global view."""
    counts = Counts()
    if layout.tiled:
        counts.add("vision.crops", count_views(mode.image_size, layout.num_crops))
    side = mode.base_size if mode.crop_mode else mode.image_size
    counts.add("vision.global", count_views(side, 1))
    return counts
