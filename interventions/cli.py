"""Command-line subcommands of the ``interventions`` package: ``intervene`` (and
``early-exit``). Each is a thin layer over the Python API of the same name."""

from __future__ import annotations

import argparse
from typing import Any

from probes.errors import InvalidOptionError


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from err


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from err


def _number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err


def add_intervene_parser(subparsers: Any) -> None:
    """Register ``intervene``.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.
    """
    from interventions.intervene import DEFAULT_ALPHAS

    p = subparsers.add_parser(
        "intervene", help="steer with task directions, or patch across positions",
        description="Causal tests of the task picture on an analyze run: push positions from "
                    "task k to k+1 with a task direction and measure the rank shift against "
                    "random directions (direction), or patch an early-saturating position's "
                    "state into a late one (patch).",
    )
    p.add_argument("--run", required=True, help="the analyze run folder")
    p.add_argument("--method", default="direction", choices=["direction", "patch"])
    p.add_argument("--layers", type=_int_list, default=None,
                   help="comma-separated 0-based layers to steer (default: the layer with the "
                        "most balanced task k / k+1 states)")
    p.add_argument("--alphas", type=_float_list, default=list(DEFAULT_ALPHAS),
                   help="steering strengths in multiples of the typical residual norm "
                        f"(default {','.join(map(str, DEFAULT_ALPHAS))})")
    p.add_argument("--source", default="means", choices=["probe", "means"],
                   help="direction from class means (default) or from the run's probe")
    p.add_argument("--k", type=int, default=1, help="steer from task k to k+1 (default 1)")
    p.add_argument("--label-rule", default="count", choices=["in-order", "count"],
                   help="which positions are in task k (default count: every position is "
                        "labelled; in-order keeps only s_1 < ... < s_K)")
    p.add_argument("--min-layer", type=_number, default=None,
                   help="direction: first labelled layer (default 5); patch: least s_1 of "
                        "both positions (default 10, or L/3 if smaller); an int or a "
                        "fraction of L")
    p.add_argument("--random", type=int, default=10, dest="n_random",
                   help="random control directions (default 10)")
    p.add_argument("--max-positions", type=int, default=200,
                   help="positions steered per layer, sampled when more qualify (default 200)")
    p.add_argument("--min-gap", type=_number, default=None,
                   help="patch pairs: least s_1 difference (default 10, or L/3 if smaller)")
    p.add_argument("--span", type=int, default=5, help="patch layers s_e-span..s_e+span")
    p.add_argument("--max-pairs", type=int, default=200, help="patch pairs used (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_intervene_cmd)


def _thresholds(text: str) -> tuple[str, list[float | None]]:
    policy, sep, values = text.partition("=")
    if not sep or not policy:
        raise argparse.ArgumentTypeError(f"expected POLICY=v1,v2,..., got {text!r}")
    try:
        grid = [None if v.strip().lower() == "argmax" else float(v)
                for v in values.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"thresholds must be numbers, got {values!r}") from err
    return policy.strip(), grid


def add_early_exit_parser(subparsers: Any) -> None:
    """Register ``early-exit``.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.
    """
    from interventions.early_exit import POLICIES

    p = subparsers.add_parser(
        "early-exit", help="token-level early exit from the task probe, against baselines",
        description="Exit each position at the first layer where a policy says its top-1 is "
                    "fixed, and measure accuracy, consistency with the full model and speedup "
                    "on windows the probe never saw.",
    )
    p.add_argument("--run", required=True, help="the analyze run folder (with DIR/probe)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated, from {','.join(POLICIES)} (default: all)")
    p.add_argument("--thresholds", type=_thresholds, action="append", default=[],
                   metavar="POLICY=V1,V2", help="replace a policy's threshold sweep (repeat "
                   "per policy; 'argmax' is the probe's argmax rule)")
    p.add_argument("--train-fraction", type=float, default=0.5,
                   help="share of windows that train the probe (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window split")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_early_exit_cmd)


def run_early_exit_cmd(args: argparse.Namespace) -> int:
    """Run ``early-exit`` from parsed arguments.

    Args:
        args: The parsed ``early-exit`` arguments.

    Returns:
        The exit code, 0.

    Raises:
        InvalidOptionError: ``--thresholds`` names a policy not in ``--policies`` (other bad
            input raises from :func:`interventions.early_exit.run_early_exit`).
    """
    from interventions.early_exit import run_early_exit

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    thresholds = dict(args.thresholds)
    unknown = set(thresholds) - set(policies)
    if unknown:
        raise InvalidOptionError(
            f"thresholds given for policies not asked for: {', '.join(sorted(unknown))}")
    result = run_early_exit(args.run, policies, thresholds, train_fraction=args.train_fraction,
                            seed=args.seed, progress=not args.quiet)
    print(format_early_exit(result, args.run))
    return 0


def format_early_exit(result: Any, run_dir: str) -> str:
    """The short stdout report of an early-exit evaluation.

    Args:
        result: The :class:`~interventions.early_exit.EarlyExitResult`.
        run_dir: The run folder, named in the last line.

    Returns:
        Multi-line text: the split, the full model's accuracy, each policy's best speedup at
        consistency >= 0.95 and >= 0.99, the time and the files written.
    """
    s = result.summary
    lines = [f"topk-saturation early-exit: {s['model']}, L = {s['n_layers']}, "
             f"{s['n_positions']} held-out positions",
             f"  split: {s['split']['rule']}"]
    if s.get("full_model_accuracy") is not None:
        lines.append(f"  full model: next-token accuracy {100 * s['full_model_accuracy']:.1f}%")
    lines.append(f"  {'policy':<9}{'speedup @ consistency >= 0.95':>32}{'@ >= 0.99':>24}")
    for policy, best in s["best_speedup"].items():
        cells = []
        for level in ("0.95", "0.99"):
            b = best.get(f"consistency_{level}")
            cells.append("-" if b is None else f"x{b['speedup']:.2f} (t={b['threshold']})")
        lines.append(f"  {policy:<9}{cells[0]:>32}{cells[1]:>24}")
    lines.append(f"  time {s['seconds']:.1f} s; wrote {run_dir}/early_exit/results.csv, "
                 "summary.json, report.html")
    return "\n".join(lines)


def run_intervene_cmd(args: argparse.Namespace) -> int:
    """Run ``intervene`` from parsed arguments.

    Args:
        args: The parsed ``intervene`` arguments.

    Returns:
        The exit code, 0.

    Raises:
        InvalidOptionError: ``--random``, ``--max-positions`` or ``--max-pairs`` below 1 (other
            bad input raises from :func:`interventions.intervene.run_intervene`).
    """
    from interventions.intervene import run_intervene

    if args.n_random < 1:
        raise InvalidOptionError("--random must be at least 1")
    if args.max_positions < 1 or args.max_pairs < 1:
        raise InvalidOptionError("--max-positions and --max-pairs must be at least 1")
    result = run_intervene(
        args.run, args.method, layers=args.layers, alphas=args.alphas, source=args.source,
        k=args.k, label_rule=args.label_rule, min_layer=args.min_layer, n_random=args.n_random,
        max_positions=args.max_positions, min_gap=args.min_gap, span=args.span,
        max_pairs=args.max_pairs, seed=args.seed, progress=not args.quiet,
    )
    print(format_intervention(result, args.run))
    return 0


def format_intervention(result: Any, run_dir: str) -> str:
    """The short stdout report of an intervention.

    Args:
        result: The :class:`~interventions.intervene.InterventionResult`.
        run_dir: The run folder, named in the last line.

    Returns:
        Multi-line text: for ``patch`` a table of success rates per layer offset with their
        CIs and the random control; for ``direction`` one table of switch rates per alpha
        and layer with the reversed and random controls; then the time and the files.
    """
    s = result.summary
    lines = [f"topk-saturation intervene --method {result.method}: {s['model']}"]
    if result.method == "patch":
        lines.append(f"  pairs: {s['n_pairs']} used of {s['n_pairs_found']} found; success = "
                     f"{s['success_rule']}")
        lines.append(f"  {'l - s_e':>8}{'n':>6}{'success':>10}{'95% CI':>16}{'control':>10}")
        for e in s["per_offset"]:
            ci = e.get("ci") or [None, None]
            ctrl = e.get("random_control", {}).get("switch_rate")
            lines.append(f"  {e['offset']:>+8d}{e.get('n', 0):>6}{_pct(e.get('switch_rate')):>10}"
                         f"{_ci(ci):>16}{_pct(ctrl):>10}")
    else:
        lines.append(f"  direction from {s['source']}, task {s['k']} -> {s['k'] + 1}, "
                     f"{s['label_rule']} labels, alpha in {s['alpha_unit']}")
        for layer, block in s["layers"].items():
            lines.append(f"  layer {layer}: {block['n_positions_steered']} positions steered "
                         f"(of {block['n_positions_in_task']} in task {s['k']})")
            lines.append(f"  {'alpha':>8}{'switch':>9}{'95% CI':>16}{'reversed':>10}"
                         f"{'random':>9}{'random CI':>16}{'top-1 rank':>12}")
            for e in block["per_alpha"]:
                rnd = e.get("random_control", {})
                rev = e.get("reversed_control", {})
                lines.append(
                    f"  {e['alpha']:>8.3g}{_pct(e.get('switch_rate')):>9}{_ci(e.get('ci')):>16}"
                    f"{_pct(rev.get('switch_rate')):>10}{_pct(rnd.get('switch_rate')):>9}"
                    f"{_ci(rnd.get('ci')):>16}{_num(e.get('mean_top1_rank')):>12}")
    lines.append(f"  time {s['seconds']:.1f} s; wrote {run_dir}/interventions/{result.method}"
                 ".csv, .json, .html")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ci(ci: list[float | None] | None) -> str:
    if not ci or ci[0] is None:
        return "-"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
