#!/usr/bin/env bash
# The figures only a GPU gives, in one run for a session that is lent one (a few minutes on an H100):
#   bash benchmarks/gpu_checks.sh
# 1. training: the train-identities step on a random SD1.5 at 512 px, bf16 autocast: identity-steps/s,
#    TFLOP/s and the fraction of the chip's bf16 peak, solo and K identities at once;
# 2. inversion: our step against the original's on SD1.5 at 512 px, in bfloat16.
# Each prints one JSON line last. Needs the packages of requirements.txt importable (no download).
set -euo pipefail
export PYTHONUNBUFFERED=1
python benchmarks/bench_train.py --sd15 --identities 8 --steps 5
python benchmarks/bench_invert.py --sd15 --steps 10 --repeats 3
python benchmarks/bench_train.py --sd15 --identities 16 --steps 5   # last: K = 16 may not fit 80 GB
