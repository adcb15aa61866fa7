#!/usr/bin/env python
"""Export a harness run: consolidated Hugging Face model, peft adapter, or LoRA merged into the base.

    python tools/export.py RUN_DIR --format merged --out exported/ [--from latest|final|step_N|PATH] [--dtype bf16]
                           [--overwrite] [--trust-remote-code]

  --format hf       method=full runs: ZeRO-3 shards -> safetensors model directory
  --format adapter  lora/qlora/int8 runs: the LoRA weights in peft format
  --format merged   lora/qlora/int8 runs: base (dequantised when 4/8-bit) + LoRA folded in, a plain model
  --from            latest (default: newest verified checkpoint, else the final output), final
                    (RUN_DIR/adapter or RUN_DIR/model), step_N or N, or a checkpoint/adapter directory
  --dtype           dtype written (fp32 default); the checks always run in fp32
  --overwrite       write into an existing non-empty --out (never the base model or the run's own files)
  --trust-remote-code  needed to export a run whose recipe sets model.trust_remote_code (its code runs)

Each export verifies itself (logits on seeded random tokens, max difference <= 1e-5) and exits 1 if
a check fails; bad arguments exit 2. Runs on CPU; see harness/export.py for the memory it needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import export  # noqa: E402
from harness.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="the run's output_dir (holds recipe.yaml, checkpoints/, adapter/ or model/)")
    ap.add_argument("--format", required=True, choices=export.FORMATS)
    ap.add_argument("--out", required=True, help="directory to write (created)")
    ap.add_argument("--from", dest="which", default="latest", help="latest | final | step_N | N | a directory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out directory")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow the model directory's own Python code (needed when the run's recipe sets model.trust_remote_code)")
    a = ap.parse_args(argv)
    try:
        report = export.export(a.run_dir, a.format, a.out, which=a.which, dtype=a.dtype,
                               trust_remote_code=a.trust_remote_code, overwrite=a.overwrite)
    except (ValueError, ConfigError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    print(f"export: wrote {a.out} ({', '.join(f'{k}={v}' for k, v in report.items() if k.endswith('diff'))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
