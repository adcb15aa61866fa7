#!/usr/bin/env python
"""Benchmark: harness/train.py against the plain Hugging Face Trainer + DeepSpeed (prints figures; not a test).

Both runs train the same tiny random model (tools/make_tiny_model.py) on the same samples, in the same
order, with the same DeepSpeed config, on 2 ranks of the deepspeed launcher (gloo on CPU, one OpenMP
thread each):

  harness  harness/train.py --config RECIPE (method, seq_len, max_steps overridden; no eval)
  hf       tools/hf_trainer_baseline.py with the recipe and ds_config.json the harness run resolved

    python tools/bench_train.py                    # qlora, hidden 128, 4 layers, 30 steps
    python tools/bench_train.py --method lora --steps 50 --json /tmp/bench.json
    python tools/bench_train.py --gpu-8b --work-dir /tmp/b8 --runs harness,hf
    python tools/bench_train.py --gpu-8b --work-dir /tmp/b8 --runs harness+k,hf+liger
                                                   # one GPU: Llama-3.1-8B shape (random weights), QLoRA r=16
                                                   # all-linear, seq 4096; split over two calls, each under
                                                   # 10 min; the second reuses the model and the first's runs

Extra runs: --kernels adds "harness+k" (the harness with kernels=all), --liger adds "hf+liger" (the
baseline patched by Liger-Kernel; GPU only). Each is compared with the plain "hf" run.

--runs NAME,... runs only those; with --work-dir, a run not named there whose complete metrics a
previous call left in the work dir is reused (and marked so), and the model is made once per shape.
--repeats N runs the harness/hf pair N times, alternating, and leaves the last pair there for such reuse.

Throughput = non-padding input tokens summed over ranks / optimizer-step wall time on rank 0, taken as
total tokens / total step time over the steps after the first --warmup-steps (not a median of per-step
rates). Step time is the forward/backward/optimizer work of one step, batch assembly and logging
excluded (harness: its step_s; hf: on_step_begin -> on_step_end). "loop tok/s" uses instead the time
between consecutive step ends, which includes batch assembly and logging.

Exit code: 0 when both runs finished, 1 when one failed (its stderr tail is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "harness/recipes/tiny_qlora.yaml"
RUN_NAMES = ("harness", "hf", "harness+k", "hf+liger")
STDERR_TAIL_LINES = 60


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the figures (default 3)")
    p.add_argument("--method", default="qlora", choices=["qlora", "lora", "full"])
    p.add_argument("--like", default="llama-3.1-8b", help="architecture for make_tiny_model.py (default llama-3.1-8b)")
    p.add_argument("--hidden", type=int, default=128, help="model width (default 128; the test model's is 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden, as the test model)")
    p.add_argument("--seq-len", type=int, default=None, help="data.seq_len (default: the recipe's)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"harness recipe (default {DEFAULT_RECIPE})")
    p.add_argument("--hf-ds-config", default=None,
                   help="DeepSpeed JSON for the HF run (default: the ds_config.json the harness run resolved; "
                        "a raw file such as ds_configs/zero3.json lets HF fill its own \"auto\" values)")
    p.add_argument("--work-dir", type=Path, default=None, help="model, run outputs and logs (default: a new /tmp dir)")
    p.add_argument("--timeout-s", type=int, default=1800, help="per run (default 1800)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (default 2; one per GPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: make_tiny_model's)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: make_tiny_model's)")
    p.add_argument("--model-vocab-size", type=int, default=None, help="embedding/head rows, e.g. 128256 (default: the tokenizer's)")
    p.add_argument("--kernels", action="store_true", help="add a harness run with kernels=all")
    p.add_argument("--liger", action="store_true", help="add an HF baseline run patched by Liger-Kernel (GPU)")
    p.add_argument("--runs", default=None, metavar="NAME,...",
                   help=f"runs to launch now, of {','.join(RUN_NAMES)} (default: harness,hf plus those --kernels / --liger add); "
                        "others are reused from --work-dir when complete there")
    p.add_argument("--gpu-8b", action="store_true",
                   help="preset for one GPU: Llama-3.1-8B shape (32 x 4096, MLP 14336, 32/8 heads, vocab 128256), qlora, "
                        "seq_len 4096, micro-batch 1, global batch 4, full checkpointing, --kernels --liger, 10 steps "
                        "(2 warm-up)")
    p.add_argument("--harness-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for the harness run only, e.g. data.packing=true (repeatable); "
                        "the HF baseline always uses plain padded batches, as HF's collators do")
    p.add_argument("--hf-set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for the HF baseline only, e.g. train.gradient_checkpointing=full (repeatable); "
                        "a different micro-batch needs --hf-ds-config ds_configs/zero3.json")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the harness/hf pair this many times, alternating, and report the median ratio (harness, hf only)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.repeats > 1 and (args.kernels or args.liger or args.runs is not None):
        p.error("--repeats compares harness with hf only: drop --kernels, --liger and --runs")
    if args.gpu_8b:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads = 4096, 32, 14336, 32, 8
        args.model_vocab_size, args.seq_len, args.method, args.nproc = 128256, 4096, "qlora", 1
        args.kernels = args.liger = True
        # ~2.5 min a run on one H100 (load included): two runs fit one 10-minute device call.
        args.steps = 10 if args.steps == 30 else args.steps
        args.warmup_steps = 2 if args.warmup_steps == 3 else args.warmup_steps
        args.harness_set = ["train.micro_batch_size=1", "train.global_batch_size=4", "train.gradient_checkpointing=full",
                            "lora.r=16", "lora.target_modules=all-linear", *args.harness_set]
    if args.steps <= args.warmup_steps:
        p.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    default_runs = ["harness", "hf"] + ["harness+k"] * args.kernels + ["hf+liger"] * args.liger
    args.runs = default_runs if args.runs is None else [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in args.runs if r not in RUN_NAMES]
    if bad:
        p.error(f"--runs: unknown {bad}; choose from {','.join(RUN_NAMES)}")
    return args


def progress(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # 2 ranks on a 2-core CPU: one thread each, no oversubscription
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
    )
    return env


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a line still being written (polled mid-run) is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (launcher + ranks), SIGKILL it if still there after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(name: str, script: str, script_args: list[str], log_dir: Path, metrics_path: Path,
           steps: int, timeout_s: int, nproc: int = 2) -> dict:
    """Run `script` on `nproc` ranks under the deepspeed launcher; print progress from its metrics file.
    Returns {"rc", "wall_s", "stdout", "stderr", "load_before"}."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(free_port()),
           script, *script_args]
    stdout_path, stderr_path = log_dir / f"{name}.stdout.log", log_dir / f"{name}.stderr.log"
    load_before = os.getloadavg()[0]
    progress(f"{name}: starting (1-min load average {load_before:.2f}; logs {stdout_path.parent}/{name}.*.log)")
    start = time.perf_counter()
    last_report_s, last_step = start, 0
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        # Own session: on timeout or Ctrl-C the launcher *and* its rank processes are ended together.
        proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(), stdout=out, stderr=err, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(2.0)
                now = time.perf_counter()
                if now - start > timeout_s:
                    end_process_group(proc)
                    progress(f"{name}: killed after {timeout_s} s")
                    break
                step = len(read_jsonl(metrics_path))
                # A line every 10 steps, or every 20 s while loading (no step yet) or slow.
                if step >= last_step + 10 or (step > last_step and step == steps) or now - last_report_s > 20:
                    state = f"step {step}/{steps}" if step else "loading"
                    progress(f"{name}: {state} ({now - start:.0f} s)")
                    last_report_s, last_step = now, step
        except KeyboardInterrupt:
            end_process_group(proc)
            raise
    wall_s = time.perf_counter() - start
    progress(f"{name}: exit {proc.returncode} after {wall_s:.1f} s")
    return {"rc": proc.returncode, "wall_s": wall_s, "stdout": str(stdout_path), "stderr": str(stderr_path),
            "load_before": load_before}


# --------------------------------------------------------------------------------------------------
# Per-step figures in one shape for both runs: step, loss, step_s, interval_s, tokens (summed over ranks)
# --------------------------------------------------------------------------------------------------


def harness_steps(records: list[dict]) -> list[dict]:
    """From harness metrics.jsonl (log.every_steps=1): tokens per step is the difference of tokens_seen
    (exact integers, unlike tokens_per_s * step_s); interval is the difference of elapsed_s."""
    rows, prev_tokens, prev_elapsed = [], 0.0, 0.0
    for r in records:
        if "loss" not in r:  # validation records
            continue
        rows.append({"step": r["step"], "loss": r["loss"], "lr": r.get("lr"), "step_s": r["step_s"],
                     "interval_s": r["elapsed_s"] - prev_elapsed, "tokens": r["tokens_seen"] - prev_tokens,
                     "peak_allocated_gib": r.get("peak_allocated_gib")})
        prev_tokens, prev_elapsed = r["tokens_seen"], r["elapsed_s"]
    return rows


def baseline_steps(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("step", "loss", "lr", "step_s", "interval_s", "tokens", "peak_allocated_gib")} for r in records]


def summarize(rows: list[dict], warmup_steps: int, wall_s: float) -> dict:
    measured = [r for r in rows if r["step"] > warmup_steps]
    tokens = sum(r["tokens"] for r in measured)
    return {
        "steps": len(rows),
        "steps_measured": len(measured),
        "median_step_s": statistics.median(r["step_s"] for r in measured),
        "tokens_per_s": tokens / sum(r["step_s"] for r in measured),
        "loop_tokens_per_s": tokens / sum(r["interval_s"] for r in measured),
        "mean_tokens_per_step": tokens / len(measured),
        "final_loss": rows[-1]["loss"],
        "wall_s": wall_s,
        "peak_allocated_gib": max((r["peak_allocated_gib"] for r in rows if r.get("peak_allocated_gib") is not None), default=None),
    }


def print_table(method: str, warmup_steps: int, summaries: dict) -> None:
    header = (f"{'framework':<9} {'method':<6} {'steps':>5} {'median step s':>13} {'tokens/s':>9} "
              f"{'loop tok/s':>10} {'tokens/step':>11} {'final loss':>10} {'wall s':>7} {'peak GiB':>8}")
    print()
    print(header)
    print("-" * len(header))
    for name, s in summaries.items():
        print(f"{name:<9} {method:<6} {s['steps']:>5} {s['median_step_s']:>13.3f} {s['tokens_per_s']:>9.0f} "
              f"{s['loop_tokens_per_s']:>10.0f} {s['mean_tokens_per_step']:>11.1f} {s['final_loss']:>10.4f} "
              f"{s['wall_s']:>7.1f} {s['peak_allocated_gib'] if s['peak_allocated_gib'] is None else round(s['peak_allocated_gib'], 2)!s:>8}")
    print(f"(figures over steps {warmup_steps + 1}..{next(iter(summaries.values()))['steps']}; tokens/s = total "
          f"non-pad input tokens over both ranks / total step time; wall s = whole launcher run incl. start-up)")


def make_model(args, model_dir: Path, shape: list[str]) -> bool:
    """The random model, made once per shape in a work dir (an 8B one takes minutes and 16 GB)."""
    stamp = model_dir / "bench_shape.json"
    wanted = {"like": args.like, "shape": shape}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        progress(f"reusing the model in {model_dir} (same shape)")
        return True
    progress(f"making a random model like {args.like}: {' '.join(shape)}")
    stamp.unlink(missing_ok=True)  # a remake that fails half-way must not pass for the old model
    made = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--like", args.like, "--out", str(model_dir), *shape],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True)
    if made.returncode != 0:
        print(f"make_tiny_model.py failed (exit {made.returncode}):\n{made.stderr[-4000:]}", file=sys.stderr)
        return False
    stamp.write_text(json.dumps(wanted))
    progress(made.stdout.strip().splitlines()[-1])
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_train-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    out_dirs = {"harness": work / "harness", "hf": work / "hf", "harness+k": work / "harness_kernels", "hf+liger": work / "hf_liger"}
    harness_out = out_dirs["harness"]
    intermediate = args.intermediate or 2 * args.hidden

    progress(f"work dir {work}")
    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(intermediate)]
    for flag, value in (("--heads", args.heads), ("--kv-heads", args.kv_heads), ("--model-vocab-size", args.model_vocab_size)):
        if value is not None:
            shape += [flag, str(value)]
    if args.gpu_8b:
        shape += ["--dtype", "bfloat16", "--max-shard-size", "5GB"]
    # What makes two calls' runs comparable: a run left by a call with another setting is never reused.
    setting = {"like": args.like, "shape": shape, "method": args.method, "steps": args.steps, "seq_len": args.seq_len,
               "recipe": args.recipe, "harness_set": args.harness_set, "hf_set": args.hf_set, "hf_ds_config": args.hf_ds_config,
               "nproc": args.nproc}
    runs: dict = {}
    for name in RUN_NAMES:
        if name in args.runs:
            continue
        info_path = work / f"{name}.run.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
        if info and info["rc"] == 0 and info["setting"] == setting:
            runs[name] = {**info, "reused": True}
            progress(f"{name}: reusing the complete run in {out_dirs[name]}")
    missing = [name for name in ("harness", "hf") if name not in args.runs and name not in runs]
    if missing:
        print(f"--runs: {', '.join(missing)} must run in this call or be left complete in --work-dir by an earlier call "
              "with the same settings (every figure is relative to them)", file=sys.stderr)
        return 2
    if not make_model(args, model_dir, shape):
        return 1

    overrides = [f"model.path={model_dir}", f"method={args.method}",
                 f"train.max_steps={args.steps}", "eval.every_steps=0", "log.every_steps=1", "log.progress_bar=false"]
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    overrides += args.harness_set
    # The HF runs reuse the recipe and DeepSpeed config the harness run resolved (same maths, same batches).
    baseline = ["--recipe", str(harness_out / "recipe.yaml"), "--ds-config", args.hf_ds_config or str(harness_out / "ds_config.json")]
    commands = {
        "harness": ("harness/train.py", ["--config", args.recipe, *overrides, f"output_dir={harness_out}"]),
        "hf": ("tools/hf_trainer_baseline.py", [*baseline, "--output-dir", str(out_dirs["hf"]), *args.hf_set]),
        "harness+k": ("harness/train.py", ["--config", args.recipe, *overrides, f"output_dir={out_dirs['harness+k']}", "kernels=all"]),
        "hf+liger": ("tools/hf_trainer_baseline.py", [*baseline, "--output-dir", str(out_dirs["hf+liger"]), "--liger", *args.hf_set]),
    }
    if args.repeats > 1:
        return repeated_pairs(args, work, commands, overrides, out_dirs, setting)
    for name in RUN_NAMES:  # harness first: the others need its resolved files
        if name not in args.runs:
            continue
        if name != "harness" and runs.get("harness", {}).get("rc", 0) != 0:
            break  # the harness run failed: reported below
        # A run cut off (e.g. at a device call's time limit) must not be reused later as the complete one
        # recorded before; and a stale run's checkpoints would be resumed (resume: auto).
        (work / f"{name}.run.json").unlink(missing_ok=True)
        shutil.rmtree(out_dirs[name], ignore_errors=True)
        script, script_args = commands[name]
        runs[name] = launch(name, script, script_args, work, out_dirs[name] / "metrics.jsonl", args.steps, args.timeout_s, args.nproc)
        (work / f"{name}.run.json").write_text(json.dumps({**runs[name], "setting": setting}))

    failed = [name for name, r in runs.items() if r["rc"] != 0]
    if failed:
        for name in failed:
            print(f"\n{name} run failed (exit {runs[name]['rc']}); last lines of {runs[name]['stderr']}:",
                  file=sys.stderr)
            print(stderr_tail(Path(runs[name]["stderr"])), file=sys.stderr)
        return 1

    step_rows = {"harness": harness_steps, "hf": baseline_steps, "harness+k": harness_steps, "hf+liger": baseline_steps}
    rows = {name: step_rows[name](read_jsonl(out_dirs[name] / "metrics.jsonl")) for name in RUN_NAMES if name in runs}
    for name, r in rows.items():
        if len(r) != args.steps:
            print(f"{name}: {len(r)} step records, expected {args.steps}; see {runs[name]['stdout']}", file=sys.stderr)
            return 1
    summaries = {name: summarize(r, args.warmup_steps, runs[name]["wall_s"]) for name, r in rows.items()}
    reused = [name for name, r in runs.items() if r.get("reused")]
    if reused:
        progress(f"reused from an earlier call: {', '.join(reused)}")

    # Fairness checks: the same sequences per step (identical per-step token counts) and the same maths
    # (same init, data, learning rates and update: the losses then agree to float rounding). A schedule
    # difference shows up as the first step whose logged learning rates differ.
    same_tokens = [a["tokens"] for a in rows["harness"]] == [b["tokens"] for b in rows["hf"]]
    max_loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["harness"], rows["hf"]))
    lr_differs = next((a for a, b in zip(rows["harness"], rows["hf"])
                       if a["lr"] is None or abs(a["lr"] - b["lr"]) > 1e-9 * max(abs(b["lr"]), 1e-12)), None)
    lr_note = "same at every step" if lr_differs is None else (
        f"first differs at step {lr_differs['step']}: harness {lr_differs['lr']}, "
        f"hf {rows['hf'][lr_differs['step'] - 1]['lr']}")
    ratio = summaries["harness"]["tokens_per_s"] / summaries["hf"]["tokens_per_s"]
    loop_ratio = summaries["harness"]["loop_tokens_per_s"] / summaries["hf"]["loop_tokens_per_s"]

    print_table(args.method, args.warmup_steps, summaries)
    print(f"ratio harness/hf tokens/s: {ratio:.3f}  (loop tok/s: {loop_ratio:.3f})")
    for name in ("harness+k", "hf+liger"):
        if name in summaries:
            print(f"ratio {name}/hf tokens/s: {summaries[name]['tokens_per_s'] / summaries['hf']['tokens_per_s']:.3f}")
    if args.harness_set:
        print(f"harness overrides: {' '.join(args.harness_set)} (the layouts differ, so per-step tokens and losses differ)")
    print(f"same non-pad tokens at every step: {'yes' if same_tokens else 'NO'}; "
          f"max |loss difference| over steps: {max_loss_diff:.2e}")
    print(f"learning rate used per step: {lr_note}")
    loads = ", ".join(f"{name} {r['load_before']:.2f}" for name, r in runs.items())
    print(f"1-min load average before each run: {loads} (2 cores; well above 0 means other work shared the CPU)")

    if args.json:
        figures = {
            "config": {"method": args.method, "steps": args.steps, "warmup_steps": args.warmup_steps,
                       "like": args.like, "hidden": args.hidden, "layers": args.layers,
                       "intermediate": intermediate, "seq_len": args.seq_len, "recipe": args.recipe,
                       "harness_overrides": args.harness_set,
                       "work_dir": str(work), "runs_reused_from_earlier_call": reused},
            "tokens_per_s_definition": "non-pad input tokens summed over ranks / step wall time, "
                                       "total over steps after warmup_steps",
            "summary": summaries,
            "ratio_harness_over_hf_tokens_per_s": ratio,
            "ratio_harness_over_hf_loop_tokens_per_s": loop_ratio,
            "same_tokens_every_step": same_tokens,
            "max_abs_loss_diff": max_loss_diff,
            "learning_rate_check": lr_note,
            "load_average_before": {name: r["load_before"] for name, r in runs.items()},
            "per_step": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        progress(f"figures written to {args.json}")
    return 0


def repeated_pairs(args, work: Path, commands: dict, overrides: list[str], out_dirs: dict, setting: dict) -> int:
    """harness, hf, harness, hf, ... (--repeats pairs, alternating so that drift in the machine's speed
    hits both sides alike); each pair's tokens/s ratio, and their median. The last pair is left in the
    work dir as the complete harness and hf runs, which a later call with the same settings reuses (e.g.
    `--kernels --runs harness+k`)."""
    ratios, pairs = [], []
    for rep in range(args.repeats):
        last = rep == args.repeats - 1
        dirs = {name: out_dirs[name] if last else work / f"{name}.r{rep}" for name in ("harness", "hf")}
        cmds = {"harness": (commands["harness"][0], ["--config", args.recipe, *overrides, f"output_dir={dirs['harness']}"]),
                "hf": (commands["hf"][0], ["--recipe", str(dirs["harness"] / "recipe.yaml"),
                                           "--ds-config", args.hf_ds_config or str(dirs["harness"] / "ds_config.json"),
                                           "--output-dir", str(dirs["hf"]), *args.hf_set])}
        summaries = {}
        for name in ("harness", "hf"):
            (work / f"{name}.run.json").unlink(missing_ok=True)  # (never a cut-off run recorded as complete)
            shutil.rmtree(dirs[name], ignore_errors=True)
            run = launch(f"{name}.r{rep}", *cmds[name], work, dirs[name] / "metrics.jsonl", args.steps, args.timeout_s, args.nproc)
            if run["rc"] != 0:
                print(f"\n{name} run {rep} failed (exit {run['rc']}); last lines of {run['stderr']}:", file=sys.stderr)
                print(stderr_tail(Path(run["stderr"])), file=sys.stderr)
                return 1
            if name == "harness" and rep == 0:  # what the run plan decided (auto settings, with the budget line)
                for line in Path(run["stdout"]).read_text(errors="replace").splitlines():
                    if "plan: gradient_checkpointing" in line or "plan: micro_batch_size" in line or "plan: batch layout" in line:
                        progress("harness " + line.split("plan: ", 1)[1])
            rows = (harness_steps if name == "harness" else baseline_steps)(read_jsonl(dirs[name] / "metrics.jsonl"))
            if len(rows) != args.steps:
                print(f"{name} run {rep}: {len(rows)} step records, expected {args.steps}; see {run['stdout']}", file=sys.stderr)
                return 1
            summaries[name] = summarize(rows, args.warmup_steps, run["wall_s"])
            summaries[name]["tokens_per_step"] = [r["tokens"] for r in rows]
            if last:
                (work / f"{name}.run.json").write_text(json.dumps({**run, "setting": setting}))
        same = summaries["harness"].pop("tokens_per_step") == summaries["hf"].pop("tokens_per_step")
        summaries["same_tokens_every_step"] = same
        ratios.append(summaries["harness"]["tokens_per_s"] / summaries["hf"]["tokens_per_s"])
        pairs.append(summaries)
        progress(f"pair {rep + 1}/{args.repeats}: harness {summaries['harness']['tokens_per_s']:.0f} tok/s, "
                 f"hf {summaries['hf']['tokens_per_s']:.0f} tok/s, ratio {ratios[-1]:.3f}; "
                 f"{'the same' if same else 'different'} tokens at every step")
    median = statistics.median(ratios)
    print(f"\nharness overrides: {' '.join(args.harness_set) or 'none'}; hf overrides: {' '.join(args.hf_set) or 'none'}")
    print(f"ratio harness/hf tokens/s per pair: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"median ratio harness/hf tokens/s over {args.repeats} alternating pairs: {median:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {"method": args.method, "steps": args.steps, "warmup_steps": args.warmup_steps,
                                                    "hidden": args.hidden, "layers": args.layers, "recipe": args.recipe,
                                                    "harness_overrides": args.harness_set, "hf_overrides": args.hf_set,
                                                    "repeats": args.repeats},
                                         "ratios": ratios, "median_ratio": median, "pairs": pairs}, indent=2) + "\n")
        progress(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
