"""Drive the harness's own setup, evaluate and train_step, and record what the reference tests check.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/real_model/reference_probe.py OUT_DIR STEPS --config R [k=v ...]
    python tests/real_model/reference_probe.py OUT_DIR STEPS --config R [k=v ...]          # one process

A fresh run (no checkpoint in output_dir) records, in OUT_DIR (rank 0 writes):
- init.safetensors: the trainable tensors before any step (LoRA methods only; gathered from ZeRO-3);
- the validation loss at step 0 in the recipe's layout and in the packed layout (padding_free: each
  eval micro-batch as one row with position ids);
- with eval.generate_samples > 0, then the greedy answers (train.answer_eval) in the run's answers/;
- grads_step1.safetensors: every trainable tensor's gradient in step 1 (gathered, before the
  optimizer uses it) and params_step1.safetensors, the trainable tensors after it;
- with STEPS=2, then the validation losses after step 1 and a checkpoint of step 1 (its step 2 is
  the resumed run's).
A resumed run (the step-1 checkpoint in output_dir) records the validation losses on resuming and
grads_step2.safetensors again. Everything is in OUT_DIR/record_<fresh|resumed>.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from harness import checkpoint, distributed, train


def gathered(engine, what: str) -> dict[str, torch.Tensor]:
    """Every trainable tensor's full value ('param') or gradient ('grad'), on every rank (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    get = safe_get_full_grad if what == "grad" else safe_get_full_fp32_param
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            t = get(p) if hasattr(p, "ds_id") or what == "grad" else p.data
            out[name] = t.detach().float().cpu().clone()
    return out


def step_with_grads(run, step: int) -> dict[str, torch.Tensor]:
    """train.train_step for optimizer step `step`, keeping the gradients DeepSpeed is about to apply."""
    from harness import data

    engine, grads = run.engine, {}
    apply = engine.step

    def step_and_keep():  # the last micro-batch's engine.step() applies the accumulated gradients
        if engine.is_gradient_accumulation_boundary():
            grads.update(gathered(engine, "grad"))
        apply()

    engine.step = step_and_keep
    flat = run.plan.flat_batches
    window = [data.collate([run.train_set[i] for i in idx], run.pad_id, flatten=flat) for idx in run.sampler.window(step - 1)]
    try:
        train.train_step(engine, window, run.dist)
    finally:
        engine.step = apply
    return grads


def val_losses(run) -> dict[str, float]:
    flat = dataclasses.replace(run.plan, flat_batches=True)  # the padding-free layout: one unpadded row per forward
    out = {"padded": train.evaluate(run.engine, run.val_set, run.recipe, run.plan, run.dist, run.pad_id)["val_loss"]}
    if run.recipe.method != "prompt_tuning":  # (a soft prompt goes once before each row: packing is refused)
        out["packed"] = train.evaluate(run.engine, run.val_set, run.recipe, flat, run.dist, run.pad_id)["val_loss"]
    return out


def main() -> int:
    t0 = time.perf_counter()
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, steps = Path(argv[0]), int(argv[1])
    _args, recipe, plan, model_cfg = train.prepare(argv[2:])
    run = train.setup(recipe, plan, model_cfg)
    main_rank = run.dist.is_main
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)

    def save(name, tensors):
        if main_rank:
            save_file(tensors, str(out / name))

    phases = {}

    def mark(name):
        phases[name] = round(time.perf_counter() - t0, 1)

    mark("setup")
    start = run.state.step
    record = {"start_step": start, "train_rows": len(run.train_set), "val_samples": len(run.val_set), "world_size": run.dist.world_size}
    if start == 0:
        if recipe.method != "full":
            save("init.safetensors", gathered(run.engine, "param"))
        record["val_step0"] = val_losses(run)
        mark("eval 0")
        if recipe.eval.generate_samples:  # greedy answers too (rank 0 writes output_dir/answers/step_00000000.jsonl)
            train.answer_eval(run, 0)
            mark("answers 0")
        save("grads_step1.safetensors", step_with_grads(run, 1))
        save("params_step1.safetensors", gathered(run.engine, "param"))
        mark("step 1")
    if start == 0 and steps == 2:
        record["val_step1"] = val_losses(run)
        mark("eval 1")
        run.state.step = 1
        checkpoint.save_checkpoint(run.engine, recipe.output_dir, 1, run.state.to_dict(), run.dist, exclude_frozen=recipe.method != "full",
                                   keep_last=2,
                                   recipe=run.fingerprint)
        mark("save")
    elif start == 1:
        record["val_step1"] = val_losses(run)
        mark("eval 1")
        save("grads_step2.safetensors", step_with_grads(run, 2))
        mark("step 2")
    record["phases_s"] = phases
    if main_rank:
        (out / f"record_{'fresh' if start == 0 else 'resumed'}.json").write_text(json.dumps(record, indent=1))
    run.log.close()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
