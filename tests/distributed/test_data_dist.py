"""Data pipeline on 2 gloo ranks: rank 0 tokenises once and the other rank loads its cache; mixed,
packed data gives the same losses as one process; a data error on rank 0 stops every rank."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, launch, read_metrics, train_losses

pytestmark = pytest.mark.distributed

ASSETS = REPO / "harness" / "assets"


def args(model, out, cache, *extra) -> list[str]:
    return ["--config", str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), f"model.path={model}", f"output_dir={out}",
            f"data.cache_dir={cache}", "method=full", "train.lr=1e-3", "train.max_steps=4", "train.warmup_steps=1",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.gradient_checkpointing=none", "eval.every_steps=0",
            "log.every_steps=1", "log.progress_bar=false", "data.packing=true", "data.val_path=",
            f"data.sources=[{{path: '{ASSETS / 'tiny_instruct.jsonl'}', format: alpaca, weight: 2}}, "
            f"{{path: '{ASSETS / 'tiny_chat.jsonl'}', format: chat, weight: 1}}]", *extra]


def test_rank0_tokenises_once_and_packed_mixed_losses_match_one_process(tiny_llama, tmp_path):
    launch(args(tiny_llama, tmp_path / "one", tmp_path / "cache1", "deepspeed.config=ds_configs/zero0.json"), nproc=1)
    proc = launch(args(tiny_llama, tmp_path / "two", tmp_path / "cache2", "deepspeed.config=ds_configs/zero3.json"), nproc=2)
    out = proc.stdout + proc.stderr
    assert out.count("rank 0: tokenised") == 1 and "rank 1: tokenised" not in out, out[-3000:]
    assert len(list((tmp_path / "cache2").glob("tokens-*"))) == 1
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    err = max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True))
    print(f"1 process {one}\n2 ranks   {two}\nmax relative error {err:.2e}")
    assert err <= 1e-4
    d = read_metrics(tmp_path / "two")[0]["data"]
    assert d["cache"] == "miss" and [round(m["share"], 2) for m in d["mix"]] == [0.67, 0.33]


def test_a_data_error_on_rank0_stops_every_rank(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    proc = launch(args(tiny_llama, tmp_path / "out", tmp_path / "cache", "deepspeed.config=ds_configs/zero3.json",
                       f"data.sources=[{{path: '{bad}', format: alpaca}}]"), nproc=2, check=False, timeout_s=300)
    assert proc.returncode != 0
    assert f"error: {bad}:2: malformed JSON line" in proc.stderr and f"error: (rank 1) {bad}:2: malformed JSON line" in proc.stderr
