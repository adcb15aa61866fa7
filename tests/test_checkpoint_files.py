"""Checkpoint file protocol (no process group): manifests, verification, fallback, pruning, RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from harness import checkpoint


def fake_checkpoint(root, step: int, complete: bool = True):
    d = root / checkpoint.CHECKPOINTS / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(range(256)) * 40)
    (d / "rng_rank00000.json").write_text("{}")
    if complete:
        checkpoint.write_manifest(d, step)
        checkpoint.atomic_write_text(root / checkpoint.CHECKPOINTS / checkpoint.LATEST, d.name)
    return d


def test_manifest_detects_truncation_corruption_and_missing_files(tmp_path):
    d = fake_checkpoint(tmp_path, 10)
    assert checkpoint.verify(d) is None
    manifest = json.loads((d / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 10 and len(manifest["files"]) == 2

    blob = d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = blob.read_bytes()
    blob.write_bytes(data[:100])
    assert "truncated" in checkpoint.verify(d)
    blob.write_bytes(data[:-1] + b"\x00")  # same size, one byte flipped
    assert "checksum" in checkpoint.verify(d)
    assert checkpoint.verify(d, check_hashes=False) is None  # size-only verification misses it, as documented
    blob.unlink()
    assert "missing" in checkpoint.verify(d)
    (d / checkpoint.MANIFEST).unlink()
    assert "no manifest" in checkpoint.verify(d)


def test_resume_falls_back_to_the_previous_valid_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    (newest / "rng_rank00000.json").write_text("{} ")  # corrupt the newest (size changes)
    logs = []
    found = checkpoint.find_resume_dir(tmp_path, "auto", log=logs.append)
    assert found.name == "step_00000002"
    assert logs and "step_00000004 skipped" in logs[0]


def test_incomplete_save_is_ignored_and_latest_prefers_its_target(tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / checkpoint.CHECKPOINTS / "step_00000004.tmp").mkdir()  # a crash mid-save
    fake_checkpoint(tmp_path, 6, complete=False)  # renamed but no manifest: cannot happen by protocol, still refused
    assert checkpoint.find_resume_dir(tmp_path, "auto", log=lambda m: None).name == "step_00000002"
    assert checkpoint.find_resume_dir(tmp_path / "nothing", "auto") is None
    assert checkpoint.find_resume_dir(tmp_path, "none") is None


def test_explicit_resume_path_must_verify(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    assert checkpoint.find_resume_dir(tmp_path, str(good)) == good
    bad = fake_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ValueError, match="no manifest"):
        checkpoint.find_resume_dir(tmp_path, str(bad))


def test_prune_keeps_the_newest_and_removes_temporaries(tmp_path):
    for s in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, s)
    (tmp_path / checkpoint.CHECKPOINTS / "step_00000010.tmp").mkdir()
    checkpoint.prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_00000008", "step_00000006"]
    assert not list((tmp_path / checkpoint.CHECKPOINTS).glob("*.tmp"))


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
