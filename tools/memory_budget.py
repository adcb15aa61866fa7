#!/usr/bin/env python
"""Per-GPU memory budget of a fine-tuning run, before launching it (the same as `harness-memory`;
`python tools/memory_budget.py --help` lists the options). The code is harness/memory/cli.py.

    python tools/memory_budget.py --model llama-3.1-70b --method qlora --seq-len 2048 --micro-batch 1 \
        --checkpointing full --zero-stage 3 --nodes 8 --gpus-per-node 8 --gpu-memory-gib 80
"""

from harness.memory.cli import cli

if __name__ == "__main__":
    cli()
