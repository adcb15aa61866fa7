"""Fused kernels end to end: ZeRO-3 + QLoRA on 2 gloo ranks through the real entry point, all kernels
on versus off, with packed rows (position ids restart per sample, which RoPE must follow), full
gradient checkpointing (the patched forwards run again in the recompute) and eval (the fused loss
under no_grad). fp32 on CPU, where the kernels take their PyTorch paths (the chunked one for
linear_cross_entropy); the Triton kernels are checked against the same references in
tests/test_kernels_interp.py.
"""

from __future__ import annotations

import pytest

from tests.helpers import REPO, launch, read_metrics, train_losses

pytestmark = pytest.mark.distributed

RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")
STEPS = 8


def run(model_path, out_dir, kernels: str, method: str = "qlora", steps: int = STEPS):
    args = {
        "model.path": model_path,
        "output_dir": out_dir,
        "method": method,
        "kernels": kernels,
        "data.packing": "true",
        "train.max_steps": steps,
        "train.warmup_steps": 1,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.lr": 1e-2,
        "train.gradient_checkpointing": "full",
        "eval.every_steps": steps,
        "eval.max_samples": 8,
        "log.every_steps": 1,
        "log.progress_bar": "false",
        "deepspeed.config": "ds_configs/zero3.json",
    }
    proc = launch(["--config", RECIPE] + [f"{k}={v}" for k, v in args.items()], nproc=2, timeout_s=300)
    return proc


def test_all_kernels_match_no_kernels_under_zero3_qlora(tiny_llama, tmp_path):
    on = run(tiny_llama, tmp_path / "on", "all")
    run(tiny_llama, tmp_path / "off", "[]")
    assert "kernels={'rmsnorm': 5, 'rope': 2, 'swiglu': 2, 'linear_cross_entropy': 1, 'nf4': 14}" in on.stdout + on.stderr
    loss_on, loss_off = train_losses(tmp_path / "on"), train_losses(tmp_path / "off")
    assert len(loss_on) == len(loss_off) == STEPS
    assert loss_off[-1] < loss_off[0], f"training did not move: {loss_off}"
    rel = max(abs(a - b) / abs(b) for a, b in zip(loss_on, loss_off, strict=True))
    val_on = [r["val_loss"] for r in read_metrics(tmp_path / "on") if "val_loss" in r]
    val_off = [r["val_loss"] for r in read_metrics(tmp_path / "off") if "val_loss" in r]
    print(f"kernels on : {loss_on}\nkernels off: {loss_off}\nmax relative loss difference {rel:.2e}; val {val_on} vs {val_off}")
    assert rel <= 1e-4
    assert len(val_on) == len(val_off) == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(val_on, val_off, strict=True)) <= 1e-4


@pytest.mark.slow
def test_full_finetune_kernels_train_the_head_and_norms_under_zero3(tiny_llama, tmp_path):
    """method=full: the norm weights and the head are trainable, so rmsnorm's weight gradient and the
    fused loss's head gradient (computed in the forward, returned in the backward) go through ZeRO-3's
    gradient partitioning."""
    run(tiny_llama, tmp_path / "on", "[rmsnorm, rope, swiglu, linear_cross_entropy]", method="full", steps=4)
    run(tiny_llama, tmp_path / "off", "[]", method="full", steps=4)
    loss_on, loss_off = train_losses(tmp_path / "on"), train_losses(tmp_path / "off")
    assert len(loss_on) == len(loss_off) == 4 and loss_off[-1] < loss_off[0]
    rel = max(abs(a - b) / abs(b) for a, b in zip(loss_on, loss_off, strict=True))
    print(f"full: kernels on {loss_on}\nfull: kernels off {loss_off}\nmax relative loss difference {rel:.2e}")
    assert rel <= 1e-4
