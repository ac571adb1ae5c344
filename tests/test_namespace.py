"""graphs/ and verify/ install as costgraph.graphs and costgraph.verify: a foreign top-level `graphs` or
`verify` package (both names exist on PyPI) neither breaks costgraph nor is shadowed by it."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_package_but_costgraph():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"costgraph"}


def test_foreign_graphs_and_verify_packages_change_nothing(tmp_path):
    for name in ("graphs", "verify"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the foreign {name} package')\n")
    probe = subprocess.run([sys.executable, "-c", "import costgraph.app.cli"], cwd=tmp_path, capture_output=True)
    if probe.returncode != 0 and b"foreign" not in probe.stderr:
        pytest.skip("costgraph is not installed (pip install -e .): only the source tree is on the path")
    run = subprocess.run([sys.executable, "-m", "costgraph", "layout", "--size", "1654x2339", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0 and '"image_tokens": 903' in run.stdout, run.stderr
    foreign = subprocess.run([sys.executable, "-c", "import graphs"], cwd=tmp_path, capture_output=True, text=True,
                             env={"PYTHONPATH": str(tmp_path)})
    assert "the foreign graphs package" in foreign.stderr  # theirs stays theirs
