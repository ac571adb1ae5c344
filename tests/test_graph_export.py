"""`costgraph graph`: the export of one mode (its sizes substituted, the mode recorded), and the
command line in a pipe whose reader leaves early (`costgraph ... | head`)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = re.compile(r"\b(base_size|image_size|patch_size|downsample_ratio)\b")


def _export(cli, tmp_path, *argv):
    out = tmp_path / f"graph{len(list(tmp_path.iterdir()))}.json"
    code, _, err = cli("graph", *argv, "--out", out)
    assert code == 0, err
    return out.read_text()


def _expressions(data):
    for n in data["nodes"]:
        yield from n["cost"].values()
        yield from (d for shape in n["in_shapes"] for d in shape)
        yield from n["out_shape"] + n["in_itemsizes"] + [n["out_itemsize"], n["params"], n["weight_bytes"]]
        yield from n["attrs"].values()
    for s in data["scopes"]:
        yield s["multiplicity"]
        yield from s["sum_over"] or ()


def test_each_mode_exports_its_own_sizes(cli, tmp_path):
    tiny, large = _export(cli, tmp_path, "--mode", "tiny"), _export(cli, tmp_path, "--mode", "large")
    assert tiny != large
    for text, mode, side in ((tiny, "tiny", "512"), (large, "large", "1280")):
        data = json.loads(text)
        g = data["graph"]
        assert (g["model"], g["mode"]) == ("deepseek-ocr", mode) and g["variants"]["attention"] == "eager"
        assert g["substituted"] == {"base_size": side, "image_size": side, "patch_size": "16", "downsample_ratio": "4"}
        assert g["free_symbols"] == ["dtype_bytes", "output_tokens", "text_tokens"]  # no crops in a native mode
        assert not [e for e in _expressions(data) if SIZES.search(e)]


def test_crop_mode_export_keeps_the_grid_free(cli, tmp_path):
    data = json.loads(_export(cli, tmp_path, "--mode", "gundam-m", "--attention", "flash"))
    g = data["graph"]
    assert g["mode"] == "gundam-m" and g["variants"]["attention"] == "flash"
    assert (g["substituted"]["base_size"], g["substituted"]["image_size"]) == ("1280", "1024")
    assert {"w_crop", "h_crop", "text_tokens", "output_tokens"} <= set(g["free_symbols"])
    assert "free_symbols" in g["note"] and not [e for e in _expressions(data) if SIZES.search(e)]


# ---- pipes: the reader leaves before the writer is done -----------------------------------------

def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a user's shell: stdout buffered
    return {**env, "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")}


@pytest.mark.parametrize("argv", [["formula"], ["layout", "--size", "1654x2339"], []])
def test_a_reader_gone_before_the_output_ends_quietly(argv):
    """A short output sits in stdout's buffer until the end: the reader is gone by then."""
    p = subprocess.Popen([sys.executable, "-m", "costgraph", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    p.stdout.close()  # the reader leaves at once
    err = p.stderr.read()
    assert p.wait(timeout=300) == 0 and err == b"", err


def test_graph_into_head(tmp_path):
    script = f"{sys.executable} -m costgraph graph --mode tiny 2>{tmp_path / 'err'} | head -c 100; " \
             "echo; echo ${PIPESTATUS[0]}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    head, code = out.stdout.rsplit("\n", 2)[:2]
    assert head.startswith("{") and len(head) == 100 and code == "0"
    assert (tmp_path / "err").read_text() == ""
