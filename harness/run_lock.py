"""One run per output_dir: an exclusive lock that rank 0 holds for the whole run.

Two runs writing one output_dir overwrite each other's checkpoints and tear metrics.jsonl. Rank 0
takes `flock(LOCK_EX | LOCK_NB)` on output_dir/.harness.lock and keeps the file open until it exits.
The kernel drops the lock when the process dies, kill -9 included, so a lock file left behind by a
dead run is never "stale": the next run simply takes it. The file names the holder (host, pid,
start time) for the message a second run prints. On a network filesystem the lock needs one that
supports flock (NFSv4 does; Lustre needs its `flock` mount option).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from harness.config import ConfigError

LOCK_NAME = ".harness.lock"
# Files the run (re)writes at the top of output_dir: a symbolic link among them would make the run
# overwrite whatever the link points to.
WRITTEN = ("recipe.yaml", "ds_config.json", "metrics.jsonl", "memory_report.md", LOCK_NAME)


def acquire(output_dir: str):
    """Lock output_dir for this process; returns the open lock file (keep it referenced). ConfigError
    when another live run holds it or when a file the run writes is a symbolic link."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file, not a directory; set output_dir to a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir '{out}' cannot be created ({e.strerror}); choose a writable output_dir") from None
    for name in WRITTEN:
        if (out / name).is_symlink():
            raise ConfigError(f"{out / name} is a symbolic link; the run writes this file and would overwrite the link's "
                              "target: remove the link or choose another output_dir")
    try:
        f = open(out / LOCK_NAME, "a+")
    except OSError as e:
        raise ConfigError(f"output_dir '{out}' is not writable ({e.strerror}); choose a writable output_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"output_dir '{out}' is in use by another run ({holder}); wait for it to end, stop it, "
                          "or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f
