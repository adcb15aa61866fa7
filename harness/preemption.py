"""Preemption: SIGTERM / SIGUSR1 (and a wall-clock budget) set a flag; the ranks agree at a step
boundary, save a checkpoint together and exit 75 for the scheduler to requeue."""

from __future__ import annotations

from harness import distributed


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again". The Slurm templates requeue the job on this code.


def _alive(proc) -> bool:
    """psutil: not gone, not the pid reused by another process, and not a zombie waiting to be reaped."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def deepspeed_launcher_processes() -> list:
    """The per-node launcher (deepspeed.launcher.launch) that started this rank and the `deepspeed` runner
    above it, as psutil processes; [] under torchrun, srun or a plain python (they pass signals on)."""
    import psutil

    try:
        parent = psutil.Process().parent()
        if parent is None or "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return []
        runner = parent.parent()
        is_runner = runner is not None and any("deepspeed" in part for part in runner.cmdline()[:3])
        return [parent, runner] if is_runner else [parent]
    except psutil.Error:
        return []


class Preempted(BaseException):
    """Raised by the signal handler when nothing is unsaved (see StopFlag): unwinds to main, which exits 75.
    A BaseException, so no `except Exception` on the way swallows it."""


class StopFlag:
    """SIGTERM / SIGUSR1 while training state is unsaved only set a flag (no I/O in a signal handler: a
    save needs every rank). The loop calls `should_stop` at each step boundary and between eval batches;
    it all-reduces the flags so that all ranks save and exit together even when the signal reached only
    some of them. A wall-clock budget (`max_runtime_s`) raises the same flag `margin_s` before the limit.

    While nothing is unsaved (`clean`: setup, model loading, the step-0 eval, right after a checkpoint)
    the handler raises Preempted at once instead: exiting loses nothing, and waiting for the next step
    boundary could outlast the scheduler's grace period (loading a 70B model takes minutes)."""

    def __init__(self, max_runtime_s: float = 0.0, margin_s: float = 0.0, signals=("SIGTERM", "SIGUSR1"), watch_launcher: bool = True):
        import signal
        import time

        self.reason = ""
        self.clean = True  # no optimizer step since the start or the last checkpoint (the loop keeps it)
        self._deadline = time.monotonic() + max_runtime_s - margin_s if max_runtime_s > 0 else None
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)
        if watch_launcher:
            self._watch(deepspeed_launcher_processes())

    def _watch(self, launchers: list, poll_s: float = 1.0) -> None:
        """The `deepspeed` runner dies on a SIGTERM without passing it on (its per-node launcher and the
        ranks go on, orphaned). A daemon thread checks every `poll_s` that the runner and launcher above
        this rank still live; when one is gone it raises the flag as a SIGTERM would: the ranks save a
        checkpoint together at the next step and exit 75."""
        import threading
        import time

        if not launchers:
            return

        def watch():
            import os
            import signal

            while not self.reason:
                for proc in launchers:
                    if not _alive(proc):
                        self._launcher_gone = f"the deepspeed launcher (pid {proc.pid}) exited"
                        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, as a real one
                        return
                time.sleep(poll_s)

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

    _launcher_gone = ""

    def _handler(self, signum, _frame) -> None:
        import signal

        self.reason = self.reason or self._launcher_gone or signal.Signals(signum).name
        if self.clean:
            self.clean = False  # once: a second signal (the launcher's, while this one unwinds) only sets the flag
            raise Preempted(self.reason)

    def should_stop(self, device) -> bool:
        import time

        if not self.reason and self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = "max_runtime"
        (votes,) = distributed.all_reduce_sum([1.0 if self.reason else 0.0], device)
        if votes and not self.reason:
            self.reason = "another rank's signal"
        return votes > 0
