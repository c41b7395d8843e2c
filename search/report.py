"""The Pareto report, built from what MLflow holds (so it works on finished, running and resumed searches).

Every (trial, step) point of the search's child runs is collected; the non-dominated set over
(attention sparsity up, accuracy up) is written as a Parquet table, a PNG plot, a self-contained
HTML page, and logged on the parent run with the metric `pareto_hypervolume`. With the front's models
evaluated on another split (`search.evaluate`), the table gains that column and the report the front's
hypervolume on that split.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from prune_core.session import schedule_summary
from search.pareto import hypervolume, pareto_front
from search.tracking import LINEAGE_TAG, SEARCH_TAG, SEGMENT_TAG, STOPPED_TAG, STRATEGY_KEYS, Event

# Hypervolume reference point: sparsity 0 (the dense model) and accuracy 0 (stated in the report).
REFERENCE = (0.0, 0.0)


@dataclass(frozen=True)
class Report:
    points: pd.DataFrame
    front: pd.DataFrame
    hypervolume: float
    latency_front: pd.DataFrame
    files: dict[str, Path]
    split: str | None = None  # the split the front's models were evaluated on again: column `<split>_<metric>`
    split_hypervolume: float | None = None  # of the same front, measured on that split


def find_parent(client: MlflowClient, experiment_name: str) -> tuple[str, str]:
    """(experiment id, parent run id) of the newest search in that MLflow experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r} at {client.tracking_uri}")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` != ''", order_by=["attributes.start_time DESC"]
    )
    parents = [run for run in parents if "mlflow.parentRunId" not in run.data.tags]
    if not parents:
        raise ValueError(f"experiment {experiment_name!r} has no search (parent) run yet")
    return experiment.experiment_id, parents[0].info.run_id


def collect_points(client: MlflowClient, experiment: str, parent: str, metric: str) -> pd.DataFrame:
    """One row per (trial segment, step) with its strategy, schedule and state, from the search's child runs."""
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    rows = []
    for run in children:
        history: dict[int, dict] = {}
        for key in (metric, *POINT_METRICS):
            for entry in client.get_metric_history(run.info.run_id, key):
                history.setdefault(entry.step, {})[key] = entry.value
        tags = run.data.tags
        trial = {
            "trial": run.info.run_name,
            "segment": int(tags.get(SEGMENT_TAG, "0")),
            "run_id": run.info.run_id,
            "config": {**run.data.params, **{k: tags.get(k) for k in STRATEGY_KEYS}},
            "status": run.info.status,
            "asha_stopped": tags.get(STOPPED_TAG) == "true",
        }
        lineage = json.loads(tags.get(LINEAGE_TAG, "null"))  # the strategy of each step, as of the last one
        rows += [_row(trial, step, values, metric, lineage) for step, values in sorted(history.items())]
    return _frame(rows)


def tune_points(events: list[Event], metric: str) -> pd.DataFrame:
    """The same rows from Tune's stored results (`tracking.tune_events`): the report when MLflow is down."""
    trials: dict[str, dict] = {}
    rows = []
    for event in events:
        if event.kind == "result":
            trial = trials.setdefault(
                event.run_key,
                {"trial": event.run_key, "trial_id": event.trial_id, "segment": event.segment, "run_id": None,
                 "config": event.config, "status": "RUNNING", "asha_stopped": False},
            )
            rows.append((trial, int(event.result["step"]), event.result))
            continue
        ended = [t for t in trials.values() if t["trial_id"] == event.trial_id]
        for trial in ended[:-1]:  # the segments before the last: population-based training replaced them
            trial["status"] = "FINISHED"
        if ended and event.kind == "finished":
            ended[-1].update(status="FINISHED", asha_stopped=not event.result.get("final", False))
        elif ended and event.kind == "failed":
            ended[-1]["status"] = "FAILED"
    return _frame([_row(trial, step, values, metric, _lineage(values)) for trial, step, values in rows])


def _lineage(values: dict) -> list[str] | None:
    return json.loads(values["lineage"]) if values.get("lineage") else None


POINT_METRICS = ("attention_sparsity", "latency_ms", "params", "macs")
COUNTS = ("params", "macs")  # integers; MLflow stores every metric as a float


def _row(trial: dict, step: int, values: dict, metric: str, lineage: list[str] | None) -> dict | None:
    """A point of the report; None until both the metric and the sparsity of that step are known.

    `lineage` lists the strategy of each step up to at least `step` (from the dense model); a search
    from before schedules were recorded has none, and its trials kept one strategy throughout."""
    if values.get(metric) is None or values.get("attention_sparsity") is None:
        return None
    config = trial["config"]
    strategy = "/".join(str(config.get(k)) for k in STRATEGY_KEYS)
    steps = lineage[:step] if lineage else [strategy] * step
    return {
        "trial": trial["trial"],
        "segment": trial.get("segment", 0),
        "run_id": trial["run_id"],
        "strategy": strategy,
        "schedule": schedule_summary([{"strategy": name} for name in steps]),
        **{k: config.get(k) for k in STRATEGY_KEYS},
        "step_ratio": float(config.get("step_ratio", "nan")),
        "lora_rank": str(config.get("lora_rank")),
        "step": step,
        metric: float(values[metric]),
        **{k: (None if values.get(k) is None else float(values[k])) for k in POINT_METRICS},
        "status": trial["status"],
        "asha_stopped": trial["asha_stopped"],
    }


def _frame(rows: list[dict | None]) -> pd.DataFrame:
    frame = pd.DataFrame([row for row in rows if row is not None])
    return frame.astype({key: "Int64" for key in COUNTS if key in frame})


def front_of(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The non-dominated rows over (attention sparsity up, `metric` up), by sparsity."""
    pairs = list(zip(points["attention_sparsity"], points[metric]))
    return points.iloc[pareto_front(pairs)].reset_index(drop=True)


def build_report(
    points: pd.DataFrame, metric: str, out: Path, title: str, evaluated: pd.Series | None = None
) -> Report:
    """Front, hypervolume and the three files, written under `out`.

    `evaluated` (from `search.evaluate.evaluate_rows`, named by its split) is the metric of the front's
    models on another split, by (trial, step): the front keeps its rows and gains that column, and the
    report the hypervolume of that front measured on that split."""
    out.mkdir(parents=True, exist_ok=True)
    if points.empty:
        raise ValueError("no (trial, step) points with metrics yet: nothing to report")
    front = front_of(points, metric)
    volume = hypervolume(list(zip(points["attention_sparsity"], points[metric])), REFERENCE)
    split, split_volume = None, None
    if evaluated is not None:
        split, column = str(evaluated.name), f"{evaluated.name}_{metric}"
        front = front.join(evaluated.rename(column), on=["trial", "step"])
        lacking = front.loc[front[column].isna(), ["trial", "step"]]
        if len(lacking):
            missing = [tuple(row) for row in lacking.itertuples(index=False)]
            raise ValueError(f"the {split} evaluation lacks these (trial, step) points of the front: {missing}")
        split_volume = hypervolume(list(zip(front["attention_sparsity"], front[column])), REFERENCE)
    timed = points.dropna(subset=["latency_ms"])
    latency_pairs = list(zip(-timed["latency_ms"], timed[metric]))
    latency_front = timed.iloc[pareto_front(latency_pairs)].reset_index(drop=True) if len(timed) else timed
    files = {"table": out / "pareto.parquet", "plot": out / "pareto.png", "html": out / "report.html"}
    front.to_parquet(files["table"], index=False)
    _plot(points, front, metric, files["plot"], title)
    _html(points, front, latency_front, metric, volume, files, title, split, split_volume)
    return Report(points, front, volume, latency_front, files, split, split_volume)


def _plot(points: pd.DataFrame, front: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5), dpi=110)
    for strategy, group in points.groupby("strategy"):
        for _, trial in group.groupby("trial"):
            trial = trial.sort_values("step")
            axis.plot(100 * trial["attention_sparsity"], trial[metric], alpha=0.25, linewidth=1, color="grey")
        axis.scatter(100 * group["attention_sparsity"], group[metric], s=18, label=strategy, alpha=0.8)
    ordered = front.sort_values("attention_sparsity")
    axis.step(100 * ordered["attention_sparsity"], ordered[metric], where="pre", color="black", linewidth=1.5)
    axis.scatter(100 * ordered["attention_sparsity"], ordered[metric], s=60, facecolors="none", edgecolors="black",
                 label="Pareto front")
    axis.set_xlabel("attention sparsity (%)")
    axis.set_ylabel(metric)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _table(frame: pd.DataFrame, metric: str, split: str | None = None) -> str:
    evaluated = [f"{split}_{metric}"] if split else []
    columns = ["trial", "schedule", "step_ratio", "lora_rank", "step", "attention_sparsity", metric, *evaluated,
               "latency_ms", "params"]
    columns = [c for c in columns if c in frame]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row[c]))}</td>" for c in columns) + "</tr>" for _, row in frame.iterrows()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _html(points, front, latency_front, metric: str, volume: float, files: dict[str, Path], title: str,
          split: str | None, split_volume: float | None) -> None:
    image = base64.b64encode(files["plot"].read_bytes()).decode()
    stopped = points.groupby("trial")["asha_stopped"].first().sum()
    on_split = "" if split is None else (
        f"The same front's models evaluated on the {html.escape(split)} split: hypervolume <b>{split_volume:.4f}</b> "
        f"(same reference point; column {html.escape(split)}_{metric})."
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;font-size:0.85em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{points['trial'].nunique()} trials ({stopped} stopped early by ASHA), {len(points)} (trial, step) points.
Hypervolume of the accuracy&ndash;sparsity front: <b>{volume:.4f}</b> (reference point: attention sparsity 0, {metric} 0).
{on_split}</p>
<img src="data:image/png;base64,{image}" alt="Pareto front">
<h2>Pareto front: {metric} up, attention sparsity up</h2>{_table(front, metric, split)}
<h2>Latency view: {metric} up, latency down</h2>{_table(latency_front, metric)}
</body></html>"""
    files["html"].write_text(page)


def log_report(client: MlflowClient, parent: str, report: Report, metric: str) -> None:
    """Attach the report files and `pareto_hypervolume` to the search's parent run; with a split evaluation,
    `pareto_hypervolume_<split>` there too and `<split>_<metric>` on each front point's child run at its step."""
    for path in report.files.values():
        client.log_artifact(parent, str(path), artifact_path="pareto")
    client.log_metric(parent, "pareto_hypervolume", report.hypervolume)
    if report.split is None:
        return
    client.log_metric(parent, f"pareto_hypervolume_{report.split}", report.split_hypervolume)
    column = f"{report.split}_{metric}"
    for _, row in report.front.iterrows():
        logged = {entry.step for entry in client.get_metric_history(row["run_id"], column)}
        if int(row["step"]) not in logged:  # once per step, however often the report is rebuilt
            client.log_metric(row["run_id"], column, float(row[column]), step=int(row["step"]))


def print_front(report: Report, metric: str) -> None:
    """The front as a table on the terminal."""
    column = None if report.split is None else f"{report.split}_{metric}"
    extra = "" if column is None else f"{column:>{len(column) + 2}}"
    print(f"{'trial':<16}{'step':>5}{'sparsity':>10}{metric:>10}{extra}{'latency ms':>12}  schedule")
    for _, row in report.front.iterrows():
        latency = "" if pd.isna(row["latency_ms"]) else f"{row['latency_ms']:.2f}"
        value = "" if column is None else f"{row[column]:>{len(column) + 2}.4f}"
        print(
            f"{str(row['trial'])[:15]:<16}{row['step']:>5}"
            f"{row['attention_sparsity']:>10.1%}{row[metric]:>10.4f}{value}{latency:>12}  {row['schedule']}"
        )
    print(f"hypervolume {report.hypervolume:.4f} (reference: sparsity 0, {metric} 0)")
    if column is not None:
        print(f"hypervolume of this front on {report.split}: {report.split_hypervolume:.4f} (same reference, {column})")
