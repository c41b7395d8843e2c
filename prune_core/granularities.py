"""Granularities: what one removal unit is in a layer, and which indices a count of units removes.

`entire_head` removes whole heads. The channel granularities prune QK and VO pairs independently
(decoupled): `per_head` removes one channel from every head of a layer per unit, each head choosing
its own; `same_channel` removes the same channel index from every head; `variable_per_head` removes
single channels, so the heads of a layer may keep different numbers. `hybrid` ranks whole heads and
`per_head` channel units of a layer together. Every head keeps one QK and one VO channel, and a layer
keeps `min_heads` heads: 1 by default; with 0, `entire_head` and `hybrid` may remove a layer's last head
too, leaving the layer headless (depth pruning of attention blocks). The channel granularities never
remove heads, so `min_heads` changes nothing for them. Headless layers have no units and are not passed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prune_core.attention import LayerShape
from prune_core.scorers import LayerScores


@dataclass(frozen=True)
class Candidates:
    """The removal units of one family ('head', 'qk', 'vo' or 'mixed') in one layer, in the order they go.

    `costs[n]` ranks the (n+1)-th unit against the family's units in every layer: the score it loses
    (per parameter in the 'mixed' family, whose units differ in size). Costs never decrease along a
    layer, and only a prefix of a layer's units is ever removed. `sizes[n]` is how many parameters
    the unit removes, out of the `family_params` this family holds in the layer.
    """

    layer: int
    family: str
    costs: torch.Tensor
    sizes: tuple[int, ...]
    family_params: int


Rows = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LayerPlan:
    """What a layer keeps, as indices into its current heads and channels (sorted).

    `keep_qk` and `keep_vo` hold one row of kept channel indices per kept head: a [kept heads, kept
    channels] tensor when every kept head keeps as many, else a tuple of 1-D tensors.
    """

    keep_heads: torch.Tensor  # [kept heads]
    keep_qk: Rows
    keep_vo: Rows

    @property
    def kept_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Each kept head's Q/K dim and V dim."""
        return tuple(len(row) for row in self.keep_qk), tuple(len(row) for row in self.keep_vo)


MIN_HEADS = (0, 1)  # heads a layer keeps: 0 lets `entire_head` and `hybrid` remove whole attention blocks


def check_min_heads(min_heads: object) -> None:
    """Raise unless `min_heads` is 0 or 1 (an int, not a bool or a float)."""
    if not isinstance(min_heads, int) or isinstance(min_heads, bool) or min_heads not in MIN_HEADS:
        raise ValueError(
            f"min_heads must be 0 (a layer may lose all its heads) or 1 (every layer keeps one), got {min_heads!r}"
        )


class Granularity(Protocol):
    """One kind of removal unit: the families it ranks, its units in a layer, and what a count of them keeps.

    `ragged_heads` says whether it can prune a layer whose heads have different dims. `min_heads` is how
    many heads the layer keeps at least (0 or 1); `plan` must get the value `candidates` got.
    """

    families: tuple[str, ...]
    ragged_heads: bool

    def candidates(
        self, layer: int, scores: LayerScores, shape: LayerShape, min_heads: int = 1
    ) -> list[Candidates]: ...

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int], min_heads: int = 1) -> LayerPlan: ...


def _as_rows(rows: list[torch.Tensor]) -> Rows:
    """One 2-D tensor when every row has the same length, else the rows as a tuple."""
    return torch.stack(rows) if len({len(row) for row in rows}) == 1 else tuple(rows)


def _all_channels(heads: torch.Tensor, dims: tuple[int, ...]) -> Rows:
    return _as_rows([torch.arange(dims[head]) for head in heads.tolist()])


def _drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the sorted indices left after dropping the `count` lowest scores."""
    order = torch.argsort(scores, dim=-1, stable=True)[..., count:]
    return torch.sort(order, dim=-1).values


def _family_dims(shape: LayerShape) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per channel family, each head's dim and the parameters of one channel."""
    return {"qk": (shape.qk_dims, shape.qk_channel_params), "vo": (shape.v_dims, shape.vo_channel_params)}


class EntireHead:
    families = ("head",)
    ragged_heads = True

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape, min_heads: int = 1) -> list[Candidates]:
        order = torch.argsort(scores.head, stable=True)[: shape.num_heads - min_heads]
        sizes = tuple(shape.head_params[head] for head in order.tolist())
        return [Candidates(layer, "head", scores.head[order], sizes, sum(shape.head_params))]

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int], min_heads: int = 1) -> LayerPlan:
        heads = _drop_lowest(scores.head, counts["head"])
        return LayerPlan(heads, _all_channels(heads, shape.qk_dims), _all_channels(heads, shape.v_dims))


def _channel_candidates(layer: int, channel_costs: dict[str, torch.Tensor], shape: LayerShape) -> list[Candidates]:
    """Units of one channel from every head of the layer, the first `head dim - 1` of them."""
    candidates = []
    for family, costs in channel_costs.items():
        dims, channel_params = _family_dims(shape)[family]
        size = shape.num_heads * channel_params
        count = dims[0] - 1
        candidates.append(Candidates(layer, family, costs[:count], (size,) * count, sum(dims) * channel_params))
    return candidates


class PerHead:
    families = ("qk", "vo")
    ragged_heads = False

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape, min_heads: int = 1) -> list[Candidates]:
        # the n-th unit removes every head's n-th cheapest channel
        costs = {family: torch.sort(getattr(scores, family), dim=-1).values.sum(0) for family in self.families}
        return _channel_candidates(layer, costs, shape)

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int], min_heads: int = 1) -> LayerPlan:
        return LayerPlan(
            torch.arange(shape.num_heads),
            _drop_lowest(scores.qk, counts["qk"]),
            _drop_lowest(scores.vo, counts["vo"]),
        )


class SameChannel:
    families = ("qk", "vo")
    ragged_heads = False

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape, min_heads: int = 1) -> list[Candidates]:
        costs = {family: torch.sort(getattr(scores, family).sum(0)).values for family in self.families}
        return _channel_candidates(layer, costs, shape)

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int], min_heads: int = 1) -> LayerPlan:
        heads = torch.arange(shape.num_heads)
        keep_qk = _drop_lowest(scores.qk.sum(0), counts["qk"])
        keep_vo = _drop_lowest(scores.vo.sum(0), counts["vo"])
        return LayerPlan(heads, keep_qk.expand(len(heads), -1).clone(), keep_vo.expand(len(heads), -1).clone())


def _removable_channels(scores: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Flat indices (head * width + channel) of every channel but each head's best, cheapest first.

    `scores` is [heads, widest head]; a head's entries past its own dim are no channel.
    """
    exists = torch.arange(scores.shape[1]) < torch.tensor(dims)[:, None]
    best = scores.masked_fill(~exists, -torch.inf).argmax(-1)
    removable = exists.clone()
    removable[torch.arange(len(dims)), best] = False
    flat = torch.nonzero(removable.flatten()).flatten()
    return flat[torch.argsort(scores.flatten()[flat], stable=True)]


class VariablePerHead:
    """Every QK (VO) channel of every head is a unit of its own, ranked by its score alone.

    Heads of a layer may so keep different numbers of channels (the paper's open question); each
    head keeps at least its best QK and its best VO channel. Works on layers already ragged.
    """

    families = ("qk", "vo")
    ragged_heads = True

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape, min_heads: int = 1) -> list[Candidates]:
        candidates = []
        for family, (dims, channel_params) in _family_dims(shape).items():
            family_scores = getattr(scores, family)
            order = _removable_channels(family_scores, dims)
            costs = family_scores.flatten()[order]
            sizes = (channel_params,) * len(order)
            candidates.append(Candidates(layer, family, costs, sizes, sum(dims) * channel_params))
        return candidates

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int], min_heads: int = 1) -> LayerPlan:
        keep = {}
        for family, (dims, _) in _family_dims(shape).items():
            family_scores = getattr(scores, family)
            kept = torch.arange(family_scores.shape[1]) < torch.tensor(dims)[:, None]
            kept.view(-1)[_removable_channels(family_scores, dims)[: counts[family]]] = False
            keep[family] = _as_rows([torch.nonzero(row).flatten() for row in kept])
        return LayerPlan(torch.arange(shape.num_heads), keep["qk"], keep["vo"])


@dataclass(frozen=True)
class HybridMove:
    """One unit `hybrid` takes from a layer: a head, or one QK or VO channel from every remaining head."""

    kind: str  # 'head', 'qk' or 'vo'
    head: int | None  # the head, for kind 'head'
    cost: float  # score lost, at the layer's state when the move is taken
    size: int  # parameters removed, at that state


def hybrid_moves(scores: LayerScores, shape: LayerShape, min_heads: int = 1) -> list[HybridMove]:
    """The order in which `hybrid` gives up a layer: each time, the cheapest per parameter removed of the
    next QK channel unit, the next VO channel unit and the cheapest remaining head (while more than
    `min_heads` remain; with 0 the last head goes too, and nothing is left to take after it).

    A head costs the sum of its remaining channels' scores, so heads and channels are on one scale
    (for `fisher` and `taylor` this is the scorer's own head score; `magnitude`'s head norm would sit at
    half the channels' scale). Costs and sizes are taken where the move happens: a head removed after
    two QK units takes its remaining channels only, and a channel unit after a head removal spans
    the remaining heads.
    """
    families = ("qk", "vo")
    ordered = {family: torch.sort(getattr(scores, family).double(), dim=-1).values for family in families}
    prefix = {family: torch.nn.functional.pad(values.cumsum(-1), (1, 0)) for family, values in ordered.items()}
    head_costs = ordered["qk"].sum(-1) + ordered["vo"].sum(-1)
    head_dim = {"qk": shape.qk_head_dim, "vo": shape.v_head_dim}
    channel_params = {"qk": shape.qk_channel_params, "vo": shape.vo_channel_params}
    alive, taken = list(range(shape.num_heads)), {family: 0 for family in families}
    moves: list[HybridMove] = []
    while True:
        options = []
        if len(alive) > min_heads:
            remaining = head_costs[alive] - prefix["qk"][alive, taken["qk"]] - prefix["vo"][alive, taken["vo"]]
            best = int(torch.argmin(remaining))
            size = sum((head_dim[family] - taken[family]) * channel_params[family] for family in families)
            options.append(HybridMove("head", alive[best], float(remaining[best]), size))
        for family in families:
            if alive and taken[family] < head_dim[family] - 1:
                cost = float(ordered[family][alive, taken[family]].sum())
                options.append(HybridMove(family, None, cost, len(alive) * channel_params[family]))
        if not options:
            return moves
        move = min(options, key=lambda option: option.cost / option.size)
        moves.append(move)
        if move.kind == "head":
            alive.remove(move.head)
        else:
            taken[move.kind] += 1


class Hybrid:
    """Whole heads and `per_head` QK / VO channel units of a layer, ranked together per parameter.

    One step may so drop some heads and shrink the channels of the rest (the paper's open question).
    A unit's rank is the highest cost per parameter of it and the units before it in its layer
    (`hybrid_moves` order), so a threshold always takes a prefix of each layer's moves.
    """

    families = ("mixed",)
    ragged_heads = False

    def candidates(self, layer: int, scores: LayerScores, shape: LayerShape, min_heads: int = 1) -> list[Candidates]:
        moves = hybrid_moves(scores, shape, min_heads)
        per_param = torch.tensor([move.cost / move.size for move in moves], dtype=torch.float64)
        ranks = torch.cummax(per_param, dim=0).values
        return [Candidates(layer, "mixed", ranks, tuple(move.size for move in moves), sum(shape.head_params))]

    def plan(self, scores: LayerScores, shape: LayerShape, counts: dict[str, int], min_heads: int = 1) -> LayerPlan:
        moves = hybrid_moves(scores, shape, min_heads)[: counts["mixed"]]
        removed = {move.head for move in moves if move.kind == "head"}
        heads = torch.tensor([head for head in range(shape.num_heads) if head not in removed], dtype=torch.long)
        taken = {family: sum(move.kind == family for move in moves) for family in ("qk", "vo")}
        keep_qk, keep_vo = (_drop_lowest(getattr(scores, f)[heads], taken[f]) for f in ("qk", "vo"))
        return LayerPlan(heads, keep_qk, keep_vo)


GRANULARITIES: dict[str, Granularity] = {
    "entire_head": EntireHead(),
    "per_head": PerHead(),
    "same_channel": SameChannel(),
    "variable_per_head": VariablePerHead(),
    "hybrid": Hybrid(),
}
