"""environment.yml (conda) and pyproject.toml (pip) must list the same dependencies."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _split(spec: str) -> tuple[str, str]:
    name, version = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
    return name.lower().replace("_", "-"), version.replace(" ", "")


def pyproject_deps() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return dict(_split(s) for s in specs)


def conda_deps() -> dict[str, str]:
    deps = {}
    in_deps = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
        elif in_deps and re.match(r"^  - [A-Za-z]", line):
            name, version = _split(line[4:])
            if name not in ("python", "pip"):
                deps[CONDA_NAMES.get(name, name)] = version
        elif in_deps and re.match(r"^      - [A-Za-z]", line):  # pip's own list (markers allowed)
            name, version = _split(line[8:])
            deps[name] = version
    return deps


def test_same_packages_and_versions():
    assert conda_deps() == pyproject_deps()


def test_pyproject_torch_range_admits_the_cpu_build_on_disk():
    # CI machines hold torch 2.13.0 (CPU); the requirement must not force another build.
    assert pyproject_deps()["torch"] == ">=2.5"
