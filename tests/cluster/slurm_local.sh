#!/usr/bin/env bash
# slurm_local.sh start|stop|status - a single-node SLURM (munged, slurmctld, slurmd) on 127.0.0.1 for
# the cluster test tier, without systemd. Needs root; installs Debian's packages with apt-get when
# they are missing.
#
#   start   install if needed, write the config, start the daemons that are not running, wait
#           until the node takes jobs; records each daemon it started under $DPAL_SLURM_BASE/started/
#   stop    cancel the jobs left, then stop only the daemons recorded as started by `start`
#   status  exit 0 when sbatch/sinfo answer
#
# Environment: DPAL_SLURM_BASE (state, spool, logs; default /tmp/dpal-slurm), DPAL_SLURM_CPUS (CPUs
# the node advertises; default 4, more than a small CI machine has, so that a stage-one worker job
# and a two-rank stage-two job can be placed together).
#
# Facts this relies on (SLURM 22.05 in a container): no cgroups, hence proctrack/linuxproc and
# task/none; no accounting daemon; stopping slurmd leaves running jobs alive, so `stop` cancels them
# first; a requeued job waits in PENDING for its BeginTime (about 2 minutes) unless
# `scontrol update JobId=N StartTime=now` is sent once it is pending again.
set -euo pipefail
BASE=${DPAL_SLURM_BASE:-/tmp/dpal-slurm}
CPUS=${DPAL_SLURM_CPUS:-4}
STARTED=$BASE/started
CONF=/etc/slurm/slurm.conf
MARK="# written by dpal tests/cluster/slurm_local.sh"
NODE=$(hostname -s)

say() { echo "slurm_local: $*" >&2; }

# is_ours NAME PID: PID runs the program NAME (a recorded pid may have been reused since)
is_ours() { [ -n "$2" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]; }

answering() { timeout 10 sinfo -h >/dev/null 2>&1; }

node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null || true; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || { say "SLURM is not installed and there is no apt-get to install it"; exit 3; }
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || { say "apt-get update failed (no network?)"; exit 3; }
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null ||
        { say "apt-get install of slurmctld slurmd slurm-client munge failed"; exit 3; }
}

write_config() {
    if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
        say "$CONF exists and was not written by this script: not touching it (start that cluster, or move it)"
        exit 3
    fi
    local hw mem_total mem
    hw=$(slurmd -C | head -1)  # NodeName=host CPUs=2 Boards=1 ... RealMemory=24105
    mem_total=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$((mem_total > 4096 ? mem_total - 2048 : mem_total * 3 / 4))
    mkdir -p /etc/slurm
    cat >"$BASE/slurm.conf" <<EOF
$MARK
ClusterName=dpal-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=512
EnforcePartLimits=ALL
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=15
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$BASE/slurm.conf" "$CONF"
}

start() {
    [ "$(id -u)" = 0 ] || { say "needs root (it installs packages and starts daemons)"; exit 2; }
    if answering; then say "a SLURM cluster already answers; nothing started"; return 0; fi
    install_packages
    mkdir -p "$BASE"/{state,spool,run,log} "$STARTED"
    write_config

    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        cp /run/munge/munged.pid "$STARTED/munged.pid"
    fi

    if ! is_ours slurmctld "$(cat "$BASE/run/slurmctld.pid" 2>/dev/null)"; then
        slurmctld -i  # -i: ignore state left by an earlier run of this script
        for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
        cp "$BASE/run/slurmctld.pid" "$STARTED/slurmctld.pid"
    fi
    if ! is_ours slurmd "$(cat "$BASE/run/slurmd.pid" 2>/dev/null)"; then
        slurmd -N "$NODE"
        for _ in $(seq 50); do [ -s "$BASE/run/slurmd.pid" ] && break; sleep 0.1; done
        cp "$BASE/run/slurmd.pid" "$STARTED/slurmd.pid"
    fi

    local st=""
    for _ in $(seq 150); do
        st=$(node_state)
        case "$st" in
        idle | mixed | allocated | completing) say "node $NODE $st, $CPUS CPUs, partition debug"; return 0 ;;
        *drain* | down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    say "node $NODE is not taking jobs (state '$st'); logs in $BASE/log"
    exit 1
}

stop_one() { # stop_one NAME: stop the daemon recorded in $STARTED/NAME.pid, if it is still that program
    local pf=$STARTED/$1.pid p
    [ -f "$pf" ] || return 0
    p=$(cat "$pf")
    if is_ours "$1" "$p"; then
        kill -TERM "$p"
        for _ in $(seq 75); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p"
        say "stopped $1 (pid $p)"
    fi
    rm -f "$pf"
}

stop() {
    [ -d "$STARTED" ] || return 0
    if [ -f "$STARTED/slurmctld.pid" ]; then
        # a job's processes outlive slurmd: cancel the jobs of the cluster this script started
        local jobs
        jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel --full $jobs 2>/dev/null || true
            for _ in $(seq 100); do [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
        fi
    fi
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    if [ -f "$CONF" ] && head -1 "$CONF" | grep -qF "$MARK"; then rm -f "$CONF"; fi
    rmdir "$STARTED" 2>/dev/null || true
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) answering ;;
*) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
