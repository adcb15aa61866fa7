"""GPU tier: bf16 training on CUDA. Skipped cleanly on machines without a GPU (see conftest.py)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import REPO, launch, read_metrics

pytestmark = pytest.mark.gpu
RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_bf16_one_gpu(tiny_llama, tmp_path, method):
    """precision=auto resolves to bf16 on CUDA; peak CUDA memory is logged."""
    launch(["--config", RECIPE, f"model.path={tiny_llama}", f"output_dir={tmp_path}", f"method={method}", "train.max_steps=4",
            "eval.every_steps=0", "log.every_steps=1", "log.progress_bar=false", "deepspeed.config=ds_configs/zero0.json",
            "log.memory_snapshot=true"], nproc=1)
    assert (tmp_path / "memory_snapshot_rank0.pickle").stat().st_size > 0  # the allocator history after step 1
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["peak_allocated_gib"] > 0
    assert json.loads((tmp_path / "ds_config.json").read_text())["bf16"]["enabled"] is True
    # Per-phase peak allocated bytes, set against the budget's allocator-visible prediction per phase.
    mem = [r["memory"] for r in read_metrics(tmp_path) if "memory" in r][-1]
    assert 0 < mem["peak_forward_mib"] and 0 < mem["peak_backward_mib"] and 0 < mem["peak_step_mib"]
    assert max(mem["peak_forward_mib"], mem["peak_backward_mib"], mem["peak_step_mib"]) <= mem["peak_allocated_mib"] + 1e-3
    report = (tmp_path / "memory_report.md").read_text()
    phase_rows = [line for line in report.splitlines() if line.startswith(("| forward", "| backward", "| step"))]
    assert len(phase_rows) == 3 and all("n/a" not in row.split("|")[2] for row in phase_rows), report


def test_packing_with_flash_attention(tiny_llama, tmp_path):
    """flash-attn varlen path (packed rows, position ids) trains when flash-attn is installed."""
    pytest.importorskip("flash_attn")
    launch(["--config", RECIPE, f"model.path={tiny_llama}", f"output_dir={tmp_path}", "data.packing=true", "train.max_steps=3",
            "model.attn_implementation=flash_attention_2", "train.precision=bf16", "eval.every_steps=0", "log.every_steps=1",
            "log.progress_bar=false", "deepspeed.config=ds_configs/zero0.json"], nproc=1)
    assert len([r for r in read_metrics(tmp_path) if "loss" in r]) == 3
