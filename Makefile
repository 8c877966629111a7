# The two commands a new user runs: `make demo` and `make test`. Both create .venv and install
# everything themselves: torch first (the pinned CPU wheel on a CPU machine), then the package under
# constraints.txt so pip never replaces that torch with a CUDA build. They also install the system
# packages the report uses (see system-packages) when they can.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.diffattr-installed
# curvlinops (tests/test_curvlinops.py checks our K-FAC / EK-FAC against it) without its
# backpack-for-pytorch dependency: backpack pulls torchvision, which breaks `import diffusers` on
# the CPU install, and curvlinops' K-FAC operators do not use it.
CURVLINOPS := curvlinops-for-pytorch==3.0.1 einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0 \
  linear_operator==0.6.1 jaxtyping==0.3.11 wadler-lindig==0.1.8
# Two cores here: never more torch threads than cores (oversubscription costs 3-10x).
THREADS ?= 2
export OMP_NUM_THREADS ?= $(THREADS)
export MKL_NUM_THREADS ?= $(THREADS)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# `make demo DEMO_OUT=/tmp/demo DEMO_ARGS="--seed 1"` runs the demo elsewhere / with other options.
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=

# Debian packages: Chromium prints the report's PDF, poppler (pdfinfo, pdftoppm) lets the tests
# check its pages. Installed with apt-get where missing when the user is root and apt-get exists;
# otherwise one line says what is missing and `make` goes on (the report then skips its PDF with a
# warning, the PDF tests are skipped saying so). A no-op when both are present.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: install system-packages demo test lint typecheck unit clean

install: $(STAMP) system-packages

system-packages:
	@missing=""; skipped=""; found=""; \
	[ -n "$$DIFFATTR_CHROMIUM" ] && [ -e "$$DIFFATTR_CHROMIUM" ] && found=1; \
	for exe in chromium chromium-browser google-chrome google-chrome-stable; do \
	  command -v $$exe >/dev/null 2>&1 && found=1; \
	done; \
	[ -n "$$found" ] || { missing="chromium"; skipped="the report's PDF"; }; \
	{ command -v pdfinfo && command -v pdftoppm; } >/dev/null 2>&1 || { \
	  missing="$${missing:+$$missing }poppler-utils"; \
	  skipped="$${skipped:+$$skipped, }the tests' PDF page check"; }; \
	[ -n "$$missing" ] || exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages: $$missing (apt-get)"; \
	  $(APT_INSTALL) $$missing >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1; $(APT_INSTALL) $$missing >/dev/null; } || \
	  echo "warning: apt-get could not install $$missing (skipped: $$skipped); install: sudo apt-get install $$missing"; \
	else \
	  echo "note: not installed: $$missing (skipped: $$skipped); install: sudo apt-get install $$missing"; \
	fi

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps $(CURVLINOPS)
	$(BIN)/python scripts/check_env.py
	touch $(STAMP)

demo: $(STAMP) system-packages
	$(BIN)/diffattr demo --out $(DEMO_OUT) $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check diffattr tests scripts
	$(BIN)/ruff format --check diffattr tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy diffattr

unit: $(STAMP) system-packages
	$(BIN)/python -m pytest -q -x --durations=15

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
