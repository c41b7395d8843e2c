"""`objectives:` in the config: validation at read, the keys schedulers and searchers rank on, and the trial's scalar."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.tune.schedulers.pbt import _PBTTrialState

from search.schedulers import ParetoAsha, StrategyPbt, build_scheduler, curve_entry, trial_area
from search.searchers import build_searcher
from search.space import ConfigError, SpeedupAt, load_config
from search.warm_start import study_of

SPACE = {"granularity": ["entire_head", "per_head"], "scorer": ["magnitude"], "threshold": ["global"], "step_ratio": 0.2,
         "lora_rank": 4, "lora_alpha": 8, "lr": 1e-3, "epochs": 1}
SPEEDUP = {"objectives": ["accuracy", "sparsity", "speedup"], "latency_table": "table.json",
           "speedup_at": {"tokens": 146, "batch": 1}}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working directory holding a latency table, as `prune-search profile` would leave it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.json").write_text(json.dumps({"version": 1}))
    return tmp_path


def write(folder: Path, **overrides) -> Path:
    raw = {"experiment": "objectives", "data": "d", "baseline": "b", "target_sparsity": 0.6, "space": SPACE, **overrides}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    return path


def test_defaults_are_todays_front(folder):
    config = load_config(write(folder))
    assert config.objectives == ("accuracy", "sparsity")
    assert (config.latency_table, config.speedup_at, config.epsilon) == (None, None, None)
    scheduler = build_scheduler(load_config(write(folder, scheduler="pareto_asha")), "accuracy", 0.9).scheduler
    assert scheduler.objectives == ("accuracy", "attention_sparsity")
    searcher = build_searcher(load_config(write(folder, multi_objective=True)), "default-mo", "accuracy").search_alg.searcher
    assert (searcher.metric, searcher.mode) == (["accuracy", "attention_sparsity"], ["max", "max"])


def test_speedup_config_is_read_and_its_table_path_made_absolute(folder):
    (folder / "tables").mkdir()
    (folder / "tables" / "cpu.json").write_text("{}")
    config = load_config(write(folder, **{**SPEEDUP, "latency_table": "tables/cpu.json"}, epsilon=[0.01, 0.005, 0.02]))
    assert config.objectives == ("accuracy", "sparsity", "speedup")
    assert config.latency_table == str(folder / "tables" / "cpu.json")  # against the working directory, as data is
    assert config.speedup_at == SpeedupAt(tokens=146, batch=1)
    assert config.epsilon == (0.01, 0.005, 0.02)
    two = load_config(write(folder, objectives=["accuracy", "speedup"], latency_table=str(folder / "table.json"),
                            speedup_at={"tokens": 1214, "batch": 8}, epsilon=[0, 0]))
    assert (two.objectives, two.speedup_at, two.epsilon) == (("accuracy", "speedup"), SpeedupAt(1214, 8), (0.0, 0.0))


@pytest.mark.parametrize("overrides,key,message", [
    ({"objectives": ["sparsity", "accuracy"]}, "objectives", r"one of \[accuracy, sparsity\], \[accuracy, speedup\]"),
    ({"objectives": ["accuracy"]}, "objectives", "one of"),
    ({"objectives": ["accuracy", "speedup", "sparsity"]}, "objectives", "one of"),
    ({"objectives": ["accuracy", "latency"]}, "objectives", "one of .*; got \\['accuracy', 'latency'\\]"),
    ({"objectives": "accuracy"}, "objectives", "one of"),
    ({**SPEEDUP, "latency_table": None}, "latency_table",
     "required with speedup.*prune-search profile --device cpu --out FILE"),
    ({**SPEEDUP, "latency_table": "missing.json"}, "latency_table",
     "no such file or folder: 'missing.json'; build one with `prune-search profile --device cpu --out FILE`"),
    ({"latency_table": "table.json"}, "latency_table", "only used when speedup is an objective"),
    ({**SPEEDUP, "speedup_at": None}, "speedup_at", r"required with speedup.*\{tokens: 146, batch: 1\}"),
    ({"speedup_at": {"tokens": 146, "batch": 1}}, "speedup_at", "only used when speedup is an objective"),
    ({**SPEEDUP, "speedup_at": [146, 1]}, "speedup_at", "a mapping of tokens and batch"),
    ({**SPEEDUP, "speedup_at": {"tokens": 146}}, "speedup_at.batch", "an integer >= 1, got None"),
    ({**SPEEDUP, "speedup_at": {"tokens": 0, "batch": 1}}, "speedup_at.tokens", "an integer >= 1, got 0"),
    ({**SPEEDUP, "speedup_at": {"tokens": 146, "batch": "8"}}, "speedup_at.batch", "an integer >= 1, got '8'"),
    ({**SPEEDUP, "speedup_at": {"tokens": 146.5, "batch": 1}}, "speedup_at.tokens", "an integer >= 1"),
    ({**SPEEDUP, "speedup_at": {"tokens": 146, "batch": True}}, "speedup_at.batch", "an integer >= 1, got True"),
    ({**SPEEDUP, "speedup_at": {"tokens": 146, "batch": 1, "dtype": "f32"}}, "speedup_at.dtype", "unknown key"),
    ({"epsilon": [0.01]}, "epsilon", r"one number >= 0 per objective \(accuracy, sparsity\)"),
    ({**SPEEDUP, "epsilon": [0.01, 0.01]}, "epsilon", r"one number >= 0 per objective \(accuracy, sparsity, speedup\)"),
    ({"epsilon": [0.01, -0.01]}, "epsilon", "one number >= 0"),
    ({"epsilon": [0.01, "a"]}, "epsilon", "one number >= 0"),
    ({"epsilon": 0.01}, "epsilon", "one number >= 0"),
    ({**SPEEDUP, "objective": "trapezoid"}, "objective", "trapezoid .* has no form with speedup.*use staircase"),
])
def test_refusals_name_the_file_and_the_key(folder, overrides, key, message):
    path = write(folder, **overrides)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {key}: {message}"):
        load_config(path)


def test_objectives_become_result_keys_for_pareto_asha(folder):
    config = load_config(write(folder, **SPEEDUP, scheduler="pareto_asha"))
    assert build_scheduler(config, "accuracy", 0.9).scheduler.objectives == ("accuracy", "attention_sparsity", "speedup")
    scheduler = build_scheduler(config, "mAP", 0.4).scheduler  # accuracy means the task's metric, whatever its name
    assert isinstance(scheduler, ParetoAsha) and scheduler.objectives == ("mAP", "attention_sparsity", "speedup")
    two = load_config(write(folder, objectives=["accuracy", "speedup"], latency_table="table.json",
                            speedup_at={"tokens": 146, "batch": 1}, scheduler="pareto_asha"))
    assert build_scheduler(two, "accuracy", 0.9).scheduler.objectives == ("accuracy", "speedup")


def test_optuna_gets_the_objectives_or_the_area(folder):
    plan = build_searcher(load_config(write(folder, **SPEEDUP, multi_objective=True)), "three-objectives", "mAP")
    searcher = plan.search_alg.searcher
    assert (searcher.metric, searcher.mode) == (["mAP", "attention_sparsity", "speedup"], ["max", "max", "max"])
    assert len(study_of(plan).directions) == 3
    single = build_searcher(load_config(write(folder, **SPEEDUP)), "one-objective", "mAP").search_alg.searcher
    assert (single.metric, single.mode) == ("area", "max")


def test_a_curve_entry_holds_sparsity_metric_then_speedup(folder):
    config = load_config(write(folder, objectives=["accuracy", "speedup"], latency_table="table.json",
                               speedup_at={"tokens": 146, "batch": 1}))
    result = {"speedup": 1.3, "mAP": 0.4, "attention_sparsity": 0.25, "loss": 1.0}
    assert curve_entry(config, result, "mAP") == (0.25, 0.4, 1.3)
    assert curve_entry(load_config(write(folder)), result, "mAP") == (0.25, 0.4)


def test_trial_area_without_speedup_is_the_configured_area(folder):
    curve = [(0.0, 0.96), (0.2, 0.9), (0.4, 0.8)]
    assert trial_area(load_config(write(folder)), curve, 0.4) == pytest.approx((0.2 * 0.9 + 0.2 * 0.8) / 0.4)
    trapezoid = load_config(write(folder, objective="trapezoid"))
    assert trial_area(trapezoid, curve, 0.4) == pytest.approx((0.2 * 0.93 + 0.2 * 0.85) / 0.4)


# (sparsity, accuracy, speedup) per step; over [0, 30%], the sparsity both reached, A is less accurate and faster.
# Up to 30% A delivers its 25% model and its 50% one (the first at or beyond 30%), not its 60% one.
SLOW = {1: (0.1, 0.95, 1.05), 2: (0.2, 0.94, 1.12), 3: (0.3, 0.93, 1.20)}
FAST = {1: (0.25, 0.90, 1.30), 2: (0.5, 0.85, 1.35), 3: (0.6, 0.60, 1.90)}


def test_trial_area_with_speedup_is_the_own_hypervolume_of_what_the_trial_delivers(folder):
    """(accuracy, speedup) from (0, 1x) to (1, 1/(1 - 0.3)x): a box 0.3/0.7 wide in speedup."""
    config = load_config(write(folder, objectives=["accuracy", "speedup"], latency_table="table.json",
                               speedup_at={"tokens": 146, "batch": 1}))
    width = 1 / 0.7 - 1
    dense = (0.0, 0.96, 1.0)
    slow = [dense, *SLOW.values()]
    assert trial_area(config, slow, 0.3) == pytest.approx((0.95 * 0.05 + 0.94 * 0.07 + 0.93 * 0.08) / width)
    fast = [dense, *FAST.values()]
    # 0.90 up to 1.30x, 0.85 from 1.30x to 1.35x; the 60% model (1.9x, clipped to 1/0.7x) is past what A delivers up to 30%
    assert trial_area(config, fast, 0.3) == pytest.approx((0.90 * 0.30 + 0.85 * 0.05) / width)
    # at the target (0.6) all of A counts: 0.90 to 1.30x, 0.85 to 1.35x, 0.60 to 1.9x, in a box 1.5 wide (1/0.4 - 1)
    assert trial_area(config, fast, 0.6) == pytest.approx((0.90 * 0.30 + 0.85 * 0.05 + 0.60 * 0.55) / 1.5)


class FakeTrial:
    """What PBT's bookkeeping reads of a Tune trial."""

    experiment_tag = ""

    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.config, self.last_result, self.checkpoint = trial_id, {}, {}, None

    def is_finished(self) -> bool:
        return False


@pytest.mark.parametrize("objectives,exploited", [
    (None, "fast"),  # accuracy and sparsity: the slow trial's staircase is higher, the fast one is cloned
    (["accuracy", "speedup"], "slow"),  # with speedup the fast trial's own hypervolume is higher
    (["accuracy", "sparsity", "speedup"], "slow"),
])
def test_pbt_ranks_on_the_objectives(folder, objectives, exploited):
    speedup = {"latency_table": "table.json", "speedup_at": {"tokens": 146, "batch": 1}} if objectives else {}
    config = load_config(write(folder, scheduler="pbt", searcher="random", objectives=objectives, **speedup,
                               pbt={"interval": 10, "quantile": 0.5, "resample": 1.0}))
    scheduler = StrategyPbt(config, "accuracy", dense_metric=0.96)
    trials = {name: FakeTrial(name) for name in ("slow", "fast")}
    for name, steps in (("slow", SLOW), ("fast", FAST)):
        state = _PBTTrialState(trials[name])
        state.last_score, state.last_result = 0.5, {"final": False}
        scheduler._trial_state[trials[name]] = state
        for step, (sparsity, accuracy, speed) in steps.items():
            # the scheduler keeps each step's objectives; `sparsity_pct` 0 keeps Ray's part in its burn-in period
            result = {"step": step, "attention_sparsity": sparsity, "accuracy": accuracy, "speedup": speed,
                      "sparsity_pct": 0, "area": 0.5}
            assert scheduler.on_trial_result(None, trials[name], result) == "CONTINUE"
    kept = "slow" if exploited == "fast" else "fast"
    assert scheduler._quantiles() == ([trials[exploited]], [trials[kept]])


def test_min_heads_is_an_optional_space_dimension_reaching_the_session(folder):
    """Absent: every trial keeps a head per layer (today's behaviour); `0` or `[0, 1]` reaches prune_core's Strategy."""
    from search.trainable import TrialSettings, session_config

    trial = {"granularity": "entire_head", "scorer": "magnitude", "threshold": "global", "step_ratio": 0.2,
             "lora_rank": 4, "lora_alpha": 8, "lr": 1e-3, "epochs": 1}
    plain = load_config(write(folder))
    assert "min_heads" not in {param.name for param in plain.space}
    settings = TrialSettings(search=plain, task="single_label", dense_metric=0.9)
    assert session_config(trial, settings).strategy.min_heads == 1
    searched = load_config(write(folder, space={**SPACE, "min_heads": [0, 1]}))
    assert {param.name: param.choices for param in searched.space}["min_heads"] == (0, 1)
    settings = TrialSettings(search=searched, task="single_label", dense_metric=0.9)
    assert session_config({**trial, "min_heads": 0}, settings).strategy.min_heads == 0
    for bad in (2, [0, 2], True, {"uniform": [0, 1]}):
        with pytest.raises(ConfigError, match=r"search\.yaml: space\.min_heads"):
            load_config(write(folder, space={**SPACE, "min_heads": bad}))
