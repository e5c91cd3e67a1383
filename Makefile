# Two commands set everything up on a fresh machine with python3.12:
#   make demo   the main job on the sample corpus that ships in sample_data/
#   make test   lint (ruff check, ruff format --check), the unit tier, then the cluster tier
#   make test-fast   the unit tests that start no process: the edit-test loop (README.md)
PY ?= python3.12
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast test-cluster lint clean constraints

# constraints.txt pins every package to the versions the suite last passed with, so that a new
# release on the registry cannot change what CI installs; `make constraints` refreshes it.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out demo_out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q
	$(MAKE) test-cluster

# The unit tests that start no process and are not slow: tests marked `subprocess` (the CLI in a
# subprocess, torchrun, dask or DataLoader worker processes; tests/conftest.py enforces the mark)
# or `slow` are left out.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not subprocess"

# The cluster tier (tests/cluster/): real SLURM jobs. It uses the SLURM that answers; as root it
# installs and starts a single-node one (tests/cluster/slurm_local.sh) and stops it after; otherwise
# it is skipped with the reason, except under CI=true, where that fails the run with the reason.
# A plain `pytest` leaves tests/cluster out.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^#'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf demo_out .pytest_cache
