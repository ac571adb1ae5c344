"""Symbolic cross-check: torch's own sympy FLOPs for a symbolic crop batch equal the graph's expression."""
import sympy as sp

from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.verify.symbolic import crop_branch_check, to_sympy


def test_crop_branch_symbolic_batch_equals_graph():
    check = crop_branch_check()
    b = check.batch_symbol
    assert isinstance(b, sp.Symbol) and check.torch_total.free_symbols == {b}  # torch's result is symbolic
    assert check.ours_total.free_symbols == {S.w_crop, S.h_crop}
    assert sp.simplify(check.ours_total - check.torch_total.subs(b, S.w_crop * S.h_crop)) == 0
    assert check.difference == 0
    diffs = check.node_differences()
    assert len(diffs) == 210 and all(d == 0 for d in diffs.values())
    # not trivially zero: a node of the crop branch is a real polynomial in the layout
    ours, torch_expr = check.per_node["vision.crops.sam.blocks.2.attn.sdpa"]
    assert ours.free_symbols == {S.w_crop, S.h_crop} and torch_expr.free_symbols == {b}
    assert check.ok and check.guards == []


def test_torch_sympy_functions_become_plain_sympy():
    from torch.utils._sympy.functions import FloorDiv, PythonMod

    x = sp.Symbol("x", integer=True, positive=True)
    e = to_sympy(FloorDiv(x, 16) + PythonMod(x, 14))
    assert e == sp.floor(x / 16) + sp.Mod(x, 14)
