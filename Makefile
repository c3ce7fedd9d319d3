# The two commands of the README. Both set up .venv on first use (CPU torch pinned in
# constraints.txt), then do their job.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

COMPAT := .venv-triton36
COMPAT_STAMP := $(COMPAT)/.installed

.PHONY: demo test test-native test-compat setup clean
demo: $(STAMP)
	$(VENV)/bin/opforge demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q

# the native check: every example kernel compiled for sm_90a and sm_80 (no GPU needed), with
# its resources checked; compiled results are cached in the user cache dir, so reruns are fast
test-native: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:xdist -m native tests/test_native_sweep.py

# the suite again under Triton 3.6 (the GPU image's version), through its interpreter; then the
# native check with 3.6's compiler (its wheel bundles ptxas too)
test-compat: $(COMPAT_STAMP)
	$(COMPAT)/bin/python -m pytest -n 2 -q -p no:cacheprovider -W "ignore:Conversion of an array with ndim:DeprecationWarning"
	$(COMPAT)/bin/python -m pytest -q -p no:xdist -p no:cacheprovider -m native tests/test_native_sweep.py

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(COMPAT_STAMP): pyproject.toml constraints-triton36.txt
	$(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q --upgrade pip
	$(COMPAT)/bin/pip install -q -c constraints-triton36.txt torch
	$(COMPAT)/bin/pip install -q -c constraints-triton36.txt -e '.[dev]'
	touch $(COMPAT_STAMP)

clean:
	rm -rf $(VENV) $(COMPAT) .pytest_cache .opforge-cache
