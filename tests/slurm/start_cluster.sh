#!/bin/bash
# shellcheck shell=bash
# Start a real one-node Slurm cluster on this machine (as root) for the template tests: installs
# Debian's slurmctld/slurmd/munge when missing, writes slurm.conf for this host's cores and memory,
# starts munged, slurmctld and slurmd, and waits until the node is idle. Idempotent: a running
# cluster is left as it is. Usage: bash tests/slurm/start_cluster.sh
# slurm.conf also declares hnode1 and hnode2 (partition twohost), two hosts in their own network
# namespaces that tests/slurm/start_two_hosts.sh brings up; until then they are simply not responding.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "start_cluster: needs root (installs packages, starts daemons)" >&2
  exit 3
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  echo "start_cluster: installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
fi

host=$(hostname -s)
# `nproc` honours OMP_NUM_THREADS (the tests set 1): ask for the CPUs without it.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) * 85 / 100 / 1024 ))
# cred_expire: a requeued job waits this long (default 120 s) before it may start again; 10 s keeps the
# preemption test short (Slurm accepts 5 or more) and is still ample for a step launch on a busy host.
# bf_interval: the backfill pass runs every 30 s by default; sched_interval: the main scheduling pass,
# which is the one that starts a requeued job once that hold ends, every 60 s (the test sat idle 25 s
# after the hold). Every 2 s each is nothing for a 3-node cluster.
conf=$(cat <<CONF
ClusterName=harness-test
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
MpiDefault=none
KillWait=30
JobRequeue=1
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
NodeName=hnode1 NodeAddr=10.77.0.11 CPUs=1 RealMemory=2048 State=UNKNOWN
NodeName=hnode2 NodeAddr=10.77.0.12 CPUs=1 RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
PartitionName=twohost Nodes=hnode1,hnode2 MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)

if [ "$conf" = "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ] && sinfo -h -p debug -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "start_cluster: already running: $(sinfo -h -o '%N %T %c CPUs')"
  exit 0
fi
# Not running, or running with another configuration: (re)start everything with this one.
pkill -x slurmd 2>/dev/null || true  # every slurmd, the namespaced hosts' too: they read the same slurm.conf
pkill -x slurmctld 2>/dev/null || true
for _ in $(seq 1 30); do  # a stopping slurmctld saves its state first: starting before it is gone would be skipped below
  pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
  sleep 1
done
pkill -KILL -x slurmctld 2>/dev/null || true  # still there after 30 s: stop waiting for it
pkill -KILL -x slurmd 2>/dev/null || true
sleep 1
mkdir -p /etc/slurm /var/spool/slurmctld "/var/spool/slurmd/${host}" /var/log/slurm /run/munge /var/lib/munge /var/log/munge
printf '%s\n' "$conf" > /etc/slurm/slurm.conf

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged --force" || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -f "^slurmd\$" >/dev/null || slurmd  # this host's slurmd (the namespaced hosts run `slurmd -N hnodeK`)

for _ in $(seq 1 60); do
  if sinfo -h -p debug -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then
    echo "start_cluster: ready: $(sinfo -h -o '%N %T %c CPUs %m MB')"
    exit 0
  fi
  sleep 1
done
echo "start_cluster: the node did not become idle; sinfo says: $(sinfo 2>&1 | tail -n +2)" >&2
tail -n 20 /var/log/slurm/slurmctld.log "/var/log/slurm/slurmd-${host}.log" >&2 || true
exit 1
