"""pyproject.toml (pip), environment.yml (conda) and binder/environment.yml (Binder) must agree."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch-cpu": "torch", "pytorch": "torch", "pytorch-gpu": "torch"}
NOT_RUNTIME = {"python", "pip"}


def pip_runtime_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]}


def conda_packages(path):
    names, in_deps = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
        elif in_deps and re.match(r"^\s+- [A-Za-z]", line):
            name = re.split(r"[<>=! #]", line.split("- ", 1)[1], maxsplit=1)[0].lower()
            names.add(CONDA_TO_PIP.get(name, name))
        elif in_deps and line and not line.startswith((" ", "#")):
            in_deps = False
    return names - NOT_RUNTIME


def test_conda_files_name_the_same_runtime_packages_as_pyproject():
    expected = pip_runtime_packages()
    assert "torch" in expected and "jupyterlab" in expected
    assert conda_packages(ROOT / "environment.yml") == expected
    assert conda_packages(ROOT / "binder" / "environment.yml") == expected


def test_binder_uses_cpu_pytorch_from_conda_forge_and_a_pinned_python():
    text = (ROOT / "binder" / "environment.yml").read_text()
    assert "conda-forge" in text and "pytorch-cpu" in text
    assert re.search(r"- python=3\.\d+", text)


def test_postbuild_stops_on_error_and_installs_without_dependencies():
    lines = [x for x in (ROOT / "binder" / "postBuild").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "set -e"
    assert any("pip install" in x and "--no-deps" in x for x in lines)
