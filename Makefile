# The README's two commands are `make demo` and `make test`; both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast assets notebooks tiny-world bench-train bench-pca bench-invert bench-gpu-memory bench-outputs bench-import clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The suite without the tests marked slow (benchmarks, notebooks, scripts, builds, kill/resume, fuzzing, the
# browser): a developer's loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m lora_w2w.demo --out outputs/demo

# The README's pictures (assets/tiny_*.png) are the demo's, labelled: this regenerates them.
assets: $(STAMP)
	$(PY) -m lora_w2w.demo --out outputs/demo --assets assets

# Every notebook top to bottom with its default settings (the tiny world; the CPU unless there is CUDA): about 5 minutes
# on 2 idle CPU cores. The executed copies go to outputs/notebooks/; the committed notebooks stay without outputs.
NOTEBOOKS := $(wildcard sampling/*.ipynb editing/*.ipynb inversion/*.ipynb other/*.ipynb)

notebooks: $(STAMP)
	mkdir -p outputs/notebooks
	$(VENV)/bin/jupyter-execute --timeout=-1 --output='$(CURDIR)/outputs/notebooks/{notebook_name}' $(NOTEBOOKS)

clean:
	rm -rf outputs .pytest_cache

bench-train: $(STAMP)
	$(PY) benchmarks/bench_train.py

bench-invert: $(STAMP)
	$(PY) benchmarks/bench_invert.py

# The output check of `w2w generate` at 2,000 seeds against 100 (linear: a ratio near 1) and the pairwise
# test it replaced.
bench-outputs: $(STAMP)
	$(PY) benchmarks/bench_outputs.py

bench-import: $(STAMP)
	$(PY) benchmarks/bench_import.py

# Peak GPU memory of each job on SD1.5 at 512 px, estimated on the CPU on fake tensors (no GPU, no download;
# ~2.5 minutes on one thread).
bench-gpu-memory: $(STAMP)
	$(PY) benchmarks/bench_gpu_memory.py

tiny-world: $(STAMP)
	$(PY) -m lora_w2w.tiny.build --out files/tiny --work data/tiny

# PCA: the streamed build against scikit-learn and torch.svd_lowrank (M = 8,000 x N = 99,648, K = 1,000;
# 3.2 GB of data in outputs/bench_pca). BENCH_PCA_ARGS="--threads 1" on a shared machine.
bench-pca: $(STAMP)
	$(PY) benchmarks/bench_pca.py $(BENCH_PCA_ARGS)
