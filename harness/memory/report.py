"""Render a Budget (terminal table, Markdown, JSON, PNG) and search for what makes a run fit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from harness.memory.analytic import GIB, Cluster, ModelShape, TrainSetup, activation_profile
from harness.memory.budget import Budget, compose


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def rows(budget: Budget) -> list[tuple[str, str, str, str]]:
    out = []
    for ln in budget.lines:
        if ln.bytes == 0 and "margin" not in ln.name:
            continue
        phases = ",".join(p for p in budget.phase_bytes if p in ln.phases) or "-"
        out.append((ln.category, ln.name, _gib(ln.bytes).strip(), phases))
    return out


def verdict_line(budget: Budget) -> str:
    if budget.fits is None:
        return f"peak {budget.peak_bytes / GIB:.2f} GiB per rank ({budget.peak_phase}); no device size given"
    word = (budget.verdict or ("fits" if budget.fits else "does not fit")).upper()
    band = (f" (uncalibrated on GPU; up to +{budget.uncertainty:.0%}: {budget.peak_bytes * (1 + budget.uncertainty) / GIB:.2f} GiB)"
            if budget.uncertainty else "")
    return (f"{word}: peak {budget.peak_bytes / GIB:.2f} GiB per rank in {budget.peak_phase}{band} "
            f"(+{budget.safety_margin:.0%} safety) on {budget.device_memory_bytes / GIB:.2f} GiB; headroom "
            f"{budget.headroom_bytes / GIB:+.2f} GiB; host {budget.host_bytes / GIB:.1f} of {budget.host_ram_bytes / GIB:.0f} GiB per node")


def text_table(budget: Budget, extra: dict | None = None) -> str:
    lines = [f"Memory budget: {budget.model}  engine={budget.engine}  world_size={budget.world_size}  device={budget.device}"]
    w = max(len(r[1]) for r in rows(budget)) + 2
    lines.append(f"{'category':12s} {'item':{w}s} {'GiB':>8s}  phases")
    for cat, name, gib, phases in rows(budget):
        lines.append(f"{cat:12s} {name:{w}s} {gib:>8s}  {phases}")
    lines.append("per phase (GiB): " + "  ".join(f"{p} {v / GIB:.2f}" for p, v in budget.phase_bytes.items()))
    lines.append("host per node (GiB): " + "; ".join(f"{h.name} {h.bytes / GIB:.1f}" for h in budget.host_lines))
    lines.append(verdict_line(budget))
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def markdown(budget: Budget, extra: dict | None = None) -> str:
    out = [f"### Memory budget: {budget.model}", "",
           f"engine `{budget.engine}`, world size {budget.world_size}, device `{budget.device}`", "",
           "| category | item | GiB | resident in |", "|---|---|---:|---|"]
    out += [f"| {c} | {n} | {g} | {p} |" for c, n, g, p in rows(budget)]
    out += ["", "| phase | GiB |", "|---|---:|"] + [f"| {p} | {v / GIB:.2f} |" for p, v in budget.phase_bytes.items()]
    out += ["", "| host (per node) | GiB |", "|---|---:|"] + [f"| {h.name} | {h.bytes / GIB:.1f} |" for h in budget.host_lines]
    out += ["", f"**{verdict_line(budget)}**"]
    for k, v in (extra or {}).items():
        out.append(f"- {k}: {v}")
    return "\n".join(out) + "\n"


def write_json(budget: Budget, path: str, extra: dict | None = None) -> None:
    Path(path).write_text(json.dumps({**budget.to_dict(), **(extra or {})}, indent=1, default=str))


def plot(budget: Budget, path: str) -> None:
    """Stacked bars: one per phase, one segment per category (GiB)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from e
    cats = ["params", "zero", "grads", "optimizer", "activations", "runtime"]
    fig, ax = plt.subplots(figsize=(7, 4))
    phases = list(budget.phase_bytes)
    bottoms = [0.0] * len(phases)
    for cat in cats:
        vals = [sum(ln.bytes for ln in budget.lines if ln.category == cat and p in ln.phases) / GIB for p in phases]
        ax.bar(phases, vals, bottom=bottoms, label=cat)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    if budget.device_memory_bytes:
        ax.axhline(budget.device_memory_bytes / GIB, color="red", linestyle="--", label="device memory")
    ax.set_ylabel("GiB per rank")
    ax.set_title(f"{budget.model}: {budget.engine}, {budget.world_size} ranks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def deepspeed_estimate(m: ModelShape, t: TrainSetup, cluster: Cluster) -> dict:
    """DeepSpeed's own ZeRO-3 model-states estimate for the same model and cluster (no activations,
    buffers or runtime; every parameter counted as trainable fp16 with Adam)."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return {"error": "deepspeed is not installed"}
    largest_layer = max(max(a * b for a, b in m.linear_shapes().values()), m.embed_numel())
    # What estimate_zero3_model_states_mem_needs_all_live would count on a loaded QLoRA model:
    # packed 4-bit tensors report numel = n / (2 * bytes(storage)).
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        m.total_numel(), largest_layer, num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes,
        cpu_offload=t.offload_optimizer, cpu_offload_params=t.offload_param, zero_init=True)
    return {"gpu_bytes_per_rank": int(gpu), "cpu_bytes_per_node": int(cpu), "total_params": m.total_numel(), "largest_layer_params": largest_layer,
            "why_different": ("counts model states only: 4 B x largest layer + 18 B/param/N as if every parameter were trainable fp16 "
                              "with Adam; no activations, logits, ZeRO buckets, gathered parameters, CUDA context, NCCL or allocator "
                              "margin; for LoRA/QLoRA it charges optimizer state to frozen weights and ignores 4-bit packing")}


def search_fit(m: ModelShape, t: TrainSetup, cluster: Cluster, profile_fn=activation_profile, max_micro_batch: int = 64) -> dict:
    """What an operator needs from the budget, as figures and as plain sentences (`sentences`):
    the fewest nodes (and GPUs) on which the run fits as configured; on the given nodes, the largest micro-batch
    and the least recomputation that fit and whether any offload is needed; for a run that does not fit, the
    smallest change that makes it fit (one setting at a time, the least costly first)."""

    def fits(tt: TrainSetup, cl: Cluster = cluster) -> bool:
        return bool(compose(m, tt, cl.world_size, profile_fn(m, tt), cluster=cl).fits)

    def ckpt_name(p: str, k: int) -> str:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(k % 10 if k % 100 not in (11, 12, 13) else 0, "th")
        return f"every {k}{suffix} layer (every_k, k={k})" if p == "every_k" else p

    def recompute(p: str, k: int) -> int:  # layers recomputed in backward
        return dataclasses.replace(t, checkpointing=p, checkpoint_every_k=k).checkpointed_layers(m.layers)

    out: dict = {"fits": fits(t)}
    gpn, gib = cluster.gpus_per_node, cluster.gpu_memory_bytes / GIB
    # Fewest nodes (the run's own micro-batch and checkpointing): each count up to the given one, then doubling up to
    # 64 times it; past the given count the fewest between the last that failed and the first that fits.
    needed = next((n for n in range(1, cluster.nodes + 1) if fits(t, dataclasses.replace(cluster, nodes=n))), None)
    if needed is None:
        lo, hi = cluster.nodes, 2 * cluster.nodes
        while hi <= 64 * cluster.nodes and not fits(t, dataclasses.replace(cluster, nodes=hi)):
            lo, hi = hi, 2 * hi
        if hi <= 64 * cluster.nodes:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(t, dataclasses.replace(cluster, nodes=mid)) else (mid, hi)
            needed = hi
    out["nodes_needed"] = needed
    best, mb = 0, 1
    while mb <= max_micro_batch and fits(dataclasses.replace(t, micro_batch=mb)):
        best, mb = mb, mb * 2
    if best:  # refine between best and 2 * best
        lo, hi = best, min(2 * best, max_micro_batch + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(dataclasses.replace(t, micro_batch=mid)) else (lo, mid)
        best = lo
    out["largest_micro_batch"] = best or None
    policies = [("none", t.checkpoint_every_k), ("every_k", 4), ("every_k", 2), ("full", 2)]
    cheapest = next(((p, k) for p, k in policies if fits(dataclasses.replace(t, checkpointing=p, checkpoint_every_k=k))), None)
    out["cheapest_checkpointing"] = None if cheapest is None else (cheapest[0] + (f" (k={cheapest[1]})" if cheapest[0] == "every_k" else ""))
    offloads = [("offload optimizer", dict(offload_optimizer=True)), ("offload optimizer + params", dict(offload_optimizer=True, offload_param=True))]
    if out["fits"] and not (t.offload_optimizer or t.offload_param):
        out["offload"] = "none needed"
    else:
        out["offload"] = next((name for name, kw in offloads if t.zero_stage == 3 and fits(dataclasses.replace(t, **kw))), None)
    gen = []
    if t.generate_batch:  # the eval's greedy generation: fewer prompts at a time, or no whole-model gather
        gen = [(f"eval.generate_batch_size={b}", dict(generate_batch=b)) for b in (8, 4, 2, 1) if b < t.generate_batch]
        gen += [("eval.generate_gather=false", dict(generate_gather=False))]
        out["generation"] = next((name for name, kw in gen if fits(dataclasses.replace(t, **kw))), None)

    said = []
    where = f"{cluster.nodes} node{'s' * (cluster.nodes > 1)} x {gpn} GPUs of {gib:.0f} GiB"
    if out["nodes_needed"] is None:
        said.append(f"It does not fit on up to {64 * cluster.nodes} nodes of {gpn} x {gib:.0f} GiB GPUs as configured.")
    else:
        n = out["nodes_needed"]
        said.append(f"Fewest nodes on which it fits as configured: {n} ({n * gpn} GPUs of {gib:.0f} GiB)"
                    + (f"; the {cluster.nodes} given are more than it needs." if n < cluster.nodes else "."))
    if out["fits"]:
        said.append(f"On {where}: the largest micro-batch that fits is {best} (train.micro_batch_size; now {t.micro_batch}); "
                    f"the least recomputation that fits is {ckpt_name(*cheapest)} (train.gradient_checkpointing; now {t.checkpointing}).")
        in_use = " + ".join(x for x, on in (("optimizer", t.offload_optimizer), ("params", t.offload_param)) if on)
        said.append("No offload is needed." if out["offload"] == "none needed" else f"Offload in use: {in_use}.")
    else:
        # The smallest change first: one setting, the least costly to throughput first.
        fixes = []
        if best and best < t.micro_batch:
            fixes.append(f"train.micro_batch_size={best} (from {t.micro_batch}; raise gradient accumulation to keep the global batch)")
        if cheapest is not None and recompute(*cheapest) > recompute(t.checkpointing, t.checkpoint_every_k):  # more recomputation
            every = f" train.checkpoint_every_k={cheapest[1]}" if cheapest[0] == "every_k" else ""
            fixes.append(f"train.gradient_checkpointing={cheapest[0]}{every}")
        if gen and out.get("generation"):
            fixes.append(out["generation"])
        if out["nodes_needed"] is not None and out["nodes_needed"] > cluster.nodes:
            fixes.append(f"{out['nodes_needed']} nodes ({out['nodes_needed'] * gpn} GPUs) instead of {cluster.nodes}")
        if out["offload"]:
            fixes.append(f"{out['offload']} (ds_configs/zero3_offload_{'all' if 'params' in out['offload'] else 'optimizer'}.json; slower)")
        if not fixes:  # no one setting is enough: the combinations, the least costly first
            base = " ".join(x for x, on in (("train.micro_batch_size=1", t.micro_batch > 1), ("train.gradient_checkpointing=full",
                                                                                           t.checkpointing != "full")) if on)
            combos = [(base, dict(micro_batch=1, checkpointing="full"))] if base else []
            if t.zero_stage == 3:
                combos += [(f"{base + ' and ' if base else ''}{name} (ds_configs/zero3_offload_{'all' if 'params' in name else 'optimizer'}"
                            ".json; slower)", dict(micro_batch=1, checkpointing="full", **kw)) for name, kw in offloads]
            combo = next((name for name, kw in combos if fits(dataclasses.replace(t, **kw))), None)
            fixes = [combo] if combo else []
        verdict = compose(m, t, cluster.world_size, profile_fn(m, t), cluster=cluster).verdict  # may not fit: the GPU band's upper end
        said.append(f"It {'may not fit' if verdict == 'may not fit' else 'does not fit'} on {where}. "
                    + (f"The smallest change that makes it fit: {fixes[0]}." if fixes else
                                                        "Nothing tried here makes it fit (micro-batch, checkpointing, nodes, offload, "
                                                        "and micro-batch 1 with full checkpointing and offload): shorten data.seq_len "
                                                        "or use larger GPUs."))
        if len(fixes) > 1:
            said.append("Other single changes that fit: " + "; ".join(fixes[1:]) + ".")
    out["sentences"] = said
    return out
