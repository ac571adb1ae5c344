"""The command line: acceptance figures, JSON shapes, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import pytest

from costgraph.app.cli import main
from costgraph.cost import METRICS
from graphs.deepseek_ocr.config import MODES
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


# ---- issue 5: metrics, dtype, hardware -------------------------------------------------------------

EVERY_SCOPE_METRIC = ("flops", "elementwise_flops", "bytes_read", "bytes_written", "bytes", "activation_bytes",
                      "peak_activation_bytes", "params", "weight_bytes", "resident_params")


@pytest.fixture(scope="module")
def cost_all():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["cost", "--mode", "gundam", "--size", "1654x2339", "--scope", "e2e", "--metrics", "all",
                     "--json"])
    assert code == 0
    return json.loads(buf.getvalue())


def test_cost_metrics_all_acceptance(cost_all):
    """Every metric per scope; params total = the checkpoint: both references' sum(p.numel()) on meta."""
    from verify.weights import lm_reference_parts, vision_reference_parts

    data = cost_all
    assert list(data["totals"]) == list(data["derived"]) == ["vision", "decoder.prefill", "decoder.decode", "e2e"]
    for scope in data["totals"]:
        t = {**data["totals"][scope], **data["derived"][scope]}   # sums of node costs, and the rest
        assert set(data["totals"][scope]) == {"flops", "elementwise_flops", "bytes_read", "bytes_written",
                                              "activation_bytes"}
        assert set(EVERY_SCOPE_METRIC) <= t.keys(), scope
        assert t["bytes"] == t["bytes_read"] + t["bytes_written"]
        assert all(isinstance(t[m], int) and t[m] > 0 for m in EVERY_SCOPE_METRIC), scope
    for scope in ("decoder.prefill", "decoder.decode", "e2e"):
        assert data["derived"][scope]["kv_cache_bytes"] > 0
    checkpoint = sum(v[0] for v in vision_reference_parts("bf16").values()) + \
        sum(v[0] for v in lm_reference_parts("bf16").values())
    assert data["params"]["resident"] == checkpoint == 3_336_106_240
    assert data["derived"]["e2e"]["resident_params"] == checkpoint
    assert data["derived"]["e2e"]["params"] == checkpoint - data["params"]["unexecuted"][
        "clip.embeddings.patch_embedding"]
    assert data["params"]["active_per_token"] < data["derived"]["decoder.decode"]["params"]
    seq = data["sequence"]
    assert data["kv_cache"]["per_token_bytes"] == 2 * 12 * 10 * 128 * 2
    assert data["kv_cache"]["final_bytes"] == seq["final_context"] * data["kv_cache"]["per_token_bytes"]
    peaks = data["activations"]["peak"]
    assert set(peaks) == {"vision.global", "vision.crops", "decoder.prefill", "decoder.decode"}
    assert data["derived"]["vision"]["peak_activation_bytes"] == max(peaks["vision.global"]["bytes"],
                                                                    peaks["vision.crops"]["bytes"])
    assert peaks["decoder.decode"]["t"] == seq["output_tokens"] - 1


def test_cost_default_metrics_and_dtype(capsys):
    code, out, _ = run(capsys, "cost", "--grid", "2x2", "--json")
    data = json.loads(out)
    assert code == 0 and data["metrics"] == ["flops", "elementwise_flops", "bytes"] and data["dtype"] == "bf16"
    assert set(data["totals"]["vision"]) == set(METRICS)       # every sum of node costs, as before
    assert "params" not in data and "roofline" not in data and "activations" not in data
    code, out, _ = run(capsys, "cost", "--grid", "2x2", "--json", "--dtype", "fp32", "--metrics", "bytes")
    fp32 = json.loads(out)
    assert set(fp32["totals"]["vision.global"]) == {"bytes_read", "bytes_written"}
    assert fp32["derived"]["vision.global"]["bytes"] > data["derived"]["vision.global"]["bytes"]


def test_cost_hardware_roofline(capsys):
    code, out, _ = run(capsys, "cost", "--grid", "2x3", "--metrics", "flops", "--hardware", "h100-sxm,l4", "--json")
    r = json.loads(out)["roofline"]
    assert code == 0 and list(r) == ["h100-sxm", "l4"]
    for rec in r.values():
        st = rec["stages"]
        assert st["total_seconds"] == pytest.approx(st["vision"]["seconds"] + st["decoder.prefill"]["seconds"]
                                                    + st["decoder.decode"]["seconds"])
        assert rec["fit"]["fits"] is True and rec["fit"]["weights_bytes"] == 6_674_014_720
    code, out, _ = run(capsys, "cost", "--grid", "2x3", "--hardware", "h100-sxm")
    assert "decode ms/token" in out and "h100-sxm" in out


def test_roofline_command_markdown(capsys):
    code, out, _ = run(capsys, "roofline", "--size", "1654x2339", "--hardware", "a100-40gb,h200", "--markdown")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| hardware | vision ms") and len(lines) == 6 and lines[4] == ""
    assert lines[2].startswith("| a100-40gb |") and lines[3].startswith("| h200 |")


@pytest.mark.parametrize("metric, scope", [("params", "vision"), ("weight_bytes", "decoder"),
                                           ("active_params", "decoder.decode"), ("kv_cache_bytes", "decoder.decode"),
                                           ("bytes", "vision.crops"), ("elementwise_flops", "vision"),
                                           ("activation_bytes", "decoder.prefill"),
                                           ("peak_activation_bytes", "vision.global")])
def test_formula_every_metric(capsys, metric, scope):
    code, out, _ = run(capsys, "formula", "--mode", "gundam", "--metric", metric, "--scope", scope, "--json")
    data = json.loads(out)
    assert code == 0 and data["metric"] == metric and data["expression"] not in ("0", "")


def test_formula_kv_cache_closed_form(capsys):
    code, out, _ = run(capsys, "formula", "--mode", "gundam", "--metric", "kv_cache_bytes", "--scope",
                       "decoder.decode", "--form", "general", "--json")
    import sympy as sp
    from costgraph import symbols as S

    expr = sp.sympify(json.loads(out)["expression"], locals={s.name: s for s in S.ALL})
    values = {S.w_crop: 2, S.h_crop: 3, S.text_tokens: 10, S.output_tokens: 1000, S.dtype_bytes: 2}
    assert int(expr.subs(values)) == (914 + 999) * 61_440


@pytest.mark.parametrize("argv", [
    ["cost", "--size", "10x10", "--metrics", "joules"], ["cost", "--size", "10x10", "--metrics", ""],
    ["cost", "--size", "10x10", "--metrics", "flops,nope"], ["cost", "--size", "10x10", "--dtype", "fp8"],
    ["cost", "--size", "10x10", "--hardware", "tpu"], ["cost", "--size", "10x10", "--hardware", "h100-sxm,x"],
    ["roofline", "--size", "10x10", "--hardware", "nope"], ["roofline", "--size", "10x10", "--nodes", "-1"],
    ["formula", "--metric", "kv_cache_bytes", "--scope", "vision"], ["formula", "--metric", "params_total"],
    ["verify", "--size", "10x10", "--metrics", "watts"], ["verify", "--size", "10x10", "--dtype", "int8"],
])
def test_bad_metric_dtype_hardware_is_one_line_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("costgraph: error: ") and err.count("\n") == 1


def test_verify_metrics_params_and_what_is_not_checked(capsys):
    """params: every part of both references on meta, exact; metrics a scope/device cannot compare are named."""
    code, out, _ = run(capsys, "verify", "--mode", "tiny", "--grid", "1x1", "--metrics", "params,kv_cache,bytes,activations",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"]
    params = next(r for r in data["results"] if r["title"].startswith("parameters"))
    checkpoint = next(r for r in params["subtotals"] if r["node"] == "checkpoint")
    assert checkpoint["predicted"] == checkpoint["measured"] == 3_336_106_240
    assert {r["node"].split(".")[0] for r in params["rows"]} == {"vision", "decoder"}
    assert set(data["run"]["not_checked"]) == {"kv_cache", "bytes (vision)"}
    assert data["peak_memory"]["cases"][0]["vision_skipped"].endswith("--device cpu")
