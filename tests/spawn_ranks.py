"""Test support: start N ranks of a script on this host as torchrun and the deepspeed launcher do, without
their launchers' own start-up.

    python tests/spawn_ranks.py N MASTER_PORT SCRIPT [ARGS ...]

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR (127.0.0.1) and MASTER_PORT in
its environment, the variables harness/distributed.py reads from any launcher, and shares this process's
stdout and stderr. The deepspeed runner and its per-node launcher are two more Python processes that
import torch and DeepSpeed: about 6.6 CPU-seconds and 5-11 s of wall time per 2-rank job on 2 cores. This
file imports the standard library only. The tests that are about launching (the demo as `make demo`
runs it, the smoke recipe, torchrun, the entry scripts, signals to the runner, Slurm) keep the real
launchers.

As deepspeed.launcher.launch does, the first rank to exit non-zero stops the others (SIGTERM, then
SIGKILL after GRACE_S) and its exit code is this process's; a SIGTERM, SIGINT or SIGUSR1 sent here goes to
every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# A survivor's SIGTERM handler may checkpoint, and a rank reporting a configuration error ignores SIGTERM and waits
# 10 s before its line (harness/train.py); past this a rank blocked in a collective with a dead one is killed. The
# deepspeed launcher waits 30 s too.
GRACE_S = 30.0


def _stop(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    n, port, script, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    procs = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # before the ranks exist: none is left unsignalled
        signal.signal(sig, forward)
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-u", script, *args], env=env))
    while True:
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed:
            _stop(procs)
            code = failed[0].returncode
            return code if code > 0 else 128 - code  # killed by signal k: 128 + k, as a shell reports it
        if all(p.returncode == 0 for p in procs):
            return 0
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
