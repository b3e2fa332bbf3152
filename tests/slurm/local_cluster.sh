#!/usr/bin/env bash
# A real, two-node SLURM cluster on this one host, for the SLURM tests and CI.
#
# Usage (as root; Debian/Ubuntu):
#   tests/slurm/local_cluster.sh start    # install what is missing, start everything, wait until both nodes are idle
#   eval "$(tests/slurm/local_cluster.sh env)"   # point sbatch/sacct/... (and the tests) at it
#   .venv/bin/pytest -m slurm tests/slurm
#   tests/slurm/local_cluster.sh status   # daemons, PIDs, sinfo; exit 1 when something is down
#   tests/slurm/local_cluster.sh stop     # cancel jobs, stop every daemon by PID; state is kept
#   tests/slurm/local_cluster.sh wipe     # stop, then delete the state folder
#
# What runs: munged (own key and socket), a MariaDB server (own data folder, socket, port), slurmdbd,
# slurmctld, and two slurmd (node1, node2). Each slurm daemon runs under `unshare --mount --uts` with its
# own hostname and a bind-mounted hosts file mapping ctl/node1/node2 to 127.0.0.1: the nodes have
# distinct hostnames (so a test can see both took part) and a DDP rendezvous by hostname works.
# All traffic stays on loopback; nothing touches the host's /etc or its network configuration.
#
# Environment:
#   DIST_TRAIN_SLURM_DIR   state folder (configs, keys, database, logs, spool); default /tmp/dist_train_slurm
#   DIST_TRAIN_SLURM_PORT  first of the TCP ports used (ctld, ctld+2 dbd, +4/+5 slurmd, +10 MariaDB); default 17817
#   DIST_TRAIN_SLURM_CPUS  CPUs each node offers (default 4, whatever the host has: the tests run several
#                          small 2-node jobs side by side); a changed setting restarts a running cluster
#
# Tuned for tests: cred_expire=10 and sched_interval=2 make a requeued job restart in ~11 s instead of
# ~121 s; KillWait=5 frees the nodes of a cancelled job quickly (submitit ignores SIGTERM). Accounting is
# configured because submitit reads job states with sacct (without it job.result() on a cancelled job
# hangs). Logs: $DIST_TRAIN_SLURM_DIR/log/.
set -euo pipefail

STATE_DIR="${DIST_TRAIN_SLURM_DIR:-/tmp/dist_train_slurm}"
PORT_BASE="${DIST_TRAIN_SLURM_PORT:-17817}"
CLUSTER_NAME="dist_train_test"
NODES=(node1 node2)
CPUS_PER_NODE="${DIST_TRAIN_SLURM_CPUS:-4}"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
COMMANDS=(slurmctld slurmd sbatch sacct munged slurmdbd mariadbd mariadb-install-db)

CTLD_PORT=$PORT_BASE
DBD_PORT=$((PORT_BASE + 2))
NODE_PORT_FIRST=$((PORT_BASE + 4))
DB_PORT=$((PORT_BASE + 10))

ETC="$STATE_DIR/etc"
RUN="$STATE_DIR/run"
LOG="$STATE_DIR/log"
MUNGE_SOCKET="$STATE_DIR/munge/run/munge.socket"
DB_SOCKET="$STATE_DIR/mysql/mysqld.sock"
export SLURM_CONF="$ETC/slurm.conf"

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ------------------------------------------------------------------ installation

install_missing() {
    # Only when a command is missing, so a ready machine starts in seconds.
    local missing=()
    for command in "${COMMANDS[@]}"; do
        command -v "$command" >/dev/null || missing+=("$command")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run as root to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    with_services_blocked apt_install
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$LOG/apt.log" 2>&1 || { tail -20 "$LOG/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >>"$LOG/apt.log" 2>&1 \
        || { tail -20 "$LOG/apt.log" >&2; die "apt-get install failed (log: $LOG/apt.log)"; }
}

with_services_blocked() {
    # Package scripts would start the system's own munge/mariadb/slurm services; a policy-rc.d that
    # denies starts keeps the host clean. Docker images usually have one already: leave theirs alone.
    local policy=/usr/sbin/policy-rc.d
    if [ -e "$policy" ]; then "$@"; return; fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    local status=0
    "$@" || status=$?
    rm -f "$policy"
    return $status
}

# ------------------------------------------------------------------ process bookkeeping

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

is_running() {
    # The recorded PID is alive and is still our daemon (PIDs get reused): its command line or its
    # environment names the state folder.
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && is_alive "$pid" || return 1
    grep -qaF "$STATE_DIR" "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null
}

launch() {
    # Run a daemon in the foreground of its own session, detached from our stdio (CI pipes must not
    # stay open), and record its PID. setsid does not fork here (we are not a group leader), and
    # unshare/sh exec, so $! is the daemon itself.
    local name=$1
    shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

launch_in_host() {
    # launch NAME, giving the daemon its own hostname and the cluster's hosts file (a private mount
    # namespace: the host's /etc/hosts is untouched).
    local name=$1 hostname=$2
    shift 2
    # shellcheck disable=SC2016  # $1/$2/$@ belong to the inner sh
    launch "$name" unshare --mount --uts -- sh -c \
        'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$ETC/hosts" "$hostname" "$@"
}

wait_for() {
    # wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.25 s.
    local seconds=$1 description=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { say "timed out after ${seconds}s waiting for $description"; return 1; }
        sleep 0.25
    done
}

is_alive() {
    # A zombie counts as gone: our daemons are reparented to PID 1, which may reap them late.
    [ -d "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_daemons() {
    # TERM each named daemon, wait up to 10 s for all of them, then KILL what is left.
    local names=("$@") pids=() name pid
    for name in "${names[@]}"; do
        if is_running "$name"; then pids+=("$(pid_of "$name")"); fi
        rm -f "$RUN/$name.pid"
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        local left=()
        for pid in "${pids[@]}"; do if is_alive "$pid"; then left+=("$pid"); fi; done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    say "still running after SIGTERM, killing: ${left[*]}"
    kill -KILL "${left[@]}" 2>/dev/null || true
}

kill_namespace() {
    # Job steps (slurmstepd and the tasks) outlive slurmd: stop every process in the node's own UTS
    # namespace, recorded at start; never the host's namespace.
    local node=$1 namespace pids=()
    namespace=$(cat "$RUN/$node.ns" 2>/dev/null || true)
    [ -n "$namespace" ] && [ "$namespace" != "$(readlink /proc/self/ns/uts)" ] || return 0
    for proc in /proc/[0-9]*; do
        [ "$(readlink "$proc/ns/uts" 2>/dev/null)" = "$namespace" ] && pids+=("${proc#/proc/}")
    done
    [ ${#pids[@]} -eq 0 ] || kill -KILL "${pids[@]}" 2>/dev/null || true
    rm -f "$RUN/$node.ns"
}

# ------------------------------------------------------------------ configuration

write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE_DIR/state" "$STATE_DIR/munge"
    chmod 0755 "$STATE_DIR"
    printf '127.0.0.1 localhost ctl %s\n::1 localhost ip6-localhost ip6-loopback\n' "${NODES[*]}" >"$ETC/hosts"
    render_slurm_conf >"$ETC/slurm.conf"
    write_slurmdbd_conf
}

render_slurm_conf() {
    local memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / ${#NODES[@]} ))
    cat <<EOF
# Written by tests/slurm/local_cluster.sh; regenerated on every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=ctl(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
PropagateResourceLimits=NONE
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
MailProg=/bin/true
EOF
    local index=0
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=127.0.0.1 Port=$((NODE_PORT_FIRST + index)) CPUs=$CPUS_PER_NODE" \
            "RealMemory=$memory_mb State=UNKNOWN"
        index=$((index + 1))
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
}

write_slurmdbd_conf() {
    [ -s "$ETC/db.pass" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$ETC/db.pass")
    (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=ctl
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
    )
}

# ------------------------------------------------------------------ daemons

start_munge() {
    is_running munged && return 0
    local dir="$STATE_DIR/munge"
    mkdir -p "$dir/etc" "$dir/run" "$dir/lib" "$dir/log"
    chmod 0700 "$dir/etc" "$dir/lib" "$dir/log"
    chmod 0755 "$dir" "$dir/run"   # munged refuses a socket folder others cannot traverse
    [ -s "$dir/etc/munge.key" ] || mungekey --create --keyfile="$dir/etc/munge.key"
    chmod 0400 "$dir/etc/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    launch munged munged --foreground --force --key-file="$dir/etc/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$dir/run/munged.pid" --seed-file="$dir/lib/munged.seed" --log-file="$LOG/munged.log"
    wait_for 10 munged munge --socket="$MUNGE_SOCKET" --no-input
}

start_mariadb() {
    is_running mariadbd && return 0
    local data="$STATE_DIR/mysql/data"
    if [ ! -d "$data/mysql" ]; then
        mkdir -p "$data"
        mariadb-install-db --no-defaults --datadir="$data" --user=root --auth-root-authentication-method=socket \
            --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || { tail "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    launch mariadbd mariadbd --no-defaults --datadir="$data" --user=root --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadbd.daemon.pid" \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
        --skip-log-bin
    wait_for 60 "the MariaDB server (log: $LOG/mariadb.log)" mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
    mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$ETC/db.pass")';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
    is_running slurmdbd && return 0
    launch_in_host slurmdbd ctl slurmdbd -D
    wait_for 60 "slurmdbd (log: $LOG/slurmdbd.log)" sacctmgr -n list cluster
}

register_cluster() {
    # slurmctld refuses jobs' accounting until the cluster exists in the database.
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME" && return 0
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
}

start_slurmctld() {
    is_running slurmctld && return 0
    launch_in_host slurmctld ctl slurmctld -D -f "$SLURM_CONF"
    wait_for 30 "slurmctld (log: $LOG/slurmctld.log)" controller_up
}

controller_up() { [[ "$(scontrol ping 2>/dev/null)" == *UP* ]]; }

start_slurmd() {
    local node=$1
    is_running "slurmd-$node" && return 0
    kill_namespace "$node"
    mkdir -p "$STATE_DIR/spool/$node"
    launch_in_host "slurmd-$node" "$node" slurmd -D -N "$node" -f "$SLURM_CONF"
    wait_for 5 "slurmd on $node to enter its namespace" namespace_differs "slurmd-$node"
    readlink "/proc/$(pid_of "slurmd-$node")/ns/uts" >"$RUN/$node.ns"
}

namespace_differs() {
    local pid
    pid=$(pid_of "$1")
    [ "$(readlink "/proc/$pid/ns/uts")" != "$(readlink /proc/self/ns/uts)" ] && [ "$(cat "/proc/$pid/comm")" = slurmd ]
}

nodes_ready() {
    # Every node idle or busy (not down, drained or unknown).
    local states
    states=$(sinfo -h -N -o '%N %t')
    for node in "${NODES[@]}"; do
        echo "$states" | grep -qE "^$node (idle|mix|alloc|comp)$" || return 1
    done
}

all_running() {
    for name in munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        is_running "$name" || return 1
    done
}

# ------------------------------------------------------------------ commands

preflight() {
    # Fail early, with the reason, on what a fresh machine or container may lack: namespaces, free ports.
    unshare --mount --uts -- true 2>/dev/null \
        || die "unshare --mount --uts is not permitted here (needs CAP_SYS_ADMIN: root on a VM or a privileged container)"
    local index=0
    check_port slurmctld "$CTLD_PORT"
    check_port slurmdbd "$DBD_PORT"
    check_port mariadbd "$DB_PORT"
    for node in "${NODES[@]}"; do
        check_port "slurmd-$node" $((NODE_PORT_FIRST + index))
        index=$((index + 1))
    done
}

check_port() {
    # A port must be free unless our own daemon holds it.
    local name=$1 port=$2
    is_running "$name" && return 0
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port (for $name) is taken by another program: set DIST_TRAIN_SLURM_PORT to another base"
    fi
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "run as root (unshare, bind mounts, daemons as root)"
    mkdir -p "$LOG" "$RUN"
    if all_running && nodes_ready; then
        if cmp -s <(render_slurm_conf) "$SLURM_CONF"; then say "already running ($STATE_DIR)"; return 0; fi
        say "settings changed: restarting"
        cmd_stop
    fi
    install_missing
    preflight
    all_running || write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    register_cluster
    start_slurmctld
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    if ! wait_for 10 "both nodes to register" nodes_ready; then
        scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
        wait_for 20 "both nodes to be idle (logs: $LOG)" nodes_ready || { sinfo -N >&2; exit 1; }
    fi
    say "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')(state in $STATE_DIR)"
}

cmd_stop() {
    if is_running slurmctld; then
        scancel --full --quiet --user=root 2>/dev/null || true
        wait_for 8 "jobs to end" no_jobs || true
    fi
    # Nodes first, the controller flushes its accounting to slurmdbd, which needs the database; munge last.
    stop_daemons "${NODES[@]/#/slurmd-}"
    for node in "${NODES[@]}"; do kill_namespace "$node"; done
    stop_daemons slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    say "stopped"
}

no_jobs() { [ -z "$(squeue -h -o %i)" ]; }

cmd_status() {
    local status=0
    for name in munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        if is_running "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; status=1; fi
    done
    if is_running slurmctld; then sinfo -N; squeue; fi
    return $status
}

cmd_env() {
    echo "export SLURM_CONF=$SLURM_CONF"
    echo "export DIST_TRAIN_SLURM_DIR=$STATE_DIR"
}

cmd_wipe() {
    cmd_stop
    case "$STATE_DIR" in /|/tmp|/root|/home|"") die "refusing to delete $STATE_DIR" ;; esac
    rm -rf "$STATE_DIR"
    say "deleted $STATE_DIR"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    wipe) cmd_wipe ;;
    *) echo "usage: $0 start|stop|status|env|wipe" >&2; exit 2 ;;
esac
