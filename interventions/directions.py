"""Task directions: vectors in the residual stream that point from task k to task k+1.

Two sources, both unit-normalised:

- ``means``: the mean residual of task-(k+1) states minus the mean of task-k states, at one
  layer or pooled over layers;
- ``probe``: the difference of a trained task probe's class weight vectors, ``w_{k+1} - w_k``,
  mapped back through its scaler into residual space (``w / scale``), so that moving along
  it raises the probe's task-(k+1) logit against task k fastest per unit of residual norm.

The scale is stated separately: a :class:`TaskDirection` carries the *typical residual norm*
at its layer (the median L2 norm of the residual states there), and a steering strength
``alpha`` adds ``alpha * typical_norm * v``, so alpha means the same across layers and models.

Example:
    >>> import torch
    >>> states = torch.tensor([[0.0, 0.0], [0.0, 1.0], [4.0, 0.0], [4.0, 1.0]])
    >>> tasks = torch.tensor([1, 1, 2, 2])
    >>> d = class_mean_direction(states, tasks, k=1, layer=3)
    >>> d.vector.tolist(), d.layer, round(d.scale, 3)
    ([1.0, 0.0], 3, 2.5)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from probes.errors import InvalidOptionError, ProbeError
from probes.runfolder import FILE_MODE


@dataclass
class TaskDirection:
    """A unit direction from task k to task k+1.

    Attributes:
        vector: Unit vector ``[d_model]``.
        k: The task it starts from (1-based); it points to task k+1.
        layer: The layer it was estimated at (None: pooled over layers).
        source: ``"means"``, ``"probe"`` or ``"random"``.
        scale: Typical residual norm at the layer (median L2 norm of the states used).
        n_from: States of task k it was estimated from.
        n_to: States of task k+1.
    """

    vector: Float[Tensor, " d_model"]
    k: int
    layer: int | None
    source: str
    scale: float
    n_from: int = 0
    n_to: int = 0

    def delta(self, alpha: float) -> Float[Tensor, " d_model"]:
        """The vector added at strength ``alpha``: ``alpha * scale * vector``.

        Args:
            alpha: Steering strength, in multiples of :attr:`scale`.

        Returns:
            A ``[d_model]`` tensor of L2 norm ``|alpha| * scale``.
        """
        return alpha * self.scale * self.vector

    def reversed(self) -> TaskDirection:
        """The same direction pointing back (a control).

        Returns:
            A :class:`TaskDirection` with ``-vector`` and source ``"<source>-reversed"``.
        """
        return TaskDirection(-self.vector, self.k, self.layer, f"{self.source}-reversed",
                             self.scale, self.n_from, self.n_to)

    def save(self, path: str | Path) -> None:
        """Write ``<path>.safetensors`` and ``<path>.json`` (no pickle).

        Args:
            path: The path without suffix (any suffix is replaced); its folder must exist.
        """
        path = Path(path)
        tensors = path.with_suffix(".safetensors")
        save_file({"vector": self.vector.detach().cpu().float().contiguous()}, str(tensors))
        os.chmod(tensors, FILE_MODE)  # safetensors creates files readable by their owner only
        meta = {k: v for k, v in asdict(self).items() if k != "vector"}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def load(path: str | Path) -> TaskDirection:
        """Inverse of :meth:`save`.

        Args:
            path: The path given to :meth:`save` (any suffix is replaced).

        Returns:
            The :class:`TaskDirection`.
        """
        path = Path(path)
        meta: dict[str, Any] = json.loads(path.with_suffix(".json").read_text())
        vector = load_file(str(path.with_suffix(".safetensors")))["vector"]
        return TaskDirection(vector=vector, **meta)


def unit(vector: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """``vector / ||vector||`` (refuses a zero vector).

    Args:
        vector: A ``[d_model]`` vector.

    Returns:
        The vector scaled to L2 norm 1.

    Raises:
        ProbeError: The vector is zero or has non-finite entries.
    """
    norm = float(vector.norm())
    if norm == 0 or not torch.isfinite(vector).all():
        raise ProbeError("cannot normalise a zero or non-finite direction")
    return vector / norm


def typical_norm(states: Float[Tensor, "n d_model"]) -> float:
    """The median L2 norm of residual states: the unit of steering strength.

    Args:
        states: Residual states ``[n, d_model]``.

    Returns:
        The median of the ``n`` L2 norms.

    Raises:
        InvalidOptionError: ``n`` is 0.
    """
    if states.shape[0] == 0:
        raise InvalidOptionError("no states to measure the typical residual norm on")
    return float(states.float().norm(dim=-1).quantile(0.5))


def class_mean_direction(
    states: Float[Tensor, "n d_model"], tasks: Int[Tensor, " n"], k: int,
    layer: int | None = None,
) -> TaskDirection:
    """Mean of task-(k+1) states minus mean of task-k states, unit-normalised.

    Args:
        states: Residual states ``[n, d_model]``.
        tasks: Task of each state ``[n]`` (other tasks than k and k+1 are ignored).
        k: The start task (1-based).
        layer: The layer the states are from, recorded in the result (None: pooled).

    Returns:
        A :class:`TaskDirection` with source ``"means"``, whose scale is the typical norm of
        the task-k and task-(k+1) states.

    Raises:
        ProbeError: One of the two tasks has no states (the counts are in the message).
    """
    tasks = torch.as_tensor(tasks)
    src, dst = tasks == k, tasks == k + 1
    n_src, n_dst = int(src.sum()), int(dst.sum())
    if n_src == 0 or n_dst == 0:
        raise ProbeError(
            f"a task {k} -> {k + 1} direction needs states of both tasks; there are {n_src} "
            f"of task {k} and {n_dst} of task {k + 1}"
            + (f" at layer {layer}" if layer is not None else "")
        )
    states = states.float()
    vector = unit(states[dst].mean(0) - states[src].mean(0))
    return TaskDirection(vector, k, layer, "means", typical_norm(states[src | dst]),
                         n_src, n_dst)


def probe_direction(
    weights: Float[Tensor, "classes d_model"], classes: list[int], k: int, scale: float,
    layer: int | None = None,
) -> TaskDirection:
    """``w_{k+1} - w_k`` of a probe whose weights are already in residual space.

    Args:
        weights: Class weight vectors in residual units (the probe's ``coef / scale``).
        classes: The task of each weight row.
        k: Start task.
        scale: Typical residual norm at the layer.
        layer: The layer (None: a probe pooled over layers).

    Returns:
        A :class:`TaskDirection` with source ``"probe"``.

    Raises:
        ProbeError: The probe lacks class k or k+1, or their weights are equal.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
        >>> d = probe_direction(w, [1, 2, 3], k=1, scale=4.0, layer=6)
        >>> d.vector.tolist(), d.source, d.delta(0.5).tolist()
        ([0.0, 1.0, 0.0], 'probe', [0.0, 2.0, 0.0])
    """
    if k not in classes or k + 1 not in classes:
        raise ProbeError(
            f"the probe has no classes {k} and {k + 1} (its classes: {sorted(classes)})")
    w = torch.as_tensor(weights).float()
    vector = unit(w[classes.index(k + 1)] - w[classes.index(k)])
    return TaskDirection(vector, k, layer, "probe", scale)


def random_directions(d_model: int, n: int, seed: int = 0) -> Float[Tensor, "n d_model"]:
    """``n`` seeded random unit directions (the control of a task direction).

    Args:
        d_model: Width of the residual stream.
        n: Number of directions.
        seed: Seed of the generator (a private ``torch.Generator``; the global state is
            untouched).

    Returns:
        ``[n, d_model]`` rows of unit L2 norm, Gaussian before normalising.
    """
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, d_model, generator=generator)
    return raw / raw.norm(dim=-1, keepdim=True)
