"""The sweep figures: what a reader could misread. One colour per branch in every panel, legends over no
data, heatmaps in a grid readable at 100 %, value axes and colour scales from 0 with each range stated,
no label cut short with "...", footnotes true of the model drawn."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from costgraph.app import plots as P  # noqa: E402
from costgraph.app import sweep as SW  # noqa: E402


@pytest.fixture(scope="module")
def grids():
    return SW.sweep_grids("gundam")


@pytest.fixture(scope="module")
def papers():
    labels, w, h = SW.paper_pages()
    return SW.sweep_pages("gundam", w, h, labels=labels, source="paper sizes")


@pytest.fixture(scope="module")
def aspects():
    w, h = SW.aspect_pages(0.25, 4, 200, 1654 * 2339)
    return SW.sweep_pages("gundam", w, h, curve=True)


@pytest.fixture(scope="module")
def vit():
    w, h = SW.range_pages("200:1000:400", "300:600:300")
    return SW.sweep_pages("vit-b16-224", w, h, seq=SW.Sequence("vit"))


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


def test_cost_vs_crops_gives_a_branch_one_colour_in_every_panel(grids):
    fig = P.figure_cost_vs_crops(grids)
    mapping = P.branch_colors(grids)
    seen = {}
    for ax in _data_axes(fig):
        for bars in ax.containers:
            seen.setdefault(bars.get_label(), set()).add(tuple(bars.patches[0].get_facecolor()))
    # bytes panels add "vision (own ops)"; before, that shifted every later branch to another colour
    assert "vision (own ops)" in seen and len(seen) == len(mapping) == 5
    for branch, colours in seen.items():
        assert colours == {to_rgba(mapping[branch])}, branch
    assert len({to_rgba(c) for c in mapping.values()}) == len(mapping)  # distinct branches, distinct colours


def test_cost_vs_crops_legend_covers_no_bar_and_no_title(grids):
    fig = P.figure_cost_vs_crops(grids)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [lg for ax in fig.axes for lg in [ax.get_legend()] if lg is not None] + fig.legends
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in _data_axes(fig):
        assert not box.overlaps(ax.get_window_extent(renderer))
        assert not box.overlaps(ax.title.get_window_extent(renderer))
    assert not box.overlaps(fig._suptitle.get_window_extent(renderer))


def test_crop_heatmap_is_a_grid_readable_at_100_percent(grids, tmp_path):
    paths = P.crop_heatmap(grids, str(tmp_path / "crop_heatmap"))
    with Image.open(paths[0]) as im:
        width, height = im.size
    # before: 5,523 x 857 px, six panels in one row
    assert width <= 2400 and 0.6 <= height / width <= 2.0
    fig = P.figure_crop_heatmap(grids)
    panels = [ax for ax in _data_axes(fig) if ax.images]
    assert len(panels) == 1 + len(grids.metrics)
    rows = {round(ax.get_position().y0, 3) for ax in panels}
    assert len(rows) >= 3
    for ax in panels:
        w_in = ax.get_position().width * fig.get_size_inches()[0]
        assert w_in >= 3.5  # a 9x9 grid of numbers at 8 pt fits
        assert min(t.get_fontsize() for t in ax.texts) >= 8
        # colour scale from 0: bytes read (1.26 to 1.41) no longer spans the whole colour map
        assert ax.images[0].norm.vmin == 0


def test_page_sweep_value_axes_start_at_0_and_state_the_range(papers):
    fig = P.figure_cost_vs_aspect(papers)
    axes = _data_axes(fig)
    assert len(axes) == 1 + len(papers.metrics)
    for ax in axes:
        assert ax.get_ylim()[0] == 0
        values = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if len(c.get_offsets())])
        assert ax.get_ylim()[1] >= values.max()
    flops = next(ax for ax in axes if ax.get_title().startswith("FLOPs"))
    assert "from 5.79 to 5.80 (+0.23 %)" in flops.get_title()  # 2x3 vs 3x2: the whole difference


@pytest.mark.parametrize("which", ["papers", "grids", "aspects", "vit"])
def test_no_label_is_cut_short(which, request):
    sweep = request.getfixturevalue(which)
    figs = [P.figure_cost_vs_crops(sweep), P.figure_crop_heatmap(sweep)] if sweep.kind == "grids" else \
        [P.figure_cost_vs_aspect(sweep)]
    for fig in figs:
        for text in _texts(fig):
            assert "..." not in text and "\u2026" not in text, text


def test_paper_size_key_names_every_page(papers):
    fig = P.figure_cost_vs_aspect(papers)
    key = next(t for t in _texts(fig) if t.startswith("1: "))
    flat = " ".join(key.split())
    for name in ("A3 portrait 150/200/300 dpi", "A6 landscape 150/200/300 dpi", "Tabloid landscape", "Legal"):
        assert name in flat
    assert max(len(line) for line in key.splitlines()) <= P.KEY_WIDTH


def test_few_grids_get_distinct_hues():
    """The 9 grids of an aspect sweep: tab10's hues, not tab20's dark/pale pairs (2x3 and 3x2 alike)."""
    colours = P._palette([f"g{k}" for k in range(9)])
    assert list(colours.values()) == [plt.get_cmap("tab10")(k) for k in range(9)]
    assert len(P._palette([f"g{k}" for k in range(30)])) == 30


def test_footnote_is_true_of_the_model(vit, aspects):
    note = P.figure_cost_vs_aspect(vit)._supxlabel.get_text()
    assert "640x640" not in note and "no crop layout" in note
    assert "grid switches" in P.figure_cost_vs_aspect(aspects)._supxlabel.get_text()


def test_activation_bytes_is_said_to_be_a_sum_not_a_peak(grids, papers):
    for fig in (P.figure_cost_vs_crops(grids), P.figure_crop_heatmap(grids), P.figure_cost_vs_aspect(papers)):
        titles = [ax.get_title() for ax in _data_axes(fig) if "activation bytes" in ax.get_title()]
        assert titles and all("not memory held at once" in t for t in titles)
