"""Optional dependencies, imported lazily in one place with an error that says what to install."""

from __future__ import annotations

import importlib
import importlib.util

_INSTALL = {
    "bitsandbytes": "pip install 'bitsandbytes>=0.45' (needed by method qlora / int8), or set method=lora",
    "peft": "pip install 'peft>=0.13' (needed by method lora / qlora / int8), or set method=full",
    "flash_attn": "pip install flash-attn --no-build-isolation on a CUDA node (see README), or set model.attn_implementation=sdpa",
    "wandb": "pip install wandb, or set log.wandb=false",
    "triton": "pip install triton, or turn kernels off",
    "liger_kernel": "pip install liger-kernel",
}


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(name: str):
    """Import `name` or raise ImportError with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is not importable ({e}); {_INSTALL.get(name, 'pip install ' + name)}") from e


def flash_attn_usable() -> bool:
    """flash-attn only counts when CUDA is there and the package really imports."""
    import torch

    if not torch.cuda.is_available() or not available("flash_attn"):
        return False
    try:
        importlib.import_module("flash_attn")
        return True
    except Exception:  # a broken CUDA build of flash-attn: fall back to sdpa, the caller logs the choice
        return False
