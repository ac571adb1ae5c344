"""The language-model scopes on the command line: acceptance figures, variants shown, bad input."""
import json

import pytest

from costgraph.graphs.deepseek_ocr.config import LM


def lm_forward(tokens: int, context: int, last_only: bool = False) -> int:
    """One forward of `tokens` new tokens over `context` keys, from SPEC section 5 directly
    (eager attention, lm_head on every new token unless last_only, vendor RoPE)."""
    c = LM
    h, qkvo = c.hidden, c.heads * c.head_dim
    per_token = c.layers * 4 * h * qkvo  # q, k, v, o
    per_token += c.dense_layers * 3 * h * c.dense_intermediate
    per_token += (c.layers - c.dense_layers) * (h * c.routed_experts + c.experts_per_token * 3 * h * c.moe_intermediate
                                                + 3 * h * c.shared_intermediate)
    attention = c.layers * c.heads * tokens * context * 2 * c.head_dim   # scores + probs x values
    rope = c.layers * (c.head_dim // 2) * tokens
    head = (1 if last_only else tokens) * h * c.vocab
    return 2 * (tokens * per_token + attention + rope + head)


def test_cost_e2e_acceptance(cli):
    code, out, _ = cli("cost", "--mode", "gundam", "--size", "1654x2339", "--scope", "e2e",
                       "--output-tokens", "1000", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["variants"] == {"attention": "eager", "lm_head": "all", "rope": "vendor"}
    seq = data["sequence"]
    assert (seq["prompt_tokens"], seq["text_tokens"], seq["output_tokens"], seq["decode_forwards"]) == (914, 10, 1000, 999)
    t = {k: v["flops"] for k, v in data["totals"].items()}
    assert list(t) == ["vision", "decoder.prefill", "decoder.decode", "e2e"]
    assert t["decoder.prefill"] == lm_forward(914, 914)
    assert t["decoder.decode"] == sum(lm_forward(1, 914 + s) for s in range(1, 1000))
    vision = 3_468_866_060_288  # == the meta reference (tests/test_cli.py checks it live)
    assert t["vision"] == vision
    assert t["e2e"] == vision + lm_forward(914, 914) + sum(lm_forward(1, 914 + s) for s in range(1, 1000))


def test_cost_variants_and_scopes(cli):
    code, out, _ = cli("cost", "--size", "1654x2339", "--scope", "decoder.prefill,decoder.decode",
                       "--text-tokens", "0", "--output-tokens", "2", "--lm-head", "last", "--json")
    data = json.loads(out)
    assert code == 0 and data["variants"]["lm_head"] == "last" and data["sequence"]["prompt_tokens"] == 904
    assert data["totals"]["decoder.prefill"]["flops"] == lm_forward(904, 904, last_only=True)
    assert data["totals"]["decoder.decode"]["flops"] == lm_forward(1, 905)
    code, out, _ = cli("cost", "--size", "1654x2339", "--attention", "flash")
    assert code == 0 and "variants: attention=flash lm_head=all rope=vendor" in out
    for scope in ("vision", "vision.crops", "decoder", "decoder.prefill", "decoder.decode", "e2e"):
        assert f"\n{scope} " in out
    code, out, _ = cli("cost", "--size", "1654x2339", "--output-tokens", "1", "--scope", "decoder.decode",
                       "--json")
    assert json.loads(out)["totals"]["decoder.decode"]["flops"] == 0  # the prefill made the only token


def test_formula_decoder_scopes(cli):
    code, out, _ = cli("formula", "--mode", "gundam", "--scope", "decoder.prefill", "--json")
    data = json.loads(out)
    assert code == 0 and set(data["symbols"]) == {"w_crop", "h_crop", "text_tokens"}
    assert data["variants"]["attention"] == "eager"
    code, out, _ = cli("formula", "--mode", "gundam", "--scope", "decoder.decode", "--json")
    assert set(json.loads(out)["symbols"]) == {"w_crop", "h_crop", "text_tokens", "output_tokens"}
    code, out, _ = cli("formula", "--mode", "gundam", "--scope", "decoder.prefill", "--rope", "once")
    assert code == 0 and "# variants: attention=eager lm_head=all rope=once" in out
    code, out, _ = cli("formula", "--mode", "tiny", "--scope", "e2e", "--latex")
    assert code == 0 and "% variants:" in out and "N_{\\mathrm{out}}" in out


def test_output_past_the_positions_is_refused(cli):
    """The language model has 8,192 positions: the 2x3 page's 914-token prompt leaves 7,279 output tokens."""
    code, out, err = cli("cost", "--size", "1654x2339", "--output-tokens", "10000000")
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
    assert "8,192" in err and "positions" in err and "7,279" in err
    code, out, _ = cli("cost", "--size", "1654x2339", "--output-tokens", "7279", "--scope", "decoder.decode",
                       "--json")
    assert code == 0 and json.loads(out)["sequence"]["final_context"] == 8192
    code, out, err = cli("cost", "--size", "1654x2339", "--output-tokens", "7280")
    assert code == 2 and "8,192" in err


@pytest.mark.parametrize("argv", [
    ["cost", "--size", "100x100", "--output-tokens", "0"],
    ["cost", "--size", "100x100", "--output-tokens", "-5"],
    ["cost", "--size", "100x100", "--text-tokens", "-1"],
    ["cost", "--size", "100x100", "--output-tokens", "ten"],
    ["cost", "--size", "100x100", "--attention", "sdpa"],
    ["cost", "--size", "100x100", "--lm-head", "first"],
    ["cost", "--size", "100x100", "--scope", "decoder.nowhere"],
    ["cost", "--mode", "tiny", "--size", "100x100", "--scope", "vision.crops"],
    ["cost", "--size", "100x100", "--scope", ","],
    ["formula", "--scope", "decoder", "--rope", "sometimes"],
    ["verify", "--scope", "decoder", "--grid", "1x1", "--attention", "flash"],
    ["verify", "--scope", "decoder", "--grid", "1x1", "--decode-steps", "-1"],
    ["verify", "--scope", "e2e", "--all-grids"],
])
def test_bad_input_is_one_line_exit_2(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert err.startswith("costgraph: error: ") and err.count("\n") == 1
