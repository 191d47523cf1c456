# The two commands a newcomer needs:
#   make demo   set up .venv if needed, then run the whole pipeline on the bundled dataset (CPU, 2 ranks)
#   make test   set up .venv if needed, then run the test suite
#
# Variables: VENV (where the virtualenv lives), TORCH (the torch requirement installed first;
# on a GPU machine install your CUDA torch into the venv beforehand and it is kept), PYTHON.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coma-installed
PYTEST_ARGS ?=

.PHONY: demo test venv bench wheelhouse clean-venv

venv: $(STAMP)

# torch goes in first: an unpinned torch requirement resolves to a multi-GB CUDA build.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) launch/demo.py

test: $(STAMP)
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/data.py
	$(PY) benchmarks/loss.py
	$(PY) benchmarks/compression.py

clean-venv:
	rm -rf $(VENV)

wheelhouse: $(STAMP)   # .whl/ for a GPU machine without network (see benchmarks/gpu_session.sh)
	PY=$(PY) bash benchmarks/wheelhouse.sh
