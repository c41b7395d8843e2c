"""`prune-search demo`: the whole embedded job on one machine, each stage timed.

Synthesize the spoken commands (eSpeak NG), prepare them (Ray Data), train the small baseline
(cached), search pruning strategies (Ray Tune + Optuna + ASHA, MLflow), write the Pareto report.
"""

from __future__ import annotations

import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def demo(runs: Path, workers: int = 2) -> int:
    from data_prep.features import FeatureParams
    from data_prep.shards import PrepareConfig, prepare
    from data_prep.synth import SynthConfig, synthesize
    from search.baseline import BaselineConfig, train_baseline
    from search.runner import run
    from search.space import load_config

    audio, data, baseline = runs / "data" / "commands-audio", runs / "data" / "commands", runs / "baseline"
    timings: list[tuple[str, float]] = []

    def stage(name: str, action):
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        result = action()
        timings.append((name, time.perf_counter() - started))
        return result

    stage("synthesize spoken commands (eSpeak NG)", lambda: synthesize(audio, SynthConfig(), workers=workers))
    stage(
        "prepare features (Ray Data)",
        lambda: prepare(
            PrepareConfig(
                source="speechcommands",
                input=audio,
                out=data,
                task=35,
                features=FeatureParams(num_mel_bins=64, max_length=100),
                workers=workers,
            )
        ),
    )
    stage("train the baseline", lambda: train_baseline(data, baseline, BaselineConfig()))
    config = load_config(CONFIG, data=str(data), baseline=str(baseline), storage=str(runs / "ray"))
    code = stage("search pruning strategies", lambda: run(config, runs_dir=runs))
    print("\nstage times:")
    for name, seconds in timings:
        print(f"  {name:<42}{seconds:>8.1f} s")
    print(f"  {'total':<42}{sum(s for _, s in timings):>8.1f} s")
    return code
