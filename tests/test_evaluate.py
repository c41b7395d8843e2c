"""`report --evaluate SPLIT`: the front's step checkpoints evaluated on another split; column, hypervolume, cache."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.fs
import pytest
from mlflow.tracking import MlflowClient

import search.evaluate
from data_prep.loader import make_loader
from prune_core import attention_sparsity, load_pruned
from prune_core.metrics import evaluate
from prune_core.session import STATE_FILE
from search.cli import main
from search.pareto import hypervolume
from search.results import evaluate_front, evaluate_steps, load_state, report
from search.space import load_config
from search.tracking import run_key
from search.trainable import SEGMENT_FILE
from tests.test_search import search_config, trained_inputs, workspace  # noqa: F401 - the module's Ray + data fixture

EXPERIMENT = "evaluated"


@pytest.fixture(scope="module")
def runs(workspace):  # noqa: F811 - the fixture imported above
    """A finished search of 2 trials (grid, no scheduler), 4 prune steps each, on `trained_inputs`: pruning
    costs accuracy there, so the front has several points."""
    data, baseline = trained_inputs(workspace)
    runs = workspace / "runs"
    space = {"granularity": ["entire_head", "per_head"], "scorer": ["magnitude"], "threshold": ["global"],
             "lora_rank": 2, "lr": 3.0e-2, "step_ratio": 0.2}
    path = search_config(workspace, EXPERIMENT, searcher="grid", scheduler="none", points_to_evaluate=[], space=space,
                         target_sparsity=0.8, data=str(data), baseline=str(baseline))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from search.runner import run

        assert run(load_config(path), runs_dir=runs) == 0
        yield runs


@pytest.fixture
def loaded(monkeypatch, runs) -> list[tuple[float, str]]:
    """(attention sparsity of the model, split of the data) of every evaluation; starts without a cache."""
    for cache in (runs / EXPERIMENT / "report").glob("evaluated-*.json"):
        cache.unlink()
    calls = []

    def spy(model, batches, task):
        calls.append((attention_sparsity(model), batches.dataset.split))
        return evaluate(model, batches, task)

    monkeypatch.setattr(search.evaluate, "evaluate", spy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return calls


def front_table(runs: Path) -> pd.DataFrame:
    return pd.read_parquet(runs / EXPERIMENT / "report" / "pareto.parquet")


def checkpoint_folders(runs: Path) -> dict[tuple[str, int], Path]:
    """Every step checkpoint on disk by (trial, step), read from the files the trainable writes beside the model."""
    state = load_state(runs, EXPERIMENT)
    folders = {}
    for session in Path(state.experiment_dir).glob("*/checkpoint_*/" + STATE_FILE):
        segment = json.loads((session.parent / SEGMENT_FILE).read_text())
        step = json.loads(session.read_text())["step"]
        folders[run_key(segment["trial_id"], segment["segment"]), step] = session.parent
    return folders


def assert_right_models(loaded: list[tuple[float, str]], front: pd.DataFrame, split: str) -> None:
    """One evaluation per front point, of the model at that point's sparsity, on `split`."""
    assert sorted(s for s, _ in loaded) == pytest.approx(sorted(front["attention_sparsity"]), abs=1e-9)
    assert {data for _, data in loaded} == {split}


def test_evaluating_the_search_split_reproduces_the_front(runs, loaded):
    assert report(EXPERIMENT, runs_dir=runs, evaluate="validation") == 0
    front = front_table(runs)
    assert len(front) >= 2
    assert list(front["validation_accuracy"]) == list(front["accuracy"]), "the front's checkpoints, as the trials saw them"
    assert_right_models(loaded, front, "validation")


def test_the_test_split_column_hypervolume_and_mlflow_metrics(runs, loaded):
    assert report(EXPERIMENT, runs_dir=runs, evaluate="test") == 0
    front = front_table(runs)
    assert_right_models(loaded, front, "test")
    config = load_config(load_state(runs, EXPERIMENT).config_path)
    folders = checkpoint_folders(runs)
    test = make_loader(config.data, "test", config.loader, train=False)
    for _, row in front.iterrows():  # by hand: the checkpoint folder of that trial and step, on the test split
        model = load_pruned(folders[row["trial"], row["step"]])
        assert row["test_accuracy"] == evaluate(model, test)["accuracy"], (row["trial"], row["step"])
    volume = hypervolume(list(zip(front["attention_sparsity"], front["test_accuracy"])))
    state = load_state(runs, EXPERIMENT)
    client = MlflowClient(state.tracking_uri)
    assert client.get_run(state.parent_run).data.metrics["pareto_hypervolume_test"] == pytest.approx(volume, abs=1e-12)
    for _, row in front.iterrows():
        history = client.get_metric_history(row["run_id"], "test_accuracy")
        assert [m.value for m in history if m.step == row["step"]] == [row["test_accuracy"]], "once per step"
    page = (runs / EXPERIMENT / "report" / "report.html").read_text()
    assert "<th>test_accuracy</th>" in page and f"hypervolume <b>{volume:.4f}</b>" in page


def test_any_saved_step_can_be_evaluated(runs, loaded):
    """`evaluate_steps`: the models at steps a caller chose (a benchmark's front within its budget), off the front too."""
    folders = checkpoint_folders(runs)
    chosen = sorted(folders)[:2]
    steps = pd.DataFrame({"trial": [trial for trial, _ in chosen], "step": [step for _, step in chosen]})
    values = evaluate_steps(EXPERIMENT, steps, "test", runs_dir=runs)
    config = load_config(load_state(runs, EXPERIMENT).config_path)
    test = make_loader(config.data, "test", config.loader, train=False)
    assert list(values) == [evaluate(load_pruned(folders[key]), test)["accuracy"] for key in chosen]


def test_a_second_evaluation_reads_the_cache(runs, loaded, monkeypatch, capsys):
    first = evaluate_front(EXPERIMENT, "test", runs)
    assert list(first.columns) == ["trial", "step", "attention_sparsity", "accuracy", "test_accuracy"]
    assert_right_models(loaded, first, "test")

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated again despite the cache")

    monkeypatch.setattr(search.evaluate, "evaluate", refuse)
    pd.testing.assert_frame_equal(evaluate_front(EXPERIMENT, "test", runs), first)
    # values only the cache holds, unlike any accuracy of the search: the report must show them and their hypervolume
    cache = runs / EXPERIMENT / "report" / "evaluated-test.json"
    cached = json.loads(cache.read_text())
    planted = {(trial, step): 0.11 * (1 + i) for i, (trial, step) in enumerate(zip(first["trial"], first["step"]))}
    for (trial, step), value in planted.items():
        cached["values"][trial][str(step)] = value
    cache.write_text(json.dumps(cached))
    capsys.readouterr()
    assert main(["report", "--experiment", EXPERIMENT, "--runs", str(runs), "--evaluate", "test"]) == 0
    printed = capsys.readouterr().out
    front = front_table(runs)
    assert [planted[t, s] for t, s in zip(front["trial"], front["step"])] == list(front["test_accuracy"])
    volume = hypervolume(list(zip(front["attention_sparsity"], front["test_accuracy"])))
    assert volume != pytest.approx(hypervolume(list(zip(front["attention_sparsity"], front["accuracy"]))))
    assert "test_accuracy" in next(line for line in printed.splitlines() if line.startswith("trial"))
    assert all(f"{value:.4f}" in printed for value in planted.values())
    assert f"hypervolume of this front on test: {volume:.4f}" in printed
    cache.unlink()


def test_a_split_the_data_lacks_is_a_clear_error(runs, loaded, capsys):
    data = load_config(load_state(runs, EXPERIMENT).config_path).data
    with pytest.raises(ValueError, match=rf"{re.escape(data)}.*no split 'holdout'"):
        evaluate_front(EXPERIMENT, "holdout", runs)
    assert main(["report", "--experiment", EXPERIMENT, "--runs", str(runs), "--evaluate", "holdout"]) == 2
    assert "no split 'holdout'" in capsys.readouterr().err
    assert not loaded


def test_step_checkpoints_are_read_from_the_folders_not_tunes_record(tmp_path):
    """A search its step budget ended stops trials before Tune records their last checkpoints: the folders are the
    record. A clone's folder names its own segment; a folder without the trainable's files is not a step."""
    def write(trial: str, index: int, writer: str, segment: int, step: int) -> None:
        folder = tmp_path / trial / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        (folder / SEGMENT_FILE).write_text(json.dumps({"trial_id": writer, "segment": segment, "cloned_from": ""}))
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))

    write("run_trial_a", 0, "a", 0, 1)
    write("run_trial_a", 1, "a", 2, 4)  # a's second clone, its step 4
    write("run_trial_b", 0, "b", 0, 1)
    (tmp_path / "run_trial_b" / "checkpoint_000001").mkdir()  # being written
    results = [SimpleNamespace(path=str(tmp_path / name), filesystem=pyarrow.fs.LocalFileSystem(), best_checkpoints=[])
               for name in ("run_trial_a", "run_trial_b")]
    found = search.evaluate.step_checkpoints(results)
    assert {key: Path(checkpoint.path).relative_to(tmp_path).as_posix() for key, checkpoint in found.items()} == {
        ("a", 1): "run_trial_a/checkpoint_000000", ("a.2", 4): "run_trial_a/checkpoint_000001",
        ("b", 1): "run_trial_b/checkpoint_000000",
    }
