"""Scorers, granularities and thresholds choose what the paper says they choose, in the amounts asked."""

from __future__ import annotations

import copy

import pytest
import torch

from prune_core import attention_params, attention_sites, attention_sparsity, plan_pruning, prune
from prune_core.scorers import SCORERS
from tests.conftest import ast_batches, promised_slack, tiny_ast


def layer_shapes(model):
    return [(s.shape.num_heads, s.shape.qk_head_dim, s.shape.v_head_dim) for s in attention_sites(model)]


def scaled_layers(factor: float = 10.0):
    """A tiny AST whose first layer's attention weights are `factor` times larger than the second's."""
    model = tiny_ast()
    site = attention_sites(model)[0]
    with torch.no_grad():
        for linear in [site.attention.projection(r) for r in "qkv"] + [site.o_proj]:
            linear.weight.mul_(factor)
    return model


@pytest.mark.parametrize("granularity", ["entire_head", "per_head", "same_channel"])
def test_global_follows_scales_local_does_not(granularity):
    """Global magnitude takes everything from the small-weight layer; local prunes both layers alike
    (up to one unit of rounding)."""
    glob = prune(scaled_layers(), granularity=granularity, scorer="magnitude", threshold="global", amount=0.3)
    local = prune(scaled_layers(), granularity=granularity, scorer="magnitude", threshold="local", amount=0.3)
    dense_shape = (4, 8, 8)
    assert layer_shapes(glob)[0] == dense_shape, "global pruning should spare the large-weight layer"
    assert layer_shapes(glob)[1] != dense_shape
    first, second = layer_shapes(local)
    assert first != dense_shape and second != dense_shape
    assert all(abs(a - b) <= 1 for a, b in zip(first, second))


@pytest.mark.parametrize("scaled", [0, 1])
def test_local_gives_the_rounding_remainder_to_the_layer_that_can_spare_it(scaled):
    """4 heads per layer, 40% of 2 layers = 3.2 heads: each layer loses 1, and the extra head goes to the
    layer whose next head scores lowest (the other layer's weights are scaled up), not to the first layer."""
    model = tiny_ast()
    site = attention_sites(model)[1 - scaled]
    with torch.no_grad():
        for linear in [site.attention.projection(r) for r in "qkv"] + [site.o_proj]:
            linear.weight.mul_(10.0)
    prune(model, granularity="entire_head", scorer="magnitude", threshold="local", amount=0.4)
    heads = [shape[0] for shape in layer_shapes(model)]
    assert heads[scaled] == 2 and heads[1 - scaled] == 3


def test_fisher_differs_from_magnitude():
    model, calib = scaled_layers(), ast_batches()
    sites = attention_sites(model)
    magnitude = SCORERS["magnitude"](model, sites, None, None)
    fisher = SCORERS["fisher"](model, sites, calib, lambda m, b: m(**b).loss)
    for m, f in zip(magnitude, fisher):
        assert not torch.equal(torch.argsort(m.qk.flatten()), torch.argsort(f.qk.flatten()))
    kept = {
        scorer: plan_pruning(
            copy.deepcopy(model), granularity="per_head", scorer=scorer, threshold="global", amount=0.4, calib=calib
        )[1]
        for scorer in ("magnitude", "fisher")
    }
    assert any(
        not torch.equal(a.keep_qk, b.keep_qk) or a.keep_qk.shape != b.keep_qk.shape
        for a, b in zip(kept["magnitude"], kept["fisher"])
    )


@pytest.mark.parametrize("granularity", ["entire_head", "per_head", "same_channel", "variable_per_head", "hybrid"])
@pytest.mark.parametrize("threshold", ["global", "local"])
@pytest.mark.parametrize("amount", [0.1, 0.25, 0.5, 0.7])
def test_amount_lands_within_half_a_unit_per_family(granularity, threshold, amount):
    """thresholds.py's promise: within half a unit of each family's budget (a head of 12 QK and 12 VO channels
    for entire_head and hybrid, a QK and a VO unit for the channel granularities)."""
    model = tiny_ast(layers=3, heads=4, hidden=48)
    dense = attention_params(model)
    slack = promised_slack(model, granularity)
    prune(model, granularity=granularity, scorer="magnitude", threshold=threshold, amount=amount)
    removed = dense - attention_params(model)
    assert abs(removed - amount * dense) <= slack, (removed, amount * dense, slack)
    assert attention_sparsity(model) == pytest.approx(removed / dense)


def test_sparsity_accounting_is_exact():
    model = tiny_ast(hidden=32, heads=4, layers=2)
    # per layer: Q, K, V weights 32x32 + biases 32, O weight 32x32 + bias 32
    assert attention_params(model) == 2 * (4 * (32 * 32 + 32))
    prune(model, granularity="entire_head", scorer="magnitude", threshold="local", amount=0.25)
    # one head of 8 channels per layer: 8 Q/K/V rows of 33, 8 O columns of 32
    removed = 2 * (3 * 8 * 33 + 8 * 32)
    assert attention_params(model) == 2 * (4 * (32 * 32 + 32)) - removed
    assert attention_sparsity(model) == pytest.approx(removed / (2 * 4 * (32 * 32 + 32)))


def test_never_removes_the_last_head_or_channel():
    model = tiny_ast()
    for _ in range(12):
        try:
            prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=0.5)
        except ValueError:
            break
    assert all(shape[0] == 1 for shape in layer_shapes(model))
    model = tiny_ast()
    for _ in range(12):
        try:
            prune(model, granularity="per_head", scorer="magnitude", threshold="global", amount=0.5)
        except ValueError:
            break
    assert all(shape == (4, 1, 1) for shape in layer_shapes(model))


def test_per_head_keeps_equal_counts_and_chooses_per_head():
    model = tiny_ast()
    _, plans = plan_pruning(model, granularity="per_head", scorer="magnitude", threshold="local", amount=0.5)
    for plan in plans:
        assert plan.keep_qk.shape == (4, plan.keep_qk.shape[1])
        assert len({tuple(row.tolist()) for row in plan.keep_qk}) > 1, "heads should choose their own channels"


def test_same_channel_removes_the_same_indices_in_every_head():
    model = tiny_ast()
    _, plans = plan_pruning(model, granularity="same_channel", scorer="magnitude", threshold="local", amount=0.5)
    for plan in plans:
        assert all(torch.equal(row, plan.keep_qk[0]) for row in plan.keep_qk)
        assert all(torch.equal(row, plan.keep_vo[0]) for row in plan.keep_vo)


def test_qk_and_vo_are_decoupled():
    """Channel granularities choose QK and VO channels independently, so their dims may differ."""
    model = scaled_layers()
    site = attention_sites(model)[1]
    with torch.no_grad():
        site.attention.projection("v").weight.mul_(100.0)  # make VO far more important than QK here
        site.o_proj.weight.mul_(100.0)
    prune(model, granularity="per_head", scorer="magnitude", threshold="global", amount=0.3)
    shapes = layer_shapes(model)
    assert any(qk != v for _, qk, v in shapes)


def test_heads_removed_by_entire_head_are_the_lowest_scoring():
    model = tiny_ast()
    sites = attention_sites(model)
    scores = SCORERS["magnitude"](model, sites, None, None)
    _, plans = plan_pruning(model, granularity="entire_head", scorer="magnitude", threshold="local", amount=0.25)
    for score, plan in zip(scores, plans):
        removed = set(range(4)) - set(plan.keep_heads.tolist())
        assert removed == {int(torch.argmin(score.head))}
