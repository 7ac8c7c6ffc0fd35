# The two commands of the README. Each installs what it needs first, so both work on a fresh machine.
PY ?= python3

.PHONY: setup run test bench

setup:
	bash scripts/setup.sh

# Main job (until the full Scalpel run lands): the kernel benchmark in quick mode.
run: setup
	$(PY) benchmarks/kernels.py --quick

test: setup
	$(PY) -m pytest -q

# Full Figure 13/14 sweep, written to benchmarks/results/.
bench: setup
	$(PY) benchmarks/kernels.py
