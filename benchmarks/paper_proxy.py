"""The paper's grid on this machine: do its findings hold for the small AST on the synthetic commands?

Runs the 12 strategies (3 granularities x 2 scorers x 2 thresholds; 10% compounding steps to 50%
attention sparsity, LoRA after each step) with `searcher: grid` on the embedded data and baseline
(`make demo` writes them), for a few seeds, and answers from the results, whichever way they come out:
  - does Fisher beat magnitude at 50% attention sparsity?
  - does a global threshold beat a local one?
  - does entire-head pruning beat channel pruning (per_head, same_channel)?
  - which layers does each strategy prune most?
Each comparison pairs strategies that differ only in that factor (same seed) and reports the mean
difference in validation and test accuracy and how many pairs the first side wins.

    python -m benchmarks.paper_proxy [--seeds 2] [--train-batches 24]
    python -m benchmarks.paper_proxy --from-json benchmarks/results/paper_proxy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from benchmarks.common import (RESULTS, ROOT, add_demo_inputs, add_from_json, demo_inputs_missing, environment,
                               markdown_table, print_from_json, write_results)
GRANULARITIES = ("entire_head", "per_head", "same_channel")
SPACE = {
    "granularity": list(GRANULARITIES),
    "scorer": ["magnitude", "fisher"],
    "threshold": ["global", "local"],
    "step_ratio": 0.1,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lr": 1.0e-3,
    "epochs": 1,
}
# (question, factor, first side, second side): the first side "wins" a pair when it is more accurate
QUESTIONS = (
    ("Fisher beats magnitude", "scorer", ("fisher",), ("magnitude",)),
    ("global beats local", "threshold", ("global",), ("local",)),
    ("entire head beats channel pruning", "granularity", ("entire_head",), ("per_head", "same_channel")),
    ("per head beats same channel", "granularity", ("per_head",), ("same_channel",)),
)


def search_config(seed: int, args: argparse.Namespace) -> Path:
    config = {
        "experiment": f"paper-proxy-s{seed}",
        "data": str(args.data),
        "baseline": str(args.baseline),
        "target_sparsity": args.target,
        "schedule": "compound",
        "searcher": "grid",
        "scheduler": "none",
        "max_concurrent": args.concurrent,
        "seed": seed,
        "calib_batches": args.calib_batches,
        "train_batches_per_step": args.train_batches,
        "latency_repeats": 5,
        "storage": str(args.work / "ray"),
        "resources": {"cpu": 1, "gpu": 0},
        "loader": {"batch_size": 64, "eval_batch_size": 256},
        "space": {**SPACE, "granularity": list(args.granularities)},
    }
    path = args.work / f"{config['experiment']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_points(runs_dir: Path, experiment: str, at_sparsity: float) -> tuple[list[dict], list[dict]]:
    """Every trial at its last step: (strategy, sparsity, validation and test metric), and its per-layer sparsity."""
    from mlflow.tracking import MlflowClient

    from search.analysis import layer_columns, layer_profile
    from search.report import collect_points

    state = json.loads((runs_dir / experiment / "search.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    metric = state["metric"]
    points = collect_points(client, state["mlflow_experiment"], state["parent_run"], metric)
    last = points.sort_values("step").groupby("trial").tail(1)
    rows = []
    for _, row in last.iterrows():
        test = client.get_metric_history(row["run_id"], f"test_{metric}")
        rows.append({
            "granularity": row["granularity"], "scorer": row["scorer"], "threshold": row["threshold"],
            "attention_sparsity": float(row["attention_sparsity"]), "validation": float(row[metric]),
            "test": test[-1].value if test else None, "latency_ms": float(row["latency_ms"]),
            "dense": state["settings"]["dense"],
        })
    profile = layer_profile(client, state["mlflow_experiment"], state["parent_run"], metric, at_sparsity)
    layers = [{"strategy": r["strategy"], "scorer": r["scorer"], "layers": [float(r[c]) for c in layer_columns(profile)]}
              for _, r in profile.iterrows()]
    return rows, layers


def compare(rows: list[dict]) -> list[dict]:
    """Each question over pairs of strategies that differ only in its factor, within a seed."""
    answers = []
    for question, factor, first, second in QUESTIONS:
        others = [k for k in ("granularity", "scorer", "threshold") if k != factor]
        pairs = []
        for a in rows:
            if a[factor] not in first:
                continue
            for b in rows:
                if b[factor] in second and b["seed"] == a["seed"] and all(a[k] == b[k] for k in others):
                    pairs.append((a, b))
        if not pairs:  # the run does not vary this factor (e.g. --granularities without same_channel)
            continue
        answer = {"question": question, "pairs": len(pairs)}
        for split in ("validation", "test"):
            diffs = [a[split] - b[split] for a, b in pairs if a[split] is not None and b[split] is not None]
            answer[f"{split}_mean_diff"] = statistics.fmean(diffs) if diffs else None
            answer[f"{split}_wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)} (ties {sum(d == 0 for d in diffs)})"
        answer["verdict"] = _verdict(answer["test_mean_diff"], [a["test"] - b["test"] for a, b in pairs])
        answers.append(answer)
    return answers


def _verdict(mean: float | None, diffs: list[float]) -> str:
    """'yes' / 'no' when the paired differences agree in sign at least 3 times in 4, else 'unclear'."""
    if not diffs or mean is None:
        return "no data"
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    if wins >= 0.75 * len(diffs):
        return "yes"
    if losses >= 0.75 * len(diffs):
        return "no"
    return "unclear (within noise)"


def layer_summary(layers: list[dict]) -> list[dict]:
    """Per strategy: mean per-layer sparsity over seeds, and the layer it prunes most."""
    by_strategy: dict[str, list[list[float]]] = {}
    for entry in layers:
        by_strategy.setdefault(entry["strategy"], []).append(entry["layers"])
    summary = []
    for strategy, profiles in sorted(by_strategy.items()):
        mean = [statistics.fmean(values) for values in zip(*profiles)]
        uniform = max(mean) - min(mean) < 0.01  # a local threshold cuts every layer alike: no layer stands out
        summary.append({"strategy": strategy, "mean_layer_sparsity": mean,
                        "most_pruned_layer": None if uniform else mean.index(max(mean))})
    return summary


def plot_layers(summary: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array([s["mean_layer_sparsity"] for s in summary])
    figure, axis = plt.subplots(figsize=(8, 0.9 + 0.35 * len(summary)), dpi=110)
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.5 else "black")
    axis.set_yticks(range(len(summary)), [s["strategy"] for s in summary], fontsize=8)
    axis.set_xticks(range(matrix.shape[1]))
    axis.set_xlabel("layer (0 = next to the input)")
    axis.set_title(f"per-layer attention sparsity at ~{target:.0%} overall (mean over seeds)", fontsize=9)
    figure.colorbar(image, ax=axis, label="fraction removed")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def markdown(results: dict) -> str:
    """The answers to the questions, then every strategy (best test accuracy first), then where each cuts."""
    grouped: dict[tuple, list[dict]] = {}
    for row in results["rows"]:
        grouped.setdefault((row["granularity"], row["scorer"], row["threshold"]), []).append(row)
    strategies = []
    for key, rows in sorted(grouped.items(), key=lambda kv: -statistics.fmean(r["test"] or 0 for r in kv[1])):
        values = {k: [r[k] for r in rows if r[k] is not None] for k in ("attention_sparsity", "validation", "test")}
        strategies.append(("/".join(key), f"{statistics.fmean(values['attention_sparsity']):.1%}",
                           _mean_sd(values["validation"]), _mean_sd(values["test"])))
    dense = statistics.fmean(r["dense"] for r in results["rows"])
    answers = [(a["question"], a["pairs"], _pts(a["validation_mean_diff"]), a["validation_wins"],
                _pts(a["test_mean_diff"]), a["test_wins"], a["verdict"]) for a in results["answers"]]
    layers = [(s["strategy"], "all alike" if s["most_pruned_layer"] is None else s["most_pruned_layer"],
               " ".join(f"{v:.2f}" for v in s["mean_layer_sparsity"])) for s in results["layers"]]
    return "\n".join([
        *markdown_table(("question", "pairs", "mean diff (validation)", "wins (validation)", "mean diff (test)",
                         "wins (test)", "answer (test)"), answers),
        "",
        f"Dense validation accuracy {dense:.2%}; means (± sd) over {results['seeds']} seed(s), best test first:",
        "",
        *markdown_table(("strategy", "attention sparsity", "validation", "test"), strategies),
        "",
        *markdown_table(("strategy", "most pruned layer", "per-layer sparsity (layer 0 first)"), layers),
    ])


def _mean_sd(values: list[float]) -> str:
    sd = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2%}{sd}"


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f} pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_inputs(parser)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--granularities", type=lambda text: tuple(text.split(",")), default=GRANULARITIES,
                        help="comma-separated subset of the grid's (default all three)")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=24, help="LoRA batches per prune step (the demo's)")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-paper-proxy")
    parser.add_argument("--out", type=Path, default=RESULTS / "paper_proxy.json")
    add_from_json(parser)
    args = parser.parse_args(argv)
    unknown = [g for g in args.granularities if g not in GRANULARITIES]
    if unknown:
        parser.error(f"--granularities: {unknown} not in the paper's grid {list(GRANULARITIES)}")
    return args


def run_grid(args: argparse.Namespace) -> dict:
    """The grid through the search for every seed, then the answers: the results a JSON file holds."""
    from search.runner import run
    from search.space import load_config

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the benchmark's own store under --work
    args.work.mkdir(parents=True, exist_ok=True)
    rows, layers = [], []
    for seed in range(args.seeds):
        print(f"\n=== the paper's grid, seed {seed} ===", flush=True)
        code = run(load_config(search_config(seed, args)), runs_dir=args.work / "runs")
        if code != 0:
            print(f"warning: seed {seed}: some trials failed (exit {code})", file=sys.stderr)
        found, profile = final_points(args.work / "runs", f"paper-proxy-s{seed}", args.target)
        rows += [{**row, "seed": seed} for row in found]
        layers += profile
    return {
        "environment": environment(packages=("torch", "transformers", "ray")),
        "settings": {k: str(v) for k, v in vars(args).items()}, "seeds": args.seeds,
        "rows": rows, "answers": compare(rows), "layers": layer_summary(layers),
    }


def write(results: dict, out: Path, target: float, render: Callable[[dict], str] = markdown) -> None:
    """The JSON, the per-layer plot beside it (<name>_layers.png), and the tables (`render`) on stdout."""
    write_results(results, out)
    plot = out.with_name(f"{out.stem}_layers.png")
    plot_layers(results["layers"], plot, target)
    print("\n" + render(results))
    print(f"\nresults: {out}\nplot:    {plot}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    if demo_inputs_missing(args):
        return 2
    write(run_grid(args), args.out, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
