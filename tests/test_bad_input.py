"""Acceptance: bad input gives a one-line error naming the problem and the fix, a non-zero exit (2),
before any rank loads a model. Runs the real entry point, harness/train.py, as a subprocess."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import REPO, launch

ASSET = REPO / "harness" / "assets" / "tiny_instruct.jsonl"
SENTIMENT = REPO / "harness" / "assets" / "sentiment_train.jsonl"
MODEL_LOADING = ("Loading weights", "Loading checkpoint", "from_pretrained", "parameters:", "model: ")

# Runs harness/train.py's main() with bitsandbytes unimportable: sys.modules[name] = None makes
# `import bitsandbytes` raise ImportError and importlib.util.find_spec("bitsandbytes") return None.
NO_BNB = """\
import sys
sys.modules["bitsandbytes"] = None
from harness.train import main
sys.exit(main())
"""

# Rank 0 starts late (as on a slow shared filesystem); the other rank fails validation first.
RANK0_LATE = """\
import os, sys, time
if os.environ.get("RANK") == "0":
    time.sleep(4)
from harness.train import main
sys.exit(main())
"""


def recipe_text(model: Path, out: Path, extra_train: str = "") -> str:
    return textwrap.dedent(f"""\
        model:
          path: {model}
        method: lora
        data:
          sources:
            - path: {ASSET}
              format: alpaca
          seq_len: 64
        train:
          micro_batch_size: 2
          global_batch_size: 8
          max_steps: 1
        {extra_train}
        eval:
          every_steps: 0
        log:
          progress_bar: false
        deepspeed:
          config: {REPO / "ds_configs" / "zero2.json"}
        output_dir: {out}
        """)


# case id -> (recipe file, extra CLI overrides, script, strings the error line must contain)
def cases(root: Path, model: Path) -> dict:
    good = root / "good.yaml"
    good.write_text(recipe_text(model, root / "out"))
    typo = root / "typo.yaml"
    typo.write_text(recipe_text(model, root / "out", extra_train="  lerning_rate: 1.0e-3"))
    typo_line = next(i for i, line in enumerate(typo.read_text().splitlines(), 1) if "lerning_rate" in line)
    no_bnb = root / "no_bnb.py"
    no_bnb.write_text(NO_BNB)
    bad_label = root / "bad_label.jsonl"
    bad_label.write_text('{"text": "fine", "label": "positive"}\n{"text": "awful", "label": "negativ"}\n')
    cls = ["task=classification", f"data.sources.0.path={SENTIMENT}", "data.sources.0.format=text", "data.labels=[negative,neutral,positive]"]
    return {
        "unknown-key": (typo, [], None, [f"typo.yaml:{typo_line}:", "'train.lerning_rate'", "did you mean 'train.lr'"]),
        "missing-model": (good, [f"model.path={root / 'no-such-model'}"], None,
                          ["model.path", str(root / "no-such-model"), "point model.path at"]),
        "micro-batch": (good, ["train.micro_batch_size=3"], None,
                        ["train.global_batch_size=8", "micro_batch_size", "3 x 1", "pick a global batch that is a multiple of 3"]),
        "qlora-no-bitsandbytes": (good, ["method=qlora"], no_bnb,
                                  ["method 'qlora'", "bitsandbytes", "pip install", "method=lora"]),
        "missing-dataset": (good, [f"data.sources.0.path={root / 'nope.jsonl'}"], None,
                            ["data.sources.0.path", str(root / "nope.jsonl"), "does not exist", "fix the path"]),
        # task=classification
        "cls-unknown-label": (good, [*cls, f"data.sources.0.path={bad_label}", f"output_dir={root / 'out_data'}"], None,
                              [f"{bad_label}:2:", "label 'negativ' is not one of data.labels", "add the class to data.labels"]),
        "cls-empty-labels": (good, [*cls, "data.labels=[]"], None, ["at least two classes in data.labels", "data.labels=[negative"]),
        "cls-chat-format": (good, [*cls, "data.sources.0.format=chat"], None,
                            ["data.sources.0.format is 'chat'", "rows {text, label}", "data.sources.0.format=text"]),
        "cls-packing": (good, [*cls, "data.packing=true"], None, ["data.packing", "one token per row", "set it false"]),
        "cls-fused-loss": (good, [*cls, "kernels=[linear_cross_entropy]"], None,
                           ["linear_cross_entropy", "no LM head", "drop linear_cross_entropy from kernels"]),
        "labels-without-task": (good, ["data.labels=[negative,positive]"], None, ["task is causal_lm", "set task=classification"]),
        "f1-without-task": (good, ["eval.metric=f1"], None, ["eval.metric=f1", "use eval.metric=loss"]),
        # method=prompt_tuning
        "pt-fused-loss": (good, ["method=prompt_tuning", "kernels=[linear_cross_entropy]"], None,
                          ["linear_cross_entropy", "20 virtual positions", "drop linear_cross_entropy from kernels"]),
        "pt-packing": (good, ["method=prompt_tuning", "data.packing=true"], None, ["data.packing", "method=prompt_tuning", "set it false"]),
        "pt-empty-init-text": (good, ["method=prompt_tuning", "prompt_tuning.init=text"], None,
                               ["prompt_tuning.init_text", "is empty", "prompt_tuning.init=random"]),
    }


# Rows are read after the run has taken its output_dir lock (and before the model): those cases may create output_dir.
DATA_CASES = {"cls-unknown-label"}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_llama):
    """Every case's CompletedProcess, launched concurrently (each is mostly interpreter start-up)."""
    root = tmp_path_factory.mktemp("bad_input")
    table = cases(root, Path(tiny_llama))

    def run(item):
        name, (recipe, overrides, script, _) = item
        kw = {"script": str(script)} if script else {}
        return name, launch(["--config", str(recipe), *overrides], check=False, timeout_s=120, **kw)

    with ThreadPoolExecutor(max_workers=len(table)) as pool:
        procs = dict(pool.map(run, table.items()))
    return root, table, procs


def test_good_recipe_is_valid(bad_runs):
    """The base recipe passes validation, so each case fails for its own reason only."""
    from harness.config import load_recipe, validate

    root, table, _ = bad_runs
    validate(load_recipe(str(root / "good.yaml"), []), 1)
    validate(load_recipe(str(root / "good.yaml"), ["train.micro_batch_size=4"]), 2)


def assert_one_line_error(proc, must_contain, output_dir: Path, data_case: bool = False):
    both = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line on stderr\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    for s in must_contain:
        assert s in errors[0], f"{s!r} not in {errors[0]!r}"
    assert "Traceback" not in both, both[-3000:]
    for s in MODEL_LOADING if not data_case else ("Loading weights", "parameters:", "model: "):  # (the plan's lines name from_pretrained)
        assert s not in both, f"model-loading output {s!r} appeared:\n{both[-3000:]}"
    assert data_case or not output_dir.exists(), "the run got as far as setup() (output_dir was created)"


@pytest.mark.parametrize("case", ["unknown-key", "missing-model", "micro-batch", "qlora-no-bitsandbytes", "missing-dataset",
                                  "cls-unknown-label", "cls-empty-labels", "cls-chat-format", "cls-packing", "cls-fused-loss",
                                  "labels-without-task", "f1-without-task", "pt-fused-loss", "pt-packing", "pt-empty-init-text"])
def test_bad_input_one_line_error(bad_runs, case):
    root, table, procs = bad_runs
    proc = procs[case]
    assert proc.returncode == 2, f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-3000:]}"
    assert_one_line_error(proc, table[case][3], root / "out", data_case=case in DATA_CASES)


@pytest.mark.distributed
def test_bad_input_two_ranks_prints_once(tmp_path, tiny_llama):
    recipe = tmp_path / "good.yaml"
    recipe.write_text(recipe_text(Path(tiny_llama), tmp_path / "out"))
    proc = launch(["--config", str(recipe), "train.micro_batch_size=3"], nproc=2, check=False, timeout_s=120)
    assert proc.returncode != 0
    both = proc.stdout + proc.stderr
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected the error once\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "micro_batch_size" in errors[0] and "3 x 2" in errors[0] and "multiple of 6" in errors[0], errors[0]
    assert not any(s in both for s in ("Loading weights", "parameters:")) and not (tmp_path / "out").exists()


@pytest.mark.distributed
@pytest.mark.serial  # a timed slow rank 0: never beside another test
def test_bad_input_two_ranks_error_survives_slow_rank0(tmp_path, tiny_llama):
    recipe = tmp_path / "good.yaml"
    recipe.write_text(recipe_text(Path(tiny_llama), tmp_path / "out"))
    script = tmp_path / "rank0_late.py"
    script.write_text(RANK0_LATE)
    proc = launch(["--config", str(recipe), "train.micro_batch_size=3"], nproc=2, check=False, timeout_s=120, script=str(script))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
