"""Resumable training checkpoints that survive crashes and tampering.

    files.py      the file protocol: atomic writes, manifests, verification, the recipe fingerprint, which
                  checkpoint to resume from, pruning
    safe_load.py  DeepSpeed's pickles loaded with torch's restricted unpickler (no code runs)
    engine_io.py  save / load through DeepSpeed on all ranks, RNG state, universal conversion

LoRA/QLoRA checkpoints exclude frozen weights (the base model is re-read from model.path). The final
adapter or model export is harness/export.py; preemption (signals, exit 75) is harness/preemption.py.
"""

from harness.checkpoint.engine_io import (
    MAX_ABS_OPTIMIZER_STATE,
    MAX_ABS_PARAMETER,
    load_checkpoint,
    loaded_state_problem,
    needs_universal,
    rng_state,
    save_checkpoint,
    set_rng_state,
    universal_copy,
)
from harness.checkpoint.files import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    RESUME_FIXED,
    UNIVERSAL,
    CheckpointError,
    atomic_write_text,
    find_resume_dir,
    prune,
    read_manifest,
    recipe_fingerprint,
    resume_changes,
    sampled_sha256,
    sha256_file,
    step_dirs,
    verify,
    write_manifest,
)
from harness.checkpoint.safe_load import TRUST_PICKLES_ENV, weights_only_loading

__all__ = [
    "CHECKPOINTS", "LATEST", "MANIFEST", "MAX_ABS_OPTIMIZER_STATE", "MAX_ABS_PARAMETER", "RESUME_FIXED", "TRUST_PICKLES_ENV",
    "UNIVERSAL", "CheckpointError", "atomic_write_text", "find_resume_dir", "load_checkpoint", "loaded_state_problem",
    "needs_universal", "prune", "read_manifest", "recipe_fingerprint", "resume_changes", "rng_state", "sampled_sha256",
    "save_checkpoint", "set_rng_state", "sha256_file", "step_dirs", "universal_copy", "verify", "weights_only_loading",
    "write_manifest",
]
