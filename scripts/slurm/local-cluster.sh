#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` test tier and for trying
# sbatch / the Hydra submitit launcher without a real cluster.
#
#   scripts/slurm/local-cluster.sh start    # apt-installs slurm-wlm + munge if missing, starts them
#   scripts/slurm/local-cluster.sh status   # exit 0 when the node answers, 1 when down
#   scripts/slurm/local-cluster.sh stop
#
# Runs as root (CI, dev containers). The node is this host, sized from nproc and
# /proc/meminfo; no cgroups (proctrack/linuxproc), so it works in containers. State
# lives under $SHARDREC_SLURM_DIR (/var/spool/slurm-shardrec): `stop` then `start`
# begins clean, with no jobs from before.
set -euo pipefail

STATE_DIR=${SHARDREC_SLURM_DIR:-/var/spool/slurm-shardrec}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODE=$(hostname -s)

log() { echo "local-cluster: $*" >&2; }

need_root() {
    if [[ $(id -u) != 0 ]]; then
        log "must run as root (installs packages and starts daemons); try sudo $0 $*"
        exit 2
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # Leave ~10% (at least 512 MB) for the OS, as slurmd refuses a node that claims
    # more memory than it has.
    mem_mb=$(awk '/MemTotal/ {m=int($2/1024); r=int(m/10); if (r<512) r=512; print m-r}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$STATE_DIR"/{ctld,d} /var/log/slurm /run/slurm
    cat >"$CONF" <<CONF
# Written by scripts/slurm/local-cluster.sh: one node ($NODE), one partition.
ClusterName=shardrec
# State is wiped on stop, so job ids would start at 1 again and a new job could
# resume from an old job's outputs/slurm/<id>: start the count from the clock instead.
FirstJobId=$(( $(date +%s) / 10 % 60000000 ))
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in containers: track processes by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# Cores are the consumable (memory is not tracked: a test machine's jobs are tiny).
SelectTypeParameters=CR_Core
# Requeue on preemption / by scontrol requeue (scripts/slurm/train.sbatch does).
JobRequeue=1
ReturnToService=2
MpiDefault=none
# Short timeouts: jobs here last seconds.
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
OverTimeLimit=0
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
# Steps here launch within a second, so 10 s of credential lifetime is plenty.
AuthInfo=cred_expire=10
# ...and the scheduler looks at pending jobs every 2 s rather than every 60.
SchedulerParameters=sched_interval=2,bf_interval=5
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
# Up to 3 jobs may share a core: test jobs spend much of their time starting up and
# waiting (requeue delay, polling), and the slurm tier runs its jobs side by side.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:3
CONF
    # slurm-wlm's Debian build reads cgroup.conf only for cgroup plugins; none here.
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
}

node_up() {
    # A node that answers and is not down/drained.
    local state
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1) || return 1
    [[ -n $state && $state != *down* && $state != *drain* && $state != *fail* \
        && $state != *unknown* && $state != *not_responding* ]]
}

start() {
    need_root "$@"
    install_packages
    if node_up; then
        log "already up: $(sinfo -h -o '%P %D %T %c CPUs %m MB' | head -1)"
        return
    fi
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld -c
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if node_up; then
            log "up: $(sinfo -h -o '%P %D %T %c CPUs %m MB' | head -1)"
            return
        fi
        # A node that came back after a restart may need a resume.
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    log "the node did not come up within 60 s; sinfo says:"
    sinfo >&2 || true
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
}

stop() {
    need_root "$@"
    local name pid
    for name in slurmd slurmctld; do
        pid=$(cat "/run/slurm/$name.pid" 2>/dev/null || true)
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
    done
    # Clean state, so the next start has no jobs from before.
    rm -rf "${STATE_DIR:?}"/ctld "${STATE_DIR:?}"/d
    log "stopped"
}

status() {
    if ! command -v sinfo >/dev/null; then
        log "down: slurm is not installed (start installs it)"
        exit 1
    fi
    if node_up; then
        sinfo
        exit 0
    fi
    log "down"
    exit 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
