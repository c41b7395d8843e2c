"""The Pareto report, built from what MLflow holds (so it works on finished, running and resumed searches).

Every (trial, step) point of the search's child runs is collected; the non-dominated set over the
search's objectives (by default accuracy up and attention sparsity up; predicted speedup up when it is
one) is written as a Parquet table, a PNG plot, a self-contained interactive HTML page
(`search.report_page`), and logged on the parent run with the metric `pareto_hypervolume`. With an
`epsilon` per objective the front shown is an epsilon-net of the exact one (a point barely further on
one objective and far behind on another gives way to the real trade-off), and the exact front is kept
beside it. With the front's models evaluated on another split (`search.evaluate`), the tables gain
that column and the report the exact front's hypervolume on that split.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from prune_core.session import schedule_summary
from search.pareto import epsilon_front, hypervolume, pareto_front
from search.report_page import interactive_figure, table, write_page, write_png
from search.space import OBJECTIVE_SETS, objective_keys
from search.tracking import LINEAGE_TAG, SEARCH_TAG, SEGMENT_TAG, STOPPED_TAG, STRATEGY_KEYS, Event, child_runs

# Hypervolume reference point per objective (stated in the report): accuracy 0, sparsity 0 (the dense
# model), speedup 1 (as fast as dense).
REFERENCE = {"accuracy": 0.0, "sparsity": 0.0, "speedup": 1.0}
DEFAULT_OBJECTIVES = OBJECTIVE_SETS[0]


def objective_columns(objectives: Sequence[str], metric: str) -> list[str]:
    """The points' column of each objective: `accuracy` is the task's metric, whatever its name."""
    return list(objective_keys(tuple(objectives), metric))


@dataclass(frozen=True)
class Report:
    points: pd.DataFrame
    front: pd.DataFrame  # the front shown: the exact front, or its epsilon-net when an epsilon was given
    hypervolume: float  # of the exact front
    latency_front: pd.DataFrame
    files: dict[str, Path]
    split: str | None = None  # the split the front's models were evaluated on again: column `<split>_<metric>`
    split_hypervolume: float | None = None  # of the exact front, measured on that split
    exact_front: pd.DataFrame | None = None  # the exact front when `front` is an epsilon-net of it
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES


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


HISTORY_THREADS = 8  # metric histories read at once: each is a round trip, one per metric and run


def collect_points(client: MlflowClient, experiment: str, parent: str, metric: str) -> pd.DataFrame:
    """One row per (trial segment, step) with its strategy, schedule and state, from the search's child runs.

    Six metric histories per run, each a round trip to the store, are read HISTORY_THREADS at a time: over an
    MLflow server (one worker) 200 runs took 6.0 s instead of 8.4 one call after another; sqlite gains nothing."""
    children = child_runs(client, experiment, parent)

    def history(run) -> dict[int, dict]:
        steps: dict[int, dict] = {}
        for key in (metric, *POINT_METRICS):
            for entry in client.get_metric_history(run.info.run_id, key):
                steps.setdefault(entry.step, {})[key] = entry.value
        return steps

    with ThreadPoolExecutor(HISTORY_THREADS) as pool:
        histories = list(pool.map(history, children))
    rows = []
    for run, history in zip(children, histories):
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


POINT_METRICS = ("attention_sparsity", "speedup", "latency_ms", "params", "macs")
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


def front_of(points: pd.DataFrame, metric: str, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """The non-dominated rows over the objectives (all maximized), by attention sparsity."""
    columns = objective_columns(objectives, metric)
    usable = points.dropna(subset=columns)
    chosen = pareto_front(list(zip(*(usable[column] for column in columns))))
    return usable.iloc[chosen].sort_values(["attention_sparsity", metric]).reset_index(drop=True)


def epsilon_net(front: pd.DataFrame, metric: str, objectives: Sequence[str], epsilon: Sequence[float]) -> pd.DataFrame:
    """The rows of `front` that stay in its additive epsilon-net (`search.pareto.epsilon_front`)."""
    columns = objective_columns(objectives, metric)
    kept = epsilon_front(list(zip(*(front[column] for column in columns))), epsilon)
    return front.iloc[sorted(kept)].reset_index(drop=True)


def build_report(
    points: pd.DataFrame, metric: str, out: Path, title: str, evaluated: pd.Series | None = None, *,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES, epsilon: Sequence[float] | None = None,
    dense: Mapping[str, float] | None = None, run_url: str | None = None, deployment: pd.DataFrame | None = None,
) -> Report:
    """Front, hypervolume and the three files, written under `out`.

    `evaluated` (from `search.evaluate.evaluate_rows`, named by its split) is the metric of the front's
    models on another split, by (trial, step): the front keeps its rows and gains that column, and the
    report the hypervolume of that front measured on that split. `epsilon` (one per objective) shows an
    epsilon-net of the front; `dense` (split -> the dense model's metric) draws reference lines;
    `run_url` (with `{run_id}`) links each point to its MLflow run; `deployment` (by trial and step: `export`,
    the command that exports the point's model to ONNX, and `model_uri`, its registered versions) joins the front."""
    out.mkdir(parents=True, exist_ok=True)
    if points.empty:
        raise ValueError("no (trial, step) points with metrics yet: nothing to report")
    objectives = tuple(objectives)
    columns = objective_columns(objectives, metric)
    missing = [column for column in columns if column not in points or points[column].isna().all()]
    if missing:
        raise ValueError(f"the objectives {list(objectives)} need {missing}, which no trial reported")
    if epsilon is not None and (len(epsilon) != len(objectives) or min(epsilon) < 0):
        raise ValueError(f"epsilon needs one value >= 0 per objective {list(objectives)}, got {list(epsilon)}")
    reference = tuple(REFERENCE[name] for name in objectives)
    front = front_of(points, metric, objectives)
    volume = hypervolume(list(zip(*(front[column] for column in columns))), reference)
    split, split_volume = None, None
    if evaluated is not None:
        split, column = str(evaluated.name), f"{evaluated.name}_{metric}"
        front = front.join(evaluated.rename(column), on=["trial", "step"])
        lacking = front.loc[front[column].isna(), ["trial", "step"]]
        if len(lacking):
            missing_points = [tuple(row) for row in lacking.itertuples(index=False)]
            raise ValueError(f"the {split} evaluation lacks these (trial, step) points of the front: {missing_points}")
        on_split = [column if name == "accuracy" else kept for name, kept in zip(objectives, columns)]
        split_volume = hypervolume(list(zip(*(front[c] for c in on_split))), reference)
    if deployment is not None:
        front = front.join(deployment, on=["trial", "step"])
    shown, exact = (front, None) if epsilon is None else (epsilon_net(front, metric, objectives, epsilon), front)
    timed = points.dropna(subset=["latency_ms"])
    latency_pairs = list(zip(-timed["latency_ms"], timed[metric]))
    latency_front = timed.iloc[pareto_front(latency_pairs)].reset_index(drop=True) if len(timed) else timed
    files = {"table": out / "pareto.parquet", "plot": out / "pareto.png", "html": out / "report.html"}
    shown.to_parquet(files["table"], index=False)
    if exact is not None:
        files["exact"] = out / "pareto-exact.parquet"
        exact.to_parquet(files["exact"], index=False)
    found = Report(points, shown, volume, latency_front, files, split, split_volume, exact, objectives)
    dense = dict(dense or {})
    write_png(points, shown, metric, dense, files["plot"], title)
    _html(found, metric, title, dense, run_url, epsilon)
    return found


def _html(report: Report, metric: str, title: str, dense: Mapping[str, float], run_url: str | None,
          epsilon: Sequence[float] | None) -> None:
    points, names = report.points, " &times; ".join(report.objectives)
    stopped = points.groupby("trial")["asha_stopped"].first().sum()
    reference = ", ".join(f"{name} {REFERENCE[name]:g}" for name in report.objectives)
    on_split = "" if report.split is None else (
        f" The same front's models evaluated on the {html.escape(report.split)} split: hypervolume "
        f"<b>{report.split_hypervolume:.4f}</b> (same reference point; column {html.escape(report.split)}_{metric})."
    )
    dense_text = "".join(f" Dense model: {html.escape(split)} {value:.4f}." for split, value in dense.items())
    summary = (f"{points['trial'].nunique()} trials ({stopped} stopped early by ASHA), {len(points)} (trial, step) "
               f"points. Hypervolume of the {names} front: <b>{report.hypervolume:.4f}</b> (reference point: "
               f"{reference}).{on_split}{dense_text}")
    evaluated = [f"{report.split}_{metric}"] if report.split else []
    columns = ["trial", "schedule", "step_ratio", "lora_rank", "step", "attention_sparsity", metric, *evaluated,
               "speedup", "latency_ms", "params", "model_uri", "export"]
    sections = []
    if report.exact_front is None:
        sections.append((f"Pareto front: {names}", table(report.front, columns)))
    else:
        sections.append((f"Pareto front, epsilon-net (epsilon {', '.join(f'{e:g}' for e in epsilon)} on "
                         f"{', '.join(report.objectives)})", table(report.front, columns)))
        sections.append(("The exact Pareto front", table(report.exact_front, columns)))
    sections.append((f"Latency view: {metric} up, measured latency down", table(report.latency_front, columns)))
    figure = interactive_figure(points, report.front, metric, dense, run_url)
    write_page(report.files["html"], title, summary, figure, report.files["plot"], sections)


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
    for _, row in (report.front if report.exact_front is None else report.exact_front).iterrows():
        logged = {entry.step for entry in client.get_metric_history(row["run_id"], column)}
        if int(row["step"]) not in logged:  # once per step, however often the report is rebuilt
            client.log_metric(row["run_id"], column, float(row[column]), step=int(row["step"]))


def print_front(report: Report, metric: str) -> None:
    """The front as a table on the terminal."""
    column = None if report.split is None else f"{report.split}_{metric}"
    extra = "" if column is None else f"{column:>{len(column) + 2}}"
    speed = "speedup" in report.front and report.front["speedup"].notna().any()
    speed_head = f"{'speedup':>9}" if speed else ""
    print(f"{'trial':<16}{'step':>5}{'sparsity':>10}{metric:>10}{extra}{speed_head}{'latency ms':>12}  schedule")
    for _, row in report.front.iterrows():
        latency = "" if pd.isna(row["latency_ms"]) else f"{row['latency_ms']:.2f}"
        value = "" if column is None else f"{row[column]:>{len(column) + 2}.4f}"
        speedup = "" if not speed else ("" if pd.isna(row["speedup"]) else f"{row['speedup']:>8.3f}x")
        print(
            f"{str(row['trial'])[:15]:<16}{row['step']:>5}"
            f"{row['attention_sparsity']:>10.1%}{row[metric]:>10.4f}{value}{speedup}{latency:>12}  {row['schedule']}"
        )
    if report.exact_front is not None:
        print(f"(an epsilon-net of the exact front's {len(report.exact_front)} points: {report.files['exact']})")
    if "model_uri" in report.front:
        for _, row in report.front[report.front["model_uri"].fillna("") != ""].iterrows():
            print(f"registered: {row['trial']}/{row['step']} as {row['model_uri']}")
    reference = ", ".join(f"{name} {REFERENCE[name]:g}" for name in report.objectives)
    print(f"hypervolume {report.hypervolume:.4f} (reference: {reference})")
    if column is not None:
        print(f"hypervolume of this front on {report.split}: {report.split_hypervolume:.4f} (same reference, {column})")
