"""The README's shown outputs, regenerated from fresh runs: `python -m costgraph.app.readme --check | --write [--slow]`.

A block this script owns has a marker, an HTML comment on the line just before its fence::

    <!-- readme: run -->
    ```text
    $ costgraph formula --mode gundam --metric bytes --scope vision
    bytes[vision] (gundam) = ...
    ```

The block holds one or more commands, each a line `$ costgraph ARGS` (a trailing `# comment` is kept and not
run) followed by what it prints; commands are separated by a blank line (an output's trailing blank lines are not
compared). A line `...` inside an output elides the lines between: the lines above it must be the first lines of
the fresh output and the lines below it its last ones (one `...` per command). An output shown as markdown (a
table that should render) has the command in its marker and ends at `<!-- readme: end -->`::

    <!-- readme: run $ costgraph roofline --mode gundam --size 1654x2339 --markdown -->
    | hardware | ... |
    <!-- readme: end -->

The marker's options, comma-separated (the command, when there is one, comes last after `$`):

- `run`: the check runs it and every character must match (after the masks below).
- `slow`: too slow for the check (a full verification, the benchmark); run only with `--slow`, and then
  exactly like `run`.
- `machine`: some numbers depend on this machine (seconds, memory, rates). Masked, in the README and in the
  fresh output alike, before comparing: every number followed by a unit of time or memory (`s`, `ms`, `us`,
  `ns`, `KiB`, `MiB`, `GiB`, `KB`, `MB`, `GB`, with or without a space) and every number followed by `x`
  (a speed-up, `48,191,191x faster`, not a grid such as `2x3`). Every other number must match exactly.
- `column=NAME`: in a text table (a header line over a line of dashes, `----  ---`), mask the cells of the
  column headed NAME (verify's `s` column of seconds). Repeat it for more columns.
- `mask=REGEX`: mask what REGEX matches on every line (a machine-dependent name: which form was slowest).

With any of the last three, runs of spaces count as one (a column's width follows its widest, masked, value)
and a masked column's line of dashes counts as one dash.

Commands run in this process through `costgraph.app.cli.main`, stdout captured, each once per process (the
check and a test may ask again for free). A `--out` or `--report` path is replaced by one in a temporary
folder for the run, and that folder's name is written back as the README's path in the output, so a check
writes nothing outside the temporary folder. A command that exits non-zero makes its block stale.

The synopsis under "Commands" (a fenced block of `costgraph ...` lines without `$`) is hand-written; the check
compares its options with the parser (`synopsis_problems`): an option a command lacks, or one shown required
(outside `[...]`) that has a default, is reported like a stale block.

`--check` prints one line per stale block (the first differing line, shown and fresh) and exits 1 if any is
stale; `--write` rewrites the stale blocks in place (the file re-read after the runs, so that another edit made
meanwhile is kept; written atomically). `--only TEXT` keeps the blocks whose commands contain TEXT. Every
`$ costgraph` block of the README must carry a marker: an unmarked one is an error for `--check`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from costgraph.io import write_atomic

MARKER = re.compile(r"^<!--\s*readme:\s*(?P<body>.*?)\s*-->\s*$")
END = "<!-- readme: end -->"
FENCE = "```"
PROMPT = "$ costgraph"
ELISION = "..."
MASK = "#"
KNOWN = ("run", "slow", "machine", "column", "mask")
# a number and a unit of time or memory, or a speed-up factor `12x` (not a grid `2x3`)
_NUM = r"\d[\d,]*(?:\.\d+)?"
MACHINE_NUMBER = re.compile(rf"{_NUM}(?:\s?(?:s|ms|us|ns|KiB|MiB|GiB|KB|MB|GB)\b|x\b)")
DASHES = re.compile(r"^-+(?: +-+)+$|^-+$")
OUT_OPTIONS = ("--out", "--report")


class ReadmeError(ValueError):
    """A README the script cannot read: an unmarked output block, a bad marker, an unclosed block."""


@dataclass
class Command:
    line: str               # the `$ costgraph ...` line as shown (comment included)
    argv: list[str]         # the arguments after `costgraph`
    shown: list[str]        # the output lines as shown (`...` kept)


@dataclass
class Block:
    start: int              # index of the first content line (after the fence or the marker)
    end: int                # index of the closing fence or end marker (exclusive end of the content)
    marker_line: int        # index of the marker line
    options: dict = field(default_factory=dict)
    commands: list[Command] = field(default_factory=list)
    inline: bool = False    # markdown output between the marker and the end marker

    @property
    def slow(self) -> bool:
        return "slow" in self.options

    @property
    def label(self) -> str:
        return "; ".join(" ".join(["costgraph", *c.argv]) for c in self.commands)


@dataclass
class Result:
    block: Block
    stale: bool
    summary: str            # one line: why it is stale, or "ok"
    fresh: list[str]        # the block's content lines as they should be


# ---- parsing --------------------------------------------------------------------------------

def parse_marker(body: str, where: str) -> tuple[dict, str | None]:
    """`run, machine, column=s $ costgraph ...` -> ({option: [values]}, command text or None)."""
    command = None
    m = re.search(r"(?:^|\s)\$\s+(\S.*)$", body)  # ` $ costgraph ...` (a mask's `$` anchor is not followed by a word)
    if m:
        body, command = body[:m.start()], m.group(1).strip()
        if not command.startswith("costgraph"):
            raise ReadmeError(f"{where}: the marker's command must start with `costgraph`: {command!r}")
    parts = re.split(r",\s*(?=(?:%s)\b)" % "|".join(KNOWN), body.strip().rstrip(","))
    options: dict[str, list[str]] = {}
    for part in (p.strip() for p in parts):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in KNOWN or (eq and name not in ("column", "mask")) or (name in ("column", "mask") and not eq):
            raise ReadmeError(f"{where}: unknown marker option {part!r} (known: run, slow, machine, column=NAME, "
                              f"mask=REGEX)")
        options.setdefault(name, []).append(value.strip())
    if ("run" in options) == ("slow" in options):
        raise ReadmeError(f"{where}: a marker says either `run` or `slow`")
    for rx in options.get("mask", []):
        try:
            re.compile(rx)
        except re.error as e:
            raise ReadmeError(f"{where}: bad mask regex {rx!r}: {e}") from None
    return options, command


def _argv(line: str, where: str) -> list[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        raise ReadmeError(f"{where}: cannot split the command: {e}") from None
    if not words or words[0] != "costgraph":
        raise ReadmeError(f"{where}: not a costgraph command: {line!r}")
    return words[1:]


def _commands(lines: list[str], first: int, path: str) -> list[Command]:
    """The `$ costgraph` commands of a block's content and their shown outputs."""
    out: list[Command] = []
    for i, text in enumerate(lines):
        if text.startswith(PROMPT + " ") or text == PROMPT:
            line = text[2:]
            out.append(Command(line, _argv(line, f"{path}:{first + i + 1}"), []))
        elif out:
            out[-1].shown.append(text)
        elif text.strip():
            raise ReadmeError(f"{path}:{first + i + 1}: a marked block starts with `$ costgraph ...`")
    for c in out:
        while c.shown and not c.shown[-1].strip():
            c.shown.pop()
        if c.shown.count(ELISION) > 1:
            raise ReadmeError(f"{path}: `$ {c.line}`: one `...` per output at most")
    return out


def parse(text: str, path: str = "README.md") -> list[Block]:
    """Every marked block; an output block (`$ costgraph` in a fence) without a marker is an error."""
    lines = text.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line.strip())
        if m and m.group("body") != "end":
            where = f"{path}:{i + 1}"
            options, command = parse_marker(m.group("body"), where)
            if command is not None:  # markdown output up to the end marker
                try:
                    end = lines.index(END, i + 1)
                except ValueError:
                    raise ReadmeError(f"{where}: no `{END}` after this marker") from None
                content = lines[i + 1:end]
                shown = list(content)
                while shown and not shown[0].strip():
                    shown.pop(0)
                while shown and not shown[-1].strip():
                    shown.pop()
                cmd = Command(command, _argv(command, where), shown)
                blocks.append(Block(i + 1, end, i, options, [cmd], inline=True))
                i = end + 1
                continue
            if i + 1 >= len(lines) or not lines[i + 1].startswith(FENCE):
                raise ReadmeError(f"{where}: a marker must be followed by a ``` fence (or name its command after `$`)")
            close = _closing_fence(lines, i + 1, path)
            cmds = _commands(lines[i + 2:close], i + 2, path)
            if not cmds:
                raise ReadmeError(f"{where}: the marked block has no `$ costgraph` command")
            blocks.append(Block(i + 2, close, i, options, cmds))
            i = close + 1
            continue
        if line.startswith(FENCE):
            close = _closing_fence(lines, i, path)
            body = lines[i + 1:close]
            if any(b.startswith(PROMPT + " ") or b == PROMPT for b in body):
                raise ReadmeError(f"{path}:{i + 1}: an output block without a `<!-- readme: ... -->` marker "
                                  f"(run, slow; machine)")
            i = close + 1
            continue
        i += 1
    return blocks


def _closing_fence(lines: list[str], opening: int, path: str) -> int:
    for j in range(opening + 1, len(lines)):
        if lines[j].strip() == FENCE:
            return j
    raise ReadmeError(f"{path}:{opening + 1}: the fence is never closed")


# ---- running --------------------------------------------------------------------------------

_OUTPUTS: dict[tuple[str, ...], tuple[int, str, str]] = {}


def run_command(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `costgraph ARGV`, run in this process once (memoised). A `--out` or
    `--report` path goes to a temporary folder; its name in the output is the one asked for."""
    key = tuple(argv)
    if key in _OUTPUTS:
        return _OUTPUTS[key]
    from costgraph.app.cli import main  # the app's command line; imported late (it loads every command)

    tmp = tempfile.mkdtemp(prefix="costgraph-readme-")
    argv = list(argv)
    swaps = []
    for k, a in enumerate(argv[:-1]):
        if a in OUT_OPTIONS:
            original = argv[k + 1]
            moved = os.path.join(tmp, os.path.basename(original.rstrip("/")) or "out")
            argv[k + 1] = moved
            swaps.append((moved, original))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # --help, --version: argparse ends the program itself
                code = e.code if isinstance(e.code, int) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stdout, stderr = out.getvalue(), err.getvalue()
    for moved, original in swaps:
        stdout = stdout.replace(moved, original)
        stderr = stderr.replace(moved, original)
    _OUTPUTS[key] = (code, stdout, stderr)
    return _OUTPUTS[key]


# ---- comparing ------------------------------------------------------------------------------

def mask_lines(lines: list[str], options: dict) -> list[str]:
    """The lines with the block's machine-dependent parts replaced by `#` (see the module's docstring)."""
    lines = _mask_columns(list(lines), options.get("column", []))
    patterns = [re.compile(rx) for rx in options.get("mask", [])]
    machine = "machine" in options or bool(options.get("column")) or bool(patterns)
    out = []
    for line in lines:
        for rx in patterns:
            line = rx.sub(MASK, line)
        if "machine" in options:
            line = MACHINE_NUMBER.sub(MASK, line)
        if machine:
            line = re.sub(r" +", " ", line).strip()
        out.append(line)
    return out


def _mask_columns(lines: list[str], names: list[str]) -> list[str]:
    if not names:
        return lines
    spans: list[tuple[int, int]] = []
    for i, line in enumerate(lines):
        if DASHES.match(line) and i > 0:
            runs = [m.span() for m in re.finditer(r"-+", line)]
            header = lines[i - 1]
            spans = [s for s in runs if header[s[0]:s[1]].strip() in names]
            for a, b in reversed(spans):  # a masked column's width follows its values: one dash
                line = line[:a] + "-" + line[b:]
            lines[i] = line
            continue
        if not line.strip():
            spans = []
        if spans:
            lines[i] = _blank(line, spans)
    return lines


def _blank(line: str, spans: list[tuple[int, int]]) -> str:
    for a, b in spans:
        if a < len(line):
            line = line[:a] + MASK.rjust(min(b, len(line)) - a) + line[b:]
    return line


def compare(shown: list[str], fresh: list[str], options: dict) -> str | None:
    """None when `shown` (the README's lines, `...` allowed) matches `fresh`; else a one-line summary."""
    # masked whole (a table's header sets its columns' masks), then the head and tail around `...` compared
    masked_shown, masked_fresh = mask_lines(shown, options), mask_lines(fresh, options)
    if ELISION in shown:
        k = shown.index(ELISION)
        head, tail = k, len(shown) - k - 1
        if len(fresh) < head + tail:
            return f"{len(fresh)} lines now, fewer than the {head + tail} shown around `...`"
        cut = len(fresh) - tail
        pairs = [(shown[:k], fresh[:head], masked_shown[:k], masked_fresh[:head], 0),
                 (shown[k + 1:], fresh[cut:], masked_shown[k + 1:], masked_fresh[cut:], cut)]
    else:
        pairs = [(shown, fresh, masked_shown, masked_fresh, 0)]
    for a, b, ma, mb, offset in pairs:
        for j, (x, y) in enumerate(zip(ma, mb)):
            if x != y:
                changed = sum(1 for p, q in zip(ma, mb) if p != q) + abs(len(ma) - len(mb))
                at = _first_difference(a[j], b[j])
                return (f"{changed} line(s) differ; output line {offset + j + 1}: shown {_clip(a[j], at)!r}, "
                        f"now {_clip(b[j], at)!r}")
        if len(ma) != len(mb):
            return f"{len(a)} lines shown, {len(b)} now"
    return None


def _first_difference(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _clip(s: str, at: int = 0, n: int = 60) -> str:
    """`s` cut to about `n` characters around position `at` (where it differs)."""
    if len(s) <= n:
        return s
    start = max(0, min(at - n // 3, len(s) - n))
    return ("..." if start else "") + s[start:start + n] + ("..." if start + n < len(s) else "")


def _elided(shown: list[str], fresh: list[str]) -> list[str]:
    """The fresh lines shown the way the README shows them: the same head and tail around `...`."""
    if ELISION not in shown:
        return fresh
    k = shown.index(ELISION)
    head, tail = k, len(shown) - k - 1
    if len(fresh) <= head + tail:
        return fresh
    return fresh[:head] + [ELISION] + (fresh[len(fresh) - tail:] if tail else [])


def check_block(block: Block) -> Result:
    stale, why, content = False, "ok", []
    for n, cmd in enumerate(block.commands):
        code, stdout, stderr = run_command(cmd.argv)
        fresh = stdout.split("\n")
        while fresh and not fresh[-1].strip():
            fresh.pop()
        if code != 0:
            stale = True
            why = f"`costgraph {' '.join(cmd.argv)}` exited {code}: {_clip(stderr.strip().splitlines()[-1] if stderr.strip() else '')}"
            shown = cmd.shown
        else:
            problem = compare(cmd.shown, fresh, block.options)
            if problem and not stale:
                stale, why = True, (f"`$ {cmd.line.split('  #')[0].strip()}`: {problem}" if len(block.commands) > 1
                                    else problem)
            shown = _elided(cmd.shown, fresh)
        if block.inline:
            content = [""] + shown + [""]
        else:
            if n:
                content.append("")
            content += ["$ " + cmd.line] + shown
    return Result(block, stale, why, content)


def check(text: str, path: str = "README.md", slow: bool = False, only: str | None = None) -> tuple[list[Result], list[Block]]:
    """(results of the blocks run, blocks skipped as slow)."""
    results, skipped = [], []
    for block in parse(text, path):
        if only and only not in block.label:
            continue
        if block.slow and not slow:
            skipped.append(block)
            continue
        results.append(check_block(block))
    return results, skipped


def rewrite(text: str, results: list[Result], path: str = "README.md") -> str:
    """`text` with the stale blocks' contents replaced. The blocks are found again in `text` (by marker and
    commands), so `text` may be a newer version of the file than the one checked."""
    lines = text.split("\n")
    stale = {(tuple(lines_key(r.block))): r for r in results if r.stale}
    for block in reversed(parse(text, path)):
        r = stale.get(tuple(lines_key(block)))
        if r is not None:
            lines[block.start:block.end] = r.fresh
    return "\n".join(lines)


def lines_key(block: Block):
    return (tuple(sorted((k, tuple(v)) for k, v in block.options.items())), block.inline,
            tuple(c.line for c in block.commands))


# ---- the synopsis ---------------------------------------------------------------------------

def synopsis_problems(text: str, path: str = "README.md") -> list[str]:
    """What the hand-written synopsis (a fenced block of `costgraph ...` lines, no `$`) gets wrong about the
    parser: an option the command does not have, an option shown required (outside `[...]` and `( | )`) that
    has a default, or one shown optional that is required. A line indented under a `costgraph` line continues
    it; `# ...` after two spaces is a comment."""
    import argparse

    from costgraph.app.cli import build_parser

    top = build_parser()
    commands = next(a.choices for a in top._actions if isinstance(a, argparse._SubParsersAction))
    problems = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].startswith(FENCE):
            i += 1
            continue
        close = _closing_fence(lines, i, path)
        body = lines[i + 1:close]
        if body and body[0].startswith("costgraph"):
            entries: list[tuple[int, str]] = []
            for k, line in enumerate(body):
                line = re.sub(r"\s{2,}#\s.*$", "", line)
                if line.startswith("costgraph"):
                    entries.append((i + 2 + k, line))
                elif entries and line.strip():
                    entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())
            for lineno, entry in entries:
                words = entry.split()
                name = next((w for w in words[1:] if w in commands), None)
                parser = commands[name] if name else top
                what = f"costgraph {name}" if name else "costgraph"
                problems += [f"{path}:{lineno}: synopsis of `{what}`: {p}" for p in _synopsis_entry(entry, parser)]
        i = close + 1
    return problems


def _synopsis_entry(entry: str, parser) -> list[str]:
    actions = parser._option_string_actions
    required_groups = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    out, brackets, parens, shown_required = [], 0, 0, set()
    for m in re.finditer(r"[\[\]()]|(?<![\w-])--[a-z][\w-]*", entry):
        tok = m.group()
        if tok == "[":
            brackets += 1
        elif tok == "]":
            brackets -= 1
        elif tok == "(":
            parens += 1
        elif tok == ")":
            parens -= 1
        elif tok not in actions:
            out.append(f"{tok} is not an option")
        else:
            action = actions[tok]
            required = action.required or id(action) in required_groups
            if brackets == 0 and parens == 0:
                shown_required.add(tok)
                # a flag (`--version`, `--json`) shown bare names a usage form, not a missing default
                if not required and action.nargs != 0:
                    out.append(f"{tok} is shown required but has a default (write [{tok} ...])")
            elif brackets > 0 and action.required and tok not in shown_required:  # `--size A [--size B ...]`
                out.append(f"{tok} is shown optional but is required")
    return out


# ---- command line ---------------------------------------------------------------------------

def default_readme() -> str:
    import costgraph
    return str(Path(costgraph.__file__).resolve().parent.parent / "README.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m costgraph.app.readme", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="run the blocks and report the stale ones (exit 1)")
    what.add_argument("--write", action="store_true", help="rewrite the stale blocks in place")
    p.add_argument("--slow", action="store_true", help="include the blocks marked slow")
    p.add_argument("--only", metavar="TEXT", help="only the blocks whose commands contain TEXT")
    p.add_argument("--readme", metavar="FILE", default=None, help="default: the repository's README.md")
    args = p.parse_args(argv)
    path = args.readme or default_readme()
    try:
        text = Path(path).read_text()
        t0 = time.perf_counter()
        results, skipped = check(text, path, slow=args.slow, only=args.only)
        synopsis = synopsis_problems(text, path) if not args.only else []
    except (OSError, ReadmeError, UnicodeDecodeError) as e:
        print(f"readme: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    for r in results:
        if r.stale:
            print(f"{path}:{r.block.marker_line + 1}: stale: {_clip(r.block.label, n=90)}: {r.summary}")
    for problem in synopsis:  # hand-written: reported, never rewritten
        print(problem)
    n_stale = sum(r.stale for r in results)
    note = f", {len(skipped)} slow not run (--slow)" if skipped else ""
    note += f", {len(synopsis)} synopsis problem(s)" if synopsis else ""
    if args.write and n_stale:
        try:
            current = Path(path).read_text()  # re-read: an edit made while the commands ran is kept
            write_atomic(path, rewrite(current, results, path))
        except (OSError, ReadmeError) as e:
            print(f"readme: error: {e}", file=sys.stderr)
            return 2
        print(f"{path}: {len(results)} block(s) run{note}, {n_stale} rewritten, {elapsed:.1f} s")
        return 1 if synopsis else 0
    print(f"{path}: {len(results)} block(s) run{note}, {n_stale} stale, {elapsed:.1f} s")
    return 1 if (n_stale or synopsis) and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
