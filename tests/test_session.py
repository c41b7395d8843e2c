"""The iterative loop: schedules, LoRA recovery and merge, step results, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_core import attention_sparsity
from prune_core.finetune import LoraSettings, lora_finetune, target_names
from prune_core.session import PruningSession, SessionConfig, Strategy, steps_to_target
from tests.conftest import ast_batches, tiny_ast


def test_schedules_reach_the_papers_totals():
    compound = SessionConfig(step_ratio=0.1, steps=10, schedule="compound")
    linear = SessionConfig(step_ratio=0.1, steps=6, schedule="linear")
    assert compound.target(10) == pytest.approx(1 - 0.9**10)  # 65.1%
    assert round(compound.target(10), 2) == 0.65
    assert linear.target(6) == pytest.approx(0.6)


@pytest.mark.parametrize("schedule", ["compound", "linear"])
@pytest.mark.parametrize("ratio,target", [(0.1, 0.5), (0.15, 0.7), (0.2, 0.6)])
def test_steps_to_target_is_the_first_step_at_the_target(schedule, ratio, target):
    steps = steps_to_target(ratio, target, schedule)
    config = SessionConfig(step_ratio=ratio, steps=steps, schedule=schedule)
    assert config.target(steps - 1) < target - 1e-9 <= config.target(steps) + 1e-9


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"schedule": "cubic"}, r"unknown schedule 'cubic'; choose one of \['compound', 'linear'\]"),
        ({"step_ratio": 1.5}, "step_ratio"),
        ({"schedule": "linear", "step_ratio": 0.2, "steps": 5}, "would remove all attention"),
        ({"task": "regression"}, r"unknown task 'regression'; choose one of \['multi_label', 'single_label'\]"),
    ],
)
def test_bad_session_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SessionConfig(**kwargs)


def test_bad_strategy_and_lora():
    with pytest.raises(ValueError, match="unknown scorer"):
        Strategy(scorer="l0")
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)


def session(steps=3, schedule="linear", **strategy):
    model, data = tiny_ast(), ast_batches(count=3)
    config = SessionConfig(
        strategy=Strategy(**strategy),
        step_ratio=0.15,
        steps=steps,
        schedule=schedule,
        lora=LoraSettings(rank=2, lr=1e-3, epochs=1),
        calib_batches=2,
    )
    return PruningSession(model, config, train=data, evaluation=data[:1]), data


def test_session_steps_prune_finetune_and_report():
    run, _ = session(granularity="per_head", scorer="fisher", threshold="global")
    dense = run.measure()
    assert dense.attention_sparsity == 0.0 and dense.step == 0
    results = list(run)
    assert [r.step for r in results] == [1, 2, 3]
    for result, target in zip(results, (0.15, 0.30, 0.45)):
        assert result.target_sparsity == pytest.approx(target)
        assert abs(result.attention_sparsity - target) < 0.06
        assert 0.0 <= result.metric <= 1.0 and result.metric_name == "accuracy"
    assert results[-1].params < dense.params and results[-1].macs < dense.macs
    assert not any("lora" in name for name in run.model.state_dict()), "LoRA must be merged after each step"


def test_finetune_changes_weights_and_merges():
    model, data = tiny_ast(), ast_batches(count=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora_finetune(model, data, LoraSettings(rank=2, lr=1e-2, epochs=2), validation=data[:1])
    after = merged.state_dict()
    assert list(after) == list(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "dense", "fc1")))


def test_lora_targets_include_mlp_and_classifier():
    names = target_names(tiny_ast(), "all_linear")
    assert any(n.endswith("classifier.dense") for n in names) and any(n.endswith("mlp.fc1") for n in names)
    attention = target_names(tiny_ast(), "attention")
    assert len(attention) == 2 * 4 and all(n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n in attention)


def test_resume_continues_from_the_saved_step(tmp_path):
    run, data = session(steps=3, granularity="entire_head", scorer="magnitude", threshold="local")
    first = next(run)
    run.save(tmp_path)
    resumed = PruningSession.resume(tmp_path, train=data, evaluation=data[:1])
    assert resumed.step == 1 and resumed.config == run.config
    assert attention_sparsity(resumed.model) == pytest.approx(first.attention_sparsity)
    assert [r.step for r in resumed] == [2, 3]


def test_default_calibration_is_a_slice_of_training_data(monkeypatch):
    """Gradient scorers get the first `calib_batches` training batches, never the evaluation split."""
    import prune_core.session

    run, data = session(steps=1, granularity="per_head", scorer="fisher_mask", threshold="local")
    run.evaluation = ast_batches(count=1, seed=99)
    seen = {}
    real_prune = prune_core.session.prune

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real_prune(model, **kwargs)

    monkeypatch.setattr(prune_core.session, "prune", spy)
    next(run)
    assert seen["calib"] == data[:2]
