# The two commands a new user runs: `make demo` and `make test`. Both create .venv and install
# everything themselves: torch first (the pinned CPU wheel on a CPU machine), then the package under
# constraints.txt so pip never replaces that torch with a CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.diffattr-installed
# Two cores here: never more torch threads than cores (oversubscription costs 3-10x).
THREADS ?= 2
export OMP_NUM_THREADS ?= $(THREADS)
export MKL_NUM_THREADS ?= $(THREADS)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint typecheck unit clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python scripts/check_env.py
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffattr demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check diffattr tests scripts
	$(BIN)/ruff format --check diffattr tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy diffattr

unit: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
