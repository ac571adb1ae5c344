"""Sweeps: the vectorised layout rule against a plain transcription of SPEC section 2, the grid
sweep against `costgraph cost`, page sources, files and plots, and bad input."""
import csv
import io
import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from costgraph.app import sweep as SW
from costgraph.cost import METRICS
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr.config import MODES
from costgraph.graphs.deepseek_ocr.layout import candidate_grids, layout_for, layouts_for

GUNDAM = MODES["gundam"]


def spec_layout(width, height, tile=640, min_num=2, max_num=9):
    """SPEC section 2 read literally, one page at a time, in plain Python (the test's oracle)."""
    if width <= 640 and height <= 640:
        return 1, 1, False
    grids = sorted(set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                       for j in range(1, n + 1) if min_num <= i * j <= max_num), key=lambda g: g[0] * g[1])
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and width * height > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best[0], best[1], True


# ---- the layout rule, vectorised --------------------------------------------------------

def test_vectorised_layout_equals_the_spec_rule_on_many_sizes():
    rng = np.random.default_rng(7)
    w = np.concatenate([rng.integers(1, 6000, 20_000), 640 * rng.integers(1, 10, 2000),
                        [1654, 1920, 700, 1357, 1358, 1250, 640, 641, 1280, 1920, 2560]])
    h = np.concatenate([rng.integers(1, 6000, 20_000), 640 * rng.integers(1, 10, 2000),
                        [2339, 1080, 600, 1357, 1358, 1000, 640, 640, 1280, 960, 1280]])
    keep = np.minimum(w, h) * 1024 >= np.maximum(w, h)  # far from the elongation limit
    w, h = w[keep], h[keep]
    lay = layouts_for(w, h, GUNDAM)
    expected = np.array([spec_layout(int(a), int(b)) for a, b in zip(w, h)])
    assert np.array_equal(lay.w_crop, expected[:, 0]) and np.array_equal(lay.h_crop, expected[:, 1])
    assert np.array_equal(lay.tiled, expected[:, 2].astype(bool))
    # ties exist in the sample and go both ways (area rule), so the tie branch is exercised
    chosen = dict(zip(zip(w.tolist(), h.tolist()), zip(lay.w_crop.tolist(), lay.h_crop.tolist())))
    assert chosen[(1357, 1357)] == (2, 2) and chosen[(1358, 1358)] == (3, 3) and chosen[(1250, 1000)] == (3, 2)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(641, 8000), h=st.integers(1, 8000), max_num=st.integers(2, 12))
def test_scalar_and_vectorised_layout_agree_with_the_spec(w, h, max_num):
    if min(w, h) * 1024 < max(w, h):
        return
    lay = layout_for(w, h, GUNDAM, max_num=max_num)
    assert (lay.w_crop, lay.h_crop, lay.tiled) == spec_layout(w, h, max_num=max_num)
    many = layouts_for([w, h], [h, w], GUNDAM, max_num=max_num)
    assert (int(many.w_crop[0]), int(many.h_crop[0])) == (lay.w_crop, lay.h_crop)
    assert (int(many.w_crop[1]), int(many.h_crop[1])) == spec_layout(h, w, max_num=max_num)[:2]


def test_vectorised_layout_refuses_elongated_pages_naming_one():
    with pytest.raises(ValueError, match=r"page 1x20000 is too elongated.*\(1 more such pages\)"):
        layouts_for([1, 800, 20000], [20000, 800, 1], GUNDAM)


# ---- grid sweeps --------------------------------------------------------------------------

def test_acceptance_grid_sweep_writes_22_rows_and_plots_equal_to_cost(cli, tmp_path):
    out = tmp_path / "sweep"
    code, text, err = cli("sweep", "--mode", "gundam", "--grids", "all", "--out", str(out))
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    data = json.load(open(out / "sweep.json"))
    assert len(rows) == 22 == len(data["points"]) == len(candidate_grids())
    assert [(int(r["w_crop"]), int(r["h_crop"])) for r in rows] == candidate_grids()
    for name in ("cost_vs_crops", "crop_heatmap"):
        assert open(out / f"{name}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(out / f"{name}.png") > 20_000 and b"<svg" in open(out / f"{name}.svg", "rb").read(500)
    scopes = model.scopes_for(GUNDAM)
    assert data["scopes"] == list(scopes) and data["metrics"] == list(METRICS)
    for row, point in zip(rows, data["points"]):
        code, text, _ = cli("cost", "--mode", "gundam", "--grid", row["grid"], "--json")
        cost = json.loads(text)
        assert point["totals"] == cost["totals"]
        assert point["image_tokens"] == cost["layout"]["image_tokens"] == int(row["image_tokens"])
        assert point["paper_tokens"] == cost["layout"]["paper_tokens"]
        assert point["valid_tokens"] == cost["layout"]["valid_tokens"] == int(row["valid_tokens"])
        assert {f"{s}:{m}": int(row[f"{s}:{m}"]) for s in scopes for m in METRICS} == \
            {f"{s}:{m}": v for s, ms in cost["totals"].items() for m, v in ms.items()}
    # the no-crop layout is reported beside the grids, equal to a small page's cost
    code, text, _ = cli("cost", "--mode", "gundam", "--size", "600x400", "--json")
    assert data["no_crop"]["totals"] == json.loads(text)["totals"]
    assert data["no_crop"]["image_tokens"] == 273


def test_grid_sweep_follows_sequence_and_variants(cli, tmp_path):
    argv = ["--grids", "2x3,1x1", "--text-tokens", "40", "--output-tokens", "7", "--attention", "flash",
            "--no-plots"]
    code, _, err = cli("sweep", "--out", str(tmp_path), *argv)
    assert code == 0, err
    points = json.load(open(tmp_path / "sweep.json"))["points"]
    for p in points:
        code, text, _ = cli("cost", "--grid", p["grid"], *argv[2:-1], "--json")
        assert p["totals"] == json.loads(text)["totals"]
    assert points[1]["totals"]["vision.crops"]["flops"] == 0 and points[1]["num_crops"] == 0


def test_max_num_6_gives_the_vllm_grids():
    s = SW.sweep_grids("gundam", max_num=6)
    assert len(s) == len(candidate_grids(2, 6)) == 13 and s.columns["num_crops"].max() == 6


# ---- page sweeps ------------------------------------------------------------------------

def test_page_sweep_through_the_layout_rule():
    w, h = SW.range_pages("600:3000:300", "500:2500:250")
    s = SW.sweep_pages("gundam", w, h)
    assert len(s) == 9 * 9
    grids = SW.sweep_grids("gundam")
    by_grid = {(a, b): k for k, (a, b) in enumerate(zip(grids.columns["w_crop"], grids.columns["h_crop"]))}
    for k in range(len(s)):
        lay = layout_for(int(s.columns["width"][k]), int(s.columns["height"][k]), GUNDAM)
        assert (s.columns["w_crop"][k], s.columns["h_crop"][k], s.columns["tiled"][k]) == \
            (lay.w_crop, lay.h_crop, lay.tiled)
        if lay.tiled:
            j = by_grid[(lay.w_crop, lay.h_crop)]
            for col in s.columns:  # valid tokens depend on the page, not only on its grid
                if ":" in col or col in ("image_tokens", "paper_tokens"):
                    assert s.columns[col][k] == grids.columns[col][j], col
        else:
            assert s.value("vision.crops", "flops")[k] == 0


def test_paper_sizes_include_a4_at_200_dpi():
    s = SW.sweep_pages("gundam", *SW.paper_pages([200])[1:], labels=SW.paper_pages([200])[0])
    k = list(s.columns["page"]).index("A4 portrait 200dpi")
    assert (s.columns["width"][k], s.columns["height"][k]) == (1654, 2339)
    assert (s.columns["w_crop"][k], s.columns["h_crop"][k], s.columns["image_tokens"][k]) == (2, 3, 903)


def test_folder_sweep_reads_the_samples(cli, tmp_path):
    code, text, err = cli("sweep", "--folder", "graphs/samples", "--out", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(text)["points"] == 4
    points = {p["page"]: p for p in json.load(open(tmp_path / "sweep.json"))["points"]}
    assert (points["slide_16x9.png"]["w_crop"], points["slide_16x9.png"]["h_crop"]) == (4, 2)
    assert points["a4_page.png"]["image_tokens"] == 903 and not points["small_note.png"]["tiled"]
    assert os.path.exists(tmp_path / "cost_vs_aspect.png") and os.path.exists(tmp_path / "cost_vs_aspect.svg")


def test_folder_sweep_reports_an_unreadable_file_and_goes_on(cli, tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    Image.new("RGB", (1654, 2339), (255, 255, 255)).save(folder / "a4.png")
    (folder / "broken.png").write_text("not an image\n")
    Image.new("RGB", (600, 400), (255, 255, 255)).save(folder / "small.png")
    out = tmp_path / "out"
    code, text, err = cli("sweep", "--folder", str(folder), "--out", str(out), "--no-plots", "--json")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["points"] == 2
    assert [e["page"] for e in summary["errors"]] == ["broken.png"] and "not an image" in summary["errors"][0]["error"]
    assert err.startswith("costgraph: skipped broken.png: ") and err.count("\n") == 1
    data = json.load(open(out / "sweep.json"))
    assert [p["page"] for p in data["points"]] == ["a4.png", "small.png"] and data["errors"] == summary["errors"]
    assert data["points"][0]["image_tokens"] == 903 and not data["points"][1]["tiled"]


def test_aspect_sweep_keeps_the_area_and_spans_the_range():
    w, h = SW.aspect_pages(0.25, 4.0, 101, 1654 * 2339)
    assert len(w) == 101 and abs(w[0] / h[0] - 0.25) < 0.01 and abs(w[-1] / h[-1] - 4) < 0.01
    assert np.all(np.abs(w * h / (1654 * 2339) - 1) < 0.01)
    s = SW.sweep_pages("gundam", w, h)
    assert {(1, 4), (2, 3), (3, 3), (4, 1)} <= set(zip(s.columns["w_crop"].tolist(), s.columns["h_crop"].tolist()))


def test_native_mode_page_sweep_has_one_view():
    s = SW.sweep_pages("base", [800, 3000], [600, 1000])
    assert s.columns["num_crops"].tolist() == [0, 0] and s.columns["image_tokens"].tolist() == [273, 273]
    assert "vision.crops:flops" not in s.columns


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--widths", "600:900:100"], ["--heights", "600:900:100", "--grids", "all"],
    ["--widths", "9:1:1", "--heights", "600"], ["--widths", "a:b", "--heights", "600"],
    ["--widths", "1:3", "--heights", "20000"], ["--grids", "0x3"], ["--grids", "all", "--mode", "tiny"],
    ["--grids", "all", "--max-num", "1"], ["--aspects", "4:1:10"], ["--aspects", "x"],
    ["--paper-sizes", "--dpi", "0"], ["--paper-sizes", "--dpi", "high"], ["--folder", "no/such/dir"],
    ["--grids", "all", "--output-tokens", "0"], ["--grids", "all", "--mode", "huge"],
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, argv):
    out = tmp_path / "o"
    code, text, err = cli("sweep", "--out", str(out), "--no-plots", *argv)
    assert code == 2 and text == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("widths, heights", [("1:99999999999:1", "1:2:1"), ("1:5000000:1", "1:3:1")])
def test_huge_sweep_is_refused_before_allocating(cli, tmp_path, widths, heights):
    """10^11 widths (or 15 million pairs of fine ranges): refused from the ranges' sizes, nothing of the
    sweep's size allocated (a width array of 10^11 would be 800 GB)."""
    out = tmp_path / "o"
    tracemalloc.start()
    try:
        code, text, err = cli("sweep", "--widths", widths, "--heights", heights, "--out", str(out), "--no-plots")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and text == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
    assert "points" in err and f"{SW.MAX_POINTS:,}" in err
    assert peak < 200 * 2**20 and not out.exists()


def test_out_under_a_file_is_refused(cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, text, err = cli("sweep", "--grids", "2x2", "--out", str(f / "sub"), "--no-plots")
    assert code == 2 and err.count("\n") == 1 and f.read_text() == "x"


def test_csv_and_json_round_trip():
    s = SW.sweep_grids("gundam", [(2, 3), (3, 2)])
    rows = list(csv.DictReader(io.StringIO(s.to_csv())))
    data = json.loads(s.to_json())
    assert [r["grid"] for r in rows] == ["2x3", "3x2"] == [p["grid"] for p in data["points"]]
    assert int(rows[0]["e2e:flops"]) == data["points"][0]["totals"]["e2e"]["flops"] == int(s.value("e2e", "flops")[0])


def test_chunked_csv_and_json_equal_one_piece(monkeypatch):
    """Files are streamed in pieces of CHUNK rows (a progress tick each): the same text as in one piece."""
    s = SW.sweep_grids("gundam")
    whole_csv, whole_json = s.to_csv(), s.to_json()
    monkeypatch.setattr(SW, "CHUNK", 5)
    ticks = []
    assert "".join(s.csv_chunks(ticks.append)) == whole_csv
    assert "".join(s.json_chunks(ticks.append)) == whole_json
    assert ticks == [5, 5, 5, 5, 2] * 2
    json.loads(whole_json)


# ---- one --out folder, many runs ------------------------------------------------------------

def _folder(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_sweeps_into_one_folder_leave_one_consistent_set(cli, tmp_path):
    """Four sweeps into one --out: after each, the folder holds exactly that run's files, listed by its
    manifest (before: the CSV of one run beside the plots of another)."""
    out = tmp_path / "out"
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (1654, 2339)).save(tmp_path / "imgs" / "a4.png")
    runs = [(["--grids", "2x3,3x2"], 2, {"cost_vs_crops", "crop_heatmap"}),
            (["--aspects", "0.5:2:7"], 7, {"cost_vs_aspect"}),
            (["--paper-sizes", "--dpi", "150", "--no-plots"], 18, set()),
            (["--folder", str(tmp_path / "imgs")], 1, {"cost_vs_aspect"})]
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a file no sweep wrote is left alone
    for argv, points, plots in runs:
        code, text, err = cli("sweep", *argv, "--out", str(out), "--json")
        assert code == 0, err
        files = json.loads(text)["files"]
        manifest = json.loads((out / SW.MANIFEST).read_text())
        names = ["sweep.csv", "sweep.json"] + [f"{p}.{e}" for p in sorted(plots) for e in ("png", "svg")]
        assert sorted(manifest["files"]) == sorted(names + [SW.MANIFEST])
        assert sorted(os.listdir(out)) == sorted(names + [SW.MANIFEST, "notes.txt"])
        assert files == [str(out / n) for n in manifest["files"]]
        assert len(list(csv.DictReader(open(out / "sweep.csv")))) == points == manifest["points"]
        assert len(json.load(open(out / "sweep.json"))["points"]) == points
    assert (out / "notes.txt").read_text() == "mine"


def test_a_manifest_removes_only_plain_names_in_its_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("keep")
    (out / ".hidden").write_text("keep")
    (out / "stale.png").write_text("old run")
    (out / SW.MANIFEST).write_text(json.dumps({"files": ["../outside.txt", ".hidden", "stale.png", "/etc/passwd",
                                                         SW.MANIFEST, 3]}))
    SW.sweep_grids("gundam", [(2, 3)]).write(str(out), plots=False)
    assert (tmp_path / "outside.txt").exists() and (out / ".hidden").exists() and not (out / "stale.png").exists()
    (out / SW.MANIFEST).write_text("not json")  # a damaged manifest: nothing removed, a new one written
    SW.sweep_grids("gundam", [(2, 3)]).write(str(out), plots=False)
    assert json.loads((out / SW.MANIFEST).read_text())["files"][-1] == SW.MANIFEST


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_an_interrupted_or_failed_write_leaves_the_folder_as_it_was(cli, tmp_path, monkeypatch, error):
    """An interrupt (or a write error) while writing: a folder the run created is gone (before: left
    empty); an earlier run's folder keeps its files, unchanged, with no partial file beside them."""
    def broken(self, done=None):
        yield "{"
        raise error(28, "No space left on device") if error is OSError else error()

    def patch():
        monkeypatch.setattr(SW.Sweep, "json_chunks", broken, raising=False)
        monkeypatch.setattr(SW.Sweep, "to_json", lambda self: "".join(broken(self)))

    patch()
    new = tmp_path / "a" / "b"
    code, text, err = cli("sweep", "--grids", "2x3", "--out", str(new), "--no-plots")
    assert code == (130 if error is KeyboardInterrupt else 2) and err.count("\n") == 1
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()
    old = tmp_path / "old"
    assert cli("sweep", "--grids", "2x3", "--out", str(old), "--no-plots")[0] == 0
    before = _folder(old)
    patch()
    code, _, err = cli("sweep", "--aspects", "0.5:2:5", "--out", str(old))
    assert code != 0 and _folder(old) == before
    if error is OSError:
        assert "sweep.json" in err and ".tmp-" not in err and ".sweep-partial" not in err


def test_progress_bar_covers_the_writing(tmp_path, capsys):
    s = SW.sweep_grids("gundam", [(2, 3), (3, 2)])
    s.write(str(tmp_path / "o"), plots=True, progress=True)
    err = capsys.readouterr().err
    assert "write" in err and "100%" in err and "sweep.csv" in err
    s.write(str(tmp_path / "p"), plots=False)  # short sweeps: no bar unless asked
    assert capsys.readouterr().err == ""


def test_help_documents_the_manifest(cli):
    code, text, _ = cli("sweep", "--help")
    assert code == 0 and "sweep.manifest.json" in " ".join(text.split())
