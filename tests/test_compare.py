"""`compare`: determinism with seeds, reuse of finished runs, resuming, and bad input."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

import probes.compare as compare_module
from probes.compare import compare, plan_runs, quantisation, run_slug
from topk_saturation_cli import main

from .conftest import HAMLET_LINES, TINY_GPT2, TINY_LLAMA

TEXT = "text:" + HAMLET_LINES * 3
MODELS = f"{TINY_GPT2},{TINY_LLAMA}"
FAST = ["--top-k", "4", "--window", "40", "--permutations", "100", "--quiet"]


def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _without_timings(path):
    return pd.read_csv(path).drop(columns=["run_time_s"])


def test_compare_is_deterministic_with_seeds(tmp_path, capsys):
    for name in ("a", "b"):
        code, out, err = _cli(["compare", "--models", MODELS, "--text", TEXT, "--seeds", "2",
                               "--out", str(tmp_path / name), *FAST], capsys)
        assert code == 0, err
        assert "| model |" in out
    a, b = tmp_path / "a", tmp_path / "b"
    names = {p.name for p in a.iterdir()}
    assert {"compare.csv", "compare_runs.csv", "compare.html", "compare.md", "summary.json",
            "runs"} <= names
    pd.testing.assert_frame_equal(_without_timings(a / "compare.csv"),
                                  _without_timings(b / "compare.csv"))
    pd.testing.assert_frame_equal(_without_timings(a / "compare_runs.csv"),
                                  _without_timings(b / "compare_runs.csv"))
    table = pd.read_csv(a / "compare.csv")
    assert table["model"].tolist() == [TINY_GPT2, TINY_LLAMA]
    assert table["n_seeds"].tolist() == [2, 2] and table["n_layers"].tolist() == [4, 5]
    for col in ("kept_share", "mean_tau_all", "mean_tau_kept", "null_mean_tau_all", "p_all",
                "frac_in_order_all", "s1_norm", "s4_norm", "s1_norm_err", "quantisation",
                "mean_tau_all_sd"):
        assert col in table.columns
    assert table["s1_norm"].between(0, 1).all() and table["s4_norm"].between(0, 1).all()
    assert (table["null_mean_tau_all"] < 0).all()  # ties are discordant: the null is below 0
    runs = pd.read_csv(a / "compare_runs.csv")
    assert sorted(runs["seed"].tolist()) == [0, 1, 1, 2]  # each spec's seed and the next one
    gpt2 = runs[runs["model"] == TINY_GPT2]
    assert gpt2["slug"].nunique() == 2
    assert gpt2["mean_tau_all"].nunique() == 2 or gpt2["s1_norm"].nunique() == 2
    mean = gpt2["s1_norm"].mean()
    assert table.loc[0, "s1_norm"] == pytest.approx(mean)
    assert table.loc[0, "s1_norm_err"] == pytest.approx(gpt2["s1_norm"].std(ddof=1))
    for slug in runs["slug"]:
        assert (a / "runs" / slug / "summary.json").exists()
    html = (a / "compare.html").read_text()
    assert "plotly" in html and "<b>s_k/(L-1)</b>" in html and "runs/" in html
    assert html.count("Plotly.newPlot") == 1 and TINY_LLAMA.split("?")[0] in html
    summary = json.loads((a / "summary.json").read_text())
    assert summary["command"] == "compare" and summary["options"]["top_k"] == 4
    assert not list(tmp_path.glob(".*partial"))


def test_finished_runs_are_reused_and_options_are_checked(tmp_path):
    out = tmp_path / "cmp"
    opts = dict(text=TEXT, seeds=1, out=out, top_k=3, window=40, n_permutations=50,
                progress=False)
    first = compare(MODELS, **opts)
    assert not first.runs["reused"].any()
    again = compare(MODELS, **opts)
    assert again.runs["reused"].all()
    pd.testing.assert_frame_equal(first.table.drop(columns=["run_time_s"]),
                                  again.table.drop(columns=["run_time_s"]))
    changed = compare(MODELS, **{**opts, "top_k": 4})
    assert not changed.runs["reused"].any()
    assert changed.table.loc[0, "s4_norm"] is not None


def test_failed_compare_writes_nothing_then_resumes(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    real = compare_module.analyze
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "analyze", flaky)
    opts = dict(text=TEXT, seeds=1, out=out, top_k=3, window=40, n_permutations=20,
                progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compare(MODELS, **opts)
    assert not out.exists()
    assert (tmp_path / ".cmp.partial" / "runs").is_dir()
    resumed = compare(MODELS, **opts)
    assert resumed.runs["reused"].tolist() == [True, False]
    assert not (tmp_path / ".cmp.partial").exists()


BAD = [
    (["--models", ""], "no empty entry"),
    (["--models", f"{TINY_GPT2},{TINY_GPT2}"], "twice"),
    (["--models", "no such model!"], "unknown model"),
    (["--models", "random:whisper"], "no TransformerBridge adapter for Whisper"),
    (["--models", "minilm"], "no masked-LM head"),
    (["--models", "random:gpt2?n_layers=0"], "must be positive"),
    (["--models", "./missing-folder"], "does not exist"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--text", "missing-file.txt"], "does not exist"),
    (["--images", "no/such/images"], "does not exist"),
    (["--max-images", "0"], "--max-images must be positive"),
    (["--mask-rate", "2"], "--mask-rate"),
    (["--keep-fraction", "0"], "--keep-fraction"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, message, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--models", MODELS, "--text", TEXT, "--out", str(out), "--quiet", *extra]
    code, _, err = _cli(args, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_foreign_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = _cli(["compare", "--models", TINY_GPT2, "--text", TEXT, "--out",
                         str(tmp_path), "--quiet"], capsys)
    assert code == 2 and "not a topk-saturation run" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_plan_and_names():
    plan = plan_runs(["smollm2", "random:llama?n_layers=2&seed=4"], seeds=3)
    assert plan[0].spec == "smollm2-135m"
    assert [r.seed for r in plan] == [None, 4, 5, 6]
    assert len({r.slug for r in plan}) == 4
    assert run_slug(plan[1].spec).startswith("random-llama-seed4-")
    assert quantisation("pretrained Gemma 3 270M, GGUF Q4_K_M (4-bit) dequantised") == \
        "4-bit (GGUF Q4_K_M), dequantised to float32"


def test_markdown_table_has_one_row_per_model(tmp_path):
    res = compare([TINY_GPT2], text=TEXT, seeds=2, out=None, top_k=3, n_permutations=0,
                  progress=False, log=io.StringIO().write)
    lines = res.markdown().splitlines()
    assert len(lines) == 3 and "untrained, 2 seeds" in lines[2]
