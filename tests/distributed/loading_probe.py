"""Load a model the way training does under ZeRO-3 (streamed or Hugging Face path), measure each rank's
memory, and record what the loading tests and tools/bench_loading.py compare.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/distributed/loading_probe.py OUT_JSON \
        --config R [k=v ...]   (the recipe picks model.path, method, model.loader, deepspeed.config)

Per rank, OUT_JSON.rank<N>.json: peak RSS (ru_maxrss: the process's high-water mark, imports
included) before loading, after loading and after deepspeed.initialize; the load time; and the bytes
of this rank's ZeRO-3 shards. Rank 0 also writes OUT_JSON.logits.safetensors (logits of a fixed batch
through the engine) and OUT_JSON.packed.safetensors (every 4-bit weight gathered, as raw bytes).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


import torch


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> int:
    compare = "--no-compare" not in sys.argv
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and a != "--no-compare"]
    out = Path(argv[0])
    import deepspeed
    from safetensors.torch import save_file
    from transformers.integrations import HfDeepSpeedConfig

    from harness import distributed, train
    from harness import model as model_lib
    _args, recipe, plan, _model_cfg = train.prepare(argv[1:])
    dist = distributed.init_distributed()
    assert plan.zero_stage == 3, "the loading probe compares ZeRO-3 loaders"
    ds, precision, loader = plan.ds, plan.precision, plan.loader
    hf_ds = HfDeepSpeedConfig(ds) if loader == "hf" else None
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    model = model_lib.load_model(recipe, precision=precision, attn_implementation="eager", device=dist.device, loader=loader,
                                 ds_config=ds, lora_dropout=0.0)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_bytes()
    if hf_ds is None:
        hf_ds = HfDeepSpeedConfig(ds)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=0.0) if trainable else None,
                                      model_parameters=trainable or None, config=ds)
    rss_init = peak_rss_bytes()
    shard_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
    report = {"rank": dist.rank, "loader": loader, "method": recipe.method, "load_s": load_s, "peak_rss_before_load_bytes": rss_before,
              "peak_rss_after_load_bytes": rss_loaded, "peak_rss_after_initialize_bytes": rss_init, "shard_bytes": shard_bytes}
    Path(f"{out}.rank{dist.rank}.json").write_text(json.dumps(report, indent=1))

    if compare:
        vocab = int(engine.module.config.vocab_size)
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=ids.to(dist.device)).logits.float().cpu()
        packed = {}
        for name, p in engine.module.named_parameters():
            if type(p).__name__ == "Params4bit":
                with deepspeed.zero.GatheredParameters([p]):
                    if dist.is_main:
                        packed[name.replace("base_model.model.", "").replace(".base_layer", "")] = p.data.detach().cpu().view(torch.uint8).clone()
        if dist.is_main:
            save_file({"input_ids": ids, "logits": logits}, f"{out}.logits.safetensors")
            if packed:
                save_file(packed, f"{out}.packed.safetensors")
    distributed.barrier()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    from harness import distributed

    distributed.exit_process(main())  # skip the interpreter teardown that can abort after ZeRO-3
