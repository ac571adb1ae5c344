"""Synthetic document pages for tests, examples and the README (run: python -m costgraph.graphs.samples.make_samples).

Deterministic: the same files every time. Sizes cover the layout's cases: an A4 page at
200 dpi (2x3 crops), a 16:9 slide (4x2), a long receipt strip (1x9 region) and a page
within 640x640 (no crops).
"""
from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLES = {
    "a4_page.png": (1654, 2339),
    "slide_16x9.png": (1920, 1080),
    "receipt_strip.png": (600, 4000),
    "small_note.png": (600, 400),
}


def page(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("L", (width, height), 255)
    d = ImageDraw.Draw(img)
    margin = max(8, width // 14)
    line = max(10, height // 60)
    y = margin
    d.rectangle([margin, y, width - margin, y + 2 * line], fill=40)  # a title bar
    y += 3 * line
    while y < height - margin - line:
        x = margin
        while x < width - margin:  # "words": dark boxes of random width
            w = rng.randint(line, 5 * line)
            if x + w > width - margin:
                break
            d.rectangle([x, y, x + w, y + line // 2], fill=rng.randint(0, 90))
            x += w + line // 2
        y += line + (2 * line if rng.random() < 0.1 else 0)
    return img.convert("RGB")


def main(folder: str = HERE) -> list[str]:
    paths = []
    for seed, (name, (w, h)) in enumerate(sorted(SAMPLES.items())):
        path = os.path.join(folder, name)
        page(w, h, seed).save(path, optimize=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in main():
        print(p)
