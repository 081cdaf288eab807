# The README's two commands: `make lab` (set up, then open JupyterLab on the notebooks) and
# `make test` (set up, then run every test). The set-up is shared and redone only when
# pyproject.toml changes. `make test-oldest` runs the unit tests against the oldest PyTorch that
# pyproject.toml allows, in a venv of its own (a manual check, not part of `make test`).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.batchlab-installed
PORT   ?= 8888
# JupyterLab refuses to run as root unless told to; containers and CI machines often are root.
ROOT_OK := $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True)
# The PyTorch build to install first. The default is the one this course is tested with; elsewhere,
# for the small CPU-only wheels, run e.g.:
#   make lab TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH       ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
# The lower bounds of pyproject.toml's torch and torchvision: `make test-oldest` tests them.
OLDEST_TORCH ?= torch==2.9.1 torchvision==0.24.1
VENV_OLDEST  ?= .venv-oldest
# The unit tests: not the notebooks (their committed outputs come from the tested versions), not the
# browser tests, and not `make lab` (which would build the main venv).
UNIT_TESTS := tests --ignore=tests/e2e --ignore=tests/test_make_lab.py
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: lab test lint test-oldest notebooks setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) $(TORCH)
	$(PY) -m pip install --quiet -e ".[course,test,peers]"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(PORT) \
		--ServerApp.port_retries=0 --ServerApp.root_dir=notebooks $(ROOT_OK) $(LAB_ARGS)

test: $(STAMP) lint
	$(PY) -m pytest $(NBVAL) $(PYTEST_ARGS)

# Lint and format as habits: ruff over the package, tests, benchmarks and the notebooks' code cells.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The same PyTorch pins again on the second install, so that no extra can pull a newer torch.
test-oldest:
	test -x $(VENV_OLDEST)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install --quiet $(TORCH_INDEX) $(OLDEST_TORCH)
	$(VENV_OLDEST)/bin/python -m pip install --quiet -e ".[course,test,peers]" $(OLDEST_TORCH)
	$(VENV_OLDEST)/bin/python -m pytest $(UNIT_TESTS) $(PYTEST_ARGS)

# Re-execute every chapter in place (outputs and execution counts are committed), then drop saved
# widget state, which would only make the files large and the diffs noisy.
notebooks: $(STAMP)
	$(PY) benchmarks/notebooks.py --write $(or $(NB),notebooks/*.ipynb)

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build *.egg-info
