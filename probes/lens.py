"""The logit lens: read a residual stream through the model's own final norm and unembedding.

``LogitLens(bridge)`` applies exactly what the model applies after its last block: the
bridge's ``ln_final`` module (so Gemma's ``x_hat * (1 + w)`` and every other norm variant
is the model's own code), then ``W_U`` and ``b_U``, then the adapter's output transform
(Gemma 2's soft cap, Cohere's logit scale...). At the last block this reproduces the model's
logits exactly.

:meth:`LogitLens.topk` gives the exact top-k ids per row without materialising more than
one chunk of full-vocabulary logits. On CPUs with native bfloat16 matrix units it first
*screens* with a bfloat16 GEMM (several times faster than float32) and then settles every
decision exactly in float32:

1. screen: ``z~ = bf16(x) @ bf16(W)``; keep the ``C`` best candidates per row;
2. recompute the candidates' logits exactly in float32 and take their top-k;
3. the result is provably the exact top-k when the k-th exact value beats the largest value
   any non-candidate can have, ``v~_C`` plus a rigorous bound on the bfloat16 error
   (input rounding ``(2u + u^2) * sum_i |x_i| max_j |W_ij|`` with ``u = 2^-8``, fp32
   accumulation, and the rounding of the output to bfloat16);
4. rows where that fails are recomputed in full float32.

A run-time guard compares the candidates' exact and screened values with the bound; if the
bound is ever broken (a kernel that does not accumulate in fp32), screening is switched off
with a warning. Output transforms of the adapters are strictly increasing, so ranks are
taken on the raw logits.

Example:
    >>> import torch
    >>> from probes.models import load_model
    >>> m = load_model("random:gpt2?n_layers=2&d_model=32&n_heads=2")
    >>> lens = LogitLens(m.bridge)
    >>> values, ids = lens.topk(torch.randn(3, 32), k=5)
    >>> tuple(ids.shape)
    (3, 5)
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.errors import InvalidOptionError, UnsupportedArchitectureError

_U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_U_FP32 = 2.0**-24
SCREEN_MODES = ("auto", "bf16", "none")
_ROW_BUCKET = 128
_SCREEN_CACHE: dict[tuple[object, ...], tuple[Tensor, Tensor, Tensor, bool]] = {}


@lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16).

    Returns:
        True when ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` (False where it
        cannot be read); cached per process.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class LogitLens:
    """Decode residual streams into next-token logits, as the model's own head would.

    Args:
        bridge: A TransformerBridge of a decoder with ``ln_final`` and ``unembed``.
        screen: ``"auto"`` (bfloat16 screening on CPUs with bfloat16 units and float32
            weights), ``"bf16"`` (always) or ``"none"`` (plain float32).
        candidates: Candidates kept per row by the screen.
        chunk_bytes: Bound on the memory of one chunk of full-vocabulary logits.

    Raises:
        InvalidOptionError: An unknown ``screen`` mode.
        UnsupportedArchitectureError: The model has no unembedding to read through, or is an
            encoder-decoder.
    """

    def __init__(
        self, bridge: torch.nn.Module, screen: str = "auto", candidates: int = 32,
        chunk_bytes: int = 64 * 2**20,
    ) -> None:
        if screen not in SCREEN_MODES:
            raise InvalidOptionError(f"unknown screen mode {screen!r}; use {SCREEN_MODES}")
        modules = getattr(bridge, "_modules", {})
        if "encoder_blocks" in modules or "decoder_blocks" in modules:
            raise UnsupportedArchitectureError(
                "the logit lens here reads decoder-only stacks; this bridge is encoder-decoder"
            )
        if getattr(bridge, "unembed", None) is None:
            raise UnsupportedArchitectureError(
                f"{bridge.cfg.model_name} has no unembedding (an encoder without an LM head?),"
                " so its layers cannot be read with the logit lens"
            )
        self.bridge = bridge
        self.ln_final = getattr(bridge, "ln_final", None)
        adapter = getattr(bridge, "adapter", None)
        self._init_head(bridge.W_U, getattr(bridge, "b_U", None),
                        getattr(adapter, "apply_output_logits_transform", None),
                        screen, candidates, chunk_bytes)

    def _init_head(
        self, W_U: Float[Tensor, "d_model d_vocab"], b_U: Float[Tensor, " d_vocab"] | None,
        transform: object, screen: str, candidates: int, chunk_bytes: int,
    ) -> None:
        """Set up the unembedding and the top-k machinery (shared with other readouts).

        Readouts of other heads (:mod:`probes.architectures`) call this with their own
        weights and override :meth:`normalize`.
        """
        if screen not in SCREEN_MODES:
            raise InvalidOptionError(f"unknown screen mode {screen!r}; use {SCREEN_MODES}")
        self.W_U = W_U.detach()
        self.b_U = (
            torch.zeros(self.W_U.shape[1], dtype=self.W_U.dtype, device=self.W_U.device)
            if b_U is None else b_U.detach().to(self.W_U.dtype)
        )
        self._transform = transform
        self.d_model, self.d_vocab = int(self.W_U.shape[0]), int(self.W_U.shape[1])
        self.candidates = max(1, int(candidates))
        self.chunk_rows = max(1, chunk_bytes // (4 * self.d_vocab))
        fp32_cpu = self.W_U.dtype == torch.float32 and self.W_U.device.type == "cpu"
        if screen == "auto":
            screen = "bf16" if fp32_cpu and cpu_has_bf16_units() else "none"
        if screen == "bf16" and self.W_U.dtype != torch.float32:
            screen = "none"  # screening a model that already runs in 16 bits gains nothing
        self.screen = screen
        self._screen_state: tuple[Tensor, Tensor, Tensor, bool] | None = None
        self.stats = {"rows": 0, "screened_exact": 0, "fallback_rows": 0}

    # ----------------------------------------------------------------- decoding
    def normalize(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Apply the model's final norm (the identity where it has none).

        Args:
            resid: Residual-stream vectors ``[..., d_model]``.

        Returns:
            The normed vectors ``[..., d_model]``, in the unembedding's dtype and device.
        """
        if self.ln_final is None:
            return resid
        shape = resid.shape
        flat = resid.reshape(1, -1, shape[-1]).to(device=self.W_U.device, dtype=self.W_U.dtype)
        with torch.no_grad():
            # Norm modules expect [batch, pos, d_model]; statistics are per vector.
            return self.ln_final(flat).reshape(shape)

    def unembed(self, normed: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """``normed @ W_U + b_U``, then the output transform: the model's logits.

        Args:
            normed: Vectors after the final norm ``[..., d_model]``.

        Returns:
            Logits ``[..., d_vocab]`` in the unembedding's dtype.
        """
        with torch.no_grad():
            logits = normed.to(self.W_U.dtype) @ self.W_U + self.b_U
            if self._transform is not None:
                logits = self._transform(logits)
        return logits

    def logits(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Full-vocabulary lens logits. Use on a few rows; :meth:`topk` streams.

        Args:
            resid: Residual-stream vectors ``[..., d_model]``.

        Returns:
            Logits ``[..., d_vocab]`` (the output transform applied).
        """
        return self.unembed(self.normalize(resid))

    def ranks(
        self, resid: Float[Tensor, "n d_model"], token_ids: Int[Tensor, "n t"]
    ) -> Int[Tensor, "n t"]:
        """1-based rank of given tokens in each row's lens logits (1 = the top token).

        The rank counts the tokens with a strictly larger logit, plus one.

        Args:
            resid: Residual-stream rows ``[n, d_model]``.
            token_ids: Tokens to rank in each row ``[n, t]``.

        Returns:
            ``[n, t]`` ranks on the CPU.
        """
        out = []
        for start in range(0, resid.shape[0], self.chunk_rows):
            logits = self.logits(resid[start: start + self.chunk_rows])
            ids = token_ids[start: start + self.chunk_rows].to(logits.device)
            own = torch.gather(logits, 1, ids)
            out.append((logits.unsqueeze(1) > own.unsqueeze(-1)).sum(-1) + 1)
        return torch.cat(out).cpu()

    # ----------------------------------------------------------------- top-k
    def topk(
        self, resid: Float[Tensor, "n d_model"], k: int
    ) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
        """Exact top-k lens logits and their ids per row, largest first.

        Args:
            resid: Residual-stream rows (after a block, before the final norm).
            k: How many tokens per row.

        Returns:
            ``(values, ids)``, each ``[n, k]``; values are raw float32 logits.

        Raises:
            InvalidOptionError: ``k`` outside ``1..d_vocab``.
        """
        if not 1 <= k <= self.d_vocab:
            raise InvalidOptionError(f"k must be in 1..{self.d_vocab}, got {k}")
        normed = self.normalize(resid)
        values, ids = [], []
        for start in range(0, normed.shape[0], self.chunk_rows):
            chunk = normed[start: start + self.chunk_rows]
            self.stats["rows"] += chunk.shape[0]
            if self.screen == "bf16" and self.candidates >= k and self.d_vocab > self.candidates:
                v, i = self._topk_screened(chunk, k)
            else:
                v, i = self._topk_exact(chunk, k)
            values.append(v)
            ids.append(i)
        if not values:
            empty = torch.empty(0, k)
            return empty, empty.long()
        return torch.cat(values), torch.cat(ids)

    def _topk_exact(self, normed: Tensor, k: int) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = normed @ self.W_U + self.b_U
            top = torch.topk(logits, k, dim=-1)
        return top.values.float(), top.indices

    def _screen_tensors(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        if self._screen_state is None:
            key = (self.W_U.data_ptr(), tuple(self.W_U.shape), self.W_U.dtype,
                   str(self.W_U.device), self.W_U._version, self.b_U.data_ptr())
            cached = _SCREEN_CACHE.get(key)
            if cached is not None:
                self._screen_state = cached
                return cached
            has_bias = bool(self.b_U.abs().max() > 0)
            w_aug = self.W_U
            if has_bias:
                # The bias rides along as one more input dimension (x_aug = [x, 1]), so the
                # screen is one GEMM whose output is read in bfloat16 without a pass over it.
                w_aug = torch.cat([self.W_U, self.b_U.unsqueeze(0)], dim=0)
            w_bf16 = w_aug.to(torch.bfloat16).contiguous()
            w_rows = self.W_U.t().contiguous()  # [d_vocab, d_model] for cheap gathers
            col_max = w_aug.abs().amax(dim=1)  # max_j |W_ij| per input dimension i
            self._screen_state = (w_bf16, w_rows, col_max, has_bias)
            # Lenses of the same weights (every analyze call, every benchmark repeat) share
            # these copies rather than building ~170 MB of them again for SmolLM2.
            _SCREEN_CACHE.clear()
            _SCREEN_CACHE[key] = self._screen_state
        return self._screen_state

    def _topk_screened(self, normed: Tensor, k: int) -> tuple[Tensor, Tensor]:
        w_bf16, w_rows, col_max, has_bias = self._screen_tensors()
        n_in = w_bf16.shape[0]
        gamma = n_in * _U_FP32 / (1 - n_in * _U_FP32)
        with torch.no_grad():
            x_aug = normed
            if has_bias:
                x_aug = torch.cat([normed, torch.ones_like(normed[:, :1])], dim=1)
            n_rows = x_aug.shape[0]
            # The bfloat16 GEMM kernels (oneDNN) cache a primitive per input shape, with its
            # own buffers: rounding the row count up to a bucket keeps their number (and the
            # process's memory) bounded however the number of rows varies.
            padded = -(-n_rows // _ROW_BUCKET) * _ROW_BUCKET
            x_in = x_aug.to(torch.bfloat16)
            if padded != n_rows:
                x_in = torch.cat([x_in, x_in.new_zeros(padded - n_rows, x_in.shape[1])])
            screened = (x_in @ w_bf16)[:n_rows]
            # A rigorous bound on |fp32-accumulated bf16 products - exact| per row (inputs
            # rounded to bfloat16), with 1% slack for second-order terms.
            e_in = 1.01 * (2 * _U_BF16 + _U_BF16**2 + gamma * (1 + _U_BF16) ** 2) * (
                x_aug.abs() @ col_max
            )
            top_v = torch.empty(n_rows, k)
            top_i = torch.empty(n_rows, k, dtype=torch.long)
            rows = torch.arange(n_rows)
            # Few candidates settle most rows; the flatter rows of late layers get a second,
            # wider look before the last resort of a full float32 row.
            for n_cand in (self.candidates, 8 * self.candidates):
                if rows.numel() == 0 or n_cand >= self.d_vocab:
                    break
                settled = self._settle(screened[rows], normed[rows], e_in[rows], n_cand, k,
                                       w_rows, has_bias)
                if settled is None:  # the bound failed: no screening from here on
                    fv, fi = self._topk_exact(normed[rows], k)
                    top_v[rows], top_i[rows] = fv, fi
                    return top_v, top_i
                sure, values, ids = settled
                top_v[rows[sure]], top_i[rows[sure]] = values[sure], ids[sure]
                self.stats["screened_exact"] += int(sure.sum())
                rows = rows[~sure]
            if rows.numel():
                self.stats["fallback_rows"] += int(rows.numel())
                fv, fi = self._topk_exact(normed[rows], k)
                top_v[rows], top_i[rows] = fv, fi
        return top_v, top_i

    def _settle(
        self, screened: Tensor, normed: Tensor, e_in: Tensor, n_cand: int, k: int,
        w_rows: Tensor, has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Exact top-k among the ``n_cand`` best screened tokens, and which rows it settles.

        Returns ``(sure, values, ids)``, or None where the error bound was broken.
        """
        top_screen = torch.topk(screened, n_cand, dim=-1)
        v_screen, cand = top_screen.values.float(), top_screen.indices
        # Exact float32 logits of the candidates only, in row blocks to bound the gather.
        block = max(1, (16 * 2**20) // (4 * n_cand * normed.shape[1]))
        exact = torch.cat([
            torch.bmm(w_rows[cand[i: i + block]], normed[i: i + block].unsqueeze(-1))
            .squeeze(-1) for i in range(0, len(cand), block)
        ]) if len(cand) else torch.empty(0, n_cand)
        if has_bias:
            exact = exact + self.b_U[cand]
        out_c = _U_BF16 / (1 - _U_BF16)  # the GEMM's output rounded to bfloat16
        allowed = e_in.unsqueeze(1) + v_screen.abs() * out_c
        if bool(((exact - v_screen).abs() > allowed).any()):
            warnings.warn(
                "bfloat16 screening exceeded its error bound on this machine; the lens "
                "falls back to float32 for the rest of the run", RuntimeWarning, stacklevel=4)
            self.screen = "none"
            return None
        values, pos = torch.topk(exact, k, dim=-1)
        ids = torch.gather(cand, 1, pos)
        v_last = v_screen[:, -1]
        # The largest logit any non-candidate can have: its screened value is at most
        # v_last, and value + |value| * out_c + e_in grows with the value.
        ceiling = v_last + v_last.abs() * out_c + e_in
        return values[:, -1] > ceiling, values, ids


def lens_error_at_last_layer(
    lens: LogitLens, resid_last: Float[Tensor, "n d_model"], logits: Float[Tensor, "n d_vocab"]
) -> float:
    """Largest ``|lens(layer L-1) - model logits|``: 0 (or float noise) for a faithful lens.

    Args:
        lens: The model's logit lens.
        resid_last: Residual stream after the last block ``[n, d_model]``.
        logits: The model's own logits at the same rows ``[n, d_vocab]``.

    Returns:
        The largest absolute difference (0.0 for no rows).
    """
    diff = (lens.logits(resid_last).float() - logits.float().to(lens.W_U.device)).abs()
    return float(diff.max()) if diff.numel() else 0.0
