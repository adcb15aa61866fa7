"""Checkpoints that survive anything, and the final export.

Training checkpoints (resumable): every rank writes its DeepSpeed shards into
`output_dir/checkpoints/step_NNNNNNNN.tmp/`; after a barrier rank 0 fsyncs them, writes a manifest
(every file with its size and SHA-256), renames the directory to `step_NNNNNNNN` and only then moves the
`latest` pointer (written to a temporary name, fsynced, renamed). A crash at any moment therefore
leaves the previous complete checkpoint and a `latest` that names a complete one. Resume verifies the
manifest and falls back to the newest older checkpoint that verifies. LoRA/QLoRA checkpoints exclude
frozen weights (the base model is re-read from model.path).

Final export: the LoRA adapter in peft format or the full model in Hugging Face format, gathered from
ZeRO-3 shards by all ranks together (a save from rank 0 alone would hang ZeRO-3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from harness import distributed

class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names it and what to do."""


CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, manifests, verification
# --------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or the new content, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 64 << 10  # checkpoint.verify=size reads 1 MiB of each file


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the size and 16 blocks of 64 KiB spread evenly over the file (all of a file up to 1 MiB):
    what `checkpoint.verify=size` checks, reading 1 MiB per file however large the checkpoint."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            h.update(f.read())
        else:
            for k in range(SAMPLE_BLOCKS):
                f.seek((size - SAMPLE_BLOCK_BYTES) * k // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def write_manifest(ckpt_dir: Path, step: int, world_size: int = 1, zero_stage: int = 0, recipe: dict | None = None) -> dict:
    """fsync every file in `ckpt_dir`, then record it (relative path, bytes, sha256 and the sampled hash)
    in the manifest, with the world size and ZeRO stage that wrote it (a resume on another world size
    converts) and the run's recipe fingerprint (`recipe_fingerprint`: a resume may not change its shape)."""
    files = {}
    for p in sorted(x for x in ckpt_dir.rglob("*") if x.is_file() and x.name != MANIFEST):
        _fsync_path(p)
        files[str(p.relative_to(ckpt_dir))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p), "sampled_sha256": sampled_sha256(p)}
    manifest = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "files": files}
    if recipe is not None:
        manifest["recipe"] = recipe
    atomic_write_text(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(ckpt_dir: Path, check_hashes: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    mpath = ckpt_dir / MANIFEST
    if not mpath.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    if not files:
        return "manifest lists no files"
    for rel, meta in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)"
        if check_hashes and sha256_file(p) != meta["sha256"]:
            return f"{rel} checksum mismatch (corrupted)"
        if not check_hashes and "sampled_sha256" in meta and sampled_sha256(p) != meta["sampled_sha256"]:
            return f"{rel} sampled checksum mismatch (corrupted)"
    return None


# --------------------------------------------------------------------------------------------------
# What a resume may change: the recipe fingerprint in each manifest
# --------------------------------------------------------------------------------------------------

# Keys that decide which tensors a checkpoint holds and what they mean: a resume that changes one is
# refused (the model's config.json stands for model.path, so a moved model directory still resumes).
RESUME_FIXED = ("model.config_sha256", "method", "freeze_layers", "lora.r", "lora.alpha", "lora.target_modules", "kernels")


def recipe_fingerprint(recipe) -> dict:
    """The recipe as flat `dotted.key: value` pairs, plus the hash of the model's config.json."""
    from harness import config

    flat: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(config.to_dict(recipe), "")
    flat.pop("data.sources", None)
    for i, src in enumerate(recipe.data.sources):
        for k, v in dataclasses.asdict(src).items():
            flat[f"data.sources.{i}.{k}"] = v
    cfg = Path(recipe.model.path) / "config.json"
    flat["model.config_sha256"] = sha256_file(cfg) if cfg.is_file() else None
    return json.loads(json.dumps(flat, default=str))


def resume_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): each `key: old -> new` between a checkpoint's fingerprint and this run's."""
    refused, allowed = [], []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old != new:
            (refused if key in RESUME_FIXED else allowed).append(f"{key}: {old!r} -> {new!r}")
    return refused, allowed


# Bounds a loaded training state must respect: an LLM weight (or LoRA factor) is O(1), and a corrupted
# float is usually far outside them (a flipped exponent bit gives 1e29 or NaN).
MAX_ABS_PARAMETER = 1e4
MAX_ABS_OPTIMIZER_STATE = 1e12


def loaded_state_problem(engine) -> str | None:
    """None when every trainable value and optimizer state this rank holds is finite and in bounds (the
    check after a resume that `checkpoint.verify=size` relies on), else what is wrong."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizers wrap the torch one
    # The fp32 master values: ZeRO-3 and ZeRO-1/2 keep them as flat partitions outside param_groups (which
    # ZeRO-3 fills only during its step); without ZeRO they are the param_groups' own parameters.
    masters = list(getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None) or [])
    masters += [p for group in inner.param_groups for p in group["params"]]
    named = [("parameter", p.data, MAX_ABS_PARAMETER) for p in masters]
    named += [(k, v, MAX_ABS_OPTIMIZER_STATE) for per_param in inner.state.values() for k, v in per_param.items()
              if torch.is_tensor(v) and v.numel() > 1]
    for i, (what, t, bound) in enumerate(named):
        if t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            return f"non-finite {what} values (tensor {i} of {len(named)})"
        biggest = float(t.abs().max())
        if biggest > bound:
            return f"{what} values up to {biggest:.3g} (tensor {i} of {len(named)}; bound {bound:.0e})"
    return None


def step_dirs(output_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest first (temporary ones excluded)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)


def find_resume_dir(output_dir: str | Path, resume: str, log=print, check_hashes: bool = True) -> Path | None:
    """The checkpoint to resume from. `auto`: the newest that verifies, starting with `latest`
    (None when there is none); `none`: None; a path: that checkpoint, which must verify."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        problem = verify(path, check_hashes) if path.is_dir() else "no such directory"
        if problem:
            raise ValueError(f"resume checkpoint {path} is not usable: {problem}; use resume=auto or another checkpoint")
        return path
    root = Path(output_dir) / CHECKPOINTS
    candidates = step_dirs(output_dir)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:  # try the pointer's target first, then the rest newest first
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        problem = verify(path, check_hashes)
        if problem is None:
            return path
        log(f"checkpoint {path.name} skipped: {problem}; trying an older one")
    return None


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporary directories."""
    root = Path(output_dir) / CHECKPOINTS
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in step_dirs(output_dir)[keep_last:]:
            shutil.rmtree(p, ignore_errors=True)
    # Universal copies are derived data: keep them only beside the checkpoint they were made from.
    for p in (root / UNIVERSAL).glob("step_*"):
        if not (root / p.name.removesuffix(".tmp")).is_dir() or p.suffix == ".tmp":
            shutil.rmtree(p, ignore_errors=True)


def read_manifest(ckpt_dir: Path) -> dict:
    manifest = json.loads((Path(ckpt_dir) / MANIFEST).read_text())
    if "world_size" not in manifest:  # written before the field existed: one RNG file per rank
        manifest["world_size"] = len(list(Path(ckpt_dir).glob("rng_rank*.json"))) or 1
    return manifest


# --------------------------------------------------------------------------------------------------
# Safe loading: DeepSpeed's .pt files are pickles; never let one run code
# --------------------------------------------------------------------------------------------------

TRUST_PICKLES_ENV = "HARNESS_TRUST_CHECKPOINT_PICKLES"


def _deepspeed_safe_globals() -> list:
    """Plain-data classes that DeepSpeed pickles into its checkpoint files besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loading():
    """Inside this block every `torch.load` (DeepSpeed's own included: it passes weights_only=False)
    uses torch's restricted unpickler, which builds tensors, containers and the allow-listed DeepSpeed
    classes and refuses anything else, so a tampered checkpoint cannot execute code.
    HARNESS_TRUST_CHECKPOINT_PICKLES=DIR lifts that for the files under DIR only (a checkpoint you trust
    that holds other objects); every other file stays restricted."""
    trusted = os.environ.get(TRUST_PICKLES_ENV, "")
    trusted_dir = Path(trusted).resolve() if trusted and trusted not in ("0", "1") else None
    real_load = torch.load

    def load(f, *args, **kwargs):
        if trusted_dir is not None and isinstance(f, (str, os.PathLike)) and trusted_dir in Path(f).resolve().parents:
            return real_load(f, *args, **kwargs)  # the one directory the user said to trust
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except Exception as e:  # torch raises UnpicklingError with the offending global in the text
            if "Weights only load failed" not in str(e):
                raise
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f"a pickled {found.group(1)}" if found else "a pickled object that is not plain data"
            where = Path(f).resolve().parent if isinstance(f, (str, os.PathLike)) else "<that checkpoint directory>"
            raise ValueError(f"{f} holds {what}, which the harness does not unpickle (it could run code). If you trust "
                             f"this checkpoint, rerun with {TRUST_PICKLES_ENV}={where} (that directory only).") from None

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load


# --------------------------------------------------------------------------------------------------
# RNG state: plain JSON (no pickle), one file per rank
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# Save and load through DeepSpeed (all ranks call these)
# --------------------------------------------------------------------------------------------------


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, dist, *, exclude_frozen: bool, keep_last: int,
                    recipe: dict | None = None) -> Path:
    """Write a complete, verified checkpoint of `step` (see the module docstring for the protocol)."""
    root = Path(output_dir) / CHECKPOINTS
    tag = f"step_{step:08d}"
    tmp = root / f"{tag}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"trainer": trainer_state}, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    with open(tmp / f"rng_rank{dist.rank:05d}.json", "w") as f:
        json.dump(rng_state(), f)
    distributed.barrier()  # every rank's files are written
    if dist.is_main:
        write_manifest(tmp, step, world_size=dist.world_size, zero_stage=engine.zero_optimization_stage(), recipe=recipe)
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(root)
        atomic_write_text(root / LATEST, tag)
        prune(output_dir, keep_last)
    distributed.barrier()  # nobody goes on (or exits) before the checkpoint is complete
    return root / tag


UNIVERSAL = "universal"


def needs_universal(manifest: dict, world_size: int) -> bool:
    """A ZeRO-1/2/3 checkpoint holds one optimizer shard per rank, laid out for the world size that wrote
    it; on another world size it must be loaded through DeepSpeed's universal (per-parameter) format.
    Without ZeRO, rank 0 saved the whole optimizer state, which any world size loads."""
    return manifest["world_size"] != world_size and manifest.get("zero_stage", 3) > 0


def universal_copy(ckpt_dir: Path, dist, log=print) -> Path:
    """`checkpoints/universal/step_N`: `ckpt_dir` converted by DeepSpeed's ds_to_universal (rank 0
    converts, the others wait; reused when it already exists). Written under a temporary name and
    renamed, so a crash mid-conversion leaves nothing that looks complete."""
    out = ckpt_dir.parent / UNIVERSAL / ckpt_dir.name
    if dist.is_main and not out.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        tmp = out.parent / f"{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log(f"converting {ckpt_dir.name} (saved by {read_manifest(ckpt_dir)['world_size']} ranks) to DeepSpeed's universal "
            f"format for {dist.world_size} ranks: {out}")
        args = Namespace(input_folder=str(ckpt_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                         keep_temp_folder=False, no_strict=False, inject_missing_state=False)
        with weights_only_loading():
            ds_to_universal.main(args)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's own pointer; unused
        os.replace(tmp, out)
    distributed.barrier()
    return out


def load_checkpoint(engine, ckpt_dir: Path, dist, *, exclude_frozen: bool, universal_dir: Path | None = None) -> dict:
    """Restore model, optimizer, LR scheduler and this rank's RNG; return the trainer state. With
    `universal_dir` (another world size; the engine was built with checkpoint.load_universal) the
    weights and optimizer come from that converted copy, the RNG files from `ckpt_dir`."""
    src = universal_dir or ckpt_dir
    # Frozen weights are not in a LoRA/QLoRA checkpoint: they were loaded from model.path already.
    with weights_only_loading():
        _, client = engine.load_checkpoint(str(src.parent), tag=src.name, load_module_strict=not exclude_frozen,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir}")
    rng_file = ckpt_dir / f"rng_rank{dist.rank:05d}.json"
    if rng_file.is_file():  # a universal copy has none, nor has a rank beyond the saved world: seeds stay
        set_rng_state(json.loads(rng_file.read_text()))
    return client["trainer"]


# --------------------------------------------------------------------------------------------------
# Final export
# --------------------------------------------------------------------------------------------------


def gathered_state_dict(model: torch.nn.Module, *, only_trainable: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """Full tensors on rank 0 (empty dict elsewhere). Parameters are gathered one at a time so no rank
    ever holds more than one whole parameter beyond its shard. Every rank must call this."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if only_trainable and not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned: gather (a collective), copy on rank 0, release
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main:
                    state[name] = p.data.detach().to("cpu", copy=True)
        elif is_main:
            state[name] = p.detach().to("cpu", copy=True)
    return state


def check_adapter(state: dict[str, torch.Tensor]) -> None:
    """An adapter with no tensors, an empty tensor, or lora_B all zero after training is a bug
    (the ZeRO-3 '40-byte adapter'); fail loudly instead of shipping it."""
    lora = {k: v for k, v in state.items() if "lora_" in k}
    if not lora:
        raise RuntimeError("the gathered adapter has no lora_ tensors; nothing would be saved")
    empty = [k for k, v in lora.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"adapter tensors are empty after gathering (ZeRO-3 shards not gathered): {empty[:3]}")
    if all(float(v.detach().abs().max()) == 0.0 for k, v in lora.items() if "lora_B" in k):
        raise RuntimeError("every lora_B is zero: the adapter was never updated; check lr and trainable parameters")


def save_final(model: torch.nn.Module, tokenizer, output_dir: str, *, is_lora: bool, is_main: bool, steps_trained: int) -> Path:
    """Write `output_dir/adapter` (peft) or `output_dir/model` (transformers). Returns the directory."""
    out = Path(output_dir) / ("adapter" if is_lora else "model")
    state = gathered_state_dict(model, only_trainable=is_lora, is_main=is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # The model object provides the config and the file layout; the tensors come from `state`
        # (peft keeps only the adapter's keys of it).
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    distributed.barrier()
    if is_main and is_lora and steps_trained > 0:
        check_adapter(state)  # after writing: a suspicious adapter is kept for inspection, and the run fails
    return out


# --------------------------------------------------------------------------------------------------
# Preemption: signals set a flag; ranks agree at a step boundary
# --------------------------------------------------------------------------------------------------

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again". The Slurm templates requeue the job on this code.


def _alive(proc) -> bool:
    """psutil: not gone, not the pid reused by another process, and not a zombie waiting to be reaped."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def deepspeed_launcher_processes() -> list:
    """The per-node launcher (deepspeed.launcher.launch) that started this rank and the `deepspeed` runner
    above it, as psutil processes; [] under torchrun, srun or a plain python (they pass signals on)."""
    import psutil

    try:
        parent = psutil.Process().parent()
        if parent is None or "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return []
        runner = parent.parent()
        is_runner = runner is not None and any("deepspeed" in part for part in runner.cmdline()[:3])
        return [parent, runner] if is_runner else [parent]
    except psutil.Error:
        return []


class Preempted(BaseException):
    """Raised by the signal handler when nothing is unsaved (see StopFlag): unwinds to main, which exits 75.
    A BaseException, so no `except Exception` on the way swallows it."""


class StopFlag:
    """SIGTERM / SIGUSR1 while training state is unsaved only set a flag (no I/O in a signal handler: a
    save needs every rank). The loop calls `should_stop` at each step boundary and between eval batches;
    it all-reduces the flags so that all ranks save and exit together even when the signal reached only
    some of them. A wall-clock budget (`max_runtime_s`) raises the same flag `margin_s` before the limit.

    While nothing is unsaved (`clean`: setup, model loading, the step-0 eval, right after a checkpoint)
    the handler raises Preempted at once instead: exiting loses nothing, and waiting for the next step
    boundary could outlast the scheduler's grace period (loading a 70B model takes minutes)."""

    def __init__(self, max_runtime_s: float = 0.0, margin_s: float = 0.0, signals=("SIGTERM", "SIGUSR1"), watch_launcher: bool = True):
        import signal
        import time

        self.reason = ""
        self.clean = True  # no optimizer step since the start or the last checkpoint (the loop keeps it)
        self._deadline = time.monotonic() + max_runtime_s - margin_s if max_runtime_s > 0 else None
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)
        if watch_launcher:
            self._watch(deepspeed_launcher_processes())

    def _watch(self, launchers: list, poll_s: float = 1.0) -> None:
        """The `deepspeed` runner dies on a SIGTERM without passing it on (its per-node launcher and the
        ranks go on, orphaned). A daemon thread checks every `poll_s` that the runner and launcher above
        this rank still live; when one is gone it raises the flag as a SIGTERM would: the ranks save a
        checkpoint together at the next step and exit 75."""
        import threading
        import time

        if not launchers:
            return

        def watch():
            import os
            import signal

            while not self.reason:
                for proc in launchers:
                    if not _alive(proc):
                        self._launcher_gone = f"the deepspeed launcher (pid {proc.pid}) exited"
                        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, as a real one
                        return
                time.sleep(poll_s)

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

    _launcher_gone = ""

    def _handler(self, signum, _frame) -> None:
        import signal

        self.reason = self.reason or self._launcher_gone or signal.Signals(signum).name
        if self.clean:
            self.clean = False  # once: a second signal (the launcher's, while this one unwinds) only sets the flag
            raise Preempted(self.reason)

    def should_stop(self, device) -> bool:
        import time

        if not self.reason and self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = "max_runtime"
        (votes,) = distributed.all_reduce_sum([1.0 if self.reason else 0.0], device)
        if votes and not self.reason:
            self.reason = "another rank's signal"
        return votes > 0
