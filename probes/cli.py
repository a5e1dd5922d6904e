"""Command-line subcommands of the ``probes`` package: ``analyze`` (and ``probe``).

Each subcommand is a thin layer over the Python API: it parses options, calls the same
function a notebook would call, prints the key numbers and where the files are. The console
script that assembles all subcommands is :mod:`topk_saturation_cli`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from probes.analysis import AnalysisOptions, AnalysisResult, analyze

_DEFAULTS = AnalysisOptions()


def slug(text: str) -> str:
    """A file-name-safe short form of a model or text spec.

    Args:
        text: A model or text spec (``shakespeare:`` is dropped; an existing path gives its
            last component).

    Returns:
        Runs of other characters than letters, digits, ``_`` and ``.`` turned into ``-``, at
        most 60 characters; ``"run"`` if nothing is left.

    Example:
        >>> slug("shakespeare:hamlet")
        'hamlet'
        >>> slug("random:gpt2?n_layers=4")
        'random-gpt2-n_layers-4'
    """
    text = text.split("shakespeare:", 1)[-1]
    text = Path(text).name if ("/" in text and Path(text).exists()) else text
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")[:60] or "run"


def positive_int(value: str) -> int:
    """argparse type: an integer (range checks happen in the API, with its messages).

    Args:
        value: The command-line string.

    Returns:
        The integer (any sign; the API checks ranges).

    Raises:
        argparse.ArgumentTypeError: ``value`` is not an integer.
    """
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from err


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads a model.

    Args:
        parser: The subcommand's parser; gets ``--device`` and ``--dtype``.
    """
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default), bfloat16 or float16")


def add_analyze_parser(subparsers: Any) -> None:
    """Register ``analyze``.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.
    """
    p = subparsers.add_parser(
        "analyze", help="saturation layers of every position, and whether they are ordered",
        description="Find, for every position of a text, the layer at which each of the final "
                    "top-K tokens settles at its rank (s_k), and test whether s_1 < s_2 < ...",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="model spec: smollm2-135m (default), gemma3-270m, random:gpt2, "
                        "random:llama[?n_layers=..&seed=..], a local folder or a hub name")
    p.add_argument("--text", default=_DEFAULTS.text,
                   help="text source: shakespeare:<play> (default hamlet), a .txt file or "
                        "folder, hf:<dataset>[:<config>]:<split>:<column>, text:<literal>")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on text tokens (default: all)")
    p.add_argument("--top-k", type=positive_int, default=_DEFAULTS.top_k,
                   help="K, the number of final top tokens followed (default 5)")
    p.add_argument("--window", type=positive_int, default=None,
                   help="tokens per model input, BOS included (default 256, or the model's "
                        "context if shorter)")
    p.add_argument("--batch-tokens", type=positive_int, default=_DEFAULTS.batch_tokens,
                   help="tokens per forward batch, a memory bound (default 2048)")
    p.add_argument("--keep-fraction", type=float, default=_DEFAULTS.keep_fraction,
                   help="the paper's filter keeps s_1 <= floor(f*L) (default 0.85)")
    p.add_argument("--permutations", type=positive_int, default=_DEFAULTS.n_permutations,
                   help="shuffles in the permutation test (default 1000)")
    p.add_argument("--seed", type=positive_int, default=_DEFAULTS.seed,
                   help="seed of the permutation test (default 0)")
    p.add_argument("--screen", default=_DEFAULTS.screen, choices=["auto", "bf16", "none"],
                   help="bfloat16 screening of the lens (exact either way; default auto)")
    p.add_argument("--bos", default=_DEFAULTS.bos, choices=["auto", "none"],
                   help="prepend the tokenizer's BOS to each window (auto, default) or not")
    p.add_argument("--save-residuals", action="store_true",
                   help="also store every layer's residual stream (for `probe`)")
    p.add_argument("--residual-dtype", default=_DEFAULTS.residual_dtype,
                   choices=["float32", "float16", "bfloat16"])
    p.add_argument("--lens-window", type=positive_int, default=_DEFAULTS.lens_window,
                   help="window drawn in the logit-lens heatmap (default 0)")
    p.add_argument("--images", default=None,
                   help="vision models: sklearn:digits (default), sklearn:sample, or a folder "
                        "of .npy/image files")
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="vision models: cap on the number of images (default 256)")
    p.add_argument("--mlm-positions", default=None, choices=["masked", "all"],
                   help="masked LMs: decode masked positions (default) or every position")
    p.add_argument("--mask-rate", type=float, default=None,
                   help="masked LMs: share of positions masked per window (default 0.15)")
    p.add_argument("--out", default=None,
                   help="run folder to write (default runs/<model>_<text>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` from parsed arguments.

    Args:
        args: The parsed ``analyze`` arguments (``--out`` defaults to
            ``runs/<model slug>_<text slug>``).

    Returns:
        The exit code, 0; bad input raises a
        :class:`~probes.errors.TopkSaturationError` (the console script prints it and
        exits with 2).
    """
    out = Path(args.out) if args.out else Path("runs") / f"{slug(args.model)}_{slug(args.text)}"
    # Input options of masked, vision and encoder-decoder models, only where given.
    inputs = {name: getattr(args, name) for name in
              ("images", "max_images", "mlm_positions", "mask_rate")
              if getattr(args, name) is not None}
    result = analyze(
        args.model, args.text, out=out, device=args.device, dtype=args.dtype,
        progress=not args.quiet, max_tokens=args.max_tokens, top_k=args.top_k,
        window=args.window, batch_tokens=args.batch_tokens, keep_fraction=args.keep_fraction,
        n_permutations=args.permutations, seed=args.seed, screen=args.screen, bos=args.bos,
        save_residuals=args.save_residuals, residual_dtype=args.residual_dtype,
        lens_window=args.lens_window, **inputs,
    )
    print(format_analysis(result))
    return 0


def format_analysis(result: AnalysisResult) -> str:
    """The short stdout report of an analysis.

    Args:
        result: A finished (or loaded) analysis.

    Returns:
        Multi-line text: model, positions, kept share, a table of the order statistics of
        ``all`` and ``kept``, timings and the folder written.
    """
    s = result.summary
    k = s["top_k"]
    lines = [f"topk-saturation analyze: {s['model']} on {s['text']}"]
    lines.append(f"  {s['model_info']['weights']}; L = {s['n_layers']} layers")
    lines.append(f"  {s['n_positions']} positions in {s['n_windows']} windows; kept "
                 f"({s['keep_rule']}): {s['n_kept']} ({100 * s['kept_share']:.1f}%)")
    header = (f"  {'group':<6}{'scored':>8}{'mean tau':>10}{'null tau':>10}{'p':>9}"
              f"{'in order':>10}  mean s_1..s_{k}")
    lines.append(header)
    for group in ("all", "kept"):
        g = s[group]
        tau = "-" if g["mean_tau"] is None else f"{g['mean_tau']:.3f}"
        null = "-" if g["null_mean_tau"] is None else f"{g['null_mean_tau']:.3f}"
        p = "-" if g["p_value"] is None else f"{g['p_value']:.3g}"
        order = "-" if g["frac_in_order"] is None else f"{100 * g['frac_in_order']:.1f}%"
        mean_s = " ".join("-" if v is None else f"{v:.1f}" for v in g["mean_s"])
        lines.append(f"  {group:<6}{g['n_scored']:>8}{tau:>10}{null:>10}{p:>9}{order:>10}  "
                     f"{mean_s}")
    t = s["timings"]
    lines.append(f"  time: load {t['load_s']:.1f} s, forward {t['forward_s']:.1f} s, "
                 f"saturation {t['saturation_s']:.1f} s, total {t['total_s']:.1f} s")
    if result.run_dir is not None:
        lines.append(f"  wrote {result.run_dir}/: saturation.csv, summary.json, report.html")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compare


def add_compare_parser(subparsers: Any) -> None:
    """Register ``compare``.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.
    """
    from probes.arch_analysis import InputOptions

    inputs = InputOptions()
    p = subparsers.add_parser(
        "compare", help="analyze several models on the same input; one table and one figure",
        description="Run `analyze` for every model (reusing finished runs), then write "
                    "compare.csv, compare.html and compare.md: one row per model, untrained "
                    "models as the mean and spread over seeds.",
    )
    p.add_argument("--models", required=True,
                   help="comma-separated model specs, e.g. smollm2-135m,gemma3-270m,"
                        "random:gpt2,random:llama (also random:bert, random:vit, random:t5, "
                        "random:bart, local folders, hub names)")
    p.add_argument("--text", default=_DEFAULTS.text,
                   help="text source of the text models (default shakespeare:hamlet)")
    p.add_argument("--images", default=inputs.images,
                   help="image source of vision models: sklearn:digits (default), "
                        "sklearn:sample (needs Pillow), a folder or an image file")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on text tokens per model (default: all)")
    p.add_argument("--max-images", type=positive_int, default=inputs.max_images,
                   help=f"cap on images per vision model (default {inputs.max_images})")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="weight seeds per untrained random:... model (default 3)")
    p.add_argument("--top-k", type=positive_int, default=_DEFAULTS.top_k,
                   help="K, the number of final top tokens followed (default 5)")
    p.add_argument("--window", type=positive_int, default=None,
                   help="tokens per model input, special tokens included (default 256, or "
                        "the model's context if shorter)")
    p.add_argument("--batch-tokens", type=positive_int, default=_DEFAULTS.batch_tokens,
                   help="tokens per forward batch, a memory bound (default 2048)")
    p.add_argument("--keep-fraction", type=float, default=_DEFAULTS.keep_fraction,
                   help="the paper's filter keeps s_1 <= floor(f*L) (default 0.85)")
    p.add_argument("--permutations", type=positive_int, default=_DEFAULTS.n_permutations,
                   help="shuffles in each permutation test (default 1000)")
    p.add_argument("--seed", type=positive_int, default=_DEFAULTS.seed,
                   help="seed of the permutation tests and of MLM masking (default 0)")
    p.add_argument("--mlm-positions", default=inputs.mlm_positions, choices=["masked", "all"],
                   help="masked LMs: decode masked positions (default) or every position")
    p.add_argument("--mask-rate", type=float, default=inputs.mask_rate,
                   help=f"masked LMs: share of positions masked (default {inputs.mask_rate})")
    p.add_argument("--screen", default=_DEFAULTS.screen, choices=["auto", "bf16", "none"],
                   help="bfloat16 screening of the lens (exact either way; default auto)")
    p.add_argument("--out", default="runs/compare",
                   help="comparison folder (default runs/compare); runs go to OUT/runs/<slug>")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    add_model_options(p)
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """Run ``compare`` from parsed arguments.

    Args:
        args: The parsed ``compare`` arguments.

    Returns:
        The exit code, 0; bad input raises a
        :class:`~probes.errors.TopkSaturationError`.
    """
    from probes.compare import compare

    result = compare(
        args.models, args.text, max_tokens=args.max_tokens, out=Path(args.out),
        seeds=args.seeds, device=args.device, dtype=args.dtype, progress=not args.quiet,
        top_k=args.top_k, window=args.window, batch_tokens=args.batch_tokens,
        keep_fraction=args.keep_fraction, n_permutations=args.permutations, seed=args.seed,
        screen=args.screen, images=args.images, max_images=args.max_images,
        mlm_positions=args.mlm_positions, mask_rate=args.mask_rate,
    )
    print(f"topk-saturation compare: {len(result.table)} models, {len(result.runs)} runs "
          f"({int(result.runs['reused'].sum())} reused)")
    print(result.markdown())
    print(f"wrote {args.out}/: compare.csv, compare_runs.csv, compare.md, compare.html, "
          "runs/")
    return 0


def layer_or_fraction(value: str) -> int | float:
    """argparse type of ``--min-layer``: a block index (``5``) or a fraction of L (``0.2``).

    Args:
        value: The command-line string.

    Returns:
        An ``int`` where ``value`` parses as one, else a ``float`` (ranges are checked by
        :func:`probes.tasks.resolve_min_layer`).

    Raises:
        argparse.ArgumentTypeError: ``value`` is not a number.

    Example:
        >>> layer_or_fraction("5"), layer_or_fraction("0.25")
        (5, 0.25)
    """
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected a layer index or a fraction in (0, 1), got {value!r}") from err


def add_probe_parser(subparsers: Any) -> None:
    """Register ``probe``.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.
    """
    from probes.probe import BALANCE_MODES, SOLVERS
    from probes.probe_run import FEATURES, ProbeOptions
    from probes.tasks import LABEL_RULES

    defaults = ProbeOptions()
    p = subparsers.add_parser(
        "probe", help="logistic probes that read the current task from the residual stream",
        description="Label every (position, layer) state of an analysis run with its task "
                    "(task i between s_{i-1} and s_i), train StandardScaler + logistic "
                    "regression probes on the residual stream, and evaluate them with "
                    "cross-validation grouped by window, beside a layer-index-only "
                    "classifier, shuffled labels, random embeddings and the paper's leaky "
                    "KFold. Writes DIR/probe/.",
    )
    p.add_argument("--run", required=True, help="run folder written by `analyze`")
    p.add_argument("--label-rule", default=defaults.label_rule, choices=LABEL_RULES,
                   help="in-order (default: only positions with s_1 < ... < s_K) or count "
                        "(task = 1 + ranks already settled, capped at K)")
    p.add_argument("--min-layer", type=layer_or_fraction, default=defaults.min_layer,
                   help="first layer labelled: a block index (default 5) or a fraction of "
                        "L in (0, 1), meaning floor(fraction * L)")
    p.add_argument("--per-layer", action="store_true",
                   help="also train and cross-validate one probe per layer")
    p.add_argument("--folds", type=positive_int, default=defaults.folds,
                   help="cross-validation folds, grouped by window (default 5)")
    p.add_argument("--seed", type=positive_int, default=defaults.seed,
                   help="seed of every random draw (default 0)")
    p.add_argument("--features", default=defaults.features, choices=FEATURES,
                   help="raw residual stream (default) or normed (after the final norm)")
    p.add_argument("--balance", default=defaults.balance, choices=BALANCE_MODES,
                   help="class balancing: weights (default), truncate (the paper's) or none")
    p.add_argument("--C", type=float, default=defaults.C, dest="C",
                   help="inverse L2 strength of the probe (default 1)")
    p.add_argument("--max-iter", type=positive_int, default=defaults.max_iter,
                   help="most solver iterations per fit (default 1000)")
    p.add_argument("--solver", default=defaults.solver, choices=SOLVERS,
                   help="whitened-lbfgs (default) or sklearn-lbfgs (scikit-learn's own)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="number of tasks K (default: the run's K)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_options(p)
    p.set_defaults(func=run_probe_command)


def run_probe_command(args: argparse.Namespace) -> int:
    """Run ``probe`` from parsed arguments.

    Args:
        args: The parsed ``probe`` arguments.

    Returns:
        The exit code, 0; bad input raises a
        :class:`~probes.errors.TopkSaturationError`.
    """
    from probes.probe_run import format_probe, run_probe

    result = run_probe(
        args.run, label_rule=args.label_rule, min_layer=args.min_layer,
        per_layer=args.per_layer, folds=args.folds, seed=args.seed, features=args.features,
        device=args.device, dtype=args.dtype, progress=not args.quiet, balance=args.balance,
        C=args.C, max_iter=args.max_iter, solver=args.solver, top_k=args.top_k,
    )
    print(format_probe(result))
    return 0
