#!/usr/bin/env bash
# `make test`: the whole suite in two passes, so that both cores work all the time.
#   1. every test that does not need the localhost Slurm, on one pytest-xdist worker per core (each test computes
#      with one thread); whole files go to a worker (--dist loadfile), so a module-scoped fixture (the shared
#      pretraining of tests/e2e/test_short_pretraining.py) is computed once;
#   2. the Slurm tests, one at a time: they share one cluster bring-up, and their jobs take every core.
# Extra arguments go to both passes (e.g. -x, -k name). A pass that selects nothing is not a failure.
# TEST_WORKERS sets the number of workers of pass 1 (default: the cores, at most 4: each may hold a ResNet-50).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
t0=$(date +%s)

pass() {  # pass <name> <pytest arguments...>
  local name=$1; shift
  echo "make test: pass $name: pytest $*"
  "$PY" -m pytest "$@"
  local rc=$?
  [ "$rc" -eq 5 ] && rc=0  # no test selected in this pass
  return "$rc"
}

pass "1/2 (no Slurm, $WORKERS workers)" -n "$WORKERS" --dist loadfile -m "not slurm" "$@"; rc1=$?
pass "2/2 (localhost Slurm)" -m slurm "$@"; rc2=$?
minutes=$(( ($(date +%s) - t0) / 60 )); seconds=$(( ($(date +%s) - t0) % 60 ))
echo "make test: pass 1 exit $rc1, pass 2 exit $rc2; pytest wall time ${minutes} min ${seconds} s"
[ "$rc1" -ne 0 ] && exit "$rc1"
exit "$rc2"
