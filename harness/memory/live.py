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
peak RSS beside them. `PhasePeaks` adds the peak within each phase of the measured step (forward,
backward, optimizer step): CUDA peak allocated bytes, or on CPU the RSS high-water mark. The training loop
logs this at step 1 and every `log.memory_every_steps`, and
`memory_report.md` sets the last measurement beside the pre-flight budget, category by category.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

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
        out["peak_allocated_bytes"] = cuda_peak_bytes("allocated")
        out["other_at_peak_bytes"] = max(0, out["peak_allocated_bytes"] - accounted)
    else:
        out["peak_rss_bytes"] = lifetime_peak_rss_bytes()
    return out


_rss_peak_before_resets = 0  # VmHWM folded in before each reset, so resets never lose the lifetime peak
_cuda_peaks_before_resets = {"allocated": 0, "reserved": 0}  # the same for the CUDA allocator's peaks


def reset_cuda_peak() -> None:
    """Reset the CUDA allocator's peak (for one phase), first folding it into the lifetime peaks."""
    _cuda_peaks_before_resets["allocated"] = max(_cuda_peaks_before_resets["allocated"], torch.cuda.max_memory_allocated())
    _cuda_peaks_before_resets["reserved"] = max(_cuda_peaks_before_resets["reserved"], torch.cuda.max_memory_reserved())
    torch.cuda.reset_peak_memory_stats()


def cuda_peak_bytes(kind: str = "allocated") -> int:
    """The CUDA allocator's lifetime peak, `allocated` or `reserved`, across the per-phase resets."""
    now = torch.cuda.max_memory_allocated() if kind == "allocated" else torch.cuda.max_memory_reserved()
    return max(now, _cuda_peaks_before_resets[kind])


def _vmhwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes(since_reset: bool = False) -> int | None:
    """This process's RSS high-water mark (VmHWM, Linux; None elsewhere): over its lifetime, or since
    the last reset_peak_rss(). (getrusage's ru_maxrss would also count the parent's RSS from before
    exec, and it follows the resets.)"""
    hwm = _vmhwm_bytes()
    if hwm is None or since_reset:
        return hwm
    return max(hwm, _rss_peak_before_resets)


def lifetime_peak_rss_bytes() -> int:
    """The process's peak RSS over its lifetime: VmHWM on Linux (kept across resets), getrusage's
    ru_maxrss (KiB) elsewhere."""
    return peak_rss_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0, /proc/self/clear_refs); False where that is not possible."""
    global _rss_peak_before_resets
    hwm = _vmhwm_bytes()
    if hwm is None:
        return False
    _rss_peak_before_resets = max(_rss_peak_before_resets, hwm)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak memory per training phase (forward, backward, step) over one optimizer step, the maximum
    over its micro-batches. On CUDA: the allocator's peak allocated bytes within the phase (the figure
    the budget's `phase_bytes` predicts, less its CUDA context and margin). On CPU: the process's RSS
    high-water mark within the phase, which also holds the libraries and the data set, so it is logged
    but not set against the budget. Only the steps whose footprint is logged are measured."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peaks: dict[str, int] = {}
        self.works = self.cuda or reset_peak_rss()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.works:
            yield
            return
        if self.cuda:
            reset_cuda_peak()
        else:
            reset_peak_rss()
        try:
            yield
        finally:
            peak = torch.cuda.max_memory_allocated() if self.cuda else (peak_rss_bytes(since_reset=True) or 0)
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def as_footprint(self) -> dict:
        """`peak_<phase>_bytes` entries to merge into a footprint (empty where nothing was measured)."""
        return {f"peak_{name}_bytes": b for name, b in self.peaks.items()}


SNAPSHOT_MAX_ENTRIES = 200_000  # allocator events kept (a ring): enough for a few steps of a 70B layer stack
_snapshot_recording = False


def start_snapshot(device: torch.device) -> bool:
    """Start recording the CUDA caching allocator's history (every alloc / free with its Python stack;
    Python frames only, which keeps the cost per allocation small), for `dump_snapshot`. False on a
    device without one (CPU)."""
    global _snapshot_recording
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES, stacks="python")
    _snapshot_recording = True
    return True


def dump_snapshot(path: Path) -> Path | None:
    """Write the recorded history, if recording (else None): drag the file onto
    https://pytorch.org/memory_viz to see every live allocation over time, by size and by the line of
    code that made it."""
    if not _snapshot_recording:
        return None
    torch.cuda.memory._dump_snapshot(str(path))
    return path


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
    phases = [ph for ph in ("forward", "backward", "step") if f"peak_{ph}_bytes" in measured]
    if phases:
        on_cuda = "peak_allocated_bytes" in measured
        what = "peak allocated (CUDA)" if on_cuda else "peak RSS (CPU; libraries and data set included, so no budget column)"
        lines += ["", f"Per phase, measured {what}, MiB:", "",
                  "| phase | predicted MiB | measured MiB | difference |", "|---|---|---|---|"]
        for ph in phases:
            got = measured[f"peak_{ph}_bytes"]
            # allocator-visible prediction: the phase's lines less the runtime ones (CUDA context, NCCL,
            # which max_memory_allocated does not see) and without the allocator margin
            want = (sum(ln.bytes for ln in budget.lines if ph in ln.phases and ln.category != "runtime")
                    if (budget is not None and on_cuda) else None)
            diff = f"{100 * (want - got) / got:+.1f}%" if want and got else "n/a"
            lines.append(f"| {ph} | {want / mib:.3f} | {got / mib:.3f} | {diff} |" if want else f"| {ph} | n/a | {got / mib:.3f} | n/a |")
    lines += ["", "Budget lines (MiB, with the phases each is held in):", ""]
    if budget is not None:
        for ln in budget.lines:
            if ln.bytes:
                lines.append(f"- {ln.category}: {ln.name}: {ln.bytes / mib:.3f} ({', '.join(ln.phases)})")
    return "\n".join(lines) + "\n"
