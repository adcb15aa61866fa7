"""Test support: every process with this directory on PYTHONPATH takes bitsandbytes' AVX512-BF16 CPU
repacking path, whatever its CPU.

bitsandbytes' `Linear4bit.__init__` sets `support_avx512bf16_for_cpu = has_avx512bf16()`, and its forward
repacks the weight in place at the first eval-mode call when that flag is set. On a CPU without the
feature the flag is False and the bug the harness guards against never shows, so a test of the guard
would pass without it. This finder patches `has_avx512bf16` to return True in `bitsandbytes.nn.modules`
right after that module executes (only there: its CPU kernels elsewhere keep the real answer).
"""

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "bitsandbytes.nn.modules"


def _forced() -> bool:
    return True


def record() -> None:
    """Append this process's pid to $BNB_REPACK_MARKER: lets a test check that the forced path is in each of its
    processes (tests/spawn_ranks.py calls it in a rank forked after the patched module was imported)."""
    marker = os.environ.get("BNB_REPACK_MARKER")
    if marker and not os.environ.get("SPAWN_RANKS_PARENT"):  # the forking spawner itself trains nothing
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")


def forced_in_this_process() -> bool:
    mod = sys.modules.get(_TARGET)
    return mod is not None and getattr(mod, "has_avx512bf16", None) is _forced


class _ForceRepack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = _forced
            record()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _ForceRepack())
