# nucseg: make install | make demo | make test | make test-fast | make bench
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch/torchvision pair that installs on CPU-only CI machines and GPU nodes alike (CUDA build).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= demo_out
# make bench BENCH_ARGS='--train' builds the benchmark weights first; '--only amg --threads 1' runs one
BENCH_ARGS ?=
# pytest processes: 2 keeps the suite under 6 minutes on a 2-core machine (5 min 35 s measured 2026-12-08)
TEST_WORKERS ?= 2

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# the inner loop: everything but the tests marked slow
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m 'not slow'

demo: install
	$(PY) scripts/demo.py --out $(DEMO)

bench: install
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info .pytest_cache
