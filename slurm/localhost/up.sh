#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on localhost, entirely inside one private folder.
#
#   slurm/localhost/up.sh [--install] [--no-accounting] DIR
#   source DIR/env.sh          # exports SLURM_CONF for sbatch/sinfo/submit
#   slurm/localhost/down.sh DIR
#
# Debian 12 (Slurm 22.05), run as root, no systemd or cgroups needed. Two fake GPUs (character devices
# under DIR/dev) make `--gpus-per-node=2` schedulable; torch sees no CUDA there, so jobs run on CPU/gloo.
# Daemons: munged (private socket), mariadbd + slurmdbd (accounting, so sacct and job states work;
# --no-accounting skips them), slurmctld, slurmd, all on free ports, with state, logs and pids in DIR.
# --install apt-installs the missing Debian packages first (slurmctld slurmd slurm-client munge
# [slurmdbd mariadb-server]). Facts behind the settings: /work/shared/notes/slurm-on-localhost.md.
set -euo pipefail

install=0
accounting=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) install=1; shift ;;
    --no-accounting) accounting=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "up.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -eq 1 ]] || { echo "usage: $0 [--install] [--no-accounting] DIR" >&2; exit 2; }
DIR=$(mkdir -p "$1" && cd "$1" && pwd)
log() { echo "[slurm-up $(date +%H:%M:%S)] $*"; }
die() { echo "up.sh: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the localhost cluster runs its daemons as root (SlurmUser=root); run as root"

# ------------------------------------------------------------------------------------------- packages
need=(slurmctld slurmd slurm-client munge)
bins=(slurmctld slurmd sbatch munged)
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
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port); DBD_PORT=$(free_port); MYSQL_PORT=$(free_port)
mkdir -p "$DIR"/{etc,state,spool,log,run,dev,munge}
read -r CPUS MEM < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
MEM=$(( MEM > 1024 ? MEM - 512 : MEM ))

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
cat >"$DIR/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=$NAME Name=gpu File=$DIR/dev/nvidia[0-1]
EOF

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
cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=intllocal
SlurmctldHost=$NAME(127.0.0.1)
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
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NAME NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NAME Default=YES MaxTime=INFINITE State=UP
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
slurmd -f "$SLURM_CONF"
state=""
for _ in $(seq 150); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
  [[ $state == idle ]] && break
  sleep 0.2
done
[[ $state == idle ]] || die "the node did not become idle (state '$state'; logs in $DIR/log)"
log "Slurm is up: node $NAME, $CPUS CPUs, gres gpu:2, accounting=$accounting; SLURM_CONF=$SLURM_CONF"
