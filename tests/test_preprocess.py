"""The real input path: Pillow resize, tiling, padding and normalisation give the shapes the layout says."""
import numpy as np
import pytest
import torch
from PIL import Image

from costgraph.graphs.deepseek_ocr.config import MODES
from costgraph.graphs.deepseek_ocr.layout import layout_for, layout_for_grid
from costgraph.verify.preprocess import (Views, check_views, crop_images, expected_shapes, meta_views, random_views,
                               to_tensor, views_from_file, views_from_image)

A4 = "graphs/samples/a4_page.png"
GUNDAM = MODES["gundam"]
GREY = (127 / 255 - 0.5) / 0.5


def test_a4_gundam_shapes_and_values():
    v = views_from_file(A4, GUNDAM)
    assert (v.layout.w_crop, v.layout.h_crop, v.layout.num_crops) == (2, 3, 6)
    assert tuple(v.crops.shape) == (6, 3, 640, 640) and tuple(v.global_view.shape) == (1, 3, 1024, 1024)
    assert v.crops.dtype == torch.float32
    assert -1.0 <= float(v.crops.min()) and float(v.crops.max()) <= 1.0
    # portrait page padded into 1024x1024: grey columns left and right, page pixels in the middle
    g = v.global_view[0]
    assert torch.allclose(g[:, :, 0], torch.full_like(g[:, :, 0], GREY))
    assert torch.allclose(g[:, :, -1], torch.full_like(g[:, :, -1], GREY))
    assert float(g[:, 512, 512:520].abs().max()) > 0.1  # not padding


def test_tiles_are_row_major():
    img = Image.open(A4).convert("RGB")
    layout = layout_for(img.width, img.height, GUNDAM)
    tiles = crop_images(img, layout, 640)
    big = img.resize((1280, 1920))
    for k, (col, row) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]):
        want = big.crop((col * 640, row * 640, col * 640 + 640, row * 640 + 640))
        assert np.array_equal(np.asarray(tiles[k]), np.asarray(want)), k


def test_normalisation_is_mean_std_half():
    t = to_tensor([Image.new("RGB", (2, 2), (0, 255, 127))])
    assert t.shape == (1, 3, 2, 2)
    assert t[0, 0, 0, 0] == -1.0 and t[0, 1, 0, 0] == 1.0 and abs(float(t[0, 2, 0, 0]) - GREY) < 1e-7


@pytest.mark.parametrize("mode,padded", [("tiny", False), ("small", False), ("base", True), ("large", True)])
def test_native_modes_stretch_or_pad(mode, padded):
    m = MODES[mode]
    img = Image.new("RGB", (300, 600), (0, 0, 0))  # a black portrait page
    v = views_from_image(img, m)
    assert v.crops is None and tuple(v.global_view.shape) == (1, 3, m.image_size, m.image_size)
    corner = float(v.global_view[0, 0, 0, 0])
    assert abs(corner - GREY) < 1e-6 if padded else corner == -1.0


def test_small_page_has_no_crops_and_sizes_come_from_the_layout():
    v = views_from_file("graphs/samples/small_note.png", GUNDAM)
    assert v.crops is None and not v.layout.tiled and tuple(v.global_view.shape) == (1, 3, 1024, 1024)
    strip = views_from_file("graphs/samples/receipt_strip.png", GUNDAM)
    assert strip.crops.shape[0] == strip.layout.w_crop * strip.layout.h_crop
    gm = MODES["gundam-m"]
    assert expected_shapes(gm, layout_for_grid(3, 2, gm)) == ((1, 3, 1280, 1280), (6, 3, 1024, 1024))


def test_views_are_checked_against_the_layout():
    layout = layout_for_grid(2, 3, GUNDAM)
    good = random_views(GUNDAM, layout)
    assert check_views(good) is good
    with pytest.raises(AssertionError):
        check_views(Views(GUNDAM, layout, good.global_view, good.crops[:5]))
    with pytest.raises(AssertionError):
        check_views(Views(GUNDAM, layout, torch.empty(1, 3, 640, 640), good.crops))
    m = meta_views(GUNDAM, layout)
    assert m.crops.device.type == "meta" and m.crops.shape == good.crops.shape
