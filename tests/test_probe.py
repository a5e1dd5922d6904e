"""TaskProbe, its cross-validation and controls, persistence, and `probe` end to end."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import check_estimator

from probes.analysis import analyze
from probes.errors import ProbeError, RunFolderError
from probes.probe import (
    ProbeMeta,
    TaskProbe,
    assert_groups_disjoint,
    compare_to_layer_only,
    cross_validate,
    grouped_folds,
    layer_onehot,
    leaky_folds,
    load_probe,
    random_embeddings,
    run_controls,
    save_probe,
    truncation_rows,
)
from probes.probe_run import ProbeRunResult, run_probe
from topk_saturation_cli import main

from .conftest import HAMLET_LINES

TEXT = "text:" + HAMLET_LINES * 4
METRIC_KEYS = ("balanced_accuracy", "balanced_accuracy_se", "chance", "n_states", "n_positions",
               "per_task_accuracy", "roc_auc", "per_layer_accuracy", "confusion_matrix",
               "reads_task", "label_rules", "task_counts")
CONTROLS = ("layer_only", "shuffled", "random_embeddings", "leaky_kfold")


# ----------------------------------------------------------------------------- synthetic


def planted(n_groups=40, per_group=50, d=24, k=4, strength=3.0, seed=0):
    """States whose task shifts them along one hidden direction per task."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    groups = np.repeat(np.arange(n_groups), per_group)
    y = rng.integers(1, k + 1, size=n)
    directions = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # k orthonormal rows
    X = rng.normal(size=(n, d)) * 2.0 + 3.0 + strength * directions[y - 1] * 2.0
    layers = rng.integers(5, 15, size=n)  # unrelated to the task
    return X.astype(np.float32), y, groups, layers, directions


def test_probe_recovers_a_planted_direction():
    X, y, groups, _, directions = planted()
    cv = cross_validate(TaskProbe(), X, y, grouped_folds(groups, 5), [1, 2, 3, 4])
    assert cv.balanced_accuracy > 0.8
    weights, classes = TaskProbe().fit(X, y).residual_weights()
    centred = weights - weights.mean(axis=0)
    for task in classes:
        w = centred[task - 1]
        cosine = w @ directions[task - 1] / np.linalg.norm(w)
        assert cosine > 0.8, (task, cosine)


def test_probe_is_at_chance_on_pure_noise():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 24)).astype(np.float32)
    y = rng.integers(1, 5, size=3000)
    groups = np.repeat(np.arange(60), 50)
    cv = cross_validate(TaskProbe(), X, y, grouped_folds(groups, 5), [1, 2, 3, 4])
    assert abs(cv.balanced_accuracy - 0.25) < 0.05


def test_whitened_solver_reaches_sklearn_optimum():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(10, 10))
    X = rng.normal(size=(500, 10)) @ mix * 4 + 7  # correlated, off-centre features
    y = rng.integers(1, 4, size=500)
    X[:, 0] += y
    for balance in ("weights", "none"):
        ours = TaskProbe(balance=balance, tol=1e-10, max_iter=5000).fit(X, y)
        ref = TaskProbe(balance=balance, tol=1e-10, max_iter=5000,
                        solver="sklearn-lbfgs").fit(X, y)
        np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-5)
        assert ours.n_iter_ < ref.n_iter_


def test_passes_scikit_learn_estimator_checks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(TaskProbe(solver="sklearn-lbfgs"))
        # The whitened solver agrees with repeated rows to ~1e-5, not the check's 1e-7: it
        # stops at tol, in float precision (tested at 1e-4 below).
        check_estimator(TaskProbe(), expected_failed_checks={
            "check_sample_weight_equivalence_on_dense_data": "stops at tol"})


def test_sample_weight_acts_like_repeated_rows():
    X, y, *_ = planted(n_groups=10, per_group=30, d=6, seed=3)
    X = X.astype(np.float64)
    weights = np.random.default_rng(0).integers(0, 3, size=len(y))
    weighted = TaskProbe(tol=1e-8).fit(X, y, sample_weight=weights)
    repeated = TaskProbe(tol=1e-8).fit(np.repeat(X, weights, axis=0), np.repeat(y, weights))
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X), atol=1e-4)


def test_plays_with_scikit_learn_tools():
    X, y, groups, *_ = planted(n_groups=12, per_group=30, d=8, seed=4)
    probe = TaskProbe(C=0.5, max_iter=200)
    assert probe.get_params()["C"] == 0.5
    assert clone(probe).set_params(C=2.0).C == 2.0
    pipe = make_pipeline(FunctionTransformer(lambda a: a * 2.0), TaskProbe())
    scores = cross_val_score(pipe, X, y, groups=groups, cv=GroupKFold(3))
    assert scores.shape == (3,) and scores.min() > 0.5
    fitted = TaskProbe().fit(X, y)
    assert fitted.score(X, y) == np.mean(fitted.predict(X) == y)
    np.testing.assert_allclose(fitted.predict_proba(X).sum(axis=1), 1.0)
    assert np.array_equal(fitted.predict(torch.from_numpy(X)), fitted.predict(X))
    with pytest.raises(ValueError, match="balance"):
        TaskProbe(balance="oversample").fit(X, y)


def test_truncation_balances_classes_and_is_seeded():
    rng = np.random.default_rng(5)
    y = np.repeat([1, 2, 3], [300, 60, 20])
    X = rng.normal(size=(len(y), 5)) + y[:, None]
    rows = truncation_rows(y - 1, np.random.RandomState(0))
    assert np.bincount(y[rows]).tolist() == [0, 20, 20, 20]
    a = TaskProbe(balance="truncate", random_state=0).fit(X, y)
    b = TaskProbe(balance="truncate", random_state=0).fit(X, y)
    c = TaskProbe(balance="truncate", random_state=1).fit(X, y)
    assert np.array_equal(a.coef_, b.coef_)
    assert not np.array_equal(a.coef_, c.coef_)


def test_fit_reports_non_convergence():
    X, y, *_ = planted(n_groups=5, per_group=40, d=10, seed=6)
    with pytest.warns(ConvergenceWarning):
        probe = TaskProbe(max_iter=1).fit(X, y)
    assert not probe.converged_


# ----------------------------------------------------------------------------- splits


def test_grouped_folds_never_put_a_group_in_train_and_test():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 23, size=2000)
    for n_splits in (2, 3, 5, 10):
        folds = grouped_folds(groups, n_splits)
        assert_groups_disjoint(folds, groups)
        for train, test in folds:
            assert not set(groups[train]) & set(groups[test])
        tested = np.concatenate([test for _, test in folds])
        assert sorted(tested.tolist()) == list(range(len(groups)))  # each row tested once
    with pytest.raises(ProbeError, match="at least 2"):
        grouped_folds(groups, 1)
    with pytest.raises(ProbeError, match="needs at least 30 windows"):
        grouped_folds(groups, 30)


def test_leaky_folds_do_mix_groups():
    groups = np.repeat(np.arange(10), 20)
    folds = leaky_folds(len(groups), 5, seed=0)
    with pytest.raises(AssertionError, match="in train and test"):
        assert_groups_disjoint(folds, groups)
    assert [t.tolist() for _, t in folds] == [t.tolist() for _, t in leaky_folds(200, 5, 0)]


def test_controls_use_the_same_folds():
    X, y, groups, layers, _ = planted(n_groups=15, per_group=40, d=12, seed=8)
    folds = grouped_folds(groups, 5)
    leaky = leaky_folds(len(y), 5, seed=0)
    cv = run_controls(TaskProbe(), X, y, layers, folds, leaky, [1, 2, 3, 4], seed=0)
    expected = [test.tolist() for _, test in folds]
    for name in ("probe", "layer_only", "shuffled", "random_embeddings"):
        assert [t.tolist() for t in cv[name].test_folds] == expected, name
    assert [t.tolist() for t in cv["leaky_kfold"].test_folds] == [t.tolist() for _, t in leaky]
    # the task is planted, the layer unrelated: the probe reads it, the layer cannot
    assert abs(cv["layer_only"].balanced_accuracy - 0.25) < 0.06
    assert abs(cv["shuffled"].balanced_accuracy - 0.25) < 0.06
    verdict = compare_to_layer_only(cv["probe"], cv["layer_only"], layers, folds)
    assert verdict["reads_task"] and verdict["margin"] > 0.4


def test_a_probe_that_only_sees_depth_does_not_read_the_task():
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(20), 60)
    layers = np.tile(np.arange(5, 25), 60)
    y = np.minimum(1 + (layers - 5) // 5, 4)  # the task is a function of the layer
    X = rng.normal(size=(len(y), 8)).astype(np.float32)
    X[:, 0] += layers * 0.5  # and the features only encode the layer, linearly
    folds = grouped_folds(groups, 4)
    cv = run_controls(TaskProbe(), X, y, layers, folds, leaky_folds(len(y), 4, 0), [1, 2, 3, 4],
                      seed=0)
    assert cv["layer_only"].balanced_accuracy > 0.99
    verdict = compare_to_layer_only(cv["probe"], cv["layer_only"], layers, folds)
    assert not verdict["reads_task"]
    assert verdict["layers_read"] == []


def test_layer_onehot_and_random_embeddings():
    assert layer_onehot(np.array([7, 5, 7])).tolist() == [[0, 1], [1, 0], [0, 1]]
    rng = np.random.default_rng(10)
    y = np.repeat([1, 2], 4000)
    X = np.where(y[:, None] == 1, 0.0, 5.0) + rng.normal(size=(8000, 3)) * [[1, 2, 3]]
    R = random_embeddings(X, y, np.random.default_rng(0))
    for label in (1, 2):
        np.testing.assert_allclose(R[y == label].mean(0), X[y == label].mean(0), atol=0.15)
        np.testing.assert_allclose(R[y == label].std(0), X[y == label].std(0), rtol=0.05)


# ----------------------------------------------------------------------------- persistence


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    X, y, *_ = planted(n_groups=10, per_group=30, d=16, seed=11)
    probe = TaskProbe(C=0.3).fit(X, y)
    meta = ProbeMeta(model="random:gpt2?d_model=16", d_model=16, n_layers=4, layers=[1, 2, 3])
    path = save_probe(probe, tmp_path / "p.safetensors", meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]
    info = json.loads((tmp_path / "p.json").read_text())
    assert info["params"]["C"] == 0.3 and info["meta"]["layers"] == [1, 2, 3]
    assert {"numpy", "scikit-learn", "safetensors"} <= set(info["versions"])
    loaded = TaskProbe.load(path, model=meta.model, d_model=16)
    assert np.array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    assert np.array_equal(loaded.predict(X), probe.predict(X))
    assert loaded.get_params() == probe.get_params()
    assert loaded.meta_["model"] == meta.model
    weights, classes = loaded.residual_weights(layer=2)
    assert classes == [1, 2, 3, 4] and weights.shape == (4, 16)
    with pytest.raises(ProbeError, match=r"trained on layers 1\.\.3"):
        loaded.residual_weights(layer=7)


def test_loading_for_another_model_or_width_fails(tmp_path):
    X, y, *_ = planted(n_groups=6, per_group=20, d=8, seed=12)
    path = save_probe(TaskProbe().fit(X, y), tmp_path / "p.safetensors",
                      {"model": "smollm2-135m", "d_model": 8})
    with pytest.raises(ProbeError, match="d_model 576"):
        load_probe(path, d_model=576)
    with pytest.raises(ProbeError, match="not 'gemma3-270m'"):
        load_probe(path, model="gemma3-270m")
    with pytest.raises(ProbeError, match="does not exist"):
        load_probe(tmp_path / "missing.safetensors")
    with pytest.raises(ProbeError, match="metadata says d_model"):
        save_probe(TaskProbe().fit(X, y), tmp_path / "q.safetensors",
                   {"model": "m", "d_model": 9})
    other = save_probe(TaskProbe(C=2.0).fit(X, y), tmp_path / "o.safetensors",
                       {"model": "smollm2-135m", "d_model": 8})
    shutil.copy(other, path)  # tensors of another probe under this probe's JSON
    with pytest.raises(ProbeError, match="does not match"):
        load_probe(path)


# ----------------------------------------------------------------------------- run folders


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "gpt2"
    analyze(tiny_gpt2, TEXT, out=out, top_k=3, window=32, n_permutations=0,
            save_residuals=True, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_llama_run(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "llama"
    analyze(tiny_llama, TEXT, out=out, top_k=3, window=32, n_permutations=0,
            save_residuals=True, progress=False)
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "probe", ignore_errors=True)
    return dest


FAST = {"label_rule": "count", "min_layer": 0, "folds": 3, "progress": False}


def test_run_probe_writes_metrics_probe_and_report(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    result = run_probe(run, **FAST)
    folder = run / "probe"
    assert sorted(p.name for p in folder.iterdir()) == [
        "metrics.json", "probe.json", "probe.safetensors", "report.html"]
    assert not any(p.name.startswith(".") for p in run.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
    for name in CONTROLS:
        assert 0 <= metrics["controls"][name]["balanced_accuracy"] <= 1
        assert metrics["controls"][name]["per_layer_accuracy"]
    assert metrics["chance"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["n_states"] == sum(metrics["task_counts"].values()) == len(result.states)
    assert set(metrics["per_layer_accuracy"]) == {"0", "1", "2", "3"}
    assert metrics["label_rules"]["count"]["n_states"] == metrics["n_states"]
    assert np.array(metrics["confusion_matrix"]["counts"]).sum() == metrics["n_states"]
    assert isinstance(metrics["reads_task"]["reads_task"], bool)
    assert_groups_disjoint(result.folds, result.states.group)
    html = (folder / "report.html").read_text()
    assert "plotly" in html and "Confusion matrix" in html and "layer index only" in html
    loaded = ProbeRunResult.load(run)
    assert np.array_equal(loaded.probe.predict_proba(result.features),
                          result.probe.predict_proba(result.features))
    assert loaded.metrics == metrics
    assert loaded.probe.meta_["layers"] == [0, 1, 2, 3]


def test_run_probe_is_deterministic(tiny_run, tmp_path):
    a = run_probe(copy_run(tiny_run, tmp_path / "a"), **FAST).metrics
    b = run_probe(copy_run(tiny_run, tmp_path / "b"), **FAST).metrics
    for m in (a, b):
        m.pop("timings"), m.pop("run")
        for c in m["controls"].values():
            c.pop("seconds")
    assert a == b


def test_run_without_saved_residuals_reruns_the_model(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    saved = run_probe(run, write=False, **FAST)
    shutil.rmtree(run / "residuals")
    rerun = run_probe(run, write=False, **FAST)
    assert "rerun" in rerun.metrics["feature_source"]
    np.testing.assert_allclose(rerun.features, saved.features, atol=1e-4)


def test_normed_features_and_per_layer_probes(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    raw = run_probe(run, write=False, **FAST)
    normed = run_probe(run, features="normed", per_layer=True, **FAST)
    assert not np.allclose(raw.features, normed.features)
    per_layer = normed.metrics["per_layer_probes"]
    assert set(per_layer) == {"0", "1", "2", "3"}
    files = sorted(p.name for p in (run / "probe" / "per_layer").glob("*.safetensors"))
    assert files == [f"layer_{layer:02d}.safetensors" for layer in sorted(normed.layer_probes)]
    one = TaskProbe.load(run / "probe" / "per_layer" / files[0])
    assert one.meta_["features"] == "normed" and len(one.meta_["layers"]) == 1


def test_run_probe_refuses_another_model(tiny_run, tiny_llama, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    with pytest.raises(RunFolderError, match="was made with model"):
        run_probe(run, model=tiny_llama, **FAST)
    assert not (run / "probe").exists()


# ----------------------------------------------------------------------------- CLI


def cli(args, capsys):
    try:
        code = main(["probe", "--quiet", *args])
    except SystemExit as exit_:  # argparse refuses bad choices by exiting
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _no_probe_output(run: Path) -> bool:
    return not (run / "probe").exists() and not (run.parent / ".probe.partial").exists() and \
        not (run / ".probe.partial").exists()


def _mixed_residuals(run: Path, other: Path) -> None:
    shutil.rmtree(run / "residuals")
    shutil.copytree(other / "residuals", run / "residuals")


BAD = [
    ("missing", ["--label-rule", "count"], "does not exist"),
    ("not a run", ["--label-rule", "count"], "not a topk-saturation run folder"),
    ("incomplete", ["--label-rule", "count"], "incomplete: missing saturation.csv"),
    ("other model", ["--label-rule", "count", "--min-layer", "0"], "mixes runs of different"),
    ("too few", ["--label-rule", "in-order", "--min-layer", "0", "--top-k", "3"],
     "task 3 has 9"),
    ("too few windows", ["--label-rule", "count", "--min-layer", "0", "--folds", "9"],
     "at least 9 windows"),
    ("ok", ["--folds", "1"], "--folds must be at least 2"),
    ("ok", ["--label-rule", "paper"], "invalid choice: 'paper'"),
    ("ok", ["--min-layer", "99"], "outside 0..4"),
    ("ok", ["--min-layer", "1.5"], "min-layer"),
    ("ok", ["--features", "logits"], "invalid choice: 'logits'"),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD, ids=[f"{c}:{' '.join(a)}"
                                                                 for c, a, _ in BAD])
def test_bad_input_exits_2_and_writes_nothing(case, args, message, tiny_llama_run, tiny_run,
                                              tmp_path, capsys):
    run = tmp_path / "run"
    if case == "missing":
        pass
    elif case == "not a run":
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    else:
        copy_run(tiny_llama_run, run)
        if case == "incomplete":
            (run / "saturation.csv").unlink()
        elif case == "other model":
            _mixed_residuals(run, tiny_run)  # gpt2 residuals (4 layers) in a llama run (5)
    before = sorted(p.name for p in run.iterdir()) if run.exists() else None
    code, _, err = cli(["--run", str(run), *args], capsys)
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _no_probe_output(run)
    assert (sorted(p.name for p in run.iterdir()) if run.exists() else None) == before


def test_cli_on_a_tiny_run(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    code, out, err = cli(["--run", str(run), "--label-rule", "count", "--min-layer", "0",
                          "--folds", "3", "--balance", "truncate"], capsys)
    assert code == 0, err
    assert "layer index only" in out and "leaky" in out and str(run / "probe") in out
    metrics = json.loads((run / "probe" / "metrics.json").read_text())
    assert metrics["options"]["balance"] == "truncate"


@pytest.mark.smollm2
def test_cli_end_to_end_on_smollm2(smollm2_run, capsys):
    code, out, err = cli(["--run", str(smollm2_run), "--label-rule", "count",
                          "--min-layer", "0.7", "--folds", "3"], capsys)
    assert code == 0, err
    folder = smollm2_run / "probe"
    assert {"metrics.json", "probe.safetensors", "probe.json", "report.html"} <= {
        p.name for p in folder.iterdir()}
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert metrics["model"] == "smollm2-135m" and metrics["d_model"] == 576
    assert metrics["min_layer"] == 21 and metrics["n_positions"] == 1000
    assert metrics["n_states"] == 1000 * 9
    for name in CONTROLS:
        assert 0 <= metrics["controls"][name]["balanced_accuracy"] <= 1
    assert "balanced accuracy" in out and "probe" in out
    probe = TaskProbe.load(folder / "probe.safetensors", model="smollm2-135m", d_model=576)
    assert probe.coef_.shape == (5, 576)


def test_default_k_drops_tasks_with_too_few_states(tiny_llama_run, tmp_path, capsys):
    run = copy_run(tiny_llama_run, tmp_path / "run")
    code, _, err = cli(["--run", str(run), "--label-rule", "in-order", "--min-layer", "0"],
                         capsys)
    assert code == 0, err
    assert "probing tasks 1..2" in err and "task 3 has 9" in err
    metrics = json.loads((run / "probe" / "metrics.json").read_text())
    assert metrics["top_k"] == 2 and metrics["tasks_reduced_from"] == 3
    assert metrics["chance"] == 0.5
