"""The harness against independent references (tests/reference.py), on the real SmolLM2-135M-Instruct.

For every method (full, lora, qlora) under ZeRO-0 on one process and ZeRO-3 on 2 ranks with both
loaders, the harness's own `evaluate` and `train_step` (driven by reference_probe.py) must equal plain
transformers / peft / bitsandbytes / torch within 1e-4 relative (fp32):
- the validation loss at step 0, in padded and in packed (one row per micro-batch) batches;
- every trainable tensor's gradient in step 1 (relative norm error; gathered from ZeRO-3), computed
  after that eval pass;
- the optimizer update of step 1 against torch AdamW (after global-norm clipping, weight decay on)
  applied to the same gradients from the same weights;
- where a case asks for them (ANSWERS), the greedy answers at step 0, generated between that eval pass
  and step 1's gradient, against plain transformers `generate()` on the base model, token for token;
- for the cases marked resumed: the validation loss after step 1, in the same process before a
  checkpoint save and in a new process resumed from that checkpoint, and the resumed run's step-2
  gradients, against the reference at the harness's weights after step 1.
For QLoRA the loss reference is the model quantised by transformers + bitsandbytes, and the
gradients are taken on that model dequantised into plain fp32 weights.

The training batch is a 4-row file (4 = the global batch), so step 1 and step 2 each see exactly those
rows, whatever order the sampler deals them in: 1 micro-batch of 2 per rank on 2 ranks, 2 accumulated
micro-batches on 1.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests import reference as ref
from tests.helpers import REPO, child_env, launch

pytestmark = [pytest.mark.distributed, pytest.mark.real_model]
PROBE = str(REPO / "tests" / "real_model" / "reference_probe.py")
RECIPE = str(REPO / "harness" / "recipes" / "demo_qlora.yaml")
FORCE_REPACK = REPO / "tests" / "bnb_repack"
TOL = 1e-4
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-4, 0.01, 1.0
LORA = ref.Lora(r=8, alpha=16, dropout=0.0)

# 4 greedy answers of up to 8 tokens at step 0 (train.answer_eval), in 2 batches of 2: one per rank
ANSWERS = ["eval.generate_samples=4", "eval.generate_batch_size=2", "eval.max_new_tokens=8"]
PROMPT_TEXT = "Answer with the result only."
PROMPT = ["prompt_tuning.num_virtual_tokens=8", "prompt_tuning.init=text", f"prompt_tuning.init_text={PROMPT_TEXT}"]
# name: (method, deepspeed config, ranks, loader, resumed in a new process, extra overrides)
CASES = {
    "full-zero0": ("full", "zero0", 1, "hf", False, []),
    "lora-zero0": ("lora", "zero0", 1, "hf", False, []),
    "qlora-zero0": ("qlora", "zero0", 1, "hf", False, []),
    "full-zero3-streamed": ("full", "zero3", 2, "streamed", True, []),
    "lora-zero3-streamed": ("lora", "zero3", 2, "streamed", True, []),
    # greedy answers (the whole model gathered) before step 1's gradient, each compared with plain bitsandbytes
    "qlora-zero3-streamed": ("qlora", "zero3", 2, "streamed", True, ANSWERS),
    "full-zero3-hf": ("full", "zero3", 2, "hf", False, []),
    "lora-zero3-hf": ("lora", "zero3", 2, "hf", False, []),
    # training rows packed: the 4 samples in 2 rows of up to 128 tokens (1 row per rank and step)
    "qlora-zero3-hf-packed": ("qlora", "zero3", 2, "hf", False, ["data.packing=true", "train.global_batch_size=2", "train.micro_batch_size=1"]),
    "lora-zero3-hf-packed": ("lora", "zero3", 2, "hf", False, ["data.packing=true", "train.global_batch_size=2", "train.micro_batch_size=1"]),
    # one process: the 2 packed rows are 2 micro-batches, accumulated
    "full-zero0-packed": ("full", "zero0", 1, "hf", False, ["data.packing=true", "train.global_batch_size=2", "train.micro_batch_size=1"]),
    # gradient checkpointing recomputes every layer in backward, re-gathering its ZeRO-3 shards
    "lora-zero3-streamed-checkpointed": ("lora", "zero3", 2, "streamed", False, ["train.gradient_checkpointing=full"]),
    # a soft prompt of 8 virtual tokens on the frozen 16-bit base, started from the embeddings of a text; the
    # reference is written in plain torch (ZeRO-3 on 2 ranks against one process: tests/distributed/test_zero3.py)
    "prompt_tuning-zero0": ("prompt_tuning", "zero0", 1, "hf", False, PROMPT),
    "prompt_tuning-zero3-streamed": ("prompt_tuning", "zero3", 2, "streamed", False, PROMPT),
    # the same prompt over an NF4 base: its gradient flows through bitsandbytes' 4-bit layers (repacking forced)
    "prompt_tuning-4bit-zero3-streamed": ("prompt_tuning", "zero3", 2, "streamed", False, [*PROMPT, "prompt_tuning.base_4bit=true"]),
}
# Every case takes 0.5-2 minutes on 2 CPU cores (all 15: about 15 minutes) (ZeRO-3 there costs seconds of hooks and gathers per
# forward), so CI runs the three below, which between them cover ZeRO-0 and ZeRO-3, padded and packed
# training rows, gradient accumulation (2 micro-batches), the loader of each stage and a resume; the
# other methods' own code (LoRA adapters, 4-bit base) is in qlora, and the demo test adds ZeRO-3 QLoRA
# against plain peft. HARNESS_REFERENCE_CASES=all runs all of them, or name cases with commas.
CI_CASES = ["full-zero0-packed", "qlora-zero3-streamed", "prompt_tuning-zero0"]
_chosen = os.environ.get("HARNESS_REFERENCE_CASES", "")
RUN = list(CASES) if _chosen == "all" else _chosen.split(",") if _chosen else CI_CASES
FIGURES: dict[str, dict] = {}  # printed at the end of each case: the closing note's figures


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference_data")
    train = ref.read_jsonl(REPO / "harness" / "assets" / "tiny_instruct.jsonl", 4)
    val = ref.read_jsonl(REPO / "harness" / "assets" / "tiny_instruct_val.jsonl", 16)
    for name, part in (("train", train), ("val", val)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return d, train, val


_REFERENCES: dict[str, dict] = {}  # method -> the reference model and its step-0 figures (first case computes)


def reference(model_dir, method: str, init: dict | None, train_rows: list[dict], val_rows: list[dict], four_bit: bool = False) -> dict:
    """The reference model of one method at its starting point (the adapters from `init`), with its
    step-0 validation loss and step-1 gradients."""
    key = method + ("-4bit" if four_bit else "")
    if key in _REFERENCES:
        known = _REFERENCES[key]
        if init is not None:  # the adapters start the same whatever the loader, ZeRO stage or world size
            assert known["init"].keys() == init.keys() and all(bool((known["init"][k] == init[k]).all()) for k in init)
        return known
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = {"train": ref.examples(train_rows, tok), "val": ref.examples(val_rows, tok)}
    model = ref.load_base(model_dir, quantized=method == "qlora" or four_bit)
    if method == "qlora" or four_bit:
        # plain transformers + bitsandbytes, 4-bit (with the soft prompt, for prompt tuning)
        bnb = ref.SoftPrompt(model, init["prompt_encoder.default.embedding.weight"]) if method == "prompt_tuning" else model
        out["val_step0_bnb"] = ref.mean_loss(bnb, out["val"])
        model = ref.dequantized(model)
    if method == "prompt_tuning":
        # init=text: the prompt starts as the embeddings of the text's tokens, cut or repeated to P (peft's rule)
        text_ids = tok(PROMPT_TEXT).input_ids
        want_init = model.get_input_embeddings().weight[(text_ids * 8)[:8]].detach()
        assert torch.equal(init["prompt_encoder.default.embedding.weight"], want_init), "the soft prompt did not start from init_text"
        model = ref.SoftPrompt(model, init["prompt_encoder.default.embedding.weight"])
        if not four_bit:  # the same gradient through plain peft's own prompt tuning, on a base of its own
            prompt = init["prompt_encoder.default.embedding.weight"]
            (grad,) = ref.gradients(ref.PeftSoftPrompt(ref.load_base(model_dir, quantized=False), prompt), out["train"]).values()
            out["grads_step1_peft"] = {"prompt_encoder.default.embedding.weight": grad}
    elif method != "full":
        model = ref.with_lora(model, LORA, init)
    out["model"], out["init"] = model, {n: p.detach().clone() for n, p in ref.trainable(model).items()}
    out["val_step0"] = ref.mean_loss(model, out["val"])
    out["grads_step1"] = ref.gradients(model, out["train"])
    _REFERENCES[key] = out
    return out


def after_step1(want: dict, harness_grads: dict, harness_params: dict, later: bool) -> dict:
    """The reference optimizer step, and the reference figures at the harness's weights after step 1.

    The step is torch AdamW (after clipping) applied to the harness's own step-1 gradients from the same
    start, compared with the harness's update. Adam's first step is about lr * sign(g) per element, so
    rounding-level gradient differences (1e-6, checked above) can flip elements whose gradient is ~0;
    comparing updates from the same gradients, and taking step 2 at the same weights, keeps each check
    at fp32 precision. `later`: also the validation loss and step-2 gradients at those weights."""
    model = want["model"]
    ref.set_trainable(model, want["init"])
    ref.adamw_step(model, harness_grads, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    expected = {n: p.detach() - want["init"][n] for n, p in ref.trainable(model).items()}
    got = {n: harness_params[n] - want["init"][n] for n in expected}
    update_err, update_where = ref.worst_gradient_error(got, expected)
    if not later:
        return {"update": (update_err, update_where)}
    ref.set_trainable(model, harness_params)
    return {"update": (update_err, update_where), "val_step1": ref.mean_loss(model, want["val"]),
            "grads_step2": ref.gradients(model, want["train"])}


def _probe(case, model_dir, data_dir, out_dir, name="probe"):
    """Run reference_probe.py for `case`, recording into out_dir/name; the run itself is out_dir/run
    (so a second call resumes it from its step-1 checkpoint)."""
    method, ds, ranks, loader, resumed, extra = CASES[case]
    args = [str(out_dir / name), "2" if resumed else "1", "--config", RECIPE, f"model.path={model_dir}", f"method={method}", f"model.loader={loader}",
            f"deepspeed.config=ds_configs/{ds}.json", f"output_dir={out_dir / 'run'}",
            f"data.sources.0.path={data_dir / 'train.jsonl'}", f"data.val_path={data_dir / 'val.jsonl'}", "data.seq_len=128",
            "data.packing=false", "train.micro_batch_size=2", "train.global_batch_size=4", f"train.lr={LR}", "train.warmup_steps=0",
            "train.lr_schedule=constant", f"train.weight_decay={WEIGHT_DECAY}", f"train.max_grad_norm={MAX_GRAD_NORM}",
            "train.gradient_checkpointing=none", f"lora.r={LORA.r}", f"lora.alpha={LORA.alpha}", "lora.dropout=0.0",
            "eval.max_samples=0", "eval.batch_size=8", "eval.generate_samples=0", "log.memory_every_steps=0", "log.progress_bar=false", *extra]
    # bitsandbytes' AVX512-BF16 repacking path forced in every rank (tests/bnb_repack), so the eval before
    # each gradient and the gathers check keep_standard_4bit_layout on any CPU, not only on one with the feature
    marker = out_dir / f"{name}_repack_forced_in"
    env = child_env(PYTHONPATH=f"{FORCE_REPACK}:{REPO}", BNB_REPACK_MARKER=str(marker))
    launch(args, nproc=ranks, script=PROBE, timeout_s=900, env=env)
    if method == "qlora" or "prompt_tuning.base_4bit=true" in extra:  # only a 4-bit base builds bitsandbytes layers
        ran_in = set(marker.read_text().split()) if marker.exists() else set()
        assert len(ran_in) >= ranks, f"the forced repacking path loaded in {len(ran_in)} of {ranks} ranks"
    return out_dir / name


@pytest.mark.parametrize("case", RUN)
def test_harness_equals_the_reference(real_model, rows, tmp_path, case):
    method, _ds, ranks, _loader, resumed, extra = CASES[case]
    data_dir, train_rows, val_rows = rows
    probe = _probe(case, real_model, data_dir, tmp_path)
    fresh = json.loads((probe / "record_fresh.json").read_text())
    layouts = {"padded"} if method == "prompt_tuning" else {"padded", "packed"}
    assert set(fresh["val_step0"]) == layouts and ("val_step1" in fresh) == resumed
    assert fresh["train_rows"] == (2 if "data.packing=true" in extra else 4)  # so each step sees exactly the 4 samples
    assert fresh["val_samples"] == 16
    init = load_file(str(probe / "init.safetensors")) if method != "full" else None
    four_bit = "prompt_tuning.base_4bit=true" in extra
    want = reference(real_model, method, init, train_rows, val_rows, four_bit)

    figures = {}
    err, where = ref.worst_gradient_error(load_file(str(probe / "grads_step1.safetensors")), want["grads_step1"])
    figures["grads step 1"] = (err, where)
    assert err <= TOL, f"step 1: gradient of {where} off by {err:.2e} (relative norm)"
    if "grads_step1_peft" in want:  # a soft prompt: also against plain peft's prompt tuning
        err, where = ref.worst_gradient_error(load_file(str(probe / "grads_step1.safetensors")), want["grads_step1_peft"])
        figures["grads step 1 vs plain peft"] = (err, where)
        assert err <= TOL, f"step 1: gradient of {where} off by {err:.2e} against plain peft"
    then = after_step1(want, load_file(str(probe / "grads_step1.safetensors")), load_file(str(probe / "params_step1.safetensors")), resumed)
    figures["AdamW update"] = then["update"]
    assert then["update"][0] <= TOL, f"the optimizer step of {then['update'][1]} is off by {then['update'][0]:.2e}"

    runs = [("fresh", fresh, probe)]
    if resumed:
        again = _probe(case, real_model, data_dir, tmp_path, "probe_resumed")
        runs.append(("resumed", json.loads((again / "record_resumed.json").read_text()), again))
        assert runs[-1][1]["start_step"] == 1 and set(runs[-1][1]["val_step1"]) == {"padded", "packed"}
    for label, rec, d in runs:
        for key in ("val_step0", "val_step1"):
            want_loss = want["val_step0"] if key == "val_step0" else then.get("val_step1")
            for layout, got in rec.get(key, {}).items():
                err = abs(got - want_loss) / want_loss
                figures[f"{label} {key} {layout}"] = (got, want_loss, err)
                assert err <= TOL, f"{label} {key} ({layout}): harness {got:.6f}, reference {want_loss:.6f}, relative error {err:.2e}"
        if label != "resumed":
            continue
        err, where = ref.worst_gradient_error(load_file(str(d / "grads_step2.safetensors")), then["grads_step2"])
        figures[f"{label} grads step 2"] = (err, where)
        assert err <= TOL, f"{label} step 2: gradient of {where} off by {err:.2e} (relative norm)"
    if method == "qlora" or four_bit:  # step 0 against the 4-bit model of plain transformers + bitsandbytes
        got = fresh["val_step0"]["padded"]
        err = abs(got - want["val_step0_bnb"]) / want["val_step0_bnb"]
        figures["val_step0 vs bitsandbytes 4-bit"] = (got, want["val_step0_bnb"], err)
        assert err <= TOL
    if "answers 0" in fresh["phases_s"]:  # the harness's step-0 answers = plain generate() on the base model
        from transformers import AutoTokenizer

        logged = [json.loads(line) for line in (tmp_path / "run" / "answers" / "step_00000000.jsonl").read_text().splitlines()]
        batch, tokens = (int(next(a for a in extra if a.startswith(k)).split("=")[1]) for k in ("eval.generate_batch_size", "eval.max_new_tokens"))
        base = ref.load_base(real_model, quantized=method == "qlora", attn="sdpa")  # LoRA's B = 0 at step 0: the base
        plain = ref.greedy_answers(base, AutoTokenizer.from_pretrained(str(real_model)), val_rows[: len(logged)], max_new_tokens=tokens, batch=batch)
        harness_answers = [a["answer"] for a in logged]
        figures["step-0 answers equal to plain generate()"] = f"{sum(a == b for a, b in zip(harness_answers, plain))}/{len(plain)}"
        assert [a["prompt"] for a in logged] == [ref.alpaca_prompt(r) for r in val_rows[:4]]
        assert harness_answers == plain, (harness_answers, plain)
    if resumed and method != "full":
        assert fresh["val_step1"]["padded"] < fresh["val_step0"]["padded"]  # one step on 4 rows already helps
    FIGURES[case] = figures
    print(f"\n{case}: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in figures.items()))


def _fmt(v) -> str:
    if isinstance(v, tuple) and len(v) == 3:
        return f"{v[0]:.6f} vs {v[1]:.6f} ({v[2]:.1e})"
    if isinstance(v, tuple):
        return f"{v[0]:.1e} ({v[1]})"
    return str(v)
