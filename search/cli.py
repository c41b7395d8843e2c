"""`prune-search`: the command line of the project (subcommands grow with the product)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prune_core import GRANULARITIES, SCORERS, THRESHOLDS


def _prune(args: argparse.Namespace) -> int:
    """Prune a saved model once (magnitude or random: no data needed) and save it with save_pruned."""
    from prune_core import attention_sparsity, load_model, load_pruned, macs_per_sample, prune, save_pruned, total_params
    from prune_core.scorers import NEEDS_DATA

    if args.scorer in NEEDS_DATA:
        print(f"error: scorer {args.scorer!r} needs calibration data; use it from Python or the search", file=sys.stderr)
        return 2
    source = Path(args.model)
    model = load_pruned(source) if (source / "pruning.json").is_file() else load_model(args.model)
    before = (total_params(model), macs_per_sample(model))
    prune(model, granularity=args.granularity, scorer=args.scorer, threshold=args.threshold, amount=args.amount)
    save_pruned(model, args.out)
    after = (total_params(model), macs_per_sample(model))
    print(
        f"attention sparsity {attention_sparsity(model):.1%}; params {before[0]:,} -> {after[0]:,}; "
        f"MACs/sample {before[1]:,} -> {after[1]:,}; saved to {args.out}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Interim demo of the pruning core on the small demo-size AST (the full search demo replaces it)."""
    import copy

    import torch

    from prune_core import attention_sites, attention_sparsity, build_ast, load_pruned, macs_per_sample, prune, save_pruned
    from prune_core.adapters import example_input

    torch.manual_seed(0)
    dense = build_ast(num_labels=10).eval()
    inputs = example_input(dense)
    out = Path(args.out)
    print(f"{'granularity':<14}{'sparsity':>9}{'MACs ratio':>11}{'ms dense':>9}{'ms pruned':>10}  shapes (heads, qk dim, v dim)")
    for granularity in GRANULARITIES:
        model = prune(copy.deepcopy(dense), granularity=granularity, scorer="magnitude", threshold="global", amount=0.5)
        reloaded = load_pruned(save_pruned(model, out / granularity))
        with torch.inference_mode():
            assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
        timings = [_median_ms(m, inputs) for m in (dense, model)]
        shapes = [(s.shape.num_heads, s.shape.qk_head_dim, s.shape.v_head_dim) for s in attention_sites(model)]
        print(
            f"{granularity:<14}{attention_sparsity(model):>9.1%}{macs_per_sample(dense) / macs_per_sample(model):>11.2f}"
            f"{timings[0]:>9.2f}{timings[1]:>10.2f}  {shapes}"
        )
    print(f"pruned models saved under {out}/ (safetensors + JSON)")
    return 0


def _median_ms(model, inputs, repeats: int = 30) -> float:
    import statistics

    import torch

    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune-search", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a saved model once and save it")
    prune.add_argument("--model", required=True, help="a save_pretrained directory, a save_pruned directory or a hub id")
    prune.add_argument("--granularity", choices=sorted(GRANULARITIES), default="entire_head")
    prune.add_argument("--scorer", choices=sorted(SCORERS), default="magnitude")
    prune.add_argument("--threshold", choices=sorted(THRESHOLDS), default="global")
    prune.add_argument("--amount", type=float, required=True, help="fraction of the attention parameters to remove")
    prune.add_argument("--out", required=True, help="directory to write the pruned model to")
    prune.set_defaults(run=_prune)

    demo = commands.add_parser("demo", help="run the embedded demo")
    demo.add_argument("--out", default="runs/demo", help="where to write outputs")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
