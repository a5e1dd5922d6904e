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
    """argparse type: an integer (range checks happen in the API, with its messages)."""
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from err


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads a model."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default), bfloat16 or float16")


def add_analyze_parser(subparsers: Any) -> None:
    """Register ``analyze``."""
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
    p.add_argument("--out", default=None,
                   help="run folder to write (default runs/<model>_<text>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` from parsed arguments."""
    out = Path(args.out) if args.out else Path("runs") / f"{slug(args.model)}_{slug(args.text)}"
    result = analyze(
        args.model, args.text, out=out, device=args.device, dtype=args.dtype,
        progress=not args.quiet, max_tokens=args.max_tokens, top_k=args.top_k,
        window=args.window, batch_tokens=args.batch_tokens, keep_fraction=args.keep_fraction,
        n_permutations=args.permutations, seed=args.seed, screen=args.screen, bos=args.bos,
        save_residuals=args.save_residuals, residual_dtype=args.residual_dtype,
        lens_window=args.lens_window,
    )
    print(format_analysis(result))
    return 0


def format_analysis(result: AnalysisResult) -> str:
    """The short stdout report of an analysis."""
    s = result.summary
    k = s["top_k"]
    lines = [f"topk-saturation analyze: {s['model']} on {s['text']}"]
    lines.append(f"  {s['model_info']['weights']}; L = {s['n_layers']} layers")
    lines.append(f"  {s['n_positions']} positions in {s['n_windows']} windows; kept "
                 f"({s['keep_rule']}): {s['n_kept']} ({100 * s['kept_share']:.1f}%)")
    header = f"  {'group':<6}{'scored':>8}{'mean tau':>10}{'p':>9}{'in order':>10}  mean s_1..s_{k}"
    lines.append(header)
    for group in ("all", "kept"):
        g = s[group]
        tau = "-" if g["mean_tau"] is None else f"{g['mean_tau']:.3f}"
        p = "-" if g["p_value"] is None else f"{g['p_value']:.3g}"
        order = "-" if g["frac_in_order"] is None else f"{100 * g['frac_in_order']:.1f}%"
        mean_s = " ".join("-" if v is None else f"{v:.1f}" for v in g["mean_s"])
        lines.append(f"  {group:<6}{g['n_scored']:>8}{tau:>10}{p:>9}{order:>10}  {mean_s}")
    t = s["timings"]
    lines.append(f"  time: load {t['load_s']:.1f} s, forward {t['forward_s']:.1f} s, "
                 f"saturation {t['saturation_s']:.1f} s, total {t['total_s']:.1f} s")
    if result.run_dir is not None:
        lines.append(f"  wrote {result.run_dir}/: saturation.csv, summary.json, report.html")
    return "\n".join(lines)
