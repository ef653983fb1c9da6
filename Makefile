# The README's two commands are `make demo` and `make test`; both build everything they need.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.intl-stamp
DATA  := data/synthetic
PYTEST_ARGS ?=
# Every process of the demo, the tests and the benchmarks starts with the settings of CPU runs (glibc malloc,
# OpenMP waiting; defined once, in common/cpu_env.py; stages on the CPU also apply the malloc ones at run time).
CPU_ENV = env $$($(PY) -m common.cpu_env --env)

.PHONY: venv data demo lint test test-fast bench clean-outputs

venv: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml tools/make-venv.sh
	bash tools/make-venv.sh $(VENV)

# The embedded datasets (classification ImageFolder + COCO-json detection set), generated from a seed.
data: venv
	$(PY) -m common.synthetic --out $(DATA)

demo: venv data
	$(CPU_ENV) $(PY) tools/demo.py $(DEMO_ARGS)

# ruff ([tool.ruff] in pyproject.toml): pycodestyle, pyflakes, import order, bugbear.
lint: venv
	$(PY) -m ruff check .

# The suite in two passes (tools/run-tests.sh): the tests without Slurm on one worker per core, then the Slurm tests.
test: venv data lint
	$(CPU_ENV) PY=$(PY) bash tools/run-tests.sh $(PYTEST_ARGS)

# Unit tests only (skips the slow end-to-end tests).
test-fast: venv data
	$(CPU_ENV) $(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

bench: venv data
	$(CPU_ENV) $(PY) -m benchmarks $(BENCH_ARGS)

clean-outputs:
	rm -rf outputs

# A real Slurm on this machine (root, Debian 12): NODES=1 one node, NODES=2 two nodes in their own network
# namespaces on a private bridge; then: source $(SLURM_DIR)/env.sh (exports SLURM_CONF).
SLURM_DIR ?= /tmp/intl-slurm
NODES ?= 1
.PHONY: slurm-up slurm-down
slurm-up:
	bash slurm/localhost/up.sh --install --nodes $(NODES) $(SLURM_DIR)
slurm-down:
	bash slurm/localhost/down.sh --purge $(SLURM_DIR)

# The paper's 2-D toy (Appendix D.1): power family and IterNorm sweeps, plots + table.
.PHONY: toylab toylab-images toylab-dynamics
toylab: venv
	$(PY) -m toylab.blobs --out outputs/toylab

# The same sweep on the embedded image set (short pretrainings, then effective rank, lgIoC, k-NN).
toylab-images: venv data
	$(PY) -m toylab.images --out outputs/toylab/images $(TOYLAB_ARGS)

# FroSSL's training dynamics (Section 5): linear regime (2 linear layers, full-batch GD) + engine runs.
toylab-dynamics: venv data
	$(PY) -m toylab.dynamics --out outputs/toylab/dynamics $(TOYLAB_ARGS)
