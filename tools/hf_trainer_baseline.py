#!/usr/bin/env python
"""Baseline for tools/bench_train.py: the same training run as harness/train.py, done with the plain
Hugging Face `Trainer` + DeepSpeed.

Run under the same launcher as the harness, with the recipe and DeepSpeed config the harness resolved:

    python -m deepspeed.launcher.runner --num_gpus 2 tools/hf_trainer_baseline.py \
        --recipe RUN/recipe.yaml --ds-config RUN/ds_config.json --output-dir /tmp/hf_run

--ds-config may also be a raw file with "auto" values (ds_configs/zero3.json): HF then fills them itself.

What is kept identical to the harness, so a throughput difference is the training loop's, not the job's:
  * model: loaded as harness/model.py does (same dtype, attention, bitsandbytes NF4 settings, peft LoRA
    with the same seed right before the adapters are created, non-reentrant activation checkpointing).
    The loading code is written out here on purpose rather than imported, so this stays a plain-HF run.
  * data: harness.data.build_datasets gives the very same tokenised samples, and harness.data.StepSampler
    the same sample-to-(step, rank, micro-batch) assignment; the flat dataset is laid out so that the
    Trainer's sequential sampler + accelerate's batch sharding reproduce it. Every step checks this.
  * loss: labels = input_ids with prompt and padding set to -100 (the harness's `targets` shifted back
    by one), normalised by the target tokens of the whole step on all ranks (HF's num_items_in_batch
    with average_tokens_across_devices), which is what the harness does.
  * optimizer/schedule: torch AdamW with the recipe's lr/betas/weight decay, DeepSpeed gradient clipping
    from the same config, and HF's own scheduler of the recipe's kind (warmup steps, min lr ratio). HF's
    warmup gives the first step lr 0; a harness whose warmup starts at lr/warmup_steps runs one step
    ahead on the schedule, which changes the losses slightly but not the work per step.

Writes OUTPUT_DIR/metrics.jsonl (rank 0), one line per optimizer step:
    step, loss, lr (the rate the step used), grad_norm, step_s (on_step_begin -> on_step_end wall seconds on rank 0),
    interval_s (previous on_step_end -> this one: the whole loop iteration), tokens (non-padding input
    tokens of the step summed over ranks), tokens_per_s = tokens / step_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from harness import config as harness_config
from harness import data as harness_data
from harness import distributed as harness_distributed
from harness.numerics import DTYPES
from harness.plan import Machine, resolve_plan

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed 0.19 calls collective names that torch 2.13 deprecates on every step: say it once.
warnings.filterwarnings("once", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)

# harness lr_schedule -> the transformers scheduler of the same shape.
SCHEDULERS = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="harness recipe YAML (best: the run's resolved RUN/recipe.yaml)")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the recipe's deepspeed.config)")
    p.add_argument("--output-dir", required=True, help="where metrics.jsonl goes (no checkpoints are saved)")
    p.add_argument("--liger", action="store_true",
                   help="patch the model with Liger-Kernel (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) first")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides, as for harness/train.py")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data: the harness's samples, in the harness's order
# ----------------------------------------------------------------------------------------------


class OrderedSamples(torch.utils.data.Dataset):
    """The harness's (input_ids, targets) samples, laid out for a sequential sampler.

    Accelerate shards a DataLoader batch-wise: with W ranks, rank r gets batches r, r+W, r+2W, ...
    So the flat order is step -> micro-batch j -> rank r -> the harness's j-th micro-batch of rank r
    at that step; each rank then sees exactly what StepSampler gives it."""

    def __init__(self, samples: list, samplers: list, steps: int):
        self.samples = samples
        self.order: list[int] = []
        self.expected: list[list[list[int]]] = []  # [step][rank] -> sample indices in micro-batch order
        for step in range(steps):
            windows = [s.window(step) for s in samplers]
            for j in range(len(windows[0])):
                for rank_windows in windows:
                    self.order += rank_windows[j]
            self.expected.append([[i for mb in w for i in mb] for w in windows])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict:
        index = self.order[k]
        input_ids, targets = self.samples[index]
        return {"input_ids": input_ids, "targets": targets, "sample_index": index}


class Collator:
    """Pad exactly like harness.data.collate, then turn its targets into HF causal-LM labels.

    The harness's targets[t] is the token to predict at position t (already shifted); HF models shift
    labels themselves (position t predicts labels[t + 1]), so labels = targets shifted right by one.
    The harness's last column is always -100, so nothing is lost."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        batch = harness_data.collate([(f["input_ids"], f["targets"]) for f in features], self.pad_id)
        targets = batch.pop("targets")
        labels = torch.full_like(targets, harness_data.IGNORE_INDEX)
        labels[:, 1:] = targets[:, :-1]
        batch["labels"] = labels
        batch["sample_index"] = torch.tensor([f["sample_index"] for f in features], dtype=torch.int64)
        return batch


# ----------------------------------------------------------------------------------------------
# Model: as harness/model.py load_model, written with plain transformers / peft calls
# ----------------------------------------------------------------------------------------------


def apply_liger(model_path: str) -> None:
    """Liger-Kernel's own patch for the architecture, applied before the model is built (GPU only)."""
    from harness import _optional
    from harness.config import read_model_config

    _optional.require("liger_kernel")
    import liger_kernel.transformers as liger

    arch = read_model_config(model_path).get("model_type", "")
    patch = {"llama": liger.apply_liger_kernel_to_llama, "mistral": liger.apply_liger_kernel_to_mistral,
             "qwen2": liger.apply_liger_kernel_to_qwen2}.get(arch)
    if patch is None:
        raise SystemExit(f"error: no Liger patch for model_type {arch!r}")
    patch()


def load_model(recipe, precision: str, attn: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = DTYPES[precision]
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.method == "qlora":
        # 4-bit bytes stored in `dtype` tensors so ZeRO-3 partitions them like any other weight.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    elif recipe.method == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    # No device_map: under ZeRO-3 the TrainingArguments' HfDeepSpeedConfig makes from_pretrained load
    # inside deepspeed.zero.Init (the harness only sets device_map for quantisation without ZeRO-3).
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, **kwargs)
    model.config.use_cache = False
    if recipe.method == "full":
        if recipe.freeze_layers >= 0:
            raise SystemExit("error: freeze_layers is not implemented in the baseline")
        return model

    import peft

    torch.manual_seed(recipe.train.seed)  # same adapter init as the harness
    lora = recipe.lora
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        task_type="CAUSAL_LM", bias="none"),
    )
    for p in model.parameters():  # one dtype for the trainable weights, as the harness
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def make_trainer_class():
    from transformers import Trainer

    class CountingTrainer(Trainer):
        """Trainer that notes, per micro-batch actually trained on, its non-padding tokens and sample ids.

        Counting here rather than in the collator matters: accelerate's DataLoaderShard fetches one
        batch ahead, so the collator's calls do not line up with optimizer steps."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.local_tokens = 0  # this rank's non-padding input tokens in the current optimizer step
            self.seen_indices: list[int] = []  # this rank's sample ids in the current optimizer step

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen_indices += inputs.pop("sample_index").tolist()
            self.local_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingTrainer


def make_callback(trainer_ref: list, dataset: OrderedSamples, rank: int, out_path: Path):
    from transformers import TrainerCallback

    class StepMetrics(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin -> on_step_end, i.e. forward/backward of all
        micro-batches plus the optimizer step; batch fetching and logging fall outside, as in the
        harness's step_s), tokens summed over ranks, and a check of the samples trained on."""

        def __init__(self):
            self.t_begin = 0.0
            self.t_last_end = None
            self.pending: dict = {}
            self.file = out_path.open("w", buffering=1) if rank == 0 else None

        def on_train_begin(self, args, state, control, **kw):
            self.t_last_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t_end = time.perf_counter()  # before the all_reduce below, which is ours, not the step's
            trainer = trainer_ref[0]
            step = state.global_step
            expected = dataset.expected[step - 1][rank]
            if trainer.seen_indices != expected:
                raise RuntimeError(f"rank {rank} step {step}: trained on samples {trainer.seen_indices}, "
                                   f"the harness would use {expected}: the data order differs")
            tokens = torch.tensor([float(trainer.local_tokens)], dtype=torch.float64)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(tokens)
            trainer.local_tokens, trainer.seen_indices = 0, []
            step_s = t_end - self.t_begin
            self.pending = {"step": step, "step_s": step_s, "interval_s": t_end - self.t_last_end,
                            "tokens": tokens.item(), "tokens_per_s": tokens.item() / step_s}
            if torch.cuda.is_available():
                self.pending["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.t_last_end = t_end

        def on_log(self, args, state, control, logs=None, **kw):
            # Trainer logs right after on_step_end (logging_steps=1); its loss is the all-rank mean of
            # sum(CE) / global target tokens, i.e. the same token-weighted loss the harness logs.
            if self.file is None or not logs or "loss" not in logs:
                return
            record = {**self.pending, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                      "grad_norm": logs.get("grad_norm")}
            self.file.write(json.dumps(record) + "\n")

        def on_train_end(self, args, state, control, **kw):
            if self.file is not None:
                self.file.close()

    return StepMetrics()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from transformers import AutoTokenizer, TrainingArguments

    recipe = harness_config.load_recipe(args.recipe, args.overrides)
    if recipe.task != "causal_lm" or recipe.method == "prompt_tuning":
        raise SystemExit("error: the HF Trainer baseline trains causal-LM LoRA/QLoRA/full runs; this recipe sets "
                         f"task={recipe.task} method={recipe.method}")
    t = recipe.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    on_cuda = torch.cuda.is_available()
    # Plain padded samples, as HF's own collators produce, whatever layout the harness run used; then
    # the same decisions as a harness run of that recipe (precision, attention, micro-batch,
    # checkpointing): its RunPlan, so the two sides train the same layout unless an override says not.
    recipe.data.packing = recipe.data.padding_free = recipe.data.group_by_length = False
    try:
        harness_config.validate(recipe, world_size)
        plan = resolve_plan(recipe, world_size, Machine.detect(world_size), harness_config.read_model_config(recipe.model.path))
    except harness_config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    precision, micro_batch, grad_accum = plan.precision, plan.micro_batch_size, plan.grad_accum
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # TrainingArguments first: with a ZeRO-3 config it registers the HfDeepSpeedConfig that makes
    # from_pretrained partition weights while loading; `training_args` must stay alive for that.
    checkpointing = plan.gradient_checkpointing != "none"
    training_args = TrainingArguments(
        output_dir=str(out_dir),
        deepspeed=args.ds_config or recipe.deepspeed.config,
        use_cpu=not on_cuda,  # HF Trainer + DeepSpeed on a CPU-only machine needs this
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=SCHEDULERS[t.lr_schedule],
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.lr_schedule == "cosine" else {},
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        adam_epsilon=1e-8,  # torch.optim.AdamW's default, which the harness uses
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch_fused" if on_cuda else "adamw_torch",  # harness: AdamW(fused=cuda available)
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={
            "use_reentrant": False,
            "every_n_layers": 1 if plan.gradient_checkpointing == "full" else plan.checkpoint_every_k,
        } if checkpointing else None,
        train_sampling_strategy="sequential",  # the order is laid out by OrderedSamples
        remove_unused_columns=False,  # keep sample_index (popped before the forward)
        average_tokens_across_devices=True,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=t.seed,
    )

    # ZeRO-3's zero.Init inside from_pretrained reads the world size from deepspeed.comm, and falls back
    # to 1 (then fails its batch-size check) if that is not initialised yet. TrainingArguments sets up
    # the process group lazily, and with use_cpu=True through plain torch.distributed, which
    # deepspeed.comm does not see; so set it up now (HF's way) and register it with DeepSpeed. (4-bit
    # models skip zero.Init, which is why qlora works without this.) The harness, too, initialises
    # distributed through DeepSpeed before loading.
    import deepspeed

    _ = training_args.device
    if not torch.cuda.is_available():
        harness_distributed.skip_cpu_shm_allreduce()  # same CPU collectives as the harness run
    deepspeed.init_distributed()

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, _val, _stats = harness_data.build_datasets(recipe.data, tokenizer, t.seed)
    samplers = [harness_data.StepSampler(len(train_set), t.global_batch_size, micro_batch, world_size, r, t.seed)
                for r in range(world_size)]
    dataset = OrderedSamples(train_set, samplers, t.max_steps)

    if args.liger:
        apply_liger(recipe.model.path)
    model = load_model(recipe, precision, plan.attn)

    trainer_ref: list = []
    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=Collator(pad_id),
        callbacks=[make_callback(trainer_ref, dataset, rank, out_dir / "metrics.jsonl")],
    )
    trainer_ref.append(trainer)
    if rank == 0:
        print(f"hf baseline: method={recipe.method} precision={precision} world_size={world_size} "
              f"micro_batch={micro_batch} grad_accum={grad_accum} steps={t.max_steps} attn={plan.attn} "
              f"gradient_checkpointing={plan.gradient_checkpointing}", flush=True)
    trainer.train()
    harness_distributed.shutdown()
    return 0


if __name__ == "__main__":
    # The same hard exit as harness/train.py: after a successful run, interpreter finalisation with
    # DeepSpeed's process groups still alive can abort ("terminate called without an active
    # exception"), which a benchmark would report as a failed baseline. metrics.jsonl is line-buffered.
    harness_distributed.exit_process(main())
