#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for bnexp's SLURM launcher and its tests
# (pytest -m slurm): slurmctld, slurmd, and slurmdbd with MariaDB for accounting (submitit
# follows jobs through sacct), authenticated by munge. Debian's packages; runs as root.
#
#   scripts/slurm_local.sh install   apt-get install the packages (once)
#   scripts/slurm_local.sh start     write the configs, start the daemons, wait until ready
#   scripts/slurm_local.sh stop      stop them (the state directory stays)
#   scripts/slurm_local.sh status    sinfo and the daemons' PIDs
#   eval "$(scripts/slurm_local.sh env)"   point sbatch/squeue/sacct at this cluster
#
# Everything lives in $BNEXP_SLURM_STATE (default /tmp/bnexp-slurm): slurm.conf and
# slurmdbd.conf (slurmdbd reads its conf from the directory of $SLURM_CONF), the daemons'
# spool, logs and PID files, MariaDB's data and socket. Made to run in a container:
# proctrack/linuxproc and task/none (no cgroups), daemons started directly (no systemd).
# Two partitions on the one node: `debug` (the default) and `gpu`, whose node declares one GPU
# as a generic resource (GRES) without a device file, so that GPU requests are scheduled as on
# a GPU cluster (--gpus-per-node, GRES accounting) while the job itself finds no CUDA device.
set -euo pipefail

STATE=${BNEXP_SLURM_STATE:-/tmp/bnexp-slurm}
CONF=$STATE/slurm.conf
HOST=$(hostname -s)
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
CLUSTER=bnexp

say() { echo "slurm_local: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it starts system daemons)"; }

install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null \
        && command -v munged >/dev/null && command -v mariadbd >/dev/null; then
        say "packages already installed"; return
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >/dev/null \
        || die "apt-get install ${PACKAGES[*]} failed"
}

write_configs() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, 1 GB kept
    mkdir -p "$STATE"/{spool/ctld,spool/d,log,run,mysql}
    cat >"$CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Short intervals: a test cluster, so that states change within seconds.
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=60
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
JobCompType=jobcomp/none
# Requeued jobs (submitit's timeout protocol) start again at once.
JobRequeue=1
GresTypes=gpu
AccountingStorageTRES=gres/gpu
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$HOST Name=gpu File=/dev/null" >"$STATE/gres.conf"  # a device file that is no GPU
    cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=bnexp-slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq "$((seconds * 2))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "$what did not come up in ${seconds}s (logs in $STATE/log)"
}

# A daemon removes its pid file as it exits: a file gone between the test and the read is "not
# running", not an error message.
running() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start() {
    need_root
    command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' first"
    write_configs
    export SLURM_CONF=$CONF
    # munge, on its default socket (slurm's and slurmdbd's default too).
    mkdir -p /run/munge && chown munge:munge /run/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- munged || die "munged did not start"
    fi
    wait_for 10 munge munge -n
    # MariaDB with its data in the state directory, on localhost only.
    if ! running "$STATE/run/mariadb.pid"; then
        if [ ! -d "$STATE/mysql/mysql" ]; then
            mariadb-install-db --user=root --datadir="$STATE/mysql" >"$STATE/log/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
        fi
        mkdir -p /run/mysqld
        nohup mariadbd --user=root --datadir="$STATE/mysql" --bind-address=127.0.0.1 \
            --port=3306 --socket=/run/mysqld/mysqld.sock --pid-file="$STATE/run/mariadb.pid" \
            --log-error="$STATE/log/mariadb.log" >/dev/null 2>&1 &
    fi
    wait_for 30 MariaDB mariadb --socket=/run/mysqld/mysqld.sock -e "select 1"
    mariadb --socket=/run/mysqld/mysqld.sock <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'bnexp-slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    if ! running "$STATE/run/slurmdbd.pid"; then
        slurmdbd || die "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
    fi
    wait_for 30 slurmdbd sacctmgr -i show cluster
    sacctmgr -i show cluster -n format=cluster | grep -qw "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    if ! running "$STATE/run/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    fi
    wait_for 30 slurmctld scontrol ping
    if ! running "$STATE/run/slurmd.pid"; then
        slurmd || die "slurmd did not start (see $STATE/log/slurmd.log)"
    fi
    # A node that an earlier configuration drained comes back once its slurmd has registered.
    sleep 1
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for 60 "the node" bash -c "sinfo -h -N -o %t | grep -Eq '^(idle|mix|alloc)'"
    # Accounting must see jobs for submitit to follow them.
    wait_for 30 "accounting" sacct -n -X
    say "up: $(sinfo -h -o '%P %D %c CPUs %m MB %t') — eval \"\$($0 env)\" to use it"
}

stop() {
    for daemon in slurmd slurmctld slurmdbd mariadb; do
        local pidfile=$STATE/run/$daemon.pid
        if running "$pidfile"; then
            kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 40); do running "$pidfile" || break; sleep 0.25; done
        fi
    done
    pkill -x munged 2>/dev/null || true
    for _ in $(seq 40); do pgrep -x munged >/dev/null || break; sleep 0.25; done
    say "stopped"
}

status() {
    export SLURM_CONF=$CONF
    for daemon in slurmctld slurmd slurmdbd mariadb; do
        if running "$STATE/run/$daemon.pid"; then echo "$daemon: running ($(cat "$STATE/run/$daemon.pid"))"
        else echo "$daemon: not running"; fi
    done
    sinfo 2>/dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
