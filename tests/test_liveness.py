"""The liveness pass: a hand-made graph with a known peak, views, batches, and the real vision graph
against a measured run."""
import sympy as sp

from costgraph.cost import Cost
from costgraph.graph import CostGraph
from costgraph.liveness import liveness

n = sp.Symbol("n", integer=True, positive=True)


def _tiny(multiplicity=1):
    """in -> a -> b -> v (view of b) -> c = a + v -> d; bytes a=4n, b=8n, c=2, d=16n."""
    g = CostGraph("tiny")
    b = g.scope("s", multiplicity=multiplicity)
    x = b.input("x", (n,))
    a = b.op("a", "gelu", x)
    bb = b.op("b", "gelu", a)
    v = b.op("v", "reshape", bb, shape=(n,))
    c = b.op("c", "add", a, v)
    b.op("d", "gelu", c)
    for node, act in (("s.a", 4 * n), ("s.b", 8 * n), ("s.c", 2), ("s.d", 16 * n)):
        g.g.nodes[node]["cost"] = Cost(activation_bytes=act)
    return g


def test_tiny_graph_known_peak():
    # live while each node runs: a 4n; b 12n; c 12n + 2 (a, b kept by c, then freed); d 16n + 2
    p = liveness(_tiny(), "s", keep_timeline=True)
    assert [e for _, e in p.timeline] == [4 * n, 12 * n, 12 * n + 2, 16 * n + 2]
    assert p.expr == 16 * n + 2                      # the other candidates are dominated
    assert p.at({"n": 3}) == {"bytes": 50, "node": "s.d"}


def test_view_extends_its_base():
    # without the view, b would be freed after v; the view's consumer c keeps it: at c, 4n + 8n + 2
    p = liveness(_tiny(), "s", keep_timeline=True)
    assert dict(p.timeline)["s.c"] == 12 * n + 2


def test_batched_scope_multiplies_the_peak():
    k = sp.Symbol("k", integer=True, positive=True)
    p = liveness(_tiny(multiplicity=k), "s")
    assert sp.simplify(p.expr - k * (16 * n + 2)) == 0
    assert p.at({"n": 3, "k": 6})["bytes"] == 300


def test_symbolic_max_keeps_incomparable_candidates():
    g = _tiny()
    m = sp.Symbol("m", integer=True, positive=True)
    g.g.nodes["s.b"]["cost"] = Cost(activation_bytes=100 * m)  # b: 100m, so live at c = 4n + 100m + 2
    p = liveness(g, "s")
    exprs = {e for e, _ in p.candidates}
    assert exprs == {4 * n + 100 * m + 2, 16 * n + 2}  # neither dominates the other
    assert p.at({"n": 1, "m": 1})["node"] == "s.c" and p.at({"n": 100, "m": 1})["node"] == "s.d"
    import numpy as np
    peak, _ = p.evaluate(n=np.array([1, 100]), m=np.array([1, 1]))
    assert list(peak) == [106, 1602]


# ---- the real graphs ------------------------------------------------------------------------------

from costgraph.graphs.deepseek_ocr import assembly as model                                            # noqa: E402
from costgraph.graphs.deepseek_ocr.config import ClipConfig, LMConfig, Mode, SamConfig, VisionConfig, get_mode  # noqa: E402
from costgraph.graphs.deepseek_ocr.decoder import decoder_graph                                            # noqa: E402
from costgraph.graphs.deepseek_ocr.layout import layout_for_grid                                           # noqa: E402

SMALL_VISION = VisionConfig(sam=SamConfig(width=32, depth=3, heads=2, mlp_dim=64, global_blocks=(2,), neck_channels=16,
                                          compressor_channels=(24, 32)),
                            clip=ClipConfig(width=32, depth=2, heads=2, mlp_dim=64), projector_out=40)
SMALL_LM = LMConfig(hidden=64, layers=3, heads=4, head_dim=16, vocab=101, dense_intermediate=96,
                    routed_experts=8, experts_per_token=3, moe_intermediate=24, shared_experts=2)


def _brute_max(p, fixed, values):
    """max over every step of the timeline, evaluated directly (no candidate pruning)."""
    from costgraph.evaluate import Compiled
    import numpy as np

    c = Compiled({f"i{i}": e for i, (_, e) in enumerate(p.timeline)} | {"factor": p.factor}, fixed=fixed)
    out = c(**{a.name: values[a.name] for a in c.args})
    n = len(next(iter(values.values())))
    factor = np.broadcast_to(out.pop("factor"), (n,))
    return np.max(np.stack([np.broadcast_to(v, (n,)) for v in out.values()]), axis=0) * factor


def test_pruned_candidates_give_the_exact_max():
    """The symbolic Max keeps only undominated candidates: it must equal the max over every step."""
    import numpy as np

    mode = get_mode("gundam")
    fixed = {**model.mode_values(mode), **model.dtype_values("bf16")}
    values = {"w_crop": np.array([2, 3, 1, 4]), "h_crop": np.array([3, 3, 1, 2]), "text_tokens": np.array([10, 0, 50, 10]),
              "t": np.array([1, 500, 20, 999])}
    graphs = {"vision.global": model.vision_graph(True, SMALL_VISION), "vision.crops": model.vision_graph(True, SMALL_VISION),
              "decoder.prefill": decoder_graph(SMALL_LM), "decoder.decode": decoder_graph(SMALL_LM)}
    for stage, g in graphs.items():
        p = liveness(g, stage, keep_timeline=True)
        assert len(p.candidates) < len(p.timeline) / 3     # pruning happened
        fixed_names = {k.name: v for k, v in fixed.items()}
        peak, _ = p.evaluate(**{a: values[a] if a in values else fixed_names[a] for a in p.args})
        assert list(np.broadcast_to(peak, (4,))) == list(_brute_max(p, fixed, values)), stage


def test_crop_batch_peak_is_its_multiplicity_times_a_batch():
    g = model.vision_graph(True)
    mode = get_mode("gundam")
    p = liveness(g, "vision.crops")
    at = lambda w, h: p.at({**{k.name: v for k, v in model.mode_values(mode).items()}, "dtype_bytes": 2,
                            "w_crop": w, "h_crop": h})["bytes"]
    assert at(1, 1) == 0                   # no crops: the branch does not run
    assert 0 < at(2, 1) < at(2, 3) < at(3, 3)


def test_kv_cache_update_replaces_the_old_cache():
    """A decode step's own peak leaves out the cache of earlier steps: it grows with the context by
    one layer's K or V (the cat holds old and new at once), not by all of them."""
    g = decoder_graph(SMALL_LM)
    p = liveness(g, "decoder.decode")
    v = {**{k.name: x for k, x in model.mode_values(get_mode("gundam")).items()}, "w_crop": 2, "h_crop": 3,
         "dtype_bytes": 4, "text_tokens": 10}
    one, two = (p.at({**v, "t": t})["bytes"] for t in (1, 2))
    assert two > one
    per_token_one_layer = SMALL_LM.heads * SMALL_LM.head_dim * 4
    # t -> t+1: one more token in the layer's new K/V being written, and the cache growth of every layer before
    assert two - one < 2 * SMALL_LM.layers * per_token_one_layer + per_token_one_layer


def test_vision_peak_against_a_measured_run():
    """Predicted (the graph) vs measured (live op outputs of a real CPU run) per view batch, small
    widths. Not exact: the run frees a tensor when Python drops its last reference (SAM's
    attention keeps `qkv` and the rel-pos mask to its end), the graph after its last consumer, so
    measured >= predicted; documented bound: within 1.3x (full size, A4 page: 1.16 crops, 1.02 global)."""
    from costgraph.verify.memory import measure_vision
    from costgraph.verify.preprocess import random_views
    from costgraph.verify.reference import build_page_reference

    ref = build_page_reference("cpu", cfg=SMALL_VISION)
    g = model.vision_graph(True, SMALL_VISION)
    mode = Mode("t448", 448, 224, True)
    rec = measure_vision(random_views(mode, layout_for_grid(2, 1, mode)), ref)
    values = {**{k.name: v for k, v in model.mode_values(mode).items()}, "w_crop": 2, "h_crop": 1, "dtype_bytes": 4}
    for stage in ("vision.crops", "vision.global"):
        p = liveness(g, stage)
        predicted = p.at({a: values[a] for a in p.args})["bytes"]
        measured = rec.sections[stage].own_peak
        assert predicted > 0 and 1.0 <= measured / predicted <= 1.3, (stage, predicted, measured)
