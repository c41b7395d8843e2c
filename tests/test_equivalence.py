"""A pruned model computes exactly what the stock transformers model does with the removed weights zeroed.

The reference is the untouched model (its own ASTAttention / ViTAttention / BertSelfAttention), copied
before prune_core touches it, and what was removed is read from the surviving weights themselves: each
row of a pruned projection is found, by exact equality, among the original rows. Neither the plan nor
prune_core's attention or removal code decides what the reference zeroes.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from prune_core import GRANULARITIES, SCORERS, THRESHOLDS, attention_sites, attention_sparsity, prune
from tests.conftest import (
    STOCK_ATTENTION,
    ast_batches,
    attention_layers,
    bert_batches,
    tiny_ast,
    tiny_bert,
    tiny_vit,
    vit_batches,
)

TOLERANCE = 1e-5


def outputs(model, batch):
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def padded_bert_batches() -> list[dict]:
    """BERT batches whose rows hold 12, 9, 5 and 1 real tokens, the rest padding."""
    batches = bert_batches()
    for batch in batches:
        batch["attention_mask"] = (torch.arange(12) < torch.tensor([12, 9, 5, 1])[:, None]).long()
    return batches


def sharp(build, implementation: str = "sdpa", **kwargs):
    """A tiny model from `build`, run with `implementation`, its Q and K weights and its classifier's output
    layer scaled up tenfold: the tiny models' attention is otherwise nearly uniform and their logits small
    (BERT's ~0.02), so an error in the softmax scale or the mask would hardly show in the logits."""
    model = build(**kwargs)
    model.config._attn_implementation = implementation
    output_layer = [module for module in model.classifier.modules() if isinstance(module, torch.nn.Linear)][-1]
    with torch.no_grad():
        output_layer.weight.mul_(10.0)
        for layer in attention_layers(model):
            layer["q"].weight.mul_(10.0)
            layer["k"].weight.mul_(10.0)
    return model


def assert_stock(model) -> None:
    classes = {type(layer["module"]).__name__ for layer in attention_layers(model)}
    assert classes <= STOCK_ATTENTION, f"the reference must keep the stock attention, has {classes}"


def _match(pruned: torch.Tensor, original: torch.Tensor, what: str) -> torch.Tensor:
    """For each pruned row, the index of the one original row equal to it."""
    assert (original[:, None] == original[None]).all(-1).sum().item() == len(original), f"{what}: duplicate rows"
    equal = (pruned[:, None] == original[None]).all(-1)
    matches = equal.sum(1)
    assert torch.all(matches == 1), f"{what}: rows matching no or several original rows: {matches.tolist()}"
    index = equal.int().argmax(1)
    assert len(set(index.tolist())) == len(index), f"{what}: one original row kept twice"
    return index


def _with_bias(linear: torch.nn.Linear) -> torch.Tensor:
    return torch.cat([linear.weight, linear.bias[:, None]], 1).detach()


def _heads_of(dims: tuple[int, ...]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(dims)), torch.tensor(dims))


def surviving_rows(original, pruned) -> list[dict[str, torch.Tensor]]:
    """Per layer, the original Q/K rows ('qk') and V rows / O columns ('vo') that `pruned` still holds,
    in its order, found by exact equality of weights and biases (Q and K, V and O must agree)."""
    survivors = []
    for layer, (before, after) in enumerate(zip(attention_layers(original), attention_layers(pruned))):
        where = f"layer {layer}"
        qk = _match(_with_bias(after["q"]), _with_bias(before["q"]), f"{where} Q")
        assert torch.equal(qk, _match(_with_bias(after["k"]), _with_bias(before["k"]), f"{where} K")), where
        vo = _match(_with_bias(after["v"]), _with_bias(before["v"]), f"{where} V")
        assert torch.equal(after["o"].weight, before["o"].weight[:, vo]), f"{where}: O columns differ from V's"
        assert torch.equal(after["o"].bias, before["o"].bias), f"{where}: O bias changed"
        # each pruned head holds channels of one original head, the same for Q/K and V, no two the same head
        qk_heads, vo_heads = _heads_of(before["qk_dims"])[qk], _heads_of(before["v_dims"])[vo]
        owners = []
        for qk_part, vo_part in zip(qk_heads.split(after["qk_dims"]), vo_heads.split(after["v_dims"])):
            assert len(set(qk_part.tolist()) | set(vo_part.tolist())) == 1, f"{where}: a head mixes original heads"
            owners.append(int(qk_part[0]))
        assert len(set(owners)) == len(owners), f"{where}: two heads from one original head"
        survivors.append({"qk": qk, "vo": vo})
    return survivors


def zeroed_reference(original, pruned):
    """A copy of `original` with every Q/K/V row and O column that `pruned` lost set to zero."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for layer, kept in zip(attention_layers(reference), surviving_rows(original, pruned)):
            for roles, rows in ((("q", "k"), kept["qk"]), (("v",), kept["vo"])):
                removed = torch.ones(layer[roles[0]].out_features, dtype=torch.bool)
                removed[rows] = False
                for role in roles:
                    layer[role].weight[removed] = 0
                    layer[role].bias[removed] = 0
            layer["o"].weight[:, removed] = 0  # the columns of the V rows just zeroed
    return reference


def assert_same_logits(model, reference, batches, tolerance: float = TOLERANCE, what: str = "") -> None:
    for batch in batches:
        difference = (outputs(model, batch) - outputs(reference, batch)).abs().max().item()
        assert difference <= tolerance, f"{what}: max abs difference {difference:.2e}"


def assert_equivalent(model, batches, *, original=None, **strategy) -> None:
    """Prune `model` one step; it must compute what `original` (default: `model` before the step) computes
    with the weights the pruned model lost zeroed."""
    if original is None:
        original = copy.deepcopy(model)
    before = attention_sparsity(model)
    torch.manual_seed(7)  # the random scorer
    prune(model, calib=batches, **strategy)
    assert attention_sparsity(model) > before, f"{strategy}: nothing was removed"
    assert_same_logits(model, zeroed_reference(original, model), batches, what=str(strategy))


def assert_equivalent_to_stock(model, batches, **strategy) -> None:
    """`assert_equivalent` against the stock model, copied before anything adopts its attention."""
    stock = copy.deepcopy(model)
    assert_stock(stock)
    assert_equivalent(model, batches, original=stock, **strategy)
    assert_stock(stock)
    assert attention_sparsity(model) > 0.2


@pytest.mark.parametrize("granularity,scorer,threshold", list(itertools.product(GRANULARITIES, SCORERS, THRESHOLDS)))
def test_ast_every_combination(granularity, scorer, threshold):
    assert_equivalent_to_stock(
        sharp(tiny_ast), ast_batches(), granularity=granularity, scorer=scorer, threshold=threshold, amount=0.4
    )


# every granularity with each of magnitude / fisher and global / local
PAIRED = [(g, *pair) for g in GRANULARITIES for pair in (("magnitude", "local"), ("fisher", "global"))]


@pytest.mark.parametrize("granularity,scorer,threshold", PAIRED)
def test_ast_eager_kernel(granularity, scorer, threshold):
    assert_equivalent_to_stock(
        sharp(tiny_ast, "eager"), ast_batches(), granularity=granularity, scorer=scorer, threshold=threshold,
        amount=0.4,
    )


@pytest.mark.parametrize("granularity,scorer,threshold", PAIRED)
@pytest.mark.parametrize("family", ["vit", "bert"])
def test_other_encoder_families(family, granularity, scorer, threshold):
    """BERT's batches are padded (12, 9, 5 and 1 real tokens), so its attention mask matters."""
    model, batches = (sharp(tiny_vit), vit_batches()) if family == "vit" else (sharp(tiny_bert), padded_bert_batches())
    assert_equivalent_to_stock(model, batches, granularity=granularity, scorer=scorer, threshold=threshold, amount=0.4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_padded_bert_eager_kernel(granularity):
    assert_equivalent_to_stock(
        sharp(tiny_bert, "eager"), padded_bert_batches(), granularity=granularity, scorer="fisher",
        threshold="local", amount=0.4,
    )


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_repeated_pruning_matches_the_original_stock_weights(implementation):
    """Five steps of different granularities, the last leaving heads of different dims in one layer: the
    survivors are still original rows, and the model computes the stock model with the rest zeroed."""
    model, batches = sharp(tiny_ast, implementation, layers=3), ast_batches()
    stock = copy.deepcopy(model)
    for granularity in ("per_head", "hybrid", "same_channel", "entire_head", "variable_per_head"):
        assert_equivalent(model, batches, original=stock, granularity=granularity, scorer="fisher",
                          threshold="global", amount=0.2)
    assert_stock(stock)
    assert any(len(set(layer["qk_dims"])) > 1 or len(set(layer["v_dims"])) > 1 for layer in attention_layers(model))


@pytest.mark.parametrize(
    "build,batches,implementation",
    [
        (tiny_ast, ast_batches, "sdpa"), (tiny_ast, ast_batches, "eager"), (tiny_vit, vit_batches, "sdpa"),
        (tiny_bert, padded_bert_batches, "sdpa"), (tiny_bert, padded_bert_batches, "eager"),
    ],
)
def test_adopted_unpruned_model_is_the_stock_model(build, batches, implementation):
    model = sharp(build, implementation)
    stock = copy.deepcopy(model)
    attention_sites(model)
    assert not {type(layer["module"]).__name__ for layer in attention_layers(model)} & STOCK_ATTENTION
    assert_stock(stock)
    assert_same_logits(model, stock, batches(), tolerance=1e-6, what=f"{build.__name__} {implementation}")
