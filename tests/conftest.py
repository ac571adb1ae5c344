import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cli(capsys):
    """`cli(*argv) -> (exit code, stdout, stderr)`: the `costgraph` command in-process, its output captured."""
    from costgraph.app.cli import main

    def run(*argv):
        capsys.readouterr()  # drop anything printed before this command
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
