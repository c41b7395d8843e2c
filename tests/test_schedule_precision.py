"""Repeated steps reach the compound schedule's sparsity within what thresholds.py promises per step."""

from __future__ import annotations

import pytest

from prune_core import GRANULARITIES, THRESHOLDS, attention_sparsity, prune
from tests.conftest import promised_slack, tiny_ast


def dense_attention_params(layers: int, hidden: int) -> int:
    """Q, K, V, O weights and biases of a dense layer, by hand."""
    return layers * 4 * (hidden * hidden + hidden)


@pytest.mark.parametrize("ratio,steps", [(0.2, 3), (0.1, 5)])
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_compound_steps_land_within_half_a_unit_per_family_per_step(granularity, threshold, ratio, steps):
    """Each step removes `ratio` of what remains, so after k steps the model holds (1 - ratio)^k of its dense
    attention. A step may miss its share by the promised slack e; a miss carries into the next step's base,
    shrunk by (1 - ratio), so after k steps the miss is at most sum_s (1 - ratio)^(k - s) e_s <= sum_s e_s."""
    model = tiny_ast(layers=3, heads=4, hidden=48)
    dense = dense_attention_params(layers=3, hidden=48)
    slack = 0.0
    for step in range(1, steps + 1):
        slack = (1 - ratio) * slack + promised_slack(model, granularity)
        prune(model, granularity=granularity, scorer="magnitude", threshold=threshold, amount=ratio)
        expected, reached = 1 - (1 - ratio) ** step, attention_sparsity(model)
        missed = abs(reached - expected) * dense
        assert missed <= slack, f"step {step}: sparsity {reached:.4f}, not {expected:.4f}: {missed:.0f} > {slack:.0f}"
