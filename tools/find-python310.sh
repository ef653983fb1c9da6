#!/usr/bin/env bash
# Prints the path of a working Python 3.10 interpreter, or explains how to get one and exits 1.
set -u
try() { "$@" -c 'import sys; assert sys.version_info[:2] == (3, 10); print(sys.executable)' 2>/dev/null; }
if [ -n "${PYTHON310:-}" ]; then try "$PYTHON310" && exit 0; fi
try python3.10 && exit 0
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.|$)' | sort -t. -k3 -n -r); do
    p="$(pyenv root)/versions/$v/bin/python3.10"
    [ -x "$p" ] && try "$p" && exit 0
  done
fi
for p in /usr/bin/python3.10 /usr/local/bin/python3.10 /opt/python3.10/bin/python3.10; do
  [ -x "$p" ] && try "$p" && exit 0
done
{
  printf '%s\n' 'error: Python 3.10 was not found (torch 2.3.1 and the sal-detectron2 wheel are built for CPython 3.10).'
  printf '%s\n' 'fix: install it and run make again, e.g.'
  printf '%s\n' '       pyenv install 3.10.13            (pyenv)'
  printf '%s\n' '       apt-get install python3.10-venv  (Debian/Ubuntu with a 3.10 package)'
  printf '%s\n' '       conda create -n py310 python=3.10 && make venv PYTHON310=$CONDA_PREFIX/envs/py310/bin/python'
  printf '%s\n' '     or point PYTHON310=/path/to/python3.10 at an existing interpreter.'
} >&2
exit 1
