#!/usr/bin/env python
"""Generate the small synthetic three-class sentiment dataset shipped in harness/assets/.

Why synthetic: the harness must be testable offline (no downloads) on CPU, and a
classification-style fine-tune needs a dataset whose labels a tiny model can
learn in a few hundred steps, yet cannot get right by shortcut.  Every sentence
is built from a frame ("Honestly, the {subject} {predicate}.") x a subject noun x
an opinion or fact phrase, and *the same frames are used for all three labels*,
so the template says nothing about the label: only the predicate words do.
Negation is built in on purpose ("is not bad at all" -> positive, "is not good"
-> negative, "does not come with batteries" -> neutral), as are near-identical
contrast pairs ("is better than I expected" / "is worse than I expected") and
mixed-but-leaning sentences whose label is fixed by a strong second clause
("The kettle is a little pricey, but it works flawlessly." -> positive).

Three domains (products, restaurant dishes, movies), each with its own subjects
and phrases.  Every sentence has 5-25 words.

Files written (all deterministic for a given --seed):

- sentiment_train.jsonl  --train-rows rows (default 1200), {"text": ..., "label": "positive" | "negative" | "neutral"}
- sentiment_val.jsonl    --val-rows rows (default 150), same format

Both splits are exactly class-balanced (counts differ by at most one row).
Train and validation are disjoint, and more strictly so than "no shared text":
the validation set uses a held-out subset of subjects (VAL_SUBJECTS, e.g. the
"toaster" and the "biopic") that never occur in any training sentence, while
the opinion and fact phrases are shared.  Validation accuracy therefore
measures whether the model learnt the opinion words, not the subjects.

Usage: python tools/make_sentiment.py [--out-dir harness/assets] [--seed 0] [--train-rows 1200] [--val-rows 150]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "harness" / "assets"

# Fixed order: the split's label counts and the output are assigned in this order.
LABELS = ["positive", "negative", "neutral"]
MIN_WORDS, MAX_WORDS = 5, 25

DOMAINS = ["product", "restaurant", "movie"]

# Subjects per domain.  The val lists are held out: they are never drawn for
# train, and main() checks no training sentence mentions them.  All singular,
# so "The {subject} is ..." stays grammatical.
TRAIN_SUBJECTS = {
    "product": [
        "blender", "kettle", "vacuum cleaner", "desk lamp", "phone case", "coffee maker",
        "rice cooker", "office chair", "keyboard", "water bottle", "umbrella", "laptop stand",
    ],
    "restaurant": [
        "pasta", "burger", "soup", "curry", "pizza", "steak",
        "salad", "ramen", "lasagna", "taco platter", "pancake stack", "risotto",
    ],
    "movie": [
        "sequel", "documentary", "thriller", "romantic comedy", "war film", "animated film",
        "horror movie", "remake", "mini-series", "western", "musical", "crime drama",
    ],
}
VAL_SUBJECTS = {
    "product": ["toaster", "backpack", "electric toothbrush", "air fryer"],
    "restaurant": ["dumpling platter", "paella", "falafel wrap", "omelette"],
    "movie": ["biopic", "space opera", "detective story", "courtroom drama"],
}

# Predicates (verb phrases that follow the subject), per domain and label.  The
# "shared" ones are added to every domain: they are the minimal pairs that
# differ in one word ("good" / "not good", "better" / "worse"), which is what
# forces a model to read the opinion words rather than match a phrase shape.
SHARED_PREDICATES = {
    "positive": ["is not bad at all", "is good", "is really good", "does not disappoint", "is better than I expected"],
    "negative": ["is not good", "is pretty bad", "is terrible", "is a huge disappointment", "is worse than I expected"],
    "neutral": [],
}
PREDICATES = {
    "product": {
        "positive": [
            "works perfectly", "is worth every penny", "exceeded my expectations", "is sturdy and well made",
            "is a great buy", "never lets me down", "feels very solid", "is easy to use and reliable",
            "has been excellent so far", "is something I would happily buy again",
        ],
        "negative": [
            "broke after two days", "is a waste of money", "stopped working within a week", "is not worth the price",
            "never works properly", "feels cheap and flimsy", "does not work as advertised", "keeps breaking down",
            "is not reliable at all", "is something I regret buying",
        ],
        # Facts only: no hint of whether the writer liked it.  A few are negated,
        # so "not" alone does not signal an opinion either.
        "neutral": [
            "arrived on Tuesday", "comes in blue and grey", "weighs about two kilograms", "is sold in most stores",
            "has a black handle", "came in a cardboard box", "does not come with batteries", "is about thirty centimetres tall",
            "was shipped from a warehouse in Ohio", "comes with a printed manual", "is made of plastic and steel",
            "has a two year warranty", "is not sold in stores", "was delivered to my neighbour", "plugs into a standard outlet",
        ],
    },
    "restaurant": {
        "positive": [
            "tastes amazing", "is full of flavour", "is cooked perfectly", "is the best in town", "never disappoints",
            "is fresh and delicious", "is worth the wait", "is generous and tasty", "is something I would order again",
            "is a real treat",
        ],
        "negative": [
            "tastes bland", "is cold and greasy", "is overcooked", "is not worth the price", "is far too salty",
            "never arrives hot", "is stale", "is not fresh at all", "made me feel sick", "is something I would never order again",
        ],
        "neutral": [
            "is served with rice", "comes with a side salad", "costs twelve dollars", "is on the lunch menu",
            "is made with chicken", "arrives in a small bowl", "is only served on weekends", "does not come with bread",
            "is listed under the specials", "is cooked in a wood oven", "is available for takeaway", "comes in two sizes",
            "is not on the dinner menu", "was brought to the table at eight",
        ],
    },
    "movie": {
        "positive": [
            "is brilliant", "kept me hooked from start to finish", "has wonderful acting", "is worth watching twice",
            "never gets boring", "is moving and beautifully shot", "is a real treat", "is funny and clever",
            "is something I would watch again", "is a joy to watch",
        ],
        "negative": [
            "is boring", "is a waste of two hours", "has terrible acting", "is not funny at all", "never gets interesting",
            "is confusing and dull", "drags on forever", "is not worth the ticket price", "is painful to sit through",
            "is something I would never watch again",
        ],
        "neutral": [
            "runs for about two hours", "was released last spring", "is available on streaming", "was filmed in Canada",
            "is in French with subtitles", "stars two actors from the first film", "is rated for ages twelve and up",
            "is based on a novel", "does not have a scene after the credits", "opens in cinemas on Friday",
            "was made by a first-time director", "is shown twice a day at the local cinema", "is not available on DVD",
            "has a running time of ninety minutes",
        ],
    },
}

# Mixed sentences: "The {s} {minor}, but/and it {strong}."  The minor clause is
# drawn with either polarity regardless of the label (the connective follows:
# "but" when the polarities differ, "and" when they agree), so it carries no
# label information; the strong second clause alone decides, which keeps the
# label unambiguous.
MINOR = {
    "product": {
        "positive": ["looks nice", "comes in a pretty box", "has a nice colour"],
        "negative": ["is a little pricey", "took a while to arrive", "is slightly heavy"],
    },
    "restaurant": {
        "positive": ["looks nice on the plate", "smells lovely", "is cheap"],
        "negative": ["is a bit pricey", "took a while to come out", "is a small portion"],
    },
    "movie": {
        "positive": ["has a nice poster", "has a decent soundtrack", "starts well"],
        "negative": ["starts slowly", "is a little long", "has a weak opening scene"],
    },
}
STRONG = {
    "product": {
        "positive": ["is absolutely fantastic", "works flawlessly", "is completely worth it"],
        "negative": ["is completely useless", "broke within a day", "is an absolute disaster"],
    },
    "restaurant": {
        "positive": ["is absolutely delicious", "tastes fantastic", "is completely worth it"],
        "negative": ["is inedible", "tastes awful", "is an absolute disaster"],
    },
    "movie": {
        "positive": ["is absolutely fantastic", "is a masterpiece", "is completely worth it"],
        "negative": ["is an absolute disaster", "is unbearably dull", "is awful"],
    },
}

# Single-predicate frames.  Shared frames are used for every domain; the
# domain ones add variety.  Every frame is used for every label, so none of
# them predicts the label.  Each frame contains {s}, which is what makes
# "held-out subjects" imply "no shared text" between the splits.
SHARED_FRAMES = [
    "The {s} {p}.",
    "Honestly, the {s} {p}.",
    "In my opinion, the {s} {p}.",
    "I have to say that the {s} {p}.",
    "My sister told me the {s} {p}.",
    "From what I can tell, the {s} {p}.",
    "To sum up, the {s} {p}.",
]
DOMAIN_FRAMES = {
    "product": [
        "I ordered the {s} online, and it {p}.",
        "After a month of daily use, the {s} {p}.",
        "The {s} I bought last week {p}.",
    ],
    "restaurant": [
        "We shared the {s} at dinner, and it {p}.",
        "At the new place downtown, the {s} {p}.",
        "The {s} we ordered for lunch {p}.",
    ],
    "movie": [
        "We watched the {s} on Friday night, and it {p}.",
        "The {s} everyone keeps talking about {p}.",
        "I saw the {s} at the cinema, and it {p}.",
    ],
}


def predicates(domain: str, label: str) -> list[str]:
    return PREDICATES[domain][label] + SHARED_PREDICATES[label]


def negated(phrase: str) -> bool:
    return " not " in f" {phrase} "


def make_sentence(rng: random.Random, label: str, subjects: dict[str, list[str]]) -> str:
    """One sentence of the given label about a subject drawn from `subjects`."""
    domain = rng.choice(DOMAINS)
    subject = rng.choice(subjects[domain])
    kind = rng.random()
    if kind < 0.70:
        frame = rng.choice(SHARED_FRAMES + DOMAIN_FRAMES[domain])
        return frame.format(s=subject, p=rng.choice(predicates(domain, label)))
    if kind < 0.85:
        # Two predicates of the same label joined by "and"; same shape for all labels.  Domain
        # phrases only: the short shared ones overlap ("is good and is really good").
        first, second = rng.sample(PREDICATES[domain][label], 2)
        return f"The {subject} {first} and {second}."
    if label == "neutral":
        # Two facts.  "but" only before a negated fact ("..., but it does not
        # come with batteries"), where it reads naturally and stays factual.
        first, second = rng.sample(PREDICATES[domain]["neutral"], 2)
        return f"The {subject} {first}, {'but' if negated(second) else 'and'} it {second}."
    minor_polarity = rng.choice(["positive", "negative"])
    minor = rng.choice(MINOR[domain][minor_polarity])
    strong = rng.choice(STRONG[domain][label])
    return f"The {subject} {minor}, {'and' if minor_polarity == label else 'but'} it {strong}."


def label_counts(total_rows: int) -> dict[str, int]:
    """Split total_rows as evenly as possible; any remainder goes to the first labels."""
    base, extra = divmod(total_rows, len(LABELS))
    return {label: base + (1 if index < extra else 0) for index, label in enumerate(LABELS)}


def generate_split(
    rng: random.Random, total_rows: int, subjects: dict[str, list[str]], forbidden_texts: set[str]
) -> list[dict[str, str]]:
    """Draw total_rows distinct sentences (exact per-label counts), none in forbidden_texts."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()  # membership tests only; never iterated, so hash order cannot leak into the output
    for label, count in label_counts(total_rows).items():
        attempts = 0
        while count > 0:
            attempts += 1
            if attempts > 200 * max(total_rows, 1):
                raise RuntimeError(f"label {label!r}: sentence space too small for {total_rows} rows")
            text = make_sentence(rng, label, subjects)
            if text in seen or text in forbidden_texts or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
            count -= 1
    # Rows were produced label by label; shuffle so a file prefix is balanced too.
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def display_path(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-rows", type=int, default=1200)
    parser.add_argument("--val-rows", type=int, default=150)
    args = parser.parse_args(argv)

    # One RNG per split, derived from the seed (string seeds are hashed with
    # SHA-512 by random.Random, independent of PYTHONHASHSEED): changing the
    # size of one split does not reshuffle the other.
    val = generate_split(random.Random(f"{args.seed}-sentiment-val"), args.val_rows, VAL_SUBJECTS, set())
    val_texts = {row["text"] for row in val}
    train = generate_split(random.Random(f"{args.seed}-sentiment-train"), args.train_rows, TRAIN_SUBJECTS, val_texts)

    # Held-out subjects must not leak into train through some phrase that happens to contain them.
    held_out = [subject for domain in DOMAINS for subject in VAL_SUBJECTS[domain]]
    leaks = [row["text"] for row in train if any(subject in row["text"].lower() for subject in held_out)]
    if leaks:
        raise RuntimeError(f"held-out subject appears in train: {leaks[:3]}")

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in [("sentiment_train.jsonl", train), ("sentiment_val.jsonl", val)]:
        path = out_dir / name
        write_jsonl(path, rows)
        counts = ", ".join(f"{label}={sum(row['label'] == label for row in rows)}" for label in LABELS)
        print(f"{display_path(path)}: {len(rows)} rows ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
