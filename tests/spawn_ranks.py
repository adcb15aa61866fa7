"""Test support: start N ranks of a script on this host as torchrun and the deepspeed launcher do, without
their launchers' own start-up.

    python tests/spawn_ranks.py N MASTER_PORT SCRIPT [ARGS ...]
    python tests/spawn_ranks.py --preload N MASTER_PORT SCRIPT [ARGS ...]

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR (127.0.0.1) and MASTER_PORT in
its environment, the variables harness/distributed.py reads from any launcher, and shares this process's
stdout and stderr. The deepspeed runner and its per-node launcher are two more Python processes that
import torch and DeepSpeed: about 6.6 CPU-seconds and 5-11 s of wall time per 2-rank job on 2 cores. This
file imports the standard library only (without --preload). The tests that are about launching (the demo as `make demo`
runs it, the smoke recipe, torchrun, the entry scripts, signals to the runner, Slurm) keep the real
launchers.

With --preload this process imports the training stack once (torch, DeepSpeed, transformers, peft,
bitsandbytes: about 7 CPU-seconds per process, the larger part of a tiny 2-rank test) and each rank is a
fork of it that runs SCRIPT with those modules already loaded; harness/train.py runs as the module
harness.train (what its own entry re-executes into). No process group exists yet, and the fork happens only
when no other thread runs (checked) and the host has no GPU device node (CUDA initialised before a fork is
unusable in the child): otherwise the ranks are fresh interpreters. The tests of launching itself keep the
real launchers.

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
from typing import NoReturn

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


PRELOAD = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes")


class _Forked:
    """A forked rank with the part of subprocess.Popen's interface used below."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (a signal handler's poll came between): keep what it found
                return self.returncode
            if pid and self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _run_rank(script: str, args: list) -> NoReturn:
    """In a forked rank: run `script` as __main__ (harness/train.py as the module harness.train) and exit."""
    code = 1
    try:
        import io
        import runpy
        import traceback

        # A fresh interpreter's signal dispositions, then unblock what the parent blocked around the fork.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        # as python -u: text layers straight over the file descriptors (no buffer to lose on a SIGKILL)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, encoding=sys.stdout.encoding)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, encoding=sys.stderr.encoding,
                                      errors="backslashreplace")
        try:  # the bitsandbytes repacking path forced in the parent (tests/bnb_repack) is this rank's too: record it
            import sitecustomize

            if getattr(sitecustomize, "forced_in_this_process", lambda: False)():
                sitecustomize.record()
        except ImportError:
            pass
        code = 0
        try:
            entry = os.path.realpath(script)
            if entry == os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "harness", "train.py")):
                sys.argv = [entry, *args]
                sys.path[0:1] = []  # as `python -P -m harness.train` (what its entry re-executes into): no script directory
                runpy.run_module("harness.train", run_name="__main__", alter_sys=True)
            else:
                sys.argv = [script, *args]
                sys.path[0] = os.path.dirname(entry)  # as `python script`: its directory first
                runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _can_fork_preloaded() -> bool:
    """Forking after CUDA is initialised breaks CUDA in the children, and bitsandbytes and DeepSpeed ask for
    devices at import: on a GPU host (or one that might be) the ranks are fresh interpreters."""
    return not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def main() -> int:
    preload = len(sys.argv) > 1 and sys.argv[1] == "--preload"
    argv = sys.argv[2:] if preload else sys.argv[1:]
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    n, port, script, args = int(argv[0]), argv[1], argv[2], argv[3:]
    procs = []
    if preload and _can_fork_preloaded():
        import importlib
        import threading

        os.environ["SPAWN_RANKS_PARENT"] = "1"  # tests/bnb_repack records ranks, not this process
        for name in PRELOAD:
            importlib.import_module(name)
        del os.environ["SPAWN_RANKS_PARENT"]
        preload = threading.active_count() == 1  # a thread at fork time could hold a lock forever: fresh interpreters then
        sys.stdout.flush()
        sys.stderr.flush()
    else:
        preload = False

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in SIGNALS:  # before the ranks exist: none is left unsignalled
        signal.signal(sig, forward)
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if not preload:
            procs.append(subprocess.Popen([sys.executable, "-u", script, *args], env=env))
            continue
        # A signal between fork and the child's own handlers would run this process's forwarder in the child: block
        # them across the fork (a signal meanwhile is delivered here once unblocked, and forwarded to every rank).
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid == 0:
            os.environ.clear()
            os.environ.update(env)
            _run_rank(script, args)
        procs.append(_Forked(pid))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
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
