"""Figures of a sweep (matplotlib, Agg backend; PNG and SVG).

- cost_vs_crops: every crop grid, cost stacked by branch (vision global view, vision crops,
  decoder prefill, decoder decode: the leaf scopes), grouped by number of crops.
- crop_heatmap: image tokens and total cost over (w_crop, h_crop).
- cost_vs_aspect: image tokens and cost of pages against their aspect ratio, coloured by the
  grid the layout rule chose, so the grid switches show.
Branches, totals and metrics come from the sweep (its scopes and `METRICS`), never a fixed list.
"""
from __future__ import annotations

import io
import os
from dataclasses import fields

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

from costgraph.cost import Cost  # noqa: E402
from costgraph.io import write_atomic  # noqa: E402
from .models import get_model  # noqa: E402

_PREFIXES = ((1e15, "P", 15), (1e12, "T", 12), (1e9, "G", 9), (1e6, "M", 6), (1e3, "k", 3))


def _finish(fig, note: str) -> None:
    """The footnote below everything (the figures use constrained layout, which makes room for it)."""
    fig.supxlabel(note, fontsize=8, color="0.3")
_FALLBACK_LABELS = {"flops": "FLOPs"}


def metric_label(metric: str) -> str:
    """A Cost field's `label` metadata when it has one."""
    meta = {f.name: f.metadata for f in fields(Cost)}.get(metric, {})
    return meta.get("label") or _FALLBACK_LABELS.get(metric, metric.replace("_", " "))


def scaled(metric: str, values) -> tuple[float, str]:
    """(divisor, axis label) with an SI prefix fitted to the largest value."""
    top = float(np.max(np.abs(values))) if np.size(values) else 0.0
    meta = {f.name: f.metadata for f in fields(Cost)}.get(metric, {})
    unit = meta.get("unit", "")
    unit = f" {unit}" if unit else ""
    for scale, prefix, exp in _PREFIXES:
        if top >= scale:
            return scale, rf"{metric_label(metric)} ($\times 10^{{{exp}}}${unit})"
    return 1.0, metric_label(metric) + (f" ({unit.strip()})" if unit else "")


def branches(sweep, metric: str) -> dict[str, np.ndarray]:
    """Leaf scopes (and any cost a parent scope has beside its children), composite scopes left out.

    They add up to the whole run: this is what the stacked plots show.
    """
    scopes = [s for s in sweep.scopes if s not in sweep.composites]
    out = {}
    for s in scopes:
        kids = [c for c in scopes if c.rpartition(".")[0] == s]
        if not kids:
            out[s] = sweep.value(s, metric)
            continue
        rest = sweep.value(s, metric) - sum(sweep.value(c, metric) for c in kids)
        if rest.any():
            out[f"{s} (own ops)"] = rest
    return out


def total_name(sweep) -> str:
    """The composite scope covering the run if the sweep has one (e2e), else the sum of the branches."""
    whole = [s for s in sweep.scopes if s in sweep.composites]
    if whole:
        return f"{whole[0]} = " + " + ".join(sweep.composites[whole[0]])
    roots = [s for s in sweep.scopes if "." not in s]
    return roots[0] if len(roots) == 1 else "sum of " + " + ".join(roots)


def total(sweep, metric: str) -> np.ndarray:
    return sum(branches(sweep, metric).values())


def subtitle(sweep) -> str:
    model = get_model(sweep.model or None)
    mode = model.get_mode(sweep.mode)
    p = sweep.params
    parts = [f"{mode.name}: {mode.note}"]
    if getattr(mode, "crop_mode", False):
        parts.append(f"at most {p['max_num']} crops")
    lm = getattr(model, "lm_scope", None)
    if lm and any(s.startswith(lm) or s in sweep.composites for s in sweep.scopes):
        v = p.get("variants") or {}
        parts.append(f"text_tokens={p['text_tokens']}, output_tokens={p['output_tokens']}"
                     + (", " + " ".join(f"{k}={x}" for k, x in v.items()) if v else ""))
    return "; ".join(parts)


_CONVENTION = "FLOPs in torch's convention: 2 per multiply-add, matmul-class ops (linear, conv, bmm, einsum, attention)"


def _save(fig, base: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight")
        path = f"{base}.{ext}"
        write_atomic(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def _grid_colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    extra = plt.get_cmap("Set2")
    return {g: (cmap(k) if k < 20 else extra(k - 20)) for k, g in enumerate(labels)}


# ---- grid sweeps -----------------------------------------------------------------------

def cost_vs_crops(sweep, base: str) -> list[str]:
    """Stacked bars per grid, grouped by number of crops; the no-crop 1x1 layout first."""
    order = np.lexsort((sweep.columns["h_crop"], sweep.columns["num_crops"]))
    labels = [sweep.columns["grid"][k] for k in order]
    crops = [int(sweep.columns["num_crops"][k]) for k in order]
    tokens = [int(sweep.columns["image_tokens"][k]) for k in order]
    nc = sweep.no_crop
    if nc:
        labels, crops, tokens = ["1x1"] + labels, [0] + crops, [nc["image_tokens"]] + tokens
    # a gap between crop-count groups
    x, pos = [], 0.0
    for k, c in enumerate(crops):
        if k and c != crops[k - 1]:
            pos += 0.6
        x.append(pos)
        pos += 1.0
    x = np.array(x)
    metrics = sweep.metrics
    fig, axes = plt.subplots(len(metrics), 1, figsize=(13, 4.8 * len(metrics)), squeeze=False, layout="constrained")
    for ax, metric in zip(axes[:, 0], metrics):
        parts = branches(sweep, metric)
        if nc:
            parts = {b: np.concatenate([[_no_crop_value(nc, b, metric)], v[order]]) for b, v in parts.items()}
        else:
            parts = {b: v[order] for b, v in parts.items()}
        whole = sum(parts.values())
        scale, ylabel = scaled(metric, whole)
        bottom = np.zeros(len(x))
        colors = plt.get_cmap("tab10")
        for k, (b, v) in enumerate(parts.items()):
            ax.bar(x, v / scale, 0.8, bottom=bottom, label=b, color=colors(k), edgecolor="white", linewidth=0.5)
            bottom += v / scale
        top = bottom.max()
        for xi, t, tok in zip(x, bottom, tokens):
            ax.text(xi, t + top * 0.01, f"{t:,.1f}", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, [f"{g}\n{tok}" for g, tok in zip(labels, tokens)], fontsize=8)
        ax.set_xlim(x[0] - 0.8, x[-1] + 0.8)
        ax.set_ylim(0, top * 1.18)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("crop grid w_crop x h_crop (tiles across x down), grouped by number of crops; "
                      "second line: image tokens", fontsize=9)
        for c in sorted(set(crops)):
            xs = x[[k for k, cc in enumerate(crops) if cc == c]]
            name = "no crops" if c == 0 else f"{c} crops"
            ax.text(xs.mean(), top * 1.12, name, ha="center", fontsize=8, color="0.3")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9), fontsize=8,
                  title=f"branch (stacked; total: {total_name(sweep)})", title_fontsize=8)
        ax.set_title(f"{metric_label(metric)} per page by branch vs crop grid", fontsize=11)
    fig.suptitle(f"{sweep.label} {sweep.mode}: cost of one page vs crop grid\n{subtitle(sweep)}", fontsize=11)
    _finish(fig, _CONVENTION + ". 1x1: a page within 640x640 px, global view only.")
    return _save(fig, base)


def _no_crop_value(nc: dict, branch: str, metric: str) -> int:
    totals = nc["totals"]
    if branch in totals:
        return totals[branch][metric]
    scope = branch.removesuffix(" (own ops)")
    kids = [c for c in totals if c.rpartition(".")[0] == scope]
    return totals[scope][metric] - sum(totals[c][metric] for c in kids)


def crop_heatmap(sweep, base: str) -> list[str]:
    """Image tokens and the total of each metric over (w_crop, h_crop); cells the layout never produces are blank."""
    w, h = sweep.columns["w_crop"], sweep.columns["h_crop"]
    n = int(max(w.max(), h.max()))
    panels = [(None, "image tokens (slots)", sweep.columns["image_tokens"], 1.0, "image tokens", "{:,.0f}")]
    for metric in sweep.metrics:
        t = total(sweep, metric)
        scale, label = scaled(metric, t)
        panels.append((metric, f"{metric_label(metric)}: {total_name(sweep)}", t, scale, label, "{:,.1f}"))
    nc = sweep.no_crop
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False, layout="constrained")
    for ax, (metric, title, values, scale, label, fmt) in zip(axes[0], panels):
        grid = np.full((n, n), np.nan)
        grid[h - 1, w - 1] = values / scale
        if nc:
            grid[0, 0] = nc["image_tokens"] if metric is None else \
                sum(_no_crop_value(nc, b, metric) for b in branches(sweep, metric)) / scale
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", origin="upper",
                       extent=(0.5, n + 0.5, n + 0.5, 0.5))
        ax.set_facecolor("0.92")
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(c + 1, r + 1, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if v < np.nanmean(grid) else "black")
        ax.set_xticks(range(1, n + 1))
        ax.set_yticks(range(1, n + 1))
        ax.set_xlabel("w_crop (tiles across)")
        ax.set_ylabel("h_crop (tiles down)")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    fig.suptitle(f"{sweep.label} {sweep.mode}: tokens and cost per crop grid\n{subtitle(sweep)}", fontsize=11)
    _finish(fig, f"Grey: grids the layout never produces (w_crop*h_crop > {sweep.params['max_num']}). "
                       "Cell 1x1: no crops (page within 640x640 px). " + _CONVENTION + ".")
    return _save(fig, base)


# ---- page sweeps -----------------------------------------------------------------------

def cost_vs_aspect(sweep, base: str) -> list[str]:
    """Image tokens and cost vs aspect W/H, coloured by the chosen grid; switches marked when 1-D."""
    aspect = sweep.columns["width"] / sweep.columns["height"]
    if "tiled" in sweep.columns:
        grid = np.where(sweep.columns["tiled"], np.char.add(np.char.add(sweep.columns["w_crop"].astype(str), "x"),
                                                            sweep.columns["h_crop"].astype(str)), "no crops")
    else:  # a model without a layout runs every page alike (resized to one view)
        grid = np.full(len(aspect), "one view")
    n_pages = len(aspect)
    one_d = bool(sweep.params.get("curve")) and len(np.unique(aspect)) == n_pages  # one series along the aspect
    names_col = sweep.columns.get("page")
    labels = None  # few named pages: name the points, one label per cluster of coinciding points
    if names_col is not None and n_pages <= 60:
        groups: dict = {}
        for k, (name, g) in enumerate(zip(names_col.tolist(), grid.tolist())):
            groups.setdefault((round(float(np.log10(aspect[k])), 2), g), []).append((k, name))
        labels = []
        for (_, g), members in groups.items():
            text = ", ".join(name for _, name in members)
            labels.append((members[0][0], (text if len(text) <= 60 else text[:57] + "...") + f" [{g}]"))
        labels.sort(key=lambda kl: aspect[kl[0]])
    tokens = "image_tokens" if "image_tokens" in sweep.columns else "tokens"
    series = [(tokens.replace("_", " ") + " (slots)", sweep.columns[tokens], 1.0, tokens.replace("_", " "))]
    for metric in sweep.metrics:
        t = total(sweep, metric)
        scale, label = scaled(metric, t)
        series.append((f"{metric_label(metric)}: {total_name(sweep)}", t, scale, label))
    if n_pages > 20_000:
        # Every value is a function of the grid alone, so one point per (grid, aspect bin of
        # 1/2000 decade, far below a pixel) draws the same picture.
        codes = np.unique(grid, return_inverse=True)[1].ravel()
        bins = np.round(np.log10(aspect) * 2000).astype(np.int64)
        keep = np.sort(np.unique(np.stack([bins, codes]), axis=1, return_index=True)[1])
        aspect, grid = aspect[keep], grid[keep]
        series = [(t, v[keep], sc, lab) for t, v, sc, lab in series]
    order = np.argsort(aspect, kind="stable")
    names = list(dict.fromkeys(grid[order]))
    colors = _grid_colors(names)
    fig, axes = plt.subplots(len(series), 1, figsize=(12, 3.6 * len(series)), sharex=True, squeeze=False, layout="constrained")
    small = len(aspect) <= 2000
    for ax, (title, values, scale, label) in zip(axes[:, 0], series):
        for g in names:
            sel = grid == g
            ax.scatter(aspect[sel], values[sel] / scale, s=14 if small else 2, color=colors[g], label=g,
                       rasterized=not small, linewidths=0)
        if one_d:
            ax.plot(aspect[order], values[order] / scale, color="0.6", lw=0.6, zorder=0)
            switches = np.nonzero(grid[order][1:] != grid[order][:-1])[0]
            for k in switches:
                ax.axvline(np.sqrt(aspect[order][k] * aspect[order][k + 1]), color="0.6", lw=0.7, ls=":")
            if ax is axes[0, 0] and len(switches) < 40:  # name each segment's grid once
                bounds = np.concatenate([[0], switches + 1, [len(order)]])
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    seg = order[lo:hi]
                    ax.annotate(grid[seg[0]], (np.sqrt(aspect[seg[0]] * aspect[seg[-1]]), values[seg].max() / scale),
                                xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        if labels is not None and ax is axes[0, 0]:  # numbered points, names in a key beside the plot
            for n, (k, _) in enumerate(labels, 1):
                ax.annotate(str(n), (aspect[k], values[k] / scale), xytext=(0, 5 + 9 * (n % 2)),
                            textcoords="offset points", fontsize=7, ha="center")
            ax.text(1.01, 0.0, "\n".join(f"{n}: {text}" for n, (_, text) in enumerate(labels, 1)),
                    transform=ax.transAxes, fontsize=6.5, va="bottom", ha="left", family="monospace")
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.15)
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax = axes[-1, 0]
    ticks = [t for t in (1 / 16, 0.125, 0.25, 1 / 3, 0.5, 0.75, 1, 1.5, 2, 3, 4, 8, 16)
             if aspect.min() * 0.9 <= t <= aspect.max() * 1.1]
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
    for name, a in (("A4 portrait", 210 / 297), ("A4 landscape", 297 / 210), ("16:9", 16 / 9)):
        if aspect.min() <= a <= aspect.max():
            for axx in axes[:, 0]:
                axx.axvline(a, color="tab:red", lw=0.7, alpha=0.4, ls="--")
            axes[-1, 0].annotate(name, (a, 0), xycoords=("data", "axes fraction"), xytext=(2, 3),
                                 textcoords="offset points", fontsize=7, color="tab:red", rotation=90,
                                 va="bottom")
    ax.set_xlabel("page aspect ratio W/H (log scale; <1 portrait, >1 landscape)")
    axes[0, 0].legend(title="grid chosen", fontsize=7, title_fontsize=8, ncol=1 if len(names) < 12 else 2,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1 if small else 4)
    src = sweep.params.get("source", "pages")
    fig.suptitle(f"{sweep.label} {sweep.mode}: tokens and cost vs page aspect ratio ({n_pages:,} pages, {src})\n"
                 f"{subtitle(sweep)}", fontsize=11)
    note = "Dotted lines: grid switches. " if one_d else \
        "At one aspect the grid can also depend on the page's area (no crops within 640x640 px; equal-aspect ties). "
    _finish(fig, note + _CONVENTION + ".")
    return _save(fig, base)


def plots_for(sweep, out_dir: str) -> list[str]:
    if sweep.kind == "grids":
        return (cost_vs_crops(sweep, os.path.join(out_dir, "cost_vs_crops"))
                + crop_heatmap(sweep, os.path.join(out_dir, "crop_heatmap")))
    return cost_vs_aspect(sweep, os.path.join(out_dir, "cost_vs_aspect"))
