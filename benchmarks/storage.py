"""Checkpoint storage of a search at AST-base size: every step kept against `checkpoints_to_keep: front`.

    python -m benchmarks.storage [--quick]    |    ... --from-json benchmarks/results/storage.json

A simulated search (search.simulation: the real searcher, schedulers, Tune and checkpoint layout; no pruning)
of 12 trials of up to 10 prune steps, 2 at a time (population-based training: 8 trials, 4 at a time), each
step checkpoint 350 MB of seeded bytes (an AST-base step checkpoint's size). The storage folder is sampled every 0.2 s for its peak size. Kept-everything is not
run: it would write the same bytes and keep them all (the total written, 42 GB at most, more than this
machine's free disk), so its peak is the total written, counted from the steps reported. Both schedulers run:
ASHA (Optuna proposing) and population-based training (clone sources are kept too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.common import RESULTS, add_from_json, environment, log, markdown_table, print_from_json, write_results

MB = 1e6
CHECKPOINT_MB = 350.0  # an AST-base step checkpoint (86M parameters in float32, and LoRA state)
SPACE = {
    "granularity": ["entire_head", "per_head", "same_channel", "hybrid", "variable_per_head"],
    "scorer": ["magnitude", "fisher"], "threshold": ["global", "local"], "step_ratio": 0.1,
    "lora_rank": [4, 8], "lora_alpha": 16, "lr": 1e-3, "epochs": 1,
}
RUNS = {  # fixed before any run
    "asha": {"searcher": "optuna", "scheduler": "asha"},
    "pbt": {"searcher": "random", "scheduler": "pbt", "trials": 8, "max_concurrent": 4,
            "pbt": {"interval": 10, "quantile": 0.25, "resample": 0.5}},
}
SETTINGS = {"trials": 12, "max_concurrent": 2, "target_sparsity": 0.65, "schedule": "compound",  # 10 steps of 10%
            "checkpoints_to_keep": "front"}
QUICK = {"checkpoint_mb": 5.0, "step_seconds": 0.05}


def folder_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # deleted while walking
                pass
    return total


class PeakSampler:
    """The largest size a folder reaches, sampled every `every` seconds in a thread."""

    def __init__(self, root: Path, every: float = 0.2) -> None:
        self.root, self.every, self.peak = root, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.root))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, folder_bytes(self.root))


def run_one(name: str, work: Path, quick: bool) -> dict:
    import ray

    from search.runner import run
    from search.space import load_config

    checkpoint_mb = QUICK["checkpoint_mb"] if quick else CHECKPOINT_MB
    raw = {"experiment": f"storage-{name}", "space": SPACE, **SETTINGS, **RUNS[name], "storage": str(work / "ray"),
           "simulate": {"step_seconds": QUICK["step_seconds"] if quick else 0.5, "checkpoint_mb": checkpoint_mb,
                        "dense_metric": 0.9}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical: 4 simulated trials at once
    try:
        with PeakSampler(work / "ray") as sampler:
            code = run(load_config(path), runs_dir=work / "runs")
    finally:
        ray.shutdown()
    experiment_dir = Path(json.loads((work / "runs" / raw["experiment"] / "search.json").read_text())["experiment_dir"])
    steps = sum(1 for results in experiment_dir.glob("*/result.json")
                for line in results.read_text().splitlines() if line.strip())
    kept = sorted(p for p in experiment_dir.glob("*/checkpoint_*") if (p / "session.json").is_file())
    return {"exit_code": code, "steps": steps, "checkpoint_mb": checkpoint_mb, "written_gb": steps * checkpoint_mb * MB / 1e9,
            "peak_gb": sampler.peak / 1e9, "final_gb": folder_bytes(work / "ray") / 1e9, "kept_checkpoints": len(kept),
            "seconds": time.perf_counter() - started}


def measure(args: argparse.Namespace) -> dict:
    results = {"environment": environment(packages=("ray", "mlflow")), "settings": {**SETTINGS, "runs": RUNS,
               "checkpoint_mb": QUICK["checkpoint_mb"] if args.quick else CHECKPOINT_MB, "quick": args.quick}, "runs": {}}
    for name in RUNS:
        with tempfile.TemporaryDirectory(prefix=f"storage-{name}-", dir=args.work) as work:
            log(f"{name}: simulated search, {results['settings']['checkpoint_mb']:.0f} MB checkpoints ...")
            results["runs"][name] = run_one(name, Path(work), args.quick)
            log(f"{name}: {results['runs'][name]}")
        write_results(results, args.out)
    return results


def markdown(results: dict) -> str:
    rows = [(name, r["steps"], f"{r['written_gb']:.1f}", f"{r['peak_gb']:.2f}", f"{r['final_gb']:.2f}",
             r["kept_checkpoints"], f"{r['written_gb'] / max(r['peak_gb'], 1e-9):.0f}x")
            for name, r in results["runs"].items()]
    header = ("scheduler", "steps", "all kept: GB (= written)", "front: peak GB", "front: at the end GB",
              "checkpoints at the end", "peak saved")
    return "\n".join(markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['checkpoint_mb']} MB checkpoints, short steps")
    parser.add_argument("--work", type=Path, default=None, help="where the searches write (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/storage.json)")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    args.out = args.out or (Path(tempfile.gettempdir()) / "storage-quick.json" if args.quick else RESULTS / "storage.json")
    print(markdown(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
