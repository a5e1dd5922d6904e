"""Re-running single positions against a clean KV cache: exact, isolated, cheap interventions.

To ask "what does position p predict if its residual stream at layer l is changed?", only
position p needs recomputing: the model is causal, so the positions before p are unaffected
by the change, and the positions after p do not influence p. This module runs the clean
window once (keeping its key/value cache), then recomputes many *rows* at once, each row one
position with its own edit, attending to the clean keys and values of the positions before
it (an attention mask hides the rest of the window). Every row costs one token's forward
pass, whatever the window length.

Edits are TransformerLens hooks on ``blocks.{l}.hook_resid_post``: either an added vector
(steering) or a replacement (activation patching). With no edit a row reproduces the clean
run's logits to float precision (tested).

Example:
    >>> import torch
    >>> from probes.models import load_model
    >>> from probes.corpus import Window
    >>> m = load_model("random:gpt2?n_layers=2&d_model=32&n_heads=2")
    >>> clean = clean_window(m.bridge, Window(0, "d", 0, (10, 11, 12, 13), -1), m.info.bos_token_id)
    >>> out = rerun(m.bridge, clean, positions=[1, 3])
    >>> bool(torch.allclose(out.logits, clean.logits[[1, 3]], atol=1e-4))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.corpus import Window
from probes.residuals import resid_hook_name


@dataclass
class CleanWindow:
    """One window's clean forward pass.

    Attributes:
        window: The window.
        tokens: Model input ``[1, seq]`` (BOS first when the model has one).
        offset: Sequence index of text position 0 (1 with BOS, else 0).
        cache: The key/value cache of the whole input.
        logits: Final logits at the text positions ``[n, d_vocab]``.
        resid: Residual stream after every block at the text positions ``[layer, n, d_model]``.
    """

    window: Window
    tokens: Int[Tensor, "1 seq"]
    offset: int
    cache: Any
    logits: Float[Tensor, "n d_vocab"]
    resid: Float[Tensor, "layer n d_model"]


@dataclass
class RerunOutput:
    """What the re-run rows give.

    Attributes:
        logits: Final logits per row ``[rows, d_vocab]``.
        resid: Residual stream after every block per row ``[layer, rows, d_model]``.
    """

    logits: Float[Tensor, "rows d_vocab"]
    resid: Float[Tensor, "layer rows d_model"]


def clean_window(bridge: torch.nn.Module, window: Window, bos_token_id: int | None
                 ) -> CleanWindow:
    """Run one window and keep its cache, logits and residual stream.

    Args:
        bridge: The model's TransformerBridge.
        window: The window to run.
        bos_token_id: Prepended when not None.

    Returns:
        A :class:`CleanWindow` (logits and residuals at the text positions only).
    """
    offset = 0 if bos_token_id is None else 1
    ids = ([bos_token_id] if bos_token_id is not None else []) + list(window.token_ids)
    tokens = torch.tensor([ids], device=bridge.W_U.device)
    n_layers = int(bridge.cfg.n_layers)
    store: list[Tensor | None] = [None] * n_layers

    def keeper(slot: int) -> Callable[[Tensor, object], None]:
        def keep(activation: Tensor, hook: object) -> None:
            store[slot] = activation.detach()[0, offset:]

        return keep

    hooks = [(resid_hook_name(layer), keeper(layer)) for layer in range(n_layers)]
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        logits, cache = bridge(tokens, return_type="logits_and_cache")
    return CleanWindow(window, tokens, offset, cache, logits[0, offset:].detach(),
                       torch.stack(store))  # type: ignore[arg-type]


def rerun(
    bridge: torch.nn.Module,
    clean: CleanWindow,
    positions: Sequence[int] | Tensor,
    add: dict[int, Float[Tensor, "rows d_model"]] | None = None,
    replace: dict[int, Float[Tensor, "rows d_model"]] | None = None,
    patch_layers: Sequence[int] | Tensor | None = None,
    patch_values: Float[Tensor, "rows d_model"] | None = None,
    chunk: int = 32,
) -> RerunOutput:
    """Recompute rows, each a text position of ``clean``, with optional edits.

    Args:
        bridge: The model's TransformerBridge.
        clean: The window's clean run.
        positions: Text position of each row (0-based; repeats allowed, e.g. one per alpha).
        add: ``{layer: vectors}``: add ``vectors[row]`` to that row's residual stream after
            block ``layer``.
        replace: ``{layer: vectors}``: overwrite the row's residual stream after block
            ``layer`` with ``vectors[row]`` (an exact activation patch).
        patch_layers: A per-row layer for ``patch_values`` (rows patched at different layers
            in one call); -1 leaves a row unpatched.
        patch_values: The per-row replacement states.
        chunk: Rows per forward pass (memory: each row holds a copy of the cache).

    Returns:
        A :class:`RerunOutput` with one row per entry of ``positions``.

    Raises:
        ValueError: A layer is in ``replace`` and also in ``patch_layers``.
    """
    positions = torch.as_tensor(positions, dtype=torch.long).cpu()
    n_layers = int(bridge.cfg.n_layers)
    out_logits, out_resid = [], []
    for start in range(0, len(positions), chunk):
        stop = min(start + chunk, len(positions))
        rows = slice(start, stop)
        part_add = {k: v[rows] for k, v in (add or {}).items()}
        part_replace = {k: (None, v[rows]) for k, v in (replace or {}).items()}
        if patch_layers is not None and patch_values is not None:
            layers_here = torch.as_tensor(patch_layers, dtype=torch.long)[rows]
            for layer in layers_here.unique().tolist():
                if layer < 0:
                    continue
                which = layers_here == layer
                if layer in part_replace:
                    raise ValueError(f"layer {layer} is both replaced and patched")
                part_replace[layer] = (which, patch_values[rows])
        logits, resid = _rerun_chunk(bridge, clean, positions[rows], part_add, part_replace,
                                     n_layers)
        out_logits.append(logits)
        out_resid.append(resid)
    if not out_logits:
        d_vocab, d_model = int(bridge.W_U.shape[1]), int(bridge.cfg.d_model)
        return RerunOutput(torch.empty(0, d_vocab), torch.empty(n_layers, 0, d_model))
    return RerunOutput(torch.cat(out_logits), torch.cat(out_resid, dim=1))


def _repeated_cache(cache: Any, n_rows: int) -> Any:
    """The clean cache for ``n_rows`` rows.

    Plain dynamic caches get broadcast views (no copy: the model's own update concatenates
    the new token and materialises each layer once); other cache kinds (sliding windows)
    are deep-copied and repeated.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if isinstance(cache, DynamicCache) and layers and all(
            type(layer) is DynamicLayer for layer in layers):
        return DynamicCache(ddp_cache_data=[
            (layer.keys.expand(n_rows, -1, -1, -1), layer.values.expand(n_rows, -1, -1, -1))
            for layer in layers
        ])
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(n_rows)
    return copied


def _rerun_chunk(
    bridge: torch.nn.Module, clean: CleanWindow, positions: Tensor,
    add: dict[int, Tensor], replace: dict[int, tuple[Tensor | None, Tensor]], n_layers: int,
) -> tuple[Tensor, Tensor]:
    n_rows = len(positions)
    seq = clean.tokens.shape[1]
    device = clean.tokens.device
    seq_index = positions + clean.offset
    # Row r sees the clean keys/values of positions before its own, then itself.
    mask = torch.ones(n_rows, seq + 1, dtype=torch.long)
    mask[:, :seq] = (torch.arange(seq)[None, :] < seq_index[:, None]).long()
    cache = _repeated_cache(clean.cache, n_rows)
    store: list[Tensor | None] = [None] * n_layers

    def hook_for(layer: int) -> Callable[[Tensor, object], Tensor]:
        def edit(activation: Tensor, hook: object) -> Tensor:
            if layer in replace:
                which, values = replace[layer]
                values = values.to(activation).reshape(activation.shape)
                if which is None:
                    activation = values.clone()
                else:
                    activation = torch.where(which.to(activation.device).reshape(-1, 1, 1),
                                             values, activation)
            if layer in add:
                activation = activation + add[layer].to(activation).reshape(activation.shape)
            store[layer] = activation.detach()[:, -1]
            return activation

        return edit

    hooks = [(resid_hook_name(layer), hook_for(layer)) for layer in range(n_layers)]
    inputs = clean.tokens[0, seq_index.to(device)].unsqueeze(1)
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        logits = bridge(inputs, past_key_values=cache, attention_mask=mask.to(device),
                        position_ids=seq_index.unsqueeze(1).to(device))
    return logits[:, -1].detach(), torch.stack(store)  # type: ignore[arg-type]
