"""Streamed sharded loading (harness/loading.py) against Hugging Face's from_pretrained, both under ZeRO-3
on 2 gloo ranks: same logits, same packed 4-bit bytes, same shards; and the streamed rank's memory bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import loading
from tests.helpers import REPO, launch

pytestmark = pytest.mark.distributed
PROBE = str(REPO / "tests" / "distributed" / "loading_probe.py")
RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")


@pytest.fixture(scope="module")
def sharded_tied_qwen2(tmp_path_factory) -> Path:
    """Qwen2 shape with tied embeddings, saved as 5 safetensors shards with an index."""
    from tools.make_tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("qwen2_sharded")
    make_tiny_model("qwen2.5-7b", out, tie_embeddings=True, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    return out


def probe(model_path, tmp_path, loader: str, method: str) -> tuple[dict, dict]:
    out = tmp_path / f"{loader}_{method}"
    launch([str(out), "--config", RECIPE, f"model.path={model_path}", f"model.loader={loader}", f"method={method}",
            f"output_dir={tmp_path / 'run'}"], nproc=2, script=PROBE)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    tensors = load_file(f"{out}.logits.safetensors")
    if Path(f"{out}.packed.safetensors").is_file():
        tensors.update({f"packed/{k}": v for k, v in load_file(f"{out}.packed.safetensors").items()})
    return ranks, tensors


@pytest.mark.parametrize("model_name, method", [("qwen2_sharded_tied", "qlora"), ("llama", "full")])
def test_streamed_model_equals_from_pretrained(model_name, method, sharded_tied_qwen2, tiny_models, tmp_path):
    model_path = sharded_tied_qwen2 if model_name == "qwen2_sharded_tied" else tiny_models["llama"]
    streamed_ranks, streamed = probe(model_path, tmp_path, "streamed", method)
    hf_ranks, hf = probe(model_path, tmp_path, "hf", method)
    diff = float((streamed["logits"] - hf["logits"]).abs().max())
    packed = [k for k in hf if k.startswith("packed/")]
    print(f"{model_name} {method}: max |logit diff| streamed vs from_pretrained {diff:.2e}; {len(packed)} 4-bit weights compared; "
          f"load {streamed_ranks[0]['load_s']:.1f} s vs {hf_ranks[0]['load_s']:.1f} s")
    assert diff <= 1e-5
    assert sorted(k for k in streamed if k.startswith("packed/")) == packed
    assert all(torch.equal(streamed[k], hf[k]) for k in packed)  # the packed NF4 bytes, bit for bit
    if method == "qlora":
        assert len(packed) == 14  # 2 layers x 7 projections
    assert [r["shard_bytes"] for r in streamed_ranks] == [r["shard_bytes"] for r in hf_ranks]  # same partitions

    # each streamed rank: at most its share of the checkpoint + 2 x the largest layer + 1.5 GB (imports)
    index = loading.checkpoint_index(model_path)
    sizes: dict[str, int] = {}
    for name, f in index.items():
        unit = next(u for u, names in loading.units([name]).items())
        t = load_file(str(f))[name]
        sizes[unit] = sizes.get(unit, 0) + t.numel() * t.element_size()
    bound = sum(sizes.values()) / 2 + 2 * max(sizes.values()) + 1.5 * 2**30
    for r in streamed_ranks:
        assert r["peak_rss_after_load_bytes"] <= bound, r


def test_units_group_layers_and_top_level_tensors():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.input_layernorm.weight", "model.norm.weight", "lm_head.weight"]
    assert list(loading.units(names).items()) == [
        ("model.embed_tokens", ["model.embed_tokens.weight"]),
        ("model.layers.0", names[1:3]),
        ("model.layers.1", [names[3]]),
        ("model.norm", ["model.norm.weight"]),
        ("lm_head", ["lm_head.weight"]),
    ]


def test_a_checkpoint_missing_a_tensor_is_named(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = Path(tiny_models["llama"])
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks \['model.layers.1.mlp.down_proj.weight'\]"):
        loading.load_streamed(str(tmp_path), dtype=torch.float32, attn_implementation="eager", device=torch.device("cpu"),
                              ds_config=None)
