"""The saturation definition, the engine against brute force, and the lens at L-1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.corpus import make_windows, read_text
from probes.lens import LogitLens
from probes.residuals import iter_batches, run_residuals
from probes.saturation import (
    brute_force_saturation,
    saturation_from_matches,
    saturation_layers,
    targets_from_logits,
)

from .conftest import HAMLET_LINES


def test_rank_held_from_layer_zero_is_zero():
    ranks = np.array([1, 1, 1, 1, 1])  # rank of y_1 at layers 0..4
    assert saturation_from_matches((ranks == 1)[:, None]).tolist() == [0]


def test_final_run_only_counts():
    # rank 1 at layer 0, lost at layer 1, regained from layer 2: s = 2, not 0.
    ranks = np.array([1, 2, 1, 1, 1])
    assert saturation_from_matches((ranks == 1)[:, None]).tolist() == [2]


def test_only_at_output_is_last_layer():
    ranks = np.array([4, 3, 5, 2, 1])
    assert saturation_from_matches((ranks == 1)[:, None]).tolist() == [4]


def test_exact_rank_not_membership():
    # y_2 sits in the top-2 from layer 1 but at exactly rank 2 only from layer 3.
    ranks_y2 = np.array([7, 1, 1, 2, 2])
    assert saturation_from_matches((ranks_y2 == 2)[:, None]).tolist() == [3]


def test_several_ranks_and_positions_at_once():
    # matches[layer, position, k]
    m = np.zeros((4, 2, 2), dtype=bool)
    m[:, 0, 0] = [False, True, True, True]
    m[:, 0, 1] = [True, False, False, True]
    m[:, 1, 0] = [True, True, True, True]
    m[:, 1, 1] = [False, False, True, True]
    assert saturation_from_matches(m).tolist() == [[1, 3], [0, 2]]


def test_no_final_match_gives_L():
    assert saturation_from_matches(np.array([[True], [False]])).tolist() == [2]


def _residuals(model, n_tokens=120, window=40):
    docs = read_text("text:" + HAMLET_LINES * 3)
    windows = make_windows(docs, model.tokenize, window=window, max_tokens=n_tokens,
                           bos_token_id=model.info.bos_token_id)
    batch = next(iter_batches(windows, model.info.bos_token_id, 10_000))
    logits, resid = run_residuals(model.bridge, batch.tokens)
    mask = batch.valid_mask()
    return logits[mask], resid[:, mask]


@pytest.mark.parametrize("screen", ["none", "bf16"])
@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_engine_equals_brute_force_on_random_models(which, screen, request):
    model = request.getfixturevalue(which)
    logits, resid = _residuals(model)
    targets = targets_from_logits(logits, 5)
    lens = LogitLens(model.bridge, screen=screen)
    engine = saturation_layers(lens, resid, targets).numpy()
    brute = brute_force_saturation(LogitLens(model.bridge, screen="none"), resid, targets)
    assert engine.shape == (resid.shape[1], 5)
    np.testing.assert_array_equal(engine, brute)
    # The test must be able to fail: untrained models give spread-out saturation layers.
    assert len(np.unique(engine)) > 1


@pytest.mark.parametrize("seed", [2, 3])
def test_engine_equals_brute_force_other_seeds(seed):
    from probes.models import load_model

    model = load_model(f"random:gpt2?n_layers=6&d_model=32&n_heads=2&d_mlp=64&seed={seed}")
    logits, resid = _residuals(model, n_tokens=80)
    targets = targets_from_logits(logits, 4)
    np.testing.assert_array_equal(
        saturation_layers(LogitLens(model.bridge, screen="bf16"), resid, targets).numpy(),
        brute_force_saturation(LogitLens(model.bridge, screen="none"), resid, targets),
    )


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_lens_at_last_layer_is_the_logits_random(which, request):
    model = request.getfixturevalue(which)
    logits, resid = _residuals(model)
    lens_logits = LogitLens(model.bridge).logits(resid[-1])
    torch.testing.assert_close(lens_logits, logits, rtol=0, atol=1e-5)


@pytest.mark.smollm2
def test_lens_at_last_layer_is_the_logits_smollm2(smollm2):
    logits, resid = _residuals(smollm2)
    lens_logits = LogitLens(smollm2.bridge).logits(resid[-1])
    torch.testing.assert_close(lens_logits, logits, rtol=0, atol=1e-4)


@pytest.mark.smollm2
def test_screened_topk_is_exact_on_smollm2(smollm2):
    _, resid = _residuals(smollm2, n_tokens=200, window=100)
    screened = LogitLens(smollm2.bridge, screen="bf16")
    plain = LogitLens(smollm2.bridge, screen="none")
    for layer in (4, 15, 28):
        _, ids_s = screened.topk(resid[layer], 5)
        _, ids_p = plain.topk(resid[layer], 5)
        assert torch.equal(ids_s, ids_p)
    assert screened.stats["screened_exact"] > 0  # the screen really ran


@pytest.mark.smollm2
def test_engine_equals_brute_force_smollm2(smollm2):
    logits, resid = _residuals(smollm2, n_tokens=60, window=60)
    targets = targets_from_logits(logits, 5)
    engine = saturation_layers(LogitLens(smollm2.bridge), resid, targets).numpy()
    brute = brute_force_saturation(LogitLens(smollm2.bridge, screen="none"), resid, targets)
    np.testing.assert_array_equal(engine, brute)


def test_lens_ranks_are_one_based(tiny_gpt2):
    _, resid = _residuals(tiny_gpt2, n_tokens=20)
    lens = LogitLens(tiny_gpt2.bridge)
    _, top = lens.topk(resid[1], 3)
    ranks = lens.ranks(resid[1], top)
    assert ranks[:, 0].tolist() == [1] * len(ranks)
    assert (ranks[:, 2] == 3).all()
