"""Measure the real peak memory of a training run, independently of harness/memory.

    python tests/distributed/memory_probe.py OUT_JSON --config R [k=v ...]
    python -m deepspeed.launcher.runner --num_gpus 2 tests/distributed/memory_probe.py OUT_JSON --config R [k=v ...]

Runs the harness's own `train.prepare` / `train.setup` / `train.fit` (the real entry-point code path:
model loading, quantisation, LoRA, DeepSpeed's engine and its flat buffers, the loop) under a
TorchDispatchMode that sees every tensor an operator returns. It keeps the set of distinct live
untyped storages (keyed by the C++ StorageImpl, released by a weakref finaliser when the storage dies,
resized through a patched `UntypedStorage.resize_`) and records the peak of the sum of their `nbytes`,
overall and per phase (load = everything before the first forward; forward; backward; step).

Nothing here calls harness/memory: the number it writes is the ground truth the budget is tested on.
Rank 0 writes OUT_JSON: {"ranks": [{"rank", "peak_bytes", "phase_peak_bytes": {...}}, ...]}.
"""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path


import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageCounter(TorchDispatchMode):
    """Sum of the bytes of distinct live storages returned by any operator, and its peak."""

    def __init__(self):
        super().__init__()
        self.live_bytes: dict[int, int] = {}  # StorageImpl address -> nbytes
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase = "load"
        self.phase_peak_bytes: dict[str, int] = {}
        self.batches: list = []  # [length, has padding] of each training forward

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self._bump()

    def _bump(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.phase_peak_bytes[self.phase] = max(self.phase_peak_bytes.get(self.phase, 0), self.current_bytes)

    def _release(self, key: int) -> None:
        self.current_bytes -= self.live_bytes.pop(key, 0)

    def track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # subclasses without a plain storage
            return
        key = st._cdata
        n = st.nbytes()
        old = self.live_bytes.get(key)
        if old is None:
            self.live_bytes[key] = n
            self.current_bytes += n
            weakref.finalize(st, self._release, key)
        elif old != n:  # resized in place (set_, resize_)
            self.live_bytes[key] = n
            self.current_bytes += n - old
        self._bump()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        # In-place ops that change a storage's size (resize_, set_) return the input; outputs cover them.
        return out


def patch_storage_resize(counter: LiveStorageCounter) -> None:
    """ZeRO-3 frees and re-materialises some buffers with `untyped_storage().resize_()`, which is not
    an operator the dispatch mode sees."""
    orig = torch.UntypedStorage.resize_

    def resize_(self, size):
        out = orig(self, size)
        key = self._cdata
        if key in counter.live_bytes:
            counter.current_bytes += self.nbytes() - counter.live_bytes[key]
            counter.live_bytes[key] = self.nbytes()
            counter._bump()
        return out

    torch.UntypedStorage.resize_ = resize_


def instrument_engine(engine, counter: LiveStorageCounter) -> None:
    """Label phases by wrapping the engine's forward / backward / step (instance attributes)."""
    for name, phase in (("forward", "forward"), ("backward", "backward"), ("step", "step")):
        orig = getattr(engine, name)

        def wrapped(*a, _orig=orig, _phase=phase, **kw):
            if _phase == "forward" and engine.training:  # the training micro-batch: its length, and whether it has padding
                mask = kw.get("attention_mask")
                counter.batches.append([int(kw["input_ids"].shape[1]), bool(mask is not None and not bool(mask.all()))])
            counter.set_phase(_phase)
            out = _orig(*a, **kw)
            counter._bump()
            return out

        setattr(engine, name, wrapped)


def main() -> int:
    from harness import distributed, train

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it first
    out_json = Path(argv[0])
    counter = LiveStorageCounter()
    patch_storage_resize(counter)
    # The tokenised data set stays resident in host memory for the whole run. It is an input of the
    # budget (its size depends on the data, not the model), so it is measured here on its own.
    data_bytes = [0]
    orig_build = train.data.build_datasets

    def build_datasets(*a, **kw):
        before = counter.current_bytes
        out = orig_build(*a, **kw)
        data_bytes[0] = counter.current_bytes - before
        return out

    train.data.build_datasets = build_datasets
    _args, recipe, plan, model_cfg = train.prepare(argv[1:])
    with counter:
        run = train.setup(recipe, plan, model_cfg)
        load_peak = counter.peak_bytes
        after_load = counter.current_bytes
        instrument_engine(run.engine, counter)
        train.fit(run)
    dist = run.dist
    record = {
        "rank": dist.rank,
        "peak_bytes": counter.peak_bytes,
        "data_bytes": data_bytes[0],
        "load_peak_bytes": load_peak,
        "after_load_bytes": after_load,
        "phase_peak_bytes": counter.phase_peak_bytes,
        "batches": counter.batches,
    }
    per_rank = [None] * dist.world_size
    torch.distributed.all_gather_object(per_rank, record)
    if dist.is_main:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"ranks": per_rank}, indent=1))
    run.log.close()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    from harness import distributed

    distributed.exit_process(main())  # skip the interpreter teardown that can abort after ZeRO-3
