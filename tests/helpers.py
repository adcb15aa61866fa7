"""Shared test helpers: run the real entry point as 1 process or 2 gloo ranks, read its metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "harness" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Threads for one process that has the machine's 2 cores to itself; under pytest-xdist the other
# worker and its ranks share them, so one.
SOLO_THREADS = "1" if "PYTEST_XDIST_WORKER" in os.environ else "2"


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # 2 ranks on 2 cores: one thread each
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def run_bounded(cmd: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a timeout kills the whole process tree and fails with its output.

    Plain subprocess.run(timeout=...) kills only the launcher; its ranks keep the output pipes open, so
    the call then waits for them forever and a hung job hangs the whole test session.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout_s} s, killed\n--- stdout\n{stdout[-4000:]}\n"
                             f"--- stderr\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


SPAWN_RANKS = str(REPO / "tests" / "spawn_ranks.py")


def launch(args: list[str], nproc: int = 1, timeout_s: int = 600, check: bool = True, script: str = TRAIN, env: dict | None = None,
           launcher: str = "spawn"):
    """Run `script` with `args` as one plain process, or as nproc ranks started by tests/spawn_ranks.py (the
    launcher's environment, without its start-up; "spawn": forked from a process that has imported the training
    stack, "spawn-exec": each a new interpreter) or, with launcher="deepspeed", by the deepspeed runner."""
    if nproc == 1:
        cmd = [sys.executable, script, *args]
        if env is None and script == TRAIN:  # one training process: both cores when it has them alone
            env = child_env(OMP_NUM_THREADS=SOLO_THREADS)
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    else:
        assert launcher in ("spawn", "spawn-exec"), launcher
        # spawn: ranks forked from one process that imported the training stack (7 CPU-s saved per rank); spawn-exec:
        # each rank a fresh interpreter
        preload = ["--preload"] if launcher == "spawn" else []
        cmd = [sys.executable, SPAWN_RANKS, *preload, str(nproc), str(free_port()), script, *args]
    proc = run_bounded(cmd, env or child_env(), timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(output_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
