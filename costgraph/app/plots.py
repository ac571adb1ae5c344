"""Figures of a sweep (matplotlib, Agg backend; PNG and SVG).

- cost_vs_crops: every crop grid, cost stacked by branch (vision global view, vision crops,
  decoder prefill, decoder decode: the leaf scopes), grouped by number of crops.
- crop_heatmap: image tokens and total cost over (w_crop, h_crop).
- cost_vs_aspect: image tokens and cost of pages against their aspect ratio, coloured by the
  grid the layout rule chose, so the grid switches show.
Branches, totals and metrics come from the sweep (its scopes and `METRICS`), never a fixed list.

What a reader must not misread: a branch keeps one colour in every panel (`branch_colors`), legends sit
outside the data, value axes and colour scales start at 0 (a difference of 0.2 % looks like 0.2 %; each
page-sweep panel states its range), labels are never cut short, and a figure is laid out to be read at
100 % (panels in a grid, never one long row).
"""
from __future__ import annotations

import io
import os
import re
import textwrap
from dataclasses import fields

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
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
# said beside a metric whose name could be misread
_METRIC_NOTES = {"activation_bytes": "sum of every op's output bytes, not memory held at once "
                                     "(peak: costgraph cost --metrics activations)"}


def metric_note(metric: str) -> str:
    """'\n(what it is)' for a metric whose name could be misread, else ''."""
    note = _METRIC_NOTES.get(metric)
    return f"\n({note})" if note else ""


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
    lm = model.lm_scope
    if lm and any(s.startswith(lm) or s in sweep.composites for s in sweep.scopes):
        v = p.get("variants") or {}
        parts.append(f"text_tokens={p['text_tokens']}, output_tokens={p['output_tokens']}"
                     + (", " + " ".join(f"{k}={x}" for k, x in v.items()) if v else ""))
    return "; ".join(parts)


_CONVENTION = "FLOPs in torch's convention: 2 per multiply-add, matmul-class ops (linear, conv, bmm, einsum, attention)"


DPI = 150
FORMATS = ("png", "svg")


def _save(fig, base: str, done=None) -> list[str]:
    """The figure as `base`.png and .svg; `done(path)` after each file (the progress bar)."""
    paths = []
    try:
        for ext in FORMATS:
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=DPI, bbox_inches="tight")
            path = f"{base}.{ext}"
            write_atomic(path, buf.getvalue())
            paths.append(path)
            if done is not None:
                done(path)
    finally:
        plt.close(fig)
    return paths


def _palette(names: list[str]) -> dict[str, tuple]:
    """Distinct colours: tab10 for up to 10 names (no two shades of one hue), else tab20, then Set2."""
    if len(names) <= 10:
        cmap = plt.get_cmap("tab10")
        return {g: cmap(k) for k, g in enumerate(names)}
    cmap = plt.get_cmap("tab20")
    extra = plt.get_cmap("Set2")
    return {g: (cmap(k) if k < 20 else extra((k - 20) % 8)) for k, g in enumerate(names)}


def branch_colors(sweep) -> dict[str, tuple]:
    """One colour per branch for every panel: the branches of all the sweep's metrics (a metric can add a
    parent's own ops, e.g. bytes of `vision (own ops)`), in scope order, coloured once."""
    names: list[str] = []
    for metric in sweep.metrics:
        names += [b for b in branches(sweep, metric) if b not in names]
    order = {s: k for k, s in enumerate(sweep.scopes)}
    names.sort(key=lambda b: order.get(b.removesuffix(" (own ops)"), len(order)))
    return _palette(names)


def _span(values: np.ndarray) -> str:
    """'from 5.790 to 5.803 (+0.24 %)': a panel's range, with digits enough to tell the ends apart."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if lo == hi:
        return f"all {lo:,.4g}"
    for digits in range(0, 7):
        a, b = f"{lo:,.{digits}f}", f"{hi:,.{digits}f}"
        if a != b and len(re.sub(r"\D", "", a).lstrip("0")) >= 3:
            break
    rel = "" if lo <= 0 else f" (+{100 * (hi / lo - 1):.2g} %)" if hi < 2 * lo else f" (x{hi / lo:.2g})"
    return f"from {a} to {b}{rel}"


def _join_names(names: list[str]) -> str:
    """Page names of one point, shortest first: 'A4 portrait 150dpi', 'A4 portrait 200dpi' become
    'A4 portrait 150/200 dpi'; other names are listed whole."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = re.fullmatch(r"(.*) (\d+)dpi", name)
        groups.setdefault(m.group(1) if m else name, []).append(m.group(2) if m else "")
    return ", ".join(k + (" " + "/".join(d) + " dpi" if all(d) else "") for k, d in groups.items())


# ---- grid sweeps -----------------------------------------------------------------------

def cost_vs_crops(sweep, base: str, done=None) -> list[str]:
    return _save(figure_cost_vs_crops(sweep), base, done)


def figure_cost_vs_crops(sweep):
    """Stacked bars per grid, grouped by number of crops; the no-crop 1x1 layout first. One colour per
    branch in every panel, one legend above the panels (never over the bars)."""
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
    colors = branch_colors(sweep)
    # the first row holds the legend only: above the panels, over no bar and no title
    fig, axes = plt.subplots(len(metrics) + 1, 1, figsize=(13, 0.7 + 4.6 * len(metrics)), squeeze=False,
                             layout="constrained", height_ratios=[0.7] + [4.6] * len(metrics))
    key, axes = axes[0, 0], axes[1:]
    key.axis("off")
    for ax, metric in zip(axes[:, 0], metrics):
        parts = branches(sweep, metric)
        if nc:
            parts = {b: np.concatenate([[_no_crop_value(nc, b, metric)], v[order]]) for b, v in parts.items()}
        else:
            parts = {b: v[order] for b, v in parts.items()}
        whole = sum(parts.values())
        scale, ylabel = scaled(metric, whole)
        bottom = np.zeros(len(x))
        for b, v in parts.items():
            ax.bar(x, v / scale, 0.8, bottom=bottom, label=b, color=colors[b], edgecolor="white", linewidth=0.5)
            bottom += v / scale
        top = bottom.max()
        for xi, t, tok in zip(x, bottom, tokens):
            ax.text(xi, t + top * 0.01, f"{t:,.{1 if top >= 10 else 2}f}", ha="center", va="bottom", fontsize=7,
                    rotation=90)
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
        ax.set_title(f"{metric_label(metric)} per page by branch vs crop grid{metric_note(metric)}", fontsize=11)
    fig.suptitle(f"{sweep.label} {sweep.mode}: cost of one page vs crop grid\n{subtitle(sweep)}", fontsize=11)
    key.legend(handles=[Patch(facecolor=c, label=b) for b, c in colors.items()], loc="center",
               ncols=min(len(colors), 6), fontsize=9, title_fontsize=9, frameon=False,
               title=f"branch, same colour in every panel (stacked from the bottom in this order; "
                     f"bar label: total, {total_name(sweep)})")
    _finish(fig, _CONVENTION + ". 1x1: a page within 640x640 px, global view only.")
    return fig


def _no_crop_value(nc: dict, branch: str, metric: str) -> int:
    totals = nc["totals"]
    if branch in totals:
        return totals[branch][metric]
    scope = branch.removesuffix(" (own ops)")
    kids = [c for c in totals if c.rpartition(".")[0] == scope]
    return totals[scope][metric] - sum(totals[c][metric] for c in kids)


HEATMAP_COLUMNS = 2  # panels per row: the figure is about as wide as the others, readable at 100 %


def crop_heatmap(sweep, base: str, done=None) -> list[str]:
    return _save(figure_crop_heatmap(sweep), base, done)


def figure_crop_heatmap(sweep):
    """Image tokens and the total of each metric over (w_crop, h_crop), panels in rows of HEATMAP_COLUMNS;
    cells the layout never produces are blank. Colour scales start at 0, so a metric that barely changes
    with the grid (bytes read) looks uniform instead of spanning the whole colour map."""
    w, h = sweep.columns["w_crop"], sweep.columns["h_crop"]
    n = int(max(w.max(), h.max()))
    panels = [(None, "image tokens (slots)", sweep.columns["image_tokens"], 1.0, "image tokens", "{:,.0f}")]
    for metric in sweep.metrics:
        t = total(sweep, metric)
        scale, label = scaled(metric, t)
        panels.append((metric, f"{metric_label(metric)}: {total_name(sweep)}", t, scale, label, "{:,.1f}"))
    nc = sweep.no_crop
    cols = min(HEATMAP_COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.6 * cols, 5.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[len(panels):]:
        ax.remove()
    for ax, (metric, title, values, scale, label, fmt) in zip(axes.ravel(), panels):
        grid = np.full((n, n), np.nan)
        grid[h - 1, w - 1] = values / scale
        if nc:
            grid[0, 0] = nc["image_tokens"] if metric is None else \
                sum(_no_crop_value(nc, b, metric) for b in branches(sweep, metric)) / scale
        top = float(np.nanmax(grid)) or 1.0
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", origin="upper", vmin=0, vmax=top,
                       extent=(0.5, n + 0.5, n + 0.5, 0.5))
        ax.set_facecolor("0.92")
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(c + 1, r + 1, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * top else "black")
        ax.set_xticks(range(1, n + 1))
        ax.set_yticks(range(1, n + 1))
        ax.set_xlabel("w_crop (tiles across)")
        ax.set_ylabel("h_crop (tiles down)")
        ax.set_title(f"{title}: {_span(grid[~np.isnan(grid)])}{metric_note(metric)}", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.9, label=label + ", scale from 0")
    fig.suptitle(f"{sweep.label} {sweep.mode}: tokens and cost per crop grid\n{subtitle(sweep)}", fontsize=11)
    _finish(fig, f"Grey: grids the layout never produces (w_crop*h_crop > {sweep.params['max_num']}). "
                       "Cell 1x1: no crops (page within 640x640 px).\n" + _CONVENTION + ".")
    return fig


# ---- page sweeps -----------------------------------------------------------------------

KEY_WIDTH = 64  # characters per line of the point key beside a named page sweep (wrapped, never cut)


def cost_vs_aspect(sweep, base: str, done=None) -> list[str]:
    return _save(figure_cost_vs_aspect(sweep), base, done)


def figure_cost_vs_aspect(sweep):
    """Image tokens and cost vs aspect W/H, coloured by the chosen grid; switches marked when 1-D. Value
    axes start at 0 and each panel's title gives its range: small differences look small."""
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
            labels.append((members[0][0], _join_names([name for _, name in members]) + f" [{g}]"))
        labels.sort(key=lambda kl: aspect[kl[0]])
    tokens = "image_tokens" if "image_tokens" in sweep.columns else "tokens"
    series = [(tokens.replace("_", " ") + " (slots)", sweep.columns[tokens], 1.0, tokens.replace("_", " "), None)]
    for metric in sweep.metrics:
        t = total(sweep, metric)
        scale, label = scaled(metric, t)
        series.append((f"{metric_label(metric)}: {total_name(sweep)}", t, scale, label, metric))
    if n_pages > 20_000:
        # Every value is a function of the grid alone, so one point per (grid, aspect bin of
        # 1/2000 decade, far below a pixel) draws the same picture.
        codes = np.unique(grid, return_inverse=True)[1].ravel()
        bins = np.round(np.log10(aspect) * 2000).astype(np.int64)
        keep = np.sort(np.unique(np.stack([bins, codes]), axis=1, return_index=True)[1])
        aspect, grid = aspect[keep], grid[keep]
        series = [(t, v[keep], sc, lab, m) for t, v, sc, lab, m in series]
    order = np.argsort(aspect, kind="stable")
    names = list(dict.fromkeys(grid[order]))
    colors = _palette(names)
    fig, axes = plt.subplots(len(series), 1, figsize=(12, 3.6 * len(series)), sharex=True, squeeze=False, layout="constrained")
    small = len(aspect) <= 2000
    size = 36 if len(aspect) <= 60 else 14 if small else 2
    for ax, (title, values, scale, label, metric) in zip(axes[:, 0], series):
        for g in names:
            sel = grid == g
            ax.scatter(aspect[sel], values[sel] / scale, s=size, color=colors[g], label=g,
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
            key = []
            for n, (_, text) in enumerate(labels, 1):
                key += textwrap.wrap(f"{n}: {text}", KEY_WIDTH, subsequent_indent="   ", break_on_hyphens=False)
            ax.text(1.01, 0.0, "\n".join(key), transform=ax.transAxes, fontsize=6.5, va="bottom", ha="left",
                    family="monospace")
        ax.set_xscale("log")
        ax.margins(x=0.08)
        ax.set_ylim(0, float(np.max(values)) / scale * 1.15 or 1.0)
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {_span(values / scale)}{metric_note(metric)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax = axes[-1, 0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in (1 / 32, 1 / 16, 0.1, 0.125, 0.2, 0.25, 1 / 3, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 8, 10, 16, 32)
             if lo <= t <= hi]
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ticks, ["1/3" if t == 1 / 3 else f"{t:g}" for t in ticks])
    ax.set_xlim(lo, hi)
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
    if one_d:
        note = "Dotted lines: grid switches. "
    elif "tiled" in sweep.columns:
        note = ("At one aspect the grid can also depend on the page's area (no crops within 640x640 px; "
                "equal-aspect ties). ")
    else:
        note = "This model has no crop layout: every page is resized to its one view. "
    _finish(fig, note + _CONVENTION + ".")
    return fig


def plot_names(sweep) -> list[str]:
    """The figures of a sweep (file stems; each is written as .png and .svg)."""
    return ["cost_vs_crops", "crop_heatmap"] if sweep.kind == "grids" else ["cost_vs_aspect"]


def plots_for(sweep, out_dir: str, done=None) -> list[str]:
    """Every figure of the sweep into out_dir; `done(path)` after each file written."""
    draw = {"cost_vs_crops": cost_vs_crops, "crop_heatmap": crop_heatmap, "cost_vs_aspect": cost_vs_aspect}
    paths = []
    for name in plot_names(sweep):
        paths += draw[name](sweep, os.path.join(out_dir, name), done)
    return paths
