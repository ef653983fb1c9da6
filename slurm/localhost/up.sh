#!/usr/bin/env bash
# Bring up a real Slurm cluster on this machine, entirely inside one private folder.
#
#   slurm/localhost/up.sh [--install] [--no-accounting] [--nodes N] DIR
#   source DIR/env.sh          # exports SLURM_CONF for sbatch/sinfo/submit
#   slurm/localhost/down.sh [--purge] DIR
#
# Debian 12 (Slurm 22.05), run as root, no systemd or cgroups needed. Two fake GPUs per node (character
# devices under DIR/dev) make `--gpus-per-node=2` schedulable; torch sees no CUDA there, so jobs run on
# CPU/gloo. Daemons: munged (private socket), mariadbd + slurmdbd (accounting, so sacct and job states
# work; --no-accounting skips them), slurmctld, one slurmd per node, all on free ports, with state, logs
# and pids in DIR. ClusterName is derived from DIR, so two clusters on one machine never share state.
# --nodes 1 (default): one node named after `hostname -s` at 127.0.0.1.
# --nodes N >= 2: N nodes <prefix>-n1 ... <prefix>-nN, each slurmd in its own network namespace (and its
#   own hostname: UTS namespace) with its own address on a private bridge (10.x.y.0/24, veth pairs, named
#   after DIR); slurmctld on the host side of the bridge (10.x.y.1); the node names resolve through lines
#   that this script adds to /etc/hosts (and down.sh removes). Jobs run inside their node's namespace and
#   see the shared filesystem, as on a real cluster. DIR/nodes.env records what was made;
#   slurm/localhost/node.sh DIR stop|start NODE kills a node (its slurmd and every process on it) or
#   starts it again.
# --install apt-installs the missing Debian packages first (slurmctld slurmd slurm-client munge
# [slurmdbd mariadb-server], iproute2 for --nodes >= 2). Facts behind the settings:
# /work/shared/notes/slurm-on-localhost.md.
set -euo pipefail

install=0
accounting=1
nodes=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) install=1; shift ;;
    --no-accounting) accounting=0; shift ;;
    --nodes) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "up.sh: --nodes takes a count >= 1" >&2; exit 2; }
             nodes=$2; shift 2 ;;
    --nodes=*) nodes=${1#--nodes=}; [[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "up.sh: --nodes takes a count >= 1" >&2; exit 2; }
               shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "up.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -eq 1 ]] || { echo "usage: $0 [--install] [--no-accounting] [--nodes N] DIR" >&2; exit 2; }
[[ $nodes -le 50 ]] || { echo "up.sh: --nodes $nodes: at most 50 nodes on one machine" >&2; exit 2; }
DIR=$(mkdir -p "$1" && cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[slurm-up $(date +%H:%M:%S)] $*"; }
die() { echo "up.sh: error: $*" >&2; exit 1; }
[[ -e $DIR/run/slurmctld.pid ]] && die "$DIR already holds a cluster (run/slurmctld.pid); fix: slurm/localhost/down.sh --purge $DIR first"

[[ $(id -u) -eq 0 ]] || die "the localhost cluster runs its daemons as root (SlurmUser=root); run as root"

# ------------------------------------------------------------------------------------------- packages
need=(slurmctld slurmd slurm-client munge)
bins=(slurmctld slurmd sbatch munged)
if [[ $nodes -gt 1 ]]; then need+=(iproute2); bins+=(ip); fi
if [[ $accounting -eq 1 ]]; then need+=(slurmdbd mariadb-server); bins+=(slurmdbd mariadbd); fi
missing=0
for b in "${bins[@]}"; do command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing=1; done
if [[ $missing -eq 1 ]]; then
  [[ $install -eq 1 ]] || die "Slurm packages are missing; fix: rerun with --install (apt-get install ${need[*]})"
  command -v apt-get >/dev/null || die "no apt-get here; install ${need[*]} with your package manager"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # A policy-rc.d that denies keeps the packages' init scripts from starting system-wide daemons
  # (munge, mariadb, slurm*) on their default sockets and ports; only this script's private ones run.
  own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  status=0
  apt-get install -y -qq --no-install-recommends "${need[@]}" >"$DIR/apt.log" 2>&1 || status=$?
  if [[ $own_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
  [[ $status -eq 0 ]] || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
fi
export PATH="$PATH:/usr/sbin:/sbin"

# ------------------------------------------------------------------------------------ host and ports
NAME=$(hostname -s)
if ! getent hosts "$NAME" >/dev/null; then
  log "adding 127.0.0.1 $NAME to /etc/hosts (the node name must resolve)"
  echo "127.0.0.1 $NAME" >>/etc/hosts
fi
# One id per cluster folder: the ClusterName, and with --nodes >= 2 the node names, namespaces, bridge,
# veths, subnet and /etc/hosts tag, so that two clusters on one machine never meet.
ID=$(printf '%s' "$DIR" | cksum | awk '{printf "%08x", $1}')
CLUSTER="intl$ID"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port); DBD_PORT=$(free_port); MYSQL_PORT=$(free_port)
mkdir -p "$DIR"/{etc,state,spool,log,run,dev,munge}
read -r CPUS MEM < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
MEM=$(( MEM > 1024 ? MEM - 512 : MEM ))

if [[ $nodes -eq 1 ]]; then
  NODE_NAMES=("$NAME"); NODE_ADDRS=(127.0.0.1); CTLD_ADDR=127.0.0.1
  SLURMD_FILES="SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdSpoolDir=$DIR/spool"
else
  # ------------------------------------------------------------------ network: bridge, namespaces, veths
  SHORT=${ID:0:4}
  PREFIX="intl$SHORT"                       # node names $PREFIX-n1 ..., interfaces ${PREFIX}br, ${PREFIX}n1 ...
  BRIDGE="${PREFIX}br"
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "a bridge $BRIDGE exists already (another cluster from a folder with the same id?); fix: slurm/localhost/down.sh it first"
  # A /24 no interface of this machine uses: 10.(200+h%50).(h/50%256).0, the next one if taken.
  h=$((16#$ID)); a=$((200 + h % 50)); b=$((h / 50 % 256)); SUBNET=""
  used=$(ip -4 -o addr show | awk '{print $4}'; ip -4 route show | awk '{print $1}')
  for _ in $(seq 256); do
    if ! grep -q "^10\.$a\.$b\." <<<"$used"; then SUBNET="10.$a.$b"; break; fi
    b=$(( (b + 1) % 256 ))
  done
  [[ -n $SUBNET ]] || die "no free 10.$a.x.0/24 subnet for the node bridge"
  CTLD_ADDR="$SUBNET.1"
  NODE_NAMES=(); NODE_ADDRS=()
  for i in $(seq "$nodes"); do NODE_NAMES+=("$PREFIX-n$i"); NODE_ADDRS+=("$SUBNET.$((10 + i))"); done
  HOSTS_TAG="# intl-slurm-$ID "   # + the folder; the id is of fixed length, so no tag is a prefix of another
  # What exists is recorded before it is made, so down.sh removes it even if this script stops half-way.
  {
    echo "BRIDGE=$BRIDGE"
    echo "SUBNET=$SUBNET"
    echo "HOSTS_TAG='$HOSTS_TAG'"
    echo "NODES='${NODE_NAMES[*]}'"
    echo "ADDRS='${NODE_ADDRS[*]}'"
  } >"$DIR/nodes.env"
  log "network: bridge $BRIDGE $CTLD_ADDR/24, nodes ${NODE_NAMES[*]} at ${NODE_ADDRS[*]}"
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in "${!NODE_NAMES[@]}"; do
    node=${NODE_NAMES[$i]}; veth="${PREFIX}n$((i + 1))"
    ip netns add "$node"
    ip link add "$veth" type veth peer name eth0 netns "$node"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$node" link set lo up
    ip -n "$node" addr add "${NODE_ADDRS[$i]}/24" dev eth0
    ip -n "$node" link set eth0 up
  done
  # The node names resolve to their addresses everywhere (the host, every node): one tagged line each.
  (
    flock 9
    grep -vF "$HOSTS_TAG" /etc/hosts >"$DIR/hosts.tmp" || true
    for i in "${!NODE_NAMES[@]}"; do echo "${NODE_ADDRS[$i]} ${NODE_NAMES[$i]} $HOSTS_TAG$DIR"; done >>"$DIR/hosts.tmp"
    cat "$DIR/hosts.tmp" >/etc/hosts   # rewritten in place: /etc/hosts may be a bind mount
    rm -f "$DIR/hosts.tmp"
  ) 9</etc/hosts   # one writer at a time (another cluster may come or go now)
  SLURMD_FILES="SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdSpoolDir=$DIR/spool/%n
SlurmdTimeout=20"
fi

# -------------------------------------------------------------------------------------------- munge
[[ -s /etc/munge/munge.key ]] || mungekey -c -k /etc/munge/munge.key
chmod 0755 "$DIR"  # munged needs every folder above its socket to be traversable by all
chown munge:munge "$DIR/munge" && chmod 0755 "$DIR/munge"
SOCK="$DIR/munge/munge.sock"
runuser -u munge -- munged --socket="$SOCK" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
for _ in $(seq 50); do [[ -S $SOCK ]] && break; sleep 0.1; done
[[ -S $SOCK ]] || die "munged did not start (log: $DIR/munge/munged.log)"
cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"

# ------------------------------------------------------------------------------- fake GPUs (gres)
# Character devices make Slurm bind them (CUDA_VISIBLE_DEVICES per task); where mknod is not allowed
# (some containers) regular files still let --gpus-per-node jobs schedule, without that binding.
gpu_files=char
for i in 0 1; do
  [[ -c $DIR/dev/nvidia$i ]] && continue
  if ! mknod "$DIR/dev/nvidia$i" c 195 "$i" 2>/dev/null; then
    gpu_files=regular; : >"$DIR/dev/nvidia$i"
  fi
done
[[ $gpu_files == char ]] || log "warning: mknod not permitted; fake GPUs are regular files (no CUDA_VISIBLE_DEVICES binding)"
{
  echo "AutoDetect=off"
  for node in "${NODE_NAMES[@]}"; do echo "NodeName=$node Name=gpu File=$DIR/dev/nvidia[0-1]"; done
} >"$DIR/etc/gres.conf"

# ------------------------------------------------------------------------------------- accounting
acct_lines="AccountingStorageType=accounting_storage/none"
if [[ $accounting -eq 1 ]]; then
  DB="$DIR/mysql"
  log "initialising MariaDB in $DB"
  mariadb-install-db --no-defaults --datadir="$DB" --user=root --auth-root-authentication-method=socket \
    --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed ($DIR/log/mariadb-install.log)"
  setsid mariadbd --no-defaults --datadir="$DB" --user=root --socket="$DIR/run/mysqld.sock" \
    --pid-file="$DIR/run/mysqld.pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$DIR/log/mysqld.log" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do mysqladmin --no-defaults -S "$DIR/run/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin --no-defaults -S "$DIR/run/mysqld.sock" ping >/dev/null 2>&1 || die "MariaDB did not start ($DIR/log/mysqld.log)"
  mariadb --no-defaults -S "$DIR/run/mysqld.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=$NAME
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$SOCK"
fi

# ------------------------------------------------------------------------------------- slurm.conf
NODE_LINES=""
for i in "${!NODE_NAMES[@]}"; do
  NODE_LINES+="NodeName=${NODE_NAMES[$i]} NodeAddr=${NODE_ADDRS[$i]} CPUs=$CPUS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN"$'\n'
done
ALL_NODES=$(IFS=,; echo "${NODE_NAMES[*]}")
cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NAME($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK,cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
KillWait=5
MinJobAge=600
ReturnToService=2
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageTRES=gres/gpu
$acct_lines
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$SLURMD_FILES
${NODE_LINES}PartitionName=debug Nodes=$ALL_NODES Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/etc/slurm.conf"
printf 'export SLURM_CONF=%s\nexport INTL_FAKE_GPU_FILES=%s\n' "$SLURM_CONF" "$gpu_files" >"$DIR/env.sh"

# --------------------------------------------------------------------------------------- daemons
if [[ $accounting -eq 1 ]]; then
  slurmdbd
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT) 2>/dev/null && break; sleep 0.2; done
  (exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT) 2>/dev/null || die "slurmdbd did not start ($DIR/log/slurmdbd.log)"
fi
slurmctld -f "$SLURM_CONF"
if [[ $nodes -eq 1 ]]; then
  slurmd -f "$SLURM_CONF"
else
  for node in "${NODE_NAMES[@]}"; do bash "$HERE/node.sh" "$DIR" start "$node" --no-wait; done
fi
states=""
for _ in $(seq 150); do
  states=$(sinfo -h -N -o %t 2>/dev/null | sort | uniq -c | awk '{print $2 "x" $1}' | tr '\n' ' ' || true)
  [[ $states == "idlex$nodes " ]] && break
  sleep 0.2
done
[[ $states == "idlex$nodes " ]] || die "the $nodes node(s) did not all become idle (states: '$states'; logs in $DIR/log)"
log "Slurm is up: cluster $CLUSTER, node(s) ${NODE_NAMES[*]}, $CPUS CPUs and gres gpu:2 each, accounting=$accounting; SLURM_CONF=$SLURM_CONF"
