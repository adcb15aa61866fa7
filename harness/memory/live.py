"""Live memory footprint of a training run, by category, from the tensors themselves.

`footprint(engine)` walks what the run holds and sums distinct tensor storages (a storage shared by two
views counts once):
- parameters: every module parameter's data, plus its ZeRO-3 shard (`ds_tensor`), 4-bit packed bytes
  as stored;
- gradients: `.grad` of parameters and every tensor the DeepSpeed optimizer keeps under a name with
  "grad" in it (flat gradient partitions, reduce buckets);
- optimizer: the wrapped torch optimizer's state (Adam m, v) and the rest of the DeepSpeed optimizer's
  tensors (fp32 master partitions);
- on CUDA, `allocated` and `peak_allocated` from torch.cuda's allocator; the part of the peak not in
  the three categories is activations, logits and temporaries ("other at peak").
On CPU there is no allocator to ask, so only the three categories are reported, with the process's
peak RSS beside them. The training loop logs this at step 1 and every `log.memory_every_steps`, and
`memory_report.md` sets the last measurement beside the pre-flight budget, category by category.
"""

from __future__ import annotations

import resource

import torch

GIB = 2**30
_MAX_DEPTH = 4


def _storages(obj, out: dict, depth: int = 0, seen: set | None = None) -> None:
    """Distinct storages (data_ptr -> nbytes) of the tensors reachable from obj through containers and
    plain-object attributes (not through modules: parameters are counted on their own)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        try:
            st = obj.untyped_storage()
            if st.nbytes():
                out[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).values()
    else:
        return
    for v in items:
        _storages(v, out, depth + 1, seen)


def footprint(engine) -> dict:
    """Bytes per category on this rank now (see the module docstring)."""
    params: dict[int, int] = {}
    grads: dict[int, int] = {}
    for p in engine.module.parameters():
        _storages(p.data, params)
        if hasattr(p, "ds_tensor"):
            _storages(p.ds_tensor, params)
        if p.grad is not None:
            _storages(p.grad, grads)
    opt_all: dict[int, int] = {}
    ds_opt = engine.optimizer
    inner = getattr(ds_opt, "optimizer", ds_opt)  # DeepSpeed's ZeRO wrapper holds the torch optimizer
    if inner is not None and hasattr(inner, "state"):
        _storages(dict(inner.state), opt_all)
    if ds_opt is not None and ds_opt is not inner:
        for name, value in vars(ds_opt).items():
            target = grads if "grad" in name.lower() or "ipg" in name.lower() else opt_all
            _storages(value, target)
    for key in list(grads):  # a storage is in one category only: parameters first, then gradients
        if key in params:
            del grads[key]
    for key in list(opt_all):
        if key in params or key in grads:
            del opt_all[key]
    out = {"parameters_bytes": sum(params.values()), "gradients_bytes": sum(grads.values()), "optimizer_bytes": sum(opt_all.values())}
    accounted = sum(out.values())
    if torch.cuda.is_available():
        out["allocated_bytes"] = torch.cuda.memory_allocated()
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["other_at_peak_bytes"] = max(0, out["peak_allocated_bytes"] - accounted)
    else:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def record(fp: dict) -> dict:
    """The footprint in MiB (1 KiB resolution) for metrics.jsonl / wandb."""
    return {k.replace("_bytes", "_mib"): round(v / 2**20, 3) for k, v in fp.items()}


_BUDGET_CATEGORY = {"parameters_bytes": ("params",), "gradients_bytes": ("grads",), "optimizer_bytes": ("optimizer",)}


def report_markdown(measured: dict, budget, step: int) -> str:
    """`memory_report.md`: predicted (the budget's resident per-rank lines: those held from forward
    through the optimizer step, i.e. not the step's transients) beside measured, in MiB."""
    mib = 2**20
    lines = [f"# Memory report (rank 0, step {step})", "",
             "| category | predicted MiB | measured MiB | difference |", "|---|---|---|---|"]
    for key, cats in _BUDGET_CATEGORY.items():
        want = (sum(ln.bytes for ln in budget.lines if ln.category in cats and {"forward", "step"} <= set(ln.phases))
                if budget else None)
        got = measured.get(key, 0)
        diff = f"{100 * (want - got) / got:+.1f}%" if want is not None and got else "n/a"
        lines.append(f"| {key.removesuffix('_bytes')} | {want / mib:.3f} | {got / mib:.3f} | {diff} |" if want is not None
                     else f"| {key.removesuffix('_bytes')} | n/a | {got / mib:.3f} | n/a |")
    if budget is not None:
        lines += ["", f"Budget peak per rank: {budget.peak_bytes / GIB:.3f} GiB in the {budget.peak_phase} phase."]
    if "peak_allocated_bytes" in measured:
        lines.append(f"Measured peak allocated (CUDA): {measured['peak_allocated_bytes'] / GIB:.3f} GiB.")
    if "peak_rss_bytes" in measured:
        lines.append(f"Process peak RSS (CPU; includes libraries and the data set): {measured['peak_rss_bytes'] / GIB:.3f} GiB.")
    lines += ["", "Budget lines (MiB, with the phases each is held in):", ""]
    if budget is not None:
        for ln in budget.lines:
            if ln.bytes:
                lines.append(f"- {ln.category}: {ln.name}: {ln.bytes / mib:.3f} ({', '.join(ln.phases)})")
    return "\n".join(lines) + "\n"
