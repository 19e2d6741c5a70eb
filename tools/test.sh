#!/usr/bin/env bash
# Run the test suite: pytest (tests/), the notebooks, and the documentation site in a browser. Expects tools/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
# two workers on two cores: one thread each (two OpenMP threads per worker make torch 10x slower, not faster)
export PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python -m pytest -q -n 2 tests
# The notebooks, their examples and tests run as nbdev runs them. The slowest, tutorials/real_model (a real sentence
# encoder, minutes), runs once: in the site build below, which executes every notebook with nbdev's same `test_nb` and
# fails on any cell that fails
nbdev-test --n-workers 2 --skip-file-re '^real_model'
# The documentation site built offline (every notebook executed for its outputs: --fresh, no page from the cache)
bash tools/docs.sh --fresh
# The site opened in headless Chromium (the build above is reused; the test skips where there is no chromium, unless
# FASTERAI_LR_REQUIRE_CHROMIUM is set, as .ci/run sets it)
python -m pytest -q tests/test_docs.py -m slow
