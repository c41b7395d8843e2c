"""Does ONNX Runtime keep a pruned model's speedup? ORT (CPU) against PyTorch eager, dense and pruned by each granularity.

    python -m benchmarks.onnx_runtime [--quick] [--repeats N]    |    ... --from-json FILE

AST-base shapes (768 hidden, 12 layers, 12 heads, 128 mel bins): 146 tokens (SpeechCommands' 128 frames) at
batch 1 and 8, and 1,214 tokens (AudioSet's 1,024 frames) at batch 1. Each granularity removes 50% of the
attention parameters of one dense model in one shot (magnitude scores, global threshold: the weights do not
matter for speed). Every model is exported with `prune_core.export.export_onnx` and checked against PyTorch
first; then all models in both runtimes are timed side by side, round by round with the start rotating, and
a speedup is the median of the per-round ratios dense / pruned within one runtime. The answer is the ratio of
the two speedups: above 1, ONNX Runtime gains more from the pruning than PyTorch does.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (RESULTS, add_from_json, environment, log, markdown_table, paired_median, print_from_json,
                               rotated, write_results)
from prune_core import GRANULARITIES, attention_sparsity, build_ast, prune
from prune_core.export import DEFAULT_OPSET, export_onnx

BASE = {"num_labels": 35, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
        "num_mel_bins": 128}
TINY = {"num_labels": 5, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "num_mel_bins": 32}
# (label, frames, batch): an AST with 128 mel bins has 2 + 12 x ((frames - 16) // 10 + 1) tokens
SHAPES = (("146 tokens, batch 1", 128, 1), ("146 tokens, batch 8", 128, 8), ("1,214 tokens, batch 1", 1024, 1))
QUICK_SHAPES = (("tiny, batch 2", 40, 2),)
AMOUNT = 0.5
MIN_SAMPLE_S = 0.05  # one timing sample repeats a forward until it lasts this long
PARITY = 1e-4


def models_at(config: dict, frames: int) -> dict[str, torch.nn.Module]:
    """The dense model at this input length and one copy pruned 50% by each granularity."""
    torch.manual_seed(0)
    dense = build_ast(**config, max_length=frames).eval()
    models = {"dense": dense}
    for granularity in sorted(GRANULARITIES):
        pruned = copy.deepcopy(dense)
        prune(pruned, granularity=granularity, scorer="magnitude", threshold="global", amount=AMOUNT)
        models[granularity] = pruned.eval()
    return models


def exported(models: dict[str, torch.nn.Module], folder: Path, inputs: torch.Tensor, opset: int) -> tuple[dict, dict]:
    """(model -> its ONNX Runtime session, model -> its export facts), each export checked on `inputs`."""
    import onnxruntime

    sessions, facts = {}, {}
    for name, model in models.items():
        started = time.perf_counter()
        path = export_onnx(model, folder / f"{name}.onnx", opset=opset)
        exported_s = time.perf_counter() - started
        sessions[name] = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(input_values=inputs).logits.numpy()
        worst = float(np.abs(sessions[name].run(["logits"], {"input_values": inputs.numpy()})[0] - expected).max())
        if worst > PARITY:
            raise SystemExit(f"error: {name}: ONNX Runtime's logits differ from PyTorch's by {worst:.2e}")
        facts[name] = {"attention_sparsity": attention_sparsity(model) if name != "dense" else 0.0,
                       "export_s": exported_s, "max_abs_diff": worst, "onnx_mib": path.stat().st_size / 2**20}
    return sessions, facts


def runners(models: dict[str, torch.nn.Module], sessions: dict, inputs: torch.Tensor) -> dict[str, Callable[[], object]]:
    """name/runtime -> a callable running one forward of that model in that runtime on `inputs`."""
    feed = {"input_values": inputs.numpy()}
    calls: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        calls[f"{name}/eager"] = _eager(model, inputs)
        calls[f"{name}/ort"] = lambda session=sessions[name]: session.run(["logits"], feed)
    return calls


def _eager(model: torch.nn.Module, inputs: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(input_values=inputs).logits
    return run


def sample_ms(call: Callable[[], object], number: int) -> float:
    started = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - started) * 1000 / number


def time_side_by_side(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Per call, `repeats` samples (ms per forward), every call once a round, the start rotating each round."""
    for call in calls.values():  # warm-up: first runs allocate and pick kernels
        call()
    numbers = {name: max(1, math.ceil(MIN_SAMPLE_S * 1000 / sample_ms(call, 1))) for name, call in calls.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(repeats):
        for name in rotated(names, round_index):
            samples[name].append(sample_ms(calls[name], numbers[name]))
    return samples


def measure(args: argparse.Namespace) -> dict:
    config, shapes = (TINY, QUICK_SHAPES) if args.quick else (BASE, SHAPES)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for frames in dict.fromkeys(frames for _, frames, _ in shapes):  # one set of models per input length
            models = models_at(config, frames)
            generator = torch.Generator().manual_seed(1)
            log(f"{frames} frames: exporting {len(models)} models")
            sessions, facts = exported(models, Path(scratch) / str(frames),
                                       torch.randn(2, frames, config["num_mel_bins"], generator=generator), args.opset)
            for label, batch in ((label, batch) for label, f, batch in shapes if f == frames):
                calls = runners(models, sessions, torch.randn(batch, frames, config["num_mel_bins"], generator=generator))
                repeats = args.repeats or (5 if frames >= 1024 else 11)
                log(f"{label}: timing {len(calls)} runs x {repeats} rounds")
                samples = time_side_by_side(calls, repeats)
                for name in models:
                    eager, ort = samples[f"{name}/eager"], samples[f"{name}/ort"]
                    speedups = {runtime: paired_median(samples[f"dense/{runtime}"], samples[f"{name}/{runtime}"])
                                for runtime in ("eager", "ort")}
                    rows.append({
                        "shape": label, "frames": frames, "batch": batch, "model": name, **facts[name],
                        "eager_ms": statistics.median(eager), "ort_ms": statistics.median(ort),
                        "ort_over_eager": paired_median(eager, ort),  # how much faster ORT runs this model
                        "eager_speedup": speedups["eager"], "ort_speedup": speedups["ort"],
                        "speedup_ratio": speedups["ort"] / speedups["eager"],
                        "samples": {"eager": eager, "ort": ort}, "repeats": repeats,
                    })
            del sessions, models
    return {"environment": environment(packages=("torch", "transformers", "onnx", "onnxruntime")),
            "threads": torch.get_num_threads(), "config": config, "amount": AMOUNT, "opset": args.opset, "quick": args.quick,
            "rows": rows}


def markdown(results: dict) -> str:
    header = ("shape", "model", "attention sparsity", "eager ms", "ORT ms", "ORT faster than eager",
              "eager speedup", "ORT speedup", "ORT speedup / eager speedup")
    rows = [(r["shape"], r["model"], f"{r['attention_sparsity']:.1%}", f"{r['eager_ms']:.2f}", f"{r['ort_ms']:.2f}",
             f"{r['ort_over_eager']:.2f}x", f"{r['eager_speedup']:.2f}x", f"{r['ort_speedup']:.2f}x",
             f"{r['speedup_ratio']:.2f}") for r in results["rows"]]
    return "\n".join([
        f"ONNX opset {results['opset']}. Medians of {', '.join(sorted({str(r['repeats']) for r in results['rows']}))} "
        "interleaved rounds, "
        f"{results['threads']} threads, {results['environment'].get('cpu', 'CPU')}; speedups are medians of per-round "
        "ratios dense / pruned within one runtime.", "", *markdown_table(header, rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny AST, for the smoke test (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per shape (default 11; 5 at 1,214 tokens)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="the ONNX opset to export at")
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_runtime.json")
    add_from_json(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    results = measure(args)
    write_results(results, args.out)
    print(markdown(results))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
