"""Latency of the paper's two open granularities (variable_per_head, hybrid) against per_head and dense, measured.

    python -m benchmarks.granularity_latency [--sizes small-sc,small-as] [--threads 1]    |    ... --from-json FILE

`variable_per_head` leaves heads of a layer with different dims; `PrunedAttention` runs them zero-padded
to the widest head in one SDPA call. The `grouped` rows run the same pruned weights with one SDPA call
per group of equal-dim heads instead (no padding), so the table says what the padding costs against
the alternative, rather than assuming either. Same harness as `benchmarks/latency.py` (its interleaved
timing), one-shot magnitude + global pruning of one dense model, every model of a size timed side by
side, round by round.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from benchmarks.common import (RESULTS, add_from_json, comma_list, environment, log, markdown_table, paired_median,
                               print_from_json, write_results)
from benchmarks.latency import MIN_SAMPLE_S, check_equivalent, time_interleaved
from prune_core import attention_sites, attention_sparsity, build_ast, macs_per_sample, prune
from prune_core.attention import PrunedAttention, fused_attention

SMALL = {"num_labels": 35, "hidden_size": 192, "num_layers": 6, "num_heads": 6, "intermediate_size": 768,
         "num_mel_bins": 128}
SIZES: dict[str, dict[str, int]] = {
    "small-sc": {**SMALL, "max_length": 128},  # SpeechCommands length: 146 tokens
    "small-as": {**SMALL, "max_length": 1024},  # AudioSet length: 1,214 tokens
}
GRANULARITY_NAMES = ("per_head", "variable_per_head", "hybrid")
GROUPED = "variable_per_head (grouped)"  # the variable_per_head model with `GroupedAttention` in its ragged layers
SCORER, THRESHOLD = "magnitude", "global"


class GroupedAttention(nn.Module):
    """Ragged heads without padding: one SDPA call per group of heads with equal (Q/K, V) dims.

    The alternative to `PrunedAttention`'s padding, timed against it; holds the pruned layer's own projections.
    """

    def __init__(self, pruned: PrunedAttention) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (pruned.projection(role) for role in "qkvo")
        self.scaling = pruned.scaling
        qk_starts = [sum(pruned.qk_dims[:head]) for head in range(pruned.num_heads)]
        v_starts = [sum(pruned.v_dims[:head]) for head in range(pruned.num_heads)]
        groups: dict[tuple[int, int], list[int]] = {}
        for head, dims in enumerate(zip(pruned.qk_dims, pruned.v_dims)):
            groups.setdefault(dims, []).append(head)
        self.groups = [(len(heads), qk, v) for (qk, v), heads in groups.items()]
        for index, ((qk, v), heads) in enumerate(groups.items()):
            self.register_buffer(f"qk_rows_{index}", torch.cat([torch.arange(qk) + qk_starts[h] for h in heads]))
            self.register_buffer(f"v_rows_{index}", torch.cat([torch.arange(v) + v_starts[h] for h in heads]))
        order = torch.cat([getattr(self, f"v_rows_{index}") for index in range(len(self.groups))])
        self.register_buffer("v_order", torch.argsort(order))  # grouped outputs back to head order

    def forward(self, hidden_states: torch.Tensor, *_: object, **__: object) -> tuple[torch.Tensor, None]:
        batch, tokens, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        outputs = []
        for index, (heads, qk_dim, v_dim) in enumerate(self.groups):
            qk_rows, v_rows = getattr(self, f"qk_rows_{index}"), getattr(self, f"v_rows_{index}")
            split = [(x.index_select(-1, rows).view(batch, tokens, heads, dim).transpose(1, 2))
                     for x, rows, dim in ((q, qk_rows, qk_dim), (k, qk_rows, qk_dim), (v, v_rows, v_dim))]
            out = fused_attention(*split, None, 0.0, self.scaling)
            outputs.append(out.transpose(1, 2).reshape(batch, tokens, heads * v_dim))
        return self.o_proj(torch.cat(outputs, -1).index_select(-1, self.v_order)), None


def grouped_like(pruned: nn.Module) -> nn.Module:
    """A copy of `pruned` whose ragged attention layers are `GroupedAttention` (uniform ones stay as they are)."""
    grouped = copy.deepcopy(pruned)
    for site in attention_sites(grouped):
        if len(set(zip(site.attention.qk_dims, site.attention.v_dims))) > 1:
            grouped.set_submodule(site.path, GroupedAttention(site.attention))
    return grouped.eval()


def padding_ratio(model: nn.Module) -> float:
    """Attention-matmul MACs the SDPA calls run over those the kept channels need (1.0: no padding).

    A call pads every head it runs to its widest Q/K or V dim (SDPA takes one head dim for both).
    """
    run = need = 0
    for module in model.modules():
        if isinstance(module, PrunedAttention):
            run += module.num_heads * 2 * max(*module.qk_dims, *module.v_dims)
            need += sum(module.qk_dims) + sum(module.v_dims)
        elif isinstance(module, GroupedAttention):
            run += sum(heads * 2 * max(qk, v) for heads, qk, v in module.groups)
            need += sum(heads * (qk + v) for heads, qk, v in module.groups)
    return run / need


def bench_size(size: str, args: argparse.Namespace) -> list[dict]:
    """Dense, and every granularity at every sparsity, of one size, timed side by side per batch."""
    torch.manual_seed(0)
    dense = build_ast(**SIZES[size]).eval()
    config: transformers.ASTConfig = dense.config
    tokens = dense.audio_spectrogram_transformer.embeddings.position_embeddings.shape[1]
    dense_macs = macs_per_sample(copy.deepcopy(dense))
    models: dict[str, nn.Module] = {"dense": dense}
    facts: dict[str, dict] = {"dense": {"granularity": "dense", "target_sparsity": 0.0, "attention_sparsity": 0.0,
                                        "flop_ratio": 1.0, "padding_ratio": 1.0}}
    probe = torch.randn(1, config.max_length, config.num_mel_bins)
    for target in args.sparsities:
        for granularity in args.granularities:
            pruned = prune(copy.deepcopy(dense), granularity=granularity, scorer=SCORER, threshold=THRESHOLD,
                           amount=target)
            variants = {granularity: pruned}
            if granularity == "variable_per_head":
                variants[GROUPED] = grouped_like(pruned)
            for name, model in variants.items():
                key = f"{name} @ {target:.0%}"
                models[key] = model
                facts[key] = {
                    "granularity": name, "target_sparsity": target, "attention_sparsity": attention_sparsity(pruned),
                    "flop_ratio": dense_macs / macs_per_sample(pruned), "padding_ratio": padding_ratio(model),
                    "layers": [site.shape.to_dict() for site in attention_sites(pruned)],
                }
                if name == GROUPED:
                    facts[key]["max_abs_logit_diff"] = check_equivalent(model, pruned, probe,
                                                                           "grouped attention")
    points = []
    for batch in args.batches:
        inputs = torch.randn(batch, config.max_length, config.num_mel_bins)
        before = os.getloadavg()[0]
        timing = time_interleaved(models, inputs, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s)
        load = {"before": before, "after": os.getloadavg()[0]}
        for key, model_facts in facts.items():
            per_head = f"per_head @ {model_facts['target_sparsity']:.0%}"
            points.append({
                "size": size, "tokens": tokens, "batch": batch, **model_facts, "timing": timing[key],
                "speedup_vs_dense": paired_median(timing["dense"]["samples"], timing[key]["samples"]),
                "speedup_vs_per_head": (paired_median(timing[per_head]["samples"], timing[key]["samples"])
                                        if per_head in timing else None),
                "rounds": timing["repeats"], "forwards_per_sample": timing["number"], "loadavg_1min": load,
            })
            log(" | ".join(str(cell) for cell in cells(points[-1])))
    return points


HEADER = ("size", "tokens", "batch", "granularity", "sparsity", "ms (median)", "q1-q3 ms", "vs dense", "vs per_head",
          "FLOP ratio", "padding")


def cells(p: dict) -> tuple:
    t = p["timing"]
    return (p["size"], p["tokens"], p["batch"], p["granularity"], f"{p['attention_sparsity']:.1%}",
            f"{t['median']:.2f}", f"{t['q1']:.2f}-{t['q3']:.2f}", f"{p['speedup_vs_dense']:.2f}x",
            "" if p["speedup_vs_per_head"] is None else f"{p['speedup_vs_per_head']:.2f}x",
            f"{p['flop_ratio']:.2f}x", f"{p['padding_ratio']:.2f}")


def markdown(results: dict) -> str:
    """Every model of every size and batch, under a line saying where and how it was measured."""
    env, points = results["environment"], results["points"]
    load = max((p["loadavg_1min"]["after"] for p in points), default=0.0)
    lines = [
        f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}, "
        f"{env['date'][:10]}, {env['wall_s']:.0f} s; medians of interleaved rounds (vs dense, vs per_head: medians "
        "of per-round time ratios, per_head at the same target sparsity), "
        f"{SCORER} scores, {THRESHOLD} threshold, highest 1-min load average {load:.1f} on {env['cpu_count']} cores. "
        "padding: attention-matmul MACs the SDPA calls run (each head padded to the widest Q/K or V dim of its "
        "call) over those the kept channels need.",
        "",
        *markdown_table(HEADER, [cells(p) for p in points]),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--sparsities", default="0.3,0.5", help="attention sparsity targets")
    parser.add_argument("--granularities", default=",".join(GRANULARITY_NAMES))
    parser.add_argument("--repeats", type=int, help="timed rounds (default: as many as fit --budget-s, 3 to 25)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds of timed rounds per size and batch")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up samples per model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; 1 is steadier on a "
                        "machine other jobs share: a descheduled OpenMP thread stalls every parallel region)")
    parser.add_argument("--out", type=Path, default=RESULTS / "granularity_latency-cpu.json")
    add_from_json(parser)
    args = parser.parse_args(argv)
    args.sizes, args.granularities = comma_list(str, args.sizes), comma_list(str, args.granularities)
    args.batches, args.sparsities = comma_list(int, args.batches), comma_list(float, args.sparsities)
    unknown = [s for s in args.sizes if s not in SIZES] + [g for g in args.granularities if g not in GRANULARITY_NAMES]
    if unknown:
        parser.error(f"unknown size or granularity: {', '.join(unknown)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.repeats is not None and args.repeats < 2:
        parser.error("--repeats must be at least 2 (for the quartiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "from_json")}
    results = {"environment": environment(),
               "settings": {**settings, "scorer": SCORER, "threshold": THRESHOLD, "min_sample_s": MIN_SAMPLE_S},
               "points": []}
    start = time.perf_counter()
    for size in args.sizes:
        results["points"] += bench_size(size, args)
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
