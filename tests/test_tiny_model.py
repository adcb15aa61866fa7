"""Tests for tools/make_tiny_model.py and the synthetic datasets in harness/assets/.

Everything runs offline on CPU: the tiny models and tokenizer are built from
the shipped configs and assets, never downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.make_tiny_model import make_tiny_model  # imports transformers lazily: HF_HUB_OFFLINE below is in time

# Set before transformers is imported anywhere in this process, so any attempt
# to reach the Hub fails loudly instead of silently downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO_ROOT / "tools"
ASSETS_DIR = REPO_ROOT / "harness" / "assets"

# --like name -> expected model class
ARCHITECTURES = {
    "llama-3.1-8b": "LlamaForCausalLM",
    "mistral-7b": "MistralForCausalLM",
    "qwen2.5-7b": "Qwen2ForCausalLM",
}
TINY_LAYERS = 2


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    """(like name, loaded model, loaded tokenizer, output dir), built once per architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    like = request.param
    out_dir = make_tiny_model(like, tmp_path_factory.mktemp(like), layers=TINY_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    return like, model, tokenizer, out_dir


def test_architecture_and_shape(tiny):
    like, model, tokenizer, _ = tiny
    assert type(model).__name__ == ARCHITECTURES[like]
    assert model.config.num_hidden_layers == TINY_LAYERS
    assert len(model.model.layers) == TINY_LAYERS
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_llama31_keeps_llama3_rope(tiny):
    like, model, _, _ = tiny
    if like != "llama-3.1-8b":
        pytest.skip("llama3 RoPE scaling only applies to llama-3.1")
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "llama3"
    assert rope["original_max_position_embeddings"] < model.config.max_position_embeddings


def test_forward_loss_near_uniform(tiny):
    """A freshly initialised LM predicts ~uniformly: loss ~ ln(vocab)."""
    import torch

    _, model, tokenizer, _ = tiny
    row = read_jsonl(ASSETS_DIR / "tiny_instruct.jsonl")[0]
    batch = tokenizer([row["instruction"], row["input"] + " " + row["output"]],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    expected_loss = math.log(len(tokenizer))
    assert math.isfinite(loss)
    assert abs(loss - expected_loss) < 0.3 * expected_loss, (loss, expected_loss)


def test_tokenizer_round_trip_and_specials(tiny):
    _, _, tokenizer, _ = tiny
    row = read_jsonl(ASSETS_DIR / "tiny_instruct.jsonl")[3]
    text = f"{row['instruction']}\n{row['input']}\n{row['output']}"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # Llama-style: bos added, eos not
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level BPE: even unseen characters round-trip (no <unk>).
    odd = "Zürich — 東京 ✓"
    assert tokenizer.decode(tokenizer(odd)["input_ids"], skip_special_tokens=True) == odd
    for token in ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>"]:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


def test_auto_tokenizer_class_encodes_like_tokenizer_json(tiny):
    """AutoTokenizer picks a model-specific class for some model types (Qwen2Tokenizer
    for qwen2) that rebuilds the pre-tokenizer; encoding must not change."""
    from transformers import PreTrainedTokenizerFast

    _, _, tokenizer, out_dir = tiny
    plain = PreTrainedTokenizerFast.from_pretrained(out_dir)
    text = "Sort 12345, 97 and Hello   world\n\nok Zürich <|user|>"
    assert len(tokenizer) == len(plain)
    assert tokenizer(text)["input_ids"] == plain(text)["input_ids"]


def test_chat_template(tiny):
    _, _, tokenizer, _ = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|begin_of_text|>"
        "<|system|>\nBe brief.<|end_of_text|>\n"
        "<|user|>\nWhat is 2 + 3?<|end_of_text|>\n"
        "<|assistant|>\n5<|end_of_text|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end_of_text|>\n<|assistant|>\n")
    # The {% generation %} markers let the data pipeline mask non-assistant tokens.
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    assistant_ids = [token_id for token_id, keep in zip(encoded["input_ids"], encoded["assistant_masks"]) if keep]
    assert tokenizer.decode(assistant_ids) == "5<|end_of_text|>"


def test_dataset_files():
    train = read_jsonl(ASSETS_DIR / "tiny_instruct.jsonl")
    val = read_jsonl(ASSETS_DIR / "tiny_instruct_val.jsonl")
    assert 3000 <= len(train) <= 5000 and 100 <= len(val) <= 300
    for row in train + val:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(value, str) for value in row.values())
        assert row["instruction"] and row["output"]
    train_keys = {(row["instruction"], row["input"]) for row in train}
    val_keys = {(row["instruction"], row["input"]) for row in val}
    assert not train_keys & val_keys
    assert any(row["input"] == "" for row in train)  # the no-input prompt variant is covered

    chats = read_jsonl(ASSETS_DIR / "tiny_chat.jsonl")
    assert 200 <= len(chats) <= 400
    for chat in chats:
        roles = [message["role"] for message in chat["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) >= 4
        assert all(isinstance(message["content"], str) and message["content"] for message in chat["messages"])

    text_lines = (ASSETS_DIR / "sample_text.txt").read_text(encoding="utf-8").splitlines()
    assert len(text_lines) >= 200 and all(text_lines)
    total_bytes = sum(path.stat().st_size for path in ASSETS_DIR.iterdir() if path.is_file())
    assert total_bytes < 1.5 * 1024 * 1024


def test_unknown_like_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOLS_DIR / "make_tiny_model.py"), "--like", "no-such-model", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "unknown --like 'no-such-model'" in result.stderr
    assert "llama-3.1-8b" in result.stderr  # lists the available names


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": 60, "heads": 8}, "divisible by --heads"),
    ({"heads": 4, "kv_heads": 3}, "divisible by --kv-heads"),
])
def test_bad_shapes_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_model("llama-3.1-8b", tmp_path, **kwargs)
