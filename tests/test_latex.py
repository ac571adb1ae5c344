"""The LaTeX that `formula --latex` and `table --format latex` print compiles with pdflatex in a plain
article with only the preamble they print (`% needs: ...`), and nothing overflows the page: no
"Overfull \\hbox" in the log. Several outputs go in one document, so the test stays short.

Without pdflatex the compiling tests skip with the reason, except under CI (CI=true), where they fail:
.ci/run installs Debian's texlive-latex-base and texlive-latex-recommended.
"""
import os
import re
import shutil
import subprocess

import pytest

from costgraph import symbols as S
from costgraph.cost import METRICS
from costgraph.render import TEXT_WIDTH

# every form kind, symbolic and per mode, short and long (e2e), sums, peaks (a max of candidates), ViT
FORMULAS = [
    ("--form", "general", "--scope", "vision"),                               # floors, ceilings, [w h > 1]
    ("--form", "simplified", "--scope", "vision"),
    ("--form", "simplified", "--scope", "vision", "--grid-multiple", "4"),   # keeps the window ceilings
    ("--form", "general", "--scope", "e2e"),                                  # the longest
    ("--form", "simplified", "--scope", "e2e"),
    ("--form", "simplified", "--scope", "decoder.decode", "--metric", "elementwise_flops"),
    ("--form", "simplified", "--scope", "vision", "--metric", "bytes", "--dtype", "all"),
    ("--form", "general", "--mode", "gundam", "--scope", "e2e"),
    ("--form", "simplified", "--mode", "gundam", "--scope", "vision"),
    ("--form", "simplified", "--mode", "gundam", "--scope", "e2e", "--metric", "bytes"),
    ("--form", "coefficients", "--mode", "gundam", "--scope", "e2e"),
    ("--form", "coefficients", "--mode", "gundam", "--scope", "decoder", "--metric", "elementwise_flops"),
    ("--form", "general", "--mode", "gundam", "--scope", "vision", "--metric", "bytes_written"),  # a cases factor
    ("--form", "general", "--mode", "gundam", "--scope", "decoder", "--metric", "elementwise_flops"),
    ("--form", "simplified", "--mode", "gundam", "--scope", "e2e", "--metric", "peak_activation_bytes"),
    ("--form", "coefficients", "--mode", "gundam", "--scope", "e2e", "--metric", "peak_activation_bytes"),
    ("--form", "general", "--mode", "gundam", "--scope", "vision", "--metric", "peak_activation_bytes"),
    ("--form", "general", "--mode", "tiny", "--scope", "vision", "--metric", "peak_activation_bytes"),
    ("--form", "simplified", "--mode", "tiny", "--scope", "e2e", "--metric", "kv_cache_bytes"),
    ("--model", "vit", "--form", "general"),
    ("--model", "vit", "--form", "simplified", "--metric", "peak_activation_bytes"),
    ("--model", "vit", "--form", "coefficients", "--mode", "vit-b16-224", "--metric", "bytes"),
]


@pytest.fixture(scope="module")
def pdflatex():
    path = shutil.which("pdflatex")
    if path is None:
        reason = "no pdflatex (Debian: apt-get install texlive-latex-base texlive-latex-recommended)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must compile the LaTeX: {reason}")
        pytest.skip(reason)
    return path


def split_output(out: str) -> tuple[list[str], list[str]]:
    """(preamble lines, LaTeX blocks): `% needs: X` lines, and the runs of lines between comments."""
    preamble = [l[len("% needs: "):] for l in out.splitlines() if l.startswith("% needs: ")]
    blocks, cur = [], []
    for line in out.splitlines() + ["%"]:
        if line.startswith("%") or not line.strip():
            if cur:
                blocks.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    return preamble, blocks


def compile_tex(pdflatex, tmp_path, preamble, body, options="") -> str:
    """The log of compiling an article with `preamble` and `body`; fails on an error."""
    src = "\n".join([rf"\documentclass[{options}]{{article}}", *dict.fromkeys(preamble), r"\begin{document}", body,
                     r"\end{document}", ""])
    (tmp_path / "t.tex").write_text(src)
    r = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    log = (tmp_path / "t.log").read_text(errors="replace")
    errors = [l for l in log.splitlines() if l.startswith("!")]
    assert r.returncode == 0 and not errors, f"pdflatex failed: {errors[:3]}\n{r.stdout[-2000:]}"
    return log


def overfull(log: str, box: str = "hbox") -> list[str]:
    """Each overfull box (too wide; vbox: too tall) with the display or table it is in (the log's last
    `PART` mark before it)."""
    out, part = [], None
    for line in log.splitlines():
        m = re.match(r"PART (.*)", line)
        if m:
            part = m.group(1)
        if line.startswith(f"Overfull \\{box}"):
            out.append(f"{part}: {line}")
    return out


TALL = "pt tall, likely more than a page"


def test_every_formula_form_compiles_and_fits_the_page(cli, pdflatex, tmp_path):
    """No form is wider than the page; none is taller than a page unless its output says so."""
    preamble, body, tall = [], [], []
    for argv in FORMULAS:
        code, out, err = cli("formula", *argv, "--latex")
        assert code == 0, err
        needs, blocks = split_output(out)
        assert needs, f"{argv}: no preamble printed"
        assert blocks and not any(r"\mathbb" in b for b in blocks)
        preamble += needs
        if TALL in out:
            tall.append(" ".join(argv))
        body += [r"\clearpage" + rf"\typeout{{PART {' '.join(argv)}}}" + "\n" + rf"\[{b}\]" for b in blocks]
    log = compile_tex(pdflatex, tmp_path, preamble, "\n\n".join(body))
    assert overfull(log) == []
    assert [o for o in overfull(log, "vbox") if o.split(":")[0] not in tall] == []
    assert "--form general --scope e2e" in tall   # the longest form: 2 pages


def test_a_form_taller_than_a_page_breaks_across_pages_as_its_note_says(cli, pdflatex, tmp_path):
    """The note's advice: align* (with \\allowdisplaybreaks) for aligned, outside a display."""
    code, out, _ = cli("formula", "--form", "general", "--scope", "e2e", "--latex")
    assert code == 0 and TALL in out
    needs, (block,) = split_output(out)
    block = block.replace(r"\begin{aligned}", r"\begin{align*}").replace(r"\end{aligned}", r"\end{align*}")
    log = compile_tex(pdflatex, tmp_path, needs + [r"\allowdisplaybreaks"], block)
    assert overfull(log) == [] and overfull(log, "vbox") == []


def test_a_narrower_text_width_fits_a_two_column_page(cli, pdflatex, tmp_path):
    """--text-width 229: a column of the article class's twocolumn layout."""
    preamble, body = [], []
    for argv in FORMULAS[3:5] + FORMULAS[7:9] + FORMULAS[14:15]:
        code, out, err = cli("formula", *argv, "--latex", "--text-width", "229")
        assert code == 0, err
        needs, blocks = split_output(out)
        preamble += needs
        body += [rf"\typeout{{PART {' '.join(argv)}}}" + "\n" + rf"\[{b}\]" for b in blocks]
    log = compile_tex(pdflatex, tmp_path, preamble, "\n\n".join(body), "twocolumn")
    assert overfull(log) == []


@pytest.mark.parametrize("argv", [(), ("--model", "vit"), ("--rows", "gundam:3x3,gundam:4x2", "--scale", "1")])
def test_every_booktabs_table_compiles_and_fits_the_page(cli, pdflatex, tmp_path, argv):
    """The default rows, every metric (one table each); ViT's; exact values (the widest cells)."""
    code, out, err = cli("table", "--format", "latex", *argv)
    assert code == 0, err
    assert out.startswith("% needs: ")
    needs, _ = split_output(out)
    body = out.replace(r"\begin{table}", r"\clearpage\typeout{PART table}\begin{table}")
    log = compile_tex(pdflatex, tmp_path, needs, body)
    assert overfull(log) == []
    assert out.count(r"\begin{table}") == len(METRICS)


def test_the_default_width_is_the_article_text_width(pdflatex, tmp_path):
    log = compile_tex(pdflatex, tmp_path, [], r"\typeout{TEXTWIDTH \the\textwidth}")
    assert f"TEXTWIDTH {TEXT_WIDTH:g}.0pt" in log


# ---- without TeX: what is printed ----------------------------------------------------------------

def test_formula_latex_prints_its_preamble_and_a_symbol_legend(cli):
    code, out, _ = cli("formula", "--scope", "e2e", "--latex")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == r"% needs: \usepackage{amsmath}"
    legend = [l for l in lines if l.startswith("%   ")]
    for name in ("base_size", "image_size", "patch_size", "downsample_ratio", "w_crop", "h_crop",
                 "text_tokens", "output_tokens"):   # every symbol of the e2e form, with its words
        tex, doc = S.SYMBOLS[name].latex, S.SYMBOLS[name].doc
        assert any(l.endswith(f" = {name}: {doc}") for l in legend), name
    assert any(l.startswith(r"%   S_{\mathrm{base}} = base_size: side of the global view") for l in legend)
    assert r"%   T_{\mathrm{text}} = text_tokens: " in out and r"%   N_{\mathrm{out}} = output_tokens: " in out
    assert r"%   p = patch_size: " in out and r"%   r_{\mathrm{ds}} = downsample_ratio: " in out
    assert r"%   \mathrm{flops}_{\mathrm{e2e}} = flops[e2e]: " in out
    # the general form shows the no-crop factor: the legend says what the bracket means
    code, out, _ = cli("formula", "--form", "general", "--scope", "vision", "--latex")
    assert r"%   [w_{\mathrm{crop}} h_{\mathrm{crop}} > 1] = crops_run: Iverson bracket" in out


def test_a_model_legend_has_its_own_words_for_a_shared_symbol(cli):
    """ViT and DeepSeek-OCR both declare image_size: each legend uses its own model's words."""
    _, vit, _ = cli("--model", "vit", "formula", "--latex")
    _, ocr, _ = cli("formula", "--form", "general", "--scope", "vision.crops", "--latex")
    assert "%   S = image_size: side of the square input image, px" in vit
    assert r"%   S_{\mathrm{crop}} = image_size: side of a crop tile" in ocr


def test_wide_forms_break_into_lines_and_text_width_0_keeps_one(cli):
    _, wide, _ = cli("formula", "--scope", "e2e", "--latex")
    _, one, _ = cli("formula", "--scope", "e2e", "--latex", "--text-width", "0")
    _, wide_blocks = split_output(wide)
    _, one_blocks = split_output(one)
    assert wide_blocks[0].startswith(r"\begin{aligned}") and wide_blocks[0].count(r"\\") >= 5
    assert "\n" not in one_blocks[0] and r"\begin{aligned}" not in one_blocks[0]
    # the same terms: only the breaks and the fixed-size parentheses differ
    norm = lambda t: re.sub(r"\\(left|right|bigl|bigr|Bigl|Bigr|biggl|biggr)|\\begin\{aligned\}|\\end\{aligned\}|"
                            r"\\phantom\{\\text\{for \}\}|\\ |\\\\|&|\\quad|\\qquad|\{\}|\s", "", t)
    assert norm(wide_blocks[0]) == norm(one_blocks[0])


@pytest.mark.parametrize("argv", [["formula", "--latex", "--text-width", "-1"],
                                  ["formula", "--latex", "--text-width", "nan"],
                                  ["table", "--format", "latex", "--text-width", "-5"]])
def test_bad_text_width_exits_2(cli, argv):
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1
    assert "--text-width must be a width in pt >= 0" in err


@pytest.mark.parametrize("command", ["formula", "table"])
def test_help_documents_text_width(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "--text-width PT" in out and "345" in out
