#!/usr/bin/env python
"""Peak memory and time of loading a model for ZeRO-3 training: streamed (harness/loading.py) versus
Hugging Face's from_pretrained, each on N ranks (CPU gloo here; GPUs the same way).

    python tools/bench_loading.py [--layers 20 --hidden 2048 ...] [--method qlora] [--nproc 2]

Writes a random-weight Llama-shaped model (about 1B parameters by default, bf16, 500 MB safetensors
shards with an index) unless --model is given, then runs tests/distributed/loading_probe.py under the
DeepSpeed launcher once per loader and prints, per rank: peak RSS after loading and after
deepspeed.initialize (ru_maxrss, imports included), load time, and the bound the streamed loader must
meet: checkpoint bytes / ranks + 2 x the largest layer + 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

GIB = 2**30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_bytes(model_dir: Path) -> dict[str, int]:
    from safetensors import safe_open

    from harness import loading

    index = loading.checkpoint_index(model_dir)
    sizes: dict[str, int] = {}
    for unit, names in loading.units(list(index)).items():
        for name in names:
            with safe_open(str(index[name]), framework="pt") as f:
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                sizes[unit] = sizes.get(unit, 0) + numel * {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 4)
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="an existing model directory (else one is written)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_loading"))
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--method", default="qlora", choices=["qlora", "full", "lora"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--loaders", default="streamed,hf")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir = a.model
    if model_dir is None:
        model_dir = a.work / f"llama-{a.layers}x{a.hidden}"
        if not (model_dir / "config.json").is_file():
            from make_tiny_model import make_tiny_model

            print(f"writing a random model to {model_dir} ...", flush=True)
            make_tiny_model("llama-3.1-8b", model_dir, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                            intermediate=a.intermediate, dtype="bfloat16", max_shard_size="500MB")
    sizes = layer_bytes(model_dir)
    total = sum(sizes.values())
    bound = total / a.nproc + 2 * max(sizes.values()) + 1.5 * GIB
    print(f"model {model_dir}: {total / GIB:.2f} GiB on disk in {len(sizes)} units, largest {max(sizes.values()) / 2**20:.0f} MiB; "
          f"streamed bound per rank {bound / GIB:.2f} GiB")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    rows = []
    for loader in a.loaders.split(","):
        out = a.work / f"probe_{loader}_{a.method}"
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(a.nproc), "--master_port", str(free_port()),
               str(REPO / "tests" / "distributed" / "loading_probe.py"), str(out), "--config",
               str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), f"model.path={model_dir}", f"model.loader={loader}",
               f"method={a.method}", f"output_dir={a.work / 'run'}", "data.seq_len=64", "--no-compare"]
        print(f"{loader}: loading on {a.nproc} ranks ...", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        for r in range(a.nproc):
            rows.append(json.loads(Path(f"{out}.rank{r}.json").read_text()))
    print(f"\n| loader | rank | load s | peak RSS after load GiB | after initialize GiB | shard GiB | within bound ({bound / GIB:.2f} GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['rank']} | {r['load_s']:.1f} | {r['peak_rss_after_load_bytes'] / GIB:.2f} | "
              f"{r['peak_rss_after_initialize_bytes'] / GIB:.2f} | {r['shard_bytes'] / GIB:.3f} | "
              f"{'yes' if r['peak_rss_after_load_bytes'] <= bound else 'NO'} |")
    (a.work / "bench_loading.json").write_text(json.dumps({"model": str(model_dir), "bound_bytes": bound, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
