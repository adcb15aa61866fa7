"""Memory budgeting: predict the per-rank peak of a training run before launching it.

    from harness.memory import budget_for_recipe
    budget = budget_for_recipe(recipe, world_size=16, device_memory_bytes=80 * 10**9)   # a target cluster
    budget = budget_for_plan(recipe, plan)   # the run's own RunPlan (harness/plan.py)
    budget.fits, budget.peak_bytes, budget.phase_bytes

Two engines produce the activation side: `analytic` (closed forms, milliseconds) and `trace` (the real
HF model at full width under FakeTensorMode with 1-2 layers, scaled to all layers). The static side
(parameters, gradients, optimizer, ZeRO buffers) is closed-form in both (harness/memory/budget.py).
"""

from __future__ import annotations

import importlib.util

from harness.memory.analytic import ActivationProfile, Cluster, ModelShape, TrainSetup, activation_profile, load_model_shape
from harness.memory.budget import Budget, Line, compose

__all__ = ["ActivationProfile", "Budget", "Cluster", "Line", "ModelShape", "TrainSetup", "activation_profile",
           "budget_for_plan", "budget_for_recipe", "compose", "load_model_shape",
           "plan_for_target", "setup_from_plan", "setup_from_recipe"]


def setup_from_plan(recipe, plan, row_tokens: int | None = None) -> TrainSetup:
    """TrainSetup of a resolved RunPlan (harness/plan.py): the budget models exactly what the run does.

    row_tokens: the longest padded row the run's data gives (StepSampler.longest_sample over its steps). One
    sample per row (no packing) pads a micro-batch to its longest sample, not to data.seq_len: short samples
    then cost what they hold. None: data.seq_len, the worst case (before the data is tokenised)."""
    z = plan.ds.get("zero_optimization", {})
    targets = recipe.lora.target_modules
    grad_dtype = (plan.ds.get("data_types") or {}).get("grad_accum_dtype")
    evals = recipe.eval.every_steps > 0
    method, seq_len, virtual = recipe.method, recipe.data.seq_len, 0
    unpadded_rows = recipe.data.packing or recipe.data.padding_free  # packed rows fill seq_len; flat rows hold the micro-batch
    if row_tokens is not None and not unpadded_rows:
        if row_tokens < 1:
            raise ValueError(f"row_tokens must be >= 1, got {row_tokens}")
        seq_len = min(seq_len, row_tokens)
    if method == "prompt_tuning":
        # A soft prompt: no adapters over a frozen base (16-bit, or NF4 with prompt_tuning.base_4bit), on rows
        # P positions longer (the virtual tokens).
        from harness.config import quantisation

        method, virtual = quantisation(recipe) or "lora", recipe.prompt_tuning.num_virtual_tokens
        seq_len += virtual
    return TrainSetup(
        method=method,
        precision=plan.precision,
        lora_r=recipe.lora.r,
        lora_targets=tuple(targets) if isinstance(targets, list) else "all-linear",
        lora_dropout=recipe.lora.dropout,
        micro_batch=plan.micro_batch_size,
        seq_len=seq_len,
        checkpointing=plan.gradient_checkpointing,
        checkpoint_every_k=plan.checkpoint_every_k,
        attn=plan.attn,
        # sdpa / eager get a (b, 1, s, s) block-diagonal mask for packed or padding-free rows; flash-attn's varlen none
        packed=bool(recipe.data.packing or recipe.data.padding_free) and plan.attn != "flash_attention_2",
        zero_stage=plan.zero_stage,
        offload_optimizer=plan.offload_optimizer,
        offload_param=plan.offload_param,
        reduce_bucket_numel=int(z.get("reduce_bucket_size", 500_000_000)),
        prefetch_bucket_numel=int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
        persistence_threshold_numel=int(z.get("stage3_param_persistence_threshold", 100_000)),
        max_live_numel=int(z.get("stage3_max_live_parameters", 1_000_000_000)),
        max_reuse_distance_numel=int(z.get("stage3_max_reuse_distance", 1_000_000_000)),
        grad_accum_dtype_bytes={"fp32": 4, "bf16": 2, "fp16": 2}.get(grad_dtype, 0),
        device=plan.device,
        loader=plan.loader,
        generate_batch=min(recipe.eval.generate_batch_size, recipe.eval.generate_samples) if evals else 0,
        eval_batch=plan.eval_batch_size if evals and plan.eval_batch_size > plan.micro_batch_size else 0,
        eval_seq_len=recipe.data.seq_len + virtual if seq_len < recipe.data.seq_len + virtual else 0,  # validation rows: up to seq_len
        fused_loss="linear_cross_entropy" in plan.kernels,
        generate_tokens=recipe.data.seq_len + virtual + recipe.eval.max_new_tokens,  # validation prompts: up to seq_len
        generate_gather=recipe.eval.generate_gather,
        num_labels=len(recipe.data.labels) if recipe.task == "classification" else 0,
        virtual_tokens=virtual,
        memory_efficient_linear=bool(z.get("memory_efficient_linear", True)),
    )


def plan_for_target(recipe, world_size: int, *, device: str = "cuda", flash_attn: bool | None = None,
                    device_memory_bytes: int | None = None, model_cfg: dict | None = None):
    """The RunPlan `recipe` gets on `world_size` ranks of a machine described here rather than detected
    (the memory CLI plans for a cluster from a login node). flash_attn=None: whether it imports here."""
    from harness import config
    from harness.plan import Machine, resolve_plan

    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if flash_attn is None:
        asked = recipe.model.attn_implementation == "flash_attention_2"
        flash_attn = device == "cuda" and (asked or importlib.util.find_spec("flash_attn") is not None)
    machine = Machine(device, flash_attn, device_memory_bytes)
    return resolve_plan(recipe, world_size, machine, model_cfg or config.read_model_config(recipe.model.path))


def setup_from_recipe(recipe, world_size: int, *, device: str = "cuda", flash_attn: bool | None = None,
                      device_memory_bytes: int | None = None, model_cfg: dict | None = None) -> TrainSetup:
    """TrainSetup of `recipe` planned for `world_size` ranks on `device` (see plan_for_target)."""
    return setup_from_plan(recipe, plan_for_target(recipe, world_size, device=device, flash_attn=flash_attn,
                                                   device_memory_bytes=device_memory_bytes, model_cfg=model_cfg))


def budget_for_plan(recipe, plan, *, model_cfg: dict | None = None, shape: ModelShape | None = None, engine: str = "analytic",
                    host_data_bytes: int = 0, gpus_per_node: int | None = None, host_ram_bytes: int | None = None,
                    row_tokens: int | None = None) -> Budget:
    """The per-rank Budget of `recipe` run as `plan`; `fits` is set when plan.device_memory_bytes is known.

    train.py refuses a run whose verdict is "does not fit" and warns for "may not fit" (train.check_memory_budget)."""
    from harness import config

    if engine not in ("analytic", "trace"):
        raise ValueError(f"engine {engine!r} must be analytic or trace")
    cfg = model_cfg
    if cfg is None and (shape is None or engine == "trace"):
        cfg = config.read_model_config(recipe.model.path)
    shape = shape or ModelShape.from_config(cfg, name=str(recipe.model.path))
    setup = setup_from_plan(recipe, plan, row_tokens)
    profile = None
    if engine == "trace":
        from harness.memory.trace import trace_profile

        profile = trace_profile(cfg, setup)
    cluster = None
    world_size = plan.world_size
    if plan.device_memory_bytes is not None:
        gpn = gpus_per_node or world_size
        # on CPU the "device" is host RAM already: no separate host limit
        host = host_ram_bytes if plan.device == "cuda" and host_ram_bytes else 2**50
        cluster = Cluster(nodes=max(1, world_size // gpn), gpus_per_node=min(gpn, world_size), gpu_memory_bytes=int(plan.device_memory_bytes),
                          host_ram_bytes=host)
    return compose(shape, setup, world_size, profile, cluster=cluster, host_data_bytes=host_data_bytes)


def budget_for_recipe(recipe, world_size: int, device_memory_bytes: int | None, *, device: str = "cuda", flash_attn: bool | None = None,
                      engine: str = "analytic", host_data_bytes: int = 0, gpus_per_node: int | None = None,
                      host_ram_bytes: int | None = None, row_tokens: int | None = None) -> Budget:
    """The per-rank Budget of `recipe` on `world_size` ranks of a target machine (see plan_for_target)."""
    plan = plan_for_target(recipe, world_size, device=device, flash_attn=flash_attn, device_memory_bytes=device_memory_bytes)
    return budget_for_plan(recipe, plan, engine=engine, host_data_bytes=host_data_bytes, gpus_per_node=gpus_per_node,
                           host_ram_bytes=host_ram_bytes, row_tokens=row_tokens)
