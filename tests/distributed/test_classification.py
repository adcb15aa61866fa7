"""task=classification in training (tiny Llama-shaped model): early stopping on eval.metric. ZeRO-3
parity with one process is two rows of tests/distributed/test_zero3.py; the real-model tier
(tests/real_model/test_classification.py) checks the numbers against plain transformers / peft /
pipeline.
"""

from __future__ import annotations

import pytest

from tests.distributed.test_zero3 import CLASSIFY, common
from tests.helpers import launch, read_metrics

pytestmark = pytest.mark.distributed


def test_early_stopping_watches_eval_metric(tiny_llama, tmp_path):
    """eval.metric=accuracy: with a learning rate too small to change a prediction, the second eval
    brings no accuracy gain and patience 1 stops the run there (one process)."""
    over = {**CLASSIFY, "method": "lora", "train.max_steps": 20, "train.lr": 1e-9, "eval.every_steps": 1, "eval.metric": "accuracy",
            "eval.early_stopping_patience": 1, "deepspeed.config": "ds_configs/zero0.json"}
    proc = launch(common(tiny_llama, tmp_path / "run", **over), nproc=1)
    assert "early stopping at step 2: no val_accuracy gain in 1 evals" in proc.stdout, proc.stdout[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "val_accuracy" in r] == [0, 1, 2]
