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
    word = "FITS" if budget.fits else "DOES NOT FIT"
    return (f"{word}: peak {budget.peak_bytes / GIB:.2f} GiB per rank in {budget.peak_phase} "
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
    """Cheapest changes that make the run fit: largest micro-batch, cheapest checkpointing, offload, GPUs."""

    def fits(tt: TrainSetup, cl: Cluster) -> tuple[bool, int]:
        b = compose(m, tt, cl.world_size, profile_fn(m, tt), cluster=cl)
        return bool(b.fits), b.peak_bytes

    out: dict = {}
    best = 0
    mb = 1
    while mb <= max_micro_batch and fits(dataclasses.replace(t, micro_batch=mb), cluster)[0]:
        best = mb
        mb *= 2
    if best:  # refine between best and 2*best
        lo, hi = best, min(2 * best, max_micro_batch + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(dataclasses.replace(t, micro_batch=mid), cluster)[0] else (lo, mid)
        best = lo
    out["largest_micro_batch"] = best or None
    policies = [("none", t.checkpoint_every_k), ("every_k", 4), ("every_k", 2), ("full", 2)]
    out["cheapest_checkpointing"] = next((f"{p}" + (f" (k={k})" if p == "every_k" else "") for p, k in policies
                                          if fits(dataclasses.replace(t, checkpointing=p, checkpoint_every_k=k), cluster)[0]), None)
    offloads = [("offload optimizer", dict(offload_optimizer=True)), ("offload optimizer + params", dict(offload_optimizer=True, offload_param=True))]
    out["offload"] = next((name for name, kw in offloads if t.zero_stage == 3 and fits(dataclasses.replace(t, **kw), cluster)[0]), None)
    nodes = cluster.nodes
    while nodes <= 64 * cluster.nodes and not fits(t, dataclasses.replace(cluster, nodes=nodes))[0]:
        nodes *= 2
    out["nodes_needed"] = nodes if nodes <= 64 * cluster.nodes else None
    if t.generate_batch:  # the eval's greedy generation: fewer prompts at a time, or no whole-model gather
        gen = [(f"eval.generate_batch_size={b}", dict(generate_batch=b)) for b in (8, 4, 2, 1) if b < t.generate_batch]
        gen += [("eval.generate_gather=false", dict(generate_gather=False))]
        out["generation"] = next((name for name, kw in gen if fits(dataclasses.replace(t, **kw), cluster)[0]), None)
    return out
