"""harness/generation.py: prompts and expected answers cut from tokenised samples, batches dealt to
ranks independently of the world size, and greedy answers equal to plain transformers' generate."""

from __future__ import annotations

import pytest
import torch

from harness import data, generation
from harness.data import IGNORE_INDEX


@pytest.mark.parametrize("n, batch, world", [(5, 2, 1), (5, 2, 2), (7, 3, 2), (4, 4, 3), (1, 8, 2)])
def test_batches_cover_each_prompt_once_with_equal_calls_per_rank(n, batch, world):
    per_rank = [generation.batches(n, batch, world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank calls generate() as often (ZeRO-3 in step)
    counted = sorted(i for b in per_rank for idx, counts in b if counts for i in idx)
    assert counted == list(range(n))
    groups = [idx for b in per_rank for idx, counts in b if counts]
    assert all(g == list(range(g[0], g[0] + len(g))) and g[0] % batch == 0 for g in groups)  # consecutive, any world


@pytest.mark.parametrize("right, shown", [
    ("", [0, 1, 2]),            # nothing right: the first three
    ("0123456", [0, 1, 7]),     # two right, then the first wrong
    ("5", [0, 1, 5]),           # one right: it and the first two wrong
    ("01234567", [0, 1, 2]),    # all right: the first three
])
def test_samples_to_show_mix_right_and_wrong(right, shown):
    answers = [generation.Answer(i, f"p{i}", "yes", "yes" if str(i) in right else "no") for i in range(8)]
    assert [a.index for a in generation.samples_to_show(answers)] == shown


def test_prompt_and_expected_answer_come_from_the_loss_mask(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"instruction": "Convert the text to uppercase.", "input": "strong", "output": "STRONG"}
    (sample,) = data.tokenize_rows([row], "alpaca", tok, 128, False, "raise", data.DataStats(), "test")
    prompt, expected = generation.split_prompt(sample)
    assert tok.decode(prompt, skip_special_tokens=True) == data.ALPACA_PROMPT_WITH_INPUT.format(instruction=row["instruction"], input="strong")
    assert tok.decode(expected, skip_special_tokens=True).strip() == "STRONG"
    assert int(expected[-1]) == tok.eos_token_id  # the answer ends with EOS, which decoding drops


def test_left_pad_puts_prompts_at_the_right_edge():
    ids, mask = generation.left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_answers_are_the_same_on_any_world_size_and_equal_unpadded_generate(tiny_llama):
    """Split over 2 ranks (run one after the other here) the answers are those of 1 rank, and each equals
    plain transformers' greedy continuation of its prompt alone, without the left padding of a batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows = [{"instruction": f"Repeat the word {k} times.", "input": w, "output": " ".join([w] * k)}
            for k, w in [(2, "red"), (3, "blue"), (1, "cat"), (4, "dog"), (2, "sun")]]
    samples = data.tokenize_rows(rows, "alpaca", tok, 128, False, "raise", data.DataStats(), "test")
    kw = dict(count=5, batch_size=2, max_new_tokens=6)
    one = generation.greedy_answers(model, tok, samples, **kw)
    two = sorted(generation.greedy_answers(model, tok, samples, world_size=2, rank=0, **kw)
                 + generation.greedy_answers(model, tok, samples, world_size=2, rank=1, **kw), key=lambda a: a.index)
    assert [vars(a) for a in one] == [vars(a) for a in two]
    assert len({len(generation.split_prompt(s)[0]) for s in samples}) > 1  # the batches really are padded
    for a, sample in zip(one, samples):
        prompt, _ = generation.split_prompt(sample)
        assert all(t != IGNORE_INDEX for t in prompt.tolist())
        out = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=6,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=tok.eos_token_id)
        assert a.answer == tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
