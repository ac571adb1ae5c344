"""From expressions to numbers: exact substitution for one layout, compiled evaluation for many.

A sweep never calls `subs` per point: `Compiled` lambdifies the expressions once and
evaluates whole numpy arrays of layouts at a time.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import sympy as sp

_EXACT_FLOAT = 2 ** 53


def substitute(expr: sp.Expr, values: Mapping[sp.Symbol, int]) -> int:
    """Exact integer value of `expr` at `values`; every free symbol must be given."""
    v = sp.sympify(expr).subs(values)
    if v.free_symbols:
        raise ValueError(f"symbols left unset: {', '.join(sorted(s.name for s in v.free_symbols))}")
    if not v.is_integer:
        v = sp.nsimplify(v)
        if not v.is_integer:
            raise ValueError(f"expression is not an integer at {dict(values)}: {v}")
    return int(v)


class Compiled:
    """Expressions compiled once (numpy), evaluated vectorised over arrays of symbol values.

    `fixed` values (a mode's sizes) are substituted once at compile time; the remaining
    free symbols become the function's arguments, in `args` order.
    """

    def __init__(self, exprs: Mapping[str, sp.Expr], fixed: Mapping[sp.Symbol, int] | None = None):
        fixed = dict(fixed or {})
        self.names = list(exprs)
        done = [sp.sympify(e).subs(fixed) if fixed else sp.sympify(e) for e in exprs.values()]
        free = set().union(*(e.free_symbols for e in done)) if done else set()
        self.args: list[sp.Symbol] = sorted(free, key=lambda s: s.name)
        self._fn = sp.lambdify(self.args, done, modules="numpy", cse=True)

    def __call__(self, **values) -> dict[str, np.ndarray]:
        missing = [s.name for s in self.args if s.name not in values]
        if missing:
            raise ValueError(f"missing values for: {', '.join(missing)}")
        arrays = [np.asarray(values[s.name], dtype=np.int64) for s in self.args]
        shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
        out = self._fn(*arrays)
        return {n: _as_int(o, shape) for n, o in zip(self.names, out)}


def _as_int(x, shape) -> np.ndarray:
    a = np.broadcast_to(np.asarray(x), shape)
    if a.dtype.kind == "f":
        if np.any(np.abs(a) >= _EXACT_FLOAT):
            raise OverflowError("value beyond exact float range; evaluate with substitute()")
        a = np.rint(a)
    return a.astype(np.int64)
