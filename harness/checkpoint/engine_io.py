"""Save and load a training checkpoint through DeepSpeed (all ranks call these), with this rank's RNG
state as plain JSON, a bounds check of what was loaded, and conversion for another world size."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from harness import distributed
from harness.checkpoint.files import CHECKPOINTS, LATEST, UNIVERSAL, _fsync_path, atomic_write_text, prune, read_manifest, write_manifest
from harness.checkpoint.safe_load import weights_only_loading

# Bounds a loaded training state must respect: an LLM weight (or LoRA factor) is O(1), and a corrupted
# float is usually far outside them (a flipped exponent bit gives 1e29 or NaN).
MAX_ABS_PARAMETER = 1e4
MAX_ABS_OPTIMIZER_STATE = 1e12


def loaded_state_problem(engine) -> str | None:
    """None when every trainable value and optimizer state this rank holds is finite and in bounds (the
    check after a resume that `checkpoint.verify=size` relies on), else what is wrong."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizers wrap the torch one
    # The fp32 master values: ZeRO-3 and ZeRO-1/2 keep them as flat partitions outside param_groups (which
    # ZeRO-3 fills only during its step); without ZeRO they are the param_groups' own parameters.
    masters = list(getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None) or [])
    masters += [p for group in inner.param_groups for p in group["params"]]
    named = [("parameter", p.data, MAX_ABS_PARAMETER) for p in masters]
    named += [(k, v, MAX_ABS_OPTIMIZER_STATE) for per_param in inner.state.values() for k, v in per_param.items()
              if torch.is_tensor(v) and v.numel() > 1]
    for i, (what, t, bound) in enumerate(named):
        if t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            return f"non-finite {what} values (tensor {i} of {len(named)})"
        biggest = float(t.abs().max())
        if biggest > bound:
            return f"{what} values up to {biggest:.3g} (tensor {i} of {len(named)}; bound {bound:.0e})"
    return None


# --------------------------------------------------------------------------------------------------
# RNG state: plain JSON (no pickle), one file per rank
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# Save and load through DeepSpeed (all ranks call these)
# --------------------------------------------------------------------------------------------------


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, dist, *, exclude_frozen: bool, keep_last: int,
                    recipe: dict | None = None) -> Path:
    """Write a complete, verified checkpoint of `step` (see the module docstring for the protocol)."""
    root = Path(output_dir) / CHECKPOINTS
    tag = f"step_{step:08d}"
    tmp = root / f"{tag}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"trainer": trainer_state}, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    with open(tmp / f"rng_rank{dist.rank:05d}.json", "w") as f:
        json.dump(rng_state(), f)
    distributed.barrier()  # every rank's files are written
    if dist.is_main:
        write_manifest(tmp, step, world_size=dist.world_size, zero_stage=engine.zero_optimization_stage(), recipe=recipe)
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(root)
        atomic_write_text(root / LATEST, tag)
        prune(output_dir, keep_last)
    distributed.barrier()  # nobody goes on (or exits) before the checkpoint is complete
    return root / tag



def needs_universal(manifest: dict, world_size: int) -> bool:
    """A ZeRO-1/2/3 checkpoint holds one optimizer shard per rank, laid out for the world size that wrote
    it; on another world size it must be loaded through DeepSpeed's universal (per-parameter) format.
    Without ZeRO, rank 0 saved the whole optimizer state, which any world size loads."""
    return manifest["world_size"] != world_size and manifest.get("zero_stage", 3) > 0


def universal_copy(ckpt_dir: Path, dist, log=print) -> Path:
    """`checkpoints/universal/step_N`: `ckpt_dir` converted by DeepSpeed's ds_to_universal (rank 0
    converts, the others wait; reused when it already exists). Written under a temporary name and
    renamed, so a crash mid-conversion leaves nothing that looks complete."""
    out = ckpt_dir.parent / UNIVERSAL / ckpt_dir.name
    if dist.is_main and not out.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        tmp = out.parent / f"{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log(f"converting {ckpt_dir.name} (saved by {read_manifest(ckpt_dir)['world_size']} ranks) to DeepSpeed's universal "
            f"format for {dist.world_size} ranks: {out}")
        args = Namespace(input_folder=str(ckpt_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                         keep_temp_folder=False, no_strict=False, inject_missing_state=False)
        with weights_only_loading():
            ds_to_universal.main(args)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's own pointer; unused
        os.replace(tmp, out)
    distributed.barrier()
    return out


def load_checkpoint(engine, ckpt_dir: Path, dist, *, exclude_frozen: bool, universal_dir: Path | None = None) -> dict:
    """Restore model, optimizer, LR scheduler and this rank's RNG; return the trainer state. With
    `universal_dir` (another world size; the engine was built with checkpoint.load_universal) the
    weights and optimizer come from that converted copy, the RNG files from `ckpt_dir`."""
    src = universal_dir or ckpt_dir
    # Frozen weights are not in a LoRA/QLoRA checkpoint: they were loaded from model.path already.
    with weights_only_loading():
        _, client = engine.load_checkpoint(str(src.parent), tag=src.name, load_module_strict=not exclude_frozen,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir}")
    rng_file = ckpt_dir / f"rng_rank{dist.rank:05d}.json"
    if rng_file.is_file():  # a universal copy has none, nor has a rank beyond the saved world: seeds stay
        set_rng_state(json.loads(rng_file.read_text()))
    return client["trainer"]


