"""Run an entry file (harness/train.py, harness/preflight.py) as the module it is.

`deepspeed harness/train.py`, `torchrun harness/train.py` and `python harness/train.py` make Python put
the file's directory, harness/, first on sys.path. Our kernels/, config.py, data/, model.py ... would then
shadow installed top-level modules of those names for every library (bitsandbytes imports `kernels`).
Instead of editing sys.path, the file replaces its own process (same pid, so launchers and signals see
no difference) with `python -P -m harness.<name>`: `-P` (Python 3.11+) keeps both the script directory
and the working directory off sys.path, so only the installed package (`pip install -e .`) provides
`harness`, and nothing of ours is importable under a top-level name.
"""

from __future__ import annotations

import os
import sys


def run_as_module(module: str, hold_signals: tuple = ()) -> None:
    """Re-execute this process as `python [its own options] -P -m module [its arguments]`; never returns.

    `hold_signals` are blocked across the exec (the signal mask and pending signals survive it, handlers
    do not): one that arrives meanwhile waits for the module to install its handler and unblock it.
    """
    import signal

    # sys.orig_argv = [python, *interpreter options (e.g. -u from the deepspeed launcher), script, *args]
    options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    sys.stdout.flush()
    sys.stderr.flush()
    if hold_signals:
        signal.pthread_sigmask(signal.SIG_BLOCK, hold_signals)
    os.execv(sys.executable, [sys.executable, *options, *safe_path, "-m", module, *sys.argv[1:]])
