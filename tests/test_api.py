"""The README's Python API section runs as written (a doctest of its `>>>` lines)."""
import doctest
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_api_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name the bundled sample by its path in the repo
    failures, tried = doctest.testfile(str(ROOT / "README.md"), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert tried >= 10 and failures == 0


def test_api_module_doctest():
    from costgraph.app import api

    failures, tried = doctest.testmod(api)
    assert tried >= 3 and failures == 0
