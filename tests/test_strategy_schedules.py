"""Strategy schedules: a session that changes strategy and step ratio on the way prunes exactly, aims at the
sparsity its new ratio calls for, and saves, loads and resumes its whole lineage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prune_core import attention_sites, attention_sparsity, load_pruned
from prune_core.finetune import LoraSettings
from prune_core.session import PruningSession, SessionConfig, Strategy, schedule_summary, steps_to_target
from tests.conftest import ast_batches, tiny_ast
from tests.test_equivalence import assert_same_logits, assert_stock, outputs, sharp, zeroed_reference

NO_LORA = LoraSettings(epochs=0)  # weights stay the original ones, so the stock model stays a reference


def config(strategy: str, ratio: float, final: float = 0.8, schedule: str = "compound") -> SessionConfig:
    return SessionConfig(
        strategy=Strategy(*strategy.split("/")), step_ratio=ratio, steps=steps_to_target(ratio, final, schedule),
        schedule=schedule, lora=NO_LORA, final_sparsity=final, calib_batches=2,
    )


def session(model, first: SessionConfig, batches) -> PruningSession:
    return PruningSession(model, first, train=batches, evaluation=batches, calib=batches)


@pytest.mark.parametrize(
    "schedule",
    [
        # into and out of hybrid, changing scorer and threshold on the way
        ["per_head/fisher/global", "hybrid/magnitude/local", "entire_head/taylor/global"],
        ["hybrid/fisher/local", "same_channel/magnitude_l2/global", "hybrid/fisher_mask/global"],
        # ending ragged: variable_per_head, then the one other granularity that takes ragged heads
        ["same_channel/taylor/local", "variable_per_head/fisher/global", "entire_head/magnitude/local"],
    ],
)
def test_a_mixed_schedule_computes_the_stock_model_with_the_rest_zeroed(schedule):
    torch.manual_seed(0)
    model, batches = sharp(tiny_ast, "sdpa", layers=3), ast_batches()
    stock = copy.deepcopy(model)
    run = session(model, config(schedule[0], 0.15), batches)
    for strategy in schedule:
        run.switch(config(strategy, 0.15))
        next(run)
        assert_same_logits(run.model, zeroed_reference(stock, run.model), batches, what=run.schedule)
    assert_stock(stock)
    assert run.schedule == " -> ".join(f"{strategy} x1" for strategy in schedule)


def test_a_new_step_ratio_applies_from_the_sparsity_reached():
    """Two compound steps of 0.2 reach 36%; a ratio of 0.3 then goes on from there, not from step 0:
    1 - 0.64 * 0.7^k = 55.2%, 68.6%, then the 70% cap (three steps)."""
    model, batches = tiny_ast(layers=3), ast_batches()
    run = session(model, config("per_head/fisher/global", 0.2, final=0.7), batches)
    targets = [next(run).target_sparsity for _ in range(2)]
    run.switch(config("entire_head/magnitude/local", 0.3, final=0.7))
    assert run.end_step == 5
    targets += [result.target_sparsity for result in run]
    assert targets == pytest.approx([0.2, 0.36, 0.552, 0.6864, 0.7])
    assert run.schedule == "per_head/fisher/global x2 -> entire_head/magnitude/local x3"
    assert attention_sparsity(run.model) == pytest.approx(0.7, abs=0.05)


def test_a_linear_schedule_goes_on_linearly():
    model, batches = tiny_ast(), ast_batches()
    run = session(model, config("per_head/magnitude/global", 0.1, final=0.5, schedule="linear"), batches)
    next(run)
    run.switch(config("per_head/magnitude/global", 0.25, final=0.5, schedule="linear"))
    assert [result.target_sparsity for result in run] == pytest.approx([0.35, 0.5])


def test_a_switch_at_the_final_sparsity_has_nothing_left():
    model, batches = tiny_ast(), ast_batches()
    run = session(model, config("per_head/magnitude/global", 0.3, final=0.3), batches)
    next(run)
    run.switch(config("entire_head/magnitude/global", 0.1, final=0.3))
    assert run.end_step == run.step and list(run) == []


def test_save_load_and_resume_keep_the_lineage_exactly(tmp_path):
    torch.manual_seed(0)
    model, batches = tiny_ast(layers=3), ast_batches()
    run = session(model, config("per_head/fisher/global", 0.2), batches)
    next(run)
    run.switch(config("variable_per_head/magnitude/local", 0.2))
    next(run)
    run.save(tmp_path / "step2")

    loaded = load_pruned(tmp_path / "step2")
    for batch in batches:
        assert torch.equal(outputs(loaded, batch), outputs(run.model, batch))
    saved = json.loads((tmp_path / "step2" / "pruning.json").read_text())
    assert [record["strategy"] for record in saved["history"]] == ["per_head/fisher/global", "variable_per_head/magnitude/local"]

    # resumed as saved, it goes on with the saved config, exactly as the live session does
    resumed = PruningSession.resume(tmp_path / "step2", train=batches, evaluation=batches, calib=batches)
    assert (resumed.step, resumed.start_step, resumed.history) == (run.step, run.start_step, run.history)
    next(resumed), next(run)
    for batch in batches:
        assert torch.equal(outputs(resumed.model, batch), outputs(run.model, batch))

    # resumed with another config (a clone that explores), it switches at the saved step
    explored = config("entire_head/fisher/global", 0.3)
    clone = PruningSession.resume(tmp_path / "step2", config=explored, train=batches, evaluation=batches, calib=batches)
    assert clone.start_step == 2 and clone.config.start_sparsity == pytest.approx(0.36)
    steps = [result.target_sparsity for result in clone]
    assert steps[0] == pytest.approx(1 - 0.64 * 0.7) and steps[-1] == pytest.approx(0.8)
    assert clone.schedule == (
        f"per_head/fisher/global x1 -> variable_per_head/magnitude/local x1 -> entire_head/fisher/global x{len(steps)}"
    )


def test_a_switch_to_a_granularity_that_needs_uniform_heads_is_refused_after_variable_per_head():
    model, batches = tiny_ast(layers=3), ast_batches()
    run = session(model, config("variable_per_head/magnitude/global", 0.3), batches)
    next(run)
    assert not all(site.shape.is_uniform for site in attention_sites(run.model))
    with pytest.raises(ValueError, match=r"cannot switch to granularity 'per_head'.*\['entire_head', 'variable_per_head'\]"):
        run.switch(config("per_head/magnitude/global", 0.2))
    run.switch(config("entire_head/magnitude/global", 0.2))  # takes ragged heads
    next(run)


def test_schedule_summary_run_length_encodes():
    history = [{"strategy": s} for s in ["a", "a", "a", "b", "b", "a"]]
    assert schedule_summary(history) == "a x3 -> b x2 -> a x1"
    assert schedule_summary([]) == ""
