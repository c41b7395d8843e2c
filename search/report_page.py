"""The report's pictures: a static PNG (for MLflow and READMEs) and a self-contained interactive HTML page.

Both show every (trial, step) point, the front, its points labelled with their strategy or schedule,
and the dense model's metric as a reference line on each split known. The page is Plotly (as Optuna's
own Pareto plot is), with plotly.js embedded so that it opens offline: hovering a point shows its
trial, schedule, step and figures, and clicking it opens its MLflow run. Accuracy against speedup is
drawn beside accuracy against sparsity when the points have a `speedup`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

DENSE_STYLES = {"validation": "dash", "test": "dot"}  # the dense model's metric on each split, as a line


def label(row: pd.Series) -> str:
    """A front point's name on a plot: its schedule (its strategy when it kept one all along)."""
    return str(row["schedule"])


def axes(points: pd.DataFrame) -> list[tuple[str, str, float]]:
    """(column, axis title, scale) of the x axes drawn: sparsity always, speedup when the points have it."""
    drawn = [("attention_sparsity", "attention sparsity (%)", 100.0)]
    if "speedup" in points and points["speedup"].notna().any():
        drawn.append(("speedup", "predicted speedup (dense / pruned latency)", 1.0))
    return drawn


def write_png(points: pd.DataFrame, front: pd.DataFrame, metric: str, dense: Mapping[str, float], path: Path,
              title: str) -> None:
    """Points by strategy, the front as a staircase with labelled points, dense reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = axes(points)
    figure, panels = plt.subplots(1, len(drawn), figsize=(8 * len(drawn), 5.5), dpi=110, squeeze=False)
    for axis, (column, name, scale) in zip(panels[0], drawn):
        for strategy, group in points.groupby("strategy"):
            for _, trial in group.groupby("trial"):
                trial = trial.sort_values("step")
                axis.plot(scale * trial[column], trial[metric], alpha=0.25, linewidth=1, color="grey")
            axis.scatter(scale * group[column], group[metric], s=18, label=strategy, alpha=0.8)
        shown = front.dropna(subset=[column]).sort_values(column)
        if column == "attention_sparsity":
            axis.step(scale * shown[column], shown[metric], where="pre", color="black", linewidth=1.5)
        axis.scatter(scale * shown[column], shown[metric], s=60, facecolors="none", edgecolors="black",
                     label="Pareto front")
        for _, row in shown.iterrows():
            axis.annotate(label(row), (scale * row[column], row[metric]), fontsize=6, xytext=(4, -8),
                          textcoords="offset points", alpha=0.8)
        for split, value in dense.items():
            axis.axhline(value, color="tab:red", linewidth=1, linestyle="--" if split != "test" else ":",
                         label=f"dense, {split} ({value:.4f})")
        axis.set_xlabel(name)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def interactive_figure(points: pd.DataFrame, front: pd.DataFrame, metric: str, dense: Mapping[str, float],
                       run_url: str | None) -> str:
    """The Plotly figure as an HTML fragment with plotly.js embedded; a click on a point opens its MLflow run.

    `run_url` holds `{run_id}` (e.g. `http://127.0.0.1:5000/#/experiments/1/runs/{run_id}`); None: no links."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    drawn = axes(points)
    figure = make_subplots(rows=1, cols=len(drawn), shared_yaxes=True, horizontal_spacing=0.06)

    def links(frame: pd.DataFrame) -> list[str]:
        if run_url is None:
            return [""] * len(frame)
        return ["" if pd.isna(run) or not run else run_url.format(run_id=run) for run in frame["run_id"]]

    def hover(frame: pd.DataFrame) -> list[str]:
        texts = []
        for _, row in frame.iterrows():
            figures = [f"{metric} {row[metric]:.4f}", f"sparsity {row['attention_sparsity']:.1%}"]
            for key, fmt in (("speedup", "speedup {:.3f}x"), ("latency_ms", "measured {:.2f} ms")):
                if key in row and pd.notna(row[key]):
                    figures.append(fmt.format(row[key]))
            texts.append(f"<b>{html.escape(str(row['trial']))}</b> step {int(row['step'])}<br>"
                         f"{html.escape(label(row))}<br>{' · '.join(figures)}")
        return texts

    for col, (column, name, scale) in enumerate(drawn, start=1):
        for strategy, group in points.groupby("strategy"):
            group = group.dropna(subset=[column])
            figure.add_trace(go.Scatter(
                x=scale * group[column], y=group[metric], mode="markers", name=strategy, legendgroup=strategy,
                showlegend=col == 1, marker={"size": 7, "opacity": 0.6}, customdata=links(group),
                hovertext=hover(group), hoverinfo="text",
            ), row=1, col=col)
        shown = front.dropna(subset=[column]).sort_values(column)
        figure.add_trace(go.Scatter(
            x=scale * shown[column], y=shown[metric], mode="markers+lines" if col == 1 else "markers",
            line={"shape": "vh", "color": "black", "width": 1.5}, name="Pareto front", legendgroup="front",
            showlegend=col == 1, marker={"size": 12, "symbol": "circle-open", "color": "black"},
            customdata=links(shown), hovertext=hover(shown), hoverinfo="text",
        ), row=1, col=col)
        for split, value in dense.items():
            figure.add_hline(y=value, line_dash=DENSE_STYLES.get(split, "dashdot"), line_color="firebrick",
                             annotation_text=f"dense, {split} {value:.4f}", annotation_position="bottom right",
                             row=1, col=col)
        figure.update_xaxes(title_text=name, row=1, col=col)
    figure.update_yaxes(title_text=metric, row=1, col=1)
    figure.update_layout(height=520, margin={"t": 30}, legend={"font": {"size": 10}}, hovermode="closest")
    open_run = ("var plot = document.getElementById('{plot_id}');"
                "plot.on('plotly_click', function(data) { var url = data.points[0].customdata;"
                " if (url) { window.open(url, '_blank'); } });")
    return figure.to_html(full_html=False, include_plotlyjs=True, post_script=open_run)


def table(frame: pd.DataFrame, columns: list[str]) -> str:
    columns = [c for c in columns if c in frame]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row[c]))}</td>" for c in columns) + "</tr>" for _, row in frame.iterrows()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_page(path: Path, title: str, summary: str, figure: str, png: Path, sections: list[tuple[str, str]]) -> None:
    """The self-contained report: summary, the interactive figure, the static picture, then the tables."""
    image = base64.b64encode(png.read_bytes()).decode()
    blocks = "".join(f"<h2>{html.escape(heading)}</h2>{body}" for heading, body in sections)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse;font-size:0.85em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{summary}</p>
{figure}
<p>Hover a point for its trial, schedule and step; click it to open its MLflow run.</p>
<details><summary>Static picture</summary><img src="data:image/png;base64,{image}" alt="Pareto front"></details>
{blocks}
</body></html>""")
