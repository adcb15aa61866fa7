"""harness/_entry.py: an entry file re-executes itself as its module with the stop signals held, so a
preemption that arrives between the exec and the module's handler is neither lost nor fatal."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, child_env

# The re-executed module: it signals itself while the mask the entry file set is still on, then does
# what harness/train.py does first (install its handler, unblock). A held SIGTERM is delivered there:
# the pre-start handler records 75 and exits 75.
TARGET = """
import os, signal
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)
print("alive after SIGTERM and SIGUSR1", flush=True)
from harness.train import install_early_stop_handler
install_early_stop_handler()
print("not reached: the held signals were lost", flush=True)
"""
ENTRY = """
import signal
from harness._entry import run_as_module
run_as_module("held_target", hold_signals={hold})
"""


@pytest.mark.parametrize("hold, code", [("(signal.SIGTERM, signal.SIGUSR1)", 75), ("()", -signal.SIGTERM)], ids=["held", "not-held"])
def test_stop_signals_are_held_across_the_re_exec(hold, code, tmp_path):
    (tmp_path / "held_target.py").write_text(TARGET)
    (tmp_path / "entry.py").write_text(ENTRY.format(hold=hold))
    code_file = tmp_path / "exit_code"
    env = child_env(PYTHONPATH=f"{tmp_path}:{REPO}", HARNESS_EXIT_CODE_FILE=str(code_file), RANK="0")
    proc = subprocess.run([sys.executable, str(tmp_path / "entry.py")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (proc.stdout, proc.stderr[-2000:])
    if code == 75:  # held: the process lived on to install the handler, which then took the signal
        assert "alive after SIGTERM and SIGUSR1" in proc.stdout and "not reached" not in proc.stdout
        assert code_file.read_text().strip() == "75"
    else:  # the control: without the hold the same signal kills the re-executed process at once
        assert "alive" not in proc.stdout
