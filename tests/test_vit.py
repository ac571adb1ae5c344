"""The ViT classifier on the unchanged engine: node by node against transformers' ViTForImageClassification.

FLOPs of ViT-B/16 on `meta` (cheap at any size): 224, 384, a side that is not a multiple of the
patch (the conv drops the leftover pixels), another patch side and a batch. Elementwise FLOPs,
bytes and activation bytes on real CPU kernels, fp32 and bf16, with a narrow two-layer config (the
real structure; full width runs in `python -m costgraph.verify.vit`). The closed form is checked against a
hand count of the architecture, and the commits that added the model against the engine.
"""
import copy
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import sympy as sp
import torch

import costgraph.symbols as engine_symbols
from costgraph.graphs.vit import DEFAULT, VARIANTS, build_graph, num_tokens
from costgraph.graphs.vit import symbols as S
from costgraph.verify.vit import build_reference, verify_vit

SMALL = replace(DEFAULT, name="small", hidden=64, layers=2, heads=4, mlp_dim=128, num_labels=10)
METRICS = ("elementwise_flops", "bytes_read", "bytes_written", "activation_bytes")
REPO = Path(__file__).resolve().parents[1]
BASE = "440b341"  # the commit this model's branch started from


def by_metric(comp, metric):
    return {r.node: r for r in comp.rows if r.metric == metric}


def total(comp, metric, scope="vit"):
    return next(r for r in comp.subtotals if r.node == scope and r.metric == metric)


# ---- FLOPs: ViT-B/16 on meta -------------------------------------------------------------------

def test_flops_at_224_match_flop_counter_node_by_node():
    c = verify_vit(224)
    assert c.ok, (c.failures()[:5], c.unclaimed[:5], c.blind)
    rows = by_metric(c, "flops")
    # every matmul of the model: the conv, 6 linears and SDPA per layer, the classifier
    assert len(rows) == 1 + 12 * 7 + 1 and all(r.measured > 0 for r in rows.values())
    # published: ViT-B/16 at 224 is ~17.6 GMACs, 86.6M parameters
    assert total(c, "flops").measured == 35_127_656_448
    assert total(c, "params").measured == 86_567_656
    assert rows["vit.encoder.vit.layers.11.attention.sdpa"].measured == 2 * 2 * 12 * 197 * 197 * 64


@pytest.mark.parametrize("side,patch,batch", [(384, 16, 1), (200, 16, 1), (224, 32, 3)])
def test_flops_at_other_sizes_patches_and_batches(side, patch, batch):
    c = verify_vit(side, patch_size=patch, batch=batch)
    assert c.ok, (c.failures()[:5], c.unclaimed[:5], c.blind)
    n = (side // patch) ** 2 + 1
    assert by_metric(c, "flops")["vit.head.classifier"].measured == 2 * batch * 768 * 1000
    assert by_metric(c, "flops")["vit.encoder.vit.layers.0.mlp.fc1"].measured == 2 * batch * n * 768 * 3072


# ---- every metric on real CPU kernels ------------------------------------------------------------

@pytest.fixture(scope="module")
def small_models():
    """Small references by (side, dtype); a bf16 one is a cast copy of the fp32 one."""
    cache = {}

    def get(side, dtype):
        if (side, dtype) not in cache:
            cache[(side, dtype)] = build_reference(SMALL, side, "cpu", "fp32") if dtype == "fp32" else \
                copy.deepcopy(get(side, "fp32")).to(dtype=torch.bfloat16)
        return cache[(side, dtype)]
    return get


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("side,batch", [(64, 2), (72, 1)])
def test_dispatch_metrics_match_node_by_node(small_models, dtype, side, batch):
    c = verify_vit(side, "cpu", "all", dtype, SMALL, batch, model=small_models(side, dtype))
    assert c.ok, (c.failures()[:5], c.unclaimed[:5], c.blind)
    nodes = {r.node for r in c.rows if r.metric == "bytes_read"}
    assert len(nodes) == 3 + 2 * 12 + 2  # embeddings conv/cat/add, 12 costed ops per layer, final norm, classifier
    for m in METRICS:
        assert all(r.measured > 0 for r in by_metric(c, m).values() if r.predicted), m
    # independent figures: the fused CPU SDPA's elementwise work (scale + softmax per score) and
    # its writes (output + fp32 logsumexp), the class-token cat reading one row of the expanded token
    size = {"fp32": 4, "bf16": 2}[dtype]
    n, heads, hd = (side // 16) ** 2 + 1, 4, 16
    sdpa = "vit.encoder.vit.layers.1.attention.sdpa"
    assert by_metric(c, "elementwise_flops")[sdpa].measured == batch * heads * n * n * 6
    assert by_metric(c, "bytes_written")[sdpa].measured == batch * heads * n * (hd * size + 4)
    assert by_metric(c, "bytes_read")["vit.embeddings.vit.embeddings.cat"].measured == (64 + batch * (n - 1) * 64) * size


def test_a_wrong_graph_fails(small_models):
    """The comparison can fail: a graph without the q/k/v biases against the reference with them."""
    c = verify_vit(64, "cpu", "all", "fp32", replace(SMALL, qkv_bias=False), 2, model=small_models(64, "fp32"))
    bad = {(r.node.rpartition(".")[2], r.metric) for r in c.failures()}
    assert {("q_proj", "bytes_read"), ("k_proj", "bytes_read"), ("v_proj", "bytes_read"), ("vit", "params")} <= bad
    assert not c.ok


# ---- the closed form ----------------------------------------------------------------------------

def test_closed_form_matches_a_hand_count():
    """Total FLOPs and elementwise FLOPs symbolic in image side and batch, for image sides that are
    multiples of the patch (S = k p): N = k^2 + 1 tokens of width d through L layers."""
    cfg = DEFAULT
    g = build_graph(cfg)
    k = sp.Symbol("k", integer=True, positive=True)
    p, b = S.patch_size, S.batch
    d, L, m, H, C, labels = cfg.hidden, cfg.layers, cfg.mlp_dim, cfg.heads, cfg.in_channels, cfg.num_labels
    N = k ** 2 + 1
    flops = b * (2 * d * k ** 2 * C * p ** 2                    # patchify conv
                 + L * (2 * N * d * d * 4                       # q, k, v, o projections
                        + 2 * N * d * m * 2                     # fc1, fc2
                        + 2 * 2 * N * N * d)                    # q k^T and p v over all heads
                 + 2 * d * labels)                              # classifier on the CLS row
    elementwise = b * (N * d                                    # position add
                       + L * (2 * 7 * N * d                     # two LayerNorms
                              + 6 * H * N * N                   # SDPA: scale + softmax per score
                              + N * m                           # GELU
                              + 2 * N * d)                      # residual adds
                       + 7 * N * d)                             # final LayerNorm
    tot = g.total("vit")
    at = {S.image_size: k * p}
    assert sp.expand(tot.flops.subs(at) - flops) == 0
    assert sp.expand(tot.elementwise_flops.subs(at) - elementwise) == 0
    assert tot.flops.subs({S.image_size: 224, S.patch_size: 16, b: 1}) == 35_127_656_448


def test_symbols_are_the_engines_and_token_counts():
    # one symbol per name across the project: the engine's registry holds ViT's, DeepSeek-OCR's are the same
    from costgraph.graphs.deepseek_ocr import symbols as ocr_symbols

    assert engine_symbols.SYMBOLS["image_size"].symbol is S.image_size
    assert engine_symbols.SYMBOLS["patch_size"].symbol is S.patch_size
    assert ocr_symbols.image_size == S.image_size and ocr_symbols.patch_size == S.patch_size
    assert S.dtype_bytes is engine_symbols.dtype_bytes
    assert num_tokens().subs({S.image_size: 224, S.patch_size: 16}) == 197
    assert num_tokens(384, 16) == 577 and num_tokens(200, 16) == 145
    assert VARIANTS["vit-b16-224"] == DEFAULT and VARIANTS["vit-l16-224"].hidden == 1024


# ---- the engine is untouched --------------------------------------------------------------------

def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_commits_adding_the_model_do_not_touch_the_engine():
    """The engine diff for adding the model is empty: the commit(s) that added the ViT graph add files
    under graphs/vit and touch nothing under costgraph/ (later commits, a restructuring that moves files
    across floors, may touch both)."""
    try:
        _git("cat-file", "-e", f"{BASE}^{{commit}}")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with {BASE}")
    commits = _git("log", "--format=%H", "--diff-filter=A", f"{BASE}..HEAD", "--", "graphs/vit/graph.py").split()
    if not commits:
        pytest.skip("the ViT package is not committed yet")
    for c in commits:
        touched = _git("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", c).split()
        assert "graphs/vit/graph.py" in touched, (c, touched)       # the commit found is the one adding it
        assert not [f for f in touched if f.startswith("costgraph/")], (c, touched)


# ---- the command ----------------------------------------------------------------------------------

def test_verify_command_runs_the_vit_against_transformers(cli):
    """`costgraph --model vit verify --size SxS` compares the ViT-B/16 graph with transformers' model on
    meta; the totals equal a hand count at S = 64 (k = 4 patches a side, N = 17 tokens)."""
    code, out, err = cli("--model", "vit", "verify", "--size", "64x64", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["ok"] and res["failing"] == 0 and res["nodes_compared"] == 1 + 12 * 7 + 1
    sub = {(r["node"], r["metric"]): r for r in res["results"][0]["subtotals"]}
    d, L, m, N = 768, 12, 3072, 4 ** 2 + 1
    embeddings = 2 * d * 4 ** 2 * 3 * 16 ** 2
    encoder = L * (2 * N * d * d * 4 + 2 * N * d * m * 2 + 2 * 2 * N * N * d)
    head = 2 * d * 1000
    assert {k: (sub[(k, "flops")]["predicted"], sub[(k, "flops")]["measured"])
            for k in ("vit", "vit.embeddings", "vit.encoder", "vit.head")} == \
        {"vit": (embeddings + encoder + head,) * 2, "vit.embeddings": (embeddings,) * 2,
         "vit.encoder": (encoder,) * 2, "vit.head": (head,) * 2}
    # ViT-B/16 has 86,567,656 parameters at 224 (197 position rows); the reference built for 64 has 17
    assert sub[("vit", "params")]["measured"] == sub[("vit", "params")]["predicted"] == 86_567_656 - (197 - N) * d


@pytest.mark.parametrize("argv, words", [
    (["--size", "224x200"], "square"),
    (["--grid", "2x3"], "--size SxS"),
])
def test_verify_command_refuses_what_the_vit_has_not(cli, argv, words):
    code, out, err = cli("--model", "vit", "verify", *argv)
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and words in err
