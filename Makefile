# The two commands a new user needs:  make demo  |  make test
# Everything is installed into .venv by these targets; nothing is expected to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Reinstall when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-all bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	# torch==2.14.1 / torchvision==0.29.1 are pinned: pip takes them from this machine's disk.
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/lensforge demo --out demo-out

# Fast suite (what CI runs): slow end-to-end runs are deselected; at least one fast end-to-end test runs.
test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

# Each script prints ratios against a peer measured in the same run; all of them together → BENCHMARKS.md.
bench: install
	$(BIN)/python -m bench.write_benchmarks

clean:
	rm -rf demo-out .pytest_cache
