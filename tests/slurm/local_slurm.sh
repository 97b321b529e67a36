#!/usr/bin/env bash
# A real single-node SLURM cluster on loopback, for tests and for trying the sbatch example.
#
#   tests/slurm/local_slurm.sh start DIR   # write DIR/slurm.conf, start munged, slurmctld, slurmd
#   tests/slurm/local_slurm.sh stop DIR    # stop them (TERM, wait until gone, then KILL)
#   tests/slurm/local_slurm.sh env DIR     # print `export SLURM_CONF=DIR/slurm.conf`
#
# Needs root and Debian's `slurmctld slurmd slurm-client munge` (22.05). No systemd, no
# cgroups: proctrack/linuxproc, task/none, select/cons_tres with CR_CPU, no accounting
# (poll squeue, not sacct). State, spool, pid and log files live under DIR; munged's key,
# socket and log under a /tmp/local-slurm-munge.* folder that `stop` removes.
# Settings (env): LOCAL_SLURM_AUTH=munge|none (default: munge when munged is installed),
# LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_D_PORT (default 16817 / 16818),
# LOCAL_SLURM_READY_S (default 60): how long `start` waits for the node to be idle.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop|env DIR" >&2; exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/slurm.conf"
node=ganode

die() { echo "local_slurm: $*" >&2; exit 1; }

stop_pidfile() {  # TERM the process in pidfile $1, wait until it is gone (KILL after 20 s)
  local pf=$1 pid i
  [[ -f "$pf" ]] || return 0
  pid=$(cat "$pf" 2>/dev/null || true)
  [[ "$pid" =~ ^[0-9]+$ ]] || { rm -f "$pf"; return 0; }
  kill -TERM "$pid" 2>/dev/null || { rm -f "$pf"; return 0; }
  for ((i = 0; i < 200; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pf"; return 0; }
    sleep 0.1
  done
  echo "local_slurm: pid $pid ($pf) ignored TERM; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pf"
}

case "$cmd" in
env)
  echo "export SLURM_CONF=$conf"
  ;;
stop)
  stop_pidfile "$dir/run/slurmd.pid"
  stop_pidfile "$dir/run/slurmctld.pid"
  if [[ -f "$dir/munge_dir" ]]; then
    m=$(cat "$dir/munge_dir")
    if [[ $m == /tmp/local-slurm-munge.* && -d $m ]]; then
      stop_pidfile "$m/munged.pid"
      rm -rf "$m"
    fi
    rm -f "$dir/munge_dir"
  fi
  ;;
start)
  [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as their users)"
  for b in slurmctld slurmd sinfo sbatch squeue; do
    command -v "$b" >/dev/null || die "$b not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
  done
  auth=${LOCAL_SLURM_AUTH:-}
  if [[ -z "$auth" ]]; then
    if command -v munged >/dev/null && command -v mungekey >/dev/null; then auth=munge; else auth=none; fi
  fi
  mkdir -p "$dir/state" "$dir/spool" "$dir/run" "$dir/log"
  authconf="AuthType=auth/none
CredType=cred/none"
  if [[ $auth == munge ]]; then
    # munged wants every folder above its socket open to all (755), which a private DIR
    # (pytest's tmp folders are 700) is not: its files go to a 755 folder under /tmp.
    m=$(mktemp -d /tmp/local-slurm-munge.XXXXXX)
    chmod 755 "$m"
    echo "$m" > "$dir/munge_dir"
    [[ -f "$m/munge.key" ]] || mungekey --create --keyfile="$m/munge.key"
    chmod 600 "$m/munge.key"
    munged --key-file="$m/munge.key" --socket="$m/munge.socket" --pid-file="$m/munged.pid" \
      --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
      || die "munged failed: $(tail -5 "$m/munged.log" 2>/dev/null)"
    authconf="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$m/munge.socket"
  fi
  cpus=$(nproc)
  mem=$(awk '/MemAvailable/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  cat > "$conf" <<CONF
# written by tests/slurm/local_slurm.sh: one node on loopback, state under $dir
ClusterName=guidealign-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=${LOCAL_SLURM_CTLD_PORT:-16817}
SlurmdPort=${LOCAL_SLURM_D_PORT:-16818}
SlurmUser=root
SlurmdUser=root
$authconf
ProctrackType=proctrack/linuxproc
# each task bound to the CPUs it was allocated (as task/affinity or task/cgroup do on clusters),
# so two engines of one array on this node do not both spread threads over every core
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MaxArraySize=1001
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$conf
  slurmctld -f "$conf" || die "slurmctld failed: $(tail -20 "$dir/log/slurmctld.log" 2>/dev/null)"
  slurmd -f "$conf" -N "$node" || die "slurmd failed: $(tail -20 "$dir/log/slurmd.log" 2>/dev/null)"
  ready_s=${LOCAL_SLURM_READY_S:-60}
  deadline=$((SECONDS + ready_s))
  while ((SECONDS < deadline)); do
    state=$(timeout 5 sinfo -h -N -o %T 2>/dev/null || true)
    if [[ $state == idle ]]; then
      echo "local_slurm: node $node idle ($cpus CPUs, ${mem} MB, auth $auth); export SLURM_CONF=$conf"
      exit 0
    fi
    sleep 0.25
  done
  echo "local_slurm: node not idle after ${ready_s}s (state: '${state:-none}')" >&2
  tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  exit 1
  ;;
*)
  echo "usage: $0 start|stop|env DIR" >&2; exit 2
  ;;
esac
