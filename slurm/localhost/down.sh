#!/usr/bin/env bash
# Tear down the localhost Slurm cluster started by up.sh DIR: cancel its jobs, then stop slurmd,
# slurmctld, slurmdbd, mariadbd and munged by the pids in DIR/run (SIGTERM, SIGKILL after 10 s).
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

stop() {  # name pidfile
  local pidfile=$2 pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then echo "down.sh: $1 ($pid) ignored SIGTERM; killing" >&2; kill -KILL "$pid"; fi
  fi
  rm -f "$pidfile"
}
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop slurmdbd "$DIR/run/slurmdbd.pid"
stop mariadbd "$DIR/run/mysqld.pid"
stop munged "$DIR/run/munged.pid"
if [[ $purge -eq 1 ]]; then rm -rf "$DIR"; fi
echo "[slurm-down] stopped the localhost cluster in $DIR"
