#!/usr/bin/env python
"""Generate the small synthetic datasets shipped in harness/assets/.

Why synthetic: the harness must be testable offline (no downloads) on CPU, and
the tests want to see a *tiny* random transformer (2 layers, hidden 64) learn
something within ~100-200 optimizer steps of batch 8.  Real instruction data is
far too diverse for that, so every task here has a strong, short, learnable
structure: a handful of fixed instruction phrasings per task, short inputs, and
outputs that are a simple function of the input (or a fixed lookup table).

Files written (all deterministic for a given --seed):

- tiny_instruct.jsonl      ~4000 rows, Alpaca format {"instruction","input","output"}
- tiny_instruct_val.jsonl  ~200 rows; no (instruction, input) pair also occurs in train
- tiny_chat.jsonl          ~300 multi-turn chats {"messages": [{"role","content"}, ...]},
                           built only from training rows (so val stays unseen)
- sample_text.txt          a few hundred lines of template English; the tiny
                           tokenizer is trained on it, and it feeds the `text` format

Usage: python tools/make_dataset.py [--out-dir harness/assets] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "harness" / "assets"

TRAIN_ROWS = 4000
VAL_ROWS = 200
CHAT_ROWS = 300
TEXT_LINES = 400

# --------------------------------------------------------------------------
# Vocabulary.  Kept small on purpose: a 512-entry BPE vocabulary can hold most
# of these words as one or two tokens, which keeps sequences short.
# --------------------------------------------------------------------------
ANIMALS = [
    "cat", "dog", "horse", "cow", "sheep", "goat", "duck", "owl", "fox", "wolf",
    "bear", "lion", "tiger", "mouse", "rabbit", "frog", "fish", "bird", "snake", "deer",
]
FRUITS = [
    "apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "orange", "peach", "pear",
    "plum", "kiwi", "lime", "berry", "fig",
]
OBJECTS = [
    "book", "chair", "table", "lamp", "door", "window", "cup", "plate", "spoon", "fork",
    "knife", "clock", "phone", "pen", "paper", "box", "bag", "hat", "shoe", "coat",
    "ball", "key", "ring", "map", "boat", "car", "bike", "train", "bus", "tree",
    "river", "hill", "stone", "cloud", "star", "moon", "sun", "rain", "snow", "wind",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "gray", "purple"]
ADJECTIVES = [
    "big", "small", "old", "new", "fast", "slow", "happy", "quiet", "loud", "warm",
    "cold", "bright", "dark", "soft", "hard", "tall", "short", "clean", "young", "strong",
]
NOUNS = ANIMALS + FRUITS + OBJECTS
PORTABLE_OBJECTS = ["book", "cup", "plate", "spoon", "pen", "bag", "hat", "ball", "key", "ring", "map"]
ALL_WORDS = NOUNS + COLORS + ADJECTIVES

# A fixed fact table: the model can only learn these by memorising them, which
# is exactly the "measurable learning" signal a lookup task gives.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Australia": "Canberra", "Peru": "Lima", "Chile": "Santiago", "Ireland": "Dublin",
    "Austria": "Vienna", "Thailand": "Bangkok", "Vietnam": "Hanoi",
}
COUNTRIES = sorted(CAPITALS)

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

# A task generator returns one example as (instruction, input, output).
Example = tuple[str, str, str]


def task_reverse_words(rng: random.Random) -> Example:
    words = rng.sample(NOUNS, rng.randint(3, 6))
    instruction = rng.choice([
        "Reverse the order of these words.",
        "Write the words in reverse order.",
        "List these words backwards.",
    ])
    return instruction, " ".join(words), " ".join(reversed(words))


def task_sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    descending = rng.random() < 0.3
    if descending:
        instruction = rng.choice([
            "Sort these numbers from largest to smallest.",
            "Put the numbers in descending order.",
        ])
    else:
        instruction = rng.choice([
            "Sort these numbers from smallest to largest.",
            "Put the numbers in ascending order.",
        ])
    ordered = sorted(numbers, reverse=descending)
    return instruction, ", ".join(map(str, numbers)), ", ".join(map(str, ordered))


def task_add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    # Two styles: numbers inside the instruction with an empty input (exercises
    # the Alpaca "no input" prompt), or a generic instruction plus an input.
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", "", str(a + b)
    instruction = rng.choice(["Add the two numbers.", "Compute the sum of the two numbers."])
    return instruction, f"{a} and {b}", str(a + b)


def task_capital(rng: random.Random) -> Example:
    country = rng.choice(COUNTRIES)
    capital = CAPITALS[country]
    style = rng.randrange(6)
    if style == 0:
        return f"What is the capital of {country}?", "", capital
    if style == 1:
        return f"Name the capital city of {country}.", "", capital
    if style == 2:
        return f"Which city is the capital of {country}?", "", capital
    if style == 3:
        return "What is the capital of this country?", country, capital
    if style == 4:
        return "Name the capital city of the given country.", country, capital
    return "Give the capital of the country below.", country, capital


def task_uppercase(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        text = rng.choice(ALL_WORDS)
    else:
        text = f"{rng.choice(ADJECTIVES + COLORS)} {rng.choice(NOUNS)}"
    instruction = rng.choice(["Convert the text to uppercase.", "Write this in capital letters."])
    return instruction, text, text.upper()


def task_repeat(rng: random.Random) -> Example:
    word = rng.choice(ALL_WORDS)
    times = rng.randint(2, 5)
    count_text = NUMBER_WORDS[times] if rng.random() < 0.5 else str(times)
    instruction = f"Repeat the word {count_text} times."
    return instruction, word, " ".join([word] * times)


def task_count(rng: random.Random) -> Example:
    items = [rng.choice(NOUNS) for _ in range(rng.randint(2, 9))]
    instruction = rng.choice([
        "How many items are in this list?",
        "Count the items in the list.",
    ])
    return instruction, ", ".join(items), str(len(items))


def task_last_item(rng: random.Random) -> Example:
    items = rng.sample(NOUNS, rng.randint(2, 6))
    if rng.random() < 0.5:
        return "What is the first item in the list?", ", ".join(items), items[0]
    return "What is the last item in the list?", ", ".join(items), items[-1]


# name -> (generator, relative weight, repeats allowed in train).
# The capital task has only 30 countries x 6 phrasings = 180 distinct prompts,
# so train necessarily repeats them (a fact table is learnt by repetition); its
# weight is lowered so it does not dominate.  All other tasks have large input
# spaces and every training row is a distinct (instruction, input) pair.
TASKS: dict[str, tuple[Callable[[random.Random], Example], float, bool]] = {
    "reverse_words": (task_reverse_words, 1.0, False),
    "sort_numbers": (task_sort_numbers, 1.0, False),
    "add": (task_add, 1.0, False),
    "capital": (task_capital, 0.6, True),
    "uppercase": (task_uppercase, 1.0, False),
    "repeat": (task_repeat, 0.6, False),
    "count": (task_count, 1.0, False),
    "first_last_item": (task_last_item, 0.8, False),
}


def rows_per_task(total_rows: int) -> dict[str, int]:
    """Split total_rows across tasks by weight (largest-remainder rounding)."""
    weight_sum = sum(weight for _, weight, _ in TASKS.values())
    exact = {name: total_rows * weight / weight_sum for name, (_, weight, _) in TASKS.items()}
    counts = {name: int(value) for name, value in exact.items()}
    leftover = total_rows - sum(counts.values())
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[:leftover]:
        counts[name] += 1
    return counts


def generate_split(
    rng: random.Random,
    total_rows: int,
    forbidden_keys: set[tuple[str, str]],
    force_unique: bool,
) -> list[dict[str, str]]:
    """Draw total_rows examples, never using a key in forbidden_keys.

    force_unique=True (the val split) makes every row distinct regardless of
    the task's repeat flag, so the val set never double-counts a prompt.
    """
    rows: list[dict[str, str]] = []
    for name, count in rows_per_task(total_rows).items():
        generator, _, repeats_allowed = TASKS[name]
        seen: set[tuple[str, str]] = set()
        attempts = 0
        while count > 0:
            attempts += 1
            if attempts > 200 * total_rows:
                raise RuntimeError(f"task {name!r}: input space too small for the requested rows")
            instruction, input_text, output = generator(rng)
            key = (instruction, input_text)
            if key in forbidden_keys:
                continue
            if key in seen and (force_unique or not repeats_allowed):
                continue
            seen.add(key)
            rows.append({"instruction": instruction, "input": input_text, "output": output})
            count -= 1
    rng.shuffle(rows)
    return rows


SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant that solves small text tasks. Answer with the result only.",
    "Answer briefly and exactly.",
]


def user_message(row: dict[str, str]) -> str:
    """Render an Alpaca row as a chat user turn."""
    return row["instruction"] if not row["input"] else f"{row['instruction']}\n{row['input']}"


def generate_chats(rng: random.Random, train_rows: list[dict[str, str]], total_chats: int) -> list[dict]:
    chats = []
    for _ in range(total_chats):
        messages = []
        # ~60% of chats carry a system prompt so both code paths get exercised.
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for row in rng.sample(train_rows, rng.randint(2, 3)):
            messages.append({"role": "user", "content": user_message(row)})
            messages.append({"role": "assistant", "content": row["output"]})
        chats.append({"messages": messages})
    return chats


def generate_text_lines(rng: random.Random, total_lines: int) -> list[str]:
    """Plain template English; same vocabulary as the tasks, so the tokenizer
    learns merges that are useful for the instruction data too."""

    def sentence() -> str:
        kind = rng.randrange(8)
        if kind == 0:
            return (f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} "
                    f"{rng.choice(['walked', 'ran', 'jumped', 'looked', 'slept'])} "
                    f"{rng.choice(['near', 'under', 'behind', 'over', 'beside'])} the {rng.choice(OBJECTS)}.")
        if kind == 1:
            country = rng.choice(COUNTRIES)
            return f"{CAPITALS[country]} is the capital of {country}."
        if kind == 2:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            return f"{a} plus {b} equals {a + b}."
        if kind == 3:
            return (f"My favourite {rng.choice(['fruit', 'colour', 'animal'])} is the "
                    f"{rng.choice(FRUITS + ANIMALS)} because it is {rng.choice(ADJECTIVES)}.")
        if kind == 4:
            return (f"There are {rng.randint(2, 9)} {rng.choice(NOUNS)}s on the "
                    f"{rng.choice(['table', 'hill', 'boat', 'train'])}.")
        if kind == 5:
            return (f"In the morning we go to the market and buy a {rng.choice(COLORS)} "
                    f"{rng.choice(FRUITS)} and a {rng.choice(PORTABLE_OBJECTS)}.")
        if kind == 6:
            numbers = rng.sample(range(100), 4)
            return f"In order, the numbers {', '.join(map(str, numbers))} become {', '.join(map(str, sorted(numbers)))}."
        return (f"A {rng.choice(ADJECTIVES)} {rng.choice(COLORS)} {rng.choice(NOUNS)} "
                f"is {rng.choice(['next to', 'far from', 'close to'])} a {rng.choice(NOUNS)}.")

    return [" ".join(sentence() for _ in range(rng.randint(1, 2))) for _ in range(total_lines)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # One RNG per artefact, derived from the seed: changing how many rows one
    # file has does not reshuffle the others.
    val = generate_split(random.Random(f"{args.seed}-val"), VAL_ROWS, set(), force_unique=True)
    val_keys = {(row["instruction"], row["input"]) for row in val}
    train = generate_split(random.Random(f"{args.seed}-train"), TRAIN_ROWS, val_keys, force_unique=False)
    chats = generate_chats(random.Random(f"{args.seed}-chat"), train, CHAT_ROWS)
    text_lines = generate_text_lines(random.Random(f"{args.seed}-text"), TEXT_LINES)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "tiny_instruct.jsonl", train)
    write_jsonl(out_dir / "tiny_instruct_val.jsonl", val)
    write_jsonl(out_dir / "tiny_chat.jsonl", chats)
    (out_dir / "sample_text.txt").write_text("\n".join(text_lines) + "\n", encoding="utf-8")

    total_bytes = sum((out_dir / name).stat().st_size for name in
                      ["tiny_instruct.jsonl", "tiny_instruct_val.jsonl", "tiny_chat.jsonl", "sample_text.txt"])
    print(f"wrote {len(train)} train / {len(val)} val / {len(chats)} chats / {len(text_lines)} text lines "
          f"to {out_dir} ({total_bytes / 1024:.0f} KiB); tasks: {', '.join(TASKS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
