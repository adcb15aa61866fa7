"""Fill the "auto" values of a DeepSpeed JSON config from the recipe.

The shipped files in ds_configs/ are plain DeepSpeed configs; every "auto" is replaced here so the
resolved dict printed by `--dry-run` is exactly what `deepspeed.initialize` receives. A concrete value
that contradicts the recipe (say, a micro-batch of 4 in the file and 2 in the recipe) is an error,
never silently overridden.
"""

from __future__ import annotations

import copy
from typing import Any

from harness.config import ConfigError, Recipe


def _fill(node: dict, key: str, value: Any, path: str, src: str, mismatches: list[str]) -> None:
    if key not in node:
        node[key] = value
    elif node[key] == "auto":
        node[key] = value
    elif node[key] != value:
        mismatches.append(f"{path}{key}={node[key]!r} in {src} but the recipe gives {value!r}")


def resolve_ds_config(
    ds: dict,
    recipe: Recipe,
    *,
    world_size: int,
    hidden_size: int,
    precision: str,
    on_cuda: bool,
    src: str = "the DeepSpeed config",
) -> dict:
    """Return a copy of `ds` with every "auto" filled. `precision` is already resolved (bf16/fp16/fp32)."""
    ds = copy.deepcopy(ds)
    t = recipe.train
    grad_accum = t.global_batch_size // (t.micro_batch_size * world_size)
    bad: list[str] = []
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "", src, bad)
    _fill(ds, "gradient_accumulation_steps", grad_accum, "", src, bad)
    _fill(ds, "train_batch_size", t.global_batch_size, "", src, bad)
    _fill(ds, "gradient_clipping", float(t.max_grad_norm), "", src, bad)
    for name in ("bf16", "fp16"):
        node = ds.setdefault(name, {})
        _fill(node, "enabled", precision == name, f"{name}.", src, bad)

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    # Bucket sizes scale with hidden^2 (one layer's largest matrix is ~hidden x hidden); these are the
    # values DeepSpeed's own Hugging Face integration uses, in elements (not bytes).
    h2 = hidden_size * hidden_size
    sizes = {
        "reduce_bucket_size": h2,
        "allgather_bucket_size": h2,
        "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for off in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(off), dict) and zero[off].get("pin_memory") == "auto":
            zero[off]["pin_memory"] = bool(on_cuda)  # pinned host memory needs a CUDA driver

    # The harness builds AdamW and the LR schedule from train.*; a section here would be ignored.
    if "optimizer" in ds:
        bad.append(f"'optimizer' in {src}: the harness builds AdamW from train.lr/adam_betas/weight_decay; remove it")
    if "scheduler" in ds:
        bad.append(f"'scheduler' in {src}: the harness builds the LR schedule from train.lr_schedule; remove it")

    if bad:
        raise ConfigError("DeepSpeed config disagrees with the recipe: " + "; ".join(bad) + " (use \"auto\" or make them match)")
    left = [p for p in _auto_paths(ds, "")]
    if left:
        raise ConfigError(f"{src}: no value for {', '.join(left)}; replace \"auto\" with a number")
    return ds


def _auto_paths(node: Any, prefix: str):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _auto_paths(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer")
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)
