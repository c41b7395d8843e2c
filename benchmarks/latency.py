"""Latency of dense vs pruned AST, next to a model built natively at the pruned shapes (pruned/native <= 1.05).

    python benchmarks/latency.py [--quick] [--device cuda]    |    python benchmarks/latency.py --from-json FILE
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from prune_core import attention_sites, attention_sparsity, build_ast, macs_per_sample, prune
from prune_core.attention import LayerShape, fused_attention

RESULTS = Path(__file__).resolve().parent / "results"
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
def check_equivalent(pruned: nn.Module, native: nn.Module, inputs: torch.Tensor) -> float:
    """Max |logit difference|; raises if the native model does not compute what the pruned one does."""
    diff = (pruned(input_values=inputs).logits - native(input_values=inputs).logits).abs().max().item()
    if diff > EQUIVALENCE_TOL:
        raise RuntimeError(f"native model differs from the pruned one by {diff:.2e} > {EQUIVALENCE_TOL:.0e}")
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
        for name in names[r % len(names):] + names[: r % len(names)]:
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
        diff = check_equivalent(pruned, native, inputs[min(args.batches)])
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
            log(row(points[-1]))
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
    ratio = paired_median(timing["pruned"], timing["native"])
    return {
        **common, "batch": batch, **timing, "pruned_over_native": ratio,
        "speedup_vs_dense": paired_median(timing["dense"], timing["pruned"]), "overhead_ok": ratio <= MAX_OVERHEAD,
        "loadavg_1min": {"before": load[0], "after": load[1]},
    }


def paired_median(numerator: dict, denominator: dict) -> float:
    return statistics.median(n / d for n, d in zip(numerator["samples"], denominator["samples"]))


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "device_name": name, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


HEADER = ("size", "tokens", "batch", "granularity", "sparsity", "dense ms", "pruned ms", "native ms", "pruned/native",
          "speedup", "FLOP ratio")


def row(p: dict) -> str:
    cells = (p["size"], p["tokens"], p["batch"], p["granularity"], f"{p['attention_sparsity']:.1%}",
             f"{p['dense']['median']:.2f}", f"{p['pruned']['median']:.2f}", f"{p['native']['median']:.2f}",
             f"{p['pruned_over_native']:.3f}" + ("" if p["overhead_ok"] else " (!)"),
             f"{p['speedup_vs_dense']:.2f}x", f"{p['flop_ratio']:.2f}x")
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict) -> str:
    """The README table: one row per point, with a line saying where and how it was measured."""
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
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += [row(p) for p in sorted(points, key=table_order)]
    if results["skipped"]:
        lines += ["", *(f"Not run: {s['size']} batch {s['batch']} ({s['reason']})." for s in results["skipped"])]
    return "\n".join(lines)


def table_order(p: dict) -> tuple:
    granularities = (CONTROL, *GRANULARITY_NAMES)
    return list(SIZES).index(p["size"]), p["batch"], granularities.index(p["granularity"]), p["target_sparsity"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def csv(kind: type, text: str) -> list:
    return [kind(item) for item in text.split(",") if item]


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
    parser.add_argument("--from-json", type=Path, help="print the markdown table of an existing results file and exit")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.sizes, args.granularities = csv(str, args.sizes), csv(str, args.granularities)
    args.batches, args.sparsities = csv(int, args.batches), csv(float, args.sparsities)
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        print(markdown(json.loads(args.from_json.read_text())))
        return
    device = torch.device(args.device)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "from_json", "device")}
    results = {"environment": environment(device), "settings": {**settings, "scorer": SCORER}, "points": [],
               "skipped": []}
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:  # written after every size, so an interrupted run keeps what it measured
        points, skipped = bench_size(size, args, device)
        results["points"] += points
        results["skipped"] += skipped
        results["environment"]["wall_s"] = time.perf_counter() - start
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))


if __name__ == "__main__":
    main()
