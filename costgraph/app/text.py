"""Parsing command-line values and the metric vocabulary of the commands (the app's, not the engine's).

Bad input is a `UserError` (or a ValueError from below): one line on stderr, exit code 2.
"""
from __future__ import annotations

import re

from costgraph.cost import METRICS
from costgraph.hardware import PRESETS, get_hardware, names
from costgraph.stages import DERIVED

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input: reported as one line, exit code 2."""


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", text)
    if not m:
        raise UserError(f"malformed size {text!r}: expected WxH with positive integers, e.g. 1654x2339")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        raise UserError(f"size {text!r} must be positive in both dimensions")
    return w, h


def split_list(items, what: str) -> tuple[str, ...]:
    """Repeatable comma lists (`--scope a,b --scope c`) -> names in order, blanks refused."""
    out = []
    for item in items:
        parts = [p.strip() for p in item.split(",")]
        if not all(parts):
            raise UserError(f"empty {what} in {item!r}")
        out += parts
    return tuple(dict.fromkeys(out))


# `--metrics` names a group; a group is some Cost fields summed per scope plus, for some, a
# section of its own (params, peak activations, KV cache).
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "flops": ("flops",),
    "elementwise_flops": ("elementwise_flops",),
    "bytes": ("bytes_read", "bytes_written"),       # shown with their sum, `bytes`
    "params": (),                                   # resident / executed / active (costgraph.params)
    "activations": ("activation_bytes",),           # + peak per stage (costgraph.liveness)
    "kv_cache": (),                                 # per token and at the final context
}
# Without --metrics, `cost` shows every Cost field per scope (activation_bytes included) and the
# derived bytes; the groups below add nothing slower (no liveness pass, no parameter section).
DEFAULT_GROUPS = ("flops", "elementwise_flops", "bytes")
FORMULA_METRICS = METRICS + DERIVED


def parse_metrics(text: str) -> tuple[str, ...]:
    """'flops,bytes' or 'all' -> metric groups, in a fixed order; unknown names are a UserError."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise UserError(f"no metrics in {text!r} (choose from {', '.join(METRIC_GROUPS)}, all)")
    if "all" in items:
        return tuple(METRIC_GROUPS)
    bad = [t for t in items if t not in METRIC_GROUPS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r} (choose from {', '.join(METRIC_GROUPS)}, all)")
    return tuple(g for g in METRIC_GROUPS if g in items)


def parse_hardware(text: str | None, dtype: str) -> list:
    """--hardware NAME[,NAME...] or all (presets; `this-machine` calibrates now)."""
    if not text:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in items:
        items = [i for i in items if i != "all"] + [n for n in PRESETS if n not in items]
    bad = [t for t in items if t not in names()]
    if bad or not items:
        raise UserError(f"unknown hardware {(bad or [text])[0]!r} (choose from {', '.join(names())}, all)")
    return [get_hardware(n, dtype) for n in dict.fromkeys(items)]
