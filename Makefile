# The two commands a new user needs:  make demo  |  make test
# Everything is installed into .venv by these targets; nothing is expected to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Reinstall when the dependency list or the lock changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-all bench install lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	# torch==2.14.1 / torchvision==0.29.1 are pinned: pip takes them from this machine's disk. constraints.txt pins
	# every other dependency to the versions README's and BENCHMARKS.md's figures were measured with.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/lensforge demo --out demo-out

# Fast suite (what CI runs): slow end-to-end runs are deselected; at least one fast end-to-end test runs.
test: install
	$(BIN)/python -m pytest -m "not slow" -q --durations=15

test-all: install
	$(BIN)/python -m pytest -q

# Each script prints ratios against a peer measured in the same run; all of them together → BENCHMARKS.md.
bench: install
	$(BIN)/python -m bench.write_benchmarks

# Re-resolve pyproject.toml's ranges in a throwaway venv and write the result to constraints.txt (then re-measure).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; echo "# Resolved $$(date -u +%Y-%m-%d) on $$(uname -s) $$(uname -m), Python \
	$$(.lock-venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')."; \
	.lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf demo-out .pytest_cache
