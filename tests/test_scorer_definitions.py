"""Every scorer matches its definition, computed here by hand with autograd on the stock model's weights,
and per_head / same_channel / entire_head remove what those scores rank lowest."""

from __future__ import annotations

import copy

import pytest
import torch

from prune_core import SCORERS, attention_sites, plan_pruning, prune
from tests.conftest import ast_batches, attention_layers, tiny_ast
from tests.test_equivalence import assert_stock, surviving_rows

FISHER_EPS = 1e-6  # the authors' floor, per weight (scorers.py)
HEADS, HEAD_DIM = 4, 8  # tiny_ast()


def loss(model, batch):
    return model(**batch).loss


def weight_gradients(model, batch, with_bias: bool = False) -> list[list[torch.Tensor]]:
    """Per layer, d loss / d (W_q, W_k, W_v, W_o) on `batch` (and d loss / d b_q last, if asked)."""
    layers = attention_layers(model)
    params = [[layer[role].weight for role in "qkvo"] + ([layer["q"].bias] if with_bias else []) for layer in layers]
    grads = torch.autograd.grad(loss(model, batch), [p for layer in params for p in layer])
    size = len(params[0])
    return [list(grads[i * size:(i + 1) * size]) for i in range(len(layers))]


def grouped(q, k, v, o) -> dict[str, torch.Tensor]:
    """Per-weight importances summed per structure: QK channel = Q row + K row, VO channel = V row + O column."""
    qk = (q.sum(1) + k.sum(1)).view(HEADS, HEAD_DIM)
    vo = (v.sum(1) + o.sum(0)).view(HEADS, HEAD_DIM)
    return {"qk": qk, "vo": vo, "head": qk.sum(1) + vo.sum(1)}


def fisher_by_hand(stock, batches):
    squares = None
    for batch in batches:
        grads = [[g.square() for g in layer] for layer in weight_gradients(stock, batch)]
        squares = grads if squares is None else [[a + b for a, b in zip(x, y)] for x, y in zip(squares, grads)]
    return [grouped(*(s / len(batches) + FISHER_EPS for s in layer)) for layer in squares]


def taylor_by_hand(stock, batches):
    sums = None
    for batch in batches:
        grads = weight_gradients(stock, batch)
        sums = grads if sums is None else [[a + b for a, b in zip(x, y)] for x, y in zip(sums, grads)]
    return [
        grouped(*((layer[role].weight * g / len(batches)).abs().detach() for role, g in zip("qkvo", mean)))
        for layer, mean in zip(attention_layers(stock), sums)
    ]


def fisher_mask_by_hand(stock, batches):
    """One sample at a time. A mask m (ones) on Q's output channel c has gradient
    sum_j W_q[c, j] dL/dW_q[c, j] + b_q[c] dL/db_q[c]; on O's input channel c, sum_i W_o[i, c] dL/dW_o[i, c]
    (scale a row or column by m and differentiate at m = 1). A head's mask gradient sums its channels'."""
    samples = [
        {key: value[i:i + 1] for key, value in batch.items()} for batch in batches for i in range(len(batch["labels"]))
    ]
    layers = attention_layers(stock)
    totals = [{"qk": 0.0, "vo": 0.0, "head": 0.0} for _ in layers]
    for sample in samples:
        for layer, grads, total in zip(layers, weight_gradients(stock, sample, with_bias=True), totals):
            dq, _, _, do, dbq = grads
            qk = (layer["q"].weight * dq).sum(1) + layer["q"].bias * dbq
            vo = (layer["o"].weight * do).sum(0)
            total["qk"] = total["qk"] + qk.view(HEADS, HEAD_DIM).square()
            total["vo"] = total["vo"] + vo.view(HEADS, HEAD_DIM).square()
            total["head"] = total["head"] + vo.view(HEADS, HEAD_DIM).sum(1).square()
    return [{name: (value / len(samples)).detach() for name, value in total.items()} for total in totals]


def magnitude_by_hand(p: float):
    """Norm of each structure's rows/columns, averaged over Q and K (V and O); a head: the mean over the four
    matrices of the norm of its whole block."""

    def scores(stock, batches):
        result = []
        for layer in attention_layers(stock):
            q, k, v = (layer[role].weight.detach().view(HEADS, HEAD_DIM, -1) for role in "qkv")
            o = layer["o"].weight.detach().t().reshape(HEADS, HEAD_DIM, -1)
            rows = [torch.linalg.vector_norm(w, ord=p, dim=-1) for w in (q, k, v, o)]
            blocks = [torch.linalg.vector_norm(w.flatten(1), ord=p, dim=-1) for w in (q, k, v, o)]
            result.append({"qk": (rows[0] + rows[1]) / 2, "vo": (rows[2] + rows[3]) / 2, "head": sum(blocks) / 4})
        return result

    return scores


BY_HAND = {
    "fisher": fisher_by_hand,
    "taylor": taylor_by_hand,
    "fisher_mask": fisher_mask_by_hand,
    "magnitude": magnitude_by_hand(1.0),
    "magnitude_l2": magnitude_by_hand(2.0),
}


def scores_by_hand(scorer, model, batches):
    """`scorer`'s scores computed on a stock copy of `model` (whose attention prune_core has not adopted)."""
    stock = copy.deepcopy(model)
    assert_stock(stock)
    return BY_HAND[scorer](stock, batches)


@pytest.mark.parametrize("scorer", sorted(BY_HAND))
def test_scores_match_their_definition(scorer):
    model, batches = tiny_ast(), ast_batches()
    expected = scores_by_hand(scorer, model, batches)
    actual = SCORERS[scorer](model, attention_sites(model), batches, loss)
    assert len(actual) == len(expected) == 2
    for layer, (got, want) in enumerate(zip(actual, expected)):
        for name in ("qk", "vo", "head"):
            torch.testing.assert_close(
                getattr(got, name).cpu(), want[name], rtol=1e-5, atol=0, msg=lambda m: f"layer {layer} {name}: {m}"
            )


def test_every_registered_scorer_is_checked_here():
    """The random control aside, a new scorer needs its definition written out above."""
    assert set(SCORERS) - {"random"} == set(BY_HAND)


def expected_channels(scores: torch.Tensor, count: int, granularity: str) -> torch.Tensor:
    """[heads, kept] channel indices that remain when `count` channels per head go: per_head drops each
    head's own lowest, same_channel the indices lowest by their sum over the heads."""
    if granularity == "per_head":
        kept = [sorted(torch.argsort(row)[count:].tolist()) for row in scores]
    else:
        kept = [sorted(torch.argsort(scores.sum(0))[count:].tolist())] * len(scores)
    return torch.tensor(kept)


@pytest.mark.parametrize("threshold", ["global", "local"])
@pytest.mark.parametrize("scorer", ["magnitude", "fisher"])
@pytest.mark.parametrize("granularity", ["per_head", "same_channel"])
def test_channel_granularities_remove_the_lowest_scoring_channels(granularity, scorer, threshold):
    """Both in the plan and in the weights the pruned model physically keeps."""
    model, batches = tiny_ast(), ast_batches()
    stock = copy.deepcopy(model)
    scores = scores_by_hand(scorer, model, batches)
    strategy = dict(granularity=granularity, scorer=scorer, threshold=threshold, amount=0.4, calib=batches)
    _, plans = plan_pruning(copy.deepcopy(model), **strategy)
    prune(model, **strategy)
    removed = 0
    for score, plan, kept in zip(scores, plans, surviving_rows(stock, model)):
        for family, planned in (("qk", plan.keep_qk), ("vo", plan.keep_vo)):
            count = HEAD_DIM - planned.shape[1]
            removed += count
            expected = expected_channels(score[family], count, granularity)
            assert torch.equal(planned, expected), (family, planned, expected)
            physical = kept[family].view(HEADS, -1) - torch.arange(HEADS)[:, None] * HEAD_DIM
            assert torch.equal(physical, expected), (family, physical, expected)
    assert removed > 0


@pytest.mark.parametrize("scorer", ["magnitude", "fisher"])
def test_entire_head_removes_the_lowest_scoring_head_of_each_layer(scorer):
    """local, a quarter of 4 heads: one head per layer, the one scoring lowest, gone from the weights too."""
    model, batches = tiny_ast(), ast_batches()
    stock = copy.deepcopy(model)
    scores = scores_by_hand(scorer, model, batches)
    prune(model, granularity="entire_head", scorer=scorer, threshold="local", amount=0.25, calib=batches)
    for score, kept in zip(scores, surviving_rows(stock, model)):
        expected = sorted(set(range(HEADS)) - {int(torch.argmin(score["head"]))})
        for family in ("qk", "vo"):
            assert sorted(set((kept[family] // HEAD_DIM).tolist())) == expected
