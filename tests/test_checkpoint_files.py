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
    # verify=size hashes a sample of each file: all of a file up to 1 MiB, like this one (larger files: 16 blocks)
    assert "sampled checksum mismatch" in checkpoint.verify(d, check_hashes=False)
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


class _RunsCode:
    """A pickle whose loading calls a function: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_loading_refuses_pickled_code_unless_trusted(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"weights": torch.ones(2), "payload": _RunsCode()}, bad)
    good = tmp_path / "mp_rank_00_model_states.pt"
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"module": {"w": torch.arange(3.0)}, "zero_stage": ZeroStageEnum.weights}, good)
    with checkpoint.weights_only_loading():
        # DeepSpeed passes weights_only=False itself; inside the block that is overridden
        refused = rf"holds a pickled print, which the harness does not unpickle.*HARNESS_TRUST_CHECKPOINT_PICKLES={tmp_path.resolve()} "
        with pytest.raises(ValueError, match=refused):
            torch.load(bad, weights_only=False)
        loaded = torch.load(good, weights_only=False)  # tensors and allow-listed DeepSpeed classes load
    assert torch.equal(loaded["module"]["w"], torch.arange(3.0)) and loaded["zero_stage"] is ZeroStageEnum.weights
    assert "this ran" not in capsys.readouterr().out
    assert torch.load.__module__ == "torch.serialization"  # restored after the block

    # Trust is per directory: "1" (what it used to take) and another directory trust nothing here
    other = tmp_path / "other"
    other.mkdir()
    for value in ("1", str(other)):
        monkeypatch.setenv(checkpoint.TRUST_PICKLES_ENV, value)
        with checkpoint.weights_only_loading(), pytest.raises(ValueError, match="does not unpickle"):
            torch.load(bad, weights_only=False)
    monkeypatch.setenv(checkpoint.TRUST_PICKLES_ENV, str(tmp_path))
    with checkpoint.weights_only_loading():
        torch.load(bad, weights_only=False)
    assert "this ran while loading" in capsys.readouterr().out


def test_universal_copy_needed_only_for_zero_on_another_world_size():
    assert checkpoint.needs_universal({"world_size": 2, "zero_stage": 3}, 1)
    assert checkpoint.needs_universal({"world_size": 1, "zero_stage": 2}, 4)
    assert not checkpoint.needs_universal({"world_size": 2, "zero_stage": 3}, 2)
    assert not checkpoint.needs_universal({"world_size": 2, "zero_stage": 0}, 1)  # rank 0 saved the whole optimizer


def test_prune_drops_universal_copies_of_deleted_checkpoints(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    root = tmp_path / checkpoint.CHECKPOINTS
    for name in ("step_00000002", "step_00000006", "step_00000008.tmp"):
        (root / checkpoint.UNIVERSAL / name).mkdir(parents=True)
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in (root / checkpoint.UNIVERSAL).iterdir()) == ["step_00000006"]
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_00000006", "step_00000004"]


def test_metrics_on_resume_keep_steps_up_to_the_checkpoint_once(tmp_path):
    from harness.metrics import MetricsLogger

    def logger(resume_step):
        return MetricsLogger(str(tmp_path), is_main=True, total_steps=6, progress_bar=False, wandb_cfg=None, recipe_dict={},
                             resume_step=resume_step)

    first = logger(0)
    first.log({"data": {"rows": 10}})
    for step in range(1, 6):
        first.log({"step": step, "loss": 1.0 / step})
    first.close()
    again = logger(3)  # resumed from the step-3 checkpoint: steps 4-5 will be logged again
    again.log({"data": {"rows": 10}})
    again.log({"step": 4, "loss": 0.25})
    again.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in records] == [1, 2, 3, None, 4]
    assert sum("data" in r for r in records) == 1
