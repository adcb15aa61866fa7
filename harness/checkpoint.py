"""Saving the trained result: the LoRA adapter in peft format or the full model in Hugging Face format,
gathered from ZeRO-3 shards by all ranks together (a save from rank 0 alone would hang ZeRO-3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness import distributed


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
    if all(float(v.abs().max()) == 0.0 for k, v in lora.items() if "lora_B" in k):
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
