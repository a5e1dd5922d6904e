"""``analyze`` for masked LMs, vision classifiers and encoder-decoders.

:func:`probes.analysis.analyze` hands models of these kinds (see
:mod:`probes.architectures`) to :func:`analyze_other`, which feeds each kind the input that
fits it, collects the rows to decode, and then runs the same engine, statistics, table,
summary and report as for decoder-only models:

- ``masked``: text windows framed by the tokenizer's special tokens (``[CLS] ... [SEP]``);
  a seeded ``mask_rate`` share of each window's positions is replaced by the mask token and
  decoded (``mlm_positions="masked"``, default), or every text position is decoded
  unmasked (``"all"``). A row's ``next_token_id`` is the original token at its position.
- ``seq2seq``: the window is the encoder input and, teacher-forced, the decoder target
  (``decoder_start, t_0 .. t_{n-2}`` predicting ``t_0 .. t_{n-1}``): the text form of the
  paper's Whisper setting. Rows are decoder positions.
- ``vision``: images (:mod:`probes.images`), one row per image: the CLS token.

Targets ``y_1..y_K`` are always the model's own final top-K at the row, so ``s_k`` has
exactly the meaning of :mod:`probes.saturation`.

Example:
    >>> r = analyze_spec("random:bart?n_layers=2&d_model=32&n_heads=4&d_mlp=64",
    ...                  "text:It was the best of times, it was the worst of times.",
    ...                  top_k=3, n_permutations=0)
    >>> r.summary["kind"], r.summary["n_layers"], len(r.table) == r.summary["n_positions"]
    ('seq2seq', 2, True)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from probes.architectures import Specials, make_readout, model_kind
from probes.corpus import Window, check_window, iter_text, make_windows
from probes.errors import InvalidOptionError, UnsupportedArchitectureError
from probes.images import DEFAULT_IMAGES, Image, check_image_source, load_images, to_pixel_values
from probes.lens import LogitLens, lens_error_at_last_layer
from probes.models import LoadedModel
from probes.order_stats import order_statistics
from probes.runfolder import FORMAT_VERSION, TOOL, staged_folder
from probes.saturation import saturation_layers, targets_from_logits


@dataclass(frozen=True)
class InputOptions:
    """Options of the inputs of masked, vision and encoder-decoder models.

    Attributes:
        images: Image source of vision models (see :mod:`probes.images`).
        max_images: Cap on the number of images (None: every image of the source).
        mlm_positions: ``"masked"`` (decode masked positions) or ``"all"`` (every position,
            unmasked), for masked LMs.
        mask_rate: Share of each window's positions that are masked (at least one).
    """

    images: str = DEFAULT_IMAGES
    max_images: int | None = 256
    mlm_positions: str = "masked"
    mask_rate: float = 0.15

    def validate(self) -> None:
        """Refuse out-of-range values.

        Raises:
            InvalidOptionError: ``max_images < 1``, an unknown ``mlm_positions`` or a
                ``mask_rate`` outside (0, 1].
            ImageSourceError: ``images`` is unknown or does not exist.
        """
        if self.max_images is not None and self.max_images < 1:
            raise InvalidOptionError(f"--max-images must be positive, got {self.max_images}")
        if self.mlm_positions not in ("masked", "all"):
            raise InvalidOptionError(
                f"--mlm-positions must be masked or all, got {self.mlm_positions!r}")
        if not 0 < self.mask_rate <= 1:
            raise InvalidOptionError(f"--mask-rate must be in (0, 1], got {self.mask_rate}")
        check_image_source(self.images)


INPUT_OPTION_NAMES = tuple(f.name for f in fields(InputOptions))
_KIND_INPUTS = {"causal": (), "masked": ("mlm_positions", "mask_rate"),
                "vision": ("images", "max_images"), "seq2seq": ()}
_TEXT_OPTIONS = ("text", "max_tokens", "window", "bos")
_COMMON_OPTIONS = ("top_k", "keep_fraction", "n_permutations", "seed")


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], InputOptions]:
    """Take the input options out of ``analyze``'s keyword options.

    Args:
        options: Keyword options of ``analyze``, some of which may be :class:`InputOptions`
            fields.

    Returns:
        ``(rest, inputs)``: the other options, and an (unvalidated) :class:`InputOptions`
        built from the input ones (defaults for those absent).

    Example:
        >>> rest, inputs = split_options({"top_k": 3, "images": "sklearn:digits"})
        >>> rest, inputs.images
        ({'top_k': 3}, 'sklearn:digits')
    """
    rest = {k: v for k, v in options.items() if k not in INPUT_OPTION_NAMES}
    inputs = InputOptions(**{k: v for k, v in options.items() if k in INPUT_OPTION_NAMES})
    return rest, inputs


def relevant_options(kind: str) -> tuple[str, ...]:
    """Names of the options that change the results of a model of this kind.

    Args:
        kind: ``causal``, ``masked``, ``vision`` or ``seq2seq``.

    Returns:
        Option names: the text options (none for vision; no ``bos`` for masked and seq2seq),
        the common ones, then the kind's input options.
    """
    text = () if kind == "vision" else _TEXT_OPTIONS
    if kind == "seq2seq" or kind == "masked":
        text = tuple(o for o in text if o != "bos")
    return (*text, *_COMMON_OPTIONS, *_KIND_INPUTS[kind])


# ----------------------------------------------------------------------------- forward


@dataclass
class RowBatch:
    """The rows of one forward pass that are decoded.

    Attributes:
        resid: Residual stream after every block at the rows ``[layer, n, d_model]``.
        logits: The model's own output at the rows ``[n, d_vocab]``.
        meta: ``window, position, token_id, next_token_id`` per row (and ``token`` for
            images).
    """

    resid: Float[Tensor, "layer n d_model"]
    logits: Float[Tensor, "n d_vocab"]
    meta: pd.DataFrame


def hooked_forward(
    bridge: torch.nn.Module, stack: str, n_layers: int, *args: Any, **kwargs: Any,
) -> tuple[Tensor, Float[Tensor, "layer batch seq d_model"]]:
    """One forward pass returning the output and ``{stack}.{l}.hook_resid_post`` for all l.

    Args:
        bridge: A TransformerBridge.
        stack: Hook prefix of the blocks: ``"blocks"`` or ``"decoder_blocks"``.
        n_layers: Number of blocks of that stack to capture (all of ``0..n_layers-1``).
        *args: Positional inputs of the bridge's forward (input ids, or None for images).
        **kwargs: Keyword inputs (``attention_mask``, ``decoder_input_ids``, ``pixel_values``).

    Returns:
        ``(logits, resid)``: the output logits (``.logits`` of a model output, where it has
        one) and the residual streams ``[n_layers, batch, seq, d_model]``.

    Raises:
        RuntimeError: A hook point of ``stack`` did not fire.
    """
    store: list[Tensor | None] = [None] * n_layers

    def keeper(slot: int):
        def keep(activation: Tensor, hook: object) -> None:
            store[slot] = activation.detach()

        return keep

    hooks = [(f"{stack}.{layer}.hook_resid_post", keeper(layer)) for layer in range(n_layers)]
    with torch.no_grad():
        out = bridge.run_with_hooks(*args, fwd_hooks=hooks, **kwargs)
    if any(t is None for t in store):
        raise RuntimeError(f"hook points of {stack} did not fire")
    logits = getattr(out, "logits", out)
    return logits, torch.stack(store)  # type: ignore[arg-type]


def _device(model: LoadedModel) -> torch.device:
    return torch.device(model._extra["hf_model"].device)


def _frame(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["window", "position", "token_id", "next_token_id"])


def _framed(windows: Sequence[Window], sp: Specials, device: torch.device
            ) -> tuple[Tensor, Tensor]:
    """Encoder input ``prefix + text + suffix``, right-padded, and its attention mask."""
    seqs = [[*sp.prefix, *w.token_ids, *sp.suffix] for w in windows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), sp.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def masked_positions(window: Window, inputs: InputOptions, seed: int) -> list[int]:
    """The text positions of a window that are masked and decoded (seeded per window).

    Args:
        window: The window.
        inputs: The input options (``mlm_positions`` and ``mask_rate``).
        seed: The run's seed; the draw is seeded with ``(seed, window_id)``.

    Returns:
        Sorted 0-based text positions: every position with ``mlm_positions="all"``, else
        ``round(mask_rate * n)`` of them (at least one, at most ``n``).

    Example:
        >>> w = Window(3, "d", 0, tuple(range(20)), -1)
        >>> masked_positions(w, InputOptions(), 0) == masked_positions(w, InputOptions(), 0)
        True
        >>> len(masked_positions(w, InputOptions(), 0)), len(masked_positions(
        ...     w, InputOptions(mlm_positions="all"), 0))
        (3, 20)
    """
    n = len(window)
    if inputs.mlm_positions == "all":
        return list(range(n))
    count = min(n, max(1, round(inputs.mask_rate * n)))
    rng = np.random.default_rng([seed, window.window_id])
    return sorted(int(p) for p in rng.choice(n, size=count, replace=False))


def masked_batch(model: LoadedModel, windows: Sequence[Window], inputs: InputOptions,
                 seed: int) -> RowBatch:
    """Run a masked LM on framed windows and keep the decoded positions.

    Args:
        model: A loaded masked LM.
        windows: The windows of the batch.
        inputs: The input options (which positions are masked and decoded).
        seed: The run's seed (see :func:`masked_positions`).

    Returns:
        A :class:`RowBatch` with one row per decoded position, in window then position order.

    Raises:
        UnsupportedArchitectureError: Masked positions were asked for and the tokenizer has
            no mask token.
    """
    sp: Specials = model._extra["specials"]
    if inputs.mlm_positions == "masked" and sp.mask_id is None:
        raise UnsupportedArchitectureError(
            f"{model.info.spec}: the tokenizer has no mask token; use mlm_positions='all'")
    ids, attn = _framed(windows, sp, _device(model))
    offset = len(sp.prefix)
    chosen = [masked_positions(w, inputs, seed) for w in windows]
    if inputs.mlm_positions == "masked":
        for row, positions in enumerate(chosen):
            ids[row, [offset + p for p in positions]] = int(sp.mask_id)  # type: ignore[arg-type]
    logits, resid = hooked_forward(model.bridge, "blocks", model.info.n_layers, ids,
                                   attention_mask=attn)
    rows, index = [], []
    for row, (window, positions) in enumerate(zip(windows, chosen)):
        for p in positions:
            rows.append((window.window_id, p, int(ids[row, offset + p]), window.token_ids[p]))
            index.append((row, offset + p))
    r, c = torch.tensor(index).t()
    return RowBatch(resid[:, r, c], logits[r, c], _frame(rows))


def seq2seq_batch(model: LoadedModel, windows: Sequence[Window]) -> RowBatch:
    """Encoder on the window, teacher-forced decoder on the same text; keep decoder rows.

    Args:
        model: A loaded encoder-decoder.
        windows: The windows of the batch.

    Returns:
        A :class:`RowBatch` with one row per decoder position (``resid`` of the decoder
        blocks).

    Raises:
        UnsupportedArchitectureError: The model has no decoder start token.
    """
    sp: Specials = model._extra["specials"]
    if sp.decoder_start_id is None:
        raise UnsupportedArchitectureError(f"{model.info.spec}: no decoder start token")
    device = _device(model)
    enc, attn = _framed(windows, sp, device)
    width = max(len(w) for w in windows)
    dec = torch.full((len(windows), width), sp.pad_id, dtype=torch.long)
    rows, index = [], []
    for row, window in enumerate(windows):
        # Decoder input: the start token, then the text shifted right (teacher forcing).
        inp = [sp.decoder_start_id, *window.token_ids[:-1]]
        dec[row, : len(inp)] = torch.tensor(inp)
        for j, gold in enumerate(window.token_ids):
            rows.append((window.window_id, j, inp[j], gold))
            index.append((row, j))
    # Right padding of the decoder is harmless: its self-attention is causal.
    logits, resid = hooked_forward(model.bridge, "decoder_blocks", model.info.n_layers, enc,
                                   attention_mask=attn, decoder_input_ids=dec.to(device))
    r, c = torch.tensor(index).t()
    return RowBatch(resid[:, r, c], logits[r, c], _frame(rows))


def vision_batch(model: LoadedModel, images: Sequence[Image], first_id: int) -> RowBatch:
    """Run a ViT on images and keep the CLS token (position 0) of each.

    Args:
        model: A loaded ViT image classifier.
        images: The images of the batch.
        first_id: Unit id (``window`` column) of the first image.

    Returns:
        A :class:`RowBatch` with one row per image: ``resid`` ``[layer, n_images, d_model]``
        at the CLS token and the class logits ``[n_images, n_classes]``.
    """
    config = model._extra["hf_model"].config
    processor = model._extra.get("image_processor", {})
    pixels = to_pixel_values(images, int(config.image_size),
                             processor.get("image_mean", (0.5, 0.5, 0.5)),
                             processor.get("image_std", (0.5, 0.5, 0.5)))
    pixels = pixels.to(device=model._extra["hf_model"].device,
                       dtype=model._extra["hf_model"].dtype)
    logits, resid = hooked_forward(model.bridge, "blocks", model.info.n_layers, None,
                                   pixel_values=pixels)
    meta = _frame([(first_id + i, 0, -1, -1) for i in range(len(images))])
    meta["token"] = [im.name for im in images]
    return RowBatch(resid[:, :, 0], logits, meta)


# ----------------------------------------------------------------------------- units


def _text_windows(model: LoadedModel, opts: Any, literal_docs: list[str] | None) -> list[Window]:
    sp: Specials = model._extra["specials"]
    framing = len(sp.prefix) + len(sp.suffix)
    if opts.window - framing < 1:
        raise InvalidOptionError(
            f"--window {opts.window} leaves no room for text next to {framing} special tokens")
    docs = iter_text(literal_docs if literal_docs is not None else opts.text)
    # The window option counts the special tokens too, as the BOS token of causal models.
    return make_windows(docs, model.tokenize, window=opts.window - framing,
                        max_tokens=opts.max_tokens, bos_token_id=None)


def _groups(sizes: Sequence[int], budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``[start, stop)`` groups with ``count * longest <= budget`` (>= 1 each)."""
    start, longest = 0, 0
    for i, size in enumerate(sizes):
        wider = max(longest, size)
        if i > start and wider * (i - start + 1) > budget:
            yield start, i
            start, wider = i, size
        longest = wider
    if start < len(sizes):
        yield start, len(sizes)


def iter_row_batches(
    model: LoadedModel, opts: Any, inputs: InputOptions, literal_docs: list[str] | None = None,
) -> tuple[list[Window], list[str], Iterator[RowBatch]]:
    """The units (windows or images), their names, and the row batches of a model.

    Args:
        model: A loaded model of kind ``masked``, ``vision`` or ``seq2seq``.
        opts: The analysis options (``text``, ``window``, ``max_tokens``, ``batch_tokens``,
            ``seed``).
        inputs: The input options (images, masking).
        literal_docs: Literal documents to use instead of ``opts.text``.

    Returns:
        ``(units, names, batches)``: ``units`` are :class:`~probes.corpus.Window` s (an image
        is a unit with no tokens, its name as document), ``batches`` a lazy iterator.
    """
    kind = model_kind(model)
    if kind == "vision":
        images = load_images(inputs.images, inputs.max_images)
        units = [Window(i, im.name, i, (), -1) for i, im in enumerate(images)]
        per = int(model.info.n_ctx)

        def vision_iter() -> Iterator[RowBatch]:
            for a, b in _groups([per] * len(images), opts.batch_tokens):
                yield vision_batch(model, images[a:b], a)

        return units, [im.name for im in images], vision_iter()
    windows = _text_windows(model, opts, literal_docs)
    sp: Specials = model._extra["specials"]
    sizes = [len(w) + len(sp.prefix) + len(sp.suffix) for w in windows]
    if kind == "seq2seq":
        sizes = [2 * s for s in sizes]  # encoder and decoder both hold the window

    def text_iter() -> Iterator[RowBatch]:
        for a, b in _groups(sizes, opts.batch_tokens):
            if kind == "masked":
                yield masked_batch(model, windows[a:b], inputs, opts.seed)
            else:
                yield seq2seq_batch(model, windows[a:b])

    return windows, [w.document for w in windows], text_iter()


# ----------------------------------------------------------------------------- analyze

_ROWS = {
    "masked": "one row per decoded position of a window (masked positions, or every text "
              "position with mlm_positions='all'); token_id is the model input there (the "
              "mask token where masked), next_token_id the original token",
    "seq2seq": "one row per teacher-forced decoder position; token_id is the decoder input, "
               "next_token_id the gold token it predicts (the encoder reads the same window)",
    "vision": "one row per image: its CLS token (position 0); window is the image index and "
              "token the image name; token_id and next_token_id are -1",
}
_LAYERS = {"masked": "blocks.{l}.hook_resid_post", "vision": "blocks.{l}.hook_resid_post",
           "seq2seq": "decoder_blocks.{l}.hook_resid_post (the encoder is not decoded)"}


def _lens_frame(readout: LogitLens, batch: RowBatch, targets: Tensor, window_id: int,
                n_positions: int) -> pd.DataFrame | None:
    """Ranks per layer of one window's rows, where its rows are its positions 0..n-1."""
    from probes.analysis import _lens_table

    rows = np.nonzero(batch.meta["window"].to_numpy() == window_id)[0]
    positions = batch.meta["position"].to_numpy()[rows]
    if len(rows) == 0 or not np.array_equal(positions, np.arange(len(rows))):
        return None
    idx = torch.as_tensor(rows)
    return _lens_table(readout, batch.resid[:, idx], targets[idx], window_id, n_positions)


def analyze_other(
    model: LoadedModel, opts: Any, inputs: InputOptions, literal_docs: list[str] | None,
    out: Path | None, progress: bool, t_start: float, load_s: float,
) -> Any:
    """The analysis of a masked, vision or encoder-decoder model (called by ``analyze``).

    Args:
        model: A loaded model of kind ``masked``, ``vision`` or ``seq2seq``.
        opts: Validated :class:`~probes.analysis.AnalysisOptions`.
        inputs: Validated :class:`InputOptions`.
        literal_docs: Literal documents given instead of a text source, if any.
        out: Run folder to write (already checked), or None.
        progress: Show a progress bar.
        t_start: When ``analyze`` started (for timings).
        load_s: Seconds spent loading the model.

    Returns:
        An :class:`~probes.analysis.AnalysisResult`.

    Raises:
        InvalidOptionError: ``top_k`` is larger than the output, or the window does not fit
            the model's context or its special tokens.
    """
    kind, info = model_kind(model), model.info
    if opts.top_k > info.d_vocab:
        what = "classes" if kind == "vision" else "tokens"
        raise InvalidOptionError(
            f"--top-k {opts.top_k} is larger than the output ({info.d_vocab} {what})")
    if kind != "vision":
        if opts.window is None:
            opts = replace(opts, window=min(256, info.n_ctx))
        check_window(opts.window, info.n_ctx)
    readout = make_readout(model, opts.screen)
    t_engine = time.perf_counter()
    units, _, batches = iter_row_batches(model, opts, inputs, literal_docs)
    lens_id = opts.lens_window if opts.lens_window < len(units) else 0
    frames, lens_frame, lens_check = [], None, None
    timing = {"forward_s": 0.0, "saturation_s": 0.0}
    bar = tqdm(total=len(units), unit="img" if kind == "vision" else "win", desc=kind,
               disable=not progress, leave=False)
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            targets = targets_from_logits(batch.logits, opts.top_k)
            t1 = time.perf_counter()
            s = saturation_layers(readout, batch.resid, targets)
            timing["forward_s"] += t1 - t0
            timing["saturation_s"] += time.perf_counter() - t1
            if lens_check is None:
                lens_check = lens_error_at_last_layer(readout, batch.resid[-1][:256],
                                                      batch.logits[:256])
            if lens_frame is None and kind != "vision":
                lens_frame = _lens_frame(readout, batch, targets, lens_id, opts.lens_positions)
            frame = batch.meta.copy()
            for j in range(opts.top_k):
                frame[f"target_{j + 1}"] = targets[:, j].cpu().numpy()
            for j in range(opts.top_k):
                frame[f"s_{j + 1}"] = s[:, j].cpu().numpy()
            frames.append(frame)
            bar.update(int(frame["window"].nunique()))
    finally:
        bar.close()
    engine = {"screen": readout.screen, "readout": getattr(readout, "head", "logit lens"),
              "rows_decoded": readout.stats["rows"],
              "rows_settled_by_screen": readout.stats["screened_exact"],
              "rows_recomputed_fp32": readout.stats["fallback_rows"],
              "lens_check_max_abs_diff": lens_check}
    result = _assemble(model, opts, inputs, units, frames, lens_frame, timing, engine,
                       load_s, t_start, t_engine)
    if out is not None:
        with staged_folder(out) as stage:
            result._write_into(stage)
        result.run_dir = out
    return result


def _assemble(
    model: LoadedModel, opts: Any, inputs: InputOptions, units: list[Window],
    frames: list[pd.DataFrame], lens_frame: pd.DataFrame | None, timing: dict[str, float],
    engine: dict[str, Any], load_s: float, t_start: float, t_engine: float,
) -> Any:
    from probes.analysis import AnalysisResult, _empty_group, keep_threshold, library_versions

    kind, info, k = model_kind(model), model.info, opts.top_k
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values(["window", "position"], kind="stable").reset_index(drop=True)
    if "token" not in table.columns:
        table.insert(3, "token", model.tokenizer.batch_decode(
            [[int(t)] for t in table["token_id"]]))
    else:
        table.insert(3, "token", table.pop("token"))
    threshold = keep_threshold(info.n_layers, opts.keep_fraction)
    table["kept"] = table["s_1"] <= threshold
    analysis_s = time.perf_counter() - t_engine
    t_stats = time.perf_counter()
    s_all = table[[f"s_{j}" for j in range(1, k + 1)]].to_numpy()
    kept = table["kept"].to_numpy()
    stats_all, null_all = order_statistics(s_all, info.n_layers, opts.n_permutations, opts.seed)
    stats_kept, null_kept = order_statistics(
        s_all[kept], info.n_layers, opts.n_permutations, opts.seed) if kept.any() else (
        _empty_group(k), np.zeros(0))
    options = {**asdict(opts), **{n: getattr(inputs, n) for n in _KIND_INPUTS[kind]}}
    summary: dict[str, Any] = {
        "tool": TOOL,
        "format_version": FORMAT_VERSION,
        "command": "analyze",
        "model": info.spec,
        "model_info": info.to_dict(),
        "kind": kind,
        "text": inputs.images if kind == "vision" else opts.text,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "d_vocab": info.d_vocab,
        "top_k": k,
        "n_windows": len(units),
        "n_positions": len(table),
        "n_kept": int(kept.sum()),
        "kept_share": float(kept.mean()),
        "keep_threshold": threshold,
        "keep_rule": f"s_1 <= floor({opts.keep_fraction} * L) = {threshold}",
        "bos_token_id": None,
        "bos_rule": _framing_rule(model),
        "rows": _ROWS[kind],
        "layers": f"0-based block outputs {_LAYERS[kind]}, l = 0..L-1",
        "readout": engine["readout"],
        "options": options,
        "engine": engine,
        "all": stats_all,
        "kept": stats_kept,
    }
    if kind == "seq2seq":
        summary["encoder_layers"] = int(model._extra.get("encoder_layers", 0))
    summary["timings"] = {
        "load_s": round(load_s, 3),
        "forward_s": round(timing["forward_s"], 3),
        "saturation_s": round(timing["saturation_s"], 3),
        "analysis_s": round(analysis_s, 3),
        "stats_s": round(time.perf_counter() - t_stats, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
    }
    summary["versions"] = library_versions()
    lens_window = lens_frame if lens_frame is not None else pd.DataFrame(
        columns=["window", "layer", "position", "k", "rank"])
    return AnalysisResult(table, summary, units, lens_window,
                          {"all": null_all, "kept": null_kept})


def _framing_rule(model: LoadedModel) -> str:
    sp: Specials | None = model._extra.get("specials")
    if sp is None:
        return "images: no tokens"
    return (f"special tokens {list(sp.prefix)} before and {list(sp.suffix)} after each window "
            "(counted in --window, never scored)")


def analyze_spec(spec: str, text: str | Iterable[str], **options: Any) -> Any:
    """Load ``spec`` and analyse it without a progress bar (a shortcut for examples).

    Args:
        spec: A model spec.
        text: A text source, or literal documents.
        **options: Further keyword options of :func:`probes.analysis.analyze`.

    Returns:
        The :class:`~probes.analysis.AnalysisResult`.
    """
    from probes.analysis import analyze

    return analyze(spec, text, progress=False, **options)
