#!/usr/bin/env bash
# Run the test suite: pytest (tests/) and the notebooks (nbdev-test). Expects tools/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
# two workers on two cores: one thread each (two OpenMP threads per worker make torch 10x slower, not faster)
export PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python -m pytest -q -n 2 tests
nbdev-test --n-workers 2
# The documentation site, built offline and opened in headless Chromium (the test skips where there is no chromium)
python -m pytest -q tests/test_docs.py -m slow
