"""Valid tokens and the compression ratio (SPEC section 3): the vendor's printouts, every mode, its
float quirks, the paper's ceil variant, and the records and options of every command that shows a layout."""
import csv
import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from costgraph.app import sweep as SW
from costgraph.app import tables
from costgraph.graphs.deepseek_ocr.config import MODES, Mode
from costgraph.graphs.deepseek_ocr.layout import (compression_ratio, layout_for, layout_for_grid, layouts_for, padded_size, valid_tokens,
                           valid_tokens_for)

GUNDAM, GUNDAM_M = MODES["gundam"], MODES["gundam-m"]


def spec_valid_tokens(width, height, mode, crops_run, rounding=int):
    """SPEC section 3 read literally, one page at a time in plain Python (the test's oracle).

    `crops_run`: crops that actually run (the length of the vendor's crop list).
    """
    r = 1 - (max(width, height) - min(width, height)) / max(width, height)
    valid = 0
    if mode.crop_mode:
        if mode.base_size == 1024:
            valid += rounding(256 * r)
        elif mode.base_size == 1280:
            valid += rounding(400 * r)
        if mode.image_size == 640:
            valid += 100 * crops_run
    elif mode.base_size == 1024:
        valid += rounding(256 * r)
    elif mode.base_size == 1280:
        valid += rounding(400 * r)
    elif mode.base_size == 640:
        valid += 100
    elif mode.base_size == 512:
        valid += 64
    return valid


def counts(width, height, mode):
    v = valid_tokens(layout_for(width, height, mode), mode)
    return v["valid_tokens"], v["valid_tokens_paper_ceil"]


# ---- the rule -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, printed", [((1653, 2339), 780), ((1170, 1654), 781)])
def test_published_vendor_printouts(size, printed):
    lay = layout_for(*size, GUNDAM)
    assert lay.num_crops == 6
    assert counts(*size, GUNDAM)[0] == printed


def test_native_modes():
    # 1653/2339 = 0.70671...: 256 r = 180.92, 400 r = 282.68; 1080/1920 = 0.5625 exactly: 144 and 225
    assert [counts(1653, 2339, MODES[m])[0] for m in ("tiny", "small", "base", "large")] == [64, 100, 180, 282]
    assert [counts(1920, 1080, MODES[m])[0] for m in ("tiny", "small", "base", "large")] == [64, 100, 144, 225]
    # tiny and small stretch the page: every feature is valid, whatever its shape, in both variants
    assert counts(3000, 500, MODES["tiny"]) == (64, 64) and counts(500, 3000, MODES["small"]) == (100, 100)


def test_gundam_m_adds_nothing_for_its_crops():
    lay = layout_for(1653, 2339, GUNDAM_M)
    assert lay.num_crops == 6                       # six 1024 crops run ...
    assert counts(1653, 2339, GUNDAM_M) == (282, 283)  # ... but only int(400 r) counts: the tile is not 640


def test_no_crop_page_counts_the_global_view_only():
    lay = layout_for(600, 400, GUNDAM)
    assert (lay.w_crop, lay.h_crop, lay.num_crops) == (1, 1, 0)
    # r = 2/3: 256 r = 170.67; the vendor's crop list is empty, so no 100 for the reported 1x1 grid
    assert counts(600, 400, GUNDAM) == (170, 171)


def test_square_page():
    assert counts(1358, 1358, GUNDAM) == (256 + 900, 256 + 900)   # grid 3x3
    assert counts(640, 640, GUNDAM) == (256, 256)                 # no crops
    assert counts(2000, 2000, MODES["base"]) == (256, 256)
    assert counts(2000, 2000, MODES["large"]) == (400, 400)


def test_paper_ceil_is_one_more_on_a_typical_page():
    for size in ((1653, 2339), (1170, 1654), (1654, 2339), (2550, 3300)):
        vendor, ceil = counts(*size, GUNDAM)
        assert ceil == vendor + 1, size


def test_the_float_expression_is_replicated_not_simplified():
    """r is computed as 1 - (max - min) / max, not min / max: at 660x1000, 400 r is 263.99999999999994 in
    floats (exactly 264 in reals), so the vendor's int() prints 263 and the ceil gives 264."""
    assert 400 * (1 - (1000 - 660) / 1000) < 264 == 400 * 660 / 1000
    assert counts(660, 1000, MODES["large"]) == (263, 264)
    assert counts(1000, 660, GUNDAM_M) == (263, 264)


def test_no_rule_for_other_base_sizes():
    with pytest.raises(ValueError, match="no case for mode 'odd' with base_size 768"):
        valid_tokens(layout_for(800, 600, Mode("odd", 768, 768, False)), Mode("odd", 768, 768, False))


def test_grid_input_uses_the_nominal_page():
    lay = layout_for_grid(2, 3, GUNDAM)           # 1280x1920: r = 2/3, int(170.67) + 600
    assert (lay.width, lay.height) == (1280, 1920)
    assert valid_tokens(lay, GUNDAM) == {"valid_tokens": 770, "valid_tokens_paper_ceil": 771}


def _pages(w, h):
    return [(a, b) for a, b in zip(w, h) if 0 not in padded_size(a, b, 1024)]  # the stricter side: refused pages left out


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 12000), st.integers(1, 12000)), min_size=1, max_size=40),
       mode=st.sampled_from(sorted(MODES)))
def test_vectorised_equals_the_spec_transcription(sizes, mode):
    m = MODES[mode]
    sizes = _pages(*zip(*sizes))
    if not sizes:
        return
    w, h = (np.array(x) for x in zip(*sizes))
    lay = layouts_for(w, h, m)
    got = valid_tokens_for(w, h, lay.num_crops, m)
    crops = lay.num_crops.tolist()
    assert got.vendor.tolist() == [spec_valid_tokens(a, b, m, p) for (a, b), p in zip(sizes, crops)]
    assert got.paper_ceil.tolist() == [spec_valid_tokens(a, b, m, p, math.ceil) for (a, b), p in zip(sizes, crops)]


def test_vectorised_equals_the_spec_transcription_on_many_pages():
    rng = np.random.default_rng(11)
    w = np.concatenate([rng.integers(1, 8000, 30_000), [660, 1000, 1653, 1170]])
    h = np.concatenate([rng.integers(1, 8000, 30_000), [1000, 660, 2339, 1654]])
    keep = np.minimum(w, h) * 1024 >= np.maximum(w, h)
    w, h = w[keep], h[keep]
    for name in ("large", "gundam", "gundam-m"):
        m = MODES[name]
        lay = layouts_for(w, h, m)
        got = valid_tokens_for(w, h, lay.num_crops, m)
        expected = [spec_valid_tokens(a, b, m, p) for a, b, p in zip(w.tolist(), h.tolist(), lay.num_crops.tolist())]
        assert got.vendor.tolist() == expected, name
    # the sample holds pages where min/max would round the other way: the quirk is exercised
    assert int(valid_tokens_for([660], [1000], [0], MODES["large"]).vendor[0]) == 263


def test_compression_ratio():
    assert compression_ratio(7800, 780) == 10.0 and compression_ratio(0, 780) == 0.0
    assert compression_ratio(100, 0) is None       # a sliver in base/large: no valid tokens
    for bad in (-1, 1.5, "7", True, None):
        with pytest.raises(ValueError, match="output_text_tokens must be an integer >= 0"):
            compression_ratio(bad, 780)


# ---- the commands -----------------------------------------------------------------------------------

def test_layout_acceptance(cli):
    code, out, _ = cli("layout", "--size", "1653x2339", "--json")
    rec = json.loads(out)[0]
    assert code == 0 and rec["valid_tokens"] == 780 and rec["valid_tokens_paper_ceil"] == 781
    assert "compression_ratio" not in rec


def test_layout_output_text_tokens(cli):
    code, out, _ = cli("layout", "--size", "1653x2339", "--size", "1170x1654", "--output-text-tokens",
                       "7800", "--json")
    recs = json.loads(out)
    assert code == 0 and [r["compression_ratio"] for r in recs] == [7800 / 780, 7800 / 781]
    assert recs[0]["output_text_tokens"] == 7800 and "valid_tokens" in recs[0]["compression_ratio_basis"]
    code, out, _ = cli("layout", "--size", "1653x2339", "--output-text-tokens", "7800")
    header, _, row = out.splitlines()
    assert "valid tokens" in header and "valid (paper ceil)" in header and "compression (7800 / valid)" in header
    assert row.split() == ["1653x2339", "2x3", "6", "903", "856", "780", "781", "10.00"]


def test_cost_carries_valid_tokens_and_ratio(cli):
    code, out, _ = cli("cost", "--size", "600x400", "--scope", "vision", "--metrics", "flops",
                       "--output-text-tokens", "340", "--json")
    lay = json.loads(out)["layout"]
    assert code == 0 and (lay["valid_tokens"], lay["valid_tokens_paper_ceil"], lay["compression_ratio"]) == \
        (170, 171, 2.0)
    code, out, _ = cli("cost", "--size", "1653x2339", "--scope", "vision", "--metrics", "flops",
                       "--output-text-tokens", "7800")
    assert code == 0 and "valid tokens 780 (the vendor's int rule; 781 with the paper's ceil); compression 10.00" \
        in out
    code, out, _ = cli("cost", "--grid", "2x3", "--scope", "vision", "--metrics", "flops", "--json")
    assert json.loads(out)["layout"]["valid_tokens"] == 770   # the grid's nominal page, 1280x1920


def test_table_columns(cli):
    rows = tables.build_rows([("tiny", None), ("large", None), ("gundam", (2, 3))], metrics=("flops",),
                             output_text_tokens=1540)
    cells = [{k: v for k, _, v in r.cells} for r in rows]
    assert [(c["valid_tokens"], c["valid_tokens_paper_ceil"], c["compression_ratio"]) for c in cells] == \
        [(64, 64, 1540 / 64), (400, 400, 3.85), (770, 771, 2.0)]
    code, out, _ = cli("table", "--rows", "base,gundam:2x3", "--metric", "flops", "--format", "csv",
                       "--output-text-tokens", "1540")
    got = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["valid_tokens"], r["valid_tokens_paper_ceil"], r["compression_ratio"]) for r in got] \
        == [("256", "256", "6.015625"), ("770", "771", "2.0")]
    code, out, _ = cli("table", "--rows", "gundam:2x3", "--metric", "flops", "--format", "csv")
    assert "valid_tokens" in out.splitlines()[0] and "compression_ratio" not in out


def test_sweep_columns(cli, tmp_path):
    s = SW.sweep_pages("gundam", [1653, 1170, 600], [2339, 1654, 400], metrics=("flops",), output_text_tokens=7800)
    assert s.columns["valid_tokens"].tolist() == [780, 781, 170]
    assert s.columns["valid_tokens_paper_ceil"].tolist() == [781, 782, 171]
    assert s.columns["compression_ratio"].tolist() == [7800 / 780, 7800 / 781, 7800 / 170]
    s = SW.sweep_pages("base", [1, 2], [300, 300], metrics=("flops",), output_text_tokens=10)
    assert s.columns["valid_tokens"].tolist() == [0, 1]
    assert [p["compression_ratio"] for p in json.loads(s.to_json())["points"]] == [None, 10.0]
    code, _, err = cli("sweep", "--grids", "2x3", "--output-text-tokens", "770", "--no-plots", "--out",
                       str(tmp_path))
    data = json.load(open(tmp_path / "sweep.json"))
    point, no_crop = data["points"][0], data["no_crop"]
    assert code == 0, err
    assert (point["valid_tokens"], point["valid_tokens_paper_ceil"], point["compression_ratio"]) == (770, 771, 1.0)
    assert (no_crop["valid_tokens"], no_crop["compression_ratio"]) == (256, 770 / 256)  # nominal 640x640
    row = next(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert (row["valid_tokens"], row["compression_ratio"]) == ("770", "1.0")


@pytest.mark.parametrize("argv", [
    ["layout", "--size", "1653x2339", "--output-text-tokens", "-1"],
    ["layout", "--size", "1653x2339", "--output-text-tokens", "1.5"],
    ["layout", "--size", "1653x2339", "--output-text-tokens", "many"],
    ["cost", "--size", "1653x2339", "--output-text-tokens", "-5"],
    ["table", "--rows", "tiny", "--output-text-tokens", "-1"],
    ["sweep", "--grids", "2x2", "--no-plots", "--out", "OUT", "--output-text-tokens", "-1"],
])
def test_bad_output_text_tokens_is_one_line_exit_2(cli, tmp_path, argv):
    code, out, err = cli(*[str(tmp_path / "o") if a == "OUT" else a for a in argv])
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
    assert "output_text_tokens must be an integer >= 0" in err or "--output-text-tokens" in err
    assert not (tmp_path / "o").exists()
