"""Latency of dense vs pruned AST, next to a model built natively at the pruned shapes (pruned/native <= 1.05).

    python -m benchmarks.latency [--quick] [--device cuda]    |    python -m benchmarks.latency --from-json FILE
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from benchmarks.common import (RESULTS, add_from_json, comma_list, environment, log, markdown_table, paired_median,
                               print_from_json, rotated, write_results)
from prune_core import attention_sites, attention_sparsity, build_ast, macs_per_sample, prune
from prune_core.attention import LayerShape, fused_attention

BASE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "num_mel_bins": 128}
SIZES: dict[str, dict[str, int]] = {
    # the demo baseline (search/baseline.py BaselineConfig defaults): 47 tokens
    "demo": {"num_labels": 10, "hidden_size": 96, "num_layers": 5, "num_heads": 6, "intermediate_size": 384,
             "num_mel_bins": 64, "max_length": 100},
    "base-sc": {"num_labels": 35, **BASE, "max_length": 128},  # SpeechCommands: 146 tokens
    "base-as": {"num_labels": 527, **BASE, "max_length": 1024},  # AudioSet: 1,214 tokens
}
GRANULARITY_NAMES = ("entire_head", "per_head", "same_channel")
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
CONTROL = "none"  # 0% control: the dense model adopted into PrunedAttention, vs the stock and native dense models
SCORER = "magnitude"
MAX_OVERHEAD = 1.05  # pruned/native latency ratio allowed
EQUIVALENCE_TOL = 1e-4
MIN_SAMPLE_S = 0.02  # one timing sample runs enough forwards to last this long (tiny models)
AUTO_REPEATS = (3, 25)  # CPU: interleaved rounds per point, as many as fit --point-budget-s, within these bounds
QUICK = {"sizes": "demo,base-sc", "batches": "1", "sparsities": "0.3,0.6", "repeats": 5}


class NativeAttention(nn.Module):
    """Self-attention written directly at given shapes: what a model designed with them would hold.

    It runs the same kernel as the pruned model (torch SDPA, the smaller head dim zero-padded where
    Q/K and V differ), so pruned/native isolates what prune_core's bookkeeping costs.
    """

    def __init__(self, shape: LayerShape, scale: float, bias: bool) -> None:
        super().__init__()
        self.num_heads, self.qk_head_dim, self.v_head_dim = shape.num_heads, shape.qk_head_dim, shape.v_head_dim
        self.scale = scale
        qk, v = shape.num_heads * shape.qk_head_dim, shape.num_heads * shape.v_head_dim
        self.q_proj = nn.Linear(shape.hidden_size, qk, bias=bias)
        self.k_proj = nn.Linear(shape.hidden_size, qk, bias=bias)
        self.v_proj = nn.Linear(shape.hidden_size, v, bias=bias)
        self.o_proj = nn.Linear(v, shape.hidden_size)

    def forward(self, hidden_states: torch.Tensor, *_: object, **__: object) -> tuple[torch.Tensor, None]:
        batch, tokens, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, tokens, self.num_heads, self.qk_head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, tokens, self.num_heads, self.qk_head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, tokens, self.num_heads, self.v_head_dim).transpose(1, 2)
        out = fused_attention(q, k, v, None, 0.0, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), None


def native_like(pruned: nn.Module, config: transformers.ASTConfig) -> nn.Module:
    """A fresh AST whose attention layers are `NativeAttention` at the pruned shapes, holding the pruned weights."""
    native = transformers.ASTForAudioClassification(copy.deepcopy(config))
    for site in attention_sites(pruned):
        native.set_submodule(site.path, NativeAttention(site.shape, site.attention.scaling, config.qkv_bias))
    native.load_state_dict(pruned.state_dict())
    return native.to(next(pruned.parameters()).device).eval()


@torch.inference_mode()
def check_equivalent(model: nn.Module, pruned: nn.Module, inputs: torch.Tensor, what: str) -> float:
    """Max |logit difference|; raises if `model` (`what` it is) does not compute what the pruned model does."""
    diff = (model(input_values=inputs).logits - pruned(input_values=inputs).logits).abs().max().item()
    if diff > EQUIVALENCE_TOL:
        raise RuntimeError(f"{what} differs from the pruned model by {diff:.2e} > {EQUIVALENCE_TOL:.0e}")
    return diff


def tokens_of(model: nn.Module) -> int:
    return model.audio_spectrogram_transformer.embeddings.position_embeddings.shape[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def sample_ms(model: nn.Module, inputs: torch.Tensor, number: int) -> float:
    """Mean milliseconds of `number` back-to-back forwards."""
    sync(inputs.device)
    start = time.perf_counter()
    for _ in range(number):
        model(input_values=inputs)
    sync(inputs.device)
    return (time.perf_counter() - start) * 1000 / number


def time_interleaved(models: dict[str, nn.Module], inputs: torch.Tensor, *, warmup: int, repeats: int | None,
                     budget_s: float) -> dict:
    """Round-robin timing (the start rotates each round) so machine noise hits every model alike.

    `repeats=None` picks as many rounds as fit `budget_s`, within `AUTO_REPEATS`.
    """
    first = next(iter(models.values()))
    number = max(1, math.ceil(MIN_SAMPLE_S * 1000 / sample_ms(first, inputs, 1)))
    warm = {name: [sample_ms(model, inputs, number) for _ in range(warmup)] for name, model in models.items()}
    if repeats is None:
        round_ms = sum(statistics.median(times) for times in warm.values())
        low, high = AUTO_REPEATS
        repeats = min(high, max(low, int(budget_s * 1000 / round_ms)))
    names = list(models)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            samples[name].append(sample_ms(models[name], inputs, number))
    return {"repeats": repeats, "number": number, "warmup": warmup, **{name: summary(s) for name, s in samples.items()}}


def summary(samples: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": statistics.median(samples), "min": min(samples), "q1": q1, "q3": q3, "samples": samples}


def build_dense(size: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_ast(**SIZES[size]).to(device).eval()


def dense_macs(dense: nn.Module) -> int:
    """MACs of the dense model (counted on a copy: counting adopts the attention layers)."""
    return macs_per_sample(copy.deepcopy(dense))


def probe_dense_s(dense: nn.Module, inputs: torch.Tensor) -> float:
    """Seconds of one dense forward, after one warm-up forward."""
    sample_ms(dense, inputs, 1)
    return sample_ms(dense, inputs, 1) / 1000


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[dict]]:
    """Every (granularity, sparsity, batch) point of one model size, and the batches skipped as too slow."""
    dense = build_dense(size, device)
    config, tokens, dense_count = dense.config, tokens_of(dense), dense_macs(dense)
    inputs = {b: torch.randn(b, config.max_length, config.num_mel_bins, device=device) for b in args.batches}
    batches, skipped = [], []
    for batch in args.batches:
        seconds = probe_dense_s(dense, inputs[batch])
        if args.max_dense_s and seconds > args.max_dense_s:
            skipped.append({"size": size, "tokens": tokens, "batch": batch, "dense_s": seconds,
                            "reason": f"dense forward {seconds:.1f} s > --max-dense-s {args.max_dense_s}"})
            log(f"skip {size} batch {batch}: dense forward {seconds:.1f} s > --max-dense-s {args.max_dense_s}")
        else:
            batches.append(batch)
    points: list[dict] = []
    if not batches:
        return points, skipped
    variants = [(CONTROL, 0.0)] + [(g, target) for g in args.granularities for target in args.sparsities]
    for granularity, target in variants:
        pruned = pruned_copy(dense, granularity, args.threshold, target)
        native = native_like(pruned, config)
        diff = check_equivalent(native, pruned, inputs[min(args.batches)], "the native model")
        common = {
            "size": size, "tokens": tokens, "granularity": granularity, "threshold": args.threshold,
            "target_sparsity": target, "attention_sparsity": attention_sparsity(pruned),
            "flop_ratio": dense_count / macs_per_sample(pruned), "native_max_abs_logit_diff": diff,
            "layers": [site.shape.to_dict() for site in attention_sites(pruned)],
        }
        for batch in batches:
            before = os.getloadavg()[0]
            timing = time_interleaved({"dense": dense, "pruned": pruned, "native": native}, inputs[batch],
                                      warmup=args.warmup, repeats=args.repeats, budget_s=args.point_budget_s)
            points.append(point(common, batch, timing, (before, os.getloadavg()[0])))
            log(" | ".join(str(cell) for cell in cells(points[-1])))
        del pruned, native
    return points, skipped


def pruned_copy(dense: nn.Module, granularity: str, threshold: str, target: float) -> nn.Module:
    """The dense model pruned one-shot to `target`; for `CONTROL`, adopted into `PrunedAttention` unpruned."""
    model = copy.deepcopy(dense)
    if granularity == CONTROL:
        attention_sites(model)
        return model
    return prune(model, granularity=granularity, scorer=SCORER, threshold=threshold, amount=target)


def point(common: dict, batch: int, timing: dict, load: tuple[float, float]) -> dict:
    """One result; the ratios pair the samples of each round, so noise that lasts a round cancels out."""
    ratio = paired_median(timing["pruned"]["samples"], timing["native"]["samples"])
    return {
        **common, "batch": batch, **timing, "pruned_over_native": ratio,
        "speedup_vs_dense": paired_median(timing["dense"]["samples"], timing["pruned"]["samples"]),
        "overhead_ok": ratio <= MAX_OVERHEAD,
        "loadavg_1min": {"before": load[0], "after": load[1]},
    }


HEADER = ("size", "tokens", "batch", "granularity", "sparsity", "dense ms", "pruned ms", "native ms", "pruned/native",
          "speedup", "FLOP ratio")


def cells(p: dict) -> tuple:
    return (p["size"], p["tokens"], p["batch"], p["granularity"], f"{p['attention_sparsity']:.1%}",
            f"{p['dense']['median']:.2f}", f"{p['pruned']['median']:.2f}", f"{p['native']['median']:.2f}",
            f"{p['pruned_over_native']:.3f}" + ("" if p["overhead_ok"] else " (!)"),
            f"{p['speedup_vs_dense']:.2f}x", f"{p['flop_ratio']:.2f}x")


def markdown(results: dict) -> str:
    """Every point, one row each, under a line saying where and how it was measured."""
    env, points = results["environment"], results["points"]
    ok = sum(p["overhead_ok"] for p in points)
    load = max((p["loadavg_1min"]["after"] for p in points), default=0.0)
    lines = [
        f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}, "
        f"{env['date'][:10]}; medians of interleaved runs (the ratios: of per-round ratios), "
        f"{results['settings']['scorer']} scores, "
        f"{results['settings']['threshold']} threshold, highest 1-min load average {load:.1f} on "
        f"{env['cpu_count']} cores; pruned/native <= {MAX_OVERHEAD} at {ok}/{len(points)} points.",
        "",
        *markdown_table(HEADER, [cells(p) for p in sorted(points, key=table_order)]),
    ]
    if results["skipped"]:
        lines += ["", *(f"Not run: {s['size']} batch {s['batch']} ({s['reason']})." for s in results["skipped"])]
    return "\n".join(lines)


def summary_markdown(results: dict) -> str:
    """One row per size, batch and granularity: the speedup over dense at each sparsity target, the FLOP
    ratio beside it, and the worst pruned/native of the row."""
    rows: dict[tuple, dict[float, dict]] = {}
    for p in sorted(results["points"], key=table_order):
        if p["granularity"] != CONTROL:
            rows.setdefault((p["size"], p["tokens"], p["batch"], p["granularity"]), {})[p["target_sparsity"]] = p
    targets = sorted({target for row in rows.values() for target in row})
    header = ("size", "tokens", "batch", "granularity", *(f"{t:.0%}" for t in targets), "worst pruned/native")
    table = [
        (*key, *(f"{row[t]['speedup_vs_dense']:.2f}x ({row[t]['flop_ratio']:.2f}x)" if t in row else "" for t in targets),
         f"{max(p['pruned_over_native'] for p in row.values()):.3f}")
        for key, row in rows.items()
    ]
    return "\n".join(["Speedup over dense at each attention sparsity target (in brackets: the FLOP ratio, the "
                      "speedup the removed work allows).", "", *markdown_table(header, table)])


def table_order(p: dict) -> tuple:
    granularities = (CONTROL, *GRANULARITY_NAMES)
    return list(SIZES).index(p["size"]), p["batch"], granularities.index(p["granularity"]), p["target_sparsity"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES), help="attention sparsity targets")
    parser.add_argument("--granularities", default=",".join(GRANULARITY_NAMES))
    parser.add_argument("--threshold", default="global", choices=("global", "local"))
    parser.add_argument("--repeats", type=int, help="timed rounds per point (default: 100 on cuda; on cpu as many "
                        f"as fit --point-budget-s, {AUTO_REPEATS[0]} to {AUTO_REPEATS[1]})")
    parser.add_argument("--point-budget-s", type=float, default=12.0, help="cpu: seconds of timed rounds per point")
    parser.add_argument("--warmup", type=int, help="warm-up samples per model and point (default: 10 cuda, 1 cpu)")
    parser.add_argument("--max-dense-s", type=float, help="skip a size and batch whose dense forward takes longer "
                        "(default: 5 on cpu, no limit on cuda; 0 = no limit)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/latency-<device>.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: demo and base-sc, batch 1, 30%% and 60%%, "
                        f"{QUICK['repeats']} repeats (default --out ...-quick.json)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.sizes, args.granularities = comma_list(str, args.sizes), comma_list(str, args.granularities)
    args.batches, args.sparsities = comma_list(int, args.batches), comma_list(float, args.sparsities)
    unknown = [s for s in args.sizes if s not in SIZES] + [g for g in args.granularities if g not in GRANULARITY_NAMES]
    if unknown:
        parser.error(f"unknown size or granularity: {', '.join(unknown)}")
    if args.repeats is not None and args.repeats < 2:
        parser.error("--repeats must be at least 2 (for the quartiles)")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be at least 1 (the warm-up also sizes the auto repeats)")
    args.repeats = args.repeats if args.repeats is not None else (100 if gpu else None)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.max_dense_s = args.max_dense_s if args.max_dense_s is not None else (0.0 if gpu else 5.0)
    args.out = args.out or RESULTS / f"latency-{args.device}{'-quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    device = torch.device(args.device)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "from_json", "device")}
    results = {"environment": environment(args.device), "settings": {**settings, "scorer": SCORER}, "points": [],
               "skipped": []}
    start = time.perf_counter()
    for size in args.sizes:
        points, skipped = bench_size(size, args, device)
        results["points"] += points
        results["skipped"] += skipped
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
