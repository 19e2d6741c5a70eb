#!/usr/bin/env bash
# Run the test suite: pytest (tests/) and the notebooks (nbdev-test). Expects tools/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg
python -m pytest -q -n 2 tests
nbdev-test --n-workers 2
