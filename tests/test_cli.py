"""The command line: acceptance figures, JSON shapes, and one-line errors with exit code 2."""
import json
import os
import re
import subprocess
import sys

import pytest
import sympy as sp

from costgraph.cost import METRICS
from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.verify.profile import count_views


def test_layout_a4(cli):
    code, out, _ = cli("layout", "--size", "1654x2339", "--json")
    rec = json.loads(out)[0]
    assert code == 0
    assert (rec["w_crop"], rec["h_crop"], rec["num_crops"], rec["image_tokens"]) == (2, 3, 6, 903)
    assert {"width", "height", "w_crop", "h_crop", "num_crops", "image_tokens"} <= rec.keys()


def test_cost_a4_equals_reference(cli):
    code, out, _ = cli("cost", "--mode", "gundam", "--size", "1654x2339", "--json")
    data = json.loads(out)
    assert code == 0 and data["layout"]["num_crops"] == 6
    reference = count_views(1024, 1).get_total_flops() + count_views(640, 6).get_total_flops()
    assert data["totals"]["vision"]["flops"] == reference
    assert data["totals"]["vision.crops"]["flops"] == count_views(640, 6).get_total_flops()


def test_cost_small_page_has_no_crop_cost(cli):
    code, out, _ = cli("cost", "--size", "600x400", "--json")
    data = json.loads(out)
    assert data["totals"]["vision.crops"]["flops"] == 0
    assert data["totals"]["vision"]["flops"] == count_views(1024, 1).get_total_flops()


def test_cost_image_and_grid(cli):
    code, out, _ = cli("cost", "--image", "graphs/samples/slide_16x9.png", "--json")
    assert code == 0 and json.loads(out)["layout"]["w_crop"] == 4
    code, out, _ = cli("cost", "--grid", "3x3", "--json")
    assert json.loads(out)["layout"]["num_crops"] == 9


def test_formula_gundam_is_in_layout_symbols(cli):
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "flops", "--scope", "vision", "--json")
    data = json.loads(out)
    assert code == 0 and set(data["symbols"]) == {"w_crop", "h_crop"}
    code, out, _ = cli("formula", "--scope", "vision", "--json")
    assert {"base_size", "image_size", "patch_size"} <= set(json.loads(out)["symbols"])


@pytest.mark.parametrize("argv", [
    ["layout", "--size", "0x10"], ["layout", "--size", "12by3"], ["layout", "--size", "-5x3"],
    ["cost", "--mode", "huge", "--size", "10x10"], ["formula", "--metric", "joules"],
    ["formula", "--scope", "vision.nowhere"], ["cost", "--image", "no/such.png"],
    ["cost", "--mode", "base", "--grid", "2x2"], ["cost"], ["bogus"],
    ["layout", "--size", "1x20000"],
])
def test_bad_input_is_one_line_exit_2(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert err.startswith("costgraph: error: ") and err.count("\n") == 1


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "costgraph", "layout", "--size", "700x600"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "2x2" in res.stdout


def test_version(cli):
    code, out, err = cli("--version")
    assert code == 0 and re.fullmatch(r"costgraph \d+\.\d+\.\d+\n", out) and err == ""


def test_layout_batch_reports_a_bad_size_and_goes_on(cli):
    code, out, err = cli("layout", "--size", "700x600", "--size", "1x20000", "--size", "1654x2339", "--json")
    recs = json.loads(out)
    assert code == 0 and len(recs) == 3
    assert [(r["w_crop"], r["h_crop"], r["image_tokens"]) for r in (recs[0], recs[2])] == [(2, 2, 693), (2, 3, 903)]
    assert recs[1]["width"] == 1 and recs[1]["height"] == 20000 and "too elongated" in recs[1]["error"]
    assert recs[1].keys() == {"width", "height", "error"}
    assert err.startswith("costgraph: error: 1x20000: ") and err.count("\n") == 1
    code, out, err = cli("layout", "--size", "700x600", "--size", "1x20000", "--size", "1654x2339")
    assert code == 0 and "700x600" in out and "1654x2339" in out and "1x20000" not in out and "1x20000" in err


def test_grid_beyond_max_num_needs_what_if(cli):
    """3x4 = 12 crops: the layout never produces it under --max-num 9; --what-if costs it, labelled."""
    code, out, err = cli("cost", "--grid", "3x4", "--json")
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
    assert "--what-if" in err
    code, out, err = cli("cost", "--grid", "3x4", "--what-if", "--json")
    data = json.loads(out)
    assert code == 0 and "what-if" in data["layout"]["what_if"]
    assert (data["layout"]["w_crop"], data["layout"]["h_crop"], data["layout"]["num_crops"]) == (3, 4, 12)
    # 12 crops of the one-crop count, by the meta reference
    assert data["totals"]["vision.crops"]["flops"] == count_views(640, 12).get_total_flops()
    code, out, _ = cli("cost", "--grid", "3x4", "--what-if")
    assert code == 0 and "what-if grid 3x4" in out
    code, out, _ = cli("cost", "--grid", "3x4", "--max-num", "12", "--json")   # allowed once max-num allows it
    assert code == 0 and "what_if" not in json.loads(out)["layout"]


def test_bench_layouts_zero_is_refused(cli):
    code, out, err = cli("bench", "--layouts", "0")
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1


def vit_b16_224_flops() -> int:
    """ViT-B/16 at 224 px counted by hand (torch's 2 per multiply-add): 196 patches + CLS = 197 tokens of
    width 768, 12 layers (qkv, proj, MLP 3072; scores and probs x values), the patch conv, a 1000-way head
    on the CLS token."""
    n, d, mlp, layers = 197, 768, 3072, 12
    per_layer = 2 * n * d * (3 * d + d + 2 * mlp) + 2 * 2 * n * n * d
    return layers * per_layer + 2 * 196 * d * (3 * 16 * 16) + 2 * d * 1000


def test_vit_cost_and_formula(cli):
    code, out, err = cli("--model", "vit", "cost", "--size", "1000x800", "--json")
    data = json.loads(out)
    assert code == 0, err
    assert data["model"] == "vit" and data["image"]["tokens"] == 197
    assert data["totals"]["vit"]["flops"] == vit_b16_224_flops() == 35_127_656_448
    code, out, err = cli("--model", "vit", "formula", "--json")
    form = json.loads(out)
    assert code == 0 and form["polynomial"] and form["form"] == "simplified"
    assert not any(k in form["expression"] for k in ("floor", "ceiling", "Piecewise", "Max"))
    expr = sp.sympify(form["expression"], locals={n: sp.Symbol(n, integer=True, positive=True)
                                                  for n in form["symbols"]})
    assert set(form["symbols"]) == {"image_size", "patch_size"}
    assert expr.subs({sp.Symbol("image_size", integer=True, positive=True): 224,
                      sp.Symbol("patch_size", integer=True, positive=True): 16}) == vit_b16_224_flops()
    code, out, err = cli("--model", "vit", "cost", "--size", "1000x800", "--output-tokens", "5")
    assert code == 2 and err.count("\n") == 1


# ---- issue 5: metrics, dtype, hardware -------------------------------------------------------------

EVERY_SCOPE_METRIC = ("flops", "elementwise_flops", "bytes_read", "bytes_written", "bytes", "activation_bytes",
                      "peak_activation_bytes", "params", "weight_bytes", "resident_params")


@pytest.fixture(scope="module")
def cost_all():
    import contextlib
    import io

    from costgraph.app.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["cost", "--mode", "gundam", "--size", "1654x2339", "--scope", "e2e", "--metrics", "all",
                     "--json"])
    assert code == 0
    return json.loads(buf.getvalue())


def test_cost_metrics_all_acceptance(cost_all):
    """Every metric per scope; params total = the checkpoint: both references' sum(p.numel()) on meta."""
    from costgraph.verify.weights import lm_reference_parts, vision_reference_parts

    data = cost_all
    assert list(data["totals"]) == list(data["derived"]) == ["vision", "decoder.prefill", "decoder.decode", "e2e"]
    for scope in data["totals"]:
        t = {**data["totals"][scope], **data["derived"][scope]}   # sums of node costs, and the rest
        assert set(data["totals"][scope]) == {"flops", "elementwise_flops", "bytes_read", "bytes_written",
                                              "activation_bytes"}
        assert set(EVERY_SCOPE_METRIC) <= t.keys(), scope
        assert all(isinstance(t[m], int) and t[m] > 0 for m in EVERY_SCOPE_METRIC), scope
    for scope in ("decoder.prefill", "decoder.decode", "e2e"):
        assert data["derived"][scope]["kv_cache_bytes"] > 0
    # the A4 page is grid 2x3: the vision bytes are the closed form's (test_formula_bytes_is_the_polynomial_cost_gives)
    assert data["derived"]["vision"]["bytes"] == 10711494868 + 2731536980 * 2 * 3 + 76800 * 3
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


def test_cost_default_metrics_and_dtype(cli):
    code, out, _ = cli("cost", "--grid", "2x2", "--json")
    data = json.loads(out)
    assert code == 0 and data["metrics"] == ["flops", "elementwise_flops", "bytes"] and data["dtype"] == "bf16"
    assert set(data["totals"]["vision"]) == set(METRICS)       # every sum of node costs, as before
    assert "params" not in data and "roofline" not in data and "activations" not in data
    code, out, _ = cli("cost", "--grid", "2x2", "--json", "--dtype", "fp32", "--metrics", "bytes")
    fp32 = json.loads(out)
    assert set(fp32["totals"]["vision.global"]) == {"bytes_read", "bytes_written"}
    assert fp32["derived"]["vision.global"]["bytes"] > data["derived"]["vision.global"]["bytes"]


def test_cost_hardware_roofline(cli):
    """Each stage's roofline seconds lie where its exact totals put them: every node takes max(compute,
    memory), so a stage takes at least max(all its compute, all its memory) and at most their sum."""
    code, out, _ = cli("cost", "--grid", "2x3", "--scope", "e2e", "--metrics", "flops,elementwise_flops,bytes",
                       "--hardware", "h100-sxm,l4", "--json")
    data = json.loads(out)
    r = data["roofline"]
    assert code == 0 and list(r) == ["h100-sxm", "l4"]
    for rec in r.values():
        st, hw = rec["stages"], rec["hardware"]
        seconds_of = {s: st[s]["seconds"] for s in ("vision", "decoder.prefill", "decoder.decode")}
        for stage, seconds in (*seconds_of.items(), ("e2e", st["total_seconds"])):
            t = data["totals"][stage]
            compute = t["flops"] / hw["tensor_flops"] + t["elementwise_flops"] / hw["vector_flops"]
            memory = (t["bytes_read"] + t["bytes_written"]) / hw["bandwidth"]
            assert max(compute, memory) * (1 - 1e-9) <= seconds <= (compute + memory) * (1 + 1e-9), stage
        # the checkpoint in bf16, the 11 MoE layers' routers (64 x 1280) kept in fp32
        assert rec["fit"]["fits"] is True and rec["fit"]["weights_bytes"] == 2 * 3_336_106_240 + 11 * 64 * 1280 * 2
    code, out, _ = cli("cost", "--grid", "2x3", "--hardware", "h100-sxm")
    assert "decode ms/token" in out and "h100-sxm" in out


def test_roofline_command_markdown(cli):
    code, out, _ = cli("roofline", "--size", "1654x2339", "--hardware", "a100-40gb,h200", "--markdown")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| hardware | vision ms") and len(lines) == 6 and lines[4] == ""
    assert lines[2].startswith("| a100-40gb |") and lines[3].startswith("| h200 |")


def _expr(text: str) -> sp.Expr:
    """A form's plain expression back into sympy, in the model's own symbols."""
    return sp.sympify(text, locals={**S.BY_NAME, "Max": sp.Max, "Min": sp.Min})


def _cost_value(cost: dict, scope: str, metric: str) -> int:
    """The value `cost --json` gives for what `formula --metric` names."""
    key = {"active_params": "active_params_per_token"}.get(metric, metric)
    return {**cost["totals"][scope], **cost["derived"][scope]}[key]


@pytest.mark.parametrize("metric, scope", [("params", "vision"), ("weight_bytes", "decoder"),
                                           ("active_params", "decoder.decode"), ("kv_cache_bytes", "decoder.decode"),
                                           ("bytes", "vision.crops"), ("elementwise_flops", "vision"),
                                           ("activation_bytes", "decoder.prefill"),
                                           ("peak_activation_bytes", "vision.global")])
def test_formula_every_metric_equals_cost(cli, metric, scope):
    """Each metric's closed form, at a page's grid and sequence, is the number `cost` gives for the page."""
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", metric, "--scope", scope, "--json")
    data = json.loads(out)
    assert code == 0 and data["metric"] == metric and data["polynomial"] and "dtype_bytes" not in data["symbols"]
    expr = _expr(data["expression"])
    for grid in ((2, 3), (4, 2)):
        code, out, _ = cli("cost", "--mode", "gundam", "--grid", "%dx%d" % grid, "--scope", scope, "--metrics", "all",
                           "--json")
        cost = json.loads(out)
        at = {S.w_crop: grid[0], S.h_crop: grid[1], S.text_tokens: 10, S.output_tokens: 1000}
        assert int(expr.subs(at)) == _cost_value(cost, scope, metric) > 0, grid


GUNDAM_VISION_BYTES = "10711494868 + 2731536980*w_crop*h_crop + 76800*h_crop"   # bf16
GRIDS = ((2, 3), (3, 2), (4, 2), (2, 2))


def test_formula_bytes_is_the_polynomial_cost_gives(cli):
    """The Gundam vision bytes: a polynomial in the grid alone (the storage dtype substituted), equal to
    bytes_read + bytes_written of `cost` at every grid tried (2x3 and 3x2 differ: a term in h_crop)."""
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "bytes", "--scope", "vision", "--json")
    data = json.loads(out)
    assert code == 0 and data["dtype"] == "bf16" and data["polynomial"]
    assert set(data["symbols"]) == {"w_crop", "h_crop"}
    assert not any(k in data["expression"] for k in ("Max", "Piecewise", "dtype_bytes"))
    expr = _expr(data["expression"])
    assert sp.expand(expr - _expr(GUNDAM_VISION_BYTES)) == 0
    for w, h in GRIDS:
        code, out, _ = cli("cost", "--mode", "gundam", "--grid", f"{w}x{h}", "--metrics", "bytes", "--json")
        t = json.loads(out)["totals"]["vision"]
        assert expr.subs({S.w_crop: w, S.h_crop: h}) == t["bytes_read"] + t["bytes_written"], (w, h)
    # fp32: twice the element size, a polynomial of its own, equal to `cost --dtype fp32`
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "bytes", "--scope", "vision", "--dtype", "fp32",
                       "--json")
    fp32 = _expr(json.loads(out)["expression"])
    code, out, _ = cli("cost", "--mode", "gundam", "--grid", "2x3", "--metrics", "bytes", "--dtype", "fp32", "--json")
    t = json.loads(out)["totals"]["vision"]
    assert fp32.subs({S.w_crop: 2, S.h_crop: 3}) == t["bytes_read"] + t["bytes_written"] > expr.subs(
        {S.w_crop: 2, S.h_crop: 3})


def test_formula_peak_activation_e2e_is_the_max_cost_finds(cli):
    """The simplified e2e peak: the max of its undominated candidates, each a polynomial; at each grid its
    value is the largest stage peak `cost --metrics activations` finds by liveness, and no candidate exceeds it."""
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "peak_activation_bytes", "--scope", "e2e",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["polynomial"] and "dtype_bytes" not in data["symbols"]
    candidates = [sum(_expr(t["coefficient"]) * _expr(t["monomial"]) for t in terms) for terms in data["max_of"]]
    assert len(candidates) >= 2 and not any(c.has(sp.Max, sp.Piecewise) for c in candidates)
    assert data["expression"].startswith("Max(")
    for w, h in GRIDS:
        code, out, _ = cli("cost", "--mode", "gundam", "--grid", f"{w}x{h}", "--scope", "e2e", "--metrics",
                           "activations", "--json")
        cost = json.loads(out)
        peak = cost["derived"]["e2e"]["peak_activation_bytes"]
        assert peak == max(p["bytes"] for p in cost["activations"]["peak"].values())
        at = {S.w_crop: w, S.h_crop: h, S.text_tokens: 10, S.output_tokens: 1000}
        values = [int(c.subs(at)) for c in candidates]
        assert max(values) == peak, (w, h)


def test_formula_dtype_all(cli):
    """--dtype all: one record per storage dtype for a bytes metric; FLOPs have no element size: one record."""
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "bytes", "--dtype", "all", "--json")
    records = json.loads(out)
    assert code == 0 and [r["dtype"] for r in records] == ["bf16", "fp32"]
    assert sp.expand(_expr(records[0]["expression"]) - _expr(GUNDAM_VISION_BYTES)) == 0
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "bytes", "--dtype", "fp32", "--json")
    assert records[1]["expression"] == json.loads(out)["expression"] != records[0]["expression"]
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "flops", "--dtype", "all", "--json")
    records = json.loads(out)
    assert code == 0 and isinstance(records, list) and len(records) == 1
    assert sp.expand(_expr(records[0]["expression"]) - (1139967033344 + 388149837824 * S.w_crop * S.h_crop)) == 0
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "bytes", "--dtype", "all")
    assert code == 0 and "# storage dtype bf16" in out and "# storage dtype fp32" in out


def test_formula_kv_cache_closed_form(cli):
    code, out, _ = cli("formula", "--mode", "gundam", "--metric", "kv_cache_bytes", "--scope",
                       "decoder.decode", "--form", "general", "--json")
    expr = _expr(json.loads(out)["expression"])
    values = {S.w_crop: 2, S.h_crop: 3, S.text_tokens: 10, S.output_tokens: 1000}
    # K and V, 12 layers, 10 heads of 128, bf16: 61,440 bytes per token; the 2x3 page's prompt is 914 tokens
    assert int(expr.subs(values)) == (914 + 999) * 2 * 12 * 10 * 128 * 2


@pytest.mark.parametrize("argv", [
    ["cost", "--size", "10x10", "--metrics", "joules"], ["cost", "--size", "10x10", "--metrics", ""],
    ["cost", "--size", "10x10", "--metrics", "flops,nope"], ["cost", "--size", "10x10", "--dtype", "fp8"],
    ["cost", "--size", "10x10", "--hardware", "tpu"], ["cost", "--size", "10x10", "--hardware", "h100-sxm,x"],
    ["roofline", "--size", "10x10", "--hardware", "nope"], ["roofline", "--size", "10x10", "--nodes", "-1"],
    ["formula", "--metric", "kv_cache_bytes", "--scope", "vision"], ["formula", "--metric", "params_total"],
    ["verify", "--size", "10x10", "--metrics", "watts"], ["verify", "--size", "10x10", "--dtype", "int8"],
])
def test_bad_metric_dtype_hardware_is_one_line_exit_2(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert err.startswith("costgraph: error: ") and err.count("\n") == 1


def test_verify_metrics_params_and_what_is_not_checked(cli):
    """params: every part of both references on meta, exact; metrics a scope/device cannot compare are named."""
    code, out, _ = cli("verify", "--mode", "tiny", "--grid", "1x1", "--metrics", "params,kv_cache,bytes,activations",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"]
    params = next(r for r in data["results"] if r["title"].startswith("parameters"))
    checkpoint = next(r for r in params["subtotals"] if r["node"] == "checkpoint")
    assert checkpoint["predicted"] == checkpoint["measured"] == 3_336_106_240
    assert {r["node"].split(".")[0] for r in params["rows"]} == {"vision", "decoder"}
    assert set(data["run"]["not_checked"]) == {"kv_cache", "bytes (vision)"}
    assert data["peak_memory"]["cases"][0]["vision_skipped"].endswith("--device cpu")


# ---- what a number is; errors name the user's file ------------------------------------------

def test_cost_says_activation_bytes_is_a_sum_not_the_memory_need(cli):
    code, out, _ = cli("cost", "--size", "1654x2339")
    assert code == 0
    note = [line for line in out.splitlines() if line.startswith("# activation_bytes:")]
    assert len(note) == 1 and "not memory held at once" in note[0] and "--metrics activations" in note[0]
    data = json.loads(cli("cost", "--size", "1654x2339", "--json")[1])
    assert "not memory held at once" in data["notes"]["activation_bytes"]
    code, out, _ = cli("cost", "--size", "1654x2339", "--metrics", "activations")
    assert "peak_activation_bytes (above)" in out and "peak_activation_bytes" in out.split("# activation")[0]
    code, out, _ = cli("cost", "--size", "1654x2339", "--metrics", "flops", "--json")
    assert "notes" not in json.loads(out)  # no activation_bytes shown, nothing to explain


def test_write_error_names_the_target_not_a_temporary_file(cli, tmp_path):
    target = tmp_path / "g.json"
    target.mkdir()  # a folder where the file should go: the rename fails
    code, out, err = cli("graph", "--mode", "tiny", "--out", str(target))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert str(target) in err and ".tmp-" not in err
    assert os.listdir(tmp_path) == ["g.json"] and os.listdir(target) == []  # no temporary file left


def test_unwritable_folder_error_names_the_target(cli, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / "g.json"
    if os.geteuid() != 0:  # a real read-only folder (root writes anyway)
        folder.chmod(0o555)
        try:
            code, out, err = cli("graph", "--mode", "tiny", "--out", str(target))
        finally:
            folder.chmod(0o755)
        assert code == 2 and err == f"costgraph: error: [Errno 13] Permission denied: '{target}'\n"
    import tempfile

    def denied(dir=None, prefix="", suffix=""):  # what mkstemp raises in a folder the user cannot write
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "abc123" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    code, out, err = cli("graph", "--mode", "tiny", "--out", str(target))
    assert code == 2 and err == f"costgraph: error: [Errno 13] Permission denied: '{target}'\n"
    assert os.listdir(folder) == []
