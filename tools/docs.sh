#!/usr/bin/env bash
# Build the documentation site offline into _site/ (open _site/index.html): one page per notebook of nbs/, each executed
# as nbdev-test does and processed by nbdev (show_doc rendered), navigation from nbs/sidebar.yml. No Quarto, no network.
# Usage: bash tools/docs.sh [--no-exec] [--fresh] [--out DIR] [--n-workers N] [--flags realdata]   (see tools/docs.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
export MPLBACKEND=Agg
exec python tools/docs.py "$@"
