"""The language-model graph: structure, closed-form decode sum, variants, and exact per-node equality
with the transformers reference (small configurations, real CPU execution)."""
import pytest
import sympy as sp
import torch

from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.evaluate import substitute
from costgraph.graphs.deepseek_ocr import assembly as model
from costgraph.graphs.deepseek_ocr.config import LM, MODES, LMConfig
from costgraph.graphs.deepseek_ocr.decoder import Variants, decoder_graph, prompt_length
from costgraph.graphs.deepseek_ocr.layout import all_grids, crops_run, layout_for_grid, tokens_for
from costgraph.verify.lm_profile import DECODE, PREFILL, LMRequest, verify_lm
from costgraph.verify.lm_reference import build_language_model, check_dtypes

GUNDAM, TINY = MODES["gundam"], MODES["tiny"]
SMALL = LMConfig(hidden=64, layers=3, heads=4, head_dim=16, vocab=101, dense_intermediate=96,
                 routed_experts=8, experts_per_token=3, moe_intermediate=24, shared_experts=2)
# another shape: two dense layers, top-2 of 4 experts, one shared expert, GQA-free 2 heads of 24
OTHER = LMConfig(hidden=48, layers=4, heads=2, head_dim=24, vocab=77, dense_layers=2, dense_intermediate=40,
                 routed_experts=4, experts_per_token=2, moe_intermediate=20, shared_experts=1, rope_theta=500.0)


def at(mode, w=1, h=1, text=10, out=None):
    values = {**model.mode_values(mode), S.w_crop: w, S.h_crop: h, S.text_tokens: text}
    return values if out is None else {**values, S.output_tokens: out}


def prompt(mode, w, h, text):
    return 1 + text + tokens_for(layout_for_grid(w, h, mode), mode)["total"]


# ---- against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg, mode, grid, variants", [
    (SMALL, TINY, (1, 1), Variants()),
    (SMALL, GUNDAM, (2, 1), Variants(rope="once", lm_head="last")),
    (OTHER, TINY, (1, 1), Variants(lm_head="last")),
    (OTHER, GUNDAM, (1, 1), Variants(rope="once")),
])
def test_small_lm_matches_reference_per_node(cfg, mode, grid, variants):
    """Prefill and 3 cached decode steps: every costed node == FlopCounterMode of the CPU run, exactly."""
    layout = layout_for_grid(*grid, mode)
    comp = verify_lm(LMRequest(mode, layout, text_tokens=7, decode_steps=3, variants=variants, cfg=cfg,
                               dtype=torch.float32))
    assert comp.ok, [r for r in comp.failures()][:5] + comp.unclaimed[:5] + comp.blind
    assert not comp.unclaimed and not comp.blind
    assert all(r.predicted > 0 and r.measured == r.predicted for r in comp.rows)
    names = {r.node for r in comp.rows}
    last = cfg.layers - 1
    assert f"{PREFILL}.layers.{last}.mlp.experts.gate_up_proj" in names   # transformers' fused gate+up
    assert f"{DECODE}.layers.{last}.self_attn.scores" in names
    assert (f"{PREFILL}.layers.0.self_attn.rotary_emb" in names) == (variants.rope == "vendor")
    subtotals = {r.node: r for r in comp.subtotals}
    assert {PREFILL, DECODE, "decoder", f"{DECODE}[t=3]"} <= subtotals.keys()
    # the closed-form decode sum at output_tokens = 4 equals the three measured steps
    assert subtotals[DECODE].measured == sum(subtotals[f"{DECODE}[t={t}]"].measured for t in (1, 2, 3))
    assert comp.info["prompt_tokens"] == prompt(mode, *grid, 7)


def test_reference_router_is_fp32_in_a_bf16_model():
    m = build_language_model(SMALL, torch.bfloat16)
    assert m.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert m.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert m.lm_head.weight.dtype == torch.bfloat16
    m.model.layers[1].mlp.gate.weight.data = m.model.layers[1].mlp.gate.weight.data.bfloat16()
    with pytest.raises(RuntimeError, match="gate.weight"):
        check_dtypes(m, torch.bfloat16)


def test_unverifiable_attention_variant_is_refused():
    with pytest.raises(ValueError, match="cannot be verified"):
        verify_lm(LMRequest(TINY, layout_for_grid(1, 1, TINY), 3, 1, Variants(attention="flash"), SMALL))


# ---- the closed form ------------------------------------------------------------------------------

def test_decode_summation_equals_sum_of_steps():
    g = model.model_graph(True, Variants())
    total = g.total(DECODE).flops
    assert not total.has(sp.Sum) and not total.has(S.decode_step)
    per_step = sum((g.cost(n).flops for n in g.nodes(DECODE)), sp.Integer(0))
    for w, h, n in [(1, 1, 1), (2, 3, 2), (2, 3, 7), (4, 2, 5)]:
        values = at(GUNDAM, w, h, 10, out=n)
        by_step = sum(substitute(per_step, {**values, S.decode_step: t}) for t in range(1, n))
        assert substitute(total, values) == by_step
    assert substitute(total, at(GUNDAM, 2, 3, 10, out=1)) == 0  # prefill only


def test_decode_total_is_a_polynomial():
    expr = model.formula(GUNDAM, DECODE, "flops").subs(crops_run(), 1)
    poly = sp.Poly(sp.expand(expr), S.w_crop, S.h_crop, S.text_tokens, S.output_tokens)
    assert poly.degree(S.output_tokens) == 2 and poly.degree(S.text_tokens) == 1
    pre = sp.Poly(sp.expand(model.formula(GUNDAM, PREFILL, "flops").subs(crops_run(), 1)),
                  S.w_crop, S.h_crop, S.text_tokens)
    assert pre.degree(S.text_tokens) == 2  # eager attention is quadratic in the prompt


def test_formula_symbols():
    assert model.formula(GUNDAM, PREFILL, "flops").free_symbols == {S.w_crop, S.h_crop, S.text_tokens}
    assert model.formula(GUNDAM, DECODE, "flops").free_symbols == {S.w_crop, S.h_crop, S.text_tokens,
                                                                   S.output_tokens}
    assert model.formula(MODES["base"], "decoder", "flops").free_symbols == {S.text_tokens, S.output_tokens}


def test_active_parameters_per_token():
    """Decode FLOPs outside attention and RoPE are 2 x the active weights read per token (SPEC: ~570M)."""
    c = LM
    h = c.hidden
    active = (c.layers * 4 * h * c.heads * c.head_dim + c.dense_layers * 3 * h * c.dense_intermediate
              + (c.layers - c.dense_layers) * (c.experts_per_token * 3 * h * c.moe_intermediate
                                               + 3 * h * c.shared_intermediate + h * c.routed_experts))
    g = model.model_graph(True, Variants(attention="uncounted", rope="once"))
    step = sum(g.cost(n).flops for n in g.nodes(DECODE))
    assert step == 2 * (active + h * c.vocab)
    assert 560e6 < active + h * c.vocab < 580e6


# ---- variants -------------------------------------------------------------------------------------

def _totals(variants, w=2, h=3, text=10, n=50):
    values = at(GUNDAM, w, h, text, out=n)
    return {s: substitute(model.formula(GUNDAM, s, "flops", variants), values) for s in (PREFILL, DECODE)}


def test_attention_variants():
    c, L = LM, prompt(GUNDAM, 2, 3, 10)
    per_pair = 2 * c.heads * 2 * c.head_dim * c.layers       # scores + probs x values per (query, key)
    eager, flash, none = (_totals(Variants(attention=a)) for a in ("eager", "flash", "uncounted"))
    assert eager[PREFILL] - flash[PREFILL] == per_pair * L * (L - 1) // 2   # the masked half
    assert eager[DECODE] == flash[DECODE]                                   # one query sees every key
    assert eager[PREFILL] - none[PREFILL] == per_pair * L * L
    assert eager[DECODE] - none[DECODE] == per_pair * sum(L + t for t in range(1, 50))


def test_lm_head_and_rope_variants():
    c, L = LM, prompt(GUNDAM, 2, 3, 10)
    base, last, once = _totals(Variants()), _totals(Variants(lm_head="last")), _totals(Variants(rope="once"))
    assert base[PREFILL] - last[PREFILL] == 2 * c.hidden * c.vocab * (L - 1)
    assert base[DECODE] == last[DECODE]
    assert base[PREFILL] - once[PREFILL] == c.layers * 2 * c.rope_pairs * L
    assert base[DECODE] - once[DECODE] == c.layers * 2 * c.rope_pairs * 49


def test_bad_variants():
    for kw in ({"attention": "sdpa"}, {"lm_head": "first"}, {"rope": "never"}):
        with pytest.raises(ValueError):
            Variants(**kw)


# ---- structure ------------------------------------------------------------------------------------

def test_node_names_and_vision_edge():
    g = model.model_graph(True, Variants())
    for node in ("decoder.prefill.layers.3.self_attn.q_proj", "decoder.prefill.layers.3.mlp.experts.gate_up_proj",
                 "decoder.prefill.layers.3.mlp.gate", "decoder.prefill.layers.3.mlp.shared_experts.gate_proj",
                 "decoder.prefill.layers.0.mlp.gate_proj", "decoder.prefill.lm_head", "decoder.decode.lm_head",
                 "decoder.decode.layers.11.self_attn.cache_key", "decoder.prefill.embed_tokens",
                 "decoder.prefill.layers.5.input_layernorm", "decoder.prefill.norm"):
        assert node in g.g, node
    assert g.g.has_edge("vision.assemble.sequence", "decoder.prefill.image_scatter")
    assert g.cost("decoder.prefill.layers.5.input_layernorm").flops == 0
    assert "decoder.prefill.layers.0.mlp.gate" not in g.g  # layer 0 is dense


def test_prompt_length_is_the_layout_token_count():
    g = model.model_graph(True, Variants())
    slots = g.g.nodes["vision.assemble.sequence"]["out_shape"][0]
    for w, h in all_grids():
        values = at(GUNDAM, w, h, 10)
        assert substitute(prompt_length(True), values) == prompt(GUNDAM, w, h, 10)
        assert substitute(slots, values) + 11 == prompt(GUNDAM, w, h, 10)
    for name in ("tiny", "small", "base", "large"):
        values = at(MODES[name], 1, 1, 4)
        assert substitute(prompt_length(False), values) == prompt(MODES[name], 1, 1, 4)


def test_vision_totals_unchanged_by_the_decoder():
    full, vision = model.model_graph(True, Variants()), model.vision_graph(True)
    for scope in model.SCOPES:
        assert sp.expand(full.total(scope).flops - vision.total(scope).flops) == 0


def test_e2e_is_vision_plus_decoder():
    values = at(GUNDAM, 2, 3, 10, out=1000)
    parts = [substitute(model.formula(GUNDAM, s, "flops"), values) for s in model.E2E_PARTS]
    assert substitute(model.formula(GUNDAM, model.E2E, "flops"), values) == sum(parts)


def test_small_config_graph_is_parametric():
    g = decoder_graph(OTHER, Variants())
    assert "decoder.prefill.layers.1.mlp.gate_proj" in g.g and "decoder.prefill.layers.2.mlp.gate" in g.g
    assert g.g.nodes["decoder.prefill.lm_head"]["out_shape"][-1] == OTHER.vocab


def test_sequence_values_refuse_bad_counts():
    for text, out in ((-1, 5), (3, 0), (3, -2), (2.5, 3)):
        with pytest.raises(ValueError):
            model.sequence_values(text, out)
