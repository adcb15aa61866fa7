#!/usr/bin/env python
"""Export a harness run (the same as `harness-export`; `python tools/export.py --help` lists the options):
consolidated Hugging Face model, peft adapter, or LoRA merged into the base, each verified by logits.

    python tools/export.py RUN_DIR --format merged --out exported/ [--from latest|final|step_N|PATH] [--dtype bf16]
"""

from harness.export import cli

if __name__ == "__main__":
    cli()
