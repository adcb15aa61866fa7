"""Metrics: metrics.jsonl, optional wandb, the rank-0 progress bar, throughput and MFU.

MFU counts the FLOPs the step really performs. Per token, a matmul with N weights costs 2N FLOPs
forward. Backward costs 2N for the input gradient of every layer the gradient flows through, plus 2N
for the weight gradient of trainable weights only. With LoRA/QLoRA the frozen base therefore costs
2x forward (not 3x), and recomputation under gradient checkpointing adds one more forward of the
checkpointed layers. Attention scores add 4 * seq * hidden per layer per token forward (QK^T and AV;
causal masking is not subtracted, as is conventional).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from harness import _optional

# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity).
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "A6000": 155.0}


def device_peak_tflops(override: float) -> float:
    if override > 0:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS_BF16.items():
            if key in name:
                return value
    return 0.0  # unknown (CPU): MFU is not reported


def train_flops_per_token(
    *, matmul_params: int, trainable_matmul_params: int, full_finetune: bool, num_layers: int, hidden: int, seq_len: int, recompute_fraction: float
) -> float:
    """FLOPs per trained token for one forward+backward (see the module docstring)."""
    attn = 4.0 * seq_len * hidden * num_layers  # forward attention-score FLOPs per token
    fwd = 2.0 * matmul_params + attn
    input_grad = fwd  # gradients w.r.t. activations flow through every layer
    weight_grad = 2.0 * (matmul_params if full_finetune else trainable_matmul_params)
    recompute = recompute_fraction * fwd
    return fwd + input_grad + weight_grad + recompute


def peak_memory_gib(device: torch.device) -> dict:
    """Peak memory so far: CUDA allocator on GPU, process peak RSS on CPU. Lifetime peaks, kept across
    the per-phase resets of harness/memory/live.py (ru_maxrss, in KiB, is the fallback off Linux)."""
    from harness.memory import live

    rss_bytes = live.lifetime_peak_rss_bytes()
    out = {"peak_rss_gib": rss_bytes / 2**30}
    if device.type == "cuda":
        out["peak_allocated_gib"] = live.cuda_peak_bytes("allocated") / 2**30
        out["peak_reserved_gib"] = live.cuda_peak_bytes("reserved") / 2**30
    return out


def records_up_to(path: Path, step: int) -> tuple[list[str], int]:
    """The lines of a metrics.jsonl to keep when resuming from `step`: the step records up to it (the
    step-less ones, such as the data summary, are written again by the resumed run), and how many lines
    were not JSON objects."""
    kept, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not isinstance(record, dict):
            torn += 1
        elif record.get("step", step + 1) <= step:
            kept.append(line)
    return kept, torn


class MetricsLogger:
    """Writes one JSON object per logged step to output_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir: str, *, is_main: bool, total_steps: int, progress_bar: bool, wandb_cfg: dict | None, recipe_dict: dict,
                 resume_step: int = 0):
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            kept, torn = records_up_to(self.path, resume_step)
            if torn:  # a write cut short by a crash or a full disk: the rest of the file is still good
                print(f"{self.path}: dropped {torn} unreadable line(s) (a write cut short by a crash)", file=sys.stderr, flush=True)
            tmp = self.path.with_name(self.path.name + ".tmp")  # rewritten whole, then renamed: a crash here loses nothing
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        else:
            self.path.write_text("")
        self.file = self.path.open("a", buffering=1)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, file=sys.stderr)
        if wandb_cfg:
            wandb = _optional.require("wandb")
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # no key: keep the run on disk; the key is never printed
            self.wandb = wandb.init(project=wandb_cfg["project"], name=wandb_cfg.get("name") or None, dir=output_dir, config=recipe_dict)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
