"""Does Fisher's advantage over magnitude transfer to a non-audio transformer? (the paper's open question)

The same path as an AST, end to end: `prune-search data synth-task` writes a synthetic task that only
attention can solve (`relations`: 16x16 images for a ViT; `markers`: 32-token sequences for a BERT),
`prune-search baseline` trains the model its input calls for from scratch (cached), and the paper's
grid of strategies runs through the search (`searcher: grid`, as benchmarks.paper_proxy runs it on
the AST), for a few seeds. The answers come from paper_proxy's paired comparisons, whichever way they
come out: does Fisher beat magnitude, does a global threshold beat a local one, does entire-head beat
channel pruning, and which layers each strategy prunes most.

The default target is 70% attention sparsity: at 50% every strategy kept the ViT at its ceiling
(benchmarks/results/transfer-vit.json of the first, prune_core-only version), which separates nothing.

    python -m benchmarks.transfer [--model vit|bert] [--seeds 3] [--target 0.7]
    python -m benchmarks.transfer --quick          # tiny sizes: a fast check of the whole path
    python -m benchmarks.transfer --from-json benchmarks/results/transfer-vit.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks import paper_proxy
from benchmarks.common import RESULTS, ROOT, add_from_json, print_from_json
from data_prep.synthetic_tasks import write_synthetic
from search.baseline import BaselineConfig, train_baseline

SYNTHETIC_TASK_OF = {"vit": "relations", "bert": "markers"}  # model family -> the synthetic task written for it
# Peak learning rate of the from-scratch baseline: post-LN BERT stalls at 2e-3 (22% validation, near chance).
BASELINE_LR = {"vit": 2e-3, "bert": 5e-4}
MIN_DENSE_ACCURACY = 0.8  # below this the comparison says little: warn (full size only)


@dataclass(frozen=True)
class Sizes:
    """Data, model and search budgets of one run (the full benchmark or the --quick check)."""

    counts: dict[str, int]
    baseline: BaselineConfig
    target: float
    train_batches: int  # LoRA batches per prune step
    calib_batches: int  # Fisher calibration batches per prune step
    granularities: tuple[str, ...]


SIZES = {
    "full": Sizes(
        counts={"train": 8000, "validation": 1000, "test": 2000},
        baseline=BaselineConfig(hidden_size=96, num_layers=4, num_heads=6, intermediate_size=192, epochs=12),
        target=0.7, train_batches=24, calib_batches=8, granularities=paper_proxy.GRANULARITIES,
    ),
    "quick": Sizes(
        counts={"train": 256, "validation": 64, "test": 64},
        baseline=BaselineConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, epochs=1),
        target=0.2, train_batches=2, calib_batches=1, granularities=("entire_head", "per_head"),
    ),
}


def markdown(results: dict) -> str:
    """The model and its dense accuracy, then the paper proxy's tables."""
    dense = results["dense"]
    return (f"{results['model']} on the synthetic {results['task']} task: dense validation {dense['validation']:.2%}, "
            f"test {dense['test']:.2%} ({dense['params']:,} parameters); pruned to {results['target']:.0%} "
            f"attention sparsity\n\n" + paper_proxy.markdown(results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SYNTHETIC_TASK_OF), default="vit")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds (LoRA init and batch order)")
    parser.add_argument("--target", type=float, default=None, help="attention sparsity to reach (default 0.7)")
    parser.add_argument("--quick", action="store_true", help="tiny data, model and budgets: checks the path, not the answer")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-transfer", help="data, baseline and searches")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/transfer-MODEL.json; with --quick, in --work)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.target is not None and not 0 < args.target < 1:
        parser.error(f"--target must be in (0, 1), got {args.target}")
    if args.out is None:
        args.out = (args.work / f"transfer-{args.model}-quick.json" if args.quick
                    else RESULTS / f"transfer-{args.model}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    sizes = SIZES["quick" if args.quick else "full"]
    target = sizes.target if args.target is None else args.target
    task = SYNTHETIC_TASK_OF[args.model]
    data, baseline = args.work / f"data-{task}", args.work / f"baseline-{args.model}"
    write_synthetic(task, data, sizes.counts)
    sizes = replace(sizes, baseline=replace(sizes.baseline, lr=BASELINE_LR[args.model]))
    record = train_baseline(data, baseline, sizes.baseline)
    if not args.quick and record["validation"] < MIN_DENSE_ACCURACY:
        print(f"warning: the dense model reached only {record['validation']:.2%} validation accuracy; pruning "
              "comparisons on a model that has not learned the task say little", file=sys.stderr)
    grid = paper_proxy.parse_args([
        "--data", str(data), "--baseline", str(baseline), "--seeds", str(args.seeds), "--target", str(target),
        "--granularities", ",".join(sizes.granularities), "--train-batches", str(sizes.train_batches),
        "--calib-batches", str(sizes.calib_batches), "--work", str(args.work / f"search-{args.model}"),
    ])
    results = {"model": args.model, "task": task, "target": target, "quick": args.quick,
               "sizes": asdict(sizes), "dense": record,
               **paper_proxy.run_grid(grid)}
    paper_proxy.write(results, args.out, target, render=markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
