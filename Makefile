# Two commands do all the set-up (see README):
#   make demo   train a small Switch-DiT on the embedded digits data, sample, report
#   make test   run the test suite
# Both create .venv on first use. For contributors:
#   make lint   ruff check + ruff format --check (config: pyproject.toml); make format fixes
#   make gpu    on a lent GPU machine: build, GPU tests, benchmarks, summary (benchmarks/gpu.py)
#   make gpu DRY=1   the same phases on the CPU with tiny shapes (CI runs it)
# The venv sees system site-packages, so a machine that already has torch (and no package
# index) reuses it instead of downloading one.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Without a reachable index (a GPU machine) fail fast instead of retrying for minutes.
PIP_QUICK ?= --retries 1 --timeout 15

.PHONY: demo test bench install clean lint format gpu

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install torch
	$(VPY) -m pip install -q $(PIP_QUICK) --upgrade "setuptools>=64" wheel ninja || true
	$(VPY) -m pip install $(PIP_QUICK) -e ".[test]" --no-build-isolation \
	  || $(VPY) -m pip install -e . --no-build-isolation --no-deps --no-index
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/switch-dit train

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) -m benchmarks

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: $(STAMP)
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

# No install step and no download: the GPU machine has torch, triton and pytest but no package
# index, so this uses the python that has them (.venv where it exists, else $(PYTHON)), builds
# the extension in place (phase "build") and writes to $$OUT, else benchmarks/results/.
GPU_PY := $(if $(wildcard $(VPY)),$(VPY),$(PYTHON))
gpu:
	$(GPU_PY) -m benchmarks.gpu $(if $(DRY),--dry)

clean:
	rm -rf $(VENV) build *.egg-info switch_dit/*.so
