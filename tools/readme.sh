#!/usr/bin/env bash
# Write README.md from nbs/index.ipynb (its Markdown and code cells; hidden cells left out). Usage: bash tools/readme.sh [PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
exec python tools/docs.py --readme "${1:-README.md}"
