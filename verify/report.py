"""Verification results for people (a table; Markdown for a review) and for scripts (JSON)."""
from __future__ import annotations

from costgraph.render import human, table
from .compare import Comparison, Row

MAX_FAILING_ROWS = 40  # per comparison in the text and Markdown outputs (JSON has them all)


def summary(comps: list[Comparison]) -> dict:
    return {"ok": all(c.ok for c in comps), "comparisons": len(comps),
            "nodes_compared": sum(c.nodes_compared for c in comps),
            "rows_compared": sum(len(c.rows) for c in comps),
            "nonzero_rows": sum(1 for c in comps for r in c.rows if r.predicted or r.measured),
            "failing": sum(len(c.failures()) + len(c.unclaimed) + len(c.blind) for c in comps)}


def to_json(comps: list[Comparison], extra: dict | None = None) -> dict:
    return {**summary(comps), **(extra or {}), "results": [c.to_json() for c in comps]}


def _overview(comps: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    header = ["case", "device", "nodes", "predicted", "measured", "failing", "status", "s"]
    rows = []
    for c in comps:
        total = c.subtotals[0] if c.subtotals else Row("-", "flops", 0, 0)
        bad = len(c.failures()) + len(c.unclaimed) + len(c.blind)
        rows.append([c.title, c.info.get("device", ""), str(c.nodes_compared), f"{total.predicted:,}",
                     f"{total.measured:,}", str(bad), "ok" if c.ok else "FAIL", f"{c.info.get('seconds', 0):.2f}"])
    return header, rows


def _row_cells(r: Row) -> list[str]:
    return [r.node, r.metric, f"{r.predicted:,}", f"{r.measured:,}", f"{r.measured - r.predicted:+,}", r.status,
            r.reference]


ROW_HEADER = ["node", "metric", "predicted", "measured", "diff", "status", "reference"]


def _problems(c: Comparison) -> list[str]:
    out = [f"measured op with no node: {m} {o} = {n:,}" for m, o, n in c.unclaimed]
    out += [f"compute op without a FLOP formula (counted 0): {b}" for b in c.blind]
    return out


def text(comps: list[Comparison], footer: str = "") -> str:
    s = summary(comps)
    lines = []
    if len(comps) == 1:
        c = comps[0]
        lay = c.info.get("layout")
        parts = ([f"mode {c.info['mode']}"] if c.info.get("mode") else []) + \
            ([f"{lay.get('num_crops', 0)} crops"] if lay is not None else []) + [f"device {c.info.get('device')}"]
        lines.append(f"{c.title}: " + ", ".join(parts))
        lines.append(table([_row_cells(r)[:6] for r in c.subtotals], ROW_HEADER[:6]))
    else:
        header, rows = _overview(comps)
        lines.append(table(rows, header))
    for c in comps:
        bad = c.failures()
        if bad or c.unclaimed or c.blind:
            lines.append(f"\nFAILING in {c.title}:")
            if bad:
                lines.append(table([_row_cells(r) for r in bad[:MAX_FAILING_ROWS]], ROW_HEADER))
                if len(bad) > MAX_FAILING_ROWS:
                    lines.append(f"... {len(bad) - MAX_FAILING_ROWS} more failing rows (see --json)")
            lines += _problems(c)
    verdict = "PASS" if s["ok"] else "FAIL"
    lines.append(f"\n{verdict}: {s['comparisons']} case(s), {s['nodes_compared']:,} nodes compared "
                 f"({s['nonzero_rows']:,} with non-zero values), exact equality, {s['failing']} failing")
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda x: str(x).replace("|", "\\|")
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(comps: list[Comparison], command: str = "", footer: str = "") -> str:
    s = summary(comps)
    verdict = "PASS" if s["ok"] else "FAIL"
    lines = ["# costgraph verify", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"**{verdict}**: {s['comparisons']} case(s), {s['nodes_compared']:,} nodes compared "
              f"({s['nonzero_rows']:,} with non-zero values), {s['failing']} failing. Pass = predicted equals measured exactly; "
              "a measured 0 against a non-zero prediction fails; a measured op no node claims fails.", ""]
    header, rows = _overview(comps)
    lines += [_md_table(header, rows), ""]
    for c in comps:
        if len(comps) > 1 and c.ok:
            continue  # many cases: the overview says enough about the passing ones
        lines += [f"## {c.title}", "", _md_table(ROW_HEADER[:6], [_row_cells(r)[:6] for r in c.subtotals]), ""]
        bad = c.failures()
        if bad:
            lines += ["Failing rows:", "", _md_table(ROW_HEADER, [_row_cells(r) for r in bad[:MAX_FAILING_ROWS]]), ""]
        lines += [f"- {p}" for p in _problems(c)]
        if not bad and c.ok:
            lines += [f"All {c.nodes_compared} nodes match exactly "
                      f"(total {human(c.subtotals[0].predicted) if c.subtotals else 0}FLOPs).", ""]
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"
