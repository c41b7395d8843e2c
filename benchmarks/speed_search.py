"""Does searching on speed pay? `objectives: [accuracy, speedup]` against the default `[accuracy, sparsity]`.

Protocol, fixed before any run: the embedded task (`make demo`'s commands and small AST), batch 8 at the
baseline's token count, on this CPU. A latency table of THAT architecture is profiled once (one torch thread,
cached in the work folder). Per seed, both searches run at the same step budget and settings (below); the
sparsity search's predicted speedups are computed afterwards from the same table. Then every model on either
search's (validation accuracy, predicted speedup) front, and the dense baseline, is timed interleaved
(round-robin, median per model, speedup = median of the per-round dense/pruned ratios).

Per seed and method: the highest measured speedup among models at most 1 point below dense validation
accuracy (the headline; its test accuracy beside it, to show selection luck), the hypervolume of the
(accuracy, measured speedup) front with reference (0, 1), and minutes. Every finished search and every
seed's measurement is written to the results JSON at once, so the benchmark runs in parts:

    python -m benchmarks.speed_search [--seeds 0,1,2]
    python -m benchmarks.speed_search --quick          # 1 seed, a tiny budget: minutes
    python -m benchmarks.speed_search --from-json benchmarks/results/speed_search-cpu.json
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

from benchmarks.common import RESULTS, ROOT, add_from_json, comma_list, environment, log, markdown_table, print_from_json, write_results

SEEDS = (0, 1, 2)
BATCH = 8
NEAR_DENSE = 0.01  # "at most one point below dense validation accuracy"
METHODS = {"sparsity": ["accuracy", "sparsity"], "speedup": ["accuracy", "speedup"]}
SPACE = {
    "granularity": ["entire_head", "per_head", "same_channel", "hybrid"],
    "scorer": ["magnitude", "fisher"],
    "threshold": ["global", "local"],
    "step_ratio": [0.1, 0.125, 0.25],
    "lora_rank": [4, 8, 16],
    "lora_alpha": [8, 16, 32],
    "lr": {"loguniform": [3.0e-4, 3.0e-3]},
    "epochs": 1,
}
# The run settings, fixed before any run; --step-budget lowers the budget where the machine is too busy (48 steps
# took ~40 s a step at load 20 on 2 cores: 30 minutes a search), --quick shrinks the budget and target.
SETTINGS = {"step_budget": 48, "target_sparsity": 0.7, "train_batches_per_step": 4, "calib_batches": 2}
QUICK_SETTINGS = {**SETTINGS, "step_budget": 6, "target_sparsity": 0.3}
MEASURE = {"rounds": 15, "min_sample_s": 0.1}  # interleaved timing of a seed's models (9 x 0.05 s was noisy at load 15-20)


def headline(points: list[dict], dense_validation: float, near: float = NEAR_DENSE) -> dict | None:
    """The point of highest measured speedup among those at most `near` below dense validation accuracy
    (points: dicts with `validation` and `measured`; those without `measured` are not candidates); None if none."""
    floor = dense_validation - near - 1e-12
    candidates = [p for p in points if p.get("measured") is not None and p["validation"] >= floor]
    return max(candidates, key=lambda p: (p["measured"], p["validation"]), default=None)


def ensure_table(work: Path, shape: dict, tokens: int) -> Path:
    """The latency table of this architecture on this CPU at (tokens, batch 8), profiled once with one thread."""
    from prune_core.latency_model import profile, save_table

    path = work / "table-cpu.json"
    if not path.is_file():
        log(f"profiling the latency table of {shape} at {tokens} tokens, batch {BATCH} -> {path}")
        save_table(profile(device="cpu", tokens=(tokens,), batches=(BATCH,), threads=1, progress=log, **shape), path)
    return path


def baseline_shape(baseline: Path) -> tuple[dict, int]:
    """The profile's architecture arguments and the token count of the baseline's input, from its config.json."""
    path = baseline / "config.json"
    if not path.is_file():
        raise SystemExit(f"error: --baseline: {path} is missing; `make demo` writes the embedded baseline")
    config = json.loads(path.read_text())
    frequency = (config["num_mel_bins"] - 16) // config["frequency_stride"] + 1
    time_patches = (config["max_length"] - 16) // config["time_stride"] + 1
    shape = {"hidden_size": config["hidden_size"], "num_heads": config["num_attention_heads"],
             "num_layers": config["num_hidden_layers"], "intermediate_size": config["intermediate_size"],
             "num_mel_bins": config["num_mel_bins"], "num_labels": len(config["id2label"])}
    return shape, 2 + frequency * time_patches


def search_config(method: str, seed: int, args: argparse.Namespace, table: Path, tokens: int) -> Path:
    """The YAML config of one (method, seed) search."""
    settings = run_settings(args)
    config = {
        "experiment": f"speed-{method}-s{seed}-b{settings['step_budget']}{'-quick' if args.quick else ''}",
        "data": str(args.data), "baseline": str(args.baseline),
        "schedule": "linear", "trials": settings["step_budget"], **settings,
        "max_concurrent": 2, "seed": seed, "latency_repeats": 3,
        "searcher": "optuna", "scheduler": "asha", "points_to_evaluate": "paper",
        "storage": str(args.work / "ray"), "resources": {"cpu": 1, "gpu": 0},
        "asha": {"grace_period": 10, "reduction_factor": 2},
        "loader": {"batch_size": 64, "eval_batch_size": 256},
        "objectives": METHODS[method], "space": SPACE,
    }
    if method == "speedup":
        config |= {"latency_table": str(table), "speedup_at": {"tokens": tokens, "batch": BATCH}}
    path = args.work / f"{config['experiment']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_settings(args: argparse.Namespace) -> dict:
    """The search settings of this invocation: SETTINGS (QUICK_SETTINGS with --quick), with --step-budget."""
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    return settings if args.step_budget is None else {**settings, "step_budget": args.step_budget}


def run_search(method: str, seed: int, args: argparse.Namespace, table: Path, tokens: int) -> dict:
    """One search: every (trial, step) within the budget with its validation accuracy and predicted speedup."""
    from search.runner import run
    from search.space import load_config

    config = load_config(search_config(method, seed, args, table, tokens))
    started = time.perf_counter()
    code = run(config, runs_dir=args.work / "runs")
    return read_search(method, seed, config.experiment, time.perf_counter() - started, code, args, table, tokens)


def read_search(method: str, seed: int, experiment: str, seconds: float, code: int, args: argparse.Namespace,
                table: Path, tokens: int) -> dict:
    """A finished search's (trial, step) points within its budget, with their predicted speedups."""
    from benchmarks.search_efficiency import step_order
    from prune_core import load_pruned
    from prune_core.latency_model import load_table, predicted_speedup
    from search.results import load_state
    from search.space import load_config
    from search.tracking import run_key

    state = load_state(args.work / "runs", experiment)
    config = load_config(state.config_path)
    steps = step_order(state.experiment_dir, state.metric)[: config.step_budget]
    checkpoints = checkpoints_of(state.experiment_dir)
    latency_table = load_table(table)
    points = []
    for s in steps:
        key = (run_key(s["trial"], s["segment"]), s["step"])
        if key not in checkpoints:
            log(f"warning: {config.experiment}: no checkpoint of {key}; left out")
            continue
        with checkpoints[key].as_directory() as directory:
            model = load_pruned(directory)
        points.append({"trial": key[0], "step": key[1], "sparsity": s["sparsity"], "validation": s["validation"],
                       "predicted": predicted_speedup(model, latency_table, tokens=tokens, batch=BATCH),
                       "schedule": s["lineage"]})
    return {"method": method, "seed": seed, "experiment": config.experiment, "exit_code": code, "seconds": seconds,
            "steps_run": len(steps), "dense_validation": state.settings["dense"], "points": points}


def to_measure(points: list[dict]) -> list[int]:
    """Indices of the points on the (validation, predicted speedup) front: the only ones worth timing."""
    from search.pareto import pareto_front

    return pareto_front([(p["validation"], p["predicted"]) for p in points])


def checkpoints_of(experiment_dir: str) -> dict:
    """Every step checkpoint of a search, by (trial segment's run key, step)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from search.evaluate import step_checkpoints

    return step_checkpoints(ResultGrid(ExperimentAnalysis(experiment_dir)))


def measure_seed(runs: list[dict], args: argparse.Namespace, tokens: int) -> dict:
    """Time a seed's front models (both searches') and the dense baseline interleaved, one torch thread, batch 8,
    and set each timed point's `measured` speedup: the median of the per-round dense/pruned time ratios."""
    import torch

    from prune_core import load_model, load_pruned
    from prune_core.latency_model import measure_interleaved
    from search.results import load_state

    dense = load_model(str(args.baseline)).eval()
    inputs = torch.randn(BATCH, dense.config.max_length, dense.config.num_mel_bins)
    models = {"dense": dense}
    for run in runs:
        checkpoints = checkpoints_of(load_state(args.work / "runs", run["experiment"]).experiment_dir)
        for index in to_measure(run["points"]):
            point = run["points"][index]
            with checkpoints[point["trial"], point["step"]].as_directory() as directory:
                models[f"{run['method']}/{point['trial']}/{point['step']}"] = load_pruned(directory).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the table was profiled
    try:
        stats = measure_interleaved({name: (lambda m=m: m(input_values=inputs)) for name, m in models.items()},
                                    progress=log, **MEASURE)
    finally:
        torch.set_num_threads(threads)
    rounds = {name: s.get("interleaved", s)["samples"] for name, s in stats.items()}  # same index, same round
    for run in runs:
        for point in run["points"]:
            name = f"{run['method']}/{point['trial']}/{point['step']}"
            if name in rounds:
                point["measured"] = statistics.median(d / p for d, p in zip(rounds["dense"], rounds[name]))
                point["ms"] = stats[name]["ms"]
    return {"dense_ms": stats["dense"]["ms"], "models": len(models) - 1, "rounds": MEASURE["rounds"]}


def test_accuracy(run: dict, point: dict, args: argparse.Namespace) -> float:
    """The test accuracy of one of a search's models (cached by the search's report)."""
    import pandas as pd

    from search.results import evaluate_steps

    rows = pd.DataFrame({"trial": [point["trial"]], "step": [point["step"]]})
    return float(evaluate_steps(run["experiment"], rows, "test", runs_dir=args.work / "runs").iloc[0])


def summarize_run(run: dict) -> dict:
    """One search's figures: its headline model, the hypervolume of its (accuracy, measured speedup) front."""
    from search.pareto import hypervolume

    best = headline(run["points"], run["dense_validation"])
    timed = [(p["validation"], p["measured"]) for p in run["points"] if p.get("measured") is not None]
    predicted = [(p["validation"], p["predicted"]) for p in run["points"]]
    return {
        "method": run["method"], "seed": run["seed"], "minutes": run["seconds"] / 60, "steps_run": run["steps_run"],
        "headline_speedup": None if best is None else best["measured"],
        "headline_predicted": None if best is None else best["predicted"],
        "headline_validation": None if best is None else best["validation"],
        "headline_test": None if best is None else best.get("test"),
        "headline_sparsity": None if best is None else best["sparsity"],
        "hypervolume": hypervolume(timed, (0.0, 1.0)),
        "predicted_hypervolume": hypervolume(predicted, (0.0, 1.0)),
        "timed": len(timed),
    }


def summarize(results: dict) -> dict:
    """Per measured run its figures; per method the medians over seeds."""
    figures = [summarize_run(run) for run in results["runs"] if str(run["seed"]) in results.get("measured", {})]
    methods = {}
    for method in METHODS:
        mine = [f for f in figures if f["method"] == method]
        if not mine:
            continue
        methods[method] = {"runs": len(mine), **{
            key: statistics.median(values) if (values := [f[key] for f in mine if f[key] is not None]) else None
            for key in ("headline_speedup", "headline_test", "hypervolume", "predicted_hypervolume", "minutes")}}
    return {"runs": figures, "methods": methods}


def markdown(results: dict) -> str:
    """Per seed and method: the headline speedup (its validation and test accuracy), the front's hypervolume
    in (accuracy, measured speedup), minutes; then the medians over seeds."""
    summary = summarize(results)  # from the points, so a results file always reads with today's figures
    dense = {int(seed): m["dense_test"] for seed, m in results.get("measured", {}).items()}

    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    rows = [(f["seed"], f["method"], number(f["headline_speedup"], ".2f") + "x",
             number(f["headline_predicted"], ".2f") + "x", number(f["headline_sparsity"], ".0%"),
             number(f["headline_validation"], ".1%"), number(f["headline_test"], ".1%"),
             number(dense.get(f["seed"]), ".1%"), number(f["hypervolume"], ".3f"), f["timed"], f"{f['minutes']:.1f}")
            for f in sorted(summary["runs"], key=lambda f: (f["seed"], f["method"]))]
    medians = [(m, s["runs"], number(s["headline_speedup"], ".2f") + "x", number(s["headline_test"], ".1%"),
                number(s["hypervolume"], ".3f"), number(s["predicted_hypervolume"], ".3f"), number(s["minutes"], ".1f"))
               for m, s in summary["methods"].items()]
    return "\n".join([
        f"Headline: the highest measured speedup (batch {BATCH}, one thread, dense/pruned) among a search's models at "
        f"most {NEAR_DENSE:.0%} below dense validation accuracy. HV: hypervolume of the (validation accuracy, "
        "measured speedup) front, reference (0, 1x); only models on either search's predicted front are timed.",
        "",
        *markdown_table(("seed", "objectives", "headline speedup", "predicted", "its sparsity", "its validation",
                         "its test", "dense test", "HV", "models timed", "minutes"), rows),
        "",
        "Medians over seeds:",
        "",
        *markdown_table(("objectives", "seeds", "headline speedup", "headline test", "HV", "predicted HV", "minutes"),
                        medians),
    ])


def plot(results: dict, path: Path) -> None:
    """Validation accuracy against measured speedup, one panel per seed: each search's timed models and front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from search.pareto import pareto_front

    seeds = sorted({run["seed"] for run in results["runs"] if str(run["seed"]) in results.get("measured", {})})
    if not seeds:
        return
    figure, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4.5), dpi=110, squeeze=False)
    for axis, seed in zip(axes[0], seeds):
        for run, color in ((r, c) for r in results["runs"] if r["seed"] == seed
                           for c in ["tab:blue" if r["method"] == "sparsity" else "tab:orange"]):
            timed = [(p["measured"], p["validation"]) for p in run["points"] if p.get("measured") is not None]
            front = sorted(timed[i] for i in pareto_front(timed))
            axis.scatter(*zip(*timed), s=14, alpha=0.4, color=color)
            axis.step(*zip(*front), where="pre", color=color, label=f"[accuracy, {run['method']}]")
        dense = next(r["dense_validation"] for r in results["runs"] if r["seed"] == seed)
        axis.axhline(dense, color="grey", linestyle=":", label="dense")
        axis.axhline(dense - NEAR_DENSE, color="grey", linestyle="--", linewidth=0.8, label="dense - 1 pt")
        axis.set_title(f"seed {seed}")
        axis.set_xlabel(f"measured speedup (batch {BATCH}, dense/pruned)")
        axis.set_ylabel("validation accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=lambda t: comma_list(int, t), default=list(SEEDS))
    parser.add_argument("--quick", action="store_true", help="1 seed, a 6-step budget to 30%%: a few minutes")
    parser.add_argument("--step-budget", type=int, default=None, help=f"prune steps per search (default "
                        f"{SETTINGS['step_budget']}, {QUICK_SETTINGS['step_budget']} with --quick)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "commands")
    parser.add_argument("--baseline", type=Path, default=ROOT / "runs" / "baseline")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-speed")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/speed_search-cpu.json "
                        "(with --quick: speed_search-quick.json in --work)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.step_budget is not None and args.step_budget < 1:
        parser.error(f"--step-budget: at least 1 prune step, got {args.step_budget}")
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.out is None:
        args.out = args.work / "speed_search-quick.json" if args.quick else RESULTS / "speed_search-cpu.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"error: --data: {args.data / 'manifest.json'} is missing; `make demo` writes the embedded data")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the searches track into the work folder's own store
    args.work.mkdir(parents=True, exist_ok=True)
    shape, tokens = baseline_shape(args.baseline)
    table = ensure_table(args.work, shape, tokens)
    settings = {**run_settings(args), "tokens": tokens, "batch": BATCH, "measure": MEASURE}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": [], "measured": {}}
    if results["runs"] and results.get("settings") != settings:
        raise SystemExit(f"error: {args.out} holds runs made with {results.get('settings')}; these are {settings}. "
                         "Give the same settings to add runs, or another --out to start afresh.")
    results.setdefault("environment", environment(packages=("torch", "transformers", "ray", "optuna")))
    results["settings"] = settings
    for seed in args.seeds:
        for method in METHODS:
            if any((r["seed"], r["method"]) == (seed, method) for r in results["runs"]):
                continue
            log(f"\n=== seed {seed}, objectives {METHODS[method]} ===")
            results["runs"].append(run_search(method, seed, args, table, tokens))
            write_results(results, args.out)
        if str(seed) in results["measured"]:
            continue
        runs = [r for r in results["runs"] if r["seed"] == seed]
        log(f"\n=== seed {seed}: timing the front models ===")
        measured = measure_seed(runs, args, tokens)
        for run in runs:
            best = headline(run["points"], run["dense_validation"])
            if best is not None:
                best["test"] = test_accuracy(run, best, args)
        baseline = json.loads((args.baseline / "baseline.json").read_text())
        results["measured"][str(seed)] = {**measured, "dense_test": baseline.get("test")}
        results["summary"] = summarize(results)
        write_results(results, args.out)
    results["summary"] = summarize(results)
    write_results(results, args.out)
    plot(results, args.out.with_suffix(".png") if args.quick else RESULTS / "speed_search.png")
    print(markdown(results))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
