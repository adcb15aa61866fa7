"""Data pipeline: file types, formats and loss masking, multi-task mixing, leak-free packing, the
train/validation split, the tokenisation cache, and the errors bad data gives."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import data
from harness.config import ConfigError, DataConfig, Recipe, SourceConfig, validate
from tests.helpers import REPO, launch, read_metrics

ASSETS = REPO / "harness" / "assets"
ALPACA_ROWS = [
    {"instruction": "Reverse the words.", "input": "red green blue", "output": "blue green red"},
    {"instruction": "Name a colour.", "input": "", "output": "teal"},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3"},
]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of Finland?"},
    {"role": "assistant", "content": "Helsinki"},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima"},
]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg_for(*sources, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(**s) if isinstance(s, dict) else s for s in sources], **kw)


def build(cfg, tok, seed=0, **kw):
    return data.build_datasets(cfg, tok, seed, **kw)


def as_lists(dataset) -> list:
    return [tuple(t.tolist() for t in s) for s in dataset]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_every_file_type_gives_the_same_samples(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ALPACA_ROWS)
    files = {"jsonl": write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS), "json": tmp_path / "a.json",
             "parquet": tmp_path / "a.parquet", "csv": tmp_path / "a.csv", "arrow": tmp_path / "saved"}
    files["json"].write_text(json.dumps(ALPACA_ROWS, indent=2))
    ds.to_parquet(str(files["parquet"]))
    ds.to_csv(str(files["csv"]), index=False)
    ds.save_to_disk(str(files["arrow"]))
    got = {k: as_lists(build(cfg_for({"path": str(p), "format": "alpaca"}), tok)[0]) for k, p in files.items()}
    assert all(v == got["jsonl"] for v in got.values()) and len(got["jsonl"]) == 3


def test_column_mapping_renames_columns(tok, tmp_path):
    rows = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "output": "ignored"} for r in ALPACA_ROWS]
    mapped = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = cfg_for({"path": str(mapped), "format": "alpaca", "columns": {"instruction": "question", "input": "context", "output": "answer"}})
    plain = cfg_for({"path": str(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)), "format": "alpaca"})
    assert as_lists(build(cfg, tok)[0]) == as_lists(build(plain, tok)[0])


# ------------------------------------------------------------------------------------------------
# Formats and loss masking, token by token against the rendered template
# ------------------------------------------------------------------------------------------------


def check_mask(ids: list, targets: list, loss_positions: set) -> None:
    """targets[t] is ids[t+1] exactly when token t+1 is a loss token, else -100 (and the last is -100)."""
    for t in range(len(ids)):
        want = ids[t + 1] if t + 1 < len(ids) and (t + 1) in loss_positions else data.IGNORE_INDEX
        assert targets[t] == want, (t, targets[t], want)


def test_alpaca_labels_are_ignored_exactly_on_the_prompt_tokens(tok):
    for row in ALPACA_ROWS:
        [(ids, targets)] = data.tokenize_rows([row], "alpaca", tok, 512, False, "raise", data.DataStats(), "t")
        tmpl = data.ALPACA_PROMPT_WITH_INPUT if row["input"] else data.ALPACA_PROMPT
        prompt = tmpl.format(**row)
        prompt_ids = tok(prompt)["input_ids"]
        full_ids = tok(prompt + row["output"] + tok.eos_token)["input_ids"]
        assert ids.tolist() == full_ids and full_ids[: len(prompt_ids)] == prompt_ids
        check_mask(ids.tolist(), targets.tolist(), set(range(len(prompt_ids), len(full_ids))))
        assert tok.decode(targets[targets != -100]) == row["output"] + tok.eos_token
        # train_on_inputs: every position but the last carries loss
        [(_, all_t)] = data.tokenize_rows([row], "alpaca", tok, 512, True, "raise", data.DataStats(), "t")
        check_mask(ids.tolist(), all_t.tolist(), set(range(len(ids))))


def test_completion_and_text_formats(tok):
    [(ids, targets)] = data.tokenize_rows([{"prompt": "2 + 2 =", "completion": " 4"}], "completion", tok, 512, False, "raise", data.DataStats(), "t")
    n_prompt = len(tok("2 + 2 =")["input_ids"])
    check_mask(ids.tolist(), targets.tolist(), set(range(n_prompt, len(ids))))
    [(ids, targets)] = data.tokenize_rows([{"text": "plain text"}], "text", tok, 512, False, "raise", data.DataStats(), "t")
    assert ids.tolist() == tok("plain text" + tok.eos_token)["input_ids"]
    check_mask(ids.tolist(), targets.tolist(), set(range(len(ids))))


def expected_chat_loss_positions(tok, messages, template, add_special) -> tuple[list, set]:
    """Render every prefix with the template and tokenise it: the tokens from the end of each generation
    prompt to the end of that assistant turn are the loss tokens."""
    render = lambda m, g: tok.apply_chat_template(m, chat_template=template, tokenize=False, add_generation_prompt=g)  # noqa: E731
    enc = lambda s: tok(s, add_special_tokens=add_special)["input_ids"]  # noqa: E731
    full = enc(render(messages, False))
    loss = set()
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = enc(render(messages[:i], True)), enc(render(messages[: i + 1], False).rstrip())
            assert full[: len(end)] == end and end[: len(start)] == start  # token boundaries are clean
            loss |= set(range(len(start), len(end)))
    return full, loss


def test_chat_labels_cover_every_assistant_turn_with_the_tokenizers_template(tok):
    [(ids, targets)] = data.tokenize_rows([{"messages": CHAT}], "chat", tok, 512, False, "raise", data.DataStats(), "t")
    full, loss = expected_chat_loss_positions(tok, CHAT, tok.chat_template, add_special=False)
    assert ids.tolist() == full and ids.tolist().count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    check_mask(full, targets.tolist(), loss)
    # The tiny template marks assistant content with {% generation %}: transformers' own mask agrees.
    ref = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert set(np.flatnonzero(ref["assistant_masks"]).tolist()) == loss
    # Each learned run decodes to one assistant turn plus EOS.
    runs = [tok.decode([int(x) for x in g]) for learned, g in itertools.groupby(targets.tolist(), lambda x: x != -100) if learned]
    assert runs == [m["content"] + tok.eos_token for m in CHAT if m["role"] == "assistant"]


def test_builtin_chat_template_when_the_tokenizer_has_none(tiny_llama):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_llama)
    bare.chat_template = None
    [(ids, targets)] = data.tokenize_rows([{"messages": CHAT}], "chat", bare, 512, False, "raise", data.DataStats(), "t")
    text = ("### System:\nAnswer briefly.\n\n### User:\nCapital of Finland?\n\n### Assistant:\nHelsinki<|end_of_text|>\n\n"
            "### User:\nAnd of Peru?\n\n### Assistant:\nLima<|end_of_text|>\n\n")
    assert ids.tolist() == bare(text)["input_ids"]  # the documented layout, BOS from the tokenizer
    full, loss = expected_chat_loss_positions(bare, CHAT, data.BUILTIN_CHAT_TEMPLATE, add_special=True)
    check_mask(full, targets.tolist(), loss)
    assert bare.decode(targets[targets != -100]) == "Helsinki<|end_of_text|>Lima<|end_of_text|>"


def test_chat_template_that_rewrites_earlier_turns_is_refused(tiny_llama):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_llama)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
                       "{% endfor %}")
    with pytest.raises(ConfigError, match="rewrites earlier turns.*data.chat_template=builtin"):
        data.tokenize_rows([{"messages": CHAT}], "chat", t, 512, False, "raise", data.DataStats(), "t")


# ------------------------------------------------------------------------------------------------
# Mixing
# ------------------------------------------------------------------------------------------------


def fake_parts(sizes: list[int], length=lambda i: 5) -> list:
    parts = []
    for k, n in enumerate(sizes):
        lens = np.array([length(i) for i in range(n)], np.int64)
        ids = np.full(int(lens.sum()), k, np.int32)
        tgt = ids.copy()
        tgt[np.cumsum(lens) - 1] = -100
        parts.append(data.TokenPart(data.SourceStats(f"s{k}", "text"), ids, tgt, lens))
    return parts


def draws(sizes, weights, seed, n_draws=10_000, **kw):
    """The source of each of the first n_draws training samples the StepSampler hands out."""
    cfg = cfg_for(*[{"path": f"s{k}", "format": "text", "weight": w} for k, w in enumerate(weights)], **kw)
    stats = data.DataStats()
    train, _ = data.split_and_mix(fake_parts(sizes), cfg, seed, stats)
    sampler = data.StepSampler(len(train), 100, 10, 1, 0, seed)
    order = [i for step in range(n_draws // 100) for mb in sampler.window(step) for i in mb]
    return train.sources()[order].tolist(), stats


def test_mixing_shares_match_the_weights_over_10000_draws():
    weights = [0.5, 0.3, 0.2]
    src, stats = draws([400, 3_000, 20_000], weights, seed=1, num_samples=30_000)
    counts = Counter(src)
    shares = [counts[k] / len(src) for k in range(3)]
    print("shares over 10,000 draws:", [f"{s:.4f}" for s in shares], "weights:", weights)
    assert all(abs(s - w) <= 0.02 for s, w in zip(shares, weights)), shares
    assert [m["share"] for m in stats.mix] == pytest.approx(weights)  # the epoch of the mix is exact
    assert stats.mix[0]["epochs"] == pytest.approx(15_000 / 400)  # the small source is repeated
    assert draws([400, 3_000, 20_000], weights, seed=1, num_samples=30_000)[0] == src  # same seed, same order
    assert draws([400, 3_000, 20_000], weights, seed=2, num_samples=30_000)[0] != src


def test_temperature_and_epochs_mixing():
    sizes = [100, 900]
    cfg = cfg_for({"path": "a", "format": "text"}, {"path": "b", "format": "text"}, mixing="temperature", temperature=1.0)
    assert data.mix_counts(sizes, cfg) == [100, 900]  # T=1: by size
    cfg.temperature = 1e6
    assert data.mix_counts(sizes, cfg) == [500, 500]  # T -> inf: uniform
    cfg.temperature = 2.0  # sqrt sizes: 10 : 30
    assert data.mix_counts(sizes, cfg) == [250, 750]
    cfg = cfg_for({"path": "a", "format": "text", "epochs": 3}, {"path": "b", "format": "text", "epochs": 0.5}, mixing="epochs")
    assert data.mix_counts(sizes, cfg) == [300, 450]
    train, _ = data.split_and_mix(fake_parts(sizes), cfg, 0, data.DataStats())
    per_sample = Counter(train.index.tolist())
    assert all(per_sample[i] == 3 for i in range(100))  # whole passes: every sample of a three times
    assert len({i for i in per_sample if i >= 100}) == 450  # half of b, each once


# ------------------------------------------------------------------------------------------------
# Packing and padding-free batches
# ------------------------------------------------------------------------------------------------


def per_sample_losses(model, batch, spans) -> torch.Tensor:
    """Mean loss of each sample: spans[k] = (row, start, length) in the batch."""
    with torch.no_grad():
        logits = model(**data.model_inputs(batch)).logits.float()
    tok_loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="none").view(batch["targets"].shape)
    n_tgt = lambda r, a, n: (batch["targets"][r, a : a + n] != -100).sum()  # noqa: E731
    return torch.stack([tok_loss[r, a : a + n].sum() / n_tgt(r, a, n) for r, a, n in spans])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_equals_unpacked(tiny_models, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    rows = [{"instruction": "Say " + "a b " * (k % 5), "input": "x " * (k % 3), "output": "word " * (k + 1)} for k in range(10)]
    samples = data.tokenize_rows(rows, "alpaca", tok, 512, False, "raise", data.DataStats(), "t")
    lengths = np.array([len(s[0]) for s in samples])
    rows_ = data.pack(lengths, 100)
    assert max(len(r) for r in rows_) >= 2 and sum(len(r) for r in rows_) == len(samples)
    packed = data.collate([data.concat_samples([samples[i] for i in r]) for r in rows_], tok.pad_token_id)
    assert packed["input_ids"].shape[0] == len(rows_) and (packed["attention_mask"] == 0).any()  # rows with a padded tail
    spans, flat_spans, o = [None] * len(samples), [], 0
    for r, idx in enumerate(rows_):
        a = 0
        for i in idx:
            spans[i] = (r, a, lengths[i])
            a += lengths[i]
    for n in lengths:
        flat_spans.append((0, o, n))
        o += n
    worst = {}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation=attn, dtype=torch.float32).eval()
        alone = torch.cat([per_sample_losses(model, data.collate([s], tok.pad_token_id), [(0, 0, len(s[0]))]) for s in samples])
        in_pack = per_sample_losses(model, packed, spans)
        padded = per_sample_losses(model, data.collate(samples, tok.pad_token_id), [(k, 0, n) for k, n in enumerate(lengths)])
        flat = per_sample_losses(model, data.collate(samples, tok.pad_token_id, flatten=True), flat_spans)
        worst[attn] = max(float((x - alone).abs().max()) for x in (in_pack, padded, flat))
        assert worst[attn] <= 1e-5, worst
        # Control: the same packed rows without position ids (one causal sequence per row) do leak.
        leaky = dict(packed)
        del leaky["position_ids"]
        leaky["attention_mask"] = torch.ones_like(leaky["attention_mask"])
        assert float((per_sample_losses(model, leaky, spans) - alone).abs().max()) > 1e-2
    print(f"{arch}: max |packed - alone| per-sample mean loss (fp32): {worst}")


def test_packed_rows_layout():
    samples = [(torch.tensor([1, 2, 3]), torch.tensor([2, 3, -100])), (torch.tensor([4, 5]), torch.tensor([5, -100]))]
    row = data.concat_samples(samples)
    batch = data.collate([row, data.concat_samples(samples[1:])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # the padded tail is a segment of its own
    assert batch["targets"].tolist() == [[2, 3, -100, 5, -100], [5, -100, -100, -100, -100]]  # no sample predicts the next
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]  # real tokens, for counting only
    assert set(data.model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    # best-fit decreasing: every sample once, no row over capacity, rows well filled
    lengths = np.random.default_rng(0).integers(1, 200, 2000)
    rows = data.pack(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert max(lengths[r].sum() for r in rows) <= 256 and lengths.sum() / (256 * len(rows)) > 0.97


def test_flattened_batch_matches_transformers_flattening_collator(tok):
    from transformers import DataCollatorWithFlattening

    samples = data.tokenize_rows(ALPACA_ROWS, "alpaca", tok, 512, True, "raise", data.DataStats(), "t")
    ours = data.collate(samples, tok.pad_token_id, flatten=True)
    ref = DataCollatorWithFlattening()([{"input_ids": s[0].tolist()} for s in samples])
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist() and ours["position_ids"].tolist() == ref["position_ids"].tolist()
    # Its labels are unshifted with -100 at each sample's first token; ours are the same, shifted by one.
    assert ours["targets"][0].tolist() == ref["labels"][0, 1:].tolist() + [-100]


def test_length_grouped_batches_keep_the_global_batch_and_cut_padding():
    lengths = np.random.default_rng(0).integers(5, 500, 1000)
    G, mb = 32, 4

    def padding(sampler, world):
        return sum(len(m) * max(lengths[m]) - lengths[m].sum() for step in range(20) for r in range(world)
                   for m in data.StepSampler(1000, G, mb, world, r, 3, lengths=sampler).window(step))

    for world in (1, 2, 4):
        for step in range(40):  # across an epoch boundary
            union = sorted(i for r in range(world) for w in data.StepSampler(1000, G, mb, world, r, 3, lengths=lengths).window(step) for i in w)
            ref = sorted(i for w in data.StepSampler(1000, G, mb, 1, 0, 3, lengths=lengths).window(step) for i in w)
            assert union == ref and len(set(union)) == G
    assert padding(lengths, 2) < 0.2 * padding(None, 2)


# (grouped by length or not, world size, steps: within the first epoch, across its boundary, past max_epochs)
@pytest.mark.parametrize("grouped, world, steps", [(False, 2, 3), (True, 2, 3), (False, 4, 40), (True, 1, 40), (False, 2, 400)])
def test_longest_sample_is_the_longest_padded_micro_batch_the_windows_make(grouped, world, steps):
    """StepSampler.longest_sample (what the memory budget is given for one sample per row) equals the longest sample
    in any rank's micro-batch over the run's steps, read from the windows themselves; past max_epochs, the longest."""
    lengths = np.random.default_rng(1).integers(5, 500, 1000)
    G, mb = 32, 4
    samplers = [data.StepSampler(1000, G, mb, world, r, 3, lengths=lengths if grouped else None) for r in range(world)]
    seen = max(int(lengths[m].max()) for step in range(steps) for s in samplers for m in s.window(step))
    max_epochs = 6  # 31 steps an epoch: 400 steps are 13 epochs
    expect = int(lengths.max()) if steps > max_epochs * samplers[0].steps_per_epoch else seen
    assert samplers[-1].longest_sample(lengths, steps, max_epochs=max_epochs) == expect
    assert steps > 3 or expect < int(lengths.max())  # a short run sees less than the data set's longest


# ------------------------------------------------------------------------------------------------
# Train / validation split
# ------------------------------------------------------------------------------------------------


def test_val_fraction_is_held_out_of_each_source(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i}"} for i in range(20)])
    train, val, stats = build(cfg_for({"path": str(a), "format": "text"}, {"path": str(b), "format": "text"}, val_fraction=0.25), tok)
    val_text = {tok.decode(s[0], skip_special_tokens=True) for s in val}
    train_text = {tok.decode(s[0], skip_special_tokens=True) for s in train}
    assert len(val) == 10 + 5 and not (val_text & train_text)
    assert sum(t.startswith("alpha") for t in val_text) == 10 and len(train_text) == 45


def test_separate_validation_files(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(8)])
    av = write_jsonl(tmp_path / "a_val.jsonl", [{"text": "alpha val"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "output": f"{i}"} for i in range(8)])
    bv = write_jsonl(tmp_path / "b_val.jsonl", [{"instruction": "x", "output": "val"}] * 2)
    cfg = cfg_for({"path": str(a), "format": "text", "val_path": str(av)}, {"path": str(b), "format": "alpaca", "val_path": str(bv)})
    train, val, stats = build(cfg, tok)
    assert len(train) == 16 and len(val) == 3 and [s.split for s in stats.sources] == ["train", "train", "val", "val"]
    train, val, _ = build(cfg_for({"path": str(a), "format": "text"}, val_path=str(av)), tok)
    assert len(train) == 8 and len(val) == 1


# ------------------------------------------------------------------------------------------------
# Tokenise once: the cache
# ------------------------------------------------------------------------------------------------


def test_cache_is_reused_and_keyed_by_what_changes_the_tokens(tok, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS * 4)
    cache = str(tmp_path / "cache")
    first = build(cfg_for({"path": str(src), "format": "alpaca"}), tok, cache_dir=cache)
    again = build(cfg_for({"path": str(src), "format": "alpaca"}), tok, cache_dir=cache)
    assert (first[2].cache, again[2].cache) == ("miss", "hit") and as_lists(first[0]) == as_lists(again[0])
    assert build(cfg_for({"path": str(src), "format": "alpaca"}, seq_len=64), tok, cache_dir=cache)[2].cache == "miss"
    assert build(cfg_for({"path": str(src), "format": "alpaca"}, train_on_inputs=True), tok, cache_dir=cache)[2].cache == "miss"
    # packing is cheap: done after the cache
    assert build(cfg_for({"path": str(src), "format": "alpaca"}, packing=True), tok, cache_dir=cache)[2].cache == "hit"
    write_jsonl(src, ALPACA_ROWS * 5)
    changed = build(cfg_for({"path": str(src), "format": "alpaca"}), tok, cache_dir=cache)
    assert changed[2].cache == "miss" and len(changed[0]) == 15
    assert len(list(Path(cache).glob("tokens-*"))) == 4


# ------------------------------------------------------------------------------------------------
# Bad data: never silently dropped
# ------------------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line_or_is_skipped_and_counted(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ALPACA_ROWS[0], '{"instruction": "x", "output": oops}', ALPACA_ROWS[1], "[1, 2]"])
    with pytest.raises(ConfigError) as e:
        build(cfg_for({"path": str(bad), "format": "alpaca"}), tok)
    print("malformed line:", e.value)
    assert str(e.value).startswith(f"{bad}:2: malformed JSON line") and "data.on_error=skip" in str(e.value)
    train, _, stats = build(cfg_for({"path": str(bad), "format": "alpaca"}, on_error="skip"), tok)
    assert len(train) == 2 and stats.skipped_rows == 2 and stats.sources[0].rows == 4
    assert f"{bad}:4: malformed JSON line (expected a JSON object, got list)" in stats.errors
    assert "2 rows skipped" in stats.lines(512)[0] and stats.record()["skipped_rows"] == 2


def test_row_missing_a_field(tok, tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [ALPACA_ROWS[0], "", {"instruction": "no answer"}, ALPACA_ROWS[2]])
    with pytest.raises(ConfigError) as e:
        build(cfg_for({"path": str(f), "format": "alpaca"}), tok)
    print("missing field:", e.value)
    assert str(e.value).startswith(f"{f}:3: no field 'output' (format 'alpaca')") and "columns" in str(e.value)
    train, _, stats = build(cfg_for({"path": str(f), "format": "alpaca"}, on_error="skip"), tok)
    assert len(train) == 2 and stats.skipped_rows == 1
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [{"content": "no role"}]}])
    with pytest.raises(ConfigError, match=r"chat\.jsonl:2: message 0 has no 'role'"):
        build(cfg_for({"path": str(chat), "format": "chat"}), tok)


def test_missing_column_empty_file_and_unknown_type(tok, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError) as e:
        build(cfg_for({"path": str(f), "format": "alpaca"}, on_error="skip"), tok)  # a whole column is never "skipped"
    print("missing column:", e.value)
    assert "no column 'instruction', 'output' needed by format 'alpaca' (the file has question, answer)" in str(e.value)
    assert "data.sources.0.columns" in str(e.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError) as e:
        build(cfg_for({"path": str(empty), "format": "text"}), tok)
    print("empty file:", e.value)
    assert str(e.value) == f"{empty}: the file is empty (no rows); fill it or remove the source"
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(ConfigError, match=r"unknown file type '\.txt'"):
        build(cfg_for({"path": str(txt), "format": "text"}), tok)


def test_wrong_format_name(tiny_llama):
    r = Recipe()
    r.model.path = str(tiny_llama)
    r.deepspeed.config = str(REPO / "ds_configs" / "zero0.json")
    r.data = cfg_for({"path": str(ASSETS / "tiny_instruct.jsonl"), "format": "alpacca"})
    with pytest.raises(ConfigError) as e:
        validate(r, 1)
    print("wrong format:", e.value)
    assert str(e.value) == "'data.sources.0.format: alpacca' is not one of alpaca, completion, text, chat (did you mean 'alpaca'?)"


def test_overlong_samples_are_truncated_or_dropped_and_counted(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 100}, {"text": "short"}, {"text": "word " * 50}])
    train, _, st = build(cfg_for({"path": str(f), "format": "text"}, seq_len=16), tok)
    assert st.truncated == 2 and sorted(len(s[0]) for s in train) == [len(tok("short" + tok.eos_token)["input_ids"]), 16, 16]
    train, _, st = build(cfg_for({"path": str(f), "format": "text"}, seq_len=16, overlong="drop"), tok)
    assert st.dropped == 2 and len(train) == 1 and "2 dropped as longer" in st.lines(16)[0]
    long_rows = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 100}] * 3)
    with pytest.raises(ConfigError) as e:  # an empty dataset after filtering
        build(cfg_for({"path": str(long_rows), "format": "text"}, seq_len=8, overlong="drop"), tok)
    print("empty after filtering:", e.value)
    assert "no samples left of 3 rows: 0 skipped as bad, 3 dropped as longer than data.seq_len=8" in str(e.value)
    # a prompt that alone fills seq_len leaves nothing to learn: dropped and counted
    g = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "long " * 40, "output": "x"}, ALPACA_ROWS[1]])
    train, _, st = build(cfg_for({"path": str(g), "format": "alpaca"}, seq_len=40), tok)
    assert len(train) == 1 and st.sources[0].dropped_no_target == 1


def test_config_rejects_conflicting_data_keys(tiny_llama):
    def check(**kw):
        r = Recipe()
        r.model.path = str(tiny_llama)
        r.deepspeed.config = str(REPO / "ds_configs" / "zero0.json")
        r.data = cfg_for({"path": str(ASSETS / "tiny_instruct.jsonl")}, **kw)
        with pytest.raises(ConfigError) as e:
            validate(r, 1)
        return str(e.value)

    assert "not both" in check(val_path=str(ASSETS / "tiny_instruct_val.jsonl"), val_fraction=0.1)
    assert "alternatives" in check(packing=True, padding_free=True)
    assert "'data.mixing: temprature'" in check(mixing="temprature")
    assert "'data.overlong: cut'" in check(overlong="cut")


# ------------------------------------------------------------------------------------------------
# Wired into harness/train.py
# ------------------------------------------------------------------------------------------------


def test_train_py_with_packing_mixing_and_a_bad_row(tiny_llama, tmp_path):
    """One process: two sources mixed 3:1 (alpaca + multi-turn chat) with a malformed line skipped, packed."""
    rows = (ASSETS / "tiny_instruct.jsonl").read_text().splitlines()[:300]
    src = tmp_path / "instruct.jsonl"
    src.write_text("\n".join(rows[:10] + ["{not json"] + rows[10:]) + "\n")
    common = ["--config", str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), f"model.path={tiny_llama}", "method=lora",
              "deepspeed.config=ds_configs/zero0.json", "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4",
              "eval.every_steps=2", "eval.max_samples=4", "log.every_steps=1", "log.progress_bar=false", "data.val_path=",
              "data.val_fraction=0.05", "data.on_error=skip", f"data.cache_dir={tmp_path / 'cache'}",
              f"data.sources=[{{path: '{src}', format: alpaca, weight: 3}}, {{path: '{ASSETS / 'tiny_chat.jsonl'}', format: chat, weight: 1}}]"]
    proc = launch([*common, f"output_dir={tmp_path / 'packed'}", "data.packing=true"])
    assert "data: skipped " in proc.stdout and f"{src}:11: malformed JSON line" in proc.stdout and "cache miss" in proc.stdout
    records = read_metrics(tmp_path / "packed")
    d = records[0]["data"]
    assert d["skipped_rows"] == 1 and d["train_rows"] < d["train_samples"] and d["packing_efficiency"] > 0.9
    assert [m["share"] for m in d["mix"]] == pytest.approx([0.75, 0.25], abs=2e-3)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2]


def test_direct_backend_encoding_equals_the_transformers_wrapper(tok, monkeypatch):
    """The fast path (tokenizers backend + char_to_token) and the wrapper path (offset mapping) agree."""
    rows = {"alpaca": ALPACA_ROWS, "chat": [{"messages": CHAT}], "text": [{"text": "héllo wörld  \u00a0 twice"}],
            "completion": [{"prompt": "abc", "completion": "def"}]}
    fast = {f: as_lists(data.tokenize_rows(r, f, tok, 512, False, "raise", data.DataStats(), "t")) for f, r in rows.items()}
    monkeypatch.setattr(data.tokens, "_plain_backend", lambda _tok: None)
    slow = {f: as_lists(data.tokenize_rows(r, f, tok, 512, False, "raise", data.DataStats(), "t")) for f, r in rows.items()}
    assert fast == slow
