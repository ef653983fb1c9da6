#!/usr/bin/env bash
# Builds (or tops up) the pinned environment in .venv. Called by `make venv`; safe to re-run.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
PY310=$(bash tools/find-python310.sh)
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
  echo "make venv: $VENV is not a Python 3.10 environment; rebuilding it" >&2
  rm -rf "$VENV"
fi
[ -x "$VENV/bin/python" ] || "$PY310" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "make venv: installing the pinned packages (requirements/lock.txt); the first time downloads about 2.5 GB (torch with its CUDA libraries)"
"${PIP[@]}" install -q wheel==0.48.0  # so the editable install below needs no build isolation
"${PIP[@]}" install -q -r requirements/lock.txt
# detectron2 is not on PyPI; sal-detectron2 is a build of its main branch with compiled ops for cp310 +
# torch 2.3.1. --no-deps: its runtime needs are pinned in requirements/lock.txt.
"${PIP[@]}" install -q --no-deps "sal-detectron2==0.7.2"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c 'import torch, torchvision, detectron2, detectron2._C, common, pretrain, transfer; print("make venv: ok: torch", torch.__version__, "torchvision", torchvision.__version__, "detectron2", detectron2.__version__)'
touch "$VENV/.intl-stamp"
