"""Latency of removing whole attention blocks (depth) vs the same attention parameters as heads or channels (width).

    python -m benchmarks.depth_vs_width [--quick]    |    python -m benchmarks.depth_vs_width --from-json FILE

On AST-base shapes with random weights, k of the 12 attention layers are made headless (`blocks`:
`prune(..., min_heads=0)`, entire_head, magnitude, global; the weights of the last k layers are scaled
down first so that their heads score lowest), and the same number of attention parameters is removed
two other ways: entire heads spread evenly over all layers (`heads`: entire_head, local, k heads per
layer) and per_head channels (`channels`: per_head, local, k/12 of every head's QK and VO channels). The
three remove the same parameters and the same MACs; the question is which runs faster. Every model of a
size is timed side by side, round by round, with `benchmarks/latency.py`'s interleaved harness.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (RESULTS, add_from_json, comma_list, environment, log, markdown_table, paired_median,
                               print_from_json, write_results)
from benchmarks.latency import SIZES as LATENCY_SIZES
from benchmarks.latency import time_interleaved, tokens_of
from prune_core import attention_params, attention_sites, attention_sparsity, build_ast, macs_per_sample, prune

SIZES: dict[str, dict[str, int]] = {name: LATENCY_SIZES[name] for name in ("base-sc", "base-as")}  # 146, 1,214 tokens
POINTS = "base-sc:1,base-sc:8,base-as:1"  # size:batch; 1,214 tokens at batch 8 is too slow for 2 cores
KS = (3, 6)
DENSE = "dense"
VARIANTS = {  # name -> (granularity, threshold, min_heads)
    "blocks": ("entire_head", "global", 0),
    "heads": ("entire_head", "local", 1),
    "channels": ("per_head", "local", 1),
}
SCORER = "magnitude"
WEAKEN = 1e-3  # the last k layers' weights are scaled by this, so that magnitude ranks their heads last
QUICK = {"points": "base-sc:1", "ks": "3", "repeats": 2, "threads": 1}  # 1 thread: steadier when the cores are shared


def weakened(dense: nn.Module, k: int) -> nn.Module:
    """A copy of `dense` whose last `k` attention layers have their Q/K/V and O weights scaled by `WEAKEN`."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for site in attention_sites(model)[-k:]:
            for role in "qkv":
                site.attention.projection(role).weight.mul_(WEAKEN)
            site.o_proj.weight.mul_(WEAKEN)
    return model


def variant(dense: nn.Module, name: str, k: int) -> nn.Module:
    """`dense` with k layers' worth of attention parameters removed the way `name` says (see the module doc)."""
    granularity, threshold, min_heads = VARIANTS[name]
    model = weakened(dense, k) if name == "blocks" else copy.deepcopy(dense)
    shapes = [site.shape for site in attention_sites(model)]
    removed = sum(shape.params - shape.hidden_size for shape in shapes[-k:])  # all but O's bias
    amount = removed / sum(shape.params for shape in shapes)
    return prune(model, granularity=granularity, scorer=SCORER, threshold=threshold, amount=amount,
                 min_heads=min_heads).eval()


def facts(model: nn.Module, dense_macs: int) -> dict:
    sites = attention_sites(model)
    return {
        "attention_params": attention_params(model), "attention_sparsity": attention_sparsity(model),
        "mac_ratio": macs_per_sample(model) / dense_macs,
        "headless_layers": [index for index, site in enumerate(sites) if not site.shape.num_heads],
        "layers": [site.shape.to_dict() for site in sites],
    }


def bench_size(size: str, batches: list[int], args: argparse.Namespace) -> list[dict]:
    """Dense and every variant at every k, of one size, timed side by side at each batch."""
    torch.manual_seed(0)
    dense = build_ast(**SIZES[size]).eval()
    config = dense.config
    dense_macs = macs_per_sample(copy.deepcopy(dense))
    models: dict[str, nn.Module] = {DENSE: dense}
    described: dict[str, dict] = {DENSE: {"variant": DENSE, "k": 0, "mac_ratio": 1.0, "headless_layers": []}}
    for k in args.ks:
        kept = set()
        for name in VARIANTS:
            key = f"{name}-{k}"
            models[key] = variant(dense, name, k)
            described[key] = {"variant": name, "k": k, **facts(models[key], dense_macs)}
            kept.add(described[key]["attention_params"])
        if len(kept) != 1:
            raise RuntimeError(f"{size}: the variants at k={k} keep different attention parameters {sorted(kept)}; "
                               f"k must split evenly over the heads of every layer")
        if len(described[f"blocks-{k}"]["headless_layers"]) != k:
            raise RuntimeError(f"{size}: blocks-{k} left layers {described[f'blocks-{k}']['headless_layers']} "
                               f"headless, not {k}")
    points = []
    for batch in batches:
        inputs = torch.randn(batch, config.max_length, config.num_mel_bins)
        before = os.getloadavg()[0]
        timing = time_interleaved(models, inputs, warmup=args.warmup, repeats=args.repeats,
                                  budget_s=args.point_budget_s)
        load = {"before": before, "after": os.getloadavg()[0]}
        for key, model_facts in described.items():
            points.append({
                "size": size, "tokens": tokens_of(dense), "batch": batch, "model": key, **model_facts,
                "timing": timing[key],
                "ratio_to_dense": paired_median(timing[key]["samples"], timing[DENSE]["samples"]),
                "rounds": timing["repeats"], "forwards_per_sample": timing["number"], "loadavg_1min": load,
            })
        log(f"{size} batch {batch}: " + ", ".join(
            f"{p['model']} {p['timing']['median']:.1f} ms ({p['ratio_to_dense']:.3f})"
            for p in points[-len(models):]))
    return points


def timing_cell(p: dict) -> str:
    t = p["timing"]
    return f"{t['median']:.1f} ({t['q1']:.1f}-{t['q3']:.1f})"


def markdown(results: dict) -> str:
    """One row per size, batch and k: dense and each variant's median ms (interquartile range), its ratio to dense."""
    env, points = results["environment"], results["points"]
    load = max((p["loadavg_1min"]["after"] for p in points), default=0.0)
    by_key = {(p["size"], p["batch"], p["model"]): p for p in points}
    header = ("tokens", "batch", "headless layers", "attention sparsity", "MACs vs dense", "dense ms",
              *(f"{name} ms" for name in VARIANTS), *(f"{name}/dense" for name in VARIANTS))
    rows = []
    for p in points:
        if p["variant"] != "blocks":
            continue
        size, batch, k = p["size"], p["batch"], p["k"]
        row = {name: by_key[size, batch, f"{name}-{k}"] for name in VARIANTS}
        macs = {f"{q['mac_ratio']:.3f}" for q in row.values()}
        rows.append((
            p["tokens"], batch, f"{k} of {len(p['layers'])}", f"{p['attention_sparsity']:.1%}", "/".join(sorted(macs)),
            timing_cell(by_key[size, batch, DENSE]), *(timing_cell(q) for q in row.values()),
            *(f"{q['ratio_to_dense']:.3f}" for q in row.values()),
        ))
    rounds = sorted({p["rounds"] for p in points})
    lines = [
        f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}, "
        f"{env['date'][:10]}, {env['wall_s']:.0f} s; AST-base shapes, random weights; ms: median (q1-q3) of "
        f"{'/'.join(str(r) for r in rounds)} interleaved rounds; x/dense: median of per-round time ratios "
        f"(< 1 is faster). Each row's three variants remove the same attention parameters and MACs: blocks = k "
        f"whole attention layers (min_heads=0), heads = k/12 of every layer's heads, channels = k/12 of every head's "
        f"QK and VO channels. Highest 1-min load average {load:.1f} on {env['cpu_count']} cores.",
        "",
        *markdown_table(header, rows),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=POINTS, help=f"comma-separated size:batch, sizes of {', '.join(SIZES)}")
    parser.add_argument("--ks", default=",".join(str(k) for k in KS), help="attention layers made headless")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: as many as fit --point-budget-s, 3 to 25)")
    parser.add_argument("--point-budget-s", type=float, default=60.0, help="seconds of timed rounds per size and batch")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up samples per model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; 1 is steadier on a "
                        "machine other jobs share)")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/depth_vs_width-cpu.json)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run (under a minute): {QUICK['points']}, k "
                        f"{QUICK['ks']}, {QUICK['repeats']} rounds, {QUICK['threads']} thread (default --out "
                        "...-quick.json)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    try:
        args.points = [(size, int(batch)) for size, batch in (item.split(":") for item in comma_list(str, args.points))]
    except ValueError:
        parser.error(f"--points: expected size:batch pairs such as {POINTS}, got {args.points!r}")
    unknown = sorted({size for size, _ in args.points} - set(SIZES))
    if unknown:
        parser.error(f"--points: unknown size {', '.join(unknown)}; choose of {', '.join(SIZES)}")
    args.ks = comma_list(int, args.ks)
    if not args.ks or min(args.ks) < 1:
        parser.error("--ks: at least one k, each >= 1")
    if args.repeats is not None and args.repeats < 2:
        parser.error("--repeats must be at least 2 (for the quartiles)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the warm-up also sizes the auto repeats)")
    args.out = args.out or RESULTS / f"depth_vs_width-cpu{'-quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "from_json")}
    results = {"environment": environment("cpu"), "settings": {**settings, "scorer": SCORER}, "points": []}
    start = time.perf_counter()
    for size in dict.fromkeys(size for size, _ in args.points):
        batches = [batch for name, batch in args.points if name == size]
        results["points"] += bench_size(size, batches, args)
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
