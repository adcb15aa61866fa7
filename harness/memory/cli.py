"""Per-GPU memory budget of a fine-tuning run, before launching it (`harness-memory`, or `python tools/memory_budget.py`).

    # a shipped architecture, flags only
    harness-memory --model llama-3.1-70b --method qlora --seq-len 2048 --micro-batch 1 \
        --checkpointing full --zero-stage 3 --nodes 8 --gpus-per-node 8 --gpu-memory-gib 80
    # a recipe (+ dotted overrides like harness/train.py), both engines, every output format
    harness-memory --recipe harness/recipes/llama3_8b_qlora.yaml train.micro_batch_size=4 \
        --model llama-3.1-8b --engine both --markdown --json budget.json --plot budget.png

Flags win over the recipe, which wins over the recipe defaults. Exit codes: 0 fits (or no device size
to judge), 1 does not fit, 2 bad input, 3 may not fit (on GPU the budget is uncalibrated: up to +33%; the
point estimate fits, the band's upper end does not).

Engines: `analytic` (closed forms; milliseconds, no torch import), `trace` (the real HF model at full
width with 1-2 layers under FakeTensorMode, scaled to all layers), `both` (analytic budget, trace check).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from harness.memory.analytic import GIB, Cluster, activation_profile, load_model_shape
from harness.memory.budget import compose


def parse_args(argv):
    p = argparse.ArgumentParser(prog="harness-memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="config.json, a model directory or a shipped name (harness/model_configs); default: the recipe's model.path")
    p.add_argument("--recipe", help="recipe YAML (harness/recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    g = p.add_argument_group("recipe flags (override the recipe)")
    g.add_argument("--method", choices=("full", "lora", "qlora", "int8", "prompt_tuning"))
    g.add_argument("--precision", choices=("bf16", "fp16", "fp32"))
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-targets", help="comma-separated module names, or all-linear")
    g.add_argument("--micro-batch", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--checkpointing", choices=("none", "full", "every_k"))
    g.add_argument("--checkpoint-every-k", type=int)
    g.add_argument("--attn", choices=("sdpa", "flash_attention_2", "eager"))
    g.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="whether flash-attn imports on the target nodes (attention auto; default: whether it imports here)")
    g.add_argument("--ds-config", help="DeepSpeed JSON (bucket sizes, offload, stage)")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    g.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--offload-param", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--reduce-bucket-size", type=int, help="elements")
    g.add_argument("--prefetch-bucket-size", type=int, help="elements")
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--gpu-memory-gib", type=float, default=80.0)
    c.add_argument("--host-ram-gib", type=float, default=1024.0)
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: no CUDA context / NCCL / allocator terms")
    o = p.add_argument_group("output")
    o.add_argument("--engine", choices=("analytic", "trace", "both"), default="analytic")
    o.add_argument("--markdown", action="store_true", help="print Markdown instead of the terminal table")
    o.add_argument("--json", metavar="PATH")
    o.add_argument("--plot", metavar="PATH", help="PNG of stacked bars per phase (needs matplotlib)")
    o.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's own estimate (saves importing deepspeed)")
    o.add_argument("--no-search", action="store_true", help="skip the search for what makes it fit")
    return p.parse_intermixed_args(argv)


def build(args):
    from harness import config
    from harness.memory import plan_for_target, setup_from_plan

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    if args.gpu_memory_gib <= 0 or args.host_ram_gib <= 0:
        raise ValueError("--gpu-memory-gib and --host-ram-gib must be > 0")
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_bytes=int(args.gpu_memory_gib * GIB),
                      host_ram_bytes=int(args.host_ram_gib * GIB))
    world = cluster.world_size
    ov = list(args.overrides)
    for flag, key in (("method", "method"), ("precision", "train.precision"), ("lora_r", "lora.r"), ("micro_batch", "train.micro_batch_size"),
                      ("seq_len", "data.seq_len"), ("checkpointing", "train.gradient_checkpointing"),
                      ("checkpoint_every_k", "train.checkpoint_every_k"), ("attn", "model.attn_implementation"), ("ds_config", "deepspeed.config")):
        v = getattr(args, flag)
        if v is not None:
            ov.append(f"{key}={v}")
    if args.lora_targets:
        targets = args.lora_targets if args.lora_targets == "all-linear" else "[" + args.lora_targets + "]"
        ov.append(f"lora.target_modules={targets}")
    recipe = config.load_recipe(args.recipe, ov)
    t = recipe.train
    per_step = world * (t.micro_batch_size if t.micro_batch_size != "auto" else 1)
    if t.global_batch_size % per_step:  # only the per-rank micro-batch matters here
        recipe.train.global_batch_size = per_step * -(-t.global_batch_size // per_step)
    if not args.model and not recipe.model.path:
        raise ValueError("give --model (config.json, model directory or shipped name) or a recipe with model.path")
    shape = load_model_shape(args.model or recipe.model.path)
    plan = plan_for_target(recipe, world, device=args.device, flash_attn=args.flash_attn, device_memory_bytes=cluster.gpu_memory_bytes,
                           model_cfg=model_config_dict(args.model or recipe.model.path))
    decided = {"gradient_checkpointing": plan.gradient_checkpointing, "micro_batch_size": plan.micro_batch_size, "attention": plan.attn}
    for key, value in decided.items():  # what the run plan decided for "auto", and why
        if key in plan.why:
            print(f"plan: {key}: {value}  # {plan.why[key]}", file=sys.stderr)
    setup = setup_from_plan(recipe, plan)
    repl = {}
    for flag, field in (("zero_stage", "zero_stage"), ("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param"),
                        ("reduce_bucket_size", "reduce_bucket_numel"), ("prefetch_bucket_size", "prefetch_bucket_numel")):
        v = getattr(args, flag)
        if v is not None:
            repl[field] = v
    setup = dataclasses.replace(setup, **repl)
    return shape, setup, cluster


def model_config_dict(spec: str) -> dict:
    import json

    from harness.config import find_model_config

    p = find_model_config(spec)
    if p is None:
        raise ValueError(f"model {spec!r}: not a config.json, a model directory or a shipped name")
    return json.loads(p.read_text())


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from harness.config import ConfigError
    from harness.memory import report

    try:
        shape, setup, cluster = build(args)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra: dict = {}
    t0 = time.perf_counter()
    analytic = activation_profile(shape, setup)
    budget = compose(shape, setup, cluster.world_size, analytic, cluster=cluster)
    extra["analytic engine time"] = f"{time.perf_counter() - t0:.3f} s"
    if args.engine in ("trace", "both"):
        from harness.memory.trace import trace_profile

        t1 = time.perf_counter()
        traced = trace_profile(model_config_dict(args.model or "") if args.model else _recipe_cfg(args), setup)
        extra["trace engine time"] = f"{time.perf_counter() - t1:.1f} s"
        L = shape.layers
        a, tr = analytic.saved(L), traced.saved(L)
        extra["engines: activations saved at end of forward"] = (f"analytic {a / GIB:.2f} GiB, trace {tr / GIB:.2f} GiB "
                                                               f"({100 * (a - tr) / tr:+.2f}%)")
        if abs(a - tr) > 0.05 * tr:
            extra["WARNING"] = "analytic and trace activations differ by more than 5%: trust the trace"
        if args.engine == "trace":
            budget = compose(shape, setup, cluster.world_size, traced, cluster=cluster)
    if not args.no_deepspeed and setup.zero_stage == 3:
        ds = report.deepspeed_estimate(shape, setup, cluster)
        if "error" not in ds:
            states = sum(ln.bytes for ln in budget.lines if ln.category in ("params", "grads", "optimizer") and "backward" in ln.phases)
            extra["DeepSpeed estimate_zero3_model_states_mem_needs (the row of its all_cold table for these offload options)"] = (
                f"{ds['gpu_bytes_per_rank'] / GIB:.2f} GiB/GPU, {ds['cpu_bytes_per_node'] / GIB:.1f} GiB CPU/node; ours: model states "
                f"{states / GIB:.2f} GiB/GPU, training peak {max(budget.phase_bytes[p] for p in ('forward', 'backward', 'step')) / GIB:.2f} GiB, "
                f"overall peak {budget.peak_bytes / GIB:.2f} GiB ({budget.peak_phase}). Why: {ds['why_different']}")
    if not args.no_search:
        found = report.search_fit(shape, setup, cluster)
        extra["what fits"] = " ".join(found.pop("sentences"))
        extra["what fits (figures)"] = found
    print(report.markdown(budget, extra) if args.markdown else report.text_table(budget, extra))
    if args.json:
        report.write_json(budget, args.json, {"extra": extra, "setup": dataclasses.asdict(setup), "shape": dataclasses.asdict(shape)})
    if args.plot:
        try:
            report.plot(budget, args.plot)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0 if budget.fits in (None, True) else 3 if budget.verdict == "may not fit" else 1


def _recipe_cfg(args) -> dict:
    from harness import config

    return config.read_model_config(config.load_recipe(args.recipe, list(args.overrides)).model.path)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
