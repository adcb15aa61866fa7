"""Checkpoint files: atomic writes, manifests (every file with its size and SHA-256), verification, the
recipe fingerprint a resume is checked against, and finding the checkpoint to resume from.

Protocol: every rank writes its DeepSpeed shards into `output_dir/checkpoints/step_NNNNNNNN.tmp/`; after
a barrier rank 0 fsyncs them, writes the manifest, renames the directory to `step_NNNNNNNN` and only
then moves the `latest` pointer (written to a temporary name, fsynced, renamed). A crash at any moment
therefore leaves the previous complete checkpoint and a `latest` that names a complete one. Resume
verifies the manifest and falls back to the newest older checkpoint that verifies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names it and what to do."""


CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

UNIVERSAL = "universal"  # checkpoints/universal/step_N: a copy converted for another world size


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
RESUME_FIXED = ("model.config_sha256", "task", "data.labels", "method", "prompt_tuning.num_virtual_tokens", "prompt_tuning.base_4bit",
                "freeze_layers", "lora.r", "lora.alpha", "lora.target_modules", "kernels")


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
    from harness import config

    # A key the checkpoint's fingerprint lacks (added to the recipe after it was written) had its default then.
    defaults = recipe_fingerprint(config.Recipe())
    refused, allowed = [], []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, defaults.get(key)), now.get(key)
        if old != new:
            (refused if key in RESUME_FIXED else allowed).append(f"{key}: {old!r} -> {new!r}")
    return refused, allowed


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

