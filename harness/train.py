"""Fine-tune a causal LM with DeepSpeed (ZeRO-0/2/3): full, LoRA, QLoRA or int8 + LoRA.

    # one node, 8 GPUs
    deepspeed --num_gpus 8 harness/train.py --config harness/recipes/llama3_8b_qlora.yaml
    # the same under torchrun, or as one plain process
    torchrun --nproc_per_node 8 harness/train.py --config harness/recipes/llama3_8b_qlora.yaml
    python harness/train.py --config harness/recipes/tiny_qlora.yaml train.max_steps=10
    # print the resolved recipe and DeepSpeed config, load nothing
    python harness/train.py --config harness/recipes/tiny_qlora.yaml --dry-run

Overrides are `dotted.key=value` (YAML-typed) and win over the recipe file, which wins over defaults.
Exit codes: 0 done, 2 bad recipe / input (one line on stderr naming the problem and the fix), 75
stopped by SIGTERM / SIGUSR1 or the time limit (a checkpoint holds everything trained; requeue it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: deepspeed / torchrun harness/train.py
    try:
        from harness._entry import run_as_module
    except ModuleNotFoundError:
        print("error: the harness package is not installed in this Python: run `pip install -e .` in the repository"
              " (`make venv` does it)", file=sys.stderr)
        sys.exit(2)
    import signal

    # as `python -P -m harness.train`, so that harness/ never shadows installed modules; a preemption signal
    # that comes meanwhile is held until install_early_stop_handler() below
    run_as_module("harness.train", hold_signals=(signal.SIGTERM, signal.SIGUSR1))


def _preempted_before_start(signum, _frame):
    # Until setup() installs preemption.StopFlag (seconds of imports), a preemption signal exits 75 at
    # once: nothing exists to save, and the requeue needs that code (USR1's default action is to die).
    code_file = os.environ.get("HARNESS_EXIT_CODE_FILE")
    if code_file and os.environ.get("RANK", "0") == "0":
        Path(code_file).write_text("75\n")
    os._exit(75)


def install_early_stop_handler() -> None:
    import signal

    stop_signals = (signal.SIGTERM, signal.SIGUSR1)
    for sig in stop_signals:
        signal.signal(sig, _preempted_before_start)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)  # held across the exec from the file (harness/_entry.py)


if __name__ == "__main__":  # before the seconds of torch / deepspeed imports
    install_early_stop_handler()

import torch
import torch.nn.functional as F

from harness import checkpoint, classification, config, data, distributed, export, generation, kernels, metrics, preemption
from harness import model as model_lib
from harness.memory import live as live_memory
from harness.config import ConfigError
from harness.build import Run, setup
from harness.plan import Machine, RunPlan, resolve_plan

EXIT_CONFIG_ERROR = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML (harness/recipes/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the run plan (why each auto became what it is), the recipe and the "
                   "resolved DeepSpeed config, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_intermixed_args(argv)


def prepare(argv: list[str], machine: Machine | None = None) -> tuple[argparse.Namespace, config.Recipe, RunPlan, dict]:
    """Everything that can fail on user input, done before any process group or model exists: the
    recipe, and the run plan (harness/plan.py) that every later decision reads."""
    args = parse_args(argv)
    recipe = config.load_recipe(args.config, args.overrides)
    world_size = config.env_world_size()
    config.validate(recipe, world_size)
    model_cfg = config.read_model_config(recipe.model.path)
    plan = resolve_plan(recipe, world_size, machine or Machine.detect(world_size), model_cfg)
    if plan.device == "cuda" and recipe.train.memory_check:
        check_memory_budget(recipe, plan, model_cfg)
    return args, recipe, plan, model_cfg


def check_memory_budget(recipe: config.Recipe, plan: RunPlan, model_cfg: dict) -> None:
    """Refuse a run the pre-flight budget says will not fit, before any rank loads a model."""
    from harness import memory
    from harness.memory import report

    budget = memory.budget_for_plan(recipe, plan, model_cfg=model_cfg)
    device_memory_bytes = plan.device_memory_bytes
    if budget.verdict == "may not fit":  # the point estimate fits; the uncalibrated band's upper end does not: warn, go on
        print(f"warning: memory budget: {report.verdict_line(budget)}; the run may not fit (tools/memory_budget.py shows what does)",
              file=sys.stderr, flush=True)
        return
    if budget.fits is False:
        fix = {"generate": "Lower eval.generate_batch_size or set eval.generate_gather=false (generation is the peak)",
               "eval": "Lower eval.batch_size (the validation forward is the peak)"}.get(
            budget.peak_phase, "Lower train.micro_batch_size or data.seq_len, use train.gradient_checkpointing=full, more GPUs or an offload config")
        raise ConfigError(f"the memory budget says this run does not fit in {device_memory_bytes / 2**30:.1f} GiB per GPU:\n"
                          f"{report.text_table(budget)}\n"
                          f"{fix} (tools/memory_budget.py searches for what fits); train.memory_check=false tries anyway.")


def token_loss_sum(engine, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's target tokens (fp32)."""
    if kernels.fused_loss_enabled(engine.module):  # computed chunk by chunk inside the model: no (B, T, V) logits
        return engine(**data.model_inputs(batch), token_targets=batch["targets"]).loss
    logits = engine(**data.model_inputs(batch)).logits  # (B, T, V); packed batches pass position_ids instead of a mask
    # A soft prompt (method=prompt_tuning) puts P virtual positions first: (B, P + T, V), of which the last T
    # line up with the targets. (P is 0 otherwise.)
    logits = logits[:, model_lib.virtual_tokens(engine):]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=data.IGNORE_INDEX, reduction="sum")


def class_loss_sum(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """task=classification: (sum of cross-entropies over the batch's labelled samples (fp32), logits
    (B, C), labels (B,), -100 for a sample without one). transformers pools each row's last token that
    is not the pad id, which is where the data put the label (data.tokenize_labelled)."""
    labels = batch["targets"].amax(dim=1)  # (B,): the one class index of each row (targets are -100 elsewhere)
    virtual = model_lib.virtual_tokens(engine)
    if not virtual:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, C)
        return F.cross_entropy(logits, labels, ignore_index=data.IGNORE_INDEX, reduction="sum"), logits, labels
    # A soft prompt: peft hands the model embeddings only (P virtual + T token positions), and without token
    # ids transformers pools the last position, a pad in every shorter right-padded row. The head's scores at
    # every position, (B, P + T, C), are read here instead, each row's at P + (its length - 1).
    scores: list[torch.Tensor] = []
    hook = model_lib.head_module(engine).register_forward_hook(lambda _m, _i, out: scores.append(out))
    try:
        engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    last = virtual + batch["attention_mask"].sum(dim=1) - 1  # (B,)
    logits = scores[-1][torch.arange(len(last), device=last.device), last].float()  # (B, C)
    return F.cross_entropy(logits, labels, ignore_index=data.IGNORE_INDEX, reduction="sum"), logits, labels


def batch_loss_sum(engine, batch: dict, task: str) -> torch.Tensor:
    """The sum the step normalises by the window's target count: tokens (causal_lm) or samples (classification)."""
    return class_loss_sum(engine, batch)[0] if task == "classification" else token_loss_sum(engine, batch)


def train_step(engine, window: list[dict], dist: distributed.DistInfo,
               phases: live_memory.PhasePeaks | None = None, task: str = "causal_lm") -> tuple[float, float | None, float, float]:
    """One optimizer step over `window` (this rank's grad-accumulation micro-batches). `phases`, when
    given, records the peak memory of the forward, backward and optimizer-step phases.

    The loss is normalised by the number of target tokens in the whole window on all ranks, so every
    token weighs the same whatever micro-batch or rank it landed on (a mean of per-micro-batch means
    would over-weight short batches). DeepSpeed averages gradients over ranks, so each micro-batch's
    token sum is scaled by world_size / global_tokens; `scale_wrt_gas=False` stops DeepSpeed from also
    dividing by the number of micro-batches.
    """
    local_targets = sum(int((b["targets"] != data.IGNORE_INDEX).sum()) for b in window)
    local_inputs = sum(int(b["attention_mask"].sum()) for b in window)
    (global_targets,) = distributed.all_reduce_sum([local_targets], dist.device)
    scale = dist.world_size / max(global_targets, 1.0)
    loss_sum, grad_norm = 0.0, None
    measure = phases.phase if phases is not None else (lambda _name: contextlib.nullcontext())
    for i, batch in enumerate(window):
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        with measure("forward"):
            loss = batch_loss_sum(engine, batch, task)
        with measure("backward"):
            engine.backward(loss * scale, scale_wrt_gas=False)
        # Drop the graph before the step and the next micro-batch's forward: what autograd functions keep on ctx (the
        # fused loss kernel's dX, and a trained head's dW) lives as long as the loss's grad_fn.
        loss = loss.detach()
        if i == len(window) - 1 and engine.zero_optimization_stage() == 0:
            # ZeRO-0 clips without recording the norm: measure the all-reduced gradients here.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        with measure("step" if i == len(window) - 1 else "backward"):  # earlier micro-batches only advance a counter
            engine.step()  # DeepSpeed only updates on the last micro-batch of the window
        loss_sum += loss.item()
    if grad_norm is None:
        norm = engine.get_global_grad_norm()  # ZeRO-1/2/3: the pre-clipping global norm
        grad_norm = float(norm) if norm is not None else None
    total_loss, total_inputs = distributed.all_reduce_sum([loss_sum, local_inputs], dist.device)
    return total_loss / max(global_targets, 1.0), grad_norm, float(local_inputs), total_inputs


@torch.no_grad()
def evaluate(engine, val: list, recipe: config.Recipe, plan: RunPlan, dist: distributed.DistInfo, pad_id: int, stop=None) -> dict | None:
    """{"val_loss"} over the whole set, token-weighted (sample-weighted for classification, which adds
    "val_accuracy", "val_f1" (macro) and "confusion"), identical on every rank. With `stop` (a
    StopFlag), None when a rank was signalled: every rank checks it before each batch (a long eval would
    otherwise hold a preemption back until it ends)."""
    engine.eval()
    total = tokens = 0.0
    classify = recipe.task == "classification"
    n_cls = len(recipe.data.labels)
    confusion = torch.zeros(n_cls * n_cls, dtype=torch.int64)  # flat (true, predicted) counts of this rank
    flat, per_forward = plan.flat_batches, plan.eval_batch_size
    for idx, weights in data.eval_batches(len(val), per_forward, dist.world_size, dist.rank, recipe.eval.max_samples):
        if stop is not None and stop.should_stop(dist.device):  # sync point: all ranks leave the eval together
            engine.empty_partition_cache()
            engine.train()
            return None
        # weight 0 = a repeat that keeps ranks in step: no loss on it
        batch = data.collate([val[i] if w else data.without_targets(val[i]) for i, w in zip(idx, weights)], pad_id, flatten=flat)
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        if classify:
            loss, logits, labels = class_loss_sum(engine, batch)
            real = labels != data.IGNORE_INDEX
            confusion += torch.bincount(labels[real].cpu() * n_cls + logits.argmax(-1)[real].cpu(), minlength=n_cls * n_cls)
        else:
            loss = token_loss_sum(engine, batch)
        total += loss.item()
        tokens += int((batch["targets"] != data.IGNORE_INDEX).sum())
    # ZeRO-3 prefetches parameters along the trace it recorded in training; an eval pass can leave some
    # gathered or in flight. Release them all so training (and a save) starts from a clean state.
    engine.empty_partition_cache()
    model_lib.assert_standard_4bit_layout(engine.module)  # an eval pass must leave every weight as it was
    engine.train()
    summed = distributed.all_reduce_sum([total, tokens, *confusion.tolist()], dist.device)  # sync point
    out = {"val_loss": summed[0] / max(summed[1], 1.0)}
    if classify:
        matrix = [[int(summed[2 + i * n_cls + j]) for j in range(n_cls)] for i in range(n_cls)]
        sc = classification.scores(matrix)
        out.update(val_accuracy=sc["accuracy"], val_f1=sc["f1"], confusion=matrix)
    return out


def log_eval(run: "Run", step: int, val: dict) -> None:
    """The eval record (metrics.jsonl) and its line."""
    run.log.log({"step": step, **val, "val_ppl": math.exp(min(val["val_loss"], 50.0))})  # (confusion: rows true, columns predicted)
    extra = f", accuracy {100 * val['val_accuracy']:.1f}%, macro-F1 {val['val_f1']:.3f}" if "val_accuracy" in val else ""
    run.log.message(f"step {step}: val_loss {val['val_loss']:.4f}{extra}")


def answer_eval(run: "Run", step: int) -> float:
    """Greedy answers to the first eval.generate_samples validation prompts, on all ranks (ZeRO-3
    gathers collectively). Logs the exact-match rate and three answers (right and wrong); rank 0 writes them all to
    output_dir/answers/step_N.jsonl. Returns the rate (the same on every rank)."""
    recipe, dist, engine = run.recipe, run.dist, run.engine
    zero3 = engine.zero_optimization_stage() == 3
    gather = zero3 and recipe.eval.generate_gather and generation.can_gather(engine)
    if zero3 and recipe.eval.generate_gather and not gather and step == 0:
        run.log.message("eval.generate_gather: this DeepSpeed lacks the ZeRO-3 hook API it uses; generating layer by layer")
    engine.eval()
    with (generation.whole_model_gathered(engine) if gather else
          generation.zero3_step_per_forward(engine) if zero3 else contextlib.nullcontext()):
        mine = generation.greedy_answers(engine.module, run.tokenizer, run.val_set, count=recipe.eval.generate_samples,
                                         batch_size=recipe.eval.generate_batch_size, max_new_tokens=recipe.eval.max_new_tokens,
                                         world_size=dist.world_size, rank=dist.rank, synced=zero3 and not gather and dist.world_size > 1,
                                         device=dist.device)
    engine.empty_partition_cache()  # as after evaluate(): nothing left gathered for training or a save
    model_lib.assert_standard_4bit_layout(engine.module)
    engine.train()
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, [vars(a) for a in mine])  # sync point: every rank's answers
    answers = sorted((generation.Answer(**a) for part in gathered for a in part), key=lambda a: a.index)
    rate = sum(a.correct for a in answers) / max(len(answers), 1)
    log = run.log
    log.log({"step": step, "val_exact_match": rate, "val_answers": len(answers)})
    log.message(f"step {step}: exact match {sum(a.correct for a in answers)}/{len(answers)} ({100 * rate:.1f}%) by greedy answers")
    for a in generation.samples_to_show(answers):
        prompt = " ".join(a.prompt.split())
        log.message(f"  {'right' if a.correct else 'wrong'}: {prompt[-90:]!r} -> {a.answer[:60]!r} (expected {a.expected[:40]!r})")
    if dist.is_main:
        path = Path(recipe.output_dir) / "answers" / f"step_{step:08d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(path, "".join(json.dumps({**vars(a), "correct": a.correct}) + "\n" for a in answers))
    return rate


def fit(run: Run) -> tuple[int, bool]:
    """The training loop. Returns (last optimizer step taken, stopped by a signal or the time limit)."""
    recipe, t, dist, engine, log, state = run.recipe, run.recipe.train, run.dist, run.engine, run.log, run.state
    ckpt = recipe.checkpoint
    do_eval = bool(run.val_set) and recipe.eval.every_steps > 0
    start, last_save = time.perf_counter() - state.elapsed_s, time.perf_counter()
    if do_eval and state.step == 0:  # the untrained model's loss, the baseline learning is measured against
        val = evaluate(engine, run.val_set, recipe, run.plan, dist, run.pad_id)
        log_eval(run, 0, val)
        if "val_accuracy" in val:
            state.scores_step0 = {"accuracy": val["val_accuracy"], "f1": val["val_f1"]}
        if recipe.eval.generate_samples:
            state.exact_match_step0 = answer_eval(run, 0)
    step = state.step
    first_step = step + 1  # the first step this process runs (a resumed run starts past 1)
    log.advance(step)
    flat = run.plan.flat_batches  # one row per micro-batch (padding-free, or packing under flash-attn)
    for step in range(state.step + 1, t.max_steps + 1):
        window = [data.collate([run.train_set[i] for i in idx], run.pad_id, flatten=flat) for idx in run.sampler.window(step - 1)]
        lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (DeepSpeed advances it in step())
        every = recipe.log.memory_every_steps
        measured = every and (step == 1 or step % every == 0)
        phases = live_memory.PhasePeaks(dist.device) if measured else None
        t0 = time.perf_counter()
        run.stop.clean = False  # from here until the next checkpoint a signal only sets the flag
        loss, grad_norm, local_tokens, global_tokens = train_step(engine, window, dist, phases, recipe.task)
        step_s = time.perf_counter() - t0
        state.tokens_seen += global_tokens
        if measured:  # after a full step: weights, grads and Adam state all exist
            run.memory = {**live_memory.footprint(engine), **phases.as_footprint()}
            log.log({"step": step, "memory": live_memory.record(run.memory)})
        if step == first_step:
            dump_memory_snapshot(recipe.output_dir, f"after step {step}", log.message)
        if step % recipe.log.every_steps == 0 or step == t.max_steps:
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": global_tokens / step_s,
                "tokens_per_s_per_rank": local_tokens / step_s,
                "tokens_seen": state.tokens_seen,
                "elapsed_s": time.perf_counter() - start,
                "step_s": step_s,
                **metrics.peak_memory_gib(dist.device),
            }
            if run.peak_flops:
                record["mfu"] = run.flops_per_token * global_tokens / step_s / (run.peak_flops * dist.world_size)
            log.log(record)
        log.advance()
        val = None
        if do_eval and (step % recipe.eval.every_steps == 0 or step == t.max_steps):
            val = evaluate(engine, run.val_set, recipe, run.plan, dist, run.pad_id, stop=run.stop)  # None: a signal cut it short
        if val is not None:
            log_eval(run, step, val)
            run.last_eval = (step, val)
            if recipe.eval.generate_samples and not run.stop.should_stop(dist.device):  # (collective: all ranks agree)
                state.exact_match = answer_eval(run, step)
            # Early stopping on eval.metric, all-reduced, so every rank takes the same decision; best_val
            # holds the loss, or minus the accuracy / F1 (lower is better either way).
            metric = recipe.eval.metric
            if state.best_metric != metric:  # resumed with another eval.metric: its scores do not compare
                state.best_val, state.evals_without_gain, state.best_metric = math.inf, 0, metric
            objective = val["val_loss"] if metric == "loss" else -val[f"val_{metric}"]
            if objective < state.best_val - recipe.eval.early_stopping_min_delta:
                state.best_val, state.evals_without_gain = objective, 0
            else:
                state.evals_without_gain += 1
            if recipe.eval.early_stopping_patience and state.evals_without_gain >= recipe.eval.early_stopping_patience:
                log.message(f"early stopping at step {step}: no val_{metric} gain in {state.evals_without_gain} evals")
                break
        # Checkpoint when due, or when any rank was signalled / is out of time (all ranks agree first).
        stopping = run.stop.should_stop(dist.device)
        due = ((ckpt.every_steps and step % ckpt.every_steps == 0)
               or (ckpt.every_minutes and time.perf_counter() - last_save >= 60 * ckpt.every_minutes))
        if (due or stopping) and step < t.max_steps:
            state.step, state.elapsed_s = step, time.perf_counter() - start
            path = checkpoint.save_checkpoint(engine, recipe.output_dir, step, state.to_dict(), dist, exclude_frozen=recipe.method != "full",
                                              keep_last=ckpt.keep_last, recipe=run.fingerprint)
            last_save = time.perf_counter()
            run.stop.clean = True  # everything is on disk: a signal from here on exits at once
            log.message(f"checkpoint {path} ({'stop: ' + run.stop.reason if stopping else 'periodic'})")
        if stopping and step < t.max_steps:
            return step, True
    if recipe.eval.generate_samples and state.exact_match_step0 is not None and state.exact_match is not None:
        log.message(f"exact match on {min(len(run.val_set), recipe.eval.generate_samples)} held-out prompts: "
                    f"{100 * state.exact_match_step0:.1f}% before training -> {100 * state.exact_match:.1f}% after step {step}")
    return step, False


def report_error(e: Exception) -> int:
    """One line on stderr. Every rank finds the same error; rank 0 says it at once, the others wait so
    the launcher (which kills all ranks when one exits) does not kill rank 0 before it has spoken."""
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        import signal

        # The launcher answers rank 0's exit with a SIGTERM to this rank. Before setup() it ends this rank
        # quietly (rank 0 has said it all); after, StopFlag's handler would turn the wait into a
        # preemption traceback: this rank then ignores it and says its line too.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            if isinstance(getattr(signal.getsignal(sig), "__self__", None), preemption.StopFlag):
                signal.signal(sig, signal.SIG_IGN)
        time.sleep(10)
    print(f"error: {e}" if rank == 0 else f"error: (rank {rank}) {e}", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, recipe, plan, model_cfg = prepare(argv)
    except ConfigError as e:
        return report_error(e)
    if args.dry_run:
        print("# run plan (harness/plan.py)\n" + "\n".join(plan.lines()) + "\n")
        print("# resolved recipe\n" + config.dump_yaml(recipe))
        print("# resolved DeepSpeed config\n" + json.dumps(plan.ds, indent=2))
        return 0
    try:
        run = setup(recipe, plan, model_cfg)
    except (ConfigError, checkpoint.CheckpointError) as e:  # data errors come before the model; a bad checkpoint after it
        return report_error(e)
    except preemption.Preempted as e:  # a signal while loading: nothing trained yet, so nothing to save
        print(f"stopped during setup ({e}); nothing to save: exit {preemption.EXIT_PREEMPTED} to be requeued", flush=True)
        return preemption.EXIT_PREEMPTED
    except torch.cuda.OutOfMemoryError:  # loading or deepspeed.initialize: what was live, and who allocated it
        dump_memory_snapshot(recipe.output_dir, "out of memory while loading", lambda m: print(m, file=sys.stderr, flush=True))
        raise
    try:
        last_step, stopped = fit(run)
        run.stop.clean = False  # from here a signal (the launcher's, when another rank exits first) only sets the flag
    except preemption.Preempted as e:  # a signal while everything was saved (the step-0 eval, just after a checkpoint)
        run.log.message(f"stopped at step {run.state.step} ({e}) with nothing unsaved; exit {preemption.EXIT_PREEMPTED} to be requeued")
        run.log.close()
        return preemption.EXIT_PREEMPTED
    except torch.cuda.OutOfMemoryError:
        dump_memory_snapshot(recipe.output_dir, "out of memory", run.log.message)
        raise
    if stopped:  # checkpoint written; the exit code tells the scheduler to requeue (resume: auto continues)
        run.log.message(f"stopped at step {last_step} ({run.stop.reason}); exit {preemption.EXIT_PREEMPTED} to be requeued")
        run.log.close()
        distributed.shutdown()
        return preemption.EXIT_PREEMPTED
    run.engine.empty_partition_cache()  # no parameter left gathered or in flight before gathering for the save
    out = export.save_final(
        run.engine.module, run.tokenizer, recipe.output_dir, is_lora=recipe.method != "full", is_main=run.dist.is_main, steps_trained=last_step
    )
    run.log.message(f"saved {out}")
    if run.dist.is_main and run.memory is not None:
        write_memory_report(run, last_step)
    if run.dist.is_main and recipe.task == "classification" and run.last_eval is not None:
        write_classification_report(run)
    run.log.close()
    distributed.shutdown()
    return 0


def dump_memory_snapshot(output_dir: str, when: str, say) -> None:
    """With log.memory_snapshot on CUDA: this rank's allocator history, for https://pytorch.org/memory_viz."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    path = live_memory.dump_snapshot(Path(output_dir) / f"memory_snapshot_rank{rank}.pickle")
    if path is not None:
        say(f"memory snapshot ({when}): {path} (open it at https://pytorch.org/memory_viz)")


def write_memory_report(run: Run, step: int) -> None:
    """output_dir/memory_report.md: the pre-flight budget beside the last measured footprint."""
    from harness import memory

    try:
        budget = memory.budget_for_plan(run.recipe, run.plan, row_tokens=run.data.longest_row_tokens)
    except (ValueError, KeyError) as e:  # an architecture the budget does not model: report the measurement alone
        run.log.message(f"memory report without a budget: {e}")
        budget = None
    path = Path(run.recipe.output_dir) / "memory_report.md"
    path.write_text(live_memory.report_markdown(run.memory, budget, step))
    run.log.message(f"memory report: {path}")


def write_classification_report(run: Run) -> None:
    """output_dir/classification_report.md: the last eval's confusion matrix and per-class scores,
    beside the scores before training."""
    step, val = run.last_eval
    labels = list(run.recipe.data.labels)
    text = classification.report_markdown(val["confusion"], labels, step, run.state.scores_step0)
    path = Path(run.recipe.output_dir) / "classification_report.md"
    path.write_text(text)
    for line in text.splitlines()[2:3]:
        run.log.message(f"held-out {line}")
    run.log.message(f"classification report (confusion matrix, per-class scores): {path}")


def write_exit_code(code: int) -> None:
    """Rank 0 records its exit code in $HARNESS_EXIT_CODE_FILE when set. torchrun turns any worker's
    non-zero exit into its own exit code 1, so a batch script under torchrun could not otherwise tell a
    preemption (75: requeue) from a crash (slurm/launch.sh reads this file)."""
    path = os.environ.get("HARNESS_EXIT_CODE_FILE")
    if path and os.environ.get("RANK", "0") == "0":
        checkpoint.atomic_write_text(Path(path), f"{code}\n")


def cli() -> None:
    """`harness-train`, `python -m harness.train`, and harness/train.py under any launcher."""
    install_early_stop_handler()
    exit_code = main()
    write_exit_code(exit_code)
    distributed.exit_process(exit_code)  # every file is closed; skip the teardown (see exit_process)


if __name__ == "__main__":
    cli()
