# The two commands of the README. Each installs what it needs first, so both work on a fresh machine.
PY ?= python3

.PHONY: setup run test bench bench-kernels

setup:
	bash scripts/setup.sh

# Main job: a full Scalpel run (quick recipe) of LeNet-300-100 on real MNIST for the host CPU.
run: setup
	scalpel run lenet-300-100 --target host --quick

# Scalpel's Figures 13/14 on this CPU, quick mode (< 60 s).
bench-kernels: setup
	$(PY) benchmarks/kernels.py --quick

test: setup
	$(PY) -m pytest -q

# Full Figure 13/14 sweep, written to benchmarks/results/.
bench: setup
	$(PY) benchmarks/kernels.py
