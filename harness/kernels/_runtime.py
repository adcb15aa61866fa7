"""Which implementation a kernel call takes, decided per call from the tensor's device.

- CUDA tensor and triton importable: the Triton kernel.
- CPU tensor with TRITON_INTERPRET=1 (set before triton was first imported): the same Triton kernel,
  run by the Triton interpreter (slow: ~7 ms per program instance; for tests only).
- Otherwise: the plain PyTorch reference (linear_cross_entropy keeps its chunked path).
"""

from __future__ import annotations

import functools
import os

import torch

from harness import _optional

# Triton launches per kernel, counted so tests can prove the Triton path (not the fallback) ran.
LAUNCHES: dict[str, int] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return _optional.available("triton")


def use_triton(x: torch.Tensor) -> bool:
    if not _triton_importable():
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreting()


def triton_kernels():
    """The module of @triton.jit kernels, imported on first use (triton decides interpreter mode at
    decoration time, so this import must come after TRITON_INTERPRET is set)."""
    _optional.require("triton")
    from harness.kernels import _triton

    return _triton


def count_launch(name: str) -> None:
    LAUNCHES[name] = LAUNCHES.get(name, 0) + 1


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rows_per_program(n_rows: int, block_cols: int, x: torch.Tensor) -> int:
    """Rows one program handles. On GPU a (rows x cols) tile of ~4k elements keeps registers in
    bounds; the interpreter costs ~7 ms per program whatever its size, so it takes bigger tiles."""
    budget = 1 << 16 if not x.is_cuda else 4096
    return max(1, min(next_pow2(n_rows), budget // block_cols, 128 if not x.is_cuda else 16))
