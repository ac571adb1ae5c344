"""The cost of one node: a small frozen record of sympy expressions, one per metric.

Like tinygrad's `Estimates`, costs add up and scale; a new metric is a new field, and
every helper below (sum, scale, substitution, export) picks it up from `METRICS`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import sympy as sp

ZERO = sp.Integer(0)


@dataclass(frozen=True)
class Cost:
    # Matmul-class FLOPs in torch's convention (2 per multiply-add): linear, conv,
    # bmm/matmul, einsum, attention scores and probabilities x values.
    flops: sp.Expr = ZERO
    # Elementwise work under costgraph/conventions.py (norms, softmax, activations, adds, ...).
    elementwise_flops: sp.Expr = ZERO
    # Unfused traffic: every op reads its inputs and weights (a gather: its indices and the rows it takes)
    # and writes its outputs (views: 0).
    bytes_read: sp.Expr = ZERO
    bytes_written: sp.Expr = ZERO
    # Bytes of the node's output tensor (0 for a view): what the liveness pass keeps alive.
    activation_bytes: sp.Expr = ZERO

    def __add__(self, other: "Cost") -> "Cost":
        if other == 0:  # lets sum() start from 0
            return self
        return Cost(**{m: getattr(self, m) + getattr(other, m) for m in METRICS})

    __radd__ = __add__

    def __mul__(self, k) -> "Cost":
        k = sp.sympify(k)
        return Cost(**{m: getattr(self, m) * k for m in METRICS})

    __rmul__ = __mul__

    def __getitem__(self, metric: str) -> sp.Expr:
        return getattr(self, metric)

    def map(self, fn) -> "Cost":
        return Cost(**{m: fn(getattr(self, m)) for m in METRICS})

    def as_dict(self) -> dict[str, sp.Expr]:
        return {m: getattr(self, m) for m in METRICS}


METRICS: tuple[str, ...] = tuple(f.name for f in fields(Cost))
