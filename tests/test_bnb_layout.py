"""No library changes a 4-bit weight behind the harness's back: an eval-mode forward leaves every
`Linear4bit` the harness builds (both loaders, the export's base) as it was, on any CPU.

bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel at the first eval-mode
forward when the CPU has AVX512-BF16 (harness/model.py: keep_standard_4bit_layout). Each test here
forces that path (`has_avx512bf16` patched to True where `Linear4bit` reads it) so it bites on every
machine, and checks the consequences the bug had: changed outputs, a lost input gradient, a changed
weight and a `state_dict()` that asserts.
"""

from __future__ import annotations

import pytest
import torch

from harness import export
from harness import model as model_lib
from tests import reference as ref

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


@pytest.fixture
def forced_repack_path(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _qlora(path, loader):
    from harness import config

    recipe = config.load_recipe(None, [f"model.path={path}", "method=qlora", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0"])
    return model_lib.load_model(recipe, precision="fp32", attn_implementation="sdpa", device=torch.device("cpu"), loader=loader)


def _recipe(path):
    from harness import config

    return config.load_recipe(None, [f"model.path={path}", "method=qlora", "data.sources=[]"])


BUILDERS = {
    "hf-loader": lambda path: _qlora(path, "hf"),
    "streamed-loader": lambda path: _qlora(path, "streamed"),
    "export-base": lambda path: export._quantised_base(_recipe(path)),
}


def _bytes(layer) -> torch.Tensor:
    """The packed weight as bytes (as floats, packed codes include NaN patterns, which equal nothing)."""
    return layer.weight.data.contiguous().view(torch.uint8).clone()


def _4bit_layers(model):
    return [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


# (model fixture, builder): the tiny random Llama, and the real SmolLM2-135M-Instruct (30 layers, tied
# embeddings) whose eval loss the repacking had turned from 3.3 into 23.9
CASES = [("tiny_llama", b) for b in BUILDERS] + [pytest.param("real_model", b, marks=pytest.mark.real_model) for b in BUILDERS]


@pytest.mark.parametrize(("model_fixture", "builder"), CASES)
def test_an_eval_pass_changes_nothing(request, forced_repack_path, model_fixture, builder):
    path = request.getfixturevalue(model_fixture)
    model = BUILDERS[builder](path)
    layers = _4bit_layers(model)
    assert layers, "no 4-bit layer was built"
    weights = {id(m): _bytes(m) for m in layers}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads_before = _grads(model, ids) if builder != "export-base" else None  # no eval-mode forward has run yet

    model.train()
    train_logits = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():  # the eval pass that used to repack
        eval_logits = [model(input_ids=ids).logits for _ in range(2)]

    for m in layers:
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(_bytes(m), weights[id(m)])
    assert torch.equal(eval_logits[0], eval_logits[1])
    torch.testing.assert_close(eval_logits[0], train_logits, rtol=1e-5, atol=1e-5)
    model.state_dict()  # asserted in bitsandbytes after a repack with non-uint8 storage

    # The gradients after the eval pass are those the same model gave before it ever ran in eval mode (with
    # the bug, the repacked layers pass no input gradient, so every adapter below the top one is off).
    if builder != "export-base":
        got, want = _grads(model, ids), grads_before
        assert [n for n, _ in got] == [n for n, _ in want]
        assert all(torch.equal(g, w) for (_, g), (_, w) in zip(got, want))

    # And after all that, an eval forward still equals plain transformers + bitsandbytes' own NF4 model
    # (tests/reference.py shares no code with harness/), with the adapters back at B = 0 (LoRA's identity).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    plain = ref.load_base(path, quantized=True, attn=export.ATTN if builder == "export-base" else "sdpa").eval()  # as it was built
    model.eval()
    with torch.no_grad():
        got_logits, want_logits = model(input_ids=ids).logits, plain(input_ids=ids).logits
    print(f"{model_fixture} {builder}: max |logit - plain bitsandbytes| = {(got_logits - want_logits).abs().max():.2e}")
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


def _grads(model, ids) -> list:
    model.train()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at init would make A's gradient 0 anyway
    model.zero_grad()
    model(input_ids=ids).logits.float().square().mean().backward()
    grads = [(n, p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, g in grads)
    return grads


def test_the_guard_is_what_keeps_the_layout(tiny_llama, forced_repack_path, monkeypatch):
    """Control: with the guard switched off the forced path does repack (the test above can fail)."""
    monkeypatch.setattr(model_lib, "keep_standard_4bit_layout", lambda model: 0)
    model = _qlora(tiny_llama, "hf")
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _4bit_layers(model))
