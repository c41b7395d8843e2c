"""Thresholds: how many removal units each layer gives up for a requested fraction of parameters.

A threshold is a function `(candidates, fraction) -> {(layer, family): count}`; `fraction` is the
share of each family's parameters to remove. Families ('head', or 'qk' and 'vo') get separate
budgets, as in the authors' code, since their scores are not on one scale. The removed amount lands
within half a unit of each family's budget.
"""

from __future__ import annotations

import math
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
            ((float(cost), c.layer, c.size) for c in group for cost in c.costs.tolist()),
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
    """The same fraction in every layer; rounding remainders go to the layers closest to a whole unit."""
    counts: Counts = {}
    for family, group in _by_family(candidates).items():
        exact = {c.layer: fraction * c.family_params / c.size for c in group}
        for c in group:
            counts[c.layer, family] = min(math.floor(exact[c.layer]), len(c.costs))
        budget = fraction * sum(c.family_params for c in group)
        removed = sum(counts[c.layer, family] * c.size for c in group)
        for c in sorted(group, key=lambda c: exact[c.layer] - math.floor(exact[c.layer]), reverse=True):
            if removed + c.size / 2 <= budget and counts[c.layer, family] < len(c.costs):
                counts[c.layer, family] += 1
                removed += c.size
    return counts


THRESHOLDS: dict[str, Threshold] = {"global": global_threshold, "local": local_threshold}
