"""harness.config in-process: defaults < file < CLI precedence, strict keys, types, choices, validate()."""

from __future__ import annotations

import importlib.util
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from harness.config import ConfigError, SourceConfig, load_recipe, validate
from tests.helpers import REPO

ASSET = REPO / "harness" / "assets" / "tiny_instruct.jsonl"
DS_DIR = REPO / "ds_configs"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def line_of(path: Path, needle: str) -> int:
    """1-based line number of the first line containing `needle`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def base(model: Path, tmp_path: Path, *extra: str, ds: str = "zero3.json") -> list[str]:
    """Overrides giving a recipe that validates (tiny model, bundled data, absolute paths)."""
    return [
        f"model.path={model}",
        f"data.sources=[{{path: '{ASSET}', format: alpaca}}]",
        f"deepspeed.config={DS_DIR / ds}",
        f"output_dir={tmp_path / 'out'}",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        *extra,
    ]


def check(model, tmp_path, *extra, world_size=1, ds="zero3.json"):
    validate(load_recipe(None, base(model, tmp_path, *extra, ds=ds)), world_size)


def check_fails(model, tmp_path, *extra, world_size=1, ds="zero3.json") -> str:
    with pytest.raises(ConfigError) as e:
        check(model, tmp_path, *extra, world_size=world_size, ds=ds)
    return str(e.value)


# ------------------------------------------------------------------------------------------------
# Precedence and types
# ------------------------------------------------------------------------------------------------


def test_defaults_file_cli_precedence(tmp_path):
    f = write(tmp_path, """
        model:
          path: /models/from-file
        train:
          lr: 3.0e-3
          micro_batch_size: 4
          max_steps: 50
          min_lr_ratio: 2e-4          # YAML 1.1 reads this as a string; must still become a float
        lora:
          r: 8
        data:
          sources:
            - path: a.jsonl
              format: alpaca
            - path: b.jsonl
              format: text
              weight: 2
    """)
    r = load_recipe(str(f), [
        "train.lr=1e-3",
        "train.max_steps=7",
        "lora.target_modules=[q_proj,v_proj]",
        "data.sources.1.path=c.jsonl",
        "log.wandb=true",
    ])
    # defaults survive where neither file nor CLI speaks
    assert r.train.warmup_steps == 10 and r.eval.every_steps == 50 and r.method == "lora"
    assert r.deepspeed.config == "ds_configs/zero3.json"
    # the file beats the defaults
    assert r.model.path == "/models/from-file"
    assert r.train.micro_batch_size == 4 and type(r.train.micro_batch_size) is int
    assert r.lora.r == 8
    assert r.train.min_lr_ratio == pytest.approx(2e-4) and type(r.train.min_lr_ratio) is float
    assert all(isinstance(s, SourceConfig) for s in r.data.sources)
    assert r.data.sources[0].path == "a.jsonl"
    assert r.data.sources[1].weight == 2.0 and type(r.data.sources[1].weight) is float
    # the command line beats the file, with YAML-typed values
    assert r.train.lr == pytest.approx(1e-3) and type(r.train.lr) is float
    assert r.train.max_steps == 7 and type(r.train.max_steps) is int
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.sources[1].path == "c.jsonl" and r.data.sources[1].format == "text"  # only the path changed
    assert r.log.wandb is True


def test_cli_only_overrides():
    r = load_recipe(None, ["method=full", "train.precision=bf16", "freeze_layers=3", "lora.alpha=64"])
    assert (r.method, r.train.precision, r.freeze_layers, r.lora.alpha) == ("full", "bf16", 3, 64)


@pytest.mark.parametrize(
    "text, needle, key, suggestion",
    [
        ("train:\n  lr: 1.0e-4\n  lerning_rate: 1.0e-3\n", "lerning_rate", "train.lerning_rate", "train.lr"),
        ("method: lora\nlora:\n  rank: 8\n", "rank", "lora.rank", "lora.r"),
        ("model:\n  pth: /models/x\n", "pth", "model.pth", "model.path"),
        ("data:\n  sources:\n    - path: a.jsonl\n      formt: alpaca\n", "formt", "data.sources.0.formt", "data.sources.0.format"),
    ],
)
def test_unknown_key_in_file_names_file_line_key_and_suggestion(tmp_path, text, needle, key, suggestion):
    f = write(tmp_path, text, "my_recipe.yaml")
    with pytest.raises(ConfigError) as e:
        load_recipe(str(f), [])
    msg = str(e.value)
    assert f"my_recipe.yaml:{line_of(f, needle)}:" in msg, msg
    assert f"'{key}'" in msg and f"'{suggestion}'" in msg, msg


def test_unknown_key_on_command_line(tmp_path):
    f = write(tmp_path, "train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(str(f), ["train.lerning_rate=1e-3"])
    msg = str(e.value)
    assert "command-line override" in msg and "'train.lerning_rate'" in msg and "'train.lr'" in msg, msg
    assert "recipe.yaml" not in msg, msg  # the file is not to blame


@pytest.mark.parametrize("override", ["lora={rank: 4}", "data={sources: a.jsonl}"], ids=["unknown-key", "wrong-type"])
def test_error_inside_cli_mapping_blames_command_line(tmp_path, override):
    f = write(tmp_path, "train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(str(f), [override])
    assert "command-line override" in str(e.value), str(e.value)


def test_wrong_type_names_key(tmp_path):
    f = write(tmp_path, "train:\n  micro_batch_size: two\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(str(f), [])
    msg = str(e.value)
    assert "'train.micro_batch_size'" in msg and "int" in msg and "'two'" in msg, msg
    assert f"recipe.yaml:{line_of(f, 'micro_batch_size')}:" in msg, msg


@pytest.mark.parametrize(
    "override, key",
    [("train.lr=fast", "train.lr"), ("lora.r=1.5", "lora.r"), ("log.wandb=maybe", "log.wandb")],
)
def test_wrong_type_from_command_line(override, key):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, [override])
    assert f"'{key}'" in str(e.value) and "command-line override" in str(e.value), str(e.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_recipe(None, ["train.lr"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"), [])


# Overrides that address a list entry or a scalar that is not there must give a ConfigError (or work),
# never an IndexError / TypeError / ValueError traceback out of train.py.
@pytest.mark.parametrize(
    "overrides",
    [
        ["data.sources.0.path=x.jsonl"],  # no sources in the file: add the first one
        ["data.sources=[{path: a.jsonl}]", "data.sources.1.path=b.jsonl"],  # append a second one
    ],
    ids=["first-source", "append-source"],
)
def test_override_adds_list_entry(overrides):
    r = load_recipe(None, overrides)
    assert r.data.sources[-1].path == overrides[-1].split("=", 1)[1]
    assert r.data.sources[-1].format == "alpaca"  # the rest from SourceConfig defaults


@pytest.mark.parametrize(
    "overrides",
    [["train.lr=1", "train.lr.x=1"], ["data.sources=[{path: a.jsonl}]", "data.sources.x.path=b"]],
    ids=["through-scalar", "non-integer-index"],
)
def test_bad_override_path_is_config_error(overrides):
    with pytest.raises(ConfigError):
        load_recipe(None, overrides)


# ------------------------------------------------------------------------------------------------
# Choices
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("method=sft", ("full", "lora", "qlora", "int8")),
        ("train.precision=fp8", ("auto", "bf16", "fp16", "fp32")),
        ("train.gradient_checkpointing=partial", ("none", "full", "every_k")),
    ],
)
def test_invalid_choice_lists_allowed_values(override, allowed):
    with pytest.raises(ConfigError) as e:
        validate(load_recipe(None, [override]), 1)
    msg = str(e.value)
    key, value = override.split("=")
    assert key in msg and value in msg, msg
    assert all(a in msg for a in allowed), msg


# ------------------------------------------------------------------------------------------------
# validate()
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
def test_base_recipe_validates(tiny_llama, tmp_path, world_size):
    check(tiny_llama, tmp_path, world_size=world_size)


def test_model_path_empty(tiny_llama, tmp_path):
    assert "model.path is empty" in check_fails(tiny_llama, tmp_path, "model.path=")


def test_model_path_missing(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, f"model.path={tmp_path / 'no-model'}")
    assert str(tmp_path / "no-model") in msg and "does not exist" in msg


def test_model_dir_without_config_json(tiny_llama, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(tiny_llama) / "model.safetensors", d)
    assert "no config.json" in check_fails(tiny_llama, tmp_path, f"model.path={d}")


def test_model_dir_without_safetensors(tiny_llama, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(Path(tiny_llama) / "config.json", d)
    assert "safetensors" in check_fails(tiny_llama, tmp_path, f"model.path={d}")


def test_global_batch_divisible_by_micro_times_world(tiny_llama, tmp_path):
    check(tiny_llama, tmp_path, world_size=2)  # 8 = 2 x 2 x 2
    msg = check_fails(tiny_llama, tmp_path, world_size=3)  # 8 % (2 x 3) != 0
    assert "train.global_batch_size=8" in msg and "2 x 3" in msg and "multiple of 6" in msg, msg
    check(tiny_llama, tmp_path, "train.global_batch_size=12", world_size=3)
    msg = check_fails(tiny_llama, tmp_path, "train.micro_batch_size=3")
    assert "micro_batch_size" in msg and "multiple of 3" in msg, msg


def test_freeze_layers_needs_method_full(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, "freeze_layers=1")  # method defaults to lora
    assert "freeze_layers" in msg and "method=full" in msg, msg
    check(tiny_llama, tmp_path, "freeze_layers=1", "method=full")


def test_freeze_layers_must_leave_a_layer(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, "freeze_layers=2", "method=full")  # tiny model: 2 layers
    assert "freeze_layers=2" in msg and "below 2" in msg, msg


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
def test_int8_with_zero3_refused(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, "method=int8", ds="zero3.json")
    assert "int8" in msg and "ZeRO-3" in msg and "zero2.json" in msg, msg
    check(tiny_llama, tmp_path, "method=int8", ds="zero2.json")


def test_dataset_path_missing(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, f"data.sources.0.path={tmp_path / 'nope.jsonl'}")
    assert "data.sources.0.path" in msg and "nope.jsonl" in msg and "does not exist" in msg, msg


def test_val_path_missing(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, f"data.val_path={tmp_path / 'val.jsonl'}")
    assert "data.val_path" in msg and "val.jsonl" in msg, msg


def test_no_data_sources(tiny_llama, tmp_path):
    assert "data.sources is empty" in check_fails(tiny_llama, tmp_path, "data.sources=[]")


def test_deepspeed_config_missing(tiny_llama, tmp_path):
    msg = check_fails(tiny_llama, tmp_path, f"deepspeed.config={tmp_path / 'zero9.json'}")
    assert "zero9.json" in msg and "does not exist" in msg and "zero3.json" in msg, msg


def test_deepspeed_config_malformed_names_file_and_line(tiny_llama, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "train_batch_size": "auto",\n  "zero_optimization": {"stage": 3,}\n}\n')
    msg = check_fails(tiny_llama, tmp_path, f"deepspeed.config={bad}")
    assert f"{bad}:3:" in msg and "not valid JSON" in msg, msg


@pytest.mark.parametrize("key", ["train.micro_batch_size", "deepspeed.config"])
def test_empty_value_is_config_error(tiny_llama, tmp_path, key):
    section, leaf = key.split(".")
    f = write(tmp_path, f"{section}:\n  {leaf}:\n")  # a key with nothing after it: YAML null
    overrides = [o for o in base(tiny_llama, tmp_path) if not o.startswith(key + "=")]
    with pytest.raises(ConfigError) as e:
        validate(load_recipe(str(f), overrides), 1)
    assert key in str(e.value)


def test_ds_json_is_read_as_json(tiny_llama, tmp_path):
    """A user's own DeepSpeed file is accepted when it is valid JSON."""
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    check(tiny_llama, tmp_path, f"deepspeed.config={own}")


VAL = "data.val_fraction=0.1"


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["eval.generate_samples=-1"], ["eval.generate_samples", ">= 0"]),
        ([VAL, "eval.generate_samples=8", "eval.max_new_tokens=0"], ["eval.max_new_tokens", ">= 1"]),
        ([VAL, "eval.generate_samples=8", "eval.generate_batch_size=0"], ["eval.generate_batch_size", ">= 1"]),
        ([VAL, "eval.generate_samples=8", "eval.every_steps=0"], ["eval.generate_samples", "eval.every_steps=0", "set eval.every_steps"]),
        (["eval.batch_size=-2"], ["eval.batch_size", ">= 0", "train.micro_batch_size"]),
        ([VAL, "eval.generate_samples=8", "data.train_on_inputs=true"], ["data.train_on_inputs=true", "no prompt"]),
        ([VAL, "eval.generate_samples=8", "data.sources.0.format=text"], ["data.sources.0", "'text'", "no prompt"]),
        (["eval.generate_samples=8"], ["no validation data", "data.val_path"]),
    ],
    ids=["negative-samples", "no-new-tokens", "no-batch", "eval-off", "negative-eval-batch", "train-on-inputs", "text-format",
         "no-val-data"],
)
def test_generation_and_eval_settings_are_checked(tiny_llama, tmp_path, overrides, needles):
    msg = check_fails(tiny_llama, tmp_path, *overrides)
    assert all(n in msg for n in needles), msg


def test_generation_settings_that_make_sense_validate(tiny_llama, tmp_path):
    check(tiny_llama, tmp_path, VAL, "eval.generate_samples=8", "eval.generate_gather=false", "eval.batch_size=4")
