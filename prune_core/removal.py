"""Physical removal: shrink Q/K/V rows and O columns to what a `LayerPlan` keeps.

`mask_plan` zeroes the same structures instead; the pruned model must compute exactly what the
masked one does, which is what the tests check. A plan may keep no head: the layer is left with
zero-row Q/K/V and zero-column O projections (O's bias stays), which save, load and cost nothing.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn
from torch.nn.utils import skip_init

from prune_core.adapters import AttentionSite
from prune_core.attention import LayerShape
from prune_core.granularities import LayerPlan, Rows


def _rows(keep_heads: torch.Tensor, channels: Rows, dims: tuple[int, ...]) -> torch.Tensor:
    """Flat row indices of the kept channels of the kept heads, head-major; `dims` are the current head dims.

    No kept head (a layer left headless) keeps no row.
    """
    offsets = [0, *itertools.accumulate(dims)]
    kept = [offsets[head] + row for head, row in zip(keep_heads.tolist(), channels)]
    return torch.cat([torch.empty(0, dtype=torch.long), *kept])


def _empty_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear on `like`'s device and dtype, its weights to be copied in.

    The zero-size projections of a headless layer would make torch warn that initialising them does
    nothing; they are not initialised, so the warning says nothing here.
    """
    weight = like.weight
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return skip_init(
            nn.Linear, in_features, out_features, bias=like.bias is not None, device=weight.device, dtype=weight.dtype
        )


def _take_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    rows = rows.to(linear.weight.device)
    smaller = _empty_linear(linear, linear.in_features, len(rows))
    with torch.no_grad():
        smaller.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            smaller.bias.copy_(linear.bias[rows])
    return smaller


def _take_columns(linear: nn.Linear, columns: torch.Tensor) -> nn.Linear:
    columns = columns.to(linear.weight.device)
    smaller = _empty_linear(linear, len(columns), linear.out_features)
    with torch.no_grad():
        smaller.weight.copy_(linear.weight[:, columns])
        if linear.bias is not None:
            smaller.bias.copy_(linear.bias)
    return smaller


def apply_plan(model: nn.Module, site: AttentionSite, plan: LayerPlan) -> None:
    """Replace the layer's projections by smaller ones holding only what `plan` keeps."""
    attention, shape = site.attention, site.shape
    qk_rows = _rows(plan.keep_heads, plan.keep_qk, shape.qk_dims)
    vo_rows = _rows(plan.keep_heads, plan.keep_vo, shape.v_dims)
    for role, rows in (("q", qk_rows), ("k", qk_rows), ("v", vo_rows)):
        setattr(attention, attention.names["qkv".index(role)], _take_rows(attention.projection(role), rows))
    model.set_submodule(site.o_path, _take_columns(site.o_proj, vo_rows))
    attention.set_dims(*plan.kept_dims)


def mask_plan(site: AttentionSite, plan: LayerPlan) -> None:
    """Zero, in place, every row and column that `apply_plan` would remove."""
    shape = site.shape
    removed = {}
    for name, channels, dims in (("qk", plan.keep_qk, shape.qk_dims), ("vo", plan.keep_vo, shape.v_dims)):
        keep = torch.zeros(sum(dims), dtype=torch.bool)
        keep[_rows(plan.keep_heads, channels, dims)] = True
        removed[name] = ~keep
    with torch.no_grad():
        for role, family in (("q", "qk"), ("k", "qk"), ("v", "vo")):
            linear = site.attention.projection(role)
            linear.weight[removed[family].to(linear.weight.device)] = 0
            if linear.bias is not None:
                linear.bias[removed[family].to(linear.bias.device)] = 0
        site.o_proj.weight[:, removed["vo"].to(site.o_proj.weight.device)] = 0


def resize(model: nn.Module, site: AttentionSite, shape: LayerShape) -> None:
    """Give the layer empty projections of `shape`, ready to receive saved pruned weights."""
    attention = site.attention
    qk, v = sum(shape.qk_dims), sum(shape.v_dims)
    for role, rows in (("q", qk), ("k", qk), ("v", v)):
        old = attention.projection(role)
        setattr(attention, attention.names["qkv".index(role)], _empty_linear(old, old.in_features, rows))
    model.set_submodule(site.o_path, _empty_linear(site.o_proj, v, site.o_proj.out_features))
    attention.set_dims(shape.qk_dims, shape.v_dims)
