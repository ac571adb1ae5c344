"""Predicted vs measured, per node: the data the verifier reports.

Exact equality is the only pass. A node measured at 0 against a non-zero prediction fails
(a profiler that cannot see an op is a failure of the reference, never a pass), and so
does a measured op that no node claims, and a compute op that ran without a FLOP formula.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Row:
    node: str            # graph node (or scope for subtotal rows)
    metric: str
    predicted: int
    measured: int
    reference: str = ""  # the reference module path(s) / op the node maps to

    @property
    def status(self) -> str:
        if self.predicted == self.measured:
            return "ok"
        if self.measured == 0:
            return "measured-zero"
        return "mismatch"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Comparison:
    title: str
    rows: list[Row] = field(default_factory=list)        # per node
    subtotals: list[Row] = field(default_factory=list)   # per scope and in total
    unclaimed: list[tuple[str, str, int]] = field(default_factory=list)  # (module, op, count) no node maps to
    blind: list[str] = field(default_factory=list)       # compute ops that ran without a FLOP formula
    info: dict = field(default_factory=dict)             # layout, device, timings

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows + self.subtotals) and not self.unclaimed and not self.blind

    def failures(self) -> list[Row]:
        return [r for r in self.rows + self.subtotals if not r.ok]

    @property
    def nodes_compared(self) -> int:
        return len({r.node for r in self.rows})

    def to_json(self) -> dict:
        def row(r: Row) -> dict:
            return {**asdict(r), "status": r.status}
        return {"title": self.title, "ok": self.ok, "nodes_compared": self.nodes_compared,
                "rows_compared": len(self.rows), "info": self.info,
                "subtotals": [row(r) for r in self.subtotals], "rows": [row(r) for r in self.rows],
                "unclaimed": [{"module": m, "op": o, "count": c} for m, o, c in self.unclaimed],
                "blind": list(self.blind)}
