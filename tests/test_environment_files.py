"""pyproject.toml (pip), environment.yml (conda), binder/ (Binder) and the Makefile must agree.

:func:`problems` reads the four texts and lists every way they drift apart: the PyTorch the Makefile
installs against the conda files' pins, the pins against pyproject's bounds and its "Tested with"
comments, Python, channels, and binder/postBuild. The real files must have none; each mutation below
makes one drift in a copy and checks that it is caught, so the test is known to be able to fail.
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
FILES = ("pyproject.toml", "environment.yml", "binder/environment.yml", "Makefile", "binder/postBuild")
CONDA_FILES = ("environment.yml", "binder/environment.yml")
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def read_files():
    return {name: (ROOT / name).read_text() for name in FILES}


def parse_conda(text):
    """``{"channels": [...], "conda": [...], "pip": [...]}`` of an environment file in this repo's shape."""
    parsed, section = {"channels": [], "conda": [], "pip": []}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = line.split(" #", 1)[0].rstrip()
        if not line.startswith(" "):
            section = {"channels:": "channels", "dependencies:": "conda"}.get(entry)
        elif section == "conda" and entry == "  - pip:":
            section = "pip"
        elif section in ("channels", "conda") and entry.startswith("  - "):
            parsed[section].append(entry[4:].strip())
        elif section == "pip" and entry.startswith("      - "):
            parsed["pip"].append(entry[8:].strip())
        elif section == "pip" and entry.startswith("  - "):
            section = "conda"
            parsed["conda"].append(entry[4:].strip())
    return parsed


def versions_tested_with(pyproject_text):
    """``{name: version}`` from pyproject's "Tested with: name version, ..." comment lines."""
    versions = {}
    for line in pyproject_text.splitlines():
        if line.startswith("#") and "Tested with:" in line:
            versions.update(re.findall(r"([A-Za-z][\w.-]*) (\d+(?:\.\d+)+)", line.split("Tested with:", 1)[1]))
    return versions


def make_variable(makefile_text, name):
    found = re.search(rf"^{name}\s*\?=\s*(.*)$", makefile_text, re.M)
    return found.group(1).split() if found else []


def exact_pins(specs):
    """``{name: version}`` of ``name==version`` requirements; anything looser maps to None."""
    pins = {}
    for spec in specs:
        req = Requirement(spec)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        pins[req.name.lower()] = exact[0] if len(req.specifier) == 1 and exact else None
    return pins


def conda_problems(name, parsed, project, makefile_torch):
    problems = []
    if parsed["channels"] != ["conda-forge"]:
        problems.append(f"{name}: channels must be [conda-forge] only (no defaults), got {parsed['channels']}")
    conda = dict(entry.partition("=")[::2] for entry in parsed["conda"])
    if set(conda) != {"python", "pip"}:
        problems.append(f"{name}: conda installs only python and pip (the rest is pinned in pip:), got {sorted(conda)}")
    python = conda.get("python", "")
    if not re.fullmatch(r"3\.\d+", python) or python not in SpecifierSet(project["requires-python"]):
        problems.append(
            f"{name}: python={python} is not a 3.x version allowed by requires-python {project['requires-python']!r}"
        )
    options = [e for e in parsed["pip"] if e.startswith("-")]
    if options != [CPU_INDEX]:
        problems.append(f"{name}: the pip section's only option must be {CPU_INDEX!r}, got {options}")
    pins = exact_pins(e for e in parsed["pip"] if not e.startswith("-"))
    for package, version in pins.items():
        if version is None:
            problems.append(f"{name}: {package} is not pinned with == to one version")
    wanted = {
        Requirement(spec).name.lower(): Requirement(spec).specifier
        for spec in project["dependencies"] + project["optional-dependencies"]["course"]
    }
    if set(pins) != set(wanted):
        problems.append(
            f"{name}: pip pins {sorted(set(pins) ^ set(wanted))} differ from pyproject's dependencies + course extra"
        )
    for package, version in pins.items():
        if version and package in wanted and version not in wanted[package]:
            problems.append(f"{name}: {package}=={version} is outside pyproject's {package}{wanted[package]}")
    for package, version in makefile_torch.items():
        if pins.get(package) != version:
            problems.append(f"{name}: {package}=={pins.get(package)} but the Makefile installs {package}=={version}")
    return problems, python, pins


def postbuild_problems(text, executable):
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    problems = [] if executable else ["binder/postBuild is not executable"]
    if not lines or not re.fullmatch(r"set -[a-z]*e[a-z]*( -o pipefail)?", lines[0]):
        problems.append("binder/postBuild must start with `set -e` (stop at the first failing command)")
    if any(re.search(r"\|\|\s*(true|:)\b", x) for x in lines):
        problems.append("binder/postBuild hides a failure with `|| true`")
    if not any("pip install" in x and "--no-deps" in x for x in lines):
        problems.append("binder/postBuild must install batchlab with pip --no-deps (no second PyTorch)")
    return problems


def makefile_problems(makefile, project):
    problems = []
    torch = exact_pins(make_variable(makefile, "TORCH"))
    oldest = exact_pins(make_variable(makefile, "OLDEST_TORCH"))
    bounds = {Requirement(s).name.lower(): Requirement(s).specifier for s in project["dependencies"]}
    for package in ("torch", "torchvision"):
        if not torch.get(package):
            problems.append(f"Makefile: TORCH must pin {package}== exactly, got {make_variable(makefile, 'TORCH')}")
        lower = [s.version for s in bounds.get(package, []) if s.operator == ">="]
        if not oldest.get(package) or lower != [oldest[package]]:
            problems.append(
                f"Makefile: OLDEST_TORCH {package}=={oldest.get(package)} is not pyproject's lower "
                f"bound {package}>={lower[0] if lower else None} (make test-oldest tests it)"
            )
    for extras in re.findall(r'-e "\.\[([^\]]*)\]"', makefile):
        for extra in extras.split(","):
            if extra not in project.get("optional-dependencies", {}):
                problems.append(f"Makefile: installs the extra {extra!r}, which pyproject.toml does not define")
    return problems, torch


def problems(texts, postbuild_executable=True):
    """Every disagreement between the files in ``texts`` (``{path: text}`` for each of :data:`FILES`)."""
    project = tomllib.loads(texts["pyproject.toml"])["project"]
    found, torch = makefile_problems(texts["Makefile"], project)
    pythons, pinned = {}, {}
    for name in CONDA_FILES:
        more, pythons[name], pinned[name] = conda_problems(name, parse_conda(texts[name]), project, torch)
        found += more
    if len(set(pythons.values())) != 1:
        found.append(f"the conda files name different Pythons: {pythons}")
    if pinned["environment.yml"] != pinned["binder/environment.yml"]:
        found.append("environment.yml and binder/environment.yml pin different versions")
    tested = versions_tested_with(texts["pyproject.toml"])
    for package, version in pinned["binder/environment.yml"].items():
        if tested.get(package) != version:
            found.append(
                f"pyproject.toml says Tested with {package} {tested.get(package)}, the conda files pin {version}"
            )
    python_tested = re.search(r"Tested with:.*\(Python (3\.\d+)\)", texts["pyproject.toml"])
    if not python_tested or python_tested.group(1) != pythons["binder/environment.yml"]:
        found.append(f"pyproject.toml's Tested with (Python ...) is not the conda files' {pythons}")
    return found + postbuild_problems(texts["binder/postBuild"], postbuild_executable)


def test_the_files_agree():
    postbuild = ROOT / "binder" / "postBuild"
    assert problems(read_files(), postbuild_executable=postbuild.stat().st_mode & 0o111 == 0o111) == []


def test_the_real_files_pin_what_the_tests_ran_with():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    texts = read_files()
    pins = exact_pins(e for e in parse_conda(texts["binder/environment.yml"])["pip"] if not e.startswith("-"))
    running = {
        "torch": torch.__version__.split("+")[0],  # the local part (+cpu, +cu128) names the build
        "torchvision": torchvision.__version__.split("+")[0],
    }
    if running == exact_pins(make_variable(texts["Makefile"], "OLDEST_TORCH")):
        pytest.skip(f"make test-oldest runs with the lower bounds {running}, not the pinned versions")
    assert {package: pins[package] for package in running} == running


MUTATIONS = [  # (file, text, replacement, what the problem says)
    ("environment.yml", "torch==2.14.1", "torch==2.1.0", "the Makefile installs torch==2.14.1"),
    ("binder/environment.yml", "torchvision==0.29.1", "torchvision>=0.29", "torchvision is not pinned"),
    ("binder/environment.yml", "numpy==2.4.6", "numpy==2.4.5", "Tested with numpy 2.4.6"),
    ("environment.yml", "      - matplotlib==3.11.2\n", "", "differ from pyproject"),
    ("binder/environment.yml", "  - pip\n", "  - pip\n  - pytorch-cpu=2.1\n", "conda installs only python and pip"),
    ("binder/environment.yml", "python=3.11", "python=3.9", "python=3.9 is not"),
    ("environment.yml", "python=3.11", "python=3.12", "different Pythons"),
    ("pyproject.toml", 'requires-python = ">=3.11"', 'requires-python = ">=3.12"', "allowed by requires-python"),
    ("binder/environment.yml", "  - conda-forge\n", "  - conda-forge\n  - defaults\n", "no defaults"),
    ("environment.yml", "  - conda-forge\n", "  - defaults\n", "no defaults"),
    ("binder/environment.yml", CPU_INDEX, "--index-url https://pypi.org/simple", "only option"),
    ("Makefile", "TORCH       ?= torch==2.14.1", "TORCH       ?= torch==2.13.0", "the Makefile installs torch==2.13.0"),
    ("Makefile", "OLDEST_TORCH ?= torch==2.9.1", "OLDEST_TORCH ?= torch==2.8.0", "OLDEST_TORCH torch==2.8.0"),
    ("pyproject.toml", '"torch>=2.9.1"', '"torch>=2.4"', "lower bound torch>=2.4"),
    ("pyproject.toml", '"psutil>=5.9"', '"psutil>=8"', "psutil==7.2.2 is outside"),
    ("pyproject.toml", "matplotlib 3.11.2", "matplotlib 3.10.0", "Tested with matplotlib 3.10.0"),
    ("pyproject.toml", "(Python 3.11)", "(Python 3.12)", "Tested with (Python ...)"),
    ("Makefile", '-e ".[course,test,peers]"', '-e ".[course,tests]"', "extra 'tests'"),
    ("binder/postBuild", "set -e\n", "", "must start with `set -e`"),
    ("binder/postBuild", "pip install --no-deps -e .", "pip install --no-deps -e . || true", "|| true"),
    ("binder/postBuild", "pip install --no-deps -e .", "pip install -e .", "--no-deps"),
]


@pytest.mark.parametrize(
    ("name", "old", "new", "message"), MUTATIONS, ids=[f"{m[0]}:{m[2].strip()[:30]}" for m in MUTATIONS]
)
def test_each_drift_is_caught(name, old, new, message):
    texts = read_files()
    assert old in texts[name], f"the mutation no longer applies to {name}: {old!r}"
    texts[name] = texts[name].replace(old, new)
    found = problems(texts)
    assert any(message in problem for problem in found), found


def test_a_postbuild_that_is_not_executable_is_caught():
    assert problems(read_files(), postbuild_executable=False) == ["binder/postBuild is not executable"]
