"""Memory budgeting: predict the per-rank peak of a training run before launching it.

    from harness.memory import budget_for_recipe
    budget = budget_for_recipe(recipe, world_size=16, device_memory_bytes=80 * 10**9)
    budget.fits, budget.peak_bytes, budget.phase_bytes

Two engines produce the activation side: `analytic` (closed forms, milliseconds) and `trace` (the real
HF model at full width under FakeTensorMode with 1-2 layers, scaled to all layers). The static side
(parameters, gradients, optimizer, ZeRO buffers) is closed-form in both (harness/memory/budget.py).
"""

from __future__ import annotations

from harness.memory.analytic import ActivationProfile, Cluster, ModelShape, TrainSetup, activation_profile, load_model_shape
from harness.memory.budget import Budget, Line, compose

__all__ = ["ActivationProfile", "Budget", "Cluster", "Line", "ModelShape", "TrainSetup", "activation_profile",
           "budget_for_recipe", "compose", "load_model_shape", "setup_from_recipe"]


def setup_from_recipe(recipe, world_size: int, *, device: str = "cuda", hidden_size: int | None = None) -> TrainSetup:
    """TrainSetup from a harness Recipe and its DeepSpeed config ("auto" values resolved like train.py)."""
    from harness import config
    from harness.deepspeed_config import resolve_ds_config, zero_stage

    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    precision = config.resolve_precision(recipe.train.precision, device == "cuda")
    if hidden_size is None:
        hidden_size = int(config.read_model_config(recipe.model.path)["hidden_size"])
    ds = resolve_ds_config(config.load_ds_json(recipe.deepspeed.config), recipe, world_size=world_size, hidden_size=hidden_size,
                           precision=precision, on_cuda=device == "cuda")
    z = ds.get("zero_optimization", {})

    def off(key):
        o = z.get(key)
        return isinstance(o, dict) and o.get("device", "none") not in ("none", None)

    attn = recipe.model.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if (device == "cuda" and precision != "fp32") else "sdpa"
    targets = recipe.lora.target_modules
    grad_dtype = (ds.get("data_types") or {}).get("grad_accum_dtype")
    return TrainSetup(
        method=recipe.method,
        precision=precision,
        lora_r=recipe.lora.r,
        lora_targets=tuple(targets) if isinstance(targets, list) else "all-linear",
        lora_dropout=recipe.lora.dropout,
        micro_batch=recipe.train.micro_batch_size,
        seq_len=recipe.data.seq_len,
        checkpointing=recipe.train.gradient_checkpointing,
        checkpoint_every_k=recipe.train.checkpoint_every_k,
        attn=attn,
        packed=bool(recipe.data.packing or recipe.data.padding_free) and attn != "flash_attention_2",
        zero_stage=zero_stage(ds),
        offload_optimizer=off("offload_optimizer"),
        offload_param=off("offload_param"),
        reduce_bucket_numel=int(z.get("reduce_bucket_size", 500_000_000)),
        prefetch_bucket_numel=int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
        persistence_threshold_numel=int(z.get("stage3_param_persistence_threshold", 100_000)),
        max_live_numel=int(z.get("stage3_max_live_parameters", 1_000_000_000)),
        max_reuse_distance_numel=int(z.get("stage3_max_reuse_distance", 1_000_000_000)),
        grad_accum_dtype_bytes={"fp32": 4, "bf16": 2, "fp16": 2}.get(grad_dtype, 0),
        device=device,
        loader=recipe.model.loader if recipe.model.loader != "auto" else ("streamed" if zero_stage(ds) == 3 else "hf"),
        generate_batch=min(recipe.eval.generate_batch_size, recipe.eval.generate_samples) if recipe.eval.every_steps > 0 else 0,
        eval_batch=recipe.eval.batch_size if recipe.eval.every_steps > 0 and recipe.eval.batch_size > recipe.train.micro_batch_size else 0,
        fused_loss=_fused_loss(recipe.kernels),
        generate_tokens=recipe.data.seq_len + recipe.eval.max_new_tokens,
        generate_gather=recipe.eval.generate_gather,
    )


def _fused_loss(kernels) -> bool:
    """The recipe computes the loss chunk by chunk inside lm_head (no (batch, seq, vocab) logits)."""
    return kernels == "all" or (isinstance(kernels, list) and "linear_cross_entropy" in kernels)


def budget_for_recipe(recipe, world_size: int, device_memory_bytes: int | None, *, device: str = "cuda",
                      engine: str = "analytic", host_data_bytes: int = 0, gpus_per_node: int | None = None,
                      host_ram_bytes: int | None = None) -> Budget:
    """The per-rank Budget of `recipe` on `world_size` ranks; `fits` is set when device_memory_bytes is given.

    train.py can refuse a run with `if not b.fits: raise ConfigError(...)`."""
    from harness import config

    if engine not in ("analytic", "trace"):
        raise ValueError(f"engine {engine!r} must be analytic or trace")
    cfg = config.read_model_config(recipe.model.path)
    shape = ModelShape.from_config(cfg, name=str(recipe.model.path))
    setup = setup_from_recipe(recipe, world_size, device=device, hidden_size=shape.hidden)
    profile = None
    if engine == "trace":
        from harness.memory.trace import trace_profile

        profile = trace_profile(cfg, setup)
    cluster = None
    if device_memory_bytes is not None:
        gpn = gpus_per_node or world_size
        cluster = Cluster(nodes=max(1, world_size // gpn), gpus_per_node=min(gpn, world_size), gpu_memory_bytes=int(device_memory_bytes),
                          host_ram_bytes=host_ram_bytes or 2**50)
    return compose(shape, setup, world_size, profile, cluster=cluster, host_data_bytes=host_data_bytes)
