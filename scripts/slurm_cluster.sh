#!/usr/bin/env bash
# A Slurm cluster on this one machine, private to a state directory, for the tests and for trying the Slurm path:
#
#   scripts/slurm_cluster.sh up DIR     write configs into DIR, start munged, MariaDB, slurmdbd, slurmctld and two
#                                       slurmd nodes (all as this user, on free localhost ports), wait until the
#                                       nodes are idle, and print the line to source: export SLURM_CONF=DIR/etc/slurm.conf
#   scripts/slurm_cluster.sh down DIR   cancel the cluster's jobs and stop the daemons `up` started (by the process
#                                       ids it recorded in DIR/pids), then wait until they are gone
#   scripts/slurm_cluster.sh check      exit 0 when it can run here (the Debian packages installed, two names of
#                                       this machine that resolve), else say what is missing
#
# Nothing outside DIR is written or started: the daemons' sockets, ports, pid files, spool, state and logs are all
# DIR's, and the munge key is a fresh one. Needs Debian's slurm-wlm, slurmdbd, munge and mariadb-server (see
# .ci/run). Accounting (slurmdbd on MariaDB) is there because `torchx status` and `torchx run --wait` ask `sacct`.
# Written here: Slurm ships no such launcher for a throwaway cluster.
set -euo pipefail

NEEDED=(munged mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch srun sacct sacctmgr scontrol sinfo)
UP_TIMEOUT=${SLURM_CLUSTER_UP_TIMEOUT:-120}
# How long a job credential lives, which is also how long a requeued job waits before it starts again: Slurm's
# default is 120 s, which would make every requeue in the tests wait two minutes. And once it may start, only the
# backfill scheduler starts a heterogeneous job (torchx's multi-host jobs), which runs only after some state changed:
# on an idle cluster, the next node ping, every SlurmdTimeout/3 (in slurm.conf below: 30 s, not the default 300 s).
CRED_EXPIRE=${SLURM_CLUSTER_CRED_EXPIRE:-10}

die() { echo "slurm_cluster: $*" >&2; exit 1; }

missing() {
    local m=()
    for b in "${NEEDED[@]}"; do command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || m+=("$b"); done
    echo "${m[*]}"
}

free_ports() {  # N free TCP ports on localhost
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

start() {  # NAME LOG CMD...: start a daemon in the foreground of its own session, record its pid
    local name=$1 log=$2
    shift 2
    setsid "$@" >>"$log" 2>&1 </dev/null &
    echo "$name $!" >>"$STATE/pids"
}

wait_for() {  # WHAT LOG CMD...: retry CMD until it succeeds or UP_TIMEOUT passes
    local what=$1 log=$2 deadline=$((SECONDS + UP_TIMEOUT))
    shift 2
    until timeout 10 "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "slurm_cluster: $what did not come up in ${UP_TIMEOUT}s; the end of $log:" >&2
            tail -n 20 "$log" >&2 || true
            down_daemons
            exit 1
        fi
        sleep 0.5
    done
}

node_names() {  # two names for the nodes that resolve to this machine: torchx's workers rendezvous at the first
    # node's name (SLURM_JOB_NODELIST_HET_GROUP_0), so made-up names would not do
    local names=() n
    for n in "$(hostname -s)" localhost $(awk '$1 ~ /^127\./ {for (i = 2; i <= NF; i++) print $i}' /etc/hosts); do
        case " ${names[*]} " in *" $n "*) continue ;; esac
        getent hosts "$n" >/dev/null && names+=("$n")
    done
    [ "${#names[@]}" -ge 2 ] || die "need two names of this machine that resolve (have: ${names[*]}); add one to /etc/hosts"
    echo "${names[0]} ${names[1]}"
}

node_lines() {  # HOST NODE...: a slurmd node per NODE on HOST, splitting its CPUs and memory between them
    local host=$1 cpus mem ports i=0 n
    shift
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    [ $((cpus % $#)) = 0 ] || die "$cpus CPUs do not split evenly into $# nodes"
    read -r -a ports <<<"$(free_ports $#)"
    for n in "$@"; do
        echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$((cpus / $#))" \
            "RealMemory=$((mem / $#)) State=UNKNOWN"
        i=$((i + 1))
    done
}

up() {
    local m
    m=$(missing)
    [ -z "$m" ] || die "missing: $m (Debian: apt-get install slurm-wlm slurmdbd munge mariadb-server)"
    [ -e "$STATE/pids" ] && die "$STATE/pids exists: a cluster may be running there; run '$0 down $STATE' first"
    mkdir -p "$STATE"/{etc,munge,mysql,log,ctld,spool}
    chmod 700 "$STATE" "$STATE/munge" "$STATE/etc"
    : >"$STATE/pids"
    local host user db_port dbd_port ctld_port nodes
    host=$(hostname -s)
    # Two slurmd nodes on this one machine: torchx submits a multi-host job as a heterogeneous job, one component per
    # host, and Slurm's backfill scheduler (the one that starts heterogeneous jobs) plans whole nodes, so two
    # components never start together on one node.
    read -r -a nodes <<<"$(node_names)"
    user=$(id -un)
    read -r db_port dbd_port ctld_port <<<"$(free_ports 3)"

    # munge: a fresh key, its own socket
    head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    local socket="$STATE/munge/munge.socket"
    start munged "$STATE/log/munged.out" munged --foreground --force --key-file="$STATE/munge/munge.key" \
        --socket="$socket" --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    wait_for munged "$STATE/log/munged.log" test -S "$socket"

    # MariaDB for slurmdbd: its own data dir, socket and localhost port
    mariadb-install-db --no-defaults --datadir="$STATE/mysql/data" --user="$user" --skip-test-db \
        --auth-root-authentication-method=normal >"$STATE/log/mariadb-install.log" 2>&1 \
        || { tail -n 20 "$STATE/log/mariadb-install.log" >&2; down_daemons; die "mariadb-install-db failed"; }
    start mariadbd "$STATE/log/mariadb.log" mariadbd --no-defaults --datadir="$STATE/mysql/data" --user="$user" \
        --socket="$STATE/mysql/mysqld.sock" --pid-file="$STATE/mysql/mysqld.pid" --port="$db_port" \
        --bind-address=127.0.0.1 --skip-log-bin --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --log-error="$STATE/log/mariadb.log"
    wait_for mariadbd "$STATE/log/mariadb.log" mariadb --no-defaults --socket="$STATE/mysql/mysqld.sock" -uroot \
        -e "select 1"
    mariadb --no-defaults --socket="$STATE/mysql/mysqld.sock" -uroot -e \
        "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

    cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=$user
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"

    cat >"$STATE/etc/slurm.conf" <<EOF
ClusterName=dqrm
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$ctld_port
AuthType=auth/munge
AuthInfo=socket=$socket,cred_expire=$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
SchedulerParameters=bf_interval=1
SlurmdTimeout=30
$(node_lines "$host" "${nodes[@]}")
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$STATE/etc/slurm.conf"

    start slurmdbd "$STATE/log/slurmdbd.out" slurmdbd -D
    wait_for slurmdbd "$STATE/log/slurmdbd.log" sacctmgr -n list cluster
    sacctmgr -i add cluster dqrm >/dev/null 2>&1 || true
    start slurmctld "$STATE/log/slurmctld.out" slurmctld -D -i
    wait_for slurmctld "$STATE/log/slurmctld.log" scontrol ping
    local n
    for n in "${nodes[@]}"; do
        mkdir -p "$STATE/spool/$n"
        start "slurmd-$n" "$STATE/log/slurmd-$n.out" slurmd -D -N "$n"
    done
    wait_for "nodes ${nodes[*]}" "$STATE/log/slurmd-${nodes[0]}.log" \
        bash -c "[ \"\$(sinfo -h -N -o %T | grep -cx idle)\" = ${#nodes[@]} ]"
    echo "export SLURM_CONF=$SLURM_CONF"
}

down_daemons() {  # stop the recorded daemons, newest first; SIGKILL what is left after 30 s
    [ -e "$STATE/pids" ] || return 0
    local pids=() name pid
    while read -r name pid; do pids=("$pid" "${pids[@]}"); done <"$STATE/pids"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 60); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$STATE/pids"
}

down() {
    [ -e "$STATE/pids" ] || { echo "slurm_cluster: no cluster recorded in $STATE" >&2; return 0; }
    export SLURM_CONF="$STATE/etc/slurm.conf"
    # the jobs first, through the cluster itself: their processes are the daemons' children
    if scancel --full --quiet --user="$(id -un)" 2>/dev/null; then
        for _ in $(seq 60); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    down_daemons
}

case "${1:-}" in
    up) [ $# -eq 2 ] || die "usage: $0 up DIR"; STATE=$(realpath -m "$2"); up ;;
    down) [ $# -eq 2 ] || die "usage: $0 down DIR"; STATE=$(realpath -m "$2"); down ;;
    check)
        m=$(missing)
        [ -z "$m" ] || { echo "missing: $m"; exit 1; }
        (node_names >/dev/null) 2>&1 | sed 's/^slurm_cluster: //' ;
        [ "${PIPESTATUS[0]}" = 0 ] || exit 1 ;;
    *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 2 ;;
esac
