"""Cost of every scorer on one calibration set, against one forward+backward pass over it (fisher <= 1.5x).

    python -m benchmarks.scoring_cost [--sizes demo,base-short] [--repeats 7]    |    ... --from-json FILE
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from benchmarks.common import (RESULTS, add_from_json, comma_list, environment, log, markdown_table, print_from_json,
                               rotated, write_results)
from benchmarks.latency import tokens_of
from prune_core import SCORERS, attention_params, attention_sites, build_ast, total_params
from prune_core.batches import Batch, default_loss, to_device

SIZES: dict[str, dict] = {
    # the model `make demo` trains: search/baseline.py BaselineConfig defaults (mirrored to keep Ray out of
    # this benchmark; tests/test_benchmarks_smoke.py checks they agree), features as search/demo.py
    # prepares them, 10 spoken commands; 47 tokens
    "demo": {"model": {"num_labels": 10, "hidden_size": 96, "num_layers": 5, "num_heads": 6, "intermediate_size": 384,
                       "num_mel_bins": 64, "max_length": 100},
             "calibration": (4, 16)},
    # AST-base widths and depth on 0.32 s of audio (26 tokens), so that it fits a 2-core CPU's time
    "base-short": {"model": {"num_labels": 35, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                             "intermediate_size": 3072, "num_mel_bins": 128, "max_length": 32},
                   "calibration": (2, 4)},
}
FORWARD, REFERENCE = "fwd", "fwd_bwd"
# One torch thread by default: the ratios are of work done, and on a shared 2-core machine a second thread waits for
# the first at every op (2 threads beside two busy processes: samples of one pass 10x apart; 1 thread: within 10%).
THREADS = 1
FISHER_LIMIT = 1.5  # fisher may cost this many forward+backward passes over the calibration set
REFERENCE_NOTE = ("fwd_bwd: per batch, zero_grad(set_to_none) then default_loss(model, batch).backward() with every "
                  "parameter requiring grad, the cost of a training step without the optimizer; fwd: the same "
                  "forwards under no_grad. Eval mode for all, as the gradient scorers set it. Scorers are called as "
                  "plan_pruning calls them: SCORERS[name](model, attention_sites(model), batches, default_loss), "
                  "scores moved to the CPU.")


def calibration_set(config: transformers.ASTConfig, batches: int, batch_size: int, seed: int,
                    device: torch.device) -> list[Batch]:
    """`batches` random batches of log-mel frames with random labels, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [
        to_device({
            "input_values": torch.randn(batch_size, config.max_length, config.num_mel_bins, generator=generator),
            "labels": torch.randint(0, config.num_labels, (batch_size,), generator=generator),
        }, device)
        for _ in range(batches)
    ]


def passes(model: nn.Module, calib: list[Batch]) -> dict[str, Callable[[], None]]:
    """What is timed, by name: each runs once over the whole calibration set."""
    sites = attention_sites(model)

    def forward() -> None:
        with torch.no_grad():
            for batch in calib:
                default_loss(model, batch)

    def forward_backward() -> None:
        for batch in calib:
            model.zero_grad(set_to_none=True)
            default_loss(model, batch).backward()

    def scorer(name: str) -> Callable[[], None]:
        def score() -> None:
            for layer in SCORERS[name](model, sites, calib, default_loss):
                for scores in (layer.qk, layer.vo, layer.head):
                    scores.detach().cpu()

        return score

    return {FORWARD: forward, REFERENCE: forward_backward, **{name: scorer(name) for name in SCORERS}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def measure(model: nn.Module, calib: list[Batch], *, repeats: int, warmup: int) -> dict:
    """Interleaved timing of every pass (the start rotates each round, so machine noise hits all alike).

    Returns per pass the median, min and samples in seconds and the median's ratio to the forward+backward
    median, and whether fisher stays within `FISHER_LIMIT` of it.
    """
    device = next(model.parameters()).device
    model.eval()
    runs = passes(model, calib)
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            samples[name].append(seconds(runs[name], device))
    reference = statistics.median(samples[REFERENCE])
    timings = {
        name: {"median_s": statistics.median(s), "min_s": min(s), "ratio_to_fwd_bwd": statistics.median(s) / reference,
               "samples_s": s}
        for name, s in samples.items()
    }
    return {"timings": timings, "fisher_within_1_5x": timings["fisher"]["ratio_to_fwd_bwd"] <= FISHER_LIMIT}


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One model size: built with a fixed seed, timed on its calibration set."""
    torch.manual_seed(args.seed)
    model = build_ast(**SIZES[size]["model"]).to(device)
    batches, batch_size = args.calibration or SIZES[size]["calibration"]
    calib = calibration_set(model.config, batches, batch_size, args.seed, device)
    before = os.getloadavg()[0]
    result = measure(model, calib, repeats=args.repeats, warmup=args.warmup)
    return {
        "size": size, "model": SIZES[size]["model"], "tokens": tokens_of(model), "params": total_params(model),
        "attention_params": attention_params(model), "batches": batches, "batch_size": batch_size, **result,
        "loadavg_1min": {"before": before, "after": os.getloadavg()[0]},
    }


def cells(result: dict, others: list[str]) -> tuple:
    """One size: its fwd+bwd seconds, then every other pass as a multiple of them."""
    timings = result["timings"]
    flag = "" if result["fisher_within_1_5x"] else " (!)"
    return (result["size"], result["tokens"], f"{result['params']:,}", f"{result['batches']} x {result['batch_size']}",
            f"{timings[REFERENCE]['median_s']:.3f}",
            *(f"{timings[name]['ratio_to_fwd_bwd']:.2f}x" + (flag if name == "fisher" else "") for name in others))


def markdown(results: dict) -> str:
    """One row per size, every pass's median as a multiple of the forward+backward median, under a line saying
    where and how it was measured."""
    env, sizes = results["environment"], results["sizes"]
    load = max((s["loadavg_1min"]["after"] for s in sizes), default=0.0)
    verdict = "yes" if results["fisher_within_1_5x"] else "NO"
    others = [name for name in (sizes[0]["timings"] if sizes else ()) if name != REFERENCE]
    header = ("size", "tokens", "parameters", "calibration", "fwd+bwd s", *others)
    return "\n".join([
        f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}, "
        f"{env['date'][:10]}; {results['settings']['repeats']} interleaved rounds, medians; highest 1-min load "
        f"average {load:.1f} on {env['cpu_count']} cores; fisher within {FISHER_LIMIT}x of fwd+bwd: {verdict}.",
        "",
        *markdown_table(header, [cells(size, others) for size in sizes]),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--batches", type=int, help="calibration batches (default per size: "
                        + ", ".join(f"{s} {c['calibration'][0]}" for s, c in SIZES.items()) + ")")
    parser.add_argument("--batch-size", type=int, help="samples per calibration batch (default per size: "
                        + ", ".join(f"{s} {c['calibration'][1]}" for s, c in SIZES.items()) + ")")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over every pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0, help="model weights and calibration set")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path,
                        help="JSON results (default: benchmarks/results/scoring_cost-<device>.json)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.sizes = comma_list(str, args.sizes)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        parser.error(f"unknown size: {', '.join(unknown)}" if unknown else "--sizes names no size")
    if (args.batches is None) != (args.batch_size is None):
        parser.error("--batches and --batch-size go together")
    args.calibration = (args.batches, args.batch_size) if args.batches is not None else None
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1, --warmup at least 0")
    args.out = args.out or RESULTS / f"scoring_cost-{args.device}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "from_json", "device",
                                                                                 "calibration")}
    results = {"environment": environment(args.device), "settings": {**settings, "fisher_limit": FISHER_LIMIT,
                                                               "reference": REFERENCE_NOTE},
               "sizes": [], "fisher_within_1_5x": True}
    start = time.perf_counter()
    for size in args.sizes:
        results["sizes"].append(bench_size(size, args, device))
        results["fisher_within_1_5x"] = all(s["fisher_within_1_5x"] for s in results["sizes"])
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
        log(f"{size}: " + ", ".join(f"{name} {t['ratio_to_fwd_bwd']:.2f}x"
                                    for name, t in results["sizes"][-1]["timings"].items()))
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
