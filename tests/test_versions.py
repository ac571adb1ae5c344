"""The installed packages are within the ranges pyproject.toml declares (the ranges the suite is run on)."""
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements():
    data = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in data["dependencies"] + data["optional-dependencies"]["test"]]


def test_every_dependency_has_an_upper_bound():
    loose = [str(r) for r in requirements() if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not loose, f"no upper bound: {loose}"


def test_installed_versions_are_the_tested_ranges():
    outside = [f"{r.name} {version(r.name)} not in {r.specifier}" for r in requirements()
               if not r.specifier.contains(version(r.name), prereleases=True)]
    assert not outside, "\n".join(outside)
