#!/usr/bin/env bash
# A real Slurm cluster on this one machine, from Debian's packages: a controller and 3 nodes
# (n1, n2, n3: one slurmd each, all on localhost). CI starts it before the tests so that
# tests/slurm runs deploy/slurm/*.sbatch through real sbatch / srun / scancel.
#
#   bash scripts/slurm-local.sh          install slurm-wlm if missing, write the config, start, wait for idle
#   bash scripts/slurm-local.sh stop     stop the daemons this script started
#   bash scripts/slurm-local.sh status   sinfo
#
# Idempotent: a second start with the daemons up and the same config only checks the nodes.
# Needs root (it installs packages, writes /etc/slurm/slurm.conf and runs the daemons as root).
# It never overwrites a slurm.conf it did not write. Ports: OR1_SLURM_PORT (controller, default
# 6827) and the next three (the nodes), away from Slurm's own 6817/6818 so a real Slurm on the
# host is left alone, and below the kernel's ephemeral range so no outgoing connection takes them.
# Gotchas measured on this kind of machine: no cgroup freezer (proctrack/linuxproc, task/none);
# heterogeneous jobs start only from the backfill scheduler (bf_interval=1, else up to 30 s).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by or1 scripts/slurm-local.sh"
NODES=(n1 n2 n3)
PORT=${OR1_SLURM_PORT:-6827}

die() { echo "slurm-local: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process it names is running
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

config() {
    cat <<CONF
$MARK (edit that script, not this file)
ClusterName=or1local
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=15
NodeName=n[1-3] NodeHostname=localhost Port=[$((PORT + 1))-$((PORT + 3))] CPUs=4 RealMemory=1000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get to install it"
    echo "slurm-local: installing slurm-wlm ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null; } ||
        die "apt-get install slurm-wlm failed"
}

stop() {
    local f pids=()
    for f in /run/slurmd-n[1-3].pid /run/slurmctld.pid /run/munge/munged.pid; do
        alive "$f" && pids+=("$(cat "$f")")
    done
    ((${#pids[@]})) || { echo "slurm-local: nothing running"; return; }
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        local left=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
        ((left)) || { echo "slurm-local: stopped"; return; }
        sleep 0.1
    done
    die "daemons still running after 10 s: ${pids[*]}"
}

nodes_up() {  # every node answers: idle, or running jobs
    local states
    states=$(sinfo -h -o %T 2>/dev/null | sort -u) || return 1
    [[ -n $states ]] && ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$states"
}

start() {
    [[ $(id -u) == 0 ]] || die "needs root: it installs slurm-wlm and runs slurmctld/slurmd as root (try sudo)"
    install
    if [[ -e $CONF ]] && ! head -1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script: refusing to replace a real cluster's config"
    fi
    local want
    want=$(config)
    if [[ ! -e $CONF || $(cat "$CONF") != "$want" ]]; then
        stop >/dev/null  # daemons of an older config would keep reading it
        mkdir -p /etc/slurm
        printf '%s\n' "$want" >"$CONF"
    fi
    mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
    chown munge:munge /run/munge
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge: apt-get install --reinstall munge)"
    alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    alive /run/slurmctld.pid || slurmctld -c  # -c: empty state, no jobs left from an earlier start
    for n in "${NODES[@]}"; do
        alive "/run/slurmd-$n.pid" || slurmd -N "$n"
    done
    for _ in $(seq 120); do
        nodes_up && { sinfo; return; }
        sleep 0.5
    done
    sinfo || true
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n*.log >&2 || true
    die "the nodes did not come up within 60 s (logs above)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
