"""hybrid: whole heads and per_head channel units of a layer ranked together, per parameter removed."""

from __future__ import annotations

import copy

import pytest
import torch

from prune_core import attention_params, attention_sites, plan_pruning, prune
from prune_core.attention import LayerShape
from prune_core.granularities import GRANULARITIES, hybrid_moves
from prune_core.scorers import LayerScores
from tests.conftest import ast_batches, promised_slack, tiny_ast
from tests.test_equivalence import assert_equivalent
from tests.test_selection import scaled_layers

HYBRID = GRANULARITIES["hybrid"]


def weak_head_model(layer: int = 0, head: int = 2):
    """A tiny AST (4 heads of 8 channels) whose `head` in `layer` has near-zero Q/K/V rows and O columns."""
    model = tiny_ast()
    site = attention_sites(model)[layer]
    rows = slice(8 * head, 8 * head + 8)
    with torch.no_grad():
        for role in "qkv":
            site.attention.projection(role).weight[rows] *= 0.05
        site.o_proj.weight[:, rows] *= 0.05
    return model


@pytest.mark.parametrize("threshold", ["global", "local"])
def test_one_step_drops_a_weak_head_and_shrinks_the_others(threshold):
    model = weak_head_model()
    _, plans = plan_pruning(model, granularity="hybrid", scorer="magnitude", threshold=threshold, amount=0.4)
    first = plans[0]
    assert first.keep_heads.tolist() == [0, 1, 3]
    qk_dims, v_dims = first.kept_dims
    assert max(qk_dims) < 8 or max(v_dims) < 8, "the remaining heads should lose channels in the same step"
    assert len(set(qk_dims)) == 1 and len(set(v_dims)) == 1, "channel units are of the per_head kind"


def test_moves_compare_heads_and_channels_per_parameter():
    """Head 1 scores 0.1 per channel, head 0 1.0: removing head 1 (0.6 over 57 parameters) is cheaper per
    parameter than any channel unit (1.1 over 20 or 18), after which the units span head 0 alone."""
    shape = LayerShape.uniform(num_heads=2, qk_head_dim=3, v_head_dim=3, hidden_size=4)  # QK 10, VO 9 per channel
    channels = torch.tensor([[1.0] * 3, [0.1] * 3])
    scores = LayerScores(qk=channels, vo=channels.clone(), head=torch.tensor([100.0, 100.0]))
    moves = hybrid_moves(scores, shape)
    assert [(m.kind, m.head, m.size) for m in moves] == [
        ("head", 1, 57), ("qk", None, 10), ("qk", None, 10), ("vo", None, 9), ("vo", None, 9)
    ]
    assert moves[0].cost == pytest.approx(0.6) and moves[1].cost == pytest.approx(1.0)


def test_each_prefix_of_moves_removes_exactly_its_sizes_and_costs():
    torch.manual_seed(3)
    shape = LayerShape.uniform(num_heads=4, qk_head_dim=6, v_head_dim=5, hidden_size=16)
    scores = LayerScores(qk=torch.rand(4, 6), vo=torch.rand(4, 5), head=torch.rand(4))
    moves = hybrid_moves(scores, shape)
    assert {m.kind for m in moves} == {"head", "qk", "vo"}
    (candidates,) = HYBRID.candidates(0, scores, shape)
    assert torch.all(candidates.costs[1:] >= candidates.costs[:-1]), "ranks never decrease along a layer"
    total = scores.qk.sum() + scores.vo.sum()
    for count in range(len(moves) + 1):
        plan = HYBRID.plan(scores, shape, {"mixed": count})
        kept = LayerShape(*plan.kept_dims, shape.hidden_size)
        assert shape.params - kept.params == sum(candidates.sizes[:count])
        heads = plan.keep_heads
        kept_score = sum(scores.qk[h, row].sum() + scores.vo[h, col].sum()
                         for h, row, col in zip(heads.tolist(), plan.keep_qk, plan.keep_vo))
        assert float(total - kept_score) == pytest.approx(sum(m.cost for m in moves[:count]), abs=1e-5)
    assert LayerShape(*HYBRID.plan(scores, shape, {"mixed": len(moves)}).kept_dims, 16) == LayerShape((1,), (1,), 16)


def test_global_follows_scales_local_cuts_every_layer():
    glob = prune(scaled_layers(), granularity="hybrid", scorer="magnitude", threshold="global", amount=0.3)
    local = prune(scaled_layers(), granularity="hybrid", scorer="magnitude", threshold="local", amount=0.3)
    glob_shapes = [site.shape for site in attention_sites(glob)]
    assert glob_shapes[0] == LayerShape.uniform(4, 8, 8, 32), "global pruning should spare the large-weight layer"
    assert glob_shapes[1].params < glob_shapes[0].params
    dense, head = glob_shapes[0].params, glob_shapes[0].head_params[0]
    for site in attention_sites(local):
        assert abs((dense - site.shape.params) - 0.3 * dense) <= head


def test_repeated_hybrid_steps_stay_equivalent():
    """Later steps see layers with fewer heads and fewer channels; the pruned model still computes the stock
    model with the removed weights zeroed, and 3 steps of 0.3 land within the promised slack of 1 - 0.7^3
    (half the largest move per step, a step's miss shrinking by 0.7 a step after it)."""
    model, batches = weak_head_model(), ast_batches()
    stock = copy.deepcopy(model)
    dense, slack = attention_params(model), 0.0
    for _ in range(3):
        slack = 0.7 * slack + promised_slack(model, "hybrid")
        assert_equivalent(model, batches, original=stock, granularity="hybrid", scorer="fisher", threshold="global",
                          amount=0.3)
    assert abs(attention_params(model) - 0.7**3 * dense) <= slack
