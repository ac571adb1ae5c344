"""The README's shown outputs are fresh: every `$ costgraph` block is marked, the fast ones (`run`) print today
exactly what the README shows (numbers that depend on the machine masked), and a stale number is caught.
The commands run once per process (`costgraph.app.readme.run_command` memoises), so the tests after the first
re-check copies for free. The `slow` blocks (full verifications, the benchmark) are not run here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from costgraph.app import readme

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def text():
    return README.read_text()


@pytest.fixture(scope="module")
def checked(text):
    return readme.check(text, str(README))


def test_fast_blocks_match_fresh_runs(checked):
    results, skipped = checked
    stale = [f"{r.block.label}: {r.summary}" for r in results if r.stale]
    assert not stale, "README outputs are stale; run `python -m costgraph.app.readme --write`:\n" + "\n".join(stale)
    labels = " | ".join(r.block.label for r in results)
    # the blocks that must stay in the check (a table, a formula, a sweep, the roofline markdown)
    for needed in ("costgraph table", "costgraph formula", "costgraph sweep", "costgraph roofline"):
        assert needed in labels
    # the CPU verifications (one runs the full-size language model) and the benchmark are never run here
    slow = " | ".join(b.label for b in skipped)
    assert "--device cpu" not in labels and "costgraph bench" not in labels
    assert "verify --scope e2e" in slow and "costgraph bench" in slow


def test_every_output_block_is_marked_and_the_synopsis_matches_the_parser(text):
    blocks = readme.parse(text, str(README))
    shown = sum(line.startswith("$ costgraph") for line in text.split("\n"))
    assert sum(len(b.commands) for b in blocks if not b.inline) == shown
    assert readme.synopsis_problems(text) == []


def _corrupt(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_a_stale_exact_number_is_caught_and_rewritten(text, checked, tmp_path, capsys):
    # the gundam 2x3 row of the table, one digit off
    row = next(line for line in text.split("\n") if line.startswith("| gundam | 2x3 |"))
    bad = _corrupt(text, row, row.replace("903", "904"))
    copy = tmp_path / "README.md"
    copy.write_text(bad)
    assert readme.main(["--check", "--readme", str(copy)]) == 1
    out = capsys.readouterr().out
    stale = [line for line in out.splitlines() if ": stale: " in line]
    assert len(stale) == 1 and "costgraph table" in stale[0] and "904" in stale[0] and "903" in stale[0]
    assert copy.read_text() == bad  # --check writes nothing
    assert readme.main(["--write", "--readme", str(copy)]) == 0
    assert copy.read_text() == text
    assert not list(tmp_path.glob(".tmp-*"))


def test_machine_numbers_are_masked_but_exact_ones_in_the_same_block_are_not(text, tmp_path):
    sweep = next(line for line in text.split("\n") if " layout + tokens + " in line and " written in " in line)
    seconds = re.sub(r"\d+\.\d+ s\b", "98,765.4321 s", sweep)
    assert seconds.count("98,765.4321 s") == 2
    timed = _corrupt(text, sweep, seconds)
    results, _ = readme.check(timed, only="costgraph sweep")
    assert [r.stale for r in results] == [False]
    # an exact number of the same block: the 2x3 grid's image tokens
    row = next(line for line in text.split("\n") if line.startswith("2x3 ") and " T " in line)
    results, _ = readme.check(_corrupt(text, row, row.replace(" 903 ", " 913 ")), only="costgraph sweep")
    assert [r.stale for r in results] == [True] and "913" in results[0].summary


def test_a_stale_markdown_output_and_a_concurrent_edit(text):
    line = next(line for line in text.split("\n") if line.startswith("| h200 |"))
    bad = _corrupt(text, line, line.replace("| 141 |", "| 142 |"))
    results, _ = readme.check(bad, only="costgraph roofline")
    assert [r.stale for r in results] == [True]
    # the file changed elsewhere while the commands ran: the rewrite keeps that edit
    edited = bad.replace("## Verification", "## Verification (edited meanwhile)")
    fixed = readme.rewrite(edited, results)
    assert fixed == text.replace("## Verification", "## Verification (edited meanwhile)")


def test_elided_output_keeps_its_shape():
    fresh = [f"row {k}" for k in range(10)]
    assert readme.compare(["row 0", "row 1", "...", "row 9"], fresh, {}) is None
    assert readme.compare(["row 0", "row 1", "..."], fresh, {}) is None
    assert "shown 'row 2'" in readme.compare(["row 0", "row 2", "..."], fresh, {})
    assert readme.compare(["row 0", "...", "row 8"], fresh, {}) is not None
    assert readme._elided(["row 0", "changed", "...", "x"], fresh) == ["row 0", "row 1", "...", "row 9"]


def test_the_masks():
    masked = readme.mask_lines(["gundam: 22 grids, 7 scopes x 5 metrics in 3.647 s; written in 10.3s:",
                                "2x3 grid, 903 image tokens, peak RSS 3,274 MiB, 48,191,191x faster, 105.7 ns/layout"],
                               {"machine": [""]})
    assert masked == ["gundam: 22 grids, 7 scopes x 5 metrics in #; written in #:",
                      "2x3 grid, 903 image tokens, peak RSS #, # faster, #/layout"]
    table = ["case       nodes  status     s",
             "---------  -----  ------  ----",
             "tiny 512     211      ok  0.37",
             "",
             "run time 35.0 s"]
    wider = ["case       nodes  status      s",
             "---------  -----  ------  -----",
             "tiny 512     211      ok  10.37",
             "",
             "run time 135.0 s"]
    options = {"machine": [""], "column": ["s"]}
    assert readme.compare(table, wider, options) is None
    assert readme.compare(table, [w.replace("211", "212") for w in wider], options) is not None
    assert readme.mask_lines(["slowest 4.17 s (None e2e peak general); ok"], {"mask": [r"slowest .*?\)"]}) == ["#; ok"]


def test_bad_readmes_are_refused(tmp_path, capsys):
    unmarked = "# x\n\n```text\n$ costgraph layout --size 100x100\nsomething\n```\n"
    with pytest.raises(readme.ReadmeError, match="without a .* marker"):
        readme.parse(unmarked)
    for body, message in [("<!-- readme: run, fast -->\n```text\n$ costgraph bench\n```\n", "unknown marker option"),
                          ("<!-- readme: machine -->\n```text\n$ costgraph bench\n```\n", "either `run` or `slow`"),
                          ("<!-- readme: run $ costgraph bench -->\n| a |\n", "no `<!-- readme: end -->`"),
                          ("<!-- readme: run -->\n```text\n$ costgraph bench\n", "never closed")]:
        with pytest.raises(readme.ReadmeError, match=message):
            readme.parse(body)
    path = tmp_path / "README.md"
    path.write_text(unmarked)
    assert readme.main(["--check", "--readme", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert readme.main(["--check", "--readme", str(tmp_path / "missing.md")]) == 2


def test_a_synopsis_that_shows_a_defaulted_option_as_required_is_caught():
    synopsis = ("```text\n"
                "costgraph formula [--mode MODE] --metric flops --scope vision [--latex]\n"
                "costgraph layout --size 1654x2339 [--size WxH ...] [--bogus]\n"
                "costgraph --version\n"
                "```\n")
    problems = readme.synopsis_problems(synopsis)
    assert len(problems) == 3
    assert "--metric is shown required" in problems[0] and "--scope is shown required" in problems[1]
    assert "--bogus is not an option" in problems[2]


def test_a_failing_command_makes_its_block_stale():
    block = "<!-- readme: run -->\n```text\n$ costgraph layout --size 0x5\nwhatever\n```\n"
    results, _ = readme.check(block)
    assert results[0].stale and "exited 2" in results[0].summary
    assert results[0].fresh == ["$ costgraph layout --size 0x5", "whatever"]  # a rewrite would keep it
