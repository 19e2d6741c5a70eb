#!/usr/bin/env bash
# Set up fasterai_lr on a fresh machine: a virtual environment in .venv with the CPU PyTorch, torchvision, and the package.
# Usage: bash tools/setup.sh   (then use .venv/bin/python, .venv/bin/fasterai_lr, or `source .venv/bin/activate`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || $PY -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip="./.venv/bin/python -m pip install -q"
# 1. torch first, by exact version: any other request pulls the newest CUDA build (GBs). See ../shared/ENVIRONMENT.md.
$pip torch==2.13.0
# 2. torchvision 0.28.0 is the release for torch 2.13.0; its only build is a CUDA one, so install it without deps ...
$pip --no-deps torchvision==0.28.0
# ... and let it import on a CPU-only torch: its fake-kernel registrations for C++ ops (nms, ...) must only apply when
#     the C extension loaded. Models (resnet, vgg, mobilenet, ...) run on the CPU; torchvision.ops' C++ ops do not.
./.venv/bin/python - <<'PY'
import importlib.util, pathlib, re
p = pathlib.Path(importlib.util.find_spec('torchvision').submodule_search_locations[0])/'_meta_registrations.py'
s = p.read_text()
t = re.sub(r'^@torch\.library\.register_fake\((.*)\)$', r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))', s, flags=re.M)
if t != s: p.write_text(t)
PY
# 3. everything else, with torch and torchvision pinned so that nothing replaces them
printf 'torch==2.13.0\ntorchvision==0.28.0\n' > .venv/constraints.txt
$pip -c .venv/constraints.txt -e ".[dev]"
./.venv/bin/python -c "import torchvision, fastai.vision.all, fasterai_lr.all; print('fasterai_lr', fasterai_lr.__version__, 'ready: torch', __import__('torch').__version__)"
