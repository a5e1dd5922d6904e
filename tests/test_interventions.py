"""Steering, re-runs and patching: exactness and controls (no probe needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from interventions.directions import TaskDirection, random_directions, unit
from interventions.patching import find_pairs, patch_one
from interventions.rank_shift import bootstrap_ci, rank_table
from interventions.rerun import clean_window, rerun
from interventions.steering import steer, steered_logits
from probes.corpus import Window
from probes.errors import InvalidOptionError
from probes.models import gpt2_tokenizer, wrap_hf_model
from probes.residuals import resid_hook_name

WINDOW = Window(0, "d", 0, tuple(range(300, 340)), -1)


def test_alpha_zero_is_bit_for_bit(tiny_llama):
    tokens = torch.tensor([[50256, *WINDOW.token_ids]])
    with torch.no_grad():
        clean = tiny_llama.bridge(tokens)
        with steer(tiny_llama, layer=2, vector=torch.randn(64), alpha=0.0):
            same = tiny_llama.bridge(tokens)
        with steer(tiny_llama, layer=[1, 3], vector=torch.randn(64), alpha=0.0, positions=[4]):
            same2 = tiny_llama.bridge(tokens)
    assert torch.equal(clean, same) and torch.equal(clean, same2)


def test_steering_changes_only_later_positions(tiny_llama):
    tokens = torch.tensor([[50256, *WINDOW.token_ids]])
    with torch.no_grad():
        clean = tiny_llama.bridge(tokens)
        with steer(tiny_llama, layer=1, vector=torch.randn(64) * 5, alpha=1.0, positions=[10]):
            moved = tiny_llama.bridge(tokens)
    assert torch.equal(clean[0, :10], moved[0, :10])  # causal: earlier positions untouched
    assert not torch.allclose(clean[0, 10], moved[0, 10])


def test_hooks_are_removed_after_an_exception(tiny_gpt2):
    bridge = tiny_gpt2.bridge
    tokens = torch.tensor([[50256, 1, 2, 3]])
    with torch.no_grad():
        clean = bridge(tokens)
        with pytest.raises(RuntimeError, match="inside"), \
                steer(tiny_gpt2, layer=0, vector=torch.ones(64) * 10):
            raise RuntimeError("inside")
        after = bridge(tokens)
    assert torch.equal(clean, after)
    assert all(not hp.fwd_hooks for hp in bridge.hook_points())


def test_bad_layers_refused(tiny_gpt2):
    with pytest.raises(InvalidOptionError, match=r"outside 0\.\.3"), \
            steer(tiny_gpt2, layer=4, vector=torch.ones(64)):
        pass


def test_alpha_grid_in_one_batch_matches_separate_runs(tiny_gpt2):
    tokens = torch.tensor([[50256, *WINDOW.token_ids[:12]]])
    v = torch.randn(64)
    grid = steered_logits(tiny_gpt2, tokens, 2, v, [0.0, 0.5, 2.0])
    with torch.no_grad(), steer(tiny_gpt2, layer=2, vector=v, alpha=2.0):
        single = tiny_gpt2.bridge(tokens)
    torch.testing.assert_close(grid[2], single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid[0], tiny_gpt2.bridge(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_rerun_equals_a_truncated_full_forward(which, request):
    model = request.getfixturevalue(which)
    clean = clean_window(model.bridge, WINDOW, model.info.bos_token_id)
    plain = rerun(model.bridge, clean, [0, 7, 39])
    torch.testing.assert_close(plain.logits, clean.logits[[0, 7, 39]], rtol=1e-4, atol=1e-4)
    v = torch.randn(model.info.d_model) * 4
    edited = rerun(model.bridge, clean, [7], add={1: v[None]})
    prefix = clean.tokens[:, : 7 + clean.offset + 1]

    def hook(act, hook):
        act = act.clone()
        act[0, -1] += v
        return act

    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(resid_hook_name(1), hook)]):
        reference = model.bridge(prefix)[0, -1]
    torch.testing.assert_close(edited.logits[0], reference, rtol=1e-4, atol=1e-4)
    assert (edited.logits[0] - clean.logits[7]).abs().max() > 1e-2


def test_patching_a_position_with_its_own_state_changes_nothing(tiny_llama):
    clean = clean_window(tiny_llama.bridge, WINDOW, tiny_llama.info.bos_token_id)
    for layer in (0, 2, 4):
        out = rerun(tiny_llama.bridge, clean, [20], replace={layer: clean.resid[layer, 20][None]})
        torch.testing.assert_close(out.logits[0], clean.logits[20], rtol=1e-4, atol=1e-4)
    result = patch_one(tiny_llama, clean, 20, 3, clean.resid[3, 20], top_k=3)
    assert result["top1_kept"]


def test_patching_with_another_state_replaces_it(tiny_llama):
    clean = clean_window(tiny_llama.bridge, WINDOW, tiny_llama.info.bos_token_id)
    last = tiny_llama.info.n_layers - 1
    # Patching the last block's output makes the position predict what the source predicted.
    out = rerun(tiny_llama.bridge, clean, [20], replace={last: clean.resid[last, 5][None]})
    torch.testing.assert_close(out.logits[0], clean.logits[5], rtol=1e-4, atol=1e-4)
    per_row = rerun(tiny_llama.bridge, clean, [20, 20], patch_layers=[last, -1],
                    patch_values=torch.stack([clean.resid[last, 5], clean.resid[last, 5]]))
    torch.testing.assert_close(per_row.logits[0], clean.logits[5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_row.logits[1], clean.logits[20], rtol=1e-4, atol=1e-4)


def _toy_model():
    """A 2-layer Llama whose unembedding the test sets: only tokens 5 and 7 have weights."""
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=50257,
                         tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config)
    model = wrap_hf_model(hf, gpt2_tokenizer(), "toy")
    tokens = torch.tensor([[50256, 11, 12, 13]])
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=resid_hook_name(1))
    r = cache[resid_hook_name(1)][0, -1]
    u = unit(r)
    w = torch.randn(32)
    w = unit(w - (w @ u) * u)
    with torch.no_grad():
        hf.model.norm.weight.fill_(1.0)
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[5] = u
        hf.lm_head.weight[7] = 0.5 * u + 0.5 * w
    return model, tokens, r, u, w


def test_planted_direction_swaps_the_top_two_tokens():
    model, tokens, r, u, w = _toy_model()
    with torch.no_grad():
        clean = model.bridge(tokens)[0, -1:]
    assert torch.topk(clean, 2).indices.tolist() == [[5, 7]]
    direction = TaskDirection(unit(w - u), k=1, layer=1, source="planted",
                              scale=float(r.norm()))
    strength = 0.75 * float(r.norm()) * float((w - u).norm())  # beta = 0.75 |r| along w - u
    alpha = strength / direction.scale
    with torch.no_grad(), steer(model, layer=1, vector=direction.delta(alpha), positions=[3]):
        moved = model.bridge(tokens)[0, -1:]
    assert torch.topk(moved, 2).indices.tolist() == [[7, 5]]
    table = rank_table(clean, moved, torch.tensor([[5, 7, 0]]), k=1)
    assert table["switched"].tolist() == [True] and table["top1_rank"].tolist() == [2]
    assert table["kl"].iloc[0] > 0
    # the reversed direction keeps the order
    with torch.no_grad(), steer(model, layer=1, vector=direction.reversed().delta(alpha),
                                positions=[3]):
        back = model.bridge(tokens)[0, -1:]
    assert torch.topk(back, 2).indices.tolist() == [[5, 7]]


def test_random_control_has_the_same_norm():
    dirs = random_directions(64, 12, seed=3)
    assert dirs.shape == (12, 64)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(12))
    assert torch.equal(dirs, random_directions(64, 12, seed=3))
    assert not torch.equal(dirs, random_directions(64, 12, seed=4))
    d = TaskDirection(unit(torch.randn(64)), 1, 3, "means", scale=7.0)
    deltas = [d.delta(0.5).norm()] + [(0.5 * d.scale * v).norm() for v in dirs]
    torch.testing.assert_close(torch.stack(deltas), torch.full((13,), 3.5))


def test_direction_save_load(tmp_path):
    d = TaskDirection(unit(torch.randn(16)), 2, None, "probe", 3.5, 10, 12)
    d.save(tmp_path / "dir")
    back = TaskDirection.load(tmp_path / "dir")
    assert torch.equal(back.vector, d.vector) and back.k == 2 and back.layer is None


def test_find_pairs_rules():
    import pandas as pd

    table = pd.DataFrame({
        "window": [0, 0, 0, 0, 0, 1],
        "position": [0, 5, 20, 45, 8, 1],
        "target_1": [7, 7, 7, 7, 9, 7],
        "s_1": [11, 25, 29, 11, 29, 29],
    })
    pairs = find_pairs(table, n_layers=30)
    # (0,5) gap 14 and (0,20) gap 18 qualify; (5,20) gap 4 is too small; position 45 is more
    # than 30 tokens from all but 20 (which saturates later, gap 18, 25 apart: qualifies);
    # position 8 has another top-1; window 1 never pairs with window 0.
    assert sorted(map(tuple, pairs[["early_position", "late_position"]].values.tolist())) == \
        [(0, 5), (0, 20), (45, 20)]
    assert find_pairs(table, 30, min_layer=12).empty
    assert len(find_pairs(table, 30, min_gap=0.1)) == 4  # 3 layers: (5, 20) joins


def test_bootstrap_ci_brackets_the_mean():
    values = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = bootstrap_ci(values, seed=0)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bootstrap_ci(np.array([]), seed=0) == (None, None)
