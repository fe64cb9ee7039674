# Each target sets itself up: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch is pinned to the CPU build this project is tested with (a looser pin pulls CUDA wheels).
TORCH_PIN ?= torch==2.13.0
# The slowest tests are listed after each run, to keep the suite's time (CI allows 30 minutes) in view.
PYTEST_ARGS ?= --durations=15
# Two pytest workers (a test file stays on one worker, so its module fixtures are built once): much of the
# suite is single-threaded XLA compilation, so two workers on 2 cores take ~2/3 of one's time. 0: one process.
# Files are handed out in name order, so the two bench smoke-test files (minutes each) start first, one per worker.
PYTEST_WORKERS ?= 2
# XLA's CPU backend allocates a step's temporaries (GBs) as one block per run; glibc maps it fresh each time and
# every page faults again (5-10% of a CPU train step). With transparent huge pages it faults in 2 MB pages.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install test demo compare tofu bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,gguf,test,demo]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

demo: install
	$(PY) -m eu_jax.demo --config=configs/demo.py

compare: install
	$(PY) -m eu_jax.compare --config=configs/demo.py

tofu: install
	$(PY) -m eu_jax.tofu_bench --config=configs/tofu.py

bench: install
	$(PY) bench/convert.py
	$(PY) bench/generate.py
	$(PY) bench/train_step.py
	$(PY) bench/train_scaling.py
	$(PY) bench/train_mfu.py

clean:
	rm -rf $(VENV) build *.egg-info
