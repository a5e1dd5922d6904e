"""`intervene` end to end on small runs, and its bad inputs."""

from __future__ import annotations

import json

import pytest

from probes.analysis import analyze
from topk_saturation_cli import main

from .conftest import HAMLET_LINES


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("iv") / "run"
    analyze(tiny_llama, "text:" + HAMLET_LINES * 6, out=out, top_k=3, window=64,
            n_permutations=20, progress=False)
    return out


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_direction_end_to_end(tiny_run, tiny_llama, capsys, monkeypatch):
    import interventions.intervene as iv

    monkeypatch.setattr(iv, "load_model", lambda spec: tiny_llama)
    code, out, err = _run(["intervene", "--run", str(tiny_run), "--method", "direction",
                           "--alphas", "0,0.5,2", "--random", "3", "--max-positions", "12",
                           "--min-layer", "1", "--quiet"], capsys)
    assert code == 0, err
    folder = tiny_run / "interventions"
    data = json.loads((folder / "direction.json").read_text())
    (layer, block), = data["layers"].items()
    alphas = [e["alpha"] for e in block["per_alpha"]]
    assert alphas == [0.0, 0.5, 2.0]
    for entry in block["per_alpha"]:
        assert {"n", "switch_rate", "ci", "random_control", "reversed_control"} <= set(entry)
        assert entry["random_control"]["n"] == 3 * entry["n"]
    assert block["per_alpha"][0]["switch_rate"] == 0.0  # alpha 0 changes nothing
    assert (folder / "direction.csv").exists() and (folder / "direction.html").exists()
    assert (folder / f"direction_L{layer}.safetensors").exists()
    assert "switch" in out and "wrote" in out


@pytest.mark.smollm2
def test_patch_end_to_end_smollm2(smollm2_run, smollm2, capsys, monkeypatch):
    import interventions.intervene as iv

    monkeypatch.setattr(iv, "load_model", lambda spec: smollm2)
    code, out, err = _run(["intervene", "--run", str(smollm2_run), "--method", "patch",
                           "--span", "1", "--max-pairs", "6", "--quiet"], capsys)
    assert code == 0, err
    data = json.loads((smollm2_run / "interventions" / "patch.json").read_text())
    assert [e["offset"] for e in data["per_offset"]] == [-1, 0, 1]
    for entry in data["per_offset"]:
        assert entry["n"] == 6 and entry["random_control"]["n"] == 6
        assert 0 <= entry["switch_rate"] <= 1
    assert data["n_pairs"] == 6 and data["n_pairs_found"] >= 6
    assert "l - s_e" in out


@pytest.mark.smollm2
def test_direction_smollm2_alpha_zero(smollm2_run, smollm2, capsys, monkeypatch):
    import interventions.intervene as iv

    monkeypatch.setattr(iv, "load_model", lambda spec: smollm2)
    code, _, err = _run(["intervene", "--run", str(smollm2_run), "--alphas", "0,0.5",
                         "--random", "2", "--max-positions", "6", "--quiet"], capsys)
    assert code == 0, err
    data = json.loads((smollm2_run / "interventions" / "direction.json").read_text())
    (block,) = data["layers"].values()
    zero = block["per_alpha"][0]
    assert zero["alpha"] == 0 and zero["switch_rate"] == 0
    assert zero["random_control"]["switch_rate"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--layers", "7"], "outside 0..4"),
    (["--alphas", ""], "alpha grid is empty"),
    (["--k", "3"], "needs --top-k >= 4"),
    (["--method", "patch", "--min-gap", "40"], "no position pairs"),
    (["--source", "probe"], "no trained probe"),
])
def test_bad_input(extra, message, tiny_run, tiny_llama, capsys, monkeypatch):
    import interventions.intervene as iv

    monkeypatch.setattr(iv, "load_model", lambda spec: tiny_llama)
    before = sorted(p.name for p in tiny_run.rglob("*"))
    code, _, err = _run(["intervene", "--run", str(tiny_run), "--min-layer", "1", "--quiet",
                         *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tiny_run.rglob("*")) == before


def test_missing_run_and_other_model(tmp_path, tiny_run, tiny_gpt2, capsys, monkeypatch):
    code, _, err = _run(["intervene", "--run", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err
    import interventions.intervene as iv

    monkeypatch.setattr(iv, "load_model", lambda spec: tiny_gpt2)
    code, _, err = _run(["intervene", "--run", str(tiny_run), "--quiet"], capsys)
    assert code == 2 and "the run was made with model" in err


def test_direction_from_the_runs_probe(tiny_run, tiny_llama, capsys, monkeypatch):
    """``--source probe`` steers along the trained probe's task k -> k+1 weight difference."""
    import interventions.intervene as iv
    from probes.probe_run import run_probe

    run_probe(tiny_run, label_rule="count", min_layer=1, folds=2, model=tiny_llama,
              progress=False)
    monkeypatch.setattr(iv, "load_model", lambda spec: tiny_llama)
    code, _, err = _run(["intervene", "--run", str(tiny_run), "--source", "probe",
                         "--alphas", "0,1", "--random", "2", "--max-positions", "8",
                         "--min-layer", "1", "--quiet"], capsys)
    assert code == 0, err
    data = json.loads((tiny_run / "interventions" / "direction.json").read_text())
    (block,) = data["layers"].values()
    assert block["source"] == "probe"
    assert block["per_alpha"][0]["switch_rate"] == 0.0
