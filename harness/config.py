"""Typed recipe configuration: defaults < recipe YAML < CLI `dotted.key=value` overrides.

Every key is checked: an unknown or misspelt key is a `ConfigError` naming the file, the line and the
nearest valid key. `validate()` checks everything that can be checked before any rank loads a model
(paths, dtypes, batch divisibility, method / quantisation / ZeRO combinations).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in a recipe or on the command line. The message names the problem and the fix."""


# --------------------------------------------------------------------------------------------------
# The recipe tree. Each field's comment is its documentation (see README "Recipes").
# --------------------------------------------------------------------------------------------------

METHODS = ("full", "lora", "qlora", "int8", "prompt_tuning")
TASKS = ("causal_lm", "classification")
EVAL_METRICS = ("loss", "accuracy", "f1")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CHECKPOINTING = ("auto", "none", "full", "every_k")
IntOrAuto = typing.Union[int, typing.Literal["auto"]]  # a whole number, or "auto" (decided by harness/plan.py)
LR_SCHEDULES = ("cosine", "linear", "constant")
ATTN_IMPLS = ("auto", "sdpa", "eager", "flash_attention_2")
DATA_FORMATS = ("alpaca", "completion", "text", "chat")
MIXING = ("weight", "temperature", "epochs")
KERNELS = ("rmsnorm", "rope", "swiglu", "linear_cross_entropy", "nf4")  # fused kernels (harness/kernels, README "Kernels")


@dataclass
class ModelConfig:
    path: str = ""  # local Hugging Face model directory (config.json + *.safetensors)
    attn_implementation: str = "auto"  # auto = flash_attention_2 when flash-attn imports on CUDA, else sdpa
    trust_remote_code: bool = False  # run the model directory's own Python code (off unless you trust it)
    loader: str = "auto"  # auto = streamed under ZeRO-3, else hf; streamed: layer by layer into ZeRO-3 shards; hf: from_pretrained


@dataclass
class LoraConfig:
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names (q_proj, v_proj, ...)


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20  # learned embeddings put before every sample (the only trained weights)
    init: str = "random"  # random | text: start from the embeddings of init_text's tokens (cut or repeated to fit)
    init_text: str = ""  # init=text: e.g. "Answer the question with one word."
    base_4bit: bool = False  # the frozen base in NF4 4-bit (as method=qlora quantises it); false: the compute dtype


@dataclass
class SourceConfig:
    path: str = ""  # local JSONL / JSON / Parquet / CSV file or a saved Arrow dataset directory (datasets.save_to_disk)
    format: str = "alpaca"  # alpaca | completion | text | chat (README "Data")
    weight: float = 0.0  # mixing weight (relative); 0 = unset: with no source weighted, each sample once per epoch
    epochs: float = 1.0  # data.mixing=epochs: passes over this source per epoch of the mix (fractions allowed)
    columns: dict = field(default_factory=dict)  # rename map: {expected_name: name_in_file}
    val_path: str = ""  # this source's own validation file (same format and columns); else data.val_path / val_fraction


@dataclass
class DataConfig:
    sources: list = field(default_factory=list)  # list of SourceConfig
    val_path: str = ""  # separate validation file (same format and columns as the first source)
    val_fraction: float = 0.0  # or hold out this fraction of each source that has no val_path of its own
    seq_len: int = 512  # tokens per sample (per packed row with packing)
    overlong: str = "truncate"  # truncate | drop: samples longer than seq_len (counted either way)
    train_on_inputs: bool = False  # true: loss on prompt tokens too
    on_error: str = "raise"  # raise | skip: a malformed row is an error naming file:line, or skipped and counted
    chat_template: str = "auto"  # auto = the tokenizer's chat template when it has one, else the built-in one | builtin
    mixing: str = "weight"  # weight | temperature | epochs: how many samples each source puts in one epoch of the mix
    temperature: float = 1.0  # mixing=temperature: p_i ~ weight_i (1 if unset) * rows_i^(1/T); 1 = by size, large = uniform
    num_samples: int = 0  # samples in one epoch of the mix (weight / temperature); 0 = all sources' rows together
    packing: bool = False  # concatenate samples into rows of seq_len (position ids restart per sample, no cross-attention)
    padding_free: bool = False  # no packing: each micro-batch becomes one unpadded row (position ids restart per sample)
    group_by_length: bool = False  # padded batches: put samples of similar length in the same micro-batch
    cache_dir: str = ""  # tokenised-data cache shared by all ranks; "" = <output_dir>/data_cache
    # task=classification: the class names, in the order of the head's outputs; each row's `label` is one
    # of them (or its index). Rows are {text, label} (format text; rename with columns)
    labels: list = field(default_factory=list)


@dataclass
class TrainConfig:
    seed: int = 0
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; bf16 | fp16 | fp32
    micro_batch_size: IntOrAuto = 1  # samples per rank per forward; auto = the largest the memory budget fits (harness/plan.py)
    global_batch_size: int = 8  # samples per optimizer step = micro_batch_size * grad_accum * world_size
    max_steps: int = 100  # optimizer steps
    lr: float = 2e-4
    lr_schedule: str = "cosine"  # cosine | linear | constant (each after a linear warmup)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 disables
    # auto = the least recomputation the memory budget fits: none, every_k (largest k first), full (harness/plan.py)
    gradient_checkpointing: str = "none"  # auto | none | full | every_k (non-reentrant)
    checkpoint_every_k: int = 2  # with every_k: recompute every k-th decoder layer
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = known GPU table, none on CPU
    memory_check: bool = True  # on CUDA, refuse to start when the memory budget (harness/memory) says it will not fit


@dataclass
class EvalConfig:
    every_steps: int = 50  # eval at step 0, every N steps and at the end; 0 disables eval
    max_samples: int = 0  # evaluate on the first N validation samples (all ranks together); 0 = all
    batch_size: int = 0  # validation samples per rank per forward; 0 = train.micro_batch_size (its logits are batch x seq x vocab)
    early_stopping_patience: int = 0  # stop after this many evals without improvement; 0 = off
    early_stopping_min_delta: float = 0.0
    generate_samples: int = 0  # with each eval, greedy answers to the first N validation prompts, scored by exact match; 0 = off
    max_new_tokens: int = 32  # longest greedy answer, in tokens
    generate_batch_size: int = 16  # prompts per generate() call on a rank (left-padded)
    generate_gather: bool = True  # ZeRO-3: gather the whole model on each rank for generation (fast); false: layer by layer per token
    metric: str = "loss"  # what early stopping watches: loss (lower is better) | accuracy | f1 (macro; task=classification)


@dataclass
class LogConfig:
    every_steps: int = 1
    progress_bar: bool = True  # tqdm on rank 0
    wandb: bool = False  # offline when WANDB_API_KEY is not set
    wandb_project: str = "harness"
    wandb_run_name: str = ""
    memory_every_steps: int = 50  # per-category memory footprint at step 1 and every N steps (0 = off); memory_report.md at the end
    # CUDA: record the allocator's history from start-up; memory_snapshot_rank{R}.pickle after step 1 and on out-of-memory
    memory_snapshot: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save a resumable checkpoint every N optimizer steps; 0 = off
    every_minutes: float = 0.0  # and/or every M minutes; 0 = off
    keep_last: int = 2  # complete checkpoints kept (older ones are deleted after a new one is complete)
    resume: str = "auto"  # auto: newest valid checkpoint in output_dir (or start fresh); none; or a checkpoint path
    verify: str = "sha256"  # sha256: every byte | size: sizes, a sampled hash and a bounds check of the loaded state (huge checkpoints)
    max_runtime_minutes: float = 0.0  # save and exit (code 75) this long after start; 0 = off
    exit_margin_minutes: float = 0.0  # ...that many minutes earlier (time to write the checkpoint)


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3.json"  # a JSON file; "auto" values are filled from this recipe


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    # causal_lm: next-token loss on the targets; classification: transformers' *ForSequenceClassification
    # head (a linear "score" layer on each sample's last token) over data.labels, always trained and saved
    task: str = "causal_lm"
    method: str = "lora"  # full | lora | qlora (NF4 4-bit base + LoRA) | int8 (8-bit base + LoRA) | prompt_tuning (soft prompt)
    freeze_layers: int = -1  # full only: train decoder layers >= K (and the head); -1 = off
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)  # method=prompt_tuning (peft PromptTuningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    kernels: Any = field(default_factory=list)  # fused kernels to switch in: a list of KERNELS names, or "all"; [] = none
    output_dir: str = "runs/default"


# Fields whose value is a list of nested dataclasses.
_LIST_OF = {("data", "sources"): SourceConfig}


# --------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, strict keys, dotted overrides.
# --------------------------------------------------------------------------------------------------


def _yaml_with_lines(text: str, origin: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of each dotted key (for error messages)."""
    try:
        # Anchors and aliases are refused before anything is built: each alias copies its node when the
        # tree is constructed, so a few hundred bytes of nested aliases expand to gigabytes ("billion laughs").
        alias = next((t for t in yaml.scan(text) if isinstance(t, (yaml.AliasToken, yaml.AnchorToken))), None)
        if alias is not None:
            raise ConfigError(f"{origin}:{alias.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                              "supported in recipes; write the values out")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from e
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                if key in lines:  # YAML keeps the last of two equal keys without a word: a lost block
                    raise ConfigError(f"{origin}:{k.start_mark.line + 1}: '{key}' is set twice (first at line {lines[key]}); "
                                      "merge the two into one")
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix}{i}.")

    walk(node, "")
    return data, lines


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Names other tools use for our keys: suggested when a recipe uses them.
_ALIASES = {
    "learning_rate": "lr", "batch_size": "micro_batch_size", "micro_batch": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "global_batch_size",
    "steps": "max_steps", "num_steps": "max_steps", "max_seq_len": "seq_len", "seq_length": "seq_len",
    "max_length": "seq_len", "sequence_len": "seq_len", "rank": "r", "lora_r": "r", "lora_alpha": "alpha",
    "dtype": "precision", "torch_dtype": "precision", "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    names = [v.rsplit(".", 1)[-1] for v in valid]
    aliases = {a: c for a, c in _ALIASES.items() if c in names}
    close = difflib.get_close_matches(leaf, names + list(aliases), n=1, cutoff=0.5)
    close = [aliases.get(c, c) for c in close]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(v.rsplit('.', 1)[-1] for v in valid)}"
    return ConfigError(f"{where}unknown key '{key}'; {hint}")


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check a scalar against its declared type; ints are accepted where floats are expected."""
    if typ is Any:
        return value
    if typ == IntOrAuto:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}key '{key}' must be int (a whole number) or auto, got {value!r}")
    if value is None:
        raise ConfigError(f"{where}key '{key}' has no value; set it or remove the line")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ in (list, dict) or typing.get_origin(typ) in (list, dict):
        base = typing.get_origin(typ) or typ
        if isinstance(value, base):
            return value
    else:
        return value
    tname = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{where}key '{key}' must be {tname}, got {value!r}")


def _line_of(dotted: str, lines: dict[str, int]) -> int | None:
    """Line of a key, or of its nearest recorded parent (0 = set on the command line)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:n]))
        if line is not None:
            return line
    return None


def _build(cls, data: Any, prefix: str, lines: dict[str, int], origin: str):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    valid = [f"{prefix}{n}" for n in types_]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        line = _line_of(dotted, lines)
        where = "command-line override: " if line == 0 else f"{origin}:{line}: " if line else f"{origin}: "
        if key not in types_:
            raise _unknown_key(dotted, valid, where)
        typ = types_[key]
        path = tuple(dotted.split("."))
        if path in _LIST_OF:
            if not isinstance(value, list):
                raise ConfigError(f"{where}key '{dotted}' must be a list")
            kwargs[key] = [_build(_LIST_OF[path], v, f"{dotted}.{i}.", lines, origin) for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, dotted + ".", lines, origin)
        else:
            kwargs[key] = _coerce(value, typ, dotted, where)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a nested dict/list tree, creating mappings and list entries on the way."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"command-line override '{dotted}': '{part}' must be a list index (0, 1, ...)")
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = [] if parts[i + 1].isdigit() else {}
                node = node[part]
        else:
            parent = ".".join(parts[:i])
            raise ConfigError(f"command-line override '{dotted}': '{parent}' is a value, not a section")


def load_recipe(path: str | None, overrides: list[str] = ()) -> Recipe:
    """Defaults < recipe file < `dotted.key=value` overrides (values parsed as YAML scalars)."""
    tree: dict = {}
    lines: dict[str, int] = {}
    origin = "command line"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file '{path}' does not exist; pass --config harness/recipes/NAME.yaml")
        origin = str(p)
        tree, lines = _yaml_with_lines(p.read_text(), origin)
        tree = tree or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
        lines[key.strip()] = 0  # 0 = from the command line
    return _build(Recipe, tree, "", lines, origin)


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Validation: everything checkable without loading a model.
# --------------------------------------------------------------------------------------------------


def _choice(value: str, allowed: tuple, key: str) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{key}: {value}' is not one of {', '.join(allowed)}{hint}")


SHIPPED_MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_MODEL_CONFIGS.glob("*.json"))


def find_model_config(spec: str) -> Path | None:
    """The config.json a model spec names: a config.json path, a model directory holding one, or a
    shipped architecture name from harness/model_configs (None when it is none of these)."""
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return p
    shipped = SHIPPED_MODEL_CONFIGS / f"{spec}.json"
    return shipped if shipped.is_file() else None


# What the harness reads from a model's config.json (the Llama / Mistral / Qwen2 decoder layout).
# The linear layers of every decoder layer in the Llama / Mistral / Qwen2 layout (LoRA's targets)
DECODER_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def read_model_config(model_path: str) -> dict:
    """The model's config.json as a dict (no weights are read)."""
    path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); restore the model's config.json") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); restore the model's config.json") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: must be a JSON object, got {type(cfg).__name__}; restore the model's config.json")
    return cfg


# A fast tokenizer file or a sentencepiece / BPE vocabulary: one must be in the model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def check_safetensors_file(path: Path) -> None:
    """The header of a .safetensors file (8-byte length, JSON) and that the file holds all the bytes its
    header lists: a truncated copy or a corrupt download, named before minutes of loading."""
    fix = "copy or download that file again"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ConfigError(f"{path}: not a safetensors file (header length {n}, file {size} bytes); {fix}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: corrupt safetensors header ({e}); {fix}") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ConfigError(f"{path}: truncated ({size} bytes, its header lists {need}); {fix}")


def check_model_config(cfg: dict, model_path: str) -> None:
    """A decoder-only model of the kind the harness builds (Llama, Mistral, Qwen2 and their relatives)."""
    missing = [k for k in MODEL_CONFIG_KEYS if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] <= 0]
    if missing:
        kind = cfg.get("model_type", "unknown")
        raise ConfigError(f"{Path(model_path) / 'config.json'}: model_type '{kind}' lacks {', '.join(missing)}; the harness trains "
                          "Llama-style decoders (llama, mistral, qwen2, ...): point model.path at one of those")


def load_ds_json(path: str) -> dict:
    """A DeepSpeed JSON file; a relative path that is not under the working directory is looked up in
    the repository's ds_configs/ too (recipes name `ds_configs/zero3.json`; the CLIs run from anywhere)."""
    p = Path(path)
    beside_repo = Path(__file__).resolve().parent.parent / p
    if not p.is_file() and not p.is_absolute() and beside_repo.is_file():
        p = beside_repo
    if not p.is_file():
        shipped = sorted(x.name for x in (Path(__file__).resolve().parent.parent / "ds_configs").glob("*.json"))
        raise ConfigError(
            f"deepspeed.config '{path}' does not exist; use one of ds_configs/{{{','.join(shipped)}}} or your own file"
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e


def validate(recipe: Recipe, world_size: int) -> None:
    """Raise ConfigError on the first problem. Runs on every rank before any model is loaded; each
    section below checks one part of the recipe, in the order a user reads it."""
    _validate_choices(recipe)
    model_cfg = _validate_model_dir(recipe.model.path)
    _validate_method(recipe, model_cfg)
    _validate_deepspeed(recipe)
    _validate_checkpoint(recipe.checkpoint)
    _validate_batch_and_log(recipe, world_size)
    _validate_data(recipe.data)
    _validate_task(recipe)
    _validate_prompt_tuning(recipe)
    _validate_eval(recipe)


def _validate_choices(recipe: Recipe) -> None:
    """Every key whose value is one of a fixed set, and the kernel names."""
    _choice(recipe.method, METHODS, "method")
    _choice(recipe.train.precision, PRECISIONS, "train.precision")
    _choice(recipe.train.gradient_checkpointing, CHECKPOINTING, "train.gradient_checkpointing")
    _choice(recipe.train.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
    _choice(recipe.model.attn_implementation, ATTN_IMPLS, "model.attn_implementation")
    _choice(recipe.model.loader, ("auto", "streamed", "hf"), "model.loader")
    _choice(recipe.data.on_error, ("raise", "skip"), "data.on_error")
    _choice(recipe.data.overlong, ("truncate", "drop"), "data.overlong")
    _choice(recipe.data.chat_template, ("auto", "builtin"), "data.chat_template")
    _choice(recipe.data.mixing, MIXING, "data.mixing")
    from harness.plan import resolve_kernels  # (that module imports this one)

    kernels, explicit = resolve_kernels(recipe.kernels)
    if explicit and "nf4" in kernels and quantisation(recipe) != "qlora":
        raise ConfigError(f"kernel nf4 dequantises 4-bit weights: it needs method=qlora (not {recipe.method}); drop nf4 from kernels")


def _validate_model_dir(mp: str) -> dict:
    """A local Hugging Face model directory the harness can train; returns its config.json."""
    if not mp:
        raise ConfigError("model.path is empty; set it to a local Hugging Face model directory (model.path=/path/to/model)")
    if not Path(mp).is_dir():
        raise ConfigError(f"model.path '{mp}' does not exist; point model.path at a local Hugging Face model directory")
    if not (Path(mp) / "config.json").is_file():
        raise ConfigError(f"model.path '{mp}' has no config.json; it must be a Hugging Face model directory")
    if not any(Path(mp).glob("*.safetensors")):
        raise ConfigError(f"model.path '{mp}' has no *.safetensors weights; convert the checkpoint to safetensors")
    for shard in sorted(Path(mp).glob("*.safetensors")):
        check_safetensors_file(shard)
    if not any((Path(mp) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model.path '{mp}' has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer files "
                          "of the model it was trained from into it")
    model_cfg = read_model_config(mp)
    check_model_config(model_cfg, mp)
    return model_cfg


def _validate_method(recipe: Recipe, model_cfg: dict) -> None:
    """The method's libraries, layer freezing and the LoRA settings."""
    n_layers = model_cfg["num_hidden_layers"]
    if quantisation(recipe) is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"method '{recipe.method}' needs bitsandbytes; pip install 'bitsandbytes>=0.45' or set method=lora")
    if recipe.method != "full" and importlib.util.find_spec("peft") is None:
        raise ConfigError(f"method '{recipe.method}' needs peft; pip install 'peft>=0.13' or set method=full")
    if recipe.freeze_layers >= 0:
        if recipe.method != "full":
            raise ConfigError("freeze_layers applies to method=full only; remove it or set method=full")
        if recipe.freeze_layers >= n_layers:
            raise ConfigError(f"freeze_layers={recipe.freeze_layers} freezes all {n_layers} layers; use a value below {n_layers}")
    if recipe.lora.r <= 0:
        raise ConfigError(f"lora.r must be positive, got {recipe.lora.r}")
    if not recipe.lora.alpha > 0:
        raise ConfigError(f"lora.alpha must be positive (the update is scaled by alpha / r), got {recipe.lora.alpha}")
    if not 0.0 <= recipe.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout is a probability in [0, 1), got {recipe.lora.dropout}")
    if not (recipe.lora.target_modules == "all-linear" or isinstance(recipe.lora.target_modules, list)):
        raise ConfigError("lora.target_modules must be 'all-linear' or a list of module names like [q_proj, v_proj]")
    if recipe.method != "full" and isinstance(recipe.lora.target_modules, list):
        # peft would fail only after the model has loaded ("Target modules ... not found")
        known = (*DECODER_LINEAR_NAMES, "lm_head", "embed_tokens")
        for name in recipe.lora.target_modules:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(f"lora.target_modules: '{name}' is not a layer of a {model_cfg.get('model_type', 'Llama-style')} decoder; "
                                  f"{hint}use some of {', '.join(known)}, or all-linear")


def _validate_deepspeed(recipe: Recipe) -> None:
    """The DeepSpeed file's keys and stage, and what the method allows with them."""
    ds = load_ds_json(recipe.deepspeed.config)
    from harness.deepspeed_config import check_ds_config, zero_stage  # (that module imports this one)

    check_ds_config(ds, recipe.deepspeed.config)
    stage = zero_stage(ds)
    if recipe.method == "int8" and stage == 3:
        raise ConfigError(
            "method=int8 with ZeRO-3 is refused: an 8-bit base under ZeRO-3 trains on a wrong loss "
            "(bitsandbytes#1451); use deepspeed.config=ds_configs/zero2.json or method=qlora"
        )
    if recipe.train.precision == "fp16" and quantisation(recipe) == "qlora":
        raise ConfigError("method=qlora computes in bf16 or fp32; set train.precision=bf16 (GPU) or fp32 (CPU)")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _choice(c.verify, ("sha256", "size"), "checkpoint.verify")
    if c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ConfigError(f"checkpoint.resume '{c.resume}' is not a directory; use auto, none or a checkpoints/step_N directory")
    if c.every_steps < 0 or c.every_minutes < 0 or c.keep_last < 1:
        raise ConfigError("checkpoint.every_steps / every_minutes must be >= 0 and checkpoint.keep_last >= 1")
    if c.max_runtime_minutes < 0 or c.exit_margin_minutes < 0:
        raise ConfigError("checkpoint.max_runtime_minutes and exit_margin_minutes must be >= 0 (0 = off)")
    if c.max_runtime_minutes > 0 and c.exit_margin_minutes >= c.max_runtime_minutes:
        raise ConfigError(f"checkpoint.exit_margin_minutes={c.exit_margin_minutes:g} leaves no time to train in "
                          f"checkpoint.max_runtime_minutes={c.max_runtime_minutes:g}; use a margin below the run time")


def _validate_batch_and_log(recipe: Recipe, world_size: int) -> None:
    """Batch arithmetic for this world size, the optimizer's numbers, output_dir and log cadences."""
    t = recipe.train
    for key in ("micro_batch_size", "global_batch_size", "max_steps"):
        if getattr(t, key) != "auto" and getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(t, key)}")
    per_step = (t.micro_batch_size if t.micro_batch_size != "auto" else 1) * world_size
    if t.global_batch_size % per_step and t.micro_batch_size == "auto":
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by the world size {world_size} "
                          f"(train.micro_batch_size is auto); pick a multiple of {world_size}")
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x world_size = "
            f"{t.micro_batch_size} x {world_size}; pick a global batch that is a multiple of {per_step}"
        )
    if t.gradient_checkpointing == "every_k" and t.checkpoint_every_k < 1:
        raise ConfigError("train.checkpoint_every_k must be >= 1")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _validate_optimizer(t)
    if not recipe.output_dir.strip():
        raise ConfigError("output_dir is empty (the run would write into the working directory); set output_dir=runs/NAME")
    lg = recipe.log
    if lg.every_steps < 1:
        raise ConfigError(f"log.every_steps must be >= 1 (log every N optimizer steps), got {lg.every_steps}")
    if lg.memory_every_steps < 0:
        raise ConfigError(f"log.memory_every_steps must be >= 0 (0 = off), got {lg.memory_every_steps}")


def _validate_data(d: DataConfig) -> None:
    """Sources, validation data, lengths and the mixing settings."""
    if not d.sources:
        raise ConfigError("data.sources is empty; add at least one {path, format} entry")
    for i, src in enumerate(d.sources):
        _choice(src.format, DATA_FORMATS, f"data.sources.{i}.format")
        if not src.path or not Path(src.path).exists():
            raise ConfigError(f"data.sources.{i}.path '{src.path}' does not exist; fix the path or generate it (python tools/make_dataset.py)")
        if src.weight < 0:
            raise ConfigError(f"data.sources.{i}.weight must be positive, got {src.weight}")
        if src.epochs <= 0:
            raise ConfigError(f"data.sources.{i}.epochs must be positive, got {src.epochs}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in src.columns.items()):
            raise ConfigError(f"data.sources.{i}.columns must map names to names, e.g. {{instruction: question, output: answer}}")
        if src.val_path and not Path(src.val_path).exists():
            raise ConfigError(f"data.sources.{i}.val_path '{src.val_path}' does not exist; fix the path or remove it")
    if d.val_path and not Path(d.val_path).exists():
        raise ConfigError(f"data.val_path '{d.val_path}' does not exist; fix the path or use data.val_fraction")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.val_path and d.val_fraction > 0:
        raise ConfigError("data.val_path and data.val_fraction both set; use a validation file or a held-out fraction, not both")
    if d.seq_len < 8:
        raise ConfigError(f"data.seq_len={d.seq_len} is too small")
    if d.temperature <= 0:
        raise ConfigError(f"data.temperature must be positive, got {d.temperature}")
    if d.num_samples < 0:
        raise ConfigError(f"data.num_samples must be >= 0, got {d.num_samples}")
    weighted = [src.weight > 0 for src in d.sources]
    if d.mixing == "weight" and any(weighted) and not all(weighted):
        i = weighted.index(False)
        raise ConfigError(f"data.sources.{i}.weight is not set while other sources have one; weight every source or none (none = each sample once)")
    if d.mixing == "epochs" and d.num_samples:
        raise ConfigError("data.num_samples sizes weight/temperature mixing; with data.mixing=epochs set data.sources.N.epochs instead")
    if d.packing and d.padding_free:
        raise ConfigError("data.packing and data.padding_free are alternatives; set one of them")
    if d.group_by_length and d.packing:
        raise ConfigError("data.group_by_length does nothing with data.packing (every packed row is seq_len long); remove one")


def _validate_task(recipe: Recipe) -> None:
    """What task=classification needs, and what it cannot be combined with."""
    _choice(recipe.task, TASKS, "task")
    _choice(recipe.eval.metric, EVAL_METRICS, "eval.metric")
    d, labels = recipe.data, recipe.data.labels
    if recipe.task != "classification":
        if labels:
            raise ConfigError("data.labels names the classes of task=classification, but task is causal_lm; set task=classification "
                              "or remove data.labels")
        if recipe.eval.metric != "loss":
            raise ConfigError(f"eval.metric={recipe.eval.metric} scores a classifier's predictions; with task=causal_lm use eval.metric=loss")
        return
    if not isinstance(labels, list) or len(labels) < 2:
        raise ConfigError(f"task=classification needs at least two classes in data.labels (got {labels!r}); list them in the "
                          "head's output order, e.g. data.labels=[negative, neutral, positive]")
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise ConfigError(f"data.labels must be class names (non-empty text), got {labels!r}")
    if len(set(labels)) != len(labels):
        twice = next(x for x in labels if labels.count(x) > 1)
        raise ConfigError(f"data.labels lists '{twice}' twice; each class once")
    for i, src in enumerate(d.sources):
        if src.format != "text":
            raise ConfigError(f"data.sources.{i}.format is '{src.format}', but task=classification reads rows {{text, label}}; "
                              f"set data.sources.{i}.format=text (and map other column names with data.sources.{i}.columns)")
    _refuse_rows_and_fused_loss(recipe, "the classification head scores one token per row (transformers' sequence-classification pooling)",
                                "fuses the LM head with the next-token loss; task=classification has no LM head (its head has "
                                "len(data.labels) outputs)")
    if recipe.eval.generate_samples:
        raise ConfigError("eval.generate_samples scores generated answers; task=classification predicts a label (eval reports "
                          "accuracy and macro-F1); set eval.generate_samples=0")


def _refuse_rows_and_fused_loss(recipe: Recipe, rows_why: str, fused_why: str) -> None:
    """What one sample per row, or per-position targets, cannot be combined with: packing or padding_free
    (several samples in a row), and the fused linear + cross-entropy kernel."""
    d = recipe.data
    if d.packing or d.padding_free:
        raise ConfigError(f"data.{'packing' if d.packing else 'padding_free'} puts several samples in one row, but {rows_why}; set it false")
    from harness.plan import resolve_kernels  # (that module imports this one)

    kernels, explicit = resolve_kernels(recipe.kernels)
    if explicit and "linear_cross_entropy" in kernels:
        raise ConfigError(f"kernel linear_cross_entropy {fused_why}; drop linear_cross_entropy from kernels")


def quantisation(recipe: Recipe) -> str | None:
    """How the frozen base is quantised: "qlora" (NF4 4-bit), "int8", or None (the compute dtype)."""
    if recipe.method in ("qlora", "int8"):
        return recipe.method
    if recipe.method == "prompt_tuning" and recipe.prompt_tuning.base_4bit:
        return "qlora"
    return None


def _validate_prompt_tuning(recipe: Recipe) -> None:
    pt = recipe.prompt_tuning
    if recipe.method != "prompt_tuning":
        return
    if pt.num_virtual_tokens < 1:
        raise ConfigError(f"prompt_tuning.num_virtual_tokens must be >= 1 (learned tokens before each sample), got {pt.num_virtual_tokens}")
    _choice(pt.init, ("random", "text"), "prompt_tuning.init")
    if pt.init == "text" and not pt.init_text.strip():
        raise ConfigError("prompt_tuning.init=text starts the prompt from prompt_tuning.init_text, which is empty; set it "
                          "(e.g. prompt_tuning.init_text='Answer the question.') or use prompt_tuning.init=random")
    _refuse_rows_and_fused_loss(recipe, "method=prompt_tuning puts its virtual tokens once before each row (later samples would not "
                                "see them)", f"takes its targets position by position, and method=prompt_tuning adds {pt.num_virtual_tokens} "
                                "virtual positions before them")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_optimizer(t: TrainConfig) -> None:
    if not (_finite(t.lr) and t.lr > 0):
        raise ConfigError(f"train.lr must be a positive finite number (e.g. 2.0e-4), got {t.lr}")
    for key in ("weight_decay", "max_grad_norm"):
        if not (_finite(getattr(t, key)) and getattr(t, key) >= 0):
            raise ConfigError(f"train.{key} must be a finite number >= 0, got {getattr(t, key)}")
    if not (_finite(t.min_lr_ratio) and 0.0 <= t.min_lr_ratio <= 1.0):
        raise ConfigError(f"train.min_lr_ratio is a fraction of train.lr in [0, 1], got {t.min_lr_ratio}")
    betas = t.adam_betas
    if not (isinstance(betas, list) and len(betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")


def _validate_eval(recipe: Recipe) -> None:
    e, d = recipe.eval, recipe.data
    for key in ("every_steps", "max_samples", "early_stopping_patience"):
        if getattr(e, key) < 0:
            raise ConfigError(f"eval.{key} must be >= 0 (0 = off / all), got {getattr(e, key)}")
    if not (_finite(e.early_stopping_min_delta) and e.early_stopping_min_delta >= 0):
        raise ConfigError(f"eval.early_stopping_min_delta must be a finite number >= 0, got {e.early_stopping_min_delta}")
    has_val = bool(d.val_path or d.val_fraction > 0 or any(src.val_path for src in d.sources))
    # (with eval.every_steps=0 the user turned eval, and so early stopping, off: that is no error)
    if e.early_stopping_patience and e.every_steps > 0 and not has_val:
        raise ConfigError("eval.early_stopping_patience stops on the validation loss, but there is no validation data; "
                          "set data.val_path or data.val_fraction, or eval.early_stopping_patience=0")
    if e.batch_size < 0:
        raise ConfigError(f"eval.batch_size must be >= 0 (0 = train.micro_batch_size), got {e.batch_size}")
    if e.generate_samples < 0:
        raise ConfigError(f"eval.generate_samples must be >= 0 (0 = no greedy answers), got {e.generate_samples}")
    if not e.generate_samples:
        return
    if e.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens must be >= 1, got {e.max_new_tokens}")
    if e.generate_batch_size < 1:
        raise ConfigError(f"eval.generate_batch_size must be >= 1, got {e.generate_batch_size}")
    if e.every_steps <= 0:
        raise ConfigError("eval.generate_samples answers prompts at each eval, but eval.every_steps=0 turns eval off; set eval.every_steps")
    if not (d.val_path or d.val_fraction > 0 or any(src.val_path for src in d.sources)):
        raise ConfigError("eval.generate_samples answers validation prompts, but there is no validation data; "
                          "set data.val_path or data.val_fraction, or eval.generate_samples=0")
    # An answer is scored against what follows its prompt; where every token is learned there is no prompt.
    if d.train_on_inputs:
        raise ConfigError("eval.generate_samples scores the answer after each prompt, but data.train_on_inputs=true learns the "
                          "prompt too (no prompt is left to answer); set one of them off")
    for i, src in enumerate(d.sources):
        if src.format == "text":
            raise ConfigError(f"eval.generate_samples scores the answer after each prompt; data.sources.{i} has format 'text', "
                              "which has no prompt; use alpaca, completion or chat data, or eval.generate_samples=0")


def resolve_precision(precision: str, on_cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if on_cuda else "fp32"
    return precision


def env_world_size() -> int:
    """The launcher's world size; under `srun` with one task per GPU, the step's task count."""
    for name in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        raw = os.environ.get(name)
        if raw:
            if not raw.strip().isdigit() or int(raw) < 1:
                raise ConfigError(f"environment variable {name}={raw!r} is not a positive whole number; unset it or let the launcher set it")
            return int(raw)
    return 1


__all__ = [
    "ConfigError",
    "Recipe",
    "load_recipe",
    "validate",
    "dump_yaml",
    "to_dict",
    "read_model_config",
    "check_model_config",
    "load_ds_json",
    "resolve_precision",
    "env_world_size",
]
