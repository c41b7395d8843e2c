"""Where in the network each strategy prunes: per-layer attention sparsity of a search's trials.

The Pareto front says how far a strategy gets; this says where it cut. It is the paper's
diagnostic: magnitude scores over-prune the early layers, Fisher spreads the cuts differently.
Read from MLflow like the report, so it works on finished, running and resumed searches.
"""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from search.report import collect_points
from search.tracking import LAYER_METRIC, STRATEGY_KEYS

LAYER_COLUMN = "layer_"  # + layer index: the same in a profile


def layer_profile(
    client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str, at_sparsity: float = 0.5
) -> pd.DataFrame:
    """One row per trial: its per-layer sparsity at the step whose attention sparsity is closest to
    `at_sparsity` (ties: the lower step), so trials are compared at the same overall budget.

    Columns: trial, strategy, granularity, scorer, threshold, step, attention_sparsity, `metric`,
    layer_0 ... layer_{L-1}. Trials without per-layer metrics (not started, or failed before their
    first step) are left out.
    """
    points = collect_points(client, experiment_id, parent_run_id, metric)
    trials = [] if points.empty else points.groupby("run_id", sort=False)
    rows = [row for run_id, steps in trials if (row := _profile_row(client, run_id, steps, metric, at_sparsity))]
    if not rows:
        name = client.get_experiment(experiment_id).name
        raise ValueError(
            f"nothing to profile: no trial of search {parent_run_id} in experiment {name!r} has "
            f"{LAYER_METRIC}<i> metrics together with {metric!r} and attention_sparsity"
        )
    return pd.DataFrame(rows).sort_values(["strategy", "trial"]).reset_index(drop=True)


def _profile_row(
    client: MlflowClient, run_id: str, steps: pd.DataFrame, metric: str, at_sparsity: float
) -> dict | None:
    """A trial's profile row from its points (collect_points rows); None without per-layer metrics."""
    layers = _layer_history(client, run_id)
    candidates = steps[steps["step"].isin(list(layers))]
    if candidates.empty:
        return None
    distance = (candidates["attention_sparsity"] - at_sparsity).abs()
    chosen = candidates.assign(distance=distance).sort_values(["distance", "step"]).iloc[0]
    columns = ["trial", "strategy", *STRATEGY_KEYS, "step", "attention_sparsity", metric]
    return {
        **{column: chosen[column] for column in columns},
        **{f"{LAYER_COLUMN}{i}": value for i, value in enumerate(layers[int(chosen["step"])])},
    }


def _layer_history(client: MlflowClient, run_id: str) -> dict[int, list[float]]:
    """Per-layer sparsity of a run by prune step, for the steps where every layer was logged."""
    keys = [key for key in client.get_run(run_id).data.metrics if key.startswith(LAYER_METRIC)]
    indices = sorted(int(key.removeprefix(LAYER_METRIC)) for key in keys)
    by_step: dict[int, dict[int, float]] = {}
    for index in indices:
        for entry in client.get_metric_history(run_id, f"{LAYER_METRIC}{index}"):
            by_step.setdefault(entry.step, {})[index] = entry.value
    return {step: [values[i] for i in indices] for step, values in by_step.items() if len(values) == len(indices)}


def layer_columns(profile: pd.DataFrame) -> list[str]:
    """The profile's layer_<i> columns, in layer order (layer_10 after layer_9)."""
    columns = [column for column in profile.columns if column.startswith(LAYER_COLUMN)]
    return sorted(columns, key=lambda column: int(column.removeprefix(LAYER_COLUMN)))


def scorer_heatmap(profile: pd.DataFrame) -> pd.DataFrame:
    """Mean per-layer sparsity by scorer (rows: scorer, columns: layer index), to compare where
    magnitude and Fisher put the cuts at the same overall sparsity."""
    columns = layer_columns(profile)
    heatmap = profile.groupby("scorer")[columns].mean()
    heatmap.columns = pd.Index([int(column.removeprefix(LAYER_COLUMN)) for column in columns], name="layer")
    return heatmap
