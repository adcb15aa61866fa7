"""Run the harness's own setup/fit/save under the launcher and record what tests need to check.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/distributed/probe_run.py OUT_JSON --config R [k=v ...]

Writes (rank 0) OUT_JSON with, per rank: every ZeRO-3 partitioned parameter's local and full element
counts (4-bit ones flagged); the bytes of activations saved for backward in one training forward with
the recipe's gradient checkpointing and with it switched off; and the final logits of a fixed batch
(in OUT_JSON's directory as logits.safetensors) for the round-trip test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


import torch
from safetensors.torch import save_file

from harness import data, distributed, export, train
from harness import model as model_lib


def shard_report(module: torch.nn.Module) -> list[dict]:
    rows = []
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):
            rows.append({
                "name": name,
                "local_numel": int(p.ds_tensor.numel()),
                "full_numel": int(p.ds_numel),
                "is_4bit": type(p).__name__ == "Params4bit" or getattr(p, "quant_state", None) is not None,
            })
    return rows


def saved_activation_bytes(engine, batch: dict) -> int:
    """Bytes of distinct tensor storages autograd keeps for backward during one forward.
    Checkpointed layers keep only their inputs, so this is the activation memory that
    gradient checkpointing is meant to lower. A backward follows so ZeRO-3 stays in step."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = train.token_loss_sum(engine, batch)
    engine.backward(loss * 0.0, scale_wrt_gas=False)  # gradients of zero: the trained state is untouched
    return sum(seen.values())


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it first
    out_json = Path(argv[0])
    _args, recipe, plan, model_cfg = train.prepare(argv[1:])
    run = train.setup(recipe, plan, model_cfg)
    dist = run.dist
    shards = shard_report(run.engine.module)
    last_step, _stopped = train.fit(run)

    # Logits of the trained model on a fixed batch (the first two validation samples, or training ones).
    samples = (run.val_set or run.train_set)[:2]
    batch = {k: v.to(dist.device) for k, v in data.collate(samples, run.pad_id).items()}
    run.engine.eval()
    with torch.no_grad():
        logits = run.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    run.engine.train()

    out = export.save_final(run.engine.module, run.tokenizer, recipe.output_dir, is_lora=recipe.method != "full", is_main=dist.is_main,
                                steps_trained=last_step)

    # Activation memory with the recipe's checkpointing policy, then with checkpointing off.
    act = {recipe.train.gradient_checkpointing: saved_activation_bytes(run.engine, batch)}
    if recipe.train.gradient_checkpointing != "none":
        base = run.engine.module.get_base_model() if hasattr(run.engine.module, "get_base_model") else run.engine.module
        base.gradient_checkpointing_disable()
        for layer in model_lib.decoder_layers(base):
            layer.gradient_checkpointing = False
        act["none"] = saved_activation_bytes(run.engine, batch)

    per_rank = [None] * dist.world_size
    torch.distributed.all_gather_object(per_rank, {"rank": dist.rank, "shards": shards, "activation_bytes": act})
    if dist.is_main:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        save_file({"logits": logits.cpu().contiguous(), "input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu()},
                  str(out_json.parent / "logits.safetensors"))
        out_json.write_text(json.dumps({"ranks": per_rank, "saved_dir": str(out), "last_step": last_step}, indent=1))
    run.log.close()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    from harness import distributed

    distributed.exit_process(main())  # skip the interpreter teardown that can abort after ZeRO-3
