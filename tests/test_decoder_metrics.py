"""Elementwise FLOPs, bytes, activation bytes and the KV cache of the language model: exact against
real CPU runs of the transformers reference (small configurations), per reference module, for the
prefill and two cached decode steps, in bf16 and fp32; routing's data dependence made explicit."""
import pytest
import sympy as sp
import torch

from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.evaluate import substitute
from costgraph.ops import converts, prod
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr.config import LM, MODES, LMConfig
from costgraph.graphs.deepseek_ocr.decoder import (Variants, decoder_graph, experts_hit_bound, kv_cache_bytes,
                            kv_cache_bytes_per_token, prompt_length)
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid, tokens_for
from costgraph.verify.lm_profile import (DECODE, KV_CACHE, OTHER_METRICS, PREFILL, LMRequest, checked_metrics, compare_lm,
                               lm_graph, module_for, run_reference, verify_lm)
from costgraph.verify.lm_reference import build_language_model

TINY, GUNDAM = MODES["tiny"], MODES["gundam"]
SMALL = LMConfig(hidden=64, layers=3, heads=4, head_dim=16, vocab=101, dense_intermediate=96,
                 routed_experts=8, experts_per_token=3, moe_intermediate=24, shared_experts=2)
# 256 experts, top-2: a prompt of ~80 tokens cannot reach every expert (the bound is not attained)
WIDE = LMConfig(hidden=32, layers=3, heads=2, head_dim=16, vocab=50, dense_intermediate=40,
                routed_experts=256, experts_per_token=2, moe_intermediate=8, shared_experts=1)
ALL = ("all",)
STEPS = 2


def _check(cfg, mode, grid, variants, dtype):
    return verify_lm(LMRequest(mode, layout_for_grid(*grid, mode), text_tokens=5, decode_steps=STEPS,
                               variants=variants, cfg=cfg, dtype=dtype, metrics=ALL))


@pytest.fixture(scope="module")
def runs():
    """One reference run per case, shared by the tests below (each is a few seconds)."""
    return {
        "bf16": _check(SMALL, TINY, (1, 1), Variants(), torch.bfloat16),
        "fp32": _check(WIDE, TINY, (1, 1), Variants(rope="once", lm_head="last"), torch.float32),
    }


@pytest.mark.parametrize("case", ["bf16", "fp32"])
def test_every_module_exact(runs, case):
    comp = runs[case]
    assert comp.ok, comp.failures()[:5] + comp.unclaimed[:5]
    assert not comp.unclaimed and not comp.blind
    rows = [r for r in comp.rows if r.metric in OTHER_METRICS]
    assert rows and all(r.predicted == r.measured for r in rows)
    # every new metric is compared in the prefill and in each decode step, and nothing is vacuous:
    # every row has a non-zero measurement
    for m in OTHER_METRICS:
        forwards = {r.reference.partition(":")[0] if r.reference.startswith("t=") else "prefill"
                    for r in rows if r.metric == m}
        assert forwards == {"prefill", "t=1", "t=2"}, (m, forwards)
    assert all(r.measured > 0 for r in rows)
    names = {r.node for r in rows}
    last = comp.info["variants"]
    assert any(n.startswith(f"{PREFILL}.layers.2.mlp.experts.{{") and "combine" in n for n in names)
    assert f"{PREFILL}.layers.0.input_layernorm" in names and f"{DECODE}.norm" in names
    assert (f"{PREFILL}.layers.1.self_attn.rotary_emb" in names) == (last["rope"] == "vendor")
    assert (f"{PREFILL}.rotary_emb" in names) == (last["rope"] == "once")


def test_dtype_changes_the_bytes_not_the_work(runs):
    """bf16 adds the fp32 upcasts (RMSNorm, softmax, routing weights) fp32 runs without: measured, and predicted."""
    g = lm_graph(SMALL, Variants(), False)
    values = {**model.mode_values(TINY), S.text_tokens: 5, S.experts_hit: SMALL.routed_experts}
    node = f"{PREFILL}.layers.0.input_layernorm"
    tokens, h = substitute(prompt_length(False), values), SMALL.hidden
    bf16 = substitute(g.cost(node).bytes_read, {**values, S.dtype_bytes: 2})
    fp32 = substitute(g.cost(node).bytes_read, {**values, S.dtype_bytes: 4})
    # reads of pow, mean, + eps, rsqrt, x * rstd (fp32), then weight * x (model dtype); bf16 adds the
    # two casts (reading 2 T H, then 4 T H)
    fp32_part = 4 * tokens * h + 4 * tokens * h + 4 * tokens + 4 * tokens + (4 * tokens * h + 4 * tokens)
    assert fp32 == fp32_part + 4 * (h + tokens * h)
    assert bf16 == 2 * tokens * h + fp32_part + 4 * tokens * h + 2 * (h + tokens * h)
    assert converts(4, 4) == 0 and converts(2, 4) == 1 and converts(S.dtype_bytes, 4).subs(S.dtype_bytes, 4) == 0
    ew = {d: substitute(g.cost(node).elementwise_flops, {**values, S.dtype_bytes: d}) for d in (2, 4)}
    assert ew[2] == ew[4] == 4 * tokens * h + 2 * tokens


def test_kv_cache_bytes(runs):
    assert kv_cache_bytes_per_token(LM).subs(S.dtype_bytes, 2) == 61_440      # SPEC section 5
    assert kv_cache_bytes_per_token(LM).subs(S.dtype_bytes, 4) == 122_880
    for case, b, c in (("bf16", 2, SMALL), ("fp32", 4, WIDE)):
        comp = runs[case]
        kv = [r for r in comp.subtotals if r.metric == KV_CACHE]
        assert [r.node for r in kv] == [f"{PREFILL}.kv_cache"] + [f"{DECODE}[t={t}].kv_cache" for t in (1, 2)]
        prompt = comp.info["prompt_tokens"]
        per_token = 2 * c.layers * c.heads * c.head_dim * b
        assert [r.measured for r in kv] == [per_token * (prompt + t) for t in range(STEPS + 1)]
        assert all(r.ok for r in kv)
    # the whole generation's cache: prompt + output_tokens - 1 tokens (the last token is never fed back)
    at = {**model.mode_values(GUNDAM), S.w_crop: 2, S.h_crop: 3, S.text_tokens: 10, S.output_tokens: 1000,
          S.dtype_bytes: 2}
    assert substitute(kv_cache_bytes(LM), at) == 61_440 * (914 + 999)


def test_decode_closed_form_is_the_sum_of_steps(runs):
    """Measured: the closed form at output_tokens = 3 equals the two measured steps, for every metric."""
    for case in ("bf16", "fp32"):
        sub = {(r.node, r.metric): r for r in runs[case].subtotals}
        for m in OTHER_METRICS:
            assert sub[(DECODE, m)].measured == sum(sub[(f"{DECODE}[t={t}]", m)].measured for t in (1, 2))
            assert sub[(DECODE, m)].ok and sub[(PREFILL, m)].ok and sub[("decoder", m)].ok


def test_decode_closed_form_symbolic():
    """The full-size graph: the closed-form decode total of every metric equals the sum of its steps."""
    g = model.model_graph(True, Variants())
    total = g.total(DECODE)
    per_step = sum((g.cost(n) for n in g.nodes(DECODE)), start=type(total)())
    for m in OTHER_METRICS + ("activation_bytes",):
        assert not total[m].has(sp.Sum) and not total[m].has(S.decode_step)
        for (w, h, n, b) in [(1, 1, 2, 2), (2, 3, 4, 2), (2, 3, 4, 4)]:
            at = {**model.mode_values(GUNDAM), S.w_crop: w, S.h_crop: h, S.text_tokens: 10, S.output_tokens: n,
                  S.dtype_bytes: b}
            assert substitute(total[m], at) == sum(substitute(per_step[m], {**at, S.decode_step: t})
                                                   for t in range(1, n))


# ---- routing: data-dependent, made explicit -------------------------------------------------------

def test_experts_hit_read_from_the_router(runs):
    for case in ("bf16", "fp32"):
        hits = runs[case].info["experts_hit"]
        cfg = WIDE if case == "fp32" else SMALL
        assert set(hits["prefill"]) == {str(i) for i in range(cfg.dense_layers, cfg.layers)}
        assert hits["decode"] == [cfg.experts_per_token]      # one token: exactly k distinct experts
        assert all(1 <= n <= hits["predicted_bound"] for n in hits["prefill"].values())
    assert runs["bf16"].info["experts_hit"]["bound_attained"]
    wide = runs["fp32"].info["experts_hit"]
    assert wide["predicted_bound"] == min(256, 2 * runs["fp32"].info["prompt_tokens"])
    assert not wide["bound_attained"] and all(n < wide["predicted_bound"] for n in wide["prefill"].values())


def test_prediction_at_the_bound_is_not_passed_off_as_exact(runs):
    """With fewer experts hit than the bound, the experts loop predicted at the bound misses the measurement:
    the exact rows come from the router's counts, not from the default prediction."""
    comp = runs["fp32"]
    g = lm_graph(WIDE, Variants(rope="once", lm_head="last"), False)
    layer = 1
    nodes = [n for n in g.nodes(PREFILL) if g.g.nodes[n]["path"].startswith(f"layers.{layer}.mlp.experts.")
             and module_for(g.g.nodes[n]["path"]) == f"model.layers.{layer}.mlp.experts"]
    row = next(r for r in comp.rows if r.metric == "bytes_read" and r.node.startswith(f"{PREFILL}.layers.{layer}.mlp"
                                                                                       f".experts.{{"))
    values = {**model.mode_values(TINY), S.text_tokens: 5, S.dtype_bytes: 4}
    expr = sp.Add(*[g.cost(n).bytes_read for n in nodes])
    hits = comp.info["experts_hit"]["prefill"][str(layer)]
    assert substitute(expr, {**values, S.experts_hit: hits}) == row.measured
    at_bound = substitute(expr, {**values, S.experts_hit: comp.info["experts_hit"]["predicted_bound"]})
    assert at_bound > row.measured
    # per expert hit: its two weights once, the bookkeeping reads, and the k x T slice of the mask; the
    # gathers of hidden states and routing weights read only the routed rows, k per token whatever the hits
    tokens = comp.info["prompt_tokens"]
    c = WIDE
    per_hit = (2 * c.moe_intermediate * c.hidden + c.hidden * c.moe_intermediate) * 4 + 33 \
        + c.experts_per_token * tokens * 8
    assert at_bound - row.measured == per_hit * (comp.info["experts_hit"]["predicted_bound"] - hits)


def test_command_line_graph_is_the_verified_graph_at_the_bound():
    symbolic, default = decoder_graph(SMALL, Variants(), True, experts_hit=S.experts_hit), decoder_graph(SMALL)
    bound = experts_hit_bound(SMALL, prompt_length(True))
    assert list(symbolic.g.nodes) == list(default.g.nodes)
    for n in symbolic.g.nodes:
        for m, e in symbolic.cost(n).as_dict().items():
            assert sp.expand(e.subs(S.experts_hit, bound) - default.cost(n)[m]) == 0, (n, m)
    assert any(symbolic.cost(n).bytes_read.has(S.experts_hit) for n in symbolic.nodes(PREFILL))
    assert not any(symbolic.cost(n).bytes_read.has(S.experts_hit) for n in symbolic.nodes(DECODE))
    # DeepSeek-OCR: any prompt with an image reaches the bound min(64, 6 L) = 64 symbolically
    assert model.formula(GUNDAM, PREFILL, "bytes_read").free_symbols == {S.w_crop, S.h_crop, S.text_tokens,
                                                                          S.dtype_bytes}


def test_a_wrong_graph_fails():
    """A reference run of RoPE "once" checked against the vendor graph: the per-layer tables are
    measured 0, the model-level tables are claimed by no node."""
    m = build_language_model(SMALL, torch.float32, rope="once")
    layout = layout_for_grid(1, 1, TINY)
    slots = tokens_for(layout, TINY)["total"]
    run = run_reference(m, 1 + 5 + slots, slots, 1, metrics=True)
    values = {**model.mode_values(TINY), S.text_tokens: 5, S.dtype_bytes: 4}
    rows, subtotals, unclaimed = compare_lm(lm_graph(SMALL, Variants(rope="vendor"), False), values, run,
                                            metrics=checked_metrics(ALL), cfg=SMALL)
    bad = [r for r in rows if not r.ok]
    assert any(r.status == "measured-zero" and "self_attn.rotary_emb" in r.node for r in bad)
    assert any("model.rotary_emb" in u[0] for u in unclaimed)
    assert not all(r.ok for r in subtotals if r.metric != KV_CACHE)


def test_metric_names():
    assert checked_metrics(("all",)) == ("flops", "elementwise_flops", "bytes_read", "bytes_written", KV_CACHE)
    assert checked_metrics(("bytes",)) == ("flops", "bytes_read", "bytes_written")   # FLOPs: always
    assert checked_metrics(("params", "kv_cache")) == ("flops", KV_CACHE)
    assert checked_metrics(()) == ("flops",)


# ---- activation bytes: the node's output tensor -----------------------------------------------------

ALIASES = {"reshape", "slice", "flatten", "masked_scatter_", "index_add_", "input"}   # own no storage
MULTI_OUTPUT = {"router_topk", "expert_mask"}   # top-k weights + indices; one_hot mask + expert ids


def test_activation_bytes_are_output_bytes():
    g = decoder_graph(SMALL, Variants(), True, experts_hit=S.experts_hit)
    seen = set()
    for n in g.nodes():
        d = g.g.nodes[n]
        act = d["cost"].activation_bytes
        if d["kind"] in ALIASES or (d["kind"] == "heads_merge" and not d["attrs"]["copies"]):
            assert act == 0, n
        elif d["kind"] == "cast":
            # the LM's casts (router up to fp32, experts' sum back) copy in bf16 and are no-ops in fp32
            out_bytes = prod(d["out_shape"]) * d["out_itemsize"]
            assert sp.expand((act - out_bytes).subs(S.dtype_bytes, 2)) == 0, n
            assert act.subs(S.dtype_bytes, 4) == 0, n
        elif d["kind"] not in MULTI_OUTPUT:
            assert sp.expand(act - prod(d["out_shape"]) * d["out_itemsize"]) == 0, n
        seen.add(d["kind"])
    assert {"rms_norm", "rope_tables", "softmax_fp32", "routed_linear", "linear", "cache_update", "cast"} <= seen


# ---- gathers: the rows they take, not the table -----------------------------------------------------

def test_gathers_read_the_rows_they_take_not_the_table():
    """Full-size LM (SPEC 5: vocab 129,280, hidden 1,280, top-6), gundam 2x3 prompt of 914 tokens, bf16: a
    decode step's embedding reads its one id and one 1,280-wide row (the old rule: the 331 MB table); the
    experts' x[token_idx] reads one index and one hidden row per routed row (6 per token) and
    top_k_weights[token_idx, top_k_pos] two indices and one fp32 weight, however many experts are hit."""
    g = decoder_graph(LM, Variants(), True, experts_hit=S.experts_hit)
    at = {**model.mode_values(GUNDAM), S.w_crop: 2, S.h_crop: 3, S.text_tokens: 10, S.dtype_bytes: 2,
          S.decode_step: 1}
    read = lambda n, hits: substitute(g.cost(n).bytes_read, {**at, S.experts_hit: hits})
    rows = 914 * 6
    for hits in (6, 64):
        assert read(f"{DECODE}.embed_tokens", hits) == 8 + 1280 * 2
        assert read(f"{PREFILL}.embed_tokens", hits) == 914 * 8 + 914 * 1280 * 2
        assert read(f"{PREFILL}.layers.1.mlp.experts.gather", hits) == rows * 8 + rows * 1280 * 2
        assert read(f"{PREFILL}.layers.1.mlp.experts.routing_weights.select", hits) == rows * 2 * 8 + rows * 4
        assert read(f"{DECODE}.layers.11.mlp.experts.gather", hits) == 6 * 8 + 6 * 1280 * 2
