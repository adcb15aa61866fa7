"""Build a run: every object the training loop needs, from the recipe and its resolved plan.

    run = setup(recipe, plan, model_cfg)     # harness/train.py: prepare() -> setup() -> fit()

Named builders, in the order setup() calls them so that each fails as early as it can: the runtime
(signals, process group, output_dir lock), the resume choice, the log, the data (a bad row fails before
minutes of model loading), the model (harness/model.py owns its ZeRO-3 context) and the engine (with the
optimizer, the LR schedule and the trainer state, loaded from the checkpoint on a resume).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import checkpoint, config, data, distributed, kernels, metrics, preemption, run_lock
from harness import model as model_lib
from harness.config import ConfigError
from harness.memory import live as live_memory
from harness.plan import RunPlan


@dataclass
class TrainerState:
    """What the loop carries from step to step; saved in every checkpoint (as a dict) and restored on resume."""

    step: int = 0  # optimizer steps done
    tokens_seen: float = 0.0  # non-padding input tokens, all ranks
    elapsed_s: float = 0.0  # training wall time before this process (a resume continues the clock)
    best_val: float = math.inf  # early stopping: the best val_loss (or minus the best eval.metric score) so far
    best_metric: str = "loss"  # the eval.metric best_val holds (a resume that changes it starts counting afresh)
    evals_without_gain: int = 0
    exact_match_step0: float | None = None  # greedy-answer exact match before training, and at the last eval
    exact_match: float | None = None
    scores_step0: dict | None = None  # task=classification: {"accuracy", "f1"} before training

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass
class Run:
    """Everything the loop needs, built by `setup` (tests and tools build one the same way)."""

    recipe: config.Recipe
    plan: RunPlan  # every resolved run decision (harness/plan.py)
    dist: distributed.DistInfo
    data: "RunData"
    engine: object
    scheduler: object
    log: metrics.MetricsLogger
    flops_per_token: float
    peak_flops: float
    stop: preemption.StopFlag
    state: TrainerState
    hf_ds_config: object = None  # transformers keeps only a weakref to it; this keeps ZeRO-3 loading alive
    memory: dict | None = None  # the last live footprint (harness/memory/live.py)
    output_lock: object = None  # rank 0: the open, flock-ed output_dir/.harness.lock (harness/run_lock.py)
    fingerprint: dict | None = None  # checkpoint.recipe_fingerprint, recorded in every checkpoint's manifest
    last_eval: tuple | None = None  # (step, evaluate()'s dict) of the latest eval

    # the data, by the names the loop reads
    tokenizer = property(lambda self: self.data.tokenizer)
    pad_id = property(lambda self: self.data.pad_id)
    train_set = property(lambda self: self.data.train_set)
    val_set = property(lambda self: self.data.val_set)
    sampler = property(lambda self: self.data.sampler)


@dataclass
class Resume:
    """The checkpoint this run continues (chosen and verified by rank 0), or none."""

    dir: Path | None = None
    universal_dir: Path | None = None  # its copy converted for this world size, when the saved one differs
    step: int = 0


@dataclass
class RunData:
    tokenizer: object
    pad_id: int
    train_set: list
    val_set: list
    sampler: data.StepSampler
    longest_row_tokens: int | None = None  # one sample per row: the longest padded row of the run's steps (the memory budget's)


def build_runtime(recipe: config.Recipe) -> tuple[preemption.StopFlag, distributed.DistInfo, object]:
    """Signal handling, the process group and the output_dir lock: (stop flag, dist, lock)."""
    # Signals from here on end in exit 75 (at once while nothing is trained; see StopFlag), the
    # rendezvous included: a job stuck waiting for its nodes can still be preempted cleanly.
    stop = preemption.StopFlag(max_runtime_s=60 * recipe.checkpoint.max_runtime_minutes, margin_s=60 * recipe.checkpoint.exit_margin_minutes)
    dist = distributed.init_distributed()
    # One run per output_dir: rank 0 takes the lock (held until it exits) and every rank learns the verdict.
    lock, problem = None, [None]
    if dist.is_main:
        try:
            lock = run_lock.acquire(recipe.output_dir)
        except ConfigError as e:
            problem = [str(e)]
    torch.distributed.broadcast_object_list(problem, src=0)  # sync point: no rank goes on when the lock failed
    if problem[0]:
        raise ConfigError(problem[0])
    return stop, dist, lock


def build_resume(recipe: config.Recipe, dist: distributed.DistInfo, fingerprint: dict) -> Resume:
    """Rank 0 picks (and verifies) the checkpoint to resume from, and checks that this recipe may continue
    it (the fingerprint in its manifest); every rank uses its choice."""
    c = recipe.checkpoint
    choice = [None, None]
    if dist.is_main:
        found = checkpoint.find_resume_dir(recipe.output_dir, c.resume, log=print, check_hashes=c.verify == "sha256")
        refused, allowed = checkpoint.resume_changes(checkpoint.read_manifest(found).get("recipe") or fingerprint, fingerprint) if found else ([], [])
        if allowed:
            shown = "; ".join(allowed[:8]) + (" ..." if len(allowed) > 8 else "")
            print(f"resuming {found.name} with {len(allowed)} recipe change(s): {shown}", flush=True)
        problem = (f"{found} was trained with another recipe ({'; '.join(refused)}), and these keys decide what the checkpoint "
                   "holds; restore them, or train afresh in another output_dir (or with checkpoint.resume=none)") if refused else None
        choice = [str(found) if found else None, problem]
    torch.distributed.broadcast_object_list(choice, src=0)  # sync point: every rank resumes the same checkpoint, or none
    if choice[1]:
        raise ConfigError(choice[1])
    if choice[0] is None:
        return Resume()
    resume = Resume(Path(choice[0]))
    manifest = checkpoint.read_manifest(resume.dir)
    resume.step = manifest["step"]
    if checkpoint.needs_universal(manifest, dist.world_size):
        # Another world size: load DeepSpeed's per-parameter (universal) copy of the checkpoint.
        resume.universal_dir = checkpoint.universal_copy(resume.dir, dist)
    return resume


def build_logger(recipe: config.Recipe, plan: RunPlan, dist: distributed.DistInfo, resume: Resume) -> metrics.MetricsLogger:
    """The metrics log (rank 0 writes), which first records the plan, the recipe and the DeepSpeed config."""
    log = metrics.MetricsLogger(
        recipe.output_dir,
        is_main=dist.is_main,
        total_steps=recipe.train.max_steps,
        progress_bar=recipe.log.progress_bar,
        wandb_cfg={"project": recipe.log.wandb_project, "name": recipe.log.wandb_run_name} if recipe.log.wandb else None,
        recipe_dict=config.to_dict(recipe),
        resume_step=resume.step,
    )
    for line in plan.lines():  # every run decision, and why each "auto" became what it is
        log.message(f"plan: {line}")
    if dist.is_main:
        Path(recipe.output_dir, "recipe.yaml").write_text(config.dump_yaml(recipe))
        Path(recipe.output_dir, "ds_config.json").write_text(json.dumps(plan.ds, indent=2))
    return log


def build_data(recipe: config.Recipe, plan: RunPlan, dist: distributed.DistInfo, log: metrics.MetricsLogger) -> RunData:
    """Tokenised train / validation sets and the step sampler. Data comes before the model, so a bad row
    fails before minutes of loading."""
    from transformers import AutoTokenizer

    t = recipe.train
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.task == "classification" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # saved with the adapter: batched pipeline("text-classification") needs one
    pad_id = data.pad_token_id(tokenizer)
    cache_dir = recipe.data.cache_dir or str(Path(recipe.output_dir) / "data_cache")
    train_set, val_set, stats = data.build_datasets(recipe.data, tokenizer, t.seed, cache_dir=cache_dir, rank=dist.rank,
                                                    world_size=dist.world_size, say=log.message)
    lengths = data.sample_lengths(train_set) if recipe.data.group_by_length else None
    sampler = data.StepSampler(len(train_set), t.global_batch_size, plan.micro_batch_size, dist.world_size, dist.rank, t.seed,
                               lengths=lengths, unit="packed rows" if recipe.data.packing else "samples")
    for line in stats.lines(recipe.data.seq_len):
        log.message(line)
    longest = None
    if not (recipe.data.packing or recipe.data.padding_free):  # padded to each micro-batch's longest sample, not to seq_len
        longest = sampler.longest_sample(data.sample_lengths(train_set), t.max_steps)
        log.message(f"data: the longest padded row of the run's {t.max_steps} steps is {longest} tokens (data.seq_len {recipe.data.seq_len}): "
                    "the memory report's budget counts that")
    log.log({"data": {**stats.record(), "longest_padded_row_tokens": longest}})
    return RunData(tokenizer, pad_id, train_set, val_set, sampler, longest)


def build_model(recipe: config.Recipe, plan: RunPlan, dist: distributed.DistInfo, log: metrics.MetricsLogger, model_cfg: dict):
    """The model as the plan trains it: loaded (under ZeRO-3 partitioned as it loads), kernels patched
    in and activation checkpointing set. Returns (model, hf_ds_config to keep alive, checkpointed layers)."""
    load_t0 = time.perf_counter()
    model, hf_ds_config = model_lib.build_model(recipe, plan, dist.device)
    # inside module forwards, before ZeRO-3 wraps them; "all" skips what the model has nothing for
    patched = kernels.apply_kernels(model, list(plan.kernels) if plan.kernels_explicit else "all")
    n_layers = int(model_cfg["num_hidden_layers"])
    n_ckpt = model_lib.apply_gradient_checkpointing(model, plan.gradient_checkpointing, plan.checkpoint_every_k)
    used_attn = getattr(model.config, "_attn_implementation", plan.attn)
    if used_attn != plan.attn:  # the plan (and the memory budget) assumed another kernel: say so rather than mislead
        log.message(f"warning: transformers runs attention with {used_attn}, not the planned {plan.attn}; the memory budget models {plan.attn}")
    log.message(
        f"model: {type(model).__name__} method={recipe.method} precision={plan.precision} attn={plan.attn} zero_stage={plan.zero_stage} "
        f"checkpointed_layers={n_ckpt}/{n_layers} world_size={dist.world_size} kernels={patched or 'none'} "
        f"loader={plan.loader} ({time.perf_counter() - load_t0:.1f} s)"
    )
    return model, hf_ds_config, n_ckpt


def build_engine(model, recipe: config.Recipe, plan: RunPlan, dist: distributed.DistInfo, resume: Resume,
                 log: metrics.MetricsLogger) -> tuple[object, object, TrainerState]:
    """The DeepSpeed engine over the trainable parameters, with its optimizer and LR schedule, and the
    trainer state: fresh, or loaded (with the weights and optimizer) from the resume checkpoint."""
    import deepspeed

    ds = plan.ds
    if resume.universal_dir is not None:
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe, plan)
    scheduler = build_scheduler(optimizer, recipe)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=trainable, config=ds)
    engine.train()
    if resume.dir is None:
        return engine, scheduler, TrainerState()
    saved = checkpoint.load_checkpoint(engine, resume.dir, dist, exclude_frozen=recipe.method != "full", universal_dir=resume.universal_dir)
    # checkpoint.verify=size reads a sample of each file: a corrupted value elsewhere shows here, as a
    # NaN or an absurd magnitude in what this rank loaded (every rank checks its own shard).
    bad = checkpoint.loaded_state_problem(engine)
    verdicts = [None] * dist.world_size
    torch.distributed.all_gather_object(verdicts, bad)  # sync point: every rank stops if any shard is bad
    bad_rank = next((r for r, v in enumerate(verdicts) if v), None)
    if bad_rank is not None:
        raise checkpoint.CheckpointError(f"checkpoint {resume.dir} is corrupted: rank {bad_rank} loaded {verdicts[bad_rank]}; resume "
                                         "from an older checkpoint (checkpoint.resume=PATH) and keep checkpoint.verify=sha256, "
                                         "which reads every byte")
    log.message(f"resumed from {resume.dir}{' (universal copy)' if resume.universal_dir else ''} at step {saved['step']}")
    return engine, scheduler, TrainerState.from_dict(saved)


def setup(recipe: config.Recipe, plan: RunPlan, model_cfg: dict) -> Run:
    """Build the run: runtime, resume choice, log, data, model, engine; in this order, so each fails as
    early as it can (a bad row before minutes of model loading)."""
    stop, dist, lock = build_runtime(recipe)
    # Before anything is allocated, so the snapshot shows the model load as well as the steps.
    snapshot = recipe.log.memory_snapshot and live_memory.start_snapshot(dist.device)
    torch.manual_seed(recipe.train.seed)
    fingerprint = checkpoint.recipe_fingerprint(recipe)
    resume = build_resume(recipe, dist, fingerprint)
    log = build_logger(recipe, plan, dist, resume)
    if recipe.log.memory_snapshot and not snapshot:
        log.message(f"log.memory_snapshot: the allocator history needs CUDA; nothing is recorded on {dist.device.type}")
    run_data = build_data(recipe, plan, dist, log)
    model, hf_ds_config, n_ckpt = build_model(recipe, plan, dist, log, model_cfg)
    counts = model_lib.count_parameters(model)
    log.message(counts.line())
    engine, scheduler, state = build_engine(model, recipe, plan, dist, resume, log)

    # FLOPs per token for MFU (see harness/metrics.py); embeddings are lookups, not matmuls.
    # (a classifier has no LM head: its embedding matrix is only a lookup, tied or not)
    untied_or_no_head = recipe.task == "classification" or not model_cfg.get("tie_word_embeddings")
    embed_numel = int(model_cfg["vocab_size"]) * int(model_cfg["hidden_size"]) if untied_or_no_head else 0
    n_layers = int(model_cfg["num_hidden_layers"])
    flops_per_token = metrics.train_flops_per_token(
        matmul_params=counts.total - embed_numel,
        trainable_matmul_params=counts.trainable,
        full_finetune=recipe.method == "full",
        num_layers=n_layers,
        hidden=int(model_cfg["hidden_size"]),
        seq_len=recipe.data.seq_len,
        recompute_fraction=n_ckpt / n_layers,
    )
    return Run(recipe, plan, dist, run_data, engine, scheduler, log, flops_per_token,
               metrics.device_peak_tflops(recipe.train.peak_tflops) * 1e12, stop, state, hf_ds_config, output_lock=lock,
               fingerprint=fingerprint)


def build_optimizer(params: list, recipe: config.Recipe, plan: RunPlan):
    t = recipe.train
    kw = dict(lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    if plan.offload_optimizer:  # ZeRO-Offload steps on the host with DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    return torch.optim.AdamW(params, fused=torch.cuda.is_available(), **kw)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of train.lr for optimizer step `step` (0-based). Warmup is linear and reaches the
    full rate at step warmup_steps - 1, so the first step already learns (a ramp from 0 wastes it);
    then cosine or linear decay to min_lr_ratio at the last step, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps + 1) / max(1, max_steps - warmup_steps)
    progress = min(progress, 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer, recipe: config.Recipe):
    t = recipe.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(lr_factor, schedule=t.lr_schedule, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio),
    )
