"""Checks a multi-node job runs before any model loads (slurm/launch.sh runs both; each takes seconds).

    python -m harness.preflight join --nodes N --node-rank R --addr HOST --port P [--hosts "h0 h1 ..."]
        One task per node. Node 0 opens a TCP store; every node writes its hostname there; node 0 waits
        `--timeout-s` and names each node that did not join (and the host it should have been), so a
        dead node or a firewall fails the job in a minute instead of a rendezvous hanging for many.

    <launcher> harness/preflight.py allreduce
        Under the same launcher as training (torchrun / srun / deepspeed): every rank initialises the
        process group, gathers hostnames and all-reduces a buffer; rank 0 prints where the ranks are and
        the all-reduce bus bandwidth. Exit 0 when every rank took part and the sum is right.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file by a launcher (see harness/_entry.py)
    from harness._entry import run_as_module

    run_as_module("harness.preflight")


def join(nodes: int, node_rank: int, addr: str, port: int, timeout_s: float, hosts: list[str]) -> int:
    from torch.distributed import TCPStore

    host = socket.gethostname()
    try:
        store = TCPStore(addr, port, world_size=None, is_master=node_rank == 0, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # only non-zero nodes connect; they cannot reach node 0
        print(f"preflight: node {node_rank} ({host}) cannot reach node 0 at {addr}:{port}: {e}", file=sys.stderr, flush=True)
        return 1
    store.set(f"joined/{node_rank}", host)
    if node_rank != 0:
        store.wait(["verdict"], datetime.timedelta(seconds=timeout_s + 30))
        ok = store.get("verdict") == b"ok"
        store.add("read_verdict", 1)  # node 0 keeps the store up until every node has read it
        return 0 if ok else 1
    deadline = time.time() + timeout_s
    keys = [f"joined/{r}" for r in range(nodes)]
    while time.time() < deadline and not store.check(keys):
        time.sleep(0.2)
    missing = [r for r in range(nodes) if not store.check([f"joined/{r}"])]
    if missing:
        named = ", ".join(f"node {r}" + (f" ({hosts[r]})" if r < len(hosts) else "") for r in missing)
        print(f"preflight: {named} did not join within {timeout_s:.0f} s; check those hosts (sinfo -R, "
              f"ssh + nvidia-smi) and resubmit with --exclude", file=sys.stderr, flush=True)
        store.set("verdict", "fail")
        return 1
    joined = [store.get(k).decode() for k in keys]
    print(f"preflight: all {nodes} nodes joined: {' '.join(joined)}", flush=True)
    store.set("verdict", "ok")
    until = time.time() + 30
    while store.add("read_verdict", 0) < nodes - 1 and time.time() < until:
        time.sleep(0.1)
    return 0


def allreduce(timeout_s: float, size_mib: float) -> int:
    import torch

    from harness import distributed

    dist = distributed.init_distributed(timeout_s=int(timeout_s))
    hosts: list = [None] * dist.world_size
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    numel = int(size_mib * 2**20 / 4)
    buf = torch.ones(numel, dtype=torch.float32, device=dist.device)
    torch.distributed.all_reduce(buf)  # warm-up, and the correctness check below
    ok = bool((buf == dist.world_size).all())
    buf.fill_(1.0)
    distributed.barrier()
    t0 = time.perf_counter()
    torch.distributed.all_reduce(buf)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed_s = time.perf_counter() - t0
    flags = torch.tensor([0.0 if ok else 1.0], device=dist.device)
    torch.distributed.all_reduce(flags)
    if dist.is_main:
        by_host: dict[str, list[int]] = {}
        for rank, h in enumerate(hosts):
            by_host.setdefault(h, []).append(rank)
        where = "; ".join(f"{h}: ranks {r[0]}-{r[-1]}" if len(r) > 1 else f"{h}: rank {r[0]}" for h, r in by_host.items())
        # ring all-reduce moves 2(n-1)/n of the buffer per rank: the "bus bandwidth" nccl-tests report
        bus_gbps = 2 * (dist.world_size - 1) / dist.world_size * numel * 4 / elapsed_s / 1e9
        print(f"preflight: {dist.world_size} ranks on {len(by_host)} hosts ({where}); all-reduce of {size_mib:g} MiB "
              f"{'correct' if flags.item() == 0 else 'WRONG on some rank'} in {1e3 * elapsed_s:.1f} ms ({bus_gbps:.2f} GB/s bus)", flush=True)
    distributed.shutdown()
    return 0 if flags.item() == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pre-flight checks for multi-node jobs")
    sub = ap.add_subparsers(dest="check", required=True)
    j = sub.add_parser("join", help="every node reaches node 0 (one task per node)")
    j.add_argument("--nodes", type=int, required=True)
    j.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_PROCID", "0")))
    j.add_argument("--addr", required=True)
    j.add_argument("--port", type=int, required=True)
    j.add_argument("--hosts", default="", help="expected hostnames in node-rank order, for the message")
    j.add_argument("--timeout-s", type=float, default=120.0)
    a = sub.add_parser("allreduce", help="all ranks init the process group and all-reduce (under the launcher)")
    a.add_argument("--timeout-s", type=float, default=300.0)
    a.add_argument("--size-mib", type=float, default=None, help="buffer size (default 256 MiB on GPU, 4 MiB on CPU)")
    args = ap.parse_args(argv)
    if args.check == "join":
        return join(args.nodes, args.node_rank, args.addr, args.port, args.timeout_s, args.hosts.split())
    import torch

    size = args.size_mib if args.size_mib is not None else (256.0 if torch.cuda.is_available() else 4.0)
    return allreduce(args.timeout_s, size)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
