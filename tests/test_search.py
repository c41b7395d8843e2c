"""The search end to end on local Ray with a tiny model: MLflow nesting, ASHA, the Pareto table, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from data_prep.features import FeatureParams
from data_prep.shards import PrepareConfig, prepare
from prune_core import build_ast
from search.baseline import BaselineConfig, train_baseline
from search.pareto import dominates, staircase_area, trapezoid_area
from search.runner import run
from search.space import ConfigError, load_config
from search.tracking import LOST_TAG, STOPPED_TAG, TRIAL_TAG
from tests.test_prepare import write_wav

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared 3-word set and a tiny AST baseline saved with save_pretrained."""
    base = tmp_path_factory.mktemp("search")
    audio = base / "audio"
    for w, word in enumerate(["yes", "no", "up"]):
        for s in range(8):
            write_wav(audio / word / f"{s:08x}_nohash_0.wav", seed=100 * w + s)
    (audio / "validation_list.txt").write_text("".join(f"{w}/00000006_nohash_0.wav\n" for w in ["yes", "no", "up"]))
    (audio / "testing_list.txt").write_text("".join(f"{w}/00000007_nohash_0.wav\n" for w in ["yes", "no", "up"]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    manifest = prepare(
        PrepareConfig(source="speechcommands", input=audio, out=base / "data", features=FeatureParams(num_mel_bins=32, max_length=40))
    )
    build_ast(
        num_labels=3, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_mel_bins=32, max_length=40,
        labels=manifest["labels"],
    ).save_pretrained(base / "baseline")
    yield base
    ray.shutdown()


def search_config(base: Path, name: str, space: dict | None = None, **overrides) -> Path:
    config = {
        "experiment": name,
        "data": str(base / "data"),
        "baseline": str(base / "baseline"),
        "target_sparsity": 0.4,
        "schedule": "linear",
        "trials": 6,
        "max_concurrent": 1,
        "seed": 0,
        "points_to_evaluate": "paper",
        "calib_batches": 1,
        "train_batches_per_step": 1,
        "latency_repeats": 2,
        "storage": str(base / "runs" / "ray"),
        "asha": {"grace_period": 20, "reduction_factor": 2},
        "loader": {"batch_size": 8, "eval_batch_size": 16},
        "space": {
            "granularity": ["entire_head", "per_head", "same_channel"],
            "scorer": ["magnitude", "fisher", "random"],
            "threshold": ["global", "local"],
            "step_ratio": 0.2,
            "lora_rank": [2, 4],
            "lora_alpha": 8,
            "lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "epochs": 1,
            **(space or {}),
        },
        **overrides,
    }
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trained_inputs(workspace: Path) -> tuple[Path, Path]:
    """(data, baseline) on which pruning costs accuracy: the workspace's data with finer splits (validation the
    18 train rows, test the 6 others) and a tiny baseline trained on them. The workspace's own baseline sits
    at chance, where every strategy ties. Made once per workspace."""
    data, baseline = workspace / "data-trained", workspace / "baseline-trained"
    if not (baseline / "config.json").is_file():
        shutil.copytree(workspace / "data", data, ignore=shutil.ignore_patterns(".arrow-cache"), dirs_exist_ok=True)
        manifest = json.loads((data / "manifest.json").read_text())
        splits = manifest["splits"]
        splits["validation"], splits["test"] = dict(splits["train"]), {
            "rows": splits["validation"]["rows"] + splits["test"]["rows"],
            "shards": splits["validation"]["shards"] + splits["test"]["shards"],
        }
        (data / "manifest.json").write_text(json.dumps(manifest))
        train_baseline(data, baseline, BaselineConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                                      epochs=30, batch_size=6, lr=3e-3))
    return data, baseline


def child_runs(runs: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs_ = client.search_runs([found.experiment_id])
    parents = [r for r in runs_ if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs_ if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_search_end_to_end(workspace, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = workspace / "runs"
    code = run(load_config(search_config(workspace, "e2e")), runs_dir=runs)
    assert code == 0
    client, parents, children = child_runs(runs, "e2e")
    assert len(parents) == 1 and len(children) == 6
    assert all(child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for child in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")]
        assert steps == sorted(set(steps)) and steps[0] == 1, "one point per prune step, no step doubled"
        assert {"granularity", "scorer", "threshold", "strategy"} <= set(child.data.tags)
        for key in ("attention_sparsity", "params", "macs", "latency_ms"):
            assert client.get_metric_history(child.info.run_id, key), key
    stopped = [c for c in children if c.data.tags.get(STOPPED_TAG) == "true"]
    assert stopped, "ASHA should stop at least one of 6 trials"
    assert all(len(client.get_metric_history(c.info.run_id, "accuracy")) == 1 for c in stopped)
    front = pd.read_parquet(runs / "e2e" / "report" / "pareto.parquet")
    pairs = list(zip(front["attention_sparsity"], front["accuracy"]))
    assert not any(dominates(a, b) for a in pairs for b in pairs)
    everything = [
        (s.value, a.value)
        for c in children
        for s, a in zip(client.get_metric_history(c.info.run_id, "attention_sparsity"), client.get_metric_history(c.info.run_id, "accuracy"))
    ]
    best = max(everything, key=lambda p: (p[1], p[0]))
    assert any(abs(s - best[0]) < 1e-9 and abs(a - best[1]) < 1e-9 for s, a in pairs), "the most accurate point is on the front"
    assert client.get_run(parents[0].info.run_id).data.metrics["pareto_hypervolume"] > 0
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "pareto")}
    assert artifacts == {"pareto/pareto.parquet", "pareto/pareto.png", "pareto/report.html"}
    for _, row in front.iterrows():  # the front's pruned models, loadable without pickles
        folder = f"pruned-model-step-{row['step']}"
        files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(row["run_id"], folder)}
        assert {"model.safetensors", "pruning.json", "config.json"} <= files


def test_bad_config_fails_before_ray_starts(workspace, tmp_path):
    path = search_config(workspace, "bad", space={"granularity": ["entire_head", "rows"]})
    with pytest.raises(ConfigError, match=r"space.granularity.*'rows'"):
        load_config(path)
    ray_tmp = tmp_path / "ray-tmp"  # where a Ray node started by the driver would write its session
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    code = subprocess.run(
        [sys.executable, "-m", "search.cli", "run", "--config", str(path), "--runs", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert code.returncode == 2 and "space.granularity" in code.stderr
    assert not ray_tmp.exists(), "no Ray node was started"
    assert not (tmp_path / "runs").exists(), "nothing was tracked"


def test_resume_after_a_killed_driver(workspace, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # 6 trials of 4 steps: long enough that the kill, after the first trial finishes, lands mid-search
    # (trials reuse their actors and run fast)
    config = search_config(workspace, "killed", space={"step_ratio": 0.1}, trials=6, storage=str(tmp_path / "ray"),
                           asha={"grace_period": 20, "reduction_factor": 4})
    command = [sys.executable, "-m", "search.cli", "run", "--config", str(config), "--runs", str(tmp_path)]
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state_file = tmp_path / "killed" / "search.json"
    deadline = time.time() + 240
    finished = 0
    while time.time() < deadline and finished < 1:
        time.sleep(1)
        if state_file.is_file() and (tmp_path / "mlflow.db").is_file():
            try:
                _, _, children = child_runs(tmp_path, "killed")
                finished = sum(c.info.status == "FINISHED" for c in children)
            except Exception:  # noqa: BLE001 - the store may be mid-write
                pass
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert finished >= 1, "the driver should be killed after a trial finished"
    state = json.loads(state_file.read_text())
    trials = ExperimentAnalysis(state["experiment_dir"]).trials
    assert not state["finished"] and sum(t.status == "TERMINATED" for t in trials) < 6, "killed before the search ended"
    client, parents, before = child_runs(tmp_path, "killed")
    finished_before = {
        c.data.tags[TRIAL_TAG]: [(m.step, m.timestamp) for m in client.get_metric_history(c.info.run_id, "accuracy")]
        for c in before
        if c.info.status == "FINISHED"
    }
    resumed = subprocess.run(
        [sys.executable, "-m", "search.cli", "resume", "--experiment", "killed", "--runs", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, parents, after = child_runs(tmp_path, "killed")
    known = {trial.trial_id for trial in ExperimentAnalysis(state["experiment_dir"]).trials}
    # a trial the driver started after Tune's last state save is lost with it: its run is tagged, not left RUNNING
    lost = [c for c in after if c.data.tags[TRIAL_TAG] not in known]
    assert all(c.info.status != "RUNNING" and c.data.tags.get(LOST_TAG) == "true" for c in lost)
    after = [c for c in after if c.data.tags[TRIAL_TAG] in known]
    assert len(parents) == 1 and len(after) == 6, "resume must not duplicate runs"
    assert len({c.data.tags[TRIAL_TAG] for c in after}) == 6
    assert all(c.info.status == "FINISHED" for c in after)
    for child in after:
        history = [(m.step, m.timestamp) for m in client.get_metric_history(child.info.run_id, "accuracy")]
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), f"{child.data.tags[TRIAL_TAG]} logged a step twice: {steps}"
        if child.data.tags[TRIAL_TAG] in finished_before:
            assert history == finished_before[child.data.tags[TRIAL_TAG]], "a finished trial's steps were run again"
    state = json.loads((tmp_path / "killed" / "search.json").read_text())
    assert client.get_run(state["parent_run"]).info.status == "FINISHED"


def test_failed_trials_are_named_and_fail_the_run(workspace, capsys):
    """Trials that cannot prune (one head per layer, entire_head only) fail for good: run says so, exits 1."""
    build_ast(num_labels=3, hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, num_mel_bins=32, max_length=40).save_pretrained(
        workspace / "one-head"
    )
    path = search_config(
        workspace, "failing", trials=2, max_failures=0, points_to_evaluate=[], baseline=str(workspace / "one-head"),
        space={"granularity": ["entire_head"]},
    )
    code = run(load_config(path), runs_dir=workspace / "runs")
    captured = capsys.readouterr()
    assert code == 1
    assert "2 failed" in captured.out
    assert captured.err.count("FAILED") == 2 and "nothing left to prune" in captured.err


def test_multi_objective_study_and_stopped_trials(tmp_path):
    """Optuna gets (accuracy, sparsity); a trial without a final result is told as PRUNED, not COMPLETE."""
    import optuna

    from search.searchers import build_searcher

    config = load_config(search_config(tmp_path, "mo", multi_objective=True, points_to_evaluate=[]))
    searcher = build_searcher(config, "mo-test", "accuracy").search_alg.searcher
    assert searcher.metric == ["accuracy", "attention_sparsity"] and searcher.mode == ["max", "max"]
    assert searcher.suggest("stopped") and searcher.suggest("finished")
    searcher.on_trial_complete("stopped", {"accuracy": 0.9, "attention_sparsity": 0.2, "final": False})
    searcher.on_trial_complete("finished", {"accuracy": 0.8, "attention_sparsity": 0.4, "final": True})
    states = [trial.state for trial in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert searcher._ot_study.trials[1].values == [0.8, 0.4]


def test_asha_rungs_are_sparsity_percent_and_its_metric_the_area(tmp_path):
    """ASHA compares trials at the same attention sparsity (in percent, up to the target) by the area objective."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from search.schedulers import build_scheduler

    config = load_config(search_config(tmp_path, "asha", target_sparsity=0.4, asha={"grace_period": 10, "reduction_factor": 3}))
    scheduling = build_scheduler(config, "accuracy", dense_metric=0.9)
    asha = scheduling.scheduler
    assert isinstance(asha, AsyncHyperBandScheduler) and scheduling.takes_searcher
    assert (asha._time_attr, asha._metric, asha._mode) == ("sparsity_pct", "area", "max")
    assert (asha._max_t, asha._reduction_factor) == (40, 3)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [30, 10], "rungs from the grace period up"


@pytest.fixture
def searcher_plans(monkeypatch) -> list:
    """The searchers the test's searches used (`build_searcher`'s results), to open their studies afterwards."""
    import search.runner

    plans, build = [], search.runner.build_searcher

    def recording(*args, **kwargs):
        plans.append(build(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(search.runner, "build_searcher", recording)
    return plans


def test_a_trial_asha_stops_is_pruned_in_the_optuna_study(workspace, monkeypatch, searcher_plans):
    """Multi-objective Optuna + ASHA: a trial ASHA stops reaches the study as PRUNED, the others as COMPLETE
    with their final (accuracy, sparsity)."""
    import optuna

    plans = searcher_plans
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = workspace / "runs"
    path = search_config(workspace, "mo-asha", trials=4, multi_objective=True,  # the paper's 4 strategies
                         asha={"grace_period": 20, "reduction_factor": 4})
    assert run(load_config(path), runs_dir=runs) == 0
    client, _, children = child_runs(runs, "mo-asha")
    stopped = {c.data.tags[TRIAL_TAG]: c.data.tags[STOPPED_TAG] == "true" for c in children}
    assert len(stopped) == 4 and any(stopped.values()), "ASHA stops at least one of 4 trials here"
    (plan,) = plans
    searcher = plan.search_alg.searcher
    study = searcher._ot_study
    for trial_id, was_stopped in stopped.items():
        state = study.trials[searcher._ot_trials[trial_id].number].state
        expected = optuna.trial.TrialState.PRUNED if was_stopped else optuna.trial.TrialState.COMPLETE
        assert state == expected, f"{trial_id} (stopped early: {was_stopped}) is {state.name} in the study"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(len(t.values) == 2 and t.values[1] >= 0.35 for t in complete), "final points only"


def test_a_failed_trial_resumes_from_its_last_step(workspace, tmp_path, monkeypatch):
    """A trial that crashes after its first step is retried from that step's checkpoint, not from scratch."""
    import search.runner
    from search.trainable import run_trial

    marker = tmp_path / "crashed-once"

    def flaky(config, settings):
        import ray.tune
        import search.trainable as trainable

        real_report = ray.tune.report

        def report_then_crash(metrics, checkpoint=None):
            real_report(metrics, checkpoint=checkpoint)
            if not marker.exists():
                marker.write_text(str(metrics["step"]))
                raise RuntimeError("injected crash after a step")

        trainable.tune.report = report_then_crash
        try:
            run_trial(config, settings)
        finally:
            trainable.tune.report = real_report

    monkeypatch.setattr(search.runner, "run_trial", flaky)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    path = search_config(workspace, "flaky", trials=1, points_to_evaluate=[], max_failures=1, storage=str(tmp_path / "ray"))
    assert run(load_config(path), runs_dir=runs) == 0
    assert marker.read_text() == "1"
    client, _, children = child_runs(runs, "flaky")
    (child,) = children
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")]
    assert steps == [1, 2], "step 1 kept from before the crash, step 2 after the retry, none doubled"
    (results,) = list((tmp_path / "ray").glob("*/*/result.json"))
    reported = [json.loads(line)["step"] for line in results.read_text().splitlines()]
    assert reported == [1, 2], f"the retry must start from the step-1 checkpoint, not from scratch: {reported}"

    # Tune's result.json can lose the rows from before a restart (seen after a node loss): the replay
    # that fills MLflow in (`report`) takes them from progress.csv
    from search.tracking import tune_events

    results.write_text(results.read_text().splitlines(keepends=True)[1])
    events = [e for e in tune_events(ExperimentAnalysis(str(results.parent.parent))) if e.kind == "result"]
    assert [e.result["step"] for e in events] == [1, 2]
    logged = [m.value for m in client.get_metric_history(child.info.run_id, "accuracy")]
    assert [e.result["accuracy"] for e in events] == pytest.approx(logged)
    assert isinstance(events[0].result["final"], bool) and events[0].result["layer_sparsity"].startswith("[")


def test_custom_resources_are_validated(tmp_path):
    path = search_config(tmp_path, "custom", resources={"cpu": 1, "custom": {"a10g": 0}})
    with pytest.raises(ConfigError, match=r"resources.custom"):
        load_config(path)
    config = load_config(search_config(tmp_path, "custom-ok", resources={"cpu": 1, "gpu": 0.5, "custom": {"a10g": 1}}))
    assert config.resources.custom == {"a10g": 1}


def test_an_unreachable_tracking_server_fails_before_ray_starts(workspace, tmp_path):
    from tests.services import free_port

    ray_tmp = tmp_path / "ray-tmp"  # where a Ray node started by the driver would write its session
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
           "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    path = search_config(workspace, "no-server", storage=str(tmp_path / "ray"))
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "run", "--config", str(path), "--runs", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "MLflow tracking at http://127.0.0.1:" in done.stderr and "unreachable" in done.stderr
    assert not ray_tmp.exists(), "no Ray node was started"
    assert not (tmp_path / "ray").exists() and not (tmp_path / "runs" / "no-server" / "search.json").exists()


def test_grid_search_runs_every_combination(workspace, monkeypatch):
    """searcher: grid runs the listed choices' product once each (here under the Pareto-aware ASHA)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = workspace / "runs"
    space = {"granularity": ["entire_head", "per_head"], "scorer": ["magnitude"], "threshold": ["global", "local"],
             "lora_rank": 2, "lr": {"loguniform": [1.0e-4, 1.0e-2]}}
    path = search_config(workspace, "grid", searcher="grid", scheduler="pareto_asha", points_to_evaluate=[], space=space,
                         asha={"grace_period": 20, "reduction_factor": 4})
    config = load_config(path)
    assert run(config, runs_dir=runs) == 0
    client, parents, children = child_runs(runs, "grid")
    combos = sorted((c.data.tags["granularity"], c.data.tags["threshold"]) for c in children)
    assert combos == [("entire_head", "global"), ("entire_head", "local"), ("per_head", "global"), ("per_head", "local")]
    assert {c.data.params["lr"] for c in children} == {str(1.0e-4)}, "a distribution is held at the authors' lr"
    assert parents[0].data.params["scheduler"] == "pareto_asha"


def test_the_loader_section_is_the_loaders_config(tmp_path):
    """`loader:` is parsed into data_prep's LoaderConfig, seeded by the search's seed; errors name the key."""
    from data_prep.loader import LoaderConfig

    config = load_config(search_config(tmp_path, "l", seed=7, loader={"batch_size": 8, "num_workers": 1}))
    assert config.loader == LoaderConfig(batch_size=8, num_workers=1, seed=7)
    with pytest.raises(ConfigError, match=r"loader.batchsize: unknown key"):
        load_config(search_config(tmp_path, "l", loader={"batchsize": 8}))
    with pytest.raises(ConfigError, match=r"loader.seed: unknown key"):  # one seed for the whole search
        load_config(search_config(tmp_path, "l", loader={"seed": 1}))
    with pytest.raises(ConfigError, match=r"loader: LoaderConfig.batch_size must be >= 1"):
        load_config(search_config(tmp_path, "l", loader={"batch_size": 0}))


def test_searcher_and_scheduler_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"searcher: one of \['optuna', 'random', 'grid'\]"):
        load_config(search_config(tmp_path, "s", searcher="bayes"))
    with pytest.raises(ConfigError, match=r"objective: one of \['staircase', 'trapezoid'\], got 'area'"):
        load_config(search_config(tmp_path, "s", objective="area"))
    with pytest.raises(ConfigError, match=r"scheduler: one of"):
        load_config(search_config(tmp_path, "s", scheduler="hyperband"))
    with pytest.raises(ConfigError, match=r"searcher: grid runs every combination"):
        load_config(search_config(tmp_path, "s", searcher="grid"))  # points_to_evaluate: paper


@pytest.mark.parametrize("name", ["paper_speechcommands", "paper_audioset"])
def test_paper_configs_are_the_authors_grid(name):
    from search.searchers import trial_count
    from search.trainable import TrialSettings, session_config

    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (config.searcher, config.scheduler, trial_count(config)) == ("grid", "none", 12)
    values = {p.name: p.choices for p in config.space}
    assert values["scorer"] == ("magnitude", "fisher") and values["threshold"] == ("global", "local")
    settings = TrialSettings(config, task="single_label", dense_metric=0.98)
    point = {"granularity": "per_head", "scorer": "fisher", "threshold": "global", "step_ratio": 0.1, "lora_rank": 16,
             "lora_alpha": 16, "lr": 1e-4, "epochs": 1}
    session = session_config(point, settings)
    assert session.steps == 10 and session.schedule == "compound"
    assert (session.lora.rank, session.lora.alpha, session.lora.lr, session.lora.target_modules) == (16, 16.0, 1e-4, "all_linear")


def test_the_paper_recipe_runs_end_to_end_on_a_stand_in(workspace, tmp_path, monkeypatch):
    """configs/paper_speechcommands.yaml as it is, except what names the cluster or sets the size: the tiny
    set and AST stand in for /data and the MIT checkpoint, a CPU for the GPU, two compounding steps and one
    granularity for ten steps x 12 strategies. The authors' recipe itself runs through the trainable:
    SpecAugment 48/48 and mixup 0.6, LoRA r16/alpha16 on every Linear, warm-up + cosine with early stopping,
    5 calibration batches for Fisher."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = ROOT / "configs" / "paper_speechcommands.yaml"
    raw = yaml.safe_load(path.read_text())
    config = load_config(
        path, data=str(workspace / "data"), baseline=str(workspace / "baseline"), storage=str(tmp_path / "ray"),
        resources={"cpu": 1, "gpu": 0}, max_concurrent=2, target_sparsity=0.19, latency_repeats=2,
        space={**raw["space"], "granularity": ["per_head"]}, loader={**raw["loader"], "batch_size": 8, "eval_batch_size": 16},
    )
    assert (config.loader.spec_augment, config.loader.mixup, config.lora_targets) == (True, 0.6, "all_linear")
    assert run(config, runs_dir=tmp_path / "runs") == 0
    client, parents, children = child_runs(tmp_path / "runs", "paper_speechcommands")
    strategies = {(c.data.tags["scorer"], c.data.tags["threshold"]) for c in children}
    assert len(children) == 4 and strategies == {(s, t) for s in ("magnitude", "fisher") for t in ("global", "local")}
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")] == [1, 2]
        assert abs(child.data.metrics["attention_sparsity"] - 0.19) < 0.05  # within a unit (1 of 8 channels)
        assert "test_accuracy" in child.data.metrics


def test_the_demo_config_is_valid():
    config = load_config(ROOT / "configs" / "demo.yaml")
    granularities = next(p.choices for p in config.space if p.name == "granularity")
    assert {"hybrid", "variable_per_head"} <= set(granularities)
    assert (config.searcher, config.scheduler) == ("optuna", "asha")


def test_the_vit_transfer_config_is_valid_and_searches_beyond_half():
    config = load_config(ROOT / "configs" / "transfer_vit.yaml")
    assert (config.searcher, config.scheduler, config.target_sparsity) == ("optuna", "asha", 0.7)
    assert config.data.endswith("relations") and config.baseline.endswith("baseline-vit")


def test_the_step_budget_counts_each_prune_step_once():
    from search.schedulers import StepBudget

    budget = StepBudget(3)
    for trial, step in [("a", 1), ("a", 2), ("a", 2), ("b", 1)]:  # a's last result comes again when it ends
        assert budget(trial, {"step": step}) is False
        assert budget.stop_all() == (len(budget.steps) >= 3)
    assert budget.stop_all() and not StepBudget(None).stop_all()


@pytest.mark.parametrize("objective,area", [("staircase", staircase_area), ("trapezoid", trapezoid_area)])
def test_a_trial_reports_the_objective_of_its_own_curve(workspace, monkeypatch, objective, area):
    """In process, Tune's session stubbed, accuracies falling step by step (the tiny model itself sits at chance,
    where every curve is flat and the objectives agree): `area` is the configured objective of exactly that curve."""
    import search.trainable as trainable

    accuracies = iter([0.9, 0.6, 0.5])
    monkeypatch.setattr("prune_core.session.evaluate", lambda *args, **kwargs: {"accuracy": next(accuracies), "loss": 1.0})
    reported = []

    class Session:
        Checkpoint = trainable.tune.Checkpoint
        get_context = staticmethod(lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
        get_checkpoint = staticmethod(lambda: None)
        report = staticmethod(lambda metrics, checkpoint=None: reported.append(metrics))

    monkeypatch.setattr(trainable, "tune", Session)
    monkeypatch.setattr(trainable.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    config = load_config(search_config(workspace, "objective", objective=objective, target_sparsity=0.6))
    settings = trainable.TrialSettings(config, "single_label", dense_metric=0.95)
    trainable.run_trial({"granularity": "entire_head", "scorer": "magnitude", "threshold": "global", "step_ratio": 0.2,
                         "lora_rank": 2, "lora_alpha": 8, "lr": 1e-3, "epochs": 1}, settings)
    assert [m["accuracy"] for m in reported] == [0.9, 0.6, 0.5]
    curve = [(0.0, 0.95)]
    for metrics in reported:
        curve.append((metrics["attention_sparsity"], metrics["accuracy"]))
        assert metrics["area"] == pytest.approx(area(curve, 0.6), abs=1e-12)
    assert staircase_area(curve, 0.6) < trapezoid_area(curve, 0.6) - 0.01, "the curve tells the objectives apart"
