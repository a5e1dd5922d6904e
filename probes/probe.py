"""Task probes: a scikit-learn classifier that reads the current task from a residual stream.

:class:`TaskProbe` is StandardScaler + multinomial logistic regression (L2 penalty, ``C``,
``max_iter``, an L-BFGS solver), with class balancing by class weights (default) or by
truncating every class to the smallest one (the paper's). It is a plain scikit-learn
estimator: ``fit / predict / predict_proba / decision_function / score / get_params``,
``classes_``, usable in pipelines and ``cross_val_score``.

Solver. On real residual streams scikit-learn's own ``LogisticRegression(solver="lbfgs")``
needs more than 1000 iterations (over two minutes for 50k states x 576 dims on two cores,
still unconverged): the standardized features are strongly correlated, which L-BFGS
handles badly. The default ``solver="whitened-lbfgs"`` minimises **the same objective**
(``C * sum_i w_i * cross-entropy_i + ||W||^2 / 2`` over the coefficients ``W`` on the
standardized features; intercepts unpenalized) in rotated and rescaled coordinates
``W = U diag(p) V`` where ``U, lambda`` are the eigenvectors and eigenvalues of the
(weighted) feature covariance and ``p = (lambda + 1/(C S))^-1/2``. That reparametrisation
changes the optimisation path, not the minimiser, and makes the problem well conditioned,
so L-BFGS converges in about a hundred iterations. ``solver="sklearn-lbfgs"`` runs
scikit-learn's ``LogisticRegression`` itself instead (a check, and for small problems).
``coef_`` has one row per class also for two classes (the multinomial parametrisation).

This module also holds what the experiments around a probe share: cross-validation splits
(grouped by window, and the paper's leaky plain KFold), the controls (layer index only,
shuffled labels, Gaussian random embeddings), the metrics, and persistence without pickle
(safetensors + JSON).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(1, 4, size=300)
    >>> X = rng.normal(size=(300, 8)) + 2.0 * np.eye(8)[y]  # class c shifts feature c
    >>> probe = TaskProbe().fit(X, y)
    >>> probe.classes_.tolist(), round(probe.score(X, y), 2) > 0.9
    ([1, 2, 3], True)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import torch
from jaxtyping import Bool, Float, Int
from safetensors.numpy import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from sklearn.model_selection import GroupKFold, KFold
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from probes.errors import ProbeError
from probes.runfolder import FILE_MODE

BALANCE_MODES = ("weights", "truncate", "none")
SOLVERS = ("whitened-lbfgs", "sklearn-lbfgs")
PROBE_FORMAT = "topk-saturation-probe"
PROBE_FORMAT_VERSION = 1

Split = tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]


# ---------------------------------------------------------------------------- estimator


class TaskProbe(ClassifierMixin, BaseEstimator):
    """StandardScaler + multinomial L2 logistic regression, with class balancing.

    Args:
        C: Inverse strength of the L2 penalty on the coefficients (scikit-learn's ``C``).
        max_iter: Most L-BFGS iterations.
        tol: Stopping tolerance on the largest gradient entry (in the solver's coordinates).
        balance: ``"weights"`` (class weights ``n / (n_classes * n_c)``, scikit-learn's
            ``class_weight="balanced"``), ``"truncate"`` (keep a seeded random subset of
            every class as large as the smallest class: the paper's), or ``"none"``.
        solver: ``"whitened-lbfgs"`` (default, see the module docstring) or
            ``"sklearn-lbfgs"`` (scikit-learn's ``LogisticRegression`` on the same data).
        random_state: Seed of the truncation subset (the only randomness of a fit).

    Attributes:
        classes_: The classes seen in ``fit``, sorted.
        n_features_in_: Input width (``d_model`` for residual streams).
        mean_: Per-feature mean of the scaler.
        scale_: Per-feature scale of the scaler (1 where a feature is constant).
        coef_: ``[n_classes, n_features]`` coefficients on the standardized features.
        intercept_: ``[n_classes]`` intercepts (centred: they sum to zero).
        n_iter_: Iterations the solver took.
        converged_: Whether it met ``tol`` before ``max_iter``.
        meta_: Where a loaded probe came from (model, layers, features...); ``{}`` after fit.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                 balance: str = "weights", solver: str = "whitened-lbfgs",
                 random_state: int | None = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.balance = balance
        self.solver = solver
        self.random_state = random_state

    def _check_params(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ValueError(f"C must be positive, got {self.C!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")

    def fit(self, X: Float[np.ndarray, "n d"], y: Int[np.ndarray, " n"],
            sample_weight: Float[np.ndarray, " n"] | None = None) -> TaskProbe:
        """Fit the scaler and the classifier.

        Args:
            X: Features, e.g. residual-stream rows ``[n, d_model]`` (numpy or torch).
            y: Labels (tasks 1..K, or any classes).
            sample_weight: Optional per-row weights, multiplied with the class weights.

        Returns:
            ``self``.

        Raises:
            ValueError: A bad parameter (``balance``, ``solver``, ``C``, ``max_iter``, ``tol``),
                fewer than 2 rows or 2 classes, or bad sample weights (scikit-learn's
                convention).
        """
        self._check_params()
        X, y = validate_data(self, _as_numpy(X), y, dtype=[np.float64, np.float32],
                             ensure_min_samples=2)
        check_classification_targets(y)
        classes, y_index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("TaskProbe needs samples of at least 2 classes in the data, "
                             f"but the data contains only one class: {classes[0]!r}")
        given = _check_sample_weight(sample_weight, len(y))
        rows, weights = self._balance(y_index, given, len(classes))
        X, y_index = X[rows], y_index[rows]
        # The scaler sees the caller's weights, not the class weights: a weight of 2 must act
        # like a repeated row here too.
        scaler = StandardScaler().fit(X, sample_weight=None if sample_weight is None
                                      else given[rows])
        # Work in the input's precision: float32 residual rows take the fast float32 path.
        work = X.dtype
        standardized = (X - scaler.mean_.astype(work)) / scaler.scale_.astype(work)
        solve = _fit_whitened if self.solver == "whitened-lbfgs" else _fit_sklearn
        coef, intercept, n_iter, converged = solve(
            standardized, y_index, weights, len(classes), float(self.C), int(self.max_iter),
            float(self.tol))
        if not converged:
            warnings.warn(f"TaskProbe: L-BFGS did not converge in {self.max_iter} iterations; "
                          "raise max_iter or lower C", ConvergenceWarning, stacklevel=2)
        self.classes_ = classes
        self.mean_ = scaler.mean_.astype(np.float64)
        self.scale_ = scaler.scale_.astype(np.float64)
        self.coef_ = coef
        self.intercept_ = intercept - intercept.mean()  # softmax ignores a common shift
        self.n_iter_ = int(n_iter)
        self.converged_ = bool(converged)
        self.meta_: dict[str, Any] = {}
        return self

    def _balance(self, y_index: Int[np.ndarray, " n"], weights: Float[np.ndarray, " n"],
                 n_classes: int) -> tuple[Int[np.ndarray, " m"], Float[np.ndarray, " m"]]:
        """Rows to train on and their weights, after class balancing."""
        rows = np.arange(len(y_index))
        if self.balance == "truncate":
            rows = truncation_rows(y_index, check_random_state(self.random_state))
        elif self.balance == "weights":
            # Weighted class totals, so that a weight of 2 acts like a repeated row.
            totals = np.bincount(y_index, weights=weights, minlength=n_classes)
            if np.any(totals <= 0):
                raise ValueError("every class needs a positive total sample weight")
            weights = weights * (weights.sum() / (n_classes * totals))[y_index]
        return rows, weights[rows]

    def class_logits(self, X: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n c"]:
        """One logit per class ``[n, n_classes]`` of raw (unscaled) rows, also for two.

        Args:
            X: Raw rows ``[n, n_features]`` (numpy or torch), as given to :meth:`fit`.

        Returns:
            ``[n, n_classes]`` logits, columns in ``classes_`` order.
        """
        check_is_fitted(self, "coef_")
        X = validate_data(self, _as_numpy(X), reset=False, dtype=[np.float64, np.float32])
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def decision_function(self, X: Float[np.ndarray, "n d"]) -> np.ndarray:
        """scikit-learn's convention: :meth:`class_logits` ``[n, n_classes]``, or for two
        classes one score ``[n]`` that is positive where ``classes_[1]`` is predicted.

        Args:
            X: Raw rows ``[n, n_features]``.

        Returns:
            ``[n, n_classes]`` logits, or ``[n]`` scores for two classes.
        """
        logits = self.class_logits(X)
        if logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n c"]:
        """Class probabilities ``[n, n_classes]`` (columns in ``classes_`` order) of raw rows.

        Args:
            X: Raw rows ``[n, n_features]``.

        Returns:
            ``[n, n_classes]`` probabilities; each row sums to 1.
        """
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n c"]:
        """Log of :meth:`predict_proba` (a log-softmax of :meth:`class_logits`).

        Args:
            X: Raw rows ``[n, n_features]``.

        Returns:
            ``[n, n_classes]`` log-probabilities.
        """
        logits = self.class_logits(X)
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def predict(self, X: Float[np.ndarray, "n d"]) -> np.ndarray:
        """The most probable class of each row.

        Args:
            X: Raw rows ``[n, n_features]``.

        Returns:
            ``[n]`` labels taken from ``classes_``.
        """
        logits = self.class_logits(X)
        return self.classes_[np.argmax(logits, axis=1)]

    def residual_directions(self) -> tuple[Float[np.ndarray, "c d"], Float[np.ndarray, " c"]]:
        """The probe as one affine map on raw residual rows: ``logits = x @ W.T + b``.

        ``W = coef_ / scale_`` is each class's direction in residual space (for steering and
        patching), ``b = intercept_ - W @ mean_``.

        Returns:
            ``(W, b)``: ``W`` ``[n_classes, n_features]`` and ``b`` ``[n_classes]``.

        Example:
            >>> rng = np.random.default_rng(1)
            >>> X, y = rng.normal(size=(60, 4)) * 3 + 1, np.repeat([1, 2, 3], 20)
            >>> p = TaskProbe().fit(X, y)
            >>> W, b = p.residual_directions()
            >>> bool(np.allclose(X @ W.T + b, p.class_logits(X)))
            True
        """
        check_is_fitted(self, "coef_")
        directions = self.coef_ / self.scale_
        return directions, self.intercept_ - directions @ self.mean_

    def residual_weights(self, layer: int | None = None
                         ) -> tuple[Float[np.ndarray, "c d"], list[int]]:
        """Class weight vectors in residual units (``coef_ / scale_``) and their classes.

        Args:
            layer: The layer they will be used at; for a loaded probe it must be one of the
                layers it was trained on (a pooled probe has one weight matrix for all).

        Returns:
            ``(weights [n_classes, d_model], classes)``. For a probe trained on ``normed``
            features (``meta_["features"]``) the weights act on the normed residual.

        Raises:
            ProbeError: ``layer`` is outside the layers the probe was trained on.
        """
        trained = list(getattr(self, "meta_", {}).get("layers") or [])
        if layer is not None and trained and int(layer) not in trained:
            raise ProbeError(f"the probe was trained on layers {trained[0]}..{trained[-1]}, "
                             f"not on layer {layer}")
        directions, _ = self.residual_directions()
        return directions, [int(c) for c in self.classes_]

    def save(self, path: str | os.PathLike[str], meta: ProbeMeta | dict[str, Any]) -> Path:
        """Write ``path`` (``.safetensors``) and its ``.json``: :func:`save_probe` on ``self``.

        Args:
            path: The ``.safetensors`` file; the JSON goes next to it.
            meta: A :class:`ProbeMeta` (or its fields as a dict).

        Returns:
            The safetensors path (errors as :func:`save_probe`).
        """
        return save_probe(self, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: str | None = None,
             d_model: int | None = None) -> TaskProbe:
        """Read a probe written by :meth:`save` (see :func:`load_probe`).

        Args:
            path: The ``.safetensors`` file (or its ``.json``).
            model: If given, the model spec the probe must have been trained on.
            d_model: If given, the residual width it must take.

        Returns:
            A fitted :class:`TaskProbe`.

        Raises:
            ProbeError: Missing or corrupt files, or a probe for another model / width.
        """
        return load_probe(path, model=model, d_model=d_model)


def _as_numpy(X: Any) -> Any:
    """Torch tensors (any device, any float dtype) to numpy; everything else unchanged."""
    if isinstance(X, torch.Tensor):
        return X.detach().to("cpu", torch.float32).numpy()
    return X


def _check_sample_weight(sample_weight: Any, n: int) -> Float[np.ndarray, " n"]:
    """Per-row weights as float64 (ones when None), refusing negative or all-zero ones."""
    if sample_weight is None:
        return np.ones(n)
    weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if weights.shape[0] != n:
        raise ValueError(f"sample_weight has {weights.shape[0]} entries for {n} rows")
    if np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError("sample weights must be >= 0 and not all zero")
    return weights


def truncation_rows(y_index: Int[np.ndarray, " n"], rng: np.random.RandomState
                    ) -> Int[np.ndarray, " m"]:
    """Rows of a class-balanced subset: every class cut to the smallest class's size.

    Args:
        y_index: Class index of every row ``[n]``.
        rng: The random state that picks each class's subset.

    Returns:
        Sorted row indices ``[m]``, ``m = n_classes * smallest class size``.

    Example:
        >>> rows = truncation_rows(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2]),
        ...                        np.random.RandomState(0))
        >>> np.bincount(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])[rows]).tolist()
        [2, 2, 2]
    """
    present = np.unique(y_index)
    smallest = min(int(np.sum(y_index == c)) for c in present)
    picked = [rng.choice(np.flatnonzero(y_index == c), size=smallest, replace=False)
              for c in present]
    return np.sort(np.concatenate(picked))


def _fit_whitened(
    X: Float[np.ndarray, "n d"], y: Int[np.ndarray, " n"], sample_weight: Float[np.ndarray, " n"],
    n_classes: int, C: float, max_iter: int, tol: float,
) -> tuple[Float[np.ndarray, "c d"], Float[np.ndarray, " c"], int, bool]:
    """Multinomial L2 logistic regression by L-BFGS in whitened coordinates.

    Minimises ``sum_i w_i CE_i / S + ||W||^2 / (2 C S)`` (scikit-learn's objective divided
    by ``C S``, with ``S = sum_i w_i``), over ``W = M V`` with ``M = U diag(p)``.
    """
    n, d = X.shape
    total = float(sample_weight.sum())
    w = sample_weight / total
    ridge = 1.0 / (C * total)
    # Weighted second moment of the standardized features: its eigenbasis decorrelates them.
    work = X.dtype  # float32 or float64: the matrix products run in it
    second = (X.T @ (X * w[:, None].astype(work))).astype(np.float64)
    # torch's eigh: numpy's LAPACK build here takes seconds for d = 576, torch's ~0.1 s.
    eigval_t, eigvec_t = torch.linalg.eigh(torch.from_numpy((second + second.T) / 2))
    eigval, eigvec = eigval_t.numpy(), eigvec_t.numpy()
    eigval = np.clip(eigval, 0.0, None)
    p = 1.0 / np.sqrt(eigval + ridge)
    mix = eigvec * p  # M: d x d
    Z = X @ mix.astype(work)  # whitened features; the data term now has ~unit Hessian
    penalty = p**2  # ||M V||^2 = sum_j p_j^2 ||V_j||^2 since U is orthonormal
    rows = np.arange(n)
    w_work = w.astype(work)

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        V = theta[: d * n_classes].reshape(d, n_classes)
        b = theta[d * n_classes:]
        logits = (Z @ V.astype(work)).astype(np.float64) + b
        top = logits.max(axis=1, keepdims=True)
        expd = np.exp(logits - top)
        norm = expd.sum(axis=1, keepdims=True)
        lse = np.log(norm[:, 0]) + top[:, 0]
        loss = float(w @ (lse - logits[rows, y])) + 0.5 * ridge * float(
            np.sum(penalty[:, None] * V * V))
        resid = expd / norm
        resid[rows, y] -= 1.0
        weighted = resid.astype(work) * w_work[:, None]
        grad_v = (Z.T @ weighted).astype(np.float64) + ridge * penalty[:, None] * V
        return loss, np.concatenate([grad_v.ravel(), weighted.sum(axis=0, dtype=np.float64)])

    result = scipy.optimize.minimize(
        loss_grad, np.zeros(d * n_classes + n_classes), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps,
                 "maxls": 50},
    )
    V = result.x[: d * n_classes].reshape(d, n_classes)
    coef = (mix @ V).T
    # status 1 is the iteration limit; 0 is convergence, 2 a line search that can no longer
    # improve in float precision (which happens at the minimum).
    converged = int(result.status) != 1
    return np.ascontiguousarray(coef), result.x[d * n_classes:].copy(), int(result.nit), \
        converged


def _fit_sklearn(
    X: Float[np.ndarray, "n d"], y: Int[np.ndarray, " n"], sample_weight: Float[np.ndarray, " n"],
    n_classes: int, C: float, max_iter: int, tol: float,
) -> tuple[Float[np.ndarray, "c d"], Float[np.ndarray, " c"], int, bool]:
    """scikit-learn's own lbfgs LogisticRegression on the standardized features."""
    model = LogisticRegression(C=C, max_iter=max_iter, tol=tol, solver="lbfgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X.astype(np.float64), y, sample_weight=sample_weight)
    converged = not any(issubclass(c.category, ConvergenceWarning) for c in caught)
    coef, intercept = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
    if n_classes == 2:
        # Binary fits have one logit z; [-z/2, z/2] gives the same probabilities per class.
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array(
            [-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept, int(np.max(model.n_iter_)), converged


# ---------------------------------------------------------------------------- persistence


@dataclass
class ProbeMeta:
    """What a saved probe was trained on, checked when it is loaded.

    Attributes:
        model: The model spec of the run (``summary.json["model"]``).
        d_model: Width of the residual stream.
        n_layers: L of the model.
        layers: The 0-based layers whose states trained it.
        features: ``"raw"`` (``blocks.{l}.hook_resid_post``) or ``"normed"`` (after the
            model's final norm).
        label_rule: ``in-order`` or ``count``.
        min_layer: First layer labelled.
        top_k: K.
        extra: Anything else worth keeping (run folder, counts...).
    """

    model: str
    d_model: int
    n_layers: int | None = None
    layers: list[int] = field(default_factory=list)
    features: str = "raw"
    label_rule: str = "in-order"
    min_layer: int | None = None
    top_k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def probe_versions() -> dict[str, str]:
    """Versions of the libraries a saved probe depends on.

    Returns:
        ``{distribution: version}``; ``"not installed"`` for a missing one.
    """
    out = {}
    for dist in ("topk-saturation", "numpy", "scipy", "scikit-learn", "safetensors", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out



def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_probe(probe: TaskProbe, path: str | os.PathLike[str],
               meta: ProbeMeta | dict[str, Any]) -> Path:
    """Write a fitted probe as safetensors (arrays) + JSON (everything else); no pickle.

    Args:
        probe: A fitted :class:`TaskProbe` with integer classes.
        path: The ``.safetensors`` file; the JSON goes next to it (same stem, ``.json``).
        meta: A :class:`ProbeMeta` (or its fields as a dict).

    Returns:
        The safetensors path.

    Raises:
        ProbeError: Non-integer classes, a ``d_model`` that differs from the input width, or
            a path not ending in ``.safetensors``.

    Example:
        >>> import tempfile
        >>> X, y = np.random.default_rng(0).normal(size=(40, 3)), np.repeat([1, 2], 20)
        >>> p = TaskProbe().fit(X, y)
        >>> f = save_probe(p, Path(tempfile.mkdtemp()) / "p.safetensors",
        ...                ProbeMeta(model="random:gpt2", d_model=3))
        >>> bool(np.array_equal(load_probe(f, d_model=3).predict(X), p.predict(X)))
        True
    """
    check_is_fitted(probe, "coef_")
    meta = meta if isinstance(meta, ProbeMeta) else ProbeMeta(**meta)
    if not np.issubdtype(probe.classes_.dtype, np.integer):
        raise ProbeError("only probes with integer classes (tasks) can be saved")
    if int(meta.d_model) != probe.n_features_in_:
        raise ProbeError(f"the probe has {probe.n_features_in_} input features but the "
                         f"metadata says d_model {meta.d_model}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ProbeError(f"a probe file must end in .safetensors, got {path.name}")
    tensors = {
        "coef": np.ascontiguousarray(probe.coef_, dtype=np.float64),
        "intercept": np.ascontiguousarray(probe.intercept_, dtype=np.float64),
        "mean": np.ascontiguousarray(probe.mean_, dtype=np.float64),
        "scale": np.ascontiguousarray(probe.scale_, dtype=np.float64),
        "classes": np.ascontiguousarray(probe.classes_, dtype=np.int64),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": PROBE_FORMAT, "model": str(meta.model),
                                           "d_model": str(meta.d_model)})
    os.chmod(tmp, FILE_MODE)  # safetensors creates files readable by their owner only
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    info = {
        "format": PROBE_FORMAT,
        "format_version": PROBE_FORMAT_VERSION,
        "estimator": "probes.probe.TaskProbe",
        "params": probe.get_params(),
        "classes": [int(c) for c in probe.classes_],
        "n_features_in": int(probe.n_features_in_),
        "n_iter": int(probe.n_iter_),
        "converged": bool(probe.converged_),
        "meta": asdict(meta),
        "tensors_file": path.name,
        "tensors_sha256": digest,
        "versions": probe_versions(),
    }
    json_tmp = _json_path(path).with_name(f".{path.stem}.json.tmp")
    json_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    os.replace(json_tmp, _json_path(path))
    return path


def load_probe(path: str | os.PathLike[str], model: str | None = None,
               d_model: int | None = None) -> TaskProbe:
    """Read a probe written by :func:`save_probe`, refusing one made for another model.

    Args:
        path: The ``.safetensors`` file (or its ``.json``).
        model: If given, the model spec the probe must have been trained on.
        d_model: If given, the residual width it must take.

    Returns:
        A fitted :class:`TaskProbe`; ``meta_`` holds the saved metadata.

    Raises:
        ProbeError: Missing or corrupt files, or a probe for another model / width.
    """
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    json_path = _json_path(path)
    for needed in (path, json_path):
        if not needed.is_file():
            raise ProbeError(f"probe file {needed} does not exist")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ProbeError(f"{json_path} is not valid JSON ({err.msg})") from err
    if info.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{json_path} is not a topk-saturation probe")
    if hashlib.sha256(path.read_bytes()).hexdigest() != info.get("tensors_sha256"):
        raise ProbeError(f"{path} does not match {json_path.name} (changed or from another "
                         "probe)")
    meta = ProbeMeta(**info["meta"])
    trained = f"{meta.model!r} (d_model {meta.d_model})"
    if model is not None and model != meta.model:
        raise ProbeError(f"the probe {path} was trained on model {trained}, not {model!r}")
    if d_model is not None and int(d_model) != int(meta.d_model):
        raise ProbeError(f"the probe {path} was trained on model {trained}; it cannot read "
                         f"residual streams of width d_model {d_model}")
    tensors = load_file(str(path))
    params = {k: v for k, v in info["params"].items() if k in TaskProbe().get_params()}
    probe = TaskProbe(**params)
    probe.classes_ = tensors["classes"].astype(np.int64)
    probe.coef_ = tensors["coef"]
    probe.intercept_ = tensors["intercept"]
    probe.mean_ = tensors["mean"]
    probe.scale_ = tensors["scale"]
    probe.n_features_in_ = int(info["n_features_in"])
    probe.n_iter_ = int(info.get("n_iter", 0))
    probe.converged_ = bool(info.get("converged", True))
    probe.meta_ = asdict(meta)
    if probe.coef_.shape != (len(probe.classes_), probe.n_features_in_):
        raise ProbeError(f"{path} holds coefficients of shape {probe.coef_.shape}, expected "
                         f"{(len(probe.classes_), probe.n_features_in_)}")
    return probe


# ---------------------------------------------------------------------------- splits


def grouped_folds(groups: Int[np.ndarray, " n"], n_splits: int) -> list[Split]:
    """K-fold splits that keep every group (window) whole: scikit-learn's ``GroupKFold``.

    GroupKFold is deterministic (it balances fold sizes), so no seed is involved.

    Args:
        groups: Group (window id) of every row ``[n]``.
        n_splits: Number of folds (at least 2).

    Returns:
        ``n_splits`` ``(train, test)`` pairs of sorted row indices.

    Raises:
        ProbeError: ``n_splits < 2``, or fewer groups than folds.

    Example:
        >>> groups = np.array([0, 0, 1, 1, 2, 2])
        >>> sorted(groups[test].tolist() for _, test in grouped_folds(groups, n_splits=3))
        [[0, 0], [1, 1], [2, 2]]
    """
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_splits < 2:
        raise ProbeError(f"--folds must be at least 2, got {n_splits}")
    if n_groups < n_splits:
        raise ProbeError(f"grouped {n_splits}-fold cross-validation needs at least {n_splits} "
                         f"windows with labelled states; there are {n_groups}")
    splitter = GroupKFold(n_splits=n_splits)
    folds = [(np.sort(tr), np.sort(te)) for tr, te in
             splitter.split(np.zeros(len(groups)), groups=groups)]
    assert_groups_disjoint(folds, groups)
    return folds


def leaky_folds(n: int, n_splits: int, seed: int) -> list[Split]:
    """The paper's plain shuffled KFold over states: leaky, since the other layers of a
    position (and its neighbours) land in train and test alike. Reported beside, never
    instead of, the grouped score.

    Args:
        n: Number of rows.
        n_splits: Number of folds (at least 2).
        seed: Seed of the shuffle.

    Returns:
        ``n_splits`` ``(train, test)`` pairs of sorted row indices.

    Raises:
        ProbeError: ``n_splits < 2``.

    Example:
        >>> [len(test) for _, test in leaky_folds(10, 5, seed=0)]
        [2, 2, 2, 2, 2]
    """
    if n_splits < 2:
        raise ProbeError(f"--folds must be at least 2, got {n_splits}")
    splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(n))]


def assert_groups_disjoint(folds: Sequence[Split], groups: Int[np.ndarray, " n"]) -> None:
    """Raise if any group has rows in both the train and the test part of a fold.

    Args:
        folds: ``(train, test)`` pairs of row indices.
        groups: Group of every row ``[n]``.

    Raises:
        AssertionError: A fold shares a group between its train and test parts.
    """
    groups = np.asarray(groups)
    for i, (train, test) in enumerate(folds):
        shared = np.intersect1d(groups[train], groups[test])
        if len(shared):
            raise AssertionError(f"fold {i}: groups {shared[:5].tolist()} in train and test")


def restrict_folds(folds: Sequence[Split], mask: Bool[np.ndarray, " n"]) -> list[Split]:
    """The same folds on a subset of rows (re-indexed into the subset), e.g. one layer.

    Args:
        folds: ``(train, test)`` pairs of row indices into all ``n`` rows.
        mask: ``[n]`` True for the rows of the subset.

    Returns:
        The folds with only the subset's rows, as indices into the subset (a part may be
        empty).

    Example:
        >>> folds = [(np.array([0, 1]), np.array([2, 3]))]
        >>> restrict_folds(folds, np.array([False, True, True, False]))
        [(array([0]), array([1]))]
    """
    new_index = np.cumsum(mask) - 1
    return [(new_index[tr[mask[tr]]], new_index[te[mask[te]]]) for tr, te in folds]


# ---------------------------------------------------------------------------- controls


def layer_onehot(layers: Int[np.ndarray, " n"]) -> Float[np.ndarray, "n m"]:
    """Features that say only which layer a state is at (one column per layer present).

    A one-hot code, not the index as a number, so that the control can learn any mapping
    from layer to task, not only a monotone one.

    Args:
        layers: Layer of every state ``[n]``.

    Returns:
        ``[n, m]`` float32 one-hot rows, ``m`` the number of distinct layers (ascending).

    Example:
        >>> layer_onehot(np.array([5, 7, 5])).tolist()
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    """
    values, index = np.unique(np.asarray(layers), return_inverse=True)
    out = np.zeros((len(index), len(values)), dtype=np.float32)
    out[np.arange(len(index)), index] = 1.0
    return out


def shuffled_labels(y: Int[np.ndarray, " n"], rng: np.random.Generator) -> Int[np.ndarray, " n"]:
    """A seeded permutation of the labels (over all states).

    Args:
        y: Labels ``[n]``.
        rng: The generator that draws the permutation.

    Returns:
        ``[n]`` permuted labels.
    """
    return rng.permutation(np.asarray(y))


def random_embeddings(
    X: Float[np.ndarray, "n d"], y: Int[np.ndarray, " n"], rng: np.random.Generator,
) -> Float[np.ndarray, "n d"]:
    """The paper's control: Gaussian rows with their class's per-feature mean and std.

    It keeps each class's mean and spread but no structure within a class, so a probe on it
    measures how far apart the class means are relative to the spread, not a null: it can
    score high.

    Args:
        X: Features ``[n, d]``.
        y: Labels ``[n]``.
        rng: The generator of the Gaussian draws.

    Returns:
        ``[n, d]`` float32 random rows, each drawn from its class's per-feature normal.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> R = random_embeddings(np.array([[0.0], [0.0], [10.0], [10.0]]),
        ...                       np.array([1, 1, 2, 2]), rng)
        >>> R[:2].ravel().tolist(), R[2:].ravel().tolist()
        ([0.0, 0.0], [10.0, 10.0])
    """
    X = np.asarray(X)
    out = np.empty(X.shape, dtype=np.float32)
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        mean = X[rows].mean(axis=0, dtype=np.float64)
        std = X[rows].std(axis=0, dtype=np.float64)
        out[rows] = (mean + std * rng.standard_normal((len(rows), X.shape[1]))).astype(
            np.float32)
    return out


# ---------------------------------------------------------------------------- CV


@dataclass
class CVResult:
    """Out-of-fold predictions of one estimator on one set of folds.

    Attributes:
        name: What was cross-validated (``probe``, ``layer_only``...).
        classes: All classes, the columns of ``proba``.
        y: The labels scored against.
        fold_scores: Balanced accuracy of each fold's test part.
        pred: Out-of-fold prediction of every row (-1 where a row is in no test fold).
        proba: Out-of-fold probabilities ``[n, n_classes]``.
        n_not_converged: Fits that stopped at ``max_iter``.
        seconds: Wall time.
        test_folds: The test rows of each scored fold (to check which folds were used).
    """

    name: str
    classes: np.ndarray
    y: np.ndarray
    fold_scores: np.ndarray
    pred: np.ndarray
    proba: np.ndarray
    n_not_converged: int = 0
    seconds: float = 0.0
    test_folds: list[np.ndarray] = field(default_factory=list)

    @property
    def balanced_accuracy(self) -> float:
        """Mean over folds."""
        return float(np.mean(self.fold_scores))

    @property
    def balanced_accuracy_se(self) -> float:
        """Standard error over folds (sample std / sqrt(folds))."""
        return standard_error(self.fold_scores)


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """Sample standard deviation over sqrt(n); 0 for fewer than two values.

    Args:
        values: The values (e.g. per-fold scores).

    Returns:
        ``std(values, ddof=1) / sqrt(n)``.

    Example:
        >>> round(standard_error([0.5, 0.7]), 3)
        0.1
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def _quiet_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    with warnings.catch_warnings():
        # A fold may lack a class the model predicts: balanced accuracy averages the
        # recalls of the classes present, which is what is wanted.
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def cross_validate(
    estimator: BaseEstimator, X: Float[np.ndarray, "n d"], y: Int[np.ndarray, " n"],
    folds: Sequence[Split], classes: Sequence[int] | np.ndarray, name: str = "probe",
    progress: bool = False,
) -> CVResult:
    """Fit a fresh clone per fold; collect per-fold balanced accuracy and out-of-fold output.

    A class missing from a training part gets probability 0 on that fold's test part; a
    training part with a single class predicts that class; empty test parts are skipped.

    Args:
        estimator: An unfitted scikit-learn classifier (cloned per fold).
        X: Features ``[n, d]``.
        y: Labels ``[n]``.
        folds: ``(train, test)`` pairs of row indices.
        classes: All classes, sorted (the columns of ``proba``).
        name: Name of the result (and of the progress bar).
        progress: Show a progress bar over folds.

    Returns:
        A :class:`CVResult`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([1, 2], 50); X = rng.normal(size=(100, 3)) + y[:, None]
        >>> cv = cross_validate(TaskProbe(), X, y, leaky_folds(100, 5, 0), [1, 2])
        >>> cv.balanced_accuracy > 0.7, cv.proba.shape
        (True, (100, 2))
    """
    classes = np.asarray(classes)
    y = np.asarray(y)
    start = time.perf_counter()
    pred = np.full(len(y), -1, dtype=np.int64)
    proba = np.zeros((len(y), len(classes)))
    scores, not_converged, used = [], 0, []
    for train, test in tqdm(folds, desc=name, leave=False, disable=not progress):
        if len(test) == 0:
            continue  # a fold restricted to a subset (one layer) may hold none of it
        used.append(test)
        present = np.unique(y[train])
        if len(present) == 1:
            # Nothing to discriminate: the only possible prediction is the one class seen.
            proba[test, np.searchsorted(classes, present[0])] = 1.0
        else:
            model = clone(estimator)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(X[train], y[train])
            not_converged += sum(issubclass(c.category, ConvergenceWarning) for c in caught)
            columns = np.searchsorted(classes, model.classes_)
            proba[test[:, None], columns[None, :]] = model.predict_proba(X[test])
        pred[test] = classes[np.argmax(proba[test], axis=1)]
        scores.append(_quiet_balanced_accuracy(y[test], pred[test]))
    return CVResult(name, classes, y, np.asarray(scores), pred, proba, not_converged,
                    time.perf_counter() - start, used)


# ---------------------------------------------------------------------------- metrics


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)


def roc_auc_per_class(y: Int[np.ndarray, " n"], proba: Float[np.ndarray, "n c"],
                      classes: Sequence[int]) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC of each class from pooled out-of-fold probabilities, and their
    mean (``macro``); None for a class absent from ``y`` (or the only one present).

    Args:
        y: Labels ``[n]``.
        proba: Probabilities ``[n, n_classes]``, columns in ``classes`` order.
        classes: The classes.

    Returns:
        ``{str(class): auc, ..., "macro": mean}``, values rounded to 4 digits.

    Example:
        >>> roc_auc_per_class(np.array([1, 2, 1, 2]),
        ...                   np.array([[.9, .1], [.2, .8], [.6, .4], [.3, .7]]), [1, 2])
        {'1': 1.0, '2': 1.0, 'macro': 1.0}
    """
    out: dict[str, float | None] = {}
    for j, label in enumerate(classes):
        positive = np.asarray(y) == label
        if positive.all() or not positive.any():
            out[str(label)] = None
        else:
            out[str(label)] = _round(roc_auc_score(positive, proba[:, j]))
    present = [v for v in out.values() if v is not None]
    out["macro"] = _round(float(np.mean(present))) if present else None
    return out


def per_layer_accuracy(layers: Int[np.ndarray, " n"], y: Int[np.ndarray, " n"],
                       pred: Int[np.ndarray, " n"], balanced: bool = False
                       ) -> dict[str, float | None]:
    """Accuracy (plain, or balanced over the tasks present) among each layer's states.

    Args:
        layers: Layer of every state ``[n]``.
        y: True labels ``[n]``.
        pred: Predicted labels ``[n]``.
        balanced: Balanced accuracy instead of plain accuracy.

    Returns:
        ``{str(layer): accuracy}`` (rounded to 4 digits), layers ascending.

    Example:
        >>> layers, y = np.array([5, 5, 5, 6]), np.array([1, 1, 2, 2])
        >>> per_layer_accuracy(layers, y, np.array([1, 1, 1, 2]))
        {'5': 0.6667, '6': 1.0}
        >>> per_layer_accuracy(layers, y, np.array([1, 1, 1, 2]), balanced=True)
        {'5': 0.5, '6': 1.0}
    """
    out = {}
    for layer in np.unique(layers):
        rows = layers == layer
        value = _quiet_balanced_accuracy(y[rows], pred[rows]) if balanced else \
            float(np.mean(pred[rows] == y[rows]))
        out[str(int(layer))] = _round(value)
    return out


def cv_summary(cv: CVResult, layers: Int[np.ndarray, " n"] | None = None) -> dict[str, Any]:
    """The JSON-ready numbers of one :class:`CVResult`.

    Args:
        cv: The cross-validation result.
        layers: Layer of every state ``[n]``; adds the per-layer accuracies when given.

    Returns:
        Balanced accuracy and its s.e., per-fold scores, the number of unconverged fits, the
        seconds, and optionally ``per_layer_accuracy`` / ``per_layer_balanced_accuracy``.
    """
    scored = cv.pred >= 0
    out: dict[str, Any] = {
        "balanced_accuracy": _round(cv.balanced_accuracy),
        "balanced_accuracy_se": _round(cv.balanced_accuracy_se),
        "fold_balanced_accuracy": [_round(s) for s in cv.fold_scores],
        "n_fits_not_converged": int(cv.n_not_converged),
        "seconds": round(cv.seconds, 2),
    }
    if layers is not None:
        out["per_layer_accuracy"] = per_layer_accuracy(layers[scored], cv.y[scored],
                                                       cv.pred[scored])
        out["per_layer_balanced_accuracy"] = per_layer_accuracy(
            layers[scored], cv.y[scored], cv.pred[scored], balanced=True)
    return out


def classification_report(cv: CVResult) -> dict[str, Any]:
    """Per-task accuracy (recall), ROC-AUC and the confusion matrix of pooled OOF output.

    Args:
        cv: The cross-validation result (rows with no out-of-fold prediction are left out).

    Returns:
        ``per_task_accuracy``, ``roc_auc`` (see :func:`roc_auc_per_class`) and
        ``confusion_matrix`` (``labels``, ``counts`` with rows the true tasks).
    """
    scored = cv.pred >= 0
    y, pred, proba = cv.y[scored], cv.pred[scored], cv.proba[scored]
    matrix = confusion_matrix(y, pred, labels=cv.classes)
    totals = matrix.sum(axis=1)
    per_task = {str(c): (_round(matrix[i, i] / totals[i]) if totals[i] else None)
                for i, c in enumerate(cv.classes)}
    return {
        "per_task_accuracy": per_task,
        "roc_auc": roc_auc_per_class(y, proba, cv.classes),
        "confusion_matrix": {"labels": [int(c) for c in cv.classes],
                             "rows": "true task", "columns": "predicted task",
                             "counts": matrix.tolist()},
    }


def compare_to_layer_only(
    probe: CVResult, layer_only: CVResult, layers: Int[np.ndarray, " n"],
    folds: Sequence[Split],
) -> dict[str, Any]:
    """Does the probe read more than the layer index? Paired over the same folds.

    ``reads_task`` is True where the mean over folds of (probe minus layer-only balanced
    accuracy) exceeds twice its standard error over folds. The same per layer, on each
    fold's test states of that layer: there the layer-only classifier is a constant, so a
    positive margin means the probe tells tasks apart *within* a layer.

    Args:
        probe: The probe's cross-validation result.
        layer_only: The layer-only control's, on the same folds.
        layers: Layer of every state ``[n]``.
        folds: The folds both were scored on.

    Returns:
        ``reads_task``, ``margin``, ``margin_se``, the ``rule``, ``per_layer`` (``margin``,
        ``se``, ``reads_task`` per layer) and ``layers_read``.
    """
    diffs = probe.fold_scores - layer_only.fold_scores
    margin, se = float(np.mean(diffs)), standard_error(diffs)
    per_layer: dict[str, dict[str, Any]] = {}
    for layer in np.unique(layers):
        fold_diffs = []
        for _, test in folds:
            rows = test[layers[test] == layer]
            if len(rows):
                fold_diffs.append(
                    _quiet_balanced_accuracy(probe.y[rows], probe.pred[rows])
                    - _quiet_balanced_accuracy(layer_only.y[rows], layer_only.pred[rows]))
        m, s = float(np.mean(fold_diffs)), standard_error(fold_diffs)
        per_layer[str(int(layer))] = {"margin": _round(m), "se": _round(s),
                                      "reads_task": bool(m > 2 * s and m > 0)}
    return {
        "reads_task": bool(margin > 2 * se and margin > 0),
        "margin": _round(margin),
        "margin_se": _round(se),
        "rule": "margin = probe minus layer-only balanced accuracy, paired over the same "
                "grouped folds (per layer: on each fold's test states of that layer); "
                "reads_task when the mean margin > 2 s.e. over folds",
        "per_layer": per_layer,
        "layers_read": [int(k) for k, v in per_layer.items() if v["reads_task"]],
    }


def run_controls(
    estimator: BaseEstimator, X: Float[np.ndarray, "n d"], y: Int[np.ndarray, " n"],
    layers: Int[np.ndarray, " n"], folds: Sequence[Split], leaky: Sequence[Split],
    classes: Sequence[int], seed: int, progress: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, CVResult]:
    """The probe and its controls, each cross-validated on the same folds.

    Returns ``probe`` (grouped folds), ``layer_only``, ``shuffled``, ``random_embeddings``
    (grouped folds) and ``leaky_kfold`` (the probe on the paper's plain KFold). Every
    random draw comes from ``seed``.

    Args:
        estimator: An unfitted classifier (a :class:`TaskProbe`).
        X: Features ``[n, d]``.
        y: Labels ``[n]``.
        layers: Layer of every state ``[n]`` (the layer-only control's input).
        folds: Grouped folds.
        leaky: The plain KFold folds of the leaky control.
        classes: All classes, sorted.
        seed: Seed of the shuffled labels and the random embeddings.
        progress: Show progress bars over folds.
        on_step: Called with each name before its cross-validation starts.

    Returns:
        ``{name: CVResult}`` for the five names above, in that order.
    """
    streams = np.random.SeedSequence(seed).spawn(2)
    jobs: list[tuple[str, Callable[[], CVResult]]] = [
        ("probe", lambda: cross_validate(estimator, X, y, folds, classes, "probe", progress)),
        ("layer_only", lambda: cross_validate(estimator, layer_onehot(layers), y, folds,
                                              classes, "layer_only", progress)),
        ("shuffled", lambda: cross_validate(
            estimator, X, shuffled_labels(y, np.random.default_rng(streams[0])), folds,
            classes, "shuffled", progress)),
        ("random_embeddings", lambda: cross_validate(
            estimator, random_embeddings(X, y, np.random.default_rng(streams[1])), y, folds,
            classes, "random_embeddings", progress)),
        ("leaky_kfold", lambda: cross_validate(estimator, X, y, leaky, classes, "leaky_kfold",
                                               progress)),
    ]
    out = {}
    for name, job in jobs:
        if on_step is not None:
            on_step(name)
        out[name] = job()
    return out
