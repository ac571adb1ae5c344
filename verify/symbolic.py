"""Symbolic cross-check: torch's own FLOP expression for the crop branch, against the graph's.

Under `FakeTensorMode` with a `ShapeEnv`, the crop batch is a symbol (torch names it `s<k>`)
and `FlopCounterMode` (here `OpCounter`) adds up sympy expressions in it instead of numbers.
Mapping that symbol to `w_crop*h_crop` must make every node's expression, and the scope's
total, identical to the graph's: `simplify(ours - torch's) == 0`, with no numbers substituted
for the layout.

One shim: on fake tensors `aten.constant_pad_nd` (SAM's window padding, `F.pad`) runs a C++
kernel that reads concrete sizes and would pin the batch to its example value; torch's own
Python decomposition of the op is used instead (`torch._decomp`), which keeps sizes symbolic.
It adds no FLOPs either way (a pad is not a counted op).

A symbolic image side (`side_check`) traces too, with a second shim on an op without FLOPs
(the antialiased bicubic resize of the position tables, whose C++ composite refuses symbolic
sizes). But it is not a symbolic result: transformers' SAM `get_rel_pos` computes
`int(2 * max(q_size, k_size) - 1)` for the global-attention blocks, and `int()` on a symbolic
size makes torch record the guard `Eq(2*(side//16) - 1, 79)`: torch vouches for its expression
only at side//16 == 40, the example. `SideCheck` reports that guard, and shows that torch's
expression nonetheless equals ours identically on every grid g >= 2. Tens of seconds (torch
records hundreds of guards), so it runs from `costgraph verify --symbolic`, not the unit tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
import torch
from torch._decomp import decomposition_table
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from costgraph.graphs.deepseek_ocr import symbols as S
from costgraph.graphs.deepseek_ocr import assembly as model_graph
from costgraph.graphs.deepseek_ocr.config import MODES, Mode
from costgraph.graphs.deepseek_ocr.layout import crops_run
from .mapping import node_claims
from .profile import OpCounter, meta_encoder

aten = torch.ops.aten
CROPS = "vision.crops"
_DECOMPOSE = {aten.constant_pad_nd.default: decomposition_table[aten.constant_pad_nd.default]}


class _SymbolicPad(TorchDispatchMode):
    """Run the ops in `_DECOMPOSE` through torch's Python decompositions (symbolic-size safe)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fn = _DECOMPOSE.get(func, func)
        return fn(*args, **(kwargs or {}))


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # allow_non_fake_inputs: the encoder's meta parameters join the fake computation as they are.
    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


def _symbolic_input(fake, shape, dynamic):
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if d else DimDynamic.STATIC for d in dynamic])
    return fake.from_tensor(torch.empty(shape, device="meta"), symbolic_context=ctx)


def _expr(n) -> sp.Expr:
    return sp.sympify(n.node.expr) if isinstance(n, torch.SymInt) else sp.Integer(int(n))


def _claimed(counter: OpCounter, claims) -> sp.Expr:
    """torch's FLOPs for one node's claims. The encoder runs as the root here, so its module
    paths lack the page reference's "encoder." prefix."""
    wanted = {(c.module.removeprefix("encoder."), c.call) for c in claims}
    return sum((_expr(n) for k, n in counter.records.items() if k[1:3] in wanted), sp.Integer(0))


@dataclass
class SymbolicCheck:
    batch_symbol: sp.Symbol                 # torch's symbol for the crop batch
    torch_total: sp.Expr                    # torch's FLOPs of the crop branch, in batch_symbol
    ours_total: sp.Expr                     # the graph's vision.crops total (mode sizes substituted)
    per_node: dict[str, tuple[sp.Expr, sp.Expr]] = field(default_factory=dict)  # node: (ours, torch's)
    guards: list[str] = field(default_factory=list)  # conditions torch recorded on the batch

    @property
    def difference(self) -> sp.Expr:
        return sp.simplify(self.ours_total - self.torch_total.subs(self.batch_symbol, S.w_crop * S.h_crop))

    def node_differences(self) -> dict[str, sp.Expr]:
        to_layout = {self.batch_symbol: S.w_crop * S.h_crop}
        return {n: sp.simplify(o - t.subs(to_layout)) for n, (o, t) in self.per_node.items()}

    @property
    def ok(self) -> bool:
        return self.difference == 0 and all(d == 0 for d in self.node_differences().values())


def crop_branch_check(mode: Mode = MODES["gundam"], example_batch: int = 6) -> SymbolicCheck:
    """The crop branch of the reference with a symbolic batch, against the graph's crop scope.

    The graph's expression is taken for a tiled page (the no-crop indicator is 1): the
    reference with a batch of crops is exactly the tiled case.
    """
    if not mode.crop_mode:
        raise ValueError(f"mode {mode.name!r} has no crop branch")
    fake = _fake_mode()
    tile = mode.image_size
    x = _symbolic_input(fake, (example_batch, 3, tile, tile), (True, False, False, False))
    batch = _expr(x.shape[0])
    encoder = meta_encoder()  # built outside the fake mode
    with fake, _SymbolicPad(), OpCounter() as counter, torch.no_grad():
        encoder(x)

    graph = model_graph.vision_graph(True)
    fixed = {**model_graph.mode_values(mode)}
    ours = lambda e: sp.sympify(e).subs(fixed).subs(crops_run(), 1)
    per_node = {node: (ours(graph.effective_cost(node).flops), _claimed(counter, claims))
                for node, claims in node_claims(graph, CROPS).items()}
    torch_total = sum((_expr(n) for n in counter.records.values()), sp.Integer(0))
    guards = [str(g.expr) for g in fake.shape_env.guards]
    return SymbolicCheck(batch, sp.expand(torch_total), ours(graph.total(CROPS).flops), per_node, guards)


class _BicubicAA(TorchFunctionMode):
    """`F.interpolate(mode="bicubic", antialias=True)` through torch's Python decomposition.

    The C++ composite behind it (`_upsample_bicubic2d_aa.vec`) refuses symbolic output sizes
    ("SymIntArrayRef expected to contain only concrete integers"). Interpolation adds no FLOPs.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kw = kwargs or {}
        if func is torch.nn.functional.interpolate and kw.get("antialias") and kw.get("mode") == "bicubic" \
                and kw.get("size") is not None:
            size = kw["size"]
            size = list(size) if isinstance(size, (tuple, list)) else [size, size]
            return _AA_BICUBIC(args[0], size, bool(kw.get("align_corners")), None)
        return func(*args, **kw)


_AA_BICUBIC = decomposition_table[aten._upsample_bicubic2d_aa.vec]


def to_sympy(expr) -> sp.Expr:
    """torch's sympy functions (FloorDiv, PythonMod, ...) as plain sympy (floor, Mod, ...)."""
    from torch.utils._sympy import functions as tf

    expr = sp.sympify(expr)
    rules = [(tf.FloorDiv, lambda a, b: sp.floor(a / b)), (tf.CeilDiv, lambda a, b: sp.ceiling(a / b)),
             (tf.PythonMod, sp.Mod), (tf.Mod, sp.Mod), (tf.CleanDiv, lambda a, b: a / b),
             (tf.IntTrueDiv, lambda a, b: a / b), (tf.ModularIndexing, lambda x, d, m: sp.Mod(sp.floor(x / d), m)),
             (tf.Max, sp.Max), (tf.Min, sp.Min)]
    for fn, new in rules:
        expr = expr.replace(fn, new)
    return expr


@dataclass
class SideCheck:
    torch_total: sp.Expr                    # in image_size (H = W), torch's functions converted
    ours_total: sp.Expr
    per_node: dict[str, tuple[sp.Expr, sp.Expr]]
    guards: list[sp.Expr]                   # conditions torch recorded on the side, in image_size
    grid_symbol: sp.Symbol = sp.Symbol("g", integer=True, positive=True)   # floor(side / 16)
    residues: int = 28                      # lcm of the strides on the grid: 2, 4 (compressor), 14 (windows)

    def _on_grid(self, e: sp.Expr) -> sp.Expr:
        e = e.subs({S.patch_size: 16, S.downsample_ratio: 4}).subs(sp.floor(S.image_size / 16), self.grid_symbol)
        if S.image_size in e.free_symbols:
            raise ValueError(f"expression depends on the side other than through floor(side/16): {e}")
        return e

    def differences(self) -> dict[str, list]:
        """ours - torch's, per node and in total, on every grid side g >= 2 (side >= 32):
        g = 2..29 one by one, g >= 30 as 28*m + r + 2 for each residue r (m >= 0 symbolic)."""
        m = sp.Symbol("m", integer=True, nonnegative=True)
        g = self.grid_symbol
        points = [sp.Integer(k) for k in range(2, 2 + self.residues)]
        points += [self.residues * m + r + 2 + self.residues for r in range(self.residues)]
        out = {}
        pairs = {"total": (self.ours_total, self.torch_total), **self.per_node}
        for name, (o, t) in pairs.items():
            d = self._on_grid(o) - self._on_grid(t)
            # expand settles most cases quickly; simplify cancels torch's Gp // (Gp // 14) forms
            out[name] = [k for k in points if sp.expand(d.subs(g, k)) != 0 and sp.simplify(d.subs(g, k)) != 0]
        return out

    def expressions_agree(self) -> bool:
        return all(not bad for bad in self.differences().values())

    def guards_hold_at(self, side: int) -> bool:
        """Whether every guard torch recorded holds at this side (exactly, by substitution)."""
        return all(gd.subs(S.image_size, side) == sp.true for gd in set(self.guards))

    def pinning_guards(self) -> list[str]:
        """Guards that fix the side to one grid (torch specialised on it)."""
        out = []
        for gd in set(self.guards):
            if isinstance(gd, sp.Eq) and (gd.lhs - gd.rhs).free_symbols == {S.image_size}:
                sol = [g for g in range(2, 257) if gd.subs(S.image_size, 16 * g) == sp.true]
                if len(sol) == 1:
                    out.append(f"{gd} (only side//16 = {sol[0]})")
        return sorted(out)


def side_check(example_side: int = 640) -> SideCheck:
    """One view with a symbolic side (H = W) against the graph's one-view expression in image_size.

    See the module docstring: torch's trace is valid only where its guards hold (`pinning_guards`,
    `guards_hold_at`); `differences` compares the two expressions on every grid regardless.
    """
    fake = _fake_mode()
    x = _symbolic_input(fake, (1, 3, example_side, example_side), (False, False, True, True))
    h, w = _expr(x.shape[2]), _expr(x.shape[3])
    encoder = meta_encoder()
    with fake, _BicubicAA(), _SymbolicPad(), OpCounter() as counter, torch.no_grad():
        encoder(x)
    side = {h: S.image_size, w: S.image_size}
    conv = lambda e: to_sympy(e).subs(side)

    graph = model_graph.vision_graph(False)
    per_node = {node: (graph.effective_cost(node).flops, conv(_claimed(counter, claims)))
                for node, claims in node_claims(graph, "vision.global").items()}
    torch_total = conv(sum((_expr(n) for n in counter.records.values()), sp.Integer(0)))
    guards = [conv(gd.expr) for gd in fake.shape_env.guards]
    return SideCheck(torch_total, graph.total("vision.global").flops, per_node, guards)


def summary(side: bool = True) -> dict:
    """Both checks as plain data (for `costgraph verify --symbolic`)."""
    crop = crop_branch_check()
    node_diffs = crop.node_differences()
    out = {"crop_batch": {
        "ok": crop.ok, "batch_symbol": str(crop.batch_symbol), "mapped_to": "w_crop*h_crop",
        "torch": str(crop.torch_total), "ours": str(crop.ours_total), "difference": str(crop.difference),
        "nodes": len(node_diffs), "nodes_differing": sorted(n for n, d in node_diffs.items() if d != 0),
        "guards": crop.guards}}
    if side:
        sc = side_check()
        diffs = sc.differences()
        out["image_side"] = {
            "expressions_agree": all(not v for v in diffs.values()), "nodes": len(sc.per_node),
            "nodes_differing": sorted(n for n, v in diffs.items() if v and n != "total"),
            "torch": str(sc.torch_total), "ours": str(sc.ours_total), "guards": len(sc.guards),
            "pinning_guards": sc.pinning_guards(), "guards_hold_at_640": sc.guards_hold_at(640),
            "guards_hold_at_1024": sc.guards_hold_at(1024),
            "symbolic_result": not sc.pinning_guards(),  # False: torch's own guards pin the side
        }
    return out
