"""The physically pruned model computes exactly what the dense model with the same structures zeroed does."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from prune_core import GRANULARITIES, SCORERS, THRESHOLDS, attention_sites, attention_sparsity, plan_pruning
from prune_core.removal import apply_plan, mask_plan
from tests.conftest import ast_batches, bert_batches, tiny_ast, tiny_bert, tiny_vit, vit_batches

TOLERANCE = 1e-5


def outputs(model, batch):
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def assert_equivalent(model, batches, **strategy):
    torch.manual_seed(7)  # the random scorer
    sites, plans = plan_pruning(model, calib=batches, **strategy)
    masked = copy.deepcopy(model)
    for site, plan in zip(attention_sites(masked), plans):
        mask_plan(site, plan)
    for site, plan in zip(sites, plans):
        apply_plan(model, site, plan)
    assert attention_sparsity(model) > 0.2
    removed_rows = sum(p.numel() for p in masked.parameters()) - sum(p.numel() for p in model.parameters())
    assert removed_rows > 0, "nothing was physically removed"
    for batch in batches:
        difference = (outputs(model, batch) - outputs(masked, batch)).abs().max().item()
        assert difference <= TOLERANCE, f"{strategy}: max abs difference {difference:.2e}"


@pytest.mark.parametrize(
    "granularity,scorer,threshold", list(itertools.product(GRANULARITIES, SCORERS, THRESHOLDS))
)
def test_ast_every_combination(granularity, scorer, threshold):
    assert_equivalent(
        tiny_ast(), ast_batches(), granularity=granularity, scorer=scorer, threshold=threshold, amount=0.4
    )


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family", ["vit", "bert"])
def test_other_encoder_families(family, granularity):
    model, batches = (tiny_vit(), vit_batches()) if family == "vit" else (tiny_bert(), bert_batches())
    assert_equivalent(model, batches, granularity=granularity, scorer="fisher", threshold="global", amount=0.4)


def test_repeated_pruning_stays_equivalent():
    """A second step on an already pruned model (uneven heads and dims) keeps the invariant; the last
    step leaves heads of different dims in one layer."""
    model, batches = tiny_ast(layers=3), ast_batches()
    for granularity in ("per_head", "entire_head", "same_channel", "hybrid", "variable_per_head"):
        assert_equivalent(model, batches, granularity=granularity, scorer="fisher", threshold="global", amount=0.3)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_both_attention_kernels(implementation):
    model = tiny_ast()
    model.config._attn_implementation = implementation
    assert_equivalent(model, ast_batches(), granularity="per_head", scorer="fisher", threshold="global", amount=0.4)
