"""Shared fixtures: tiny random models (fast), the real SmolLM2 (loaded once per session),
and one small real analysis run that later test modules build on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: fail fast instead of retrying a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_GPT2 = "random:gpt2?n_layers=4&d_model=64&n_heads=4&d_mlp=128&n_ctx=128&seed=0"
TINY_LLAMA = "random:llama?n_layers=5&d_model=64&n_heads=4&n_kv_heads=2&d_mlp=128&n_ctx=128&seed=1"
HAMLET_LINES = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them."
)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from probes.models import load_model

    return load_model(TINY_GPT2)


@pytest.fixture(scope="session")
def tiny_llama():
    from probes.models import load_model

    return load_model(TINY_LLAMA)


@pytest.fixture(scope="session")
def smollm2():
    from probes.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_run(smollm2, tmp_path_factory) -> Path:
    """A real SmolLM2 analysis of ~1000 tokens of Hamlet, with residuals saved."""
    from probes.analysis import analyze

    out = tmp_path_factory.mktemp("runs") / "smollm2"
    analyze(smollm2, "shakespeare:hamlet", out=out, max_tokens=1000, window=128,
            n_permutations=200, save_residuals=True, progress=False)
    return out
