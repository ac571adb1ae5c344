"""The per-mode table: rows equal `costgraph cost`, and the three formats carry the same numbers."""
import csv
import io
import json

import pytest

from costgraph.app import tables
from costgraph.cost import METRICS
from costgraph.graphs.deepseek_ocr import MODEL
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr.config import MODES


def test_default_rows_tokens_and_views():
    rows = tables.build_rows(tables.parse_rows(MODEL.default_table_rows))
    cells = [{key: v for key, _, v in r.cells} for r in rows]
    assert [(r.mode, c["grid"]) for r, c in zip(rows, cells)] == [
        ("tiny", "-"), ("small", "-"), ("base", "-"), ("large", "-"),
        ("gundam", "2x2"), ("gundam", "2x3"), ("gundam", "3x3"), ("gundam", "4x2")]
    assert [c["image_tokens"] for c in cells] == [73, 111, 273, 421, 693, 903, 1203, 1093]
    assert [c["paper_tokens"] for c in cells] == [64, 100, 256, 400, 656, 856, 1156, 1056]
    assert [c["views"] for c in cells] == ["1x512", "1x640", "1x1024", "1x1280", "1x1024 + 4x640", "1x1024 + 6x640",
                                           "1x1024 + 9x640", "1x1024 + 8x640"]
    assert list(cells[0]) == ["grid", "views", "image_tokens", "paper_tokens", "valid_tokens",
                              "valid_tokens_paper_ceil"]
    assert tables.scopes_of(rows) == list(model.scopes_for(MODES["gundam"]))


def test_csv_equals_cost_command(cli):
    code, out, _ = cli("table", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 8
    for r in rows:
        argv = ["cost", "--mode", r["mode"], "--json"] + (["--grid", r["grid"]] if r["grid"] != "-" else
                                                         ["--size", "800x600"])
        code, text, _ = cli(*argv)
        cost = json.loads(text)
        assert int(r["image_tokens"]) == cost["layout"]["image_tokens"]
        if r["grid"] != "-":  # a grid's row and `cost --grid` take the same nominal page
            assert int(r["valid_tokens"]) == cost["layout"]["valid_tokens"]
        for scope, ms in cost["totals"].items():
            for m, v in ms.items():
                assert int(r[f"{scope}:{m}"]) == v
        if r["mode"] != "gundam":
            assert r["vision.crops:flops"] == ""  # native modes have no crop scope


def test_markdown_shows_scaled_values(cli):
    code, out, _ = cli("table", "--rows", "base,gundam:2x3", "--metric", "flops")
    assert code == 0
    rows = tables.build_rows([("gundam", (2, 3))])
    e2e = rows[0].totals["e2e"]["flops"]
    line = next(l for l in out.splitlines() if l.startswith("| gundam | 2x3 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:7] == ["gundam", "2x3", "1x1024 + 6x640", "903", "856", "770", "771"]
    assert cells[-1] == f"{e2e / 1e9:,.1f}"
    assert "**flops (x10^9) per page** (text_tokens=10, output_tokens=1000, dtype=bf16, attention=eager" in out
    base = next(l for l in out.splitlines() if l.startswith("| base |"))
    assert "| - |" in base  # no crop scope


def test_latex_is_booktabs_with_escaped_names(cli):
    code, out, _ = cli("table", "--format", "latex", "--rows", "tiny,gundam:2x3", "--text-width", "0")  # unsplit
    assert code == 0 and out.startswith("% needs: \\usepackage{booktabs}\n")
    assert out.count(r"\begin{table}") == len(METRICS) and out.count(r"\toprule") == len(METRICS)
    assert r"\midrule" in out and r"\bottomrule" in out and r"\end{tabular}" in out
    assert r"\texttt{vision.global}" in out and r"\texttt{decoder.prefill}" in out
    row = next(l for l in out.splitlines() if l.startswith("gundam"))
    assert row.startswith(r"gundam & 2$\times$3 & 1$\times$1024 + 6$\times$640 & 903 & 856 & ")
    assert row.endswith(r" \\") and row.count("&") == 6 + len(model.scopes_for(MODES["gundam"]))
    tiny = next(l for l in out.splitlines() if l.startswith("tiny"))
    assert " & -- & " in tiny


def test_latex_wider_than_the_page_is_split_repeating_mode_and_grid(cli):
    """DeepSeek-OCR's 14 columns do not fit the article's 345 pt: stacked tabulars, each starting with
    Mode and Grid, that together hold every column once and every row's cells in order."""
    code, whole, _ = cli("table", "--format", "latex", "--metric", "flops", "--text-width", "0")
    code2, split, _ = cli("table", "--format", "latex", "--metric", "flops")
    assert code == code2 == 0
    assert whole.count(r"\begin{tabular}{") == 1 and split.count(r"\begin{tabular}{") >= 2
    assert split.count(r"\begin{table}") == 1 and split.count(r"\caption{") == 1
    parts = [p.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
             for p in split.split(r"\begin{tabular}{")[1:]]
    heads = [p.split(r"\toprule")[1].split(r"\midrule")[0].strip() for p in split.split(r"\begin{tabular}{")[1:]]
    assert all(h.startswith("Mode & Grid & ") for h in heads)
    full = [l for l in whole.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()]
    for k, row in enumerate(full):
        cells = row.removesuffix(r" \\").split(" & ")
        pieces = [p[k].removesuffix(r" \\").split(" & ") for p in parts]
        assert all(piece[:2] == cells[:2] for piece in pieces)
        assert cells[:2] + [c for piece in pieces for c in piece[2:]] == cells


# what each metric's caption must say (the conventions of costgraph/cost.py), and no other metric's
CAPTION_WORDS = {"flops": "2 per multiply-add", "elementwise_flops": "elementwise FLOPs",
                 "bytes_read": "bytes read", "bytes_written": "bytes written",
                 "activation_bytes": "not a memory need"}


@pytest.mark.parametrize("fmt", ["md", "latex"])
def test_each_caption_describes_its_own_metric(cli, fmt):
    assert set(CAPTION_WORDS) == set(METRICS)
    code, out, _ = cli("table", "--format", fmt, "--rows", "tiny")
    assert code == 0
    mark = "**" if fmt == "md" else r"\caption{"
    captions = [line for line in out.splitlines() if line.startswith(mark)]
    assert len(captions) == len(METRICS)
    for metric, caption in zip(METRICS, captions):
        text = caption.replace("\\_", "_")
        assert f"{metric} " in text and CAPTION_WORDS[metric] in text, caption
        assert not any(w in text for m, w in CAPTION_WORDS.items() if m != metric), caption
        assert "text_tokens=10" in text and "dtype=bf16" in text   # the inputs, on every caption


def test_out_writes_the_file(cli, tmp_path):
    path = tmp_path / "t.csv"
    code, out, _ = cli("table", "--format", "csv", "--out", str(path))
    assert code == 0 and out.startswith("wrote ")
    code2, direct, _ = cli("table", "--format", "csv")
    assert path.read_text() == direct


@pytest.mark.parametrize("argv", [
    ["--rows", "gundam"], ["--rows", "huge"], ["--rows", "gundam:0x2"], ["--rows", "tiny:2x2"],
    ["--rows", ","], ["--format", "html"], ["--metric", "joules"], ["--rows", "gundam:4x3"],
    ["--out", "no/such/dir/t.md"], ["--output-tokens", "0"], ["--format", "latex", "--text-width", "-1"],
    ["--text-width", "inf"],
])
def test_bad_input_is_one_line_exit_2(cli, argv):
    code, out, err = cli("table", *argv)
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
