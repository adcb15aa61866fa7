"""Fill the "auto" values of a DeepSpeed JSON config from the recipe.

The shipped files in ds_configs/ are plain DeepSpeed configs; every "auto" is replaced here so the
resolved dict printed by `--dry-run` is exactly what `deepspeed.initialize` receives. A concrete value
that contradicts the recipe (say, a micro-batch of 4 in the file and 2 in the recipe) is an error,
never silently overridden.
"""

from __future__ import annotations

import copy
import difflib
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
    micro_batch_size: int,
    src: str = "the DeepSpeed config",
) -> dict:
    """Return a copy of `ds` with every "auto" filled. `precision` and `micro_batch_size` are resolved
    (harness/plan.py); the accumulation steps are computed here, once, and read back from the result."""
    ds = copy.deepcopy(ds)
    t = recipe.train
    # validate() checked that global_batch_size is a multiple of world_size (and of the micro-batch when given)
    grad_accum = t.global_batch_size // (micro_batch_size * world_size)
    bad: list[str] = []
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "", src, bad)
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


# Top-level keys of a DeepSpeed config (its documentation, 0.15-0.19). DeepSpeed ignores a top-level key it
# does not know, so a misspelt "zero_optimizaton" silently trains at ZeRO-0: an unknown key this close to a
# known one is refused. Keys far from all of these pass (a newer DeepSpeed may read them).
DS_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "torch_autocast", "amp", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "memory_breakdown", "flops_profiler", "monitor_config", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "activation_checkpointing", "sparse_attention", "data_efficiency", "curriculum_learning",
    "compression_training", "autotuning", "elasticity", "checkpoint", "aio", "data_types", "communication_data_type",
    "seq_parallel_communication_data_type", "disable_allgather", "dataloader_drop_last", "pipeline", "hybrid_engine",
    "compile", "timers", "graph_harvesting", "use_data_before_expert_parallelism", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "weight_quantization", "nebula", "load_universal_checkpoint", "use_node_local_storage",
    "tensor_parallel", "sequence_parallel_size", "vocabulary_size", "disable_python_gc", "zenflow",
)


def _zero_keys() -> set[str] | None:
    """Every key zero_optimization accepts (field names and their stage3_* aliases), from DeepSpeed's own
    schema, which refuses any other at deepspeed.initialize (after the model has loaded)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return None
    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def check_ds_config(ds: dict, src: str) -> None:
    """Keys and ZeRO stage of a DeepSpeed config, checked before any model loads."""
    for key in ds:
        if key not in DS_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, DS_TOP_LEVEL_KEYS, n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"{src}: unknown key '{key}' (DeepSpeed would ignore it); did you mean '{close[0]}'?")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{src}: zero_optimization must be an object like {{\"stage\": 3}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage must be 0, 1, 2 or 3 (a number), got {stage!r}")
    known = _zero_keys()
    for key in zero if known else ():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else "see DeepSpeed's ZeRO configuration reference"
            raise ConfigError(f"{src}: unknown key 'zero_optimization.{key}' (DeepSpeed refuses it after the model has loaded); {hint}")


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a config that check_ds_config accepted."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads(ds: dict, key: str) -> bool:
    """Whether zero_optimization.<key> (offload_optimizer / offload_param) sends it off the device."""
    off = ds.get("zero_optimization", {}).get(key)
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)
