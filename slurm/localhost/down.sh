#!/usr/bin/env bash
# Tear down the localhost Slurm cluster started by up.sh DIR: cancel its jobs, then stop slurmd(s),
# slurmctld, slurmdbd, mariadbd and munged by the pids in DIR/run (SIGTERM, SIGKILL after 10 s).
# A multi-node cluster (up.sh --nodes N): then every process left in the nodes' network namespaces is
# killed and the namespaces, veths, bridge and /etc/hosts lines that up.sh made (DIR/nodes.env) go.
#
#   slurm/localhost/down.sh [--purge] DIR      # --purge also deletes DIR
set -uo pipefail

purge=0
if [[ ${1:-} == --purge ]]; then purge=1; shift; fi
[[ $# -eq 1 ]] || { echo "usage: $0 [--purge] DIR" >&2; exit 2; }
DIR=$(cd "$1" 2>/dev/null && pwd) || { echo "down.sh: no folder $1; nothing to stop" >&2; exit 0; }
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$DIR/etc/slurm.conf"

# Jobs first, through Slurm, so no task or slurmstepd outlives the cluster.
if [[ -f $DIR/run/slurmctld.pid ]] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// } ]]; then
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.25; done
  fi
fi

pid_of() { [[ -f $1 ]] && cat "$1"; }
stop() {  # pidfile... : SIGTERM together, wait up to 10 s, then SIGKILL what is left
  local pids=() f p
  for f in "$@"; do p=$(pid_of "$f"); [[ -n $p ]] && kill -0 "$p" 2>/dev/null && pids+=("$p"); done
  [[ ${#pids[@]} -gt 0 ]] && kill -TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 100); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive -eq 0 ]] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then echo "down.sh: pid $p ignored SIGTERM; killing" >&2; kill -KILL "$p"; fi
  done
  rm -f "$@"
}
# The Slurm daemons together, then the database they write to, then munge they authenticate with.
stop "$DIR"/run/slurmd*.pid "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid"
stop "$DIR/run/mysqld.pid"
stop "$DIR/run/munged.pid"
if [[ -f $DIR/nodes.env ]]; then
  # shellcheck disable=SC1091
  source "$DIR/nodes.env"
  for node in $NODES; do
    if ip netns pids "$node" >/dev/null 2>&1; then
      pids=$(ip netns pids "$node" | tr '\n' ' ')
      if [[ -n ${pids// } ]]; then kill -KILL $pids 2>/dev/null; fi
      for _ in $(seq 50); do [[ -z $(ip netns pids "$node" 2>/dev/null) ]] && break; sleep 0.1; done
      ip netns del "$node"   # takes its end of the veth pair, and so the pair, with it
    fi
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  (
    flock 9
    if grep -qF "$HOSTS_TAG" /etc/hosts; then
      grep -vF "$HOSTS_TAG" /etc/hosts >"$DIR/hosts.tmp" || true
      cat "$DIR/hosts.tmp" >/etc/hosts && rm -f "$DIR/hosts.tmp"
    fi
  ) 9</etc/hosts
  rm -f "$DIR/nodes.env"
fi
if [[ $purge -eq 1 ]]; then rm -rf "$DIR"; fi
echo "[slurm-down] stopped the localhost cluster in $DIR"
