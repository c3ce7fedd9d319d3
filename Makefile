# The two commands of the README. Both set up .venv on first use (CPU torch pinned in
# constraints.txt), then do their job.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean
demo: $(STAMP)
	$(VENV)/bin/opforge demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .opforge-cache
