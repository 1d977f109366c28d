# Two commands do all the set-up (see README):
#   make demo   train a small Switch-DiT on the embedded digits data, sample, report
#   make test   run the test suite
# Both create .venv on first use. The venv sees system site-packages, so a machine that
# already has torch (and no package index) reuses it instead of downloading one.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Without a reachable index (a GPU machine) fail fast instead of retrying for minutes.
PIP_QUICK ?= --retries 1 --timeout 15

.PHONY: demo test bench install clean

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

clean:
	rm -rf $(VENV) build *.egg-info switch_dit/*.so
