"""Thresholds: how many removal units each layer gives up for a requested fraction of parameters.

A threshold is a function `(candidates, fraction) -> {(layer, family): count}`; `fraction` is the
share of each family's parameters to remove. Families ('head', or 'qk' and 'vo') get separate
budgets, as in the authors' code, since their scores are not on one scale (`hybrid` puts heads and
channels on one scale in its single 'mixed' family). A layer's units go in their order, a prefix at
a time; the removed amount lands within half a unit of each family's budget.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from prune_core.granularities import Candidates

Counts = dict[tuple[int, str], int]
Threshold = Callable[[list[Candidates], float], Counts]


def _by_family(candidates: list[Candidates]) -> dict[str, list[Candidates]]:
    families: dict[str, list[Candidates]] = defaultdict(list)
    for candidate in candidates:
        families[candidate.family].append(candidate)
    return families


def global_threshold(candidates: list[Candidates], fraction: float) -> Counts:
    """One threshold over all layers' units of a family: the cheapest units anywhere go first.

    For `per_head` a unit is one channel from every head of a layer, so the budget flows to the
    layers where a channel per head costs least (the authors' greedy allocator).
    """
    counts: Counts = {(c.layer, c.family): 0 for c in candidates}
    for family, group in _by_family(candidates).items():
        budget = fraction * sum(c.family_params for c in group)
        units = sorted(
            ((float(cost), c.layer, size) for c in group for cost, size in zip(c.costs.tolist(), c.sizes)),
            key=lambda unit: unit[0],
        )
        removed = 0
        for _, layer, size in units:
            if removed + size / 2 > budget:
                break
            counts[layer, family] += 1
            removed += size
    return counts


def local_threshold(candidates: list[Candidates], fraction: float) -> Counts:
    """The same fraction in every layer; rounding remainders go to the layers closest to a whole next unit,
    and among equally close layers (layers of one shape all are) to the one whose next unit costs least,
    not to the first layer, which is often the one a model can least spare."""
    counts: Counts = {}
    for family, group in _by_family(candidates).items():
        budget = fraction * sum(c.family_params for c in group)
        removed = 0
        remainders = []
        for c in group:
            layer_budget, count, taken = fraction * c.family_params, 0, 0
            while count < len(c.sizes) and taken + c.sizes[count] <= layer_budget:
                taken += c.sizes[count]
                count += 1
            counts[c.layer, family] = count
            removed += taken
            if count < len(c.sizes):
                remainders.append((-(layer_budget - taken) / c.sizes[count], float(c.costs[count]), c.layer, c))
        for *_, c in sorted(remainders, key=lambda remainder: remainder[:3]):
            size = c.sizes[counts[c.layer, family]]
            if removed + size / 2 <= budget:
                counts[c.layer, family] += 1
                removed += size
    return counts


THRESHOLDS: dict[str, Threshold] = {"global": global_threshold, "local": local_threshold}
