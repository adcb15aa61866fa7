#!/usr/bin/env python
"""Write a tiny, randomly initialised causal LM shaped like a real architecture.

Why: the harness's tests and CPU smoke runs need a model that is (a) the same
*architecture* as the real targets (LlamaForCausalLM with GQA and llama3 RoPE,
MistralForCausalLM, Qwen2ForCausalLM with qkv biases ...), so every code path
that depends on the model class or config is exercised, but (b) small enough to
build, save, load and train in seconds, and (c) creatable with no network.

So we take one of the shipped configs in harness/model_configs/, shrink only
the size knobs (layers, widths, heads, vocab, context), train a small byte-level
BPE tokenizer locally on harness/assets/, and save both with save_pretrained.
The result loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(out).

CLI:
    python tools/make_tiny_model.py --like llama-3.1-8b --out /tmp/tiny-llama \
        [--layers 2] [--hidden 64] [--heads 4] [--kv-heads 2] [--intermediate 128] \
        [--vocab-size 512] [--seed 0] [--dtype float32] [--tie-embeddings/--no-tie-embeddings]

Python (tests): from tools.make_tiny_model import make_tiny_model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# torch / transformers / tokenizers are imported lazily inside the functions
# that need them, so argument errors (e.g. an unknown --like name) are reported
# instantly instead of after a multi-second import.

from harness.config import SHIPPED_MODEL_CONFIGS as MODEL_CONFIGS_DIR
from harness.config import find_model_config, shipped_config_names

REPO_ROOT = Path(__file__).resolve().parents[1]

ASSETS_DIR = REPO_ROOT / "harness" / "assets"

# Context length of the tiny model.  The real configs use 4k-128k; 2048 is
# plenty for tests and keeps the RoPE caches small.
TINY_MAX_POSITION_EMBEDDINGS = 2048

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Order fixes the ids: pad=0, bos=1, eos=2, system=3, user=4, assistant=5.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS]

# Chat template.  Each message is rendered as
#     <|role|>\n{content}<|end_of_text|>\n
# after a single leading bos token, and add_generation_prompt appends
#     <|assistant|>\n
# so generation stops naturally at eos.  The assistant's content (+ its eos) is
# wrapped in {% generation %} so apply_chat_template(...,
# return_assistant_tokens_mask=True) can mark the tokens to train on.
# Unknown roles raise instead of silently rendering a token the vocab lacks.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end_of_text|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|end_of_text|>' }}"
    "{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Pre-tokenizer split regex, copied from transformers' Qwen2Tokenizer (see train_tokenizer).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class UnknownModelError(ValueError):
    """--like is neither a shipped config name nor a path to a config.json."""


def available_config_names() -> list[str]:
    return shipped_config_names()


def load_like_config(like: str) -> dict[str, Any]:
    """Resolve --like: a shipped name (e.g. 'llama-3.1-8b'), a config.json path,
    or a directory holding a config.json."""
    candidate = find_model_config(like)
    if candidate is None:
        raise UnknownModelError(
            f"unknown --like {like!r}: not a file and not one of the shipped configs in "
            f"{MODEL_CONFIGS_DIR}. Available: {', '.join(available_config_names())}"
        )
    with candidate.open(encoding="utf-8") as handle:
        config_dict = json.load(handle)
    if "model_type" not in config_dict:
        raise UnknownModelError(f"{candidate} has no 'model_type'; is it a Hugging Face config.json?")
    return config_dict


def check_shape_arguments(layers: int, hidden: int, heads: int, kv_heads: int,
                          intermediate: int, vocab_size: int) -> None:
    """Fail early with a plain message rather than deep inside transformers."""
    for name, value in [("layers", layers), ("hidden", hidden), ("heads", heads),
                        ("kv-heads", kv_heads), ("intermediate", intermediate), ("vocab-size", vocab_size)]:
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if hidden % heads:
        raise ValueError(f"--hidden ({hidden}) must be divisible by --heads ({heads}); "
                         f"head_dim = hidden / heads must be an integer")
    if heads % kv_heads:
        raise ValueError(f"--heads ({heads}) must be divisible by --kv-heads ({kv_heads}); "
                         f"grouped-query attention shares each kv head across heads / kv_heads query heads")
    if (hidden // heads) % 2:
        raise ValueError(f"head_dim = hidden / heads = {hidden // heads} must be even for rotary embeddings")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def tokenizer_training_texts(assets_dir: Path = ASSETS_DIR) -> list[str]:
    """sample_text.txt lines + every field of tiny_instruct.jsonl."""
    sample_text_path = assets_dir / "sample_text.txt"
    instruct_path = assets_dir / "tiny_instruct.jsonl"
    missing = [str(p) for p in (sample_text_path, instruct_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer corpus missing: {missing}; run tools/make_dataset.py first")
    texts = sample_text_path.read_text(encoding="utf-8").splitlines()
    with instruct_path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts.extend(value for value in (row["instruction"], row["input"], row["output"]) if value)
    return texts


def train_tokenizer(vocab_size: int):
    """Train a byte-level BPE (GPT-2 / Llama-3 style) and wrap it for transformers.

    Byte-level means any string round-trips (no <unk>), like the real
    Llama-3 / Qwen2 tokenizers.  Like Llama, encoding adds a bos token; eos is
    not added (the data pipeline appends it to targets).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # Same normalizer + pre-tokenizer as transformers' Qwen2Tokenizer, which
    # AutoTokenizer forces for model_type "qwen2" and which rebuilds this part
    # of the pipeline from its own code: identical settings mean the tokenizer
    # encodes the same way whichever class loads it.  (Digits are split one per
    # token, which also makes the arithmetic tasks easier to learn.)
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols are in the vocab even if unseen, so nothing is unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_training_texts(), trainer)
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=TINY_MAX_POSITION_EMBEDDINGS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def record_no_unk_token(out_path: Path) -> None:
    """Write an explicit "unk_token": null into tokenizer_config.json.

    Byte-level BPE needs no unknown token.  But for model_type "qwen2",
    AutoTokenizer loads Qwen2Tokenizer, whose unk_token *default* is
    "<|endoftext|>"; absent an explicit value it would add that as a new token,
    making len(tokenizer) = vocab_size + 1 and breaking the embedding size.
    """
    config_path = out_path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config.setdefault("unk_token", None)
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def shrink_rope_parameters(config_dict: dict[str, Any], notes: list[str]) -> None:
    """Keep the real RoPE scaling type but make it consistent with the short context.

    Scaled RoPE types (llama3, yarn, ...) carry original_max_position_embeddings,
    which must be below max_position_embeddings.  We shrink it by the same factor
    as the context (llama-3.1: 8192 * 2048 / 131072 = 128), which preserves the
    context-extension ratio and keeps the frequency-dependent scaling active at
    head_dim 16.  Older configs call the field rope_scaling; handle both.
    """
    old_max_positions = config_dict.get("max_position_embeddings") or TINY_MAX_POSITION_EMBEDDINGS
    for key in ("rope_parameters", "rope_scaling"):
        rope = config_dict.get(key)
        if not isinstance(rope, dict):
            continue
        original = rope.get("original_max_position_embeddings")
        if isinstance(original, int) and original >= TINY_MAX_POSITION_EMBEDDINGS:
            scaled = max(1, round(original * TINY_MAX_POSITION_EMBEDDINGS / old_max_positions))
            if scaled >= TINY_MAX_POSITION_EMBEDDINGS:
                scaled = TINY_MAX_POSITION_EMBEDDINGS // 2
            config_dict[key] = {**rope, "original_max_position_embeddings": scaled}
            notes.append(f"{key}.original_max_position_embeddings {original} -> {scaled} "
                         f"(same ratio to max_position_embeddings {old_max_positions} -> "
                         f"{TINY_MAX_POSITION_EMBEDDINGS})")


def drop_rope_scaling(config_dict: dict[str, Any]) -> bool:
    """Replace any scaled RoPE by plain RoPE with the same theta. Returns True if changed."""
    changed = False
    for key in ("rope_parameters", "rope_scaling"):
        rope = config_dict.get(key)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
            if key == "rope_parameters":
                config_dict[key] = {"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)}
            else:
                config_dict[key] = None
            changed = True
    return changed


def tiny_config_dict(real: dict[str, Any], *, layers: int, hidden: int, heads: int, kv_heads: int,
                     intermediate: int, vocab_size: int, tie_embeddings: bool | None,
                     bos_id: int, eos_id: int, pad_id: int, dtype: str,
                     notes: list[str]) -> dict[str, Any]:
    """Copy the real config and override only the size knobs + token ids."""
    config_dict = dict(real)
    # Bookkeeping fields of the original checkpoint that would be wrong here.
    for stale_key in ("_name_or_path", "torch_dtype", "transformers_version"):
        config_dict.pop(stale_key, None)
    shrink_rope_parameters(config_dict, notes)
    config_dict.update(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab_size,
        max_position_embeddings=TINY_MAX_POSITION_EMBEDDINGS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=dtype,
    )
    if "head_dim" in config_dict:
        config_dict["head_dim"] = hidden // heads
    if tie_embeddings is not None:
        config_dict["tie_word_embeddings"] = tie_embeddings
    # Per-layer lists (Qwen2 layer_types) must have one entry per layer; keep the
    # real pattern's first entries.  max_window_layers counts layers too.
    if isinstance(config_dict.get("layer_types"), list) and config_dict["layer_types"]:
        pattern = config_dict["layer_types"]
        config_dict["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    if isinstance(config_dict.get("max_window_layers"), int):
        config_dict["max_window_layers"] = min(config_dict["max_window_layers"], layers)
    return config_dict


# ---------------------------------------------------------------------------
# Main entry point
# ---------------------------------------------------------------------------

def _build_model(config_dict: dict[str, Any], seed: int, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = dict(config_dict)
    model_type = config_kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # A short forward + loss catches configs that construct but cannot run
    # (e.g. a RoPE variant that is invalid at this size).
    probe_ids = torch.arange(8).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        loss = model(input_ids=probe_ids, labels=probe_ids).loss
    if not torch.isfinite(loss):
        raise ValueError(f"non-finite loss {loss.item()} from the freshly built model")
    return model


def make_tiny_model(like: str, out_dir, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, vocab_size: int = 512, seed: int = 0,
                    dtype: str = "float32", tie_embeddings: bool | None = None,
                    init_std: float | None = None, max_shard_size: str | None = None,
                    model_vocab_size: int | None = None) -> Path:
    """Build and save a tiny model + tokenizer; returns the output directory.

    vocab_size is the *requested* BPE size; the model uses the tokenizer's
    actual size (len(tokenizer)), which can be larger if the request is below
    256 bytes + 6 special tokens.  tie_embeddings=None keeps the real config's
    tie_word_embeddings.  init_std (default hidden**-0.5) replaces the real
    config's initializer_range (0.02): at hidden 64 the frozen random head of
    a 0.02 init cannot produce logits more than ~1 nat apart after the final
    RMSNorm, so LoRA on the frozen model could barely learn.
    """
    real = load_like_config(like)
    check_shape_arguments(layers, hidden, heads, kv_heads, intermediate, vocab_size)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"--dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")

    out_path = Path(out_dir)
    notes: list[str] = []
    tokenizer = train_tokenizer(vocab_size)
    actual_vocab_size = len(tokenizer)
    if actual_vocab_size != vocab_size:
        notes.append(f"tokenizer vocab is {actual_vocab_size} (requested {vocab_size})")
    if model_vocab_size is not None:
        if model_vocab_size < actual_vocab_size:
            raise ValueError(f"--model-vocab-size {model_vocab_size} is below the tokenizer's {actual_vocab_size} tokens")
        actual_vocab_size = model_vocab_size

    config_dict = tiny_config_dict(
        real, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        intermediate=intermediate, vocab_size=actual_vocab_size, tie_embeddings=tie_embeddings,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        dtype=dtype, notes=notes,
    )
    config_dict["initializer_range"] = init_std if init_std is not None else hidden ** -0.5
    try:
        model = _build_model(config_dict, seed, dtype)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        # The real RoPE scaling may not make sense at this size: fall back to
        # plain RoPE rather than failing, and say so.
        if not drop_rope_scaling(config_dict):
            raise
        notes.append(f"dropped RoPE scaling, invalid at this size ({type(error).__name__}: {error})")
        model = _build_model(config_dict, seed, dtype)

    from transformers.utils import logging as transformers_logging

    out_path.mkdir(parents=True, exist_ok=True)
    # A one-shard "Writing model shards" progress bar is noise here; silence it
    # only for this call and restore the caller's setting afterwards.
    progress_bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        # safetensors is the default format in transformers 5
        model.save_pretrained(out_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    finally:
        if progress_bar_was_enabled:
            transformers_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_path)
    record_no_unk_token(out_path)

    for note in notes:
        print(f"note: {note}")
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    print(f"{type(model).__name__} like {like}: {parameter_count:,} parameters "
          f"({layers} layers, hidden {hidden}, vocab {actual_vocab_size}, {dtype}) -> {out_path}")
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a tiny random causal LM shaped like a shipped architecture, plus a local tokenizer.")
    parser.add_argument("--like", required=True,
                        help=f"shipped config name ({', '.join(available_config_names())}) or path to a config.json")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=512, help="requested BPE vocab size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES)
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="tie input/output embeddings (default: as in the --like config)")
    parser.add_argument("--init-std", type=float, default=None,
                        help="weight init std (default hidden**-0.5; the real configs use 0.02)")
    parser.add_argument("--model-vocab-size", type=int, default=None,
                        help="embedding/head rows (>= the tokenizer's size), e.g. 128256 for a Llama-3-sized head")
    parser.add_argument("--max-shard-size", default=None,
                        help="split the weights into safetensors shards of at most this size (e.g. 500MB), with an index")
    args = parser.parse_args(argv)
    try:
        make_tiny_model(args.like, args.out, layers=args.layers, hidden=args.hidden, heads=args.heads,
                        kv_heads=args.kv_heads, intermediate=args.intermediate, vocab_size=args.vocab_size,
                        seed=args.seed, dtype=args.dtype, tie_embeddings=args.tie_embeddings,
                        init_std=args.init_std, max_shard_size=args.max_shard_size,
                        model_vocab_size=args.model_vocab_size)
    except (ValueError, FileNotFoundError) as error:  # UnknownModelError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
