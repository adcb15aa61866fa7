"""Safe loading: DeepSpeed's .pt files are pickles; never let one run code."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------

TRUST_PICKLES_ENV = "HARNESS_TRUST_CHECKPOINT_PICKLES"


def _deepspeed_safe_globals() -> list:
    """Plain-data classes that DeepSpeed pickles into its checkpoint files besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loading():
    """Inside this block every `torch.load` (DeepSpeed's own included: it passes weights_only=False)
    uses torch's restricted unpickler, which builds tensors, containers and the allow-listed DeepSpeed
    classes and refuses anything else, so a tampered checkpoint cannot execute code.
    HARNESS_TRUST_CHECKPOINT_PICKLES=DIR lifts that for the files under DIR only (a checkpoint you trust
    that holds other objects); every other file stays restricted."""
    trusted = os.environ.get(TRUST_PICKLES_ENV, "")
    trusted_dir = Path(trusted).resolve() if trusted and trusted not in ("0", "1") else None
    real_load = torch.load

    def load(f, *args, **kwargs):
        if trusted_dir is not None and isinstance(f, (str, os.PathLike)) and trusted_dir in Path(f).resolve().parents:
            return real_load(f, *args, **kwargs)  # the one directory the user said to trust
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except Exception as e:  # torch raises UnpicklingError with the offending global in the text
            if "Weights only load failed" not in str(e):
                raise
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f"a pickled {found.group(1)}" if found else "a pickled object that is not plain data"
            where = Path(f).resolve().parent if isinstance(f, (str, os.PathLike)) else "<that checkpoint directory>"
            raise ValueError(f"{f} holds {what}, which the harness does not unpickle (it could run code). If you trust "
                             f"this checkpoint, rerun with {TRUST_PICKLES_ENV}={where} (that directory only).") from None

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load

