"""The command line: acceptance figures, JSON shapes, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import pytest

from costgraph.cli import main
from graphs.config import MODES
from verify.profile import count_views


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_layout_a4(capsys):
    code, out, _ = run(capsys, "layout", "--size", "1654x2339", "--json")
    rec = json.loads(out)[0]
    assert code == 0
    assert (rec["w_crop"], rec["h_crop"], rec["num_crops"], rec["image_tokens"]) == (2, 3, 6, 903)
    assert {"width", "height", "w_crop", "h_crop", "num_crops", "image_tokens"} <= rec.keys()


def test_cost_a4_equals_reference(capsys):
    code, out, _ = run(capsys, "cost", "--mode", "gundam", "--size", "1654x2339", "--json")
    data = json.loads(out)
    assert code == 0 and data["layout"]["num_crops"] == 6
    reference = count_views(1024, 1).get_total_flops() + count_views(640, 6).get_total_flops()
    assert data["totals"]["vision"]["flops"] == reference
    assert data["totals"]["vision.crops"]["flops"] == count_views(640, 6).get_total_flops()


def test_cost_small_page_has_no_crop_cost(capsys):
    code, out, _ = run(capsys, "cost", "--size", "600x400", "--json")
    data = json.loads(out)
    assert data["totals"]["vision.crops"]["flops"] == 0
    assert data["totals"]["vision"]["flops"] == count_views(1024, 1).get_total_flops()


def test_cost_image_and_grid(capsys):
    code, out, _ = run(capsys, "cost", "--image", "graphs/samples/slide_16x9.png", "--json")
    assert code == 0 and json.loads(out)["layout"]["w_crop"] == 4
    code, out, _ = run(capsys, "cost", "--grid", "3x3", "--json")
    assert json.loads(out)["layout"]["num_crops"] == 9


def test_formula_gundam_is_in_layout_symbols(capsys):
    code, out, _ = run(capsys, "formula", "--mode", "gundam", "--metric", "flops", "--scope", "vision", "--json")
    data = json.loads(out)
    assert code == 0 and set(data["symbols"]) == {"w_crop", "h_crop"}
    code, out, _ = run(capsys, "formula", "--scope", "vision", "--json")
    assert {"base_size", "image_size", "patch_size"} <= set(json.loads(out)["symbols"])


@pytest.mark.parametrize("argv", [
    ["layout", "--size", "0x10"], ["layout", "--size", "12by3"], ["layout", "--size", "-5x3"],
    ["cost", "--mode", "huge", "--size", "10x10"], ["formula", "--metric", "joules"],
    ["formula", "--scope", "vision.nowhere"], ["cost", "--image", "no/such.png"],
    ["cost", "--mode", "base", "--grid", "2x2"], ["cost"], ["bogus"],
    ["layout", "--size", "1x20000"],
])
def test_bad_input_is_one_line_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("costgraph: error: ") and err.count("\n") == 1


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "costgraph", "layout", "--size", "700x600"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "2x2" in res.stdout
