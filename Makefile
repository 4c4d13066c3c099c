# The README's two commands are `make demo` and `make test`; both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test tiny-world bench-train bench-pca bench-invert clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m lora_w2w.demo --out outputs/demo

clean:
	rm -rf outputs .pytest_cache

bench-train: $(STAMP)
	$(PY) benchmarks/bench_train.py
