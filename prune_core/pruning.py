"""One pruning step: score -> select -> remove, over every attention layer of a model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prune_core.accounting import dense_record
from prune_core.adapters import AttentionSite, attention_sites
from prune_core.granularities import GRANULARITIES, Candidates, LayerPlan, check_min_heads
from prune_core.batches import Batch, LossFn, default_loss
from prune_core.registry import check
from prune_core.removal import apply_plan
from prune_core.scorers import SCORERS, LayerScores
from prune_core.thresholds import THRESHOLDS

HEADLESS = LayerPlan(torch.empty(0, dtype=torch.long), (), ())  # what a layer without heads keeps


def plan_pruning(
    model: nn.Module,
    *,
    granularity: str,
    scorer: str,
    threshold: str,
    amount: float,
    calib: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    min_heads: int = 1,
) -> tuple[list[AttentionSite], list[LayerPlan]]:
    """What `prune` would keep in each layer, without changing the model's weights.

    Headless layers have nothing to score or remove: they are not scored, and their plan keeps nothing.
    """
    check("granularity", granularity, GRANULARITIES)
    check("scorer", scorer, SCORERS)
    check("threshold", threshold, THRESHOLDS)
    check_min_heads(min_heads)
    if not isinstance(amount, (int, float)) or not 0.0 < amount < 1.0:
        raise ValueError(f"amount must be a fraction in (0, 1) of the attention parameters, got {amount!r}")
    if SCORERS[scorer].needs_data and calib is None:
        raise ValueError(f"scorer {scorer!r} needs calibration batches: pass calib=<iterable of batches>")
    sites = attention_sites(model)
    dense_record(model)
    shapes = [site.shape for site in sites]
    live = [layer for layer, shape in enumerate(shapes) if shape.num_heads]
    if not live:
        raise ValueError("nothing left to prune: every attention layer of the model is headless")
    chosen = GRANULARITIES[granularity]
    ragged = next((site for site, shape in zip(sites, shapes) if not shape.is_uniform), None)
    if ragged is not None and not chosen.ragged_heads:
        takes_ragged = sorted(name for name, g in GRANULARITIES.items() if g.ragged_heads)
        raise ValueError(
            f"granularity {granularity!r} needs the heads of a layer to share their dims, but those of {ragged.path} "
            f"differ (Q/K {ragged.shape.qk_dims}, V {ragged.shape.v_dims}); prune this model with one of {takes_ragged}"
        )
    live_scores = SCORERS[scorer](model, [sites[layer] for layer in live], calib, loss_fn or default_loss)
    scores = {
        layer: LayerScores(qk=s.qk.detach().cpu(), vo=s.vo.detach().cpu(), head=s.head.detach().cpu())
        for layer, s in zip(live, live_scores)
    }
    candidates = [c for layer, s in scores.items() for c in chosen.candidates(layer, s, shapes[layer], min_heads)]
    fraction = _family_fraction(amount, candidates, sum(shape.params for shape in shapes), granularity, min_heads)
    counts = THRESHOLDS[threshold](candidates, fraction)
    if not any(counts.values()):
        counts = _cheapest_unit(candidates, counts)
    plans = [
        chosen.plan(scores[layer], shape, {family: counts[layer, family] for family in chosen.families}, min_heads)
        if layer in scores
        else HEADLESS
        for layer, shape in enumerate(shapes)
    ]
    return sites, plans


def _family_fraction(
    amount: float, candidates: list[Candidates], total: int, granularity: str, min_heads: int
) -> float:
    """The share of the removable families' parameters that makes `amount` of all attention parameters.

    O's bias is attention but never removable, so the removable families give up a little more.
    """
    keeps = "one head and one channel per head" if min_heads else "one channel per kept head"
    removable = sum(c.family_params for c in candidates)
    capacity = sum(sum(c.sizes) for c in candidates)
    if removable == 0 or capacity == 0:
        raise ValueError(f"nothing left to prune with granularity {granularity!r}: every layer keeps only {keeps}")
    wanted = amount * total
    smallest = min(size for c in candidates for size in c.sizes)
    if wanted > capacity + smallest / 2:
        raise ValueError(
            f"amount {amount:.3f} asks for {wanted:.0f} attention parameters, but granularity {granularity!r} can "
            f"remove at most {capacity} ({capacity / total:.3f}) while keeping {keeps}"
        )
    return wanted / removable


def _cheapest_unit(candidates: list[Candidates], counts: dict) -> dict:
    """A step too small for any whole unit still removes one: the cheapest in the largest family."""
    family_params: dict[str, int] = {}
    for c in (c for c in candidates if len(c.costs)):
        family_params[c.family] = family_params.get(c.family, 0) + c.family_params
    family = max(family_params, key=family_params.get)
    best = min((c for c in candidates if c.family == family and len(c.costs)), key=lambda c: float(c.costs[0]))
    return {**counts, (best.layer, family): 1}


def prune(
    model: nn.Module,
    *,
    granularity: str,
    scorer: str,
    threshold: str,
    amount: float,
    calib: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    min_heads: int = 1,
) -> nn.Module:
    """Physically remove `amount` of the model's current attention parameters; returns the model.

    `amount` is a fraction of what remains, so repeated calls compound as in the authors' code.
    `calib` (batches as the model takes them, with `labels`) feeds the gradient scorers;
    `loss_fn(model, batch)` defaults to the loss the model computes itself.

    `min_heads` is how many heads every layer keeps, 1 or 0. With 0, `entire_head` and `hybrid` rank a
    layer's last head like any other, so whole attention blocks may go (the layer then adds only O's bias
    to the residual, as the dense layer does with all its heads zeroed). `per_head`, `same_channel` and
    `variable_per_head` never remove heads, so for them 0 changes nothing.
    """
    sites, plans = plan_pruning(
        model, granularity=granularity, scorer=scorer, threshold=threshold, amount=amount, calib=calib,
        loss_fn=loss_fn, min_heads=min_heads,
    )
    with torch.no_grad():
        for site, plan in zip(sites, plans):
            apply_plan(model, site, plan)
    return model
