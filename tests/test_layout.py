"""The crop layout (dynamic_preprocess) and token counts, against SPEC sections 2-3."""
import pytest
from hypothesis import given, settings, strategies as st

from costgraph.graphs.deepseek_ocr.config import MODES
from costgraph.graphs.deepseek_ocr.layout import candidate_grids, layout_for, padded_size, tokens_for

GUNDAM = MODES["gundam"]


@pytest.mark.parametrize("size, grid", [
    ((1654, 2339), (2, 3)), ((1920, 1080), (4, 2)), ((700, 600), (2, 2)), ((1357, 1357), (2, 2)),
    ((1358, 1358), (3, 3)), ((1250, 1000), (3, 2)),
])
def test_known_cases(size, grid):
    lay = layout_for(*size, GUNDAM)
    assert (lay.w_crop, lay.h_crop) == grid and lay.tiled


@pytest.mark.parametrize("size", [(640, 640), (1, 1), (640, 10), (300, 500)])
def test_small_pages_have_no_crops(size):
    lay = layout_for(*size, GUNDAM)
    assert (lay.w_crop, lay.h_crop, lay.num_crops, lay.tiled) == (1, 1, 0, False)


def test_candidates():
    grids = candidate_grids()
    assert len(grids) == 22 and (1, 1) not in grids
    assert [i * j for i, j in grids] == sorted(i * j for i, j in grids)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 6000), h=st.integers(1, 6000), max_num=st.integers(2, 12))
def test_grid_bounds_and_closest_aspect(w, h, max_num):
    if 0 in padded_size(w, h, 1024):
        return  # refused as too elongated (tested below)
    lay = layout_for(w, h, GUNDAM, max_num=max_num)
    if not lay.tiled:
        assert w <= 640 and h <= 640
        return
    assert 2 <= lay.w_crop * lay.h_crop <= max_num
    best = abs(w / h - lay.w_crop / lay.h_crop)
    assert all(abs(w / h - i / j) >= best for i, j in candidate_grids(2, max_num))


def test_tokens():
    a4 = tokens_for(layout_for(1654, 2339, GUNDAM), GUNDAM)
    assert (a4["total"], a4["paper"]) == (903, 856)
    natives = {m: tokens_for(layout_for(800, 800, MODES[m]), MODES[m]) for m in ("tiny", "small", "base", "large")}
    assert [natives[m]["total"] for m in natives] == [73, 111, 273, 421]
    assert [natives[m]["paper"] for m in natives] == [64, 100, 256, 400]
    for w, h in [(2, 1), (3, 3), (1, 9)]:
        lay = layout_for(640 * w, 640 * h, GUNDAM)
        assert (lay.w_crop, lay.h_crop) == (w, h)
        assert tokens_for(lay, GUNDAM)["total"] == 273 + (10 * w + 1) * (10 * h)


def test_elongated_page_is_refused():
    with pytest.raises(ValueError, match="too elongated"):
        layout_for(1, 20000, GUNDAM)
