#!/usr/bin/env bash
# One node of a multi-node localhost cluster (slurm/localhost/up.sh --nodes N DIR): start it, or kill it.
#
#   slurm/localhost/node.sh DIR start NODE [--no-wait]   # slurmd in the node's network namespace, with the
#                                                        # node's hostname; waits until Slurm sees it up
#   slurm/localhost/node.sh DIR kill NODE                # the node dies: its link goes down first (nothing
#                                                        # it sends reaches anyone any more, as in a power
#                                                        # loss), then its slurmd and every process running
#                                                        # in its namespace (job tasks included) get SIGKILL
#
# Root only. The node's namespace, veth and address stay (down.sh removes them), so `start` brings the
# same node back; with ReturnToService=2 Slurm takes it into service again when its slurmd registers.
set -euo pipefail

[[ $# -ge 3 ]] || { echo "usage: $0 DIR start|kill NODE [--no-wait]" >&2; exit 2; }
DIR=$(cd "$1" && pwd); action=$2; node=$3; wait=1
[[ ${4:-} == --no-wait ]] && wait=0
die() { echo "node.sh: error: $*" >&2; exit 1; }
[[ -f $DIR/nodes.env ]] || die "$DIR/nodes.env is missing: not a multi-node cluster folder (up.sh --nodes N DIR)"
# shellcheck disable=SC1091
source "$DIR/nodes.env"
[[ " $NODES " == *" $node "* ]] || die "no node $node in this cluster; its nodes: $NODES"
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$DIR/etc/slurm.conf"
veth=${node/-/}                           # intlXXXX-n2 -> intlXXXXn2, the host side of its veth pair
pidfile="$DIR/run/slurmd-$node.pid"

case "$action" in
  start)
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "node.sh: $node is running already (slurmd pid $(cat "$pidfile"))"; exit 0
    fi
    ip link set "$veth" up
    mkdir -p "$DIR/spool/$node"
    # Its network namespace (nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, which
    # slurmd needs), its own hostname (a UTS namespace: gloo and NCCL advertise the address their hostname
    # resolves to, as on a real node) and its own mount table (receiving the host's mounts, as a node sees
    # the shared filesystem; a mount made on the node stays there).
    nsenter --net="/run/netns/$node" unshare --uts --mount --propagation slave -- \
      sh -c "hostname '$node' && exec slurmd -f '$SLURM_CONF'" \
      || die "slurmd of $node did not start (log: $DIR/log/slurmd-$node.log)"
    if [[ $wait -eq 1 ]]; then
      for _ in $(seq 150); do
        state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
        [[ $state == idle || $state == mix || $state == alloc ]] && break
        sleep 0.2
      done
      [[ $state == idle || $state == mix || $state == alloc ]] || \
        die "$node did not come back (state '$state'; log $DIR/log/slurmd-$node.log)"
    fi
    echo "[node.sh] $node started"
    ;;
  kill)
    ip link set "$veth" down
    pids=$(ip netns pids "$node" | tr '\n' ' ')
    if [[ -n ${pids// } ]]; then kill -KILL $pids 2>/dev/null || true; fi
    for _ in $(seq 50); do [[ -z $(ip netns pids "$node") ]] && break; sleep 0.1; done
    rm -f "$pidfile"
    echo "[node.sh] $node killed (link down; slurmd and processes: ${pids:-none})"
    ;;
  *) die "unknown action $action (start | kill)" ;;
esac
