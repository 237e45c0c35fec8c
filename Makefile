# Two commands do everything on a fresh machine:
#   make bench   set up .venv, build, run the main benchmark
#   make test    set up .venv, build, run the whole test suite
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
EDIT   := $(VENV)/.fusedformer-editable
export FUSEDFORMER_BUILD_JOBS ?= 2

.PHONY: all venv build test test-fast bench bench-all wheel clean

all: build

# Dev dependencies, pinned by requirements/constraints.txt (what CI tests). Those pins have no
# Python 3.10 releases (transformers, mlx-lm, scikit-learn, hypothesis, matplotlib): 3.11 or later.
$(DEPS): requirements/dev.txt requirements/constraints.txt
	@py=$(PYTHON); test -x $(VPY) && py=$(VPY); $$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "[make] the pinned dev environment (requirements/constraints.txt) needs Python >= 3.11, $$py is $$($$py -c 'import platform; print(platform.python_version())' 2>/dev/null || echo missing); run make with PYTHON=python3.11 or later"; exit 1; }
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements/dev.txt -c requirements/constraints.txt
	touch $@

# The package itself, editable (console script `fusedformer`, imports from python/).
$(EDIT): $(DEPS) pyproject.toml setup.py
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(DEPS)

# Incremental rebuild of the extension in place (objects newer than every source are kept).
build: $(EDIT)
	PYTHONWARNINGS=ignore $(VPY) setup.py -q build_ext --inplace
	@test -n "$$(ls python/fusedformer/_C*.so 2>/dev/null)" || (echo "build failed" && exit 1)

test: build
	$(VPY) -m pytest -q

test-fast: build
	$(VPY) -m pytest -q -m "not slow"

# The main job: the end-to-end model benchmark (about 10 minutes on 2 cores).
bench: build
	$(VPY) -m fusedformer.cli bench model

# Every kernel area, then the model.
bench-all: build
	$(VPY) -m fusedformer.cli bench limits
	$(VPY) -m fusedformer.cli bench attention
	$(VPY) -m fusedformer.cli bench qmatmul
	$(VPY) -m fusedformer.cli bench model

wheel: $(DEPS)
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist python/fusedformer/_C*.so python/*.egg-info
