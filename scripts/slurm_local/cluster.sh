#!/usr/bin/env bash
# Throw-away one-node SLURM cluster on localhost, FOR THE TEST SUITE / LOCAL TRIALS ONLY.
#
#   cluster.sh install      apt-get install slurmctld slurmd slurm-client munge (root, idempotent)
#   cluster.sh start DIR    private munged + slurmctld + slurmd, all state/logs/pids under DIR;
#                           waits for the node to be idle, then prints on stdout
#                               export SLURM_CONF=DIR/slurm.conf
#                           (so `eval "$(cluster.sh start DIR)"` works; progress goes to stderr)
#   cluster.sh stop DIR     cancel jobs, kill slurmd, slurmctld, munged started from DIR (idempotent)
#
# Nothing is written to /etc/slurm or /etc/munge by start/stop: the daemons get their config
# with -f DIR/slurm.conf, clients with SLURM_CONF, and munge is reached through
# AuthInfo=socket=DIR/munge/munge.socket (used by both auth/munge and cred/munge in 22.05).
# Only `install` touches the system: the Debian packages themselves create /etc/munge/munge.key,
# /etc/slurm/, the munge/slurm users, etc. (package maintainer scripts; we do not use them).
# The system /run/munge munged is neither started nor needed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/slurm.conf.in"
PKGS=(slurmctld slurmd slurm-client munge)
# Debian installs the daemons in /usr/sbin, which may not be on a non-login PATH.
export PATH="$PATH:/usr/sbin:/sbin"

# How long apt-get waits for locks another apt or dpkg holds (a machine's unattended upgrades, another
# install running beside the tests). DPkg::Lock::Timeout covers dpkg's locks only: apt 2.6 still refuses at
# once when the lists lock (apt-get update) or the archives lock (downloads) is held, so apt_get retries a
# refusal that names a lock until the same deadline.
APT_LOCK_WAIT=${SLURM_LOCAL_APT_LOCK_WAIT:-600}

log() { echo "[slurm_local] $*" >&2; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

apt_get() {  # apt-get "$@" that waits up to APT_LOCK_WAIT s in all for locks held by another apt or dpkg
    local t0=$SECONDS out rc
    while true; do
        rc=0
        out=$(apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_WAIT" "$@" 2>&1) || rc=$?
        printf '%s\n' "$out"
        (( rc != 0 )) || return 0
        grep -q "Could not get lock" <<<"$out" && (( SECONDS - t0 < APT_LOCK_WAIT )) || return "$rc"
        log "apt-get $1: another apt or dpkg holds a lock; retrying in 5 s"
        sleep 5
    done
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (daemons run as root, install uses apt-get)"; }

cmd_install() {
    need_root
    command -v apt-get >/dev/null || die "apt-get not found: only Debian/Ubuntu (Debian 12, slurm 22.05)"
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "already installed: ${PKGS[*]}"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -qq --no-install-recommends -o Dpkg::Use-Pty=0)
    # apt/dpkg chatter (maintainer scripts, policy-rc.d refusals) goes to a log, shown on failure.
    local aptlog; aptlog=$(mktemp /tmp/slurm_local_install.XXXXXX.log)
    # Refresh the package lists only when there are none, or when the first attempt fails.
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
        log "apt-get update"
        apt_get update -qq >>"$aptlog" 2>&1 || { cat "$aptlog" >&2; die "apt-get update failed"; }
    fi
    log "apt-get install ${missing[*]}"
    if ! apt_get install "${apt_opts[@]}" "${missing[@]}" >>"$aptlog" 2>&1; then
        log "install failed, retrying after apt-get update"
        if ! { apt_get update -qq && apt_get install "${apt_opts[@]}" "${missing[@]}"; } >>"$aptlog" 2>&1
        then
            cat "$aptlog" >&2; die "apt-get install failed (log: $aptlog)"
        fi
    fi
    rm -f "$aptlog"
    log "installed: $(slurmctld -V 2>/dev/null || echo '?'), $(munged -V 2>&1 | head -n1 || echo '?')"
}

port_in_use() {  # $1 = port; true if something listens on TCP $1
    if command -v ss >/dev/null; then
        [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]
    else
        local hex; hex=$(printf ':%04X ' "$1")
        grep -qi "$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null
    fi
}

free_port() {  # $1 = port to avoid; prints a free TCP port in 20000-59999
    local p i
    for i in $(seq 1 200); do
        p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
        [[ "$p" == "${1:-}" ]] && continue
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "no free TCP port found"
}

pid_alive() {  # $1 = pidfile, $2 = expected command name; prints pid if that process runs
    local pid comm
    [[ -s "$1" ]] || return 1
    pid=$( { tr -dc '0-9' <"$1"; } 2>/dev/null ) || return 1   # daemon may delete it meanwhile
    [[ -n "$pid" ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ "$comm" == "$2"* ]] || return 1   # pid recycled by something else
    # A zombie (exited, not yet reaped by PID 1) counts as stopped.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
    echo "$pid"
}

show_logs() {
    local f
    for f in "$DIR"/munge/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
        [[ -f "$f" ]] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}

fail() {  # print the logs, stop what was started from DIR, exit 1
    show_logs
    cmd_stop_quiet || true
    die "$* (daemons started from $DIR were stopped)"
}

cmd_start() {
    need_root
    local b
    for b in munged slurmctld slurmd sinfo; do
        command -v "$b" >/dev/null || die "$b not found: run '$0 install' first"
    done
    [[ -f "$TEMPLATE" ]] || die "template not found: $TEMPLATE"
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    local conf="$DIR/slurm.conf"
    export SLURM_CONF="$conf"

    if pid_alive "$DIR/slurmctld.pid" slurmctld >/dev/null && pid_alive "$DIR/slurmd.pid" slurmd >/dev/null
    then
        log "cluster in $DIR already running"
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    cmd_stop_quiet   # leftovers of a half-started cluster

    # --- munge: private key, socket, pid, log, seed, all in DIR/munge (0755) ---
    mkdir -p "$DIR/munge" "$DIR/ctld_state" "$DIR/d_spool"
    # munged requires the socket dir to be world-executable and not group/other-writable.
    chmod 0755 "$DIR" "$DIR/munge"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
        else
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 0600 "$DIR/munge/munge.key"
    munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
           --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
           --seed-file="$DIR/munge/munged.seed" \
        || fail "munged failed to start"

    # --- render slurm.conf ---
    local node cpus mem port_ctld port_d
    node=$(hostname -s)
    # not `nproc`: it honours OMP_NUM_THREADS (1 in the test suite) and would declare a 1-CPU node
    cpus=${SLURM_LOCAL_CPUS:-$(getconf _NPROCESSORS_ONLN)}
    # 90% of physical memory (MiB): slurmd drains the node if RealMemory exceeds what it detects.
    mem=${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)}
    port_ctld=$(free_port)
    port_d=$(free_port "$port_ctld")
    sed -e "s|@STATE_DIR@|$DIR|g" -e "s|@NODENAME@|$node|g" -e "s|@CPUS@|$cpus|g" \
        -e "s|@REAL_MEMORY@|$mem|g" -e "s|@SLURM_USER@|root|g" \
        -e "s|@PORT_CTLD@|$port_ctld|g" -e "s|@PORT_D@|$port_d|g" "$TEMPLATE" >"$conf"
    if grep -v '^#' "$conf" | grep -q '@[A-Z_]*@'; then fail "unsubstituted placeholder in $conf"; fi

    # --- daemons (they daemonize themselves and write their pid files) ---
    # -c: start slurmctld from a clean state (the state dir is ours anyway).
    slurmctld -f "$conf" -c || fail "slurmctld failed to start"
    slurmd -f "$conf" -N "$node" || fail "slurmd failed to start"

    # --- wait for the node to be idle ---
    local state="" t0=$SECONDS
    while (( SECONDS - t0 < ${SLURM_LOCAL_START_TIMEOUT:-60} )); do
        state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -n1 || true)
        [[ "$state" == idle* ]] && break
        sleep 1
    done
    if [[ "$state" != idle* ]]; then
        sinfo -N -l >&2 || true
        fail "node $node not idle after ${SLURM_LOCAL_START_TIMEOUT:-60}s (state='$state')"
    fi
    log "cluster up in $DIR: node $node ($cpus CPUs, ${mem} MiB), slurmctld :$port_ctld, slurmd :$port_d"
    echo "export SLURM_CONF=$conf"
}

kill_pidfile() {  # $1 = pidfile, $2 = command name
    local pid i
    pid=$(pid_alive "$1" "$2") || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        pid_alive "$1" "$2" >/dev/null || break
        sleep 0.2
    done
    if pid_alive "$1" "$2" >/dev/null; then
        log "$2 ($pid) still alive after 10s, SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$1"
}

cmd_stop_quiet() {
    local conf="$DIR/slurm.conf" i
    # Cancel remaining jobs first, so no slurmstepd/job processes outlive slurmd.
    if [[ -f "$conf" ]] && pid_alive "$DIR/slurmctld.pid" slurmctld >/dev/null; then
        if [[ -n "$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null)" ]]; then
            SLURM_CONF=$conf scancel --full $(SLURM_CONF=$conf squeue -h -o %i) 2>/dev/null || true
            for i in $(seq 1 30); do
                [[ -z "$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 0.5
            done
        fi
    fi
    kill_pidfile "$DIR/slurmd.pid" slurmd
    kill_pidfile "$DIR/slurmctld.pid" slurmctld
    kill_pidfile "$DIR/munge/munged.pid" munged
    # Last resort: slurmstepd processes holding files in OUR spool dir.
    local p
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        if ls -l "/proc/$p/fd" 2>/dev/null | grep -q -- "$DIR/d_spool"; then
            log "killing leftover slurmstepd $p"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    [[ -d "$DIR" ]] || { log "$DIR does not exist, nothing to stop"; return 0; }
    DIR="$(cd "$DIR" && pwd)"
    cmd_stop_quiet
    log "stopped cluster in $DIR"
}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

case "${1:-}" in
    install) cmd_install ;;
    start)   [[ -n "${2:-}" ]] || usage; DIR="$2"; cmd_start ;;
    stop)    [[ -n "${2:-}" ]] || usage; DIR="$2"; cmd_stop ;;
    *)       usage ;;
esac
