"""Granularities: what one removal unit is in a layer, and which indices a count of units removes.

`entire_head` removes whole heads. The channel granularities prune QK and VO pairs independently
(decoupled): `per_head` removes one channel from every head of a layer per unit, each head choosing
its own; `same_channel` removes the same channel index from every head. A layer always keeps one
head, and every head one QK and one VO channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_core.attention import LayerShape
from prune_core.scorers import LayerScores


@dataclass(frozen=True)
class Candidates:
    """The removal units of one family ('head', 'qk' or 'vo') in one layer, cheapest first.

    `costs[n]` is the score lost by the (n+1)-th unit; each unit removes `size` parameters out of the
    `family_params` this family holds in the layer. Only a prefix of the units is ever removed.
    """

    layer: int
    family: str
    costs: torch.Tensor
    size: int
    family_params: int


@dataclass(frozen=True)
class LayerPlan:
    """What a layer keeps, as indices into its current heads and channels (sorted)."""

    keep_heads: torch.Tensor  # [kept heads]
    keep_qk: torch.Tensor  # [kept heads, kept qk channels]
    keep_vo: torch.Tensor  # [kept heads, kept vo channels]

    @property
    def shape_change(self) -> tuple[int, int, int]:
        return len(self.keep_heads), self.keep_qk.shape[1], self.keep_vo.shape[1]


def _all_channels(heads: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.arange(dim).expand(len(heads), dim).clone()


def _drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the sorted indices left after dropping the `count` lowest scores."""
    order = torch.argsort(scores, dim=-1, stable=True)[..., count:]
    return torch.sort(order, dim=-1).values


class EntireHead:
    families = ("head",)

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape) -> list[Candidates]:
        costs = torch.sort(scores.head).values[: shape.num_heads - 1]
        return [Candidates(layer, "head", costs, shape.head_params, shape.num_heads * shape.head_params)]

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int]) -> LayerPlan:
        heads = _drop_lowest(scores.head, counts["head"])
        return LayerPlan(heads, _all_channels(heads, shape.qk_head_dim), _all_channels(heads, shape.v_head_dim))


def _channel_candidates(layer: int, channel_costs: dict[str, torch.Tensor], shape: LayerShape) -> list[Candidates]:
    sizes = {"qk": shape.qk_channel_params, "vo": shape.vo_channel_params}
    dims = {"qk": shape.qk_head_dim, "vo": shape.v_head_dim}
    return [
        Candidates(
            layer,
            family,
            costs[: dims[family] - 1],
            shape.num_heads * sizes[family],
            shape.num_heads * dims[family] * sizes[family],
        )
        for family, costs in channel_costs.items()
    ]


class PerHead:
    families = ("qk", "vo")

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape) -> list[Candidates]:
        # the n-th unit removes every head's n-th cheapest channel
        costs = {family: torch.sort(getattr(scores, family), dim=-1).values.sum(0) for family in self.families}
        return _channel_candidates(layer, costs, shape)

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int]) -> LayerPlan:
        return LayerPlan(
            torch.arange(shape.num_heads),
            _drop_lowest(scores.qk, counts["qk"]),
            _drop_lowest(scores.vo, counts["vo"]),
        )


class SameChannel:
    families = ("qk", "vo")

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape) -> list[Candidates]:
        costs = {family: torch.sort(getattr(scores, family).sum(0)).values for family in self.families}
        return _channel_candidates(layer, costs, shape)

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int]) -> LayerPlan:
        heads = torch.arange(shape.num_heads)
        keep_qk = _drop_lowest(scores.qk.sum(0), counts["qk"])
        keep_vo = _drop_lowest(scores.vo.sum(0), counts["vo"])
        return LayerPlan(heads, keep_qk.expand(len(heads), -1).clone(), keep_vo.expand(len(heads), -1).clone())


GRANULARITIES = {"entire_head": EntireHead(), "per_head": PerHead(), "same_channel": SameChannel()}
