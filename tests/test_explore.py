"""`costgraph explore`: the page in a real headless browser (Chromium and its driver, via selenium).

The numbers the page shows, after its inputs are set as a person sets them, equal `costgraph cost --json`
for the same inputs on input sets covering every crop grid (max crops 9), every mode, every variant
option, both dtypes, roofline presets and refused inputs; the layout rule the page runs (translated from
`layout.py`) equals the Python one on thousands of page sizes. Without a browser these tests skip,
saying what to install; under CI=true they fail instead (`.ci/run` installs one).

A screenshot of the page is written (to a temporary folder; COSTGRAPH_SCREENSHOT=docs/explorer.png
writes the README's).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from costgraph.app import cli, explore
from costgraph.app.models import get_model
from costgraph.graphs.deepseek_ocr import layout as L
from costgraph.graphs.deepseek_ocr.config import MODES

INSTALL = "apt-get install chromium chromium-driver (Debian), then pip install -e '.[test]' (selenium)"


def _browser_paths():
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return chrome, shutil.which("chromedriver")


def _no_browser(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"no headless browser under CI: {why} ({INSTALL})")
    pytest.skip(f"no headless browser: {why}; to run these tests: {INSTALL}")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _no_browser("selenium is not installed")
    chrome, driver = _browser_paths()
    if not chrome or not driver:
        _no_browser("chromium or chromedriver not on PATH")
    opts = Options()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(driver))
    d.set_script_timeout(120)
    yield d
    d.quit()


def _page(tmp_path_factory, name):
    path = tmp_path_factory.mktemp("explore") / f"{name}.html"
    path.write_text(explore.build_page(get_model(name)))
    return path


@pytest.fixture(scope="module")
def deepseek_page(tmp_path_factory):
    return _page(tmp_path_factory, "deepseek-ocr")


def _open(browser, path):
    browser.get(path.as_uri())
    t = time.monotonic()
    while True:   # the page's script has run (a loaded machine may take a while to parse a megabyte of it)
        state = browser.execute_script("return window.explorer ? window.explorer.shown().state : null")
        if state is not None or time.monotonic() - t > 30:
            break
        time.sleep(0.1)
    assert state == "ok", browser.execute_script("return document.getElementById('error').textContent")


def _cli(*args) -> tuple[int, dict | None]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, json.loads(out.getvalue()) if code == 0 else None


# ---- the input sets ------------------------------------------------------------------------------

def _size_for_grid(mode, grid, max_num):
    """A page size the layout gives `grid` (1x1: a page within 640x640), found by the Python rule."""
    if grid == (1, 1):
        return 500, 600
    i, j = grid
    for k in range(330, 3000, 37):
        w, h = i * k + 11, j * k + 5
        lay = L.layout_for(w, h, mode, max_num=max_num)
        if (lay.w_crop, lay.h_crop) == grid:
            return w, h
    raise AssertionError(f"no page found for grid {grid}")


def input_sets():
    """(page inputs, cost arguments): every grid of both crop modes (max crops 9), other max crops, every
    native mode at several aspects, every variant option's choices, both dtypes, roofline presets."""
    model = get_model()
    opts = explore.page_options(model)
    rng = random.Random(14)
    sets = []

    def add(mode, w, h, max_num=9, text=10, out=1000, dtype="bf16", variants=None, hardware=""):
        variants = variants or {o.name: o.default for o in opts}
        page = {"mode": mode, "width": w, "height": h, "max_num": max_num, "text_tokens": text, "output_tokens": out,
                "dtype": dtype, "hardware": hardware, "variants": variants}
        args = ["cost", "--mode", mode, "--size", f"{w}x{h}", "--max-num", str(max_num), "--text-tokens", str(text),
                "--dtype", dtype, "--json"]
        if variants.get("phase") != "train":   # a training step generates nothing: the CLI refuses output tokens
            args += ["--output-tokens", str(out)]
        args += [a for k, v in variants.items() for a in (f"--{k.replace('_', '-')}", v)]
        if hardware:
            args += ["--hardware", hardware]
        sets.append((page, args))

    for mode in ("gundam", "gundam-m"):
        for grid in L.all_grids(L.MIN_CROPS, 9):
            w, h = _size_for_grid(MODES[mode], grid, 9)
            add(mode, w, h, text=rng.choice([0, 10, 57]), out=rng.choice([1, 2, 300, 1000]),
                dtype=rng.choice(["bf16", "fp32"]))
    for max_num in (2, 6, 20):
        add("gundam", 900, 4100, max_num=max_num)
    for mode in ("tiny", "small", "base", "large"):
        for w, h in ((1654, 2339), (3000, 400), (300, 300)):
            add(mode, w, h, dtype=rng.choice(["bf16", "fp32"]))
    # every choice of every variant option, in as few combinations as cover them (each costs the CLI seconds),
    # and every variant set of another phase (a training step per setting)
    defaults = {o.name: o.default for o in opts}
    inference = [s for s in explore.combos(model) if s.get("phase", defaults.get("phase")) == defaults.get("phase")]
    width = max(len({s[o.name] for s in inference}) for o in opts)
    for k in range(1, width):
        options = {o.name: sorted({s[o.name] for s in inference})[k % len({s[o.name] for s in inference})]
                   for o in opts}
        add("gundam", 1200, 1700, variants=options, out=rng.choice([1, 500]))
        add("base", 1654, 2339, variants=options, dtype="fp32")
    for s in explore.combos(model):
        if s not in inference:
            add("gundam", 1654, 2339, variants=s, text=rng.choice([10, 300]), hardware="h200")
            add("small", 800, 600, variants=s, dtype="fp32")
    add("gundam", 1654, 2339, out=200, hardware="h200")
    add("base", 2000, 1000, out=50, hardware="a100-40gb", dtype="fp32")
    add("gundam-m", 2500, 900, out=3, hardware="l4")
    return sets


REFUSED = [  # (page inputs, cost arguments): both refuse
    ({"mode": "base", "width": 1, "height": 5000}, ["cost", "--mode", "base", "--size", "1x5000", "--json"]),
    ({"mode": "gundam", "width": 1654, "height": 2339, "output_tokens": 8000},
     ["cost", "--size", "1654x2339", "--output-tokens", "8000", "--json"]),
    ({"mode": "gundam", "width": 0, "height": 20}, ["cost", "--size", "0x20", "--json"]),
]


# ---- the tests -----------------------------------------------------------------------------------

def test_page_numbers_equal_the_cli(browser, deepseek_page, tmp_path):
    sets = input_sets()
    assert len(sets) >= 50
    _open(browser, deepseek_page)
    t = time.perf_counter()
    shown = browser.execute_script(
        "return arguments[0].map((inp) => { window.explorer.set(inp); return window.explorer.shown(); })",
        [p for p, _ in sets])
    browser_seconds = time.perf_counter() - t
    checked = 0
    for (page, args), got in zip(sets, shown):
        code, want = _cli(*args)
        assert code == 0, args
        assert got["state"] == "ok", (page, got["error"])
        v = got["values"]
        lay, seq = want["layout"], want["sequence"]
        assert v["grid"].split(" ")[0] == f"{lay['w_crop']}x{lay['h_crop']}", page
        for k in ("num_crops", "image_tokens", "paper_tokens", "valid_tokens", "valid_tokens_paper_ceil"):
            assert int(v[k]) == lay[k], (page, k)
        for k in ("prompt_tokens", "decode_forwards", "final_context"):
            assert int(v[k]) == seq[k], (page, k)
        page_totals = {k.split(".", 1)[1] for k in v if k.startswith("totals.")}
        want_totals = {f"{s}.{m}" for s, ms in want["totals"].items() for m in [*ms, "bytes"]}
        assert page_totals == want_totals, page
        for s, ms in want["totals"].items():
            for m, x in {**ms, **want["derived"][s]}.items():
                assert int(v[f"totals.{s}.{m}"]) == x, (page, s, m)
                checked += 1
        if page["hardware"]:
            stages = want["roofline"][page["hardware"]]["stages"]
            for st, rec in stages.items():
                if st == "total_seconds":
                    assert float(v["roofline.total_seconds"]) == pytest.approx(rec, rel=1e-12)
                    continue
                assert float(v[f"roofline.{st}.seconds"]) == pytest.approx(rec["seconds"], rel=1e-12), (page, st)
                if "per_token_mean_seconds" in rec:
                    assert float(v[f"roofline.{st}.per_token_mean_seconds"]) == \
                        pytest.approx(rec["per_token_mean_seconds"], rel=1e-12)
    print(f"{len(sets)} input sets, {checked} totals equal; the browser took {browser_seconds:.2f} s for all")
    shot = os.environ.get("COSTGRAPH_SCREENSHOT") or str(tmp_path / "explorer.png")
    browser.execute_script("window.explorer.set(arguments[0])", sets[0][0] | {
        "mode": "gundam", "width": 1654, "height": 2339, "max_num": 9, "text_tokens": 10, "output_tokens": 1000,
        "dtype": "bf16", "hardware": "h200"})
    assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10_000


def test_page_refuses_what_the_cli_refuses(browser, deepseek_page):
    _open(browser, deepseek_page)
    defaults = {"mode": "gundam", "max_num": 9, "text_tokens": 10, "output_tokens": 1000, "dtype": "bf16"}
    got = browser.execute_script(
        "return arguments[0].map((inp) => { window.explorer.set(inp); return window.explorer.shown(); })",
        [defaults | page for page, _ in REFUSED])
    for (page, args), g in zip(REFUSED, got):
        code, _ = _cli(*args)
        assert code == 2, args
        assert g["state"] == "error" and g["error"], page
        assert not any(k.startswith("totals.") for k in g["values"]), page


def _layout_cases():
    rng = np.random.default_rng(14)
    w = np.exp(rng.uniform(0, np.log(20000), 1500)).astype(np.int64) + 1
    h = np.exp(rng.uniform(0, np.log(20000), 1500)).astype(np.int64) + 1
    ties = [(i * k, j * k) for i in range(1, 10) for j in range(1, 10) for k in (320, 640, 641, 700, 1000)]
    edges = [(640, 640), (641, 640), (640, 641), (1, 1), (1, 3000), (3000, 1), (2, 2049), (2049, 2), (1023, 2047)]
    pairs = [*zip(w.tolist(), h.tolist()), *ties, *edges]
    return [int(a) for a, _ in pairs], [int(b) for _, b in pairs]


def test_page_layout_rule_equals_python(browser, deepseek_page):
    """The translated kernels against layouts_for, valid_tokens_for, padded_sizes and check_page."""
    _open(browser, deepseek_page)
    widths, heights = _layout_cases()
    cases = [(name, n) for name in MODES for n in (2, 6, 9, 12, 64)]
    got = browser.execute_script(
        "const [w, h, cases] = arguments;"
        "return cases.map(([m, n]) => w.map((x, k) => window.explorer.page_point(x, h[k], m, n)))",
        widths, heights, cases)
    compared = 0
    for (name, n), points in zip(cases, got):
        mode = MODES[name]
        refused = []
        for x, y in zip(widths, heights):
            try:
                L.check_page(x, y, mode)
                refused.append(False)
            except ValueError:
                refused.append(True)
        assert [p["too_elongated"] for p in points] == refused, name
        keep = [k for k, r in enumerate(refused) if not r]
        w, h = np.array(widths)[keep], np.array(heights)[keep]
        lay = L.layouts_for(w, h, mode, max_num=n)
        valid = L.valid_tokens_for(w, h, lay.num_crops, mode)
        pw, ph = L.padded_sizes(w, h, mode.base_size)
        want = {"w_crop": lay.w_crop, "h_crop": lay.h_crop, "tiled": lay.tiled, "num_crops": lay.num_crops,
                "valid_tokens": valid.vendor, "valid_tokens_paper_ceil": valid.paper_ceil,
                "padded_width": pw, "padded_height": ph}
        for key, arr in want.items():
            page = [points[k][key] for k in keep]
            assert [int(x) for x in page] == [int(x) for x in arr], (name, n, key)
        compared += len(keep)
    assert compared > 50_000


def test_page_tree_and_file_picker(browser, deepseek_page):
    """A scope opened in the tree lists its nodes with their cost over the run (as `api.nodes` gives them);
    an image picked in the file control sets the page size the loader reads."""
    from costgraph.app import api
    from costgraph.graphs.pages import page_size

    _open(browser, deepseek_page)
    image = str(Path(__file__).resolve().parent.parent / "graphs" / "samples" / "a4_page.png")
    browser.find_element("id", "file").send_keys(image)
    t = time.monotonic()
    while time.monotonic() - t < 10:
        size = browser.execute_script("return [document.getElementById('width').value, "
                                      "document.getElementById('height').value]")
        if [int(x) for x in size] == list(page_size(image)):
            break
        time.sleep(0.05)
    assert [int(x) for x in size] == list(page_size(image))
    shown = browser.execute_script(
        "document.querySelector('details[data-scope=\"vision.crops\"]').open = true;"
        "return new Promise((done) => setTimeout(() => done(window.explorer.shown().values), 50));")
    nodes = api.nodes("gundam", "vision.crops", size=page_size(image))
    listed = [(name, flops) for name, _kind, flops in nodes if f"node.{name}.flops" in shown]
    assert len(listed) == len(nodes) > 100, "the opened scope lists its nodes"
    for name, flops in listed:
        assert int(shown[f"node.{name}.flops"]) == flops, name


def test_vit_page(browser, tmp_path_factory):
    """A model without crops or a language model: no grid controls; its numbers equal the CLI's."""
    page = _page(tmp_path_factory, "vit")
    _open(browser, page)
    hidden = browser.execute_script("return ['max-num-box', 'sequence-box'].map((id) => document.getElementById(id).hidden)")
    assert hidden == [True, True]
    model = get_model("vit")
    sets = [({"mode": m, "width": w, "height": h, "dtype": d}, m, f"{w}x{h}", d)
            for m in model.modes for w, h, d in ((224, 224, "bf16"), (1000, 300, "fp32"))]
    got = browser.execute_script(
        "return arguments[0].map((inp) => { window.explorer.set(inp); return window.explorer.shown(); })",
        [s[0] for s in sets])
    for (inp, mode, size, dtype), g in zip(sets, got):
        code, want = _cli("--model", "vit", "cost", "--mode", mode, "--size", size, "--dtype", dtype, "--json")
        assert code == 0 and g["state"] == "ok", g["error"]
        assert int(g["values"]["tokens"]) == want["image"]["tokens"]
        for s, ms in want["totals"].items():
            for m, x in {**ms, **want["derived"][s]}.items():
                assert int(g["values"][f"totals.{s}.{m}"]) == x, (inp, s, m)


def test_explore_command_writes_one_offline_file(tmp_path):
    """No network in the page: no external URL in any src/href, and bad input is one line, exit 2."""
    out = tmp_path / "vit.html"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["--model", "vit", "explore", "--out", str(out)]) == 0
        assert cli.main(["--model", "vit", "explore", "--attention", "flash", "--out", str(tmp_path / "x.html")]) == 2
        assert cli.main(["explore", "--out", str(tmp_path / "missing" / "x.html")]) == 2
    text = out.read_text()
    assert "src=\"http" not in text and "href=\"http" not in text and "import(" not in text
    assert "/*COSTGRAPH-DATA*/" not in text
    assert not (tmp_path / "x.html").exists()


# ---- without a browser: the translator and the printer refuse what they cannot do -----------------

def _loop_kernel(w):
    while w > 1:
        w = w // 2
    return w


def _comprehension_kernel(w):
    return [x for x in w]


def test_translator_refuses_what_it_cannot_translate():
    from costgraph.app.pyjs import Untranslatable, translate

    for fn in (_loop_kernel, _comprehension_kernel):
        with pytest.raises(Untranslatable, match=fn.__name__):
            translate(fn)
    js = translate(L.page_point)   # the kernels it calls and the constants they read come along
    for name in ("function page_point", "function closest_grids", "function grid_choice", "function valid_counts",
                 "function padded_sizes", "function unpadded_share", f"const NO_CROP_THRESHOLD = {L.NO_CROP_THRESHOLD}"):
        assert name in js


def test_printer_is_exact_or_refuses():
    import sympy as sp

    from costgraph.app.jscode import JSPrinter

    x = sp.Symbol("w_crop", integer=True, positive=True)
    code = JSPrinter().code(2 ** 60 * x + 3)            # past 2^53: digits kept, BigInt literals
    assert "1152921504606846976n" in code and "v.w_crop" in code
    assert "ediv" in JSPrinter().code(x * (x + 1) / 2)   # an exact division, checked at run time
    with pytest.raises(NotImplementedError, match="sin"):
        JSPrinter().code(sp.sin(x))


def test_page_point_composes_the_kernels_as_python_does():
    """page_point (the page's entry to the layout rule) against layouts_for, valid_tokens_for, padded_sizes."""
    widths, heights = _layout_cases()
    for name, mode in MODES.items():
        ok = [k for k, (w, h) in enumerate(zip(widths, heights)) if not L.pads(mode) or
              min(L.padded_size(w, h, mode.base_size)) > 0]
        w, h = np.array(widths)[ok], np.array(heights)[ok]
        got = L.page_point(w, h, L.page_data(mode), L.candidate_grids(L.MIN_CROPS, 9))
        lay = L.layouts_for(w, h, mode)
        valid = L.valid_tokens_for(w, h, lay.num_crops, mode)
        assert not got["too_elongated"].any()
        for key, want in (("w_crop", lay.w_crop), ("h_crop", lay.h_crop), ("num_crops", lay.num_crops),
                          ("valid_tokens", valid.vendor), ("valid_tokens_paper_ceil", valid.paper_ceil)):
            assert np.array_equal(got[key], want), (name, key)
