import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cli(capsys):
    """`cli(*argv) -> (exit code, stdout, stderr)`: the `costgraph` command run in-process
    (`costgraph.app.cli.main`), its output captured. An option that ends the program itself
    (`--version`, `--help`: argparse's SystemExit) gives its exit code, as the console script would."""
    from costgraph.app.cli import main

    def run(*argv):
        capsys.readouterr()  # drop what was printed before this command
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
