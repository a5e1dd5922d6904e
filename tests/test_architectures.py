"""Masked LMs, vision classifiers and encoder-decoders: readouts, inputs and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from probes.analysis import AnalysisOptions, AnalysisResult, analyze
from probes.arch_analysis import InputOptions, iter_row_batches
from probes.architectures import (
    HeadReadout,
    canonical_spec,
    make_readout,
    model_kind,
    parse_arch_spec,
)
from probes.errors import (
    ImageSourceError,
    InvalidOptionError,
    MissingPackageError,
    UnsupportedArchitectureError,
)
from probes.images import load_images
from probes.models import load_model
from probes.saturation import brute_force_saturation, saturation_layers, targets_from_logits

from .conftest import HAMLET_LINES

TEXT = "text:" + HAMLET_LINES * 3
TINY = "n_layers=5&d_model=64&n_heads=4&d_mlp=128"
SPECS = {
    "bert": f"random:bert?{TINY}&n_ctx=128&seed=3",
    # 64 classes: more than the 32 screening candidates, so the bf16 screen is exercised.
    "vit": f"random:vit?{TINY}&image_size=32&patch_size=8&n_classes=64&seed=3",
    "t5": f"random:t5?{TINY}&seed=3",
    "bart": f"random:bart?{TINY}&n_ctx=128&seed=3",
}


def _randomise_head_bias(model, family):
    """Fresh models start with zero head biases; random ones make a missed bias show."""
    from probes.architectures import _linear

    hf = model._extra["hf_model"]
    bias = {"bert": lambda: _linear(hf.cls.predictions.decoder).bias,
            "vit": lambda: _linear(hf.classifier).bias,
            "bart": lambda: hf.final_logits_bias}.get(family)
    if bias is not None:
        target = bias()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            target.copy_(torch.randn(target.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def tiny(request):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(SPECS[family])
            _randomise_head_bias(cache[family], family)
        return cache[family]

    return get


def _first_batch(model, batch_tokens=96, **inputs):
    opts = AnalysisOptions(text=TEXT, window=24, batch_tokens=batch_tokens)
    _, _, batches = iter_row_batches(model, opts, InputOptions(max_images=12, **inputs))
    return next(batches)


def _hf_logits(model, family):
    """The Hugging Face model's own logits on a small input, called directly."""
    hf = model._extra["hf_model"]
    with torch.no_grad():
        if family == "vit":
            from probes.images import to_pixel_values

            pixels = to_pixel_values(load_images("sklearn:digits", 3), 32)
            return hf(pixel_values=pixels).logits, pixels
        ids = torch.tensor([[50258, 464, 2068, 7586, 21831, 50259]])
        if family == "bert":
            return hf(input_ids=ids).logits[0], ids
        dec = torch.tensor([[50257, 464, 2068, 7586]])
        return hf(input_ids=ids, decoder_input_ids=dec).logits[0], (ids, dec)


@pytest.mark.parametrize("family", list(SPECS))
def test_readout_at_last_layer_reproduces_the_model(tiny, family):
    from probes.arch_analysis import hooked_forward

    model = tiny(family)
    readout = make_readout(model, screen="none")
    assert isinstance(readout, HeadReadout)
    ref, inp = _hf_logits(model, family)
    stack = "decoder_blocks" if family in ("t5", "bart") else "blocks"
    if family == "vit":
        out, resid = hooked_forward(model.bridge, stack, 5, None, pixel_values=inp)
        rows = resid[:, :, 0]  # the CLS token of each image
    elif family == "bert":
        out, resid = hooked_forward(model.bridge, stack, 5, inp)
        rows = resid[:, 0]
    else:
        out, resid = hooked_forward(model.bridge, stack, 5, inp[0], decoder_input_ids=inp[1])
        rows = resid[:, 0]
    assert torch.allclose(out.reshape(ref.shape), ref, atol=1e-5)
    lens_logits = readout.logits(rows[-1])
    assert lens_logits.shape == ref.shape
    assert float((lens_logits - ref).abs().max()) < 1e-4
    # An earlier layer is not the output: the readout really reads the layer it is given.
    assert float((readout.logits(rows[1]) - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("family, inputs", [
    ("vit", {}), ("t5", {}), ("bart", {}), ("bert", {}), ("bert", {"mlm_positions": "all"}),
])
@pytest.mark.parametrize("screen", ["none", "bf16"])
def test_engine_equals_brute_force(tiny, family, inputs, screen):
    model = tiny(family)
    batch = _first_batch(model, **inputs)
    readout = make_readout(model, screen=screen)
    targets = targets_from_logits(batch.logits, 5)
    s = saturation_layers(readout, batch.resid, targets).numpy()
    reference = brute_force_saturation(make_readout(model, screen="none"), batch.resid, targets)
    assert s.shape == (len(batch.meta), 5)
    np.testing.assert_array_equal(s, reference)
    assert len(np.unique(s)) > 1  # the comparison has something to disagree on


def test_vision_rows_are_cls_tokens(tiny):
    model = tiny("vit")
    batch = _first_batch(model, batch_tokens=17 * 12)  # 16 patches + CLS per image
    assert len(batch.meta) == 12 and set(batch.meta["position"]) == {0}
    assert batch.resid.shape == (5, 12, 64) and batch.logits.shape == (12, 64)
    assert batch.meta["token"].iloc[1] == "digits#1 (label 1)"


def test_masked_positions_are_masked_and_seeded(tiny):
    model = tiny("bert")
    a, b = _first_batch(model), _first_batch(model)
    assert a.meta.equals(b.meta)
    assert set(a.meta["token_id"]) == {50260}  # the [MASK] token is the input there
    assert (a.meta["next_token_id"] != 50260).all()
    every = _first_batch(model, mlm_positions="all")
    assert len(every.meta) > 3 * len(a.meta)


@pytest.mark.parametrize("family", ["bert", "t5", "bart", "vit"])
def test_analyze_each_kind_writes_the_same_table(tiny, family, tmp_path):
    model = tiny(family)
    out = tmp_path / family
    result = analyze(model, TEXT, out=out, top_k=5, window=24, n_permutations=50,
                     max_images=80, progress=False)
    table = pd.read_csv(out / "saturation.csv", keep_default_na=False)
    assert list(table.columns) == ["window", "position", "token_id", "token", "next_token_id",
                                   *[f"target_{k}" for k in range(1, 6)],
                                   *[f"s_{k}" for k in range(1, 6)], "kept"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == model_kind(model) and summary["n_layers"] == 5
    assert summary["engine"]["lens_check_max_abs_diff"] < 1e-4
    if family != "vit":  # the tiny ViT settles nearly everything at its last layer
        assert summary["all"]["n_scored"] > 0 and summary["all"]["null_mean_tau"] is not None
    assert table[[f"s_{k}" for k in range(1, 6)]].to_numpy().max() <= 4
    assert AnalysisResult.load(out).summary == result.summary
    assert "plotly" in (out / "report.html").read_text()
    if family == "vit":
        assert summary["n_positions"] == 80 and summary["text"] == "sklearn:digits"


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_padding_does_not_change_results(tiny, family):
    """Short windows padded in a batch give what they give alone (attention masks work)."""
    model = tiny(family)
    text = ["Short text here.", HAMLET_LINES, "Another one, a little longer than the first."]
    one = analyze(model, text, top_k=5, window=40, batch_tokens=40, n_permutations=0,
                  progress=False)
    many = analyze(model, text, top_k=5, window=40, batch_tokens=4096, n_permutations=0,
                   progress=False)
    cols = [f"s_{k}" for k in range(1, 6)] + [f"target_{k}" for k in range(1, 6)]
    assert one.summary["engine"]["rows_decoded"] > 0
    pd.testing.assert_frame_equal(one.table[cols], many.table[cols])


def test_unsupported_architectures_are_named(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match=r"Whisper.*no TransformerBridge"):
        load_model("random:whisper")
    with pytest.raises(UnsupportedArchitectureError, match=r"BertModel.*all-MiniLM"):
        load_model("minilm")
    from transformers import BertConfig, BertModel

    folder = tmp_path / "encoder"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, vocab_size=100,
                         architectures=["BertModel"])).save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match="BertModel cannot be analysed"):
        load_model(str(folder))


def test_local_folder_of_a_masked_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from probes.architectures import special_tokenizer

    folder = tmp_path / "mlm"
    tok = special_tokenizer()
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                               architectures=["BertForMaskedLM"])).save_pretrained(folder)
    tok.save_pretrained(folder)
    again = load_model(str(folder))
    assert model_kind(again) == "masked" and again.info.weights == "from a local folder"
    assert again._extra["specials"].mask_id == 50260
    batch = _first_batch(again)
    assert float((make_readout(again).logits(batch.resid[-1]) - batch.logits).abs().max()) < 1e-4


def test_specs_and_options():
    assert parse_arch_spec("random:vit")[1]["n_classes"] == 1000
    assert canonical_spec("random:t5?seed=4").endswith("&seed=4")
    with pytest.raises(InvalidOptionError, match="multiple of patch_size"):
        parse_arch_spec("random:vit?image_size=30&patch_size=8")
    with pytest.raises(InvalidOptionError, match="--mlm-positions"):
        analyze(SPECS["bert"], TEXT, mlm_positions="some", progress=False)
    with pytest.raises(ImageSourceError, match="does not exist"):
        analyze(SPECS["vit"], TEXT, images="no/such/folder", progress=False)


def test_image_folder_of_arrays(tmp_path, tiny):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.random((16, 16)))
    images = load_images(str(tmp_path))
    assert [im.name for im in images] == ["a.npy", "b.npy"]
    assert all(im.pixels.shape[2] == 3 and im.pixels.max() <= 1 for im in images)
    result = analyze(tiny("vit"), TEXT, images=str(tmp_path), top_k=3, n_permutations=0,
                     progress=False)
    assert result.table["token"].tolist() == ["a.npy", "b.npy"]
    np.save(tmp_path / "c.npy", np.full((4, 4), 3.0))
    with pytest.raises(ImageSourceError, match=r"0\.\.1"):
        load_images(str(tmp_path))


def test_photos_need_pillow(tmp_path):
    pytest.importorskip("sklearn")
    try:
        import PIL  # noqa: F401
        pytest.skip("Pillow is installed here")
    except ImportError:
        pass
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(MissingPackageError, match="pip install pillow"):
        load_images(str(tmp_path))
    with pytest.raises(MissingPackageError, match="pip install pillow"):
        load_images("sklearn:sample")
