#!/bin/bash
# shellcheck shell=bash
# Two more Slurm hosts on this machine for a true 2-host run: hnode1 (10.77.0.11) and hnode2
# (10.77.0.12), each in its own network, mount and UTS namespace (ip netns, unshare), joined by a
# bridge (10.77.0.1) to the root namespace where slurmctld runs. Each runs its own slurmd; jobs on
# them see only their own eth0 and loopback, so ranks on the two hosts talk over the network.
#
# Each host's /etc/hosts (/etc/netns/NAME/hosts, bind-mounted in its mount namespace) maps its own name to
# 127.0.1.1, as Debian does: slurm/launch.sh must then fall back to the routable address for the
# rendezvous. The controller's name maps to the bridge address.
#
# Run tests/slurm/start_cluster.sh first: its slurm.conf declares hnode1/hnode2 (partition twohost).
# Needs root and iproute2; exits 4 where network namespaces or bridges cannot be made. Idempotent.
# Usage: bash tests/slurm/start_two_hosts.sh
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "start_two_hosts: needs root (network namespaces, daemons)" >&2; exit 3; }
if ! command -v ip >/dev/null; then
  echo "start_two_hosts: installing iproute2"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 >/dev/null 2>&1 || true
  command -v ip >/dev/null || { echo "start_two_hosts: needs iproute2 (ip), which could not be installed" >&2; exit 4; }
fi
grep -q '^NodeName=hnode1 ' /etc/slurm/slurm.conf 2>/dev/null \
  || { echo "start_two_hosts: /etc/slurm/slurm.conf has no hnode1: run tests/slurm/start_cluster.sh first" >&2; exit 5; }

controller=$(hostname -s)
bridge=hsbr0
if ! ip link show "$bridge" >/dev/null 2>&1; then
  ip link add "$bridge" type bridge || { echo "start_two_hosts: cannot create a bridge here" >&2; exit 4; }
  ip addr add 10.77.0.1/24 dev "$bridge"
fi
ip link set "$bridge" up

for i in 1 2; do
  node=hnode$i
  addr=10.77.0.1$i
  if ! ip netns list | grep -qw "$node"; then
    ip netns add "$node" || { echo "start_two_hosts: cannot create network namespaces here" >&2; exit 4; }
    ip link add "veth-$node" type veth peer name eth0 netns "$node"
    ip link set "veth-$node" master "$bridge" up
    ip -n "$node" addr add "$addr/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    ip -n "$node" route add default via 10.77.0.1
  fi
  mkdir -p "/etc/netns/$node" "/var/spool/slurmd/$node"
  # The bridge addresses also get names (not the hosts' own), in IPv4 and IPv4-mapped IPv6 form: c10d's
  # TCPStore looks up each client's address (::ffff:10.77.0.12 on its dual-stack socket), and a lookup
  # that reaches DNS waits ~10 s per connection for a name server these namespaces cannot reach.
  printf '127.0.0.1 localhost\n127.0.1.1 %s\n10.77.0.1 %s\n' "$node" "$controller" > "/etc/netns/$node/hosts"
  for peer in 1 11 12; do
    printf '10.77.0.%s bridge-%s\n::ffff:10.77.0.%s bridge-%s\n' "$peer" "$peer" "$peer" "$peer" >> "/etc/netns/$node/hosts"
  done
  if ! pgrep -f "^slurmd -N $node\$" >/dev/null; then
    # Not `ip netns exec`: it remounts /sys, where slurmd's cgroup plugin needs the host's cgroup mounts.
    # Its own mount namespace instead, for its own /etc/hosts, and its own hostname.
    # shellcheck disable=SC2016
    nsenter --net="/run/netns/$node" unshare --mount --uts \
      sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec slurmd -N "$1"' sh "$node"
  fi
done

for _ in $(seq 1 60); do
  if [ "$(sinfo -h -p twohost -o %T 2>/dev/null | grep -cE '^(idle|mixed)')" -ge 1 ] \
     && ! sinfo -h -p twohost -N -o %T 2>/dev/null | grep -qvE '^(idle|mixed)'; then
    echo "start_two_hosts: ready: $(sinfo -h -p twohost -N -o '%N %T' | tr '\n' ' ')"
    exit 0
  fi
  sleep 1
done
echo "start_two_hosts: the namespaced hosts did not become idle: $(sinfo -p twohost -N 2>&1 | tail -n +2)" >&2
tail -n 20 /var/log/slurm/slurmd-hnode1.log /var/log/slurm/slurmd-hnode2.log >&2 || true
exit 1
