"""task=classification, unit tier: the scores (against a per-sample count written here), the labelled
samples the data pipeline builds. (Recipe checks: tests/test_bad_input.py; the shipped recipe:
tests/test_recipes.py; training: tests/distributed/ and tests/real_model/test_classification.py.)"""

from __future__ import annotations

import random

import pytest

from harness import classification, config, data
from harness.data.stats import DataStats

LABELS = ["negative", "neutral", "positive"]


def test_scores_match_a_count_over_samples():
    rng = random.Random(0)
    truth = [rng.randrange(3) for _ in range(200)]
    pred = [t if rng.random() < 0.6 else rng.randrange(3) for t in truth]
    confusion = [[sum(1 for t, p in zip(truth, pred) if (t, p) == (i, j)) for j in range(3)] for i in range(3)]
    got = classification.scores(confusion)
    f1s = []
    for c in range(3):
        tp = sum(t == p == c for t, p in zip(truth, pred))
        fp = sum(p == c != t for t, p in zip(truth, pred))
        fn = sum(t == c != p for t, p in zip(truth, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert got["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, pred)) / 200)
    assert got["f1"] == pytest.approx(sum(f1s) / 3)
    # a class never predicted and never true scores F1 0 and pulls macro-F1 down (not skipped)
    assert classification.scores([[5, 0], [0, 0]])["f1"] == pytest.approx(0.5)
    report = classification.report_markdown(confusion, LABELS, 7, {"accuracy": 0.3, "f1": 0.2})
    assert "| negative | " + " | ".join(map(str, confusion[0])) + " |" in report and "30.0% ->" in report


@pytest.mark.parametrize(("value", "labels", "want"), [
    ("positive", LABELS, 2),
    (1, LABELS, 1),  # an index
    (1.0, LABELS, 1),  # a float from a column that also holds nulls
    (1, ["1", "2", "3"], 0),  # a number that is a class name is the name (star ratings), not an index
    (3, ["1", "2", "3"], 2),
    (5, LABELS, "neither a class name nor an index"),
    ("Positive", LABELS, "is not one of data.labels"),
    (True, LABELS, "must be a class name or index"),
    (None, LABELS, "no field 'label'"),
])
def test_label_index(value, labels, want):
    got, problem = data.label_index(value, labels)
    if isinstance(want, int):
        assert (got, problem) == (want, None)
    else:
        assert got is None and want in problem


def test_labelled_samples_put_the_class_on_the_last_real_token(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pad = data.pad_token_id(tok)
    rows = [{"text": "the film is great", "label": "positive"}, {"text": "it is blue", "label": 1},
            {"text": "bad " * 40, "label": "negative"}, {"text": "x" + tok.decode([pad]), "label": 0}]
    st = DataStats()
    samples = data.tokenize_rows(rows, "text", tok, 16, False, "raise", st, "rows.jsonl", labels=LABELS)
    assert len(samples) == 4 and st.truncated == 1
    for (ids, targets), row in zip(samples, rows):
        want = row["label"] if isinstance(row["label"], int) else LABELS.index(row["label"])
        assert targets[-1] == want and (targets[:-1] == data.IGNORE_INDEX).all()  # one target per sample
        assert ids[-1] != pad  # transformers pools the last non-pad token: it must be the labelled one
    assert samples[0][0].tolist() == tok("the film is great").input_ids  # the tokenizer's own special tokens, no EOS
    with pytest.raises(config.ConfigError, match=r"rows.jsonl: row 2: label 5 is neither a class name nor an index"):
        data.tokenize_rows([rows[0], {"text": "a", "label": 5}], "text", tok, 16, False, "raise", DataStats(), "rows.jsonl", labels=LABELS)

