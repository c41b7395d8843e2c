"""Predicted vs measured whole-model latency of pruned AST-base models: how good the latency model is.

    python -m benchmarks.latency_model [--quick] [--table FILE] [--threads 1]    |    ... --from-json FILE

Profiles this machine first (`prune_core.latency_model.profile`, or reads `--table`), then prunes a
random-weight AST-base (`ASTConfig()` sizes) one-shot by every granularity (magnitude scores, global
threshold) to each target sparsity and times every model, the dense one included, round-robin over all
models and input shapes in one loop (a model whose spread is large is timed again alone). Error =
predicted / measured - 1; target: median |error| <= 5%, 90th percentile <= 10%. Beside it, the error of
the predicted speedup over dense, which a change of the machine's speed between profiling and timing
(other jobs on a shared machine) does not move.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from benchmarks.common import (RESULTS, add_from_json, comma_list, environment, log, markdown_table, paired_median,
                               print_from_json, write_results)
from prune_core import attention_sites, attention_sparsity, prune
from prune_core.latency_model import (QUICK, ASTShape, load_table, measure_interleaved, predicted_latency,
                                      predicted_speedup, profile, save_table)

GRANULARITY_NAMES = ("entire_head", "per_head", "same_channel", "variable_per_head", "hybrid")
SPARSITIES = (0.1, 0.3, 0.5, 0.7)
SCORER, THRESHOLD = "magnitude", "global"
DENSE = "dense"
TARGET_MEDIAN, TARGET_P90 = 0.05, 0.10
CLOCKS = {"cpu": "times are the thread's CPU time", "wall": "times are wall-clock"}
INPUTS = "146x1,146x8,1214x1"  # tokens x batch: SpeechCommands at batch 1 and 8, AudioSet at batch 1
QUICK_SHAPE = ASTShape(**{key: QUICK[key] for key in ("hidden_size", "num_heads", "num_layers", "intermediate_size",
                                                      "num_mel_bins", "num_labels")})
QUICK_ARGS = {"inputs": "8x1,8x2", "sparsities": "0.3,0.7", "rounds": 3, "profile_rounds": QUICK["rounds"],
              "min_sample_s": QUICK["min_sample_s"]}


def share_unpruned(pruned: nn.Module, dense: nn.Module) -> nn.Module:
    """Point every parameter of `pruned` outside its attention layers at `dense`'s: the models of one input
    size then hold one copy of everything pruning leaves alone (memory), as a deployed model would."""
    attention = [site.path + "." for site in attention_sites(pruned)]
    own = dict(dense.named_parameters())
    for name, _ in list(pruned.named_parameters()):
        if not name.startswith(tuple(attention)):
            module, _, attribute = name.rpartition(".")
            setattr(pruned.get_submodule(module), attribute, own[name])
    return pruned


def build_models(shape: ASTShape, tokens: int, granularities: list[str],
                 sparsities: list[float]) -> dict[tuple, nn.Module]:
    """The dense AST at `tokens` tokens and its one-shot pruned copies, keyed (granularity, target)."""
    torch.manual_seed(0)
    dense = transformers.ASTForAudioClassification(shape.config(tokens)).eval()
    attention_sites(dense)
    models = {(DENSE, 0.0): dense}
    for granularity in granularities:
        for target in sparsities:
            pruned = prune(copy.deepcopy(dense), granularity=granularity, scorer=SCORER, threshold=THRESHOLD,
                           amount=target)
            models[granularity, target] = share_unpruned(pruned, dense).eval()
    return models


def layer_summary(model: nn.Module) -> dict:
    shapes = [site.shape for site in attention_sites(model)]
    return {"heads": [s.num_heads for s in shapes], "ragged_layers": sum(not s.is_uniform for s in shapes),
            "qk_channels": [sum(s.qk_dims) for s in shapes], "v_channels": [sum(s.v_dims) for s in shapes]}


def errors_summary(points: list[dict]) -> dict:
    """Median, 90th percentile (inclusive, linear) and max of |error| and of |speedup error| over `points`."""
    summary = {"points": len(points)}
    for key in ("error", "speedup_error"):
        errors = sorted(abs(p[key]) for p in points)
        p90 = statistics.quantiles(errors, n=10, method="inclusive")[8] if len(errors) > 1 else errors[0]
        summary |= {f"median_abs_{key}": statistics.median(errors), f"p90_abs_{key}": p90,
                    f"max_abs_{key}": errors[-1]}
    return summary


def interleaved_samples(stats: dict) -> list[float]:
    """The samples of the round-robin, also for a call measured again alone (pairs with the other calls' rounds)."""
    return stats.get("interleaved", stats)["samples"]


def run(args: argparse.Namespace) -> dict:
    shape = QUICK_SHAPE if args.quick else ASTShape()
    inputs: dict[int, list[int]] = {}
    for tokens, batch in args.inputs:
        inputs.setdefault(tokens, []).append(batch)
    started = time.perf_counter()
    results = {"environment": environment("cpu"), "settings": {
        "quick": args.quick, "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
        "profile_rounds": args.profile_rounds,
        "granularities": args.granularities, "sparsities": args.sparsities, "scorer": SCORER, "threshold": THRESHOLD,
        "architecture": dataclasses.asdict(shape), "inputs": {str(t): list(b) for t, b in inputs.items()}}}
    results["loadavg_1min"] = {"start": os.getloadavg()[0]}
    if args.table:
        table = load_table(args.table)
        if table["clock"] != args.clock:
            raise SystemExit(f"error: --table {args.table} holds {table['clock']} times, this run measures "
                             f"--clock {args.clock}")
    else:
        log(f"profiling ({args.profile_rounds} rounds, {args.threads} threads) ...")
        grid = {"rounds": args.profile_rounds, **({"min_sample_s": QUICK["min_sample_s"]} if args.quick else {})}
        table = profile("cpu", sorted(inputs), sorted({b for bs in inputs.values() for b in bs}), shape.hidden_size,
                        num_heads=shape.num_heads, num_layers=shape.num_layers,
                        intermediate_size=shape.intermediate_size, num_mel_bins=shape.num_mel_bins,
                        num_labels=shape.num_labels, threads=args.threads, clock=args.clock, progress=log, **grid)
        if args.save_table:
            save_table(table, args.save_table)
    results["table"] = table
    results["loadavg_1min"]["after_profile"] = os.getloadavg()[0]
    log(f"table: {table['profiled']['wall_s']:.0f} s, padding weights {padding_weights(table)}")
    calls, points = {}, {}
    for tokens, batches in inputs.items():
        models = build_models(shape, tokens, args.granularities, args.sparsities)
        frames = models[DENSE, 0.0].config.max_length
        for batch in batches:
            features = torch.randn(batch, frames, shape.num_mel_bins)
            for (granularity, target), model in models.items():
                name = f"{tokens}x{batch} {granularity} {target}"
                calls[name] = (lambda m=model, x=features: m(input_values=x))
                points[name] = {"tokens": tokens, "batch": batch, "granularity": granularity, "target_sparsity": target,
                                "attention_sparsity": attention_sparsity(model), **layer_summary(model),
                                "predicted_ms": predicted_latency(model, table, tokens=tokens, batch=batch),
                                "predicted_speedup": predicted_speedup(model, table, tokens, batch)}
    log(f"timing {len(calls)} models x inputs, {args.rounds} interleaved rounds ...")
    stats = measure_interleaved(calls, rounds=args.rounds, min_sample_s=args.min_sample_s, clock=args.clock,
                                progress=log)
    for name, point in points.items():
        measured = stats[name]
        dense = interleaved_samples(stats[f"{point['tokens']}x{point['batch']} {DENSE} 0.0"])
        speedup = paired_median(dense, interleaved_samples(measured))
        point.update(measured=measured, error=point["predicted_ms"] / measured["ms"] - 1, measured_speedup=speedup,
                     speedup_error=point["predicted_speedup"] / speedup - 1)
    results["points"] = list(points.values())
    pruned = [p for p in results["points"] if p["granularity"] != DENSE]
    pairs = sorted({(p["tokens"], p["batch"]) for p in pruned})
    results["summary"] = {
        "by_input": [{"tokens": t, "batch": b,
                      **errors_summary([p for p in pruned if (p["tokens"], p["batch"]) == (t, b)])} for t, b in pairs],
        "overall": errors_summary(pruned),
        "by_granularity": {g: errors_summary([p for p in pruned if p["granularity"] == g]) for g in args.granularities},
    }
    results["loadavg_1min"]["end"] = os.getloadavg()[0]
    results["environment"]["wall_s"] = time.perf_counter() - started
    return results


def padding_weights(table: dict) -> str:
    return ", ".join(f"{p['padding_weight']:.2f} at {p['tokens']}x{p['batch']}" for p in table["parts"])


def percent(x: float) -> str:
    return f"{x:+.1%}" if x else "0.0%"


def markdown(results: dict) -> str:
    """The summary per input, per granularity and overall, then every model."""
    env, table, summary = results["environment"], results["table"], results["summary"]
    load, overall = results["loadavg_1min"], summary["overall"]
    ok = overall["median_abs_error"] <= TARGET_MEDIAN and overall["p90_abs_error"] <= TARGET_P90
    dense = {(p["tokens"], p["batch"]): p for p in results["points"] if p["granularity"] == DENSE}
    drift = ", ".join(f"{percent(p['measured']['ms'] / part['anchors'][0]['ms'] - 1)} at {t}x{b}"
                      for part in table["parts"] for (t, b), p in dense.items()
                      if (part["tokens"], part["batch"]) == (t, b))
    columns = ("median |error|", "p90 |error|", "max |error|", "median |speedup error|", "p90 |speedup error|")

    def figures(s: dict, bold: bool = False) -> tuple:
        mark = "**" if bold else ""
        return (f"{mark}{s['median_abs_error']:.1%}{mark}", f"{mark}{s['p90_abs_error']:.1%}{mark}",
                f"{s['max_abs_error']:.1%}", f"{s['median_abs_speedup_error']:.1%}",
                f"{s['p90_abs_speedup_error']:.1%}")

    lines = [
        f"{env['device_name']} ({results['settings']['threads']} torch thread(s), "
        f"{CLOCKS[results['settings']['clock']]}), torch {env['torch']}, {env['date'][:10]}, "
        f"{env['wall_s'] / 60:.0f} min in all; table profiled first in {table['profiled']['wall_s'] / 60:.1f} min "
        f"({table['profiled']['cells']} cells, {table['settings']['rounds']} rounds, worst spread "
        f"{table['profiled']['worst_spread']:.0%}, {table['profiled']['remeasured']} re-measured alone, ragged padding "
        f"weight {padding_weights(table)}); then every model timed in {results['settings']['rounds']} interleaved "
        f"rounds; 1-min load average {load['start']:.1f} / {load['after_profile']:.1f} / {load['end']:.1f} (start / "
        f"after profiling / end) on {env['cpu_count']} cores. The dense model measured {drift} against the table's "
        f"dense time: how far the machine's speed moved between profiling and timing. Error = predicted / measured "
        f"time - 1; speedup error = predicted / measured speedup over dense - 1 (measured: median of per-round "
        f"ratios), which such a drift does not move. Over the pruned models ({SCORER} scores, {THRESHOLD} "
        f"threshold); target median |error| <= {TARGET_MEDIAN:.0%} and p90 <= {TARGET_P90:.0%}: "
        f"{'met' if ok else 'missed'}.",
        "",
        *markdown_table(("tokens", "batch", "models", *columns),
                        [(s["tokens"], s["batch"], s["points"], *figures(s)) for s in summary["by_input"]]
                        + [("all", "", overall["points"], *figures(overall, bold=True))]),
        "",
        *markdown_table(("granularity", "models", *columns),
                        [(g, s["points"], *figures(s)) for g, s in summary["by_granularity"].items()]),
        "",
        *markdown_table(
            ("tokens", "batch", "granularity", "sparsity", "ragged layers", "measured ms", "q1-q3 ms", "predicted ms",
             "error", "measured speedup", "predicted speedup", "speedup error"),
            [(p["tokens"], p["batch"], p["granularity"], f"{p['attention_sparsity']:.1%}", p["ragged_layers"],
              f"{p['measured']['ms']:.1f}", f"{p['measured']['q1']:.1f}-{p['measured']['q3']:.1f}"
              + (" (alone)" if p["measured"].get("remeasured") else ""), f"{p['predicted_ms']:.1f}",
              percent(p["error"]), f"{p['measured_speedup']:.3f}x", f"{p['predicted_speedup']:.3f}x",
              percent(p["speedup_error"])) for p in results["points"]]),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the tests' tiny AST, 8 tokens at batch 1 "
                        "and 2, 30%% and 70%%, 3 rounds (default --out ...-quick.json)")
    parser.add_argument("--table", type=Path, help="a latency table to use instead of profiling first")
    parser.add_argument("--save-table", type=Path, help="also write the table profiled here to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for profiling and timing (default 1: on a shared machine, the steadiest)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="what is timed: the thread's CPU time (default; needs --threads 1: steady on a machine "
                             "others load), or wall time (a quiet machine)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model")
    parser.add_argument("--profile-rounds", type=int, default=7)
    parser.add_argument("--min-sample-s", type=float, default=0.05, help="a timing sample repeats a forward this long")
    parser.add_argument("--inputs", default=INPUTS, help="comma-separated tokens x batch to time (and profile)")
    parser.add_argument("--granularities", default=",".join(GRANULARITY_NAMES))
    parser.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/latency_model-cpu.json)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK_ARGS.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    args.granularities, args.sparsities = comma_list(str, args.granularities), comma_list(float, args.sparsities)
    try:
        args.inputs = [tuple(int(n) for n in item.split("x")) for item in comma_list(str, args.inputs)]
    except ValueError:
        parser.error(f"--inputs {args.inputs!r}: expected tokens x batch pairs such as {INPUTS}")
    if any(len(pair) != 2 for pair in args.inputs):
        parser.error(f"--inputs: expected tokens x batch pairs such as {INPUTS}")
    unknown = [g for g in args.granularities if g not in GRANULARITY_NAMES]
    if unknown:
        parser.error(f"unknown granularity: {', '.join(unknown)} (known: {', '.join(GRANULARITY_NAMES)})")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times the calling thread: it needs --threads 1 (or use --clock wall)")
    args.out = args.out or RESULTS / f"latency_model-cpu{'-quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(args)
    finally:
        torch.set_num_threads(previous)
    write_results(results, args.out)
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
