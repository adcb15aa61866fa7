"""ds_configs/*.json resolve against a recipe, and DeepSpeed's own parser accepts the result.

How DeepSpeedConfig gets its world size (deepspeed 0.19, runtime/config.py): it calls
`deepspeed.comm.get_rank()` / `get_world_size()` (or an `mpu`'s data-parallel size). With no
deepspeed.comm backend those assert, the assertion is caught, and it silently assumes world size 1 -
so a world-2 config would then *fail* its batch check (train_batch == micro * accum * world).
A real 1-rank gloo group needs `deepspeed.init_distributed`, whose TorchBackend JIT-loads the
shm comm extension under a torch_extensions file lock (20-35 s when other test runs hold it), and it
could only ever report world size 1. So the tests give the parser exactly what it reads: a `dist`
with get_rank() == 0 and get_world_size() == the world size the config was resolved for.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.config import ConfigError, load_ds_json, load_recipe, read_model_config, validate
from harness.deepspeed_config import resolve_ds_config
from tests.helpers import REPO

DS_FILES = sorted((REPO / "ds_configs").glob("*.json"))
ASSET = REPO / "harness" / "assets" / "tiny_instruct.jsonl"
MICRO, GLOBAL = 2, 8


@pytest.fixture
def ds_parse(monkeypatch):
    """DeepSpeedConfig(ds) as DeepSpeed would build it on a rank of a `world_size` group."""
    import deepspeed.runtime.config as ds_config_mod

    def parse(ds: dict, world_size: int):
        fake = SimpleNamespace(get_rank=lambda group=None: 0, get_world_size=lambda group=None: world_size)
        monkeypatch.setattr(ds_config_mod, "dist", fake)
        return ds_config_mod.DeepSpeedConfig(json.loads(json.dumps(ds)))

    return parse


def recipe_for(model: Path, ds_file: Path, *extra: str):
    return load_recipe(None, [
        f"model.path={model}",
        f"data.sources=[{{path: '{ASSET}'}}]",
        f"deepspeed.config={ds_file}",
        f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={GLOBAL}",
        *extra,
    ])


def resolve(recipe, ds: dict, world_size=1, precision="fp32", on_cuda=False, hidden=64):
    return resolve_ds_config(ds, recipe, world_size=world_size, hidden_size=hidden, precision=precision, on_cuda=on_cuda,
                             micro_batch_size=recipe.train.micro_batch_size, src="mine.json")


def auto_paths(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from auto_paths(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from auto_paths(v, f"{prefix}{i}.")
    elif node == "auto":
        yield prefix


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("ds_file", DS_FILES, ids=[p.stem for p in DS_FILES])
def test_shipped_ds_config_resolves(ds_parse, tiny_llama, ds_file, world_size, precision):
    recipe = recipe_for(tiny_llama, ds_file)
    validate(recipe, world_size)
    hidden = int(read_model_config(tiny_llama)["hidden_size"])
    raw = load_ds_json(str(ds_file))
    ds = resolve_ds_config(raw, recipe, world_size=world_size, hidden_size=hidden, precision=precision, on_cuda=False,
                           micro_batch_size=MICRO, src=str(ds_file))

    assert list(auto_paths(ds)) == []
    assert raw == load_ds_json(str(ds_file)) and "auto" in json.dumps(raw)  # the input is not modified
    accum = GLOBAL // (MICRO * world_size)
    assert ds["train_micro_batch_size_per_gpu"] == MICRO
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == GLOBAL == MICRO * accum * world_size
    assert ds["gradient_clipping"] == recipe.train.max_grad_norm
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is False

    zero, zraw = ds["zero_optimization"], raw.get("zero_optimization", {})
    derived = {
        "reduce_bucket_size": hidden * hidden,
        "allgather_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in derived.items():
        if zraw.get(key) == "auto":
            assert zero[key] == value, key
    for off in ("offload_optimizer", "offload_param"):
        if isinstance(zraw.get(off), dict) and zraw[off].get("pin_memory") == "auto":
            assert zero[off]["pin_memory"] is False  # no CUDA here

    # DeepSpeed's own parser: batch arithmetic for this world size, precision, ZeRO section.
    parsed = ds_parse(ds, world_size)
    assert parsed.world_size == world_size
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (GLOBAL, MICRO, accum)
    assert parsed.zero_optimization_stage == zraw.get("stage", 0)
    assert parsed.bfloat16_config.enabled is (precision == "bf16")
    if zraw.get("reduce_bucket_size") == "auto":
        assert parsed.zero_config.reduce_bucket_size == hidden * hidden


def test_deepspeed_parser_checks_world_size(ds_parse, tiny_llama):
    """The world size really reaches the parser: a world-2 config read as world 1 fails its batch check."""
    ds = resolve(recipe_for(tiny_llama, DS_FILES[0]), load_ds_json(str(DS_FILES[0])), world_size=2)
    with pytest.raises(AssertionError, match="train_batch_size"):
        ds_parse(ds, 1)


def test_pin_memory_follows_cuda(tiny_llama):
    f = REPO / "ds_configs" / "zero3_offload_all.json"
    ds = resolve(recipe_for(tiny_llama, f), load_ds_json(str(f)), on_cuda=True, precision="bf16")
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    assert ds["zero_optimization"]["offload_param"]["pin_memory"] is True


def test_matching_concrete_values_are_kept(tiny_llama):
    recipe = recipe_for(tiny_llama, DS_FILES[0])
    own = {"train_micro_batch_size_per_gpu": MICRO, "train_batch_size": GLOBAL, "gradient_clipping": 1, "zero_optimization": {"stage": 2}}
    ds = resolve(recipe, own)
    assert ds["gradient_accumulation_steps"] == GLOBAL // MICRO and ds["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize(
    "own, file_value, recipe_value",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4", "2"),
        ({"train_batch_size": 32}, "train_batch_size=32", "8"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1", "4"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=True", "False"),
    ],
    ids=["micro", "global", "accum", "bf16"],
)
def test_contradicting_value_names_both(tiny_llama, own, file_value, recipe_value):
    with pytest.raises(ConfigError) as e:
        resolve(recipe_for(tiny_llama, DS_FILES[0]), own, precision="fp32")
    msg = str(e.value)
    assert file_value in msg and f"recipe gives {recipe_value}" in msg and "mine.json" in msg, msg


@pytest.mark.parametrize("section,hint", [("scheduler", "train.lr_schedule"), ("optimizer", "train.lr")])
def test_optimizer_and_scheduler_sections_refused(tiny_llama, section, hint):
    """The harness builds both from the recipe; a section in the file would be silently ignored."""
    own = {section: {"type": "X", "params": {}}}
    with pytest.raises(ConfigError) as e:
        resolve(recipe_for(tiny_llama, DS_FILES[0]), own)
    assert f"'{section}'" in str(e.value) and hint in str(e.value)


def test_unknown_auto_is_refused(tiny_llama):
    own = {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}
    with pytest.raises(ConfigError) as e:
        resolve(recipe_for(tiny_llama, DS_FILES[0]), own)
    assert "zero_optimization.sub_group_size" in str(e.value)


def test_user_file_contradiction_through_prepare(tiny_llama, tmp_path, monkeypatch):
    """End to end through train.prepare(): the error names the user's file and both values."""
    from harness.train import prepare

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    own = tmp_path / "my_ds.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as e:
        prepare([
            "--config", str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"),
            f"model.path={tiny_llama}", f"data.sources.0.path={ASSET}", f"data.val_path={ASSET}",
            f"deepspeed.config={own}", "train.micro_batch_size=2", "method=lora",
        ])
    msg = str(e.value)
    assert str(own) in msg and "train_micro_batch_size_per_gpu=4" in msg and "recipe gives 2" in msg, msg
