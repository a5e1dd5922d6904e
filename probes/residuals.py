"""Capturing the residual stream at block outputs, batch by batch.

Only the hook points that are asked for are cached (a names_filter of
``blocks.{l}.hook_resid_post``), never the model's full activation cache. Windows are
grouped into batches of bounded size and right-padded: the models here are causal, so pad
tokens after a window's end cannot change what its real positions compute.

Example:
    >>> from probes.models import load_model
    >>> from probes.corpus import Window
    >>> m = load_model("random:gpt2?n_layers=2&d_model=32&n_heads=2")
    >>> batch = next(iter_batches([Window(0, "d", 0, (10, 11, 12), -1)], m.info.bos_token_id))
    >>> logits, resid = run_residuals(m.bridge, batch.tokens)
    >>> tuple(resid.shape)  # layer batch pos d_model
    (2, 1, 4, 32)
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from probes.corpus import Window
from probes.runfolder import FILE_MODE


def resid_hook_name(layer: int) -> str:
    """The hook point of the residual stream after block ``layer`` (0-based).

    Args:
        layer: 0-based block index.

    Returns:
        ``"blocks.{layer}.hook_resid_post"``.
    """
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class Batch:
    """A padded batch of windows.

    Attributes:
        windows: The windows, in batch order.
        tokens: Model input ``[batch, seq]``: BOS (if any), the window's tokens, padding.
        offset: Sequence index of a window's first text token (1 with BOS, else 0).
        lengths: Number of text tokens of each window.
    """

    windows: list[Window]
    tokens: Int[Tensor, "batch seq"]
    offset: int
    lengths: list[int]

    def valid_mask(self) -> torch.Tensor:
        """``[batch, seq]`` True at text-token positions (not BOS, not padding).

        Returns:
            A boolean tensor shaped like :attr:`tokens`.
        """
        seq = self.tokens.shape[1]
        idx = torch.arange(seq).unsqueeze(0)
        lengths = torch.tensor(self.lengths).unsqueeze(1)
        return (idx >= self.offset) & (idx < self.offset + lengths)

    @property
    def n_positions(self) -> int:
        """Number of text-token positions in the batch."""
        return sum(self.lengths)


def iter_batches(
    windows: Sequence[Window], bos_token_id: int | None, batch_tokens: int = 2048,
    pad_token_id: int = 0,
) -> Iterator[Batch]:
    """Group consecutive windows into batches of at most ``batch_tokens`` input tokens.

    Args:
        windows: Windows in order.
        bos_token_id: Prepended to each window when not None.
        batch_tokens: Bound on batch size x padded length (a memory bound); a window longer
            than this still forms a batch of one.
        pad_token_id: Filler after short windows (never read back).

    Yields:
        :class:`Batch` objects, windows in their given order.
    """
    offset = 0 if bos_token_id is None else 1
    group: list[Window] = []
    longest = 0
    for window in windows:
        longest_if_added = max(longest, len(window) + offset)
        if group and longest_if_added * (len(group) + 1) > batch_tokens:
            yield _make_batch(group, bos_token_id, offset, pad_token_id)
            group, longest_if_added = [], len(window) + offset
        group.append(window)
        longest = longest_if_added
    if group:
        yield _make_batch(group, bos_token_id, offset, pad_token_id)


def _make_batch(group: list[Window], bos: int | None, offset: int, pad: int) -> Batch:
    seq = max(len(w) for w in group) + offset
    tokens = torch.full((len(group), seq), pad, dtype=torch.long)
    for row, window in enumerate(group):
        if bos is not None:
            tokens[row, 0] = bos
        tokens[row, offset: offset + len(window)] = torch.tensor(window.token_ids)
    return Batch(group, tokens, offset, [len(w) for w in group])


def run_residuals(
    bridge: torch.nn.Module, tokens: Int[Tensor, "batch seq"], layers: Sequence[int] | None = None,
    last_logits_only: bool = False,
) -> tuple[Float[Tensor, "batch seq d_vocab"], Float[Tensor, "layer batch seq d_model"]]:
    """One forward pass returning the logits and the residual stream after chosen blocks.

    Args:
        bridge: A TransformerBridge.
        tokens: Input ids ``[batch, seq]``.
        layers: Block indices to capture (default: all 0..L-1), in the order given.
        last_logits_only: Ask the model for the logits of the last sequence position only
            (``[batch, 1, d_vocab]``): the full ``[batch, seq, d_vocab]`` head output is the
            largest tensor of a forward pass, and the saturation engine reads the last
            block's residual stream through the lens instead. Models whose forward does not
            take ``logits_to_keep`` return every position.

    Returns:
        ``(logits, resid)`` with ``resid[i]`` the output of block ``layers[i]``.

    Raises:
        RuntimeError: A requested hook point did not fire during the forward pass.
    """
    n_layers = int(bridge.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else list(layers)
    names = [resid_hook_name(layer) for layer in layers]
    store: list[Tensor | None] = [None] * len(names)

    def keeper(slot: int) -> Callable[[Tensor, object], None]:
        def keep(activation: Tensor, hook: object) -> None:
            # The bridge may name the point by an alias (blocks.l.hook_out), so the slot is
            # bound here rather than looked up by hook.name.
            store[slot] = activation.detach()

        return keep

    tokens = tokens.to(bridge.W_U.device)
    hooks = [(name, keeper(i)) for i, name in enumerate(names)]
    with torch.no_grad():
        if last_logits_only:
            try:
                logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks, logits_to_keep=1)
            except TypeError:  # a forward without logits_to_keep: keep every position
                logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        else:
            logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    missing = [names[i] for i, t in enumerate(store) if t is None]
    if missing:
        raise RuntimeError(f"hook points did not fire: {missing}")
    resid = torch.stack(store)  # type: ignore[arg-type]
    return logits, resid


RESIDUAL_DIR = "residuals"


@lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give memory freed by the last batch back to the operating system (glibc only).

    Batches allocate and free many tensors of varying sizes; glibc keeps freed blocks in its
    heap, so without this the resident memory of a long run creeps up with the number of
    batches instead of staying at one batch's working set.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def save_residual_shard(
    path: str | os.PathLike[str],
    resid: Float[Tensor, "layer n d_model"],
    window_ids: Sequence[int],
    positions: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write one batch's residual streams (all layers, text positions only) to safetensors.

    The file holds ``resid`` ``[layer, n, d_model]`` and the ``window`` / ``position`` of each
    row, so that shards can be read back in any order.

    Args:
        path: The ``.safetensors`` file to write (written under ``<path>.tmp``, then renamed).
        resid: Residual streams ``[layer, n, d_model]`` of the batch's text positions.
        window_ids: Window id of each of the ``n`` rows.
        positions: Position of each row within its window (0-based).
        dtype: Storage dtype of ``resid`` (float32 by default; bfloat16 halves the file).
    """
    tensors = {
        "resid": resid.detach().to("cpu", dtype).contiguous(),
        "window": torch.tensor(list(window_ids), dtype=torch.long),
        "position": torch.tensor(list(positions), dtype=torch.long),
    }
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp)
    os.chmod(tmp, FILE_MODE)  # safetensors creates files readable by their owner only
    os.replace(tmp, path)


def load_residuals(
    run_dir: str | os.PathLike[str], layers: Sequence[int] | None = None,
) -> tuple[Float[Tensor, "layer n d_model"], Int[Tensor, "n 2"]]:
    """Read saved residual streams of a run (``analyze --save-residuals``).

    Args:
        run_dir: The run folder.
        layers: Layers to read (default all); only those are read from disk.

    Returns:
        ``(resid, index)``: residuals ``[len(layers), n, d_model]`` as float32 and the
        ``(window, position)`` of each row, sorted by window then position.

    Raises:
        FileNotFoundError: The run folder has no ``residuals/shard_*.safetensors``.
    """
    folder = Path(run_dir) / RESIDUAL_DIR
    shards = sorted(folder.glob("shard_*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no residual shards")
    parts, index = [], []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            sliced = handle.get_slice("resid")
            if layers is None:
                block = sliced[:]
            else:
                block = torch.stack([sliced[int(layer)] for layer in layers])
            parts.append(block.float())
            index.append(torch.stack([handle.get_tensor("window"),
                                      handle.get_tensor("position")], dim=1))
    resid = torch.cat(parts, dim=1)
    idx = torch.cat(index)
    order = torch.argsort(idx[:, 0] * (int(idx[:, 1].max()) + 1) + idx[:, 1])
    return resid[:, order], idx[order]
