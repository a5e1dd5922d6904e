"""Early-exit policies: their invariants, the split, and the command end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from interventions.early_exit import (
    POLICIES,
    LayerSignals,
    best_speedups,
    check_thresholds,
    default_thresholds,
    evaluate,
    exit_layers,
    pareto_frontier,
    split_windows,
)
from probes.errors import InvalidOptionError
from topk_saturation_cli import main


def _signals(n=200, n_layers=12, seed=0) -> LayerSignals:
    rng = np.random.default_rng(seed)
    s1 = rng.integers(0, n_layers, size=n)
    final = rng.integers(0, 50, size=n)
    argmax = rng.integers(0, 50, size=(n, n_layers))
    for i in range(n):
        argmax[i, s1[i]:] = final[i]  # the top-1 is fixed from s_1 on
        if s1[i] > 0 and argmax[i, s1[i] - 1] == final[i]:
            argmax[i, s1[i] - 1] = (final[i] + 1) % 50
    margin = np.sort(rng.random((n, n_layers)), axis=1)
    cosine = np.sort(rng.uniform(0.5, 1, (n, n_layers)), axis=1)
    cosine[:, 0] = np.nan
    p1 = np.clip(1 - np.arange(n_layers)[None, :] / (s1[:, None] + 1) + rng.normal(
        0, 0.1, (n, n_layers)), 0, 1)
    gold = np.where(rng.random(n) < 0.6, final, rng.integers(0, 50, size=n))
    gold[-1] = -1
    task = np.where(p1 < 0.5, 2, 1)
    return LayerSignals(argmax, margin, cosine, p1, gold, s1, task)


def test_full_and_oracle_are_fully_consistent():
    sig = _signals()
    full = evaluate(sig, "full")
    assert full["consistency"] == 1.0 and full["speedup"] == 1.0
    assert full["mean_layers"] == sig.n_layers
    oracle = evaluate(sig, "oracle")
    assert oracle["consistency"] == 1.0
    assert oracle["mean_layers"] == pytest.approx(float((sig.s1 + 1).mean()))
    assert oracle["accuracy"] == full["accuracy"]


def test_static_at_last_layer_equals_full():
    sig = _signals()
    last = evaluate(sig, "static", sig.n_layers - 1)
    full = evaluate(sig, "full")
    for key in ("accuracy", "consistency", "mean_layers", "speedup", "n"):
        assert last[key] == full[key]
    assert np.array_equal(last["predictions"], full["predictions"])
    assert evaluate(sig, "static", 0)["speedup"] == sig.n_layers  # one layer used


def test_layers_used_count_the_exit_layer():
    sig = _signals(n=5, n_layers=6)
    assert evaluate(sig, "static", 2)["mean_layers"] == 3.0  # exit after block 2: 3 blocks


def test_policies_never_share_prediction_buffers():
    sig = _signals()
    results = [evaluate(sig, p, t) for p in POLICIES for t in default_thresholds(p, 12)[:3]]
    for a, b in itertools.combinations(results, 2):
        assert not np.shares_memory(a["predictions"], b["predictions"])
        assert not np.shares_memory(a["exits"], b["exits"])
    before = evaluate(sig, "softmax", 0.5)["predictions"].copy()
    results[0]["predictions"][:] = -7  # scribbling on one result changes no other
    assert np.array_equal(evaluate(sig, "softmax", 0.5)["predictions"], before)
    assert not np.shares_memory(results[0]["predictions"], sig.argmax)


def test_policy_rules():
    sig = _signals(n=1, n_layers=6)
    sig.margin[:] = [[0.1, 0.2, 0.6, 0.7, 0.9, 1.0]]
    assert exit_layers(sig, "softmax", 0.5).tolist() == [2]
    assert exit_layers(sig, "softmax", 2.0 / 2).tolist() == [5]  # only the last layer
    sig.argmax[:] = [[1, 2, 2, 2, 3, 3]]
    assert exit_layers(sig, "stable", 1).tolist() == [2]
    assert exit_layers(sig, "stable", 2).tolist() == [3]
    assert exit_layers(sig, "stable", 3).tolist() == [5]  # never 3 unchanged steps: full
    sig.cosine[:] = [[np.nan, 0.2, 0.99, 0.5, 0.999, 1]]
    assert exit_layers(sig, "state", 0.99).tolist() == [2]
    sig.p_task1[:] = [[np.nan, np.nan, 0.8, 0.4, 0.1, 0.0]]
    assert exit_layers(sig, "probe", 0.5).tolist() == [3]
    sig.probe_task[:] = [[0, 0, 1, 1, 2, 2]]
    assert exit_layers(sig, "probe", None).tolist() == [4]


def test_thresholds_are_checked():
    with pytest.raises(InvalidOptionError, match="unknown policy"):
        check_thresholds("magic", [0.5], 12)
    with pytest.raises(InvalidOptionError, match=r"in \[0, 1\]"):
        check_thresholds("softmax", [1.5], 12)
    with pytest.raises(InvalidOptionError, match="cosines"):
        check_thresholds("state", [2], 12)
    with pytest.raises(InvalidOptionError, match=r"1\.\.11"):
        check_thresholds("stable", [0], 12)
    with pytest.raises(InvalidOptionError, match=r"0\.\.11"):
        check_thresholds("static", [12], 12)


def test_frontier_and_best_speedup():
    import pandas as pd

    table = pd.DataFrame({"policy": ["a", "a", "b", "b"], "threshold": [1, 2, 1, 2],
                          "accuracy": [0.3] * 4, "consistency": [0.99, 0.9, 0.96, 0.5],
                          "mean_layers": [10, 5, 8, 2], "speedup": [1.2, 2.4, 1.5, 6.0],
                          "n": [10] * 4})
    frontier = pareto_frontier(table)
    assert list(zip(frontier["policy"], frontier["threshold"])) == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    best = best_speedups(table)
    assert best["a"]["consistency_0.99"]["speedup"] == 1.2
    assert best["b"]["consistency_0.95"]["speedup"] == 1.5
    assert best["b"]["consistency_0.99"] is None


def test_split_is_disjoint_seeded_and_refuses_too_few():
    train, held = split_windows(range(9), 0.5, seed=3)
    assert not set(train) & set(held) and sorted(train + held) == list(range(9))
    assert split_windows(range(9), 0.5, seed=3) == (train, held)
    assert split_windows(range(9), 0.5, seed=4) != (train, held)
    with pytest.raises(InvalidOptionError, match="too few windows"):
        split_windows([0], 0.5, seed=0)
    with pytest.raises(InvalidOptionError, match="train-fraction"):
        split_windows(range(4), 1.0, seed=0)


@pytest.fixture(scope="module")
def run_with_probe(smollm2_run, smollm2):
    from probes.probe_run import run_probe

    if not (smollm2_run / "probe" / "probe.safetensors").exists():
        run_probe(smollm2_run, label_rule="count", folds=3, progress=False, model=smollm2)
    return smollm2_run


@pytest.mark.smollm2
def test_early_exit_end_to_end(run_with_probe, smollm2, capsys, monkeypatch):
    import interventions.early_exit as ee

    monkeypatch.setattr(ee, "load_model", lambda spec: smollm2)
    code = main(["early-exit", "--run", str(run_with_probe), "--quiet",
                 "--thresholds", "softmax=0.5,0.9,0.99", "--thresholds", "state=0.99,0.999"])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = run_with_probe / "early_exit"
    import pandas as pd

    table = pd.read_csv(folder / "results.csv")
    assert list(table.columns) == ["policy", "threshold", "accuracy", "consistency",
                                   "mean_layers", "speedup", "n"]
    assert set(table["policy"]) == set(POLICIES)
    full = table[table["policy"] == "full"].iloc[0]
    assert full["consistency"] == 1.0 and full["speedup"] == 1.0
    assert table[table["policy"] == "oracle"].iloc[0]["consistency"] == 1.0
    summary = json.loads((folder / "summary.json").read_text())
    split = summary["split"]
    assert not set(split["train_windows"]) & set(split["eval_windows"])
    assert summary["probe"]["full_top1_mismatches_vs_run"] == 0
    assert set(summary["best_speedup"]) == set(POLICIES)
    assert summary["frontier"] and (folder / "report.html").exists()
    assert "speedup @ consistency >= 0.95" in out


@pytest.mark.parametrize("args, message", [
    (["--policies", "probe,magic"], "unknown policy 'magic'"),
    (["--thresholds", "softmax=1.5"], "in [0, 1]"),
    (["--thresholds", "static=99", "--policies", "static"], "static exits after a layer"),
    (["--thresholds", "state=0.9", "--policies", "softmax"], "not asked for"),
    (["--train-fraction", "0.99"], "too few windows"),
])
def test_bad_input(args, message, tiny_gpt2, tmp_path, capsys, monkeypatch):
    import interventions.early_exit as ee
    from probes.analysis import analyze

    from .conftest import HAMLET_LINES

    run = tmp_path / "run"
    analyze(tiny_gpt2, "text:" + HAMLET_LINES * 3, out=run, top_k=3, window=40,
            n_permutations=10, progress=False)
    monkeypatch.setattr(ee, "load_model", lambda spec: tiny_gpt2)
    code = main(["early-exit", "--run", str(run), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (run / "early_exit").exists()


def test_no_probe_is_refused(tiny_gpt2, tmp_path, capsys, monkeypatch):
    import interventions.early_exit as ee
    from probes.analysis import analyze

    from .conftest import HAMLET_LINES

    run = tmp_path / "run"
    analyze(tiny_gpt2, "text:" + HAMLET_LINES * 3, out=run, top_k=3, window=40,
            n_permutations=10, progress=False)
    monkeypatch.setattr(ee, "load_model", lambda spec: tiny_gpt2)
    code = main(["early-exit", "--run", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "the run has no probe" in err
    code = main(["early-exit", "--run", str(run), "--quiet", "--policies", "softmax,full"])
    assert code == 0
