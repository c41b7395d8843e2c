"""Does the search find the accuracy–sparsity front for less compute than trying strategies blindly?

At the same compute budget (prune steps run, all trials together) it compares
  optuna_asha          Optuna TPE proposes, ASHA stops on the area under the accuracy–sparsity curve
  optuna_pareto_asha   the same with the Pareto-aware MO-ASHA scheduler (search/schedulers.py)
  random               Optuna's random sampler over the same space, no early stopping
  grid                 the paper's 12 strategies (3 granularities x 2 scorers x 2 thresholds), 10% steps
on the embedded data and baseline (`make demo` writes them), for several seeds. For each run it
replays the order in which prune steps finished and reports the hypervolume of the front after
every step, the steps needed to reach 95% of the best final hypervolume seen, and medians.

    python -m benchmarks.search_efficiency [--seeds 3] [--budget 60] [--methods grid,random,...]
    python -m benchmarks.search_efficiency --from-json benchmarks/results/search_efficiency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import (RESULTS, ROOT, add_demo_inputs, add_from_json, demo_inputs_missing, environment,
                               markdown_table, print_from_json, write_results)
METHODS = {
    "optuna_asha": {"searcher": "optuna", "scheduler": "asha"},
    "optuna_pareto_asha": {"searcher": "optuna", "scheduler": "pareto_asha"},
    "random": {"searcher": "random", "scheduler": "none"},
    "grid": {"searcher": "grid", "scheduler": "none"},
}
STRATEGIES = {
    "granularity": ["entire_head", "per_head", "same_channel"],
    "scorer": ["magnitude", "fisher"],
    "threshold": ["global", "local"],
}
# What Optuna and random search may choose (the demo's space); the grid fixes the recovery settings.
SPACE = {
    **STRATEGIES,
    "step_ratio": [0.1, 0.125, 0.25],
    "lora_rank": [4, 8, 16],
    "lora_alpha": [8, 16, 32],
    "lr": {"loguniform": [3.0e-4, 3.0e-3]},
    "epochs": 1,
}
GRID_SPACE = {**STRATEGIES, "step_ratio": 0.1, "lora_rank": 8, "lora_alpha": 16, "lr": 1.0e-3, "epochs": 1}
# Steps to reach these fractions of the best final hypervolume: 95% is near the top, where the last
# strategies decide; 90% is how fast a method gets most of the way there.
REACHES = (0.9, 0.95)
HV_FLOOR = 0.10  # hypervolume reference: sparsity 0, the dense metric minus this


def search_config(method: str, seed: int, args: argparse.Namespace, work: Path) -> Path:
    """The YAML search config of one (method, seed) run."""
    config = {
        "experiment": f"eff-{method}-s{seed}",
        "data": str(args.data),
        "baseline": str(args.baseline),
        "target_sparsity": args.target,
        "schedule": "linear",
        "trials": args.budget,  # an upper bound: the step budget ends the search
        "step_budget": args.budget,
        "max_concurrent": args.concurrent,
        "seed": seed,
        "points_to_evaluate": [],
        "calib_batches": args.calib_batches,
        "train_batches_per_step": args.train_batches,
        "latency_repeats": 3,
        "storage": str(work / "ray"),
        "resources": {"cpu": 1, "gpu": 0},
        "asha": {"grace_period": 10, "reduction_factor": 2},
        "loader": {"batch_size": 64, "eval_batch_size": 256},
        "space": GRID_SPACE if method == "grid" else SPACE,
        **METHODS[method],
    }
    path = work / f"{config['experiment']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def step_order(experiment_dir: str, metric: str) -> list[tuple[float, float]]:
    """Every prune step the search ran as (sparsity, metric), in the order the steps finished."""
    from ray.tune import ExperimentAnalysis

    rows = []
    for frame in ExperimentAnalysis(experiment_dir).trial_dataframes.values():
        if not frame.empty:
            rows += frame[["timestamp", "time_total_s", "attention_sparsity", metric]].to_dict("records")
    rows.sort(key=lambda r: (r["timestamp"], r["time_total_s"]))
    return [(float(r["attention_sparsity"]), float(r[metric])) for r in rows]


def hypervolume_curve(points: list[tuple[float, float]], reference: tuple[float, float]) -> list[float]:
    """Hypervolume of the front of the first k steps, for k = 1..len(points)."""
    from search.pareto import hypervolume

    return [hypervolume(points[: k + 1], reference) for k in range(len(points))]


def run_one(method: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    from search.runner import run
    from search.space import load_config

    path = search_config(method, seed, args, work)
    started = time.perf_counter()
    code = run(load_config(path), runs_dir=work / "runs")
    seconds = time.perf_counter() - started
    state = json.loads((work / "runs" / f"eff-{method}-s{seed}" / "search.json").read_text())
    points = step_order(state["experiment_dir"], state["metric"])
    dense = state["settings"]["dense"]
    return {"method": method, "seed": seed, "exit_code": code, "seconds": seconds, "dense": dense,
            "metric": state["metric"], "points": points}


def summarize(runs: list[dict], budget: int) -> dict:
    """Per run: the hypervolume curve within the budget and the steps to reach each of `REACHES` of the
    best final hypervolume over all runs; per method: medians (of the runs that reached it, when most did)."""
    dense = statistics.median(r["dense"] for r in runs)
    reference = (0.0, max(0.0, dense - HV_FLOOR))
    for r in runs:
        r["hypervolume"] = hypervolume_curve(r["points"][:budget], reference)
    best = max(r["hypervolume"][-1] for r in runs if r["hypervolume"])
    methods = {}
    for r in runs:
        curve = r["hypervolume"]
        r["steps_to_reach"] = {f"{level:.0%}": next((k + 1 for k, hv in enumerate(curve) if hv >= level * best), None)
                               for level in REACHES}
        r["final_hypervolume"] = curve[-1] if curve else 0.0
        r["steps_run"] = len(curve)
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        steps, reached = {}, {}
        for level in (f"{level:.0%}" for level in REACHES):
            hits = [r["steps_to_reach"][level] for r in mine if r["steps_to_reach"][level] is not None]
            steps[level] = statistics.median(hits) if len(hits) * 2 > len(mine) else None
            reached[level] = f"{len(hits)}/{len(mine)}"
        methods[method] = {
            "runs": len(mine),
            "median_final_hypervolume": statistics.median(r["final_hypervolume"] for r in mine),
            "median_steps_to_reach": steps,
            "reached": reached,
            "median_steps_run": statistics.median(r["steps_run"] for r in mine),
            "median_seconds": statistics.median(r["seconds"] for r in mine),
            "median_best_sparsity_within_1pt": statistics.median(_sparsest_near_dense(r["points"][:budget], dense) for r in mine),
        }
    return {"reference": reference, "best_final_hypervolume": best, "reach": list(REACHES), "methods": methods}


def _sparsest_near_dense(points: list[tuple[float, float]], dense: float) -> float:
    """The most attention sparsity a run reached within 1 point of the dense metric (0 if none)."""
    return max((s for s, m in points if m >= dense - 0.01), default=0.0)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5), dpi=110)
    for method in results["summary"]["methods"]:
        curves = [r["hypervolume"] for r in results["runs"] if r["method"] == method and r["hypervolume"]]
        length = max(len(c) for c in curves)
        padded = [c + [c[-1]] * (length - len(c)) for c in curves]
        steps = range(1, length + 1)
        median = [statistics.median(c[k] for c in padded) for k in range(length)]
        axis.plot(steps, median, label=method, linewidth=1.8)
        axis.fill_between(steps, [min(c[k] for c in padded) for k in range(length)],
                          [max(c[k] for c in padded) for k in range(length)], alpha=0.15)
    best = results["summary"]["best_final_hypervolume"]
    for level, style in zip(REACHES, (":", "--")):
        axis.axhline(level * best, color="grey", linestyle=style, linewidth=1, label=f"{level:.0%} of the best final")
    axis.set_xlabel("prune steps run (all trials together)")
    axis.set_ylabel("hypervolume of the accuracy–sparsity front")
    axis.set_title("search efficiency: median over seeds (band: min–max)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def markdown(results: dict) -> str:
    """Per method, the medians over seeds (wall time included); then every run, seed by seed."""
    levels = [f"{level:.0%}" for level in REACHES]
    header = ("method", "runs", "final hypervolume", *(f"steps to {level} of best (reached)" for level in levels),
              "sparsest within 1 pt of dense", "minutes")
    methods = [
        (method, m["runs"], f"{m['median_final_hypervolume']:.4f}",
         *(("not reached" if m["median_steps_to_reach"][level] is None else f"{m['median_steps_to_reach'][level]:g}")
           + f" ({m['reached'][level]})" for level in levels),
         f"{m['median_best_sparsity_within_1pt']:.1%}", f"{m['median_seconds'] / 60:.1f}")
        for method, m in results["summary"]["methods"].items()
    ]
    runs = [
        (r["seed"], r["method"], f"{r['final_hypervolume']:.4f}",
         *("not reached" if r["steps_to_reach"][level] is None else r["steps_to_reach"][level] for level in levels),
         f"{r['seconds'] / 60:.1f}")
        for r in sorted(results["runs"], key=lambda r: r["seed"])
    ]
    summary = results["summary"]
    return "\n".join([
        f"Medians over seeds; hypervolume reference (sparsity 0, metric {summary['reference'][1]:.4f}); best final "
        f"hypervolume of all runs {summary['best_final_hypervolume']:.4f}; a median of steps is given when most "
        "seeds reached the level.",
        "",
        *markdown_table(header, methods),
        "",
        *markdown_table(("seed", "method", "final hypervolume", *(f"steps to {level}" for level in levels), "minutes"),
                        runs),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_inputs(parser)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=60, help="prune steps per run (the grid needs 60 to reach 50%%)")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=8, help="LoRA batches per prune step")
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-search-efficiency")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_efficiency.json")
    add_from_json(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    if demo_inputs_missing(args):
        return 2
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each run tracks into the benchmark's own store
    args.work.mkdir(parents=True, exist_ok=True)
    done_file = args.work / "runs.json"  # finished runs survive an interrupted benchmark
    done = json.loads(done_file.read_text()) if done_file.is_file() else []
    runs = []
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            previous = [r for r in done if (r["method"], r["seed"], r.get("budget")) == (method, seed, args.budget)]
            if previous:
                runs.append(previous[0])
                continue
            print(f"\n=== {method}, seed {seed} ===", flush=True)
            runs.append({**run_one(method, seed, args, args.work), "budget": args.budget})
            done.append(runs[-1])
            done_file.write_text(json.dumps(done))
    results = {"environment": environment(packages=("torch", "transformers", "ray", "optuna")), "settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    results["summary"] = summarize(runs, args.budget)
    write_results(results, args.out)
    plot(results, args.out.with_suffix(".png"))
    print("\n" + markdown(results))
    print(f"\nresults: {args.out}\nplot:    {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
