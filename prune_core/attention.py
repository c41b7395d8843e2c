"""Multi-head self-attention whose Q/K and V head dims may differ, for physically pruned layers.

A pruned layer keeps its projections under the model's own names (`q_proj`... for AST) and the
softmax scale of the dense model, so a removed channel behaves exactly like a zeroed one. Heads of a
layer share one Q/K dim and one V dim, except after `variable_per_head`, where each head keeps its own.
A layer may lose all its heads (`prune(..., min_heads=0)`): it then adds only O's bias to the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer looks like: each head's Q/K dim and V dim, and the model width.

    A layer without heads (empty dims) is headless: of its attention, only O's bias is left.
    """

    qk_dims: tuple[int, ...]
    v_dims: tuple[int, ...]
    hidden_size: int

    def __post_init__(self) -> None:
        if len(self.qk_dims) != len(self.v_dims):
            raise ValueError(f"a layer needs one Q/K dim and one V dim per head, got {self.qk_dims} and {self.v_dims}")
        if min(self.qk_dims, default=1) < 1 or min(self.v_dims, default=1) < 1:
            raise ValueError(f"every head needs >= 1 Q/K and >= 1 V channel, got {self.qk_dims} and {self.v_dims}")

    @classmethod
    def uniform(cls, num_heads: int, qk_head_dim: int, v_head_dim: int, hidden_size: int) -> LayerShape:
        """A layer whose heads all have the same dims (every dense layer)."""
        return cls((qk_head_dim,) * num_heads, (v_head_dim,) * num_heads, hidden_size)

    @classmethod
    def from_dict(cls, data: dict) -> LayerShape:
        """Read `to_dict`'s output; a layer without per-head lists is uniform."""
        if "qk_dims" not in data:
            return cls.uniform(data["num_heads"], data["qk_head_dim"], data["v_head_dim"], data["hidden_size"])
        shape = cls(tuple(data["qk_dims"]), tuple(data["v_dims"]), data["hidden_size"])
        if data.get("num_heads", shape.num_heads) != shape.num_heads:
            raise ValueError(f"num_heads {data['num_heads']} but {shape.num_heads} per-head dims in {data}")
        return shape

    def to_dict(self) -> dict:
        """Uniform layers as `num_heads`, `qk_head_dim`, `v_head_dim`; others (headless too) with per-head lists."""
        if self.is_uniform and self.num_heads:
            head_dims = {"qk_head_dim": self.qk_head_dim, "v_head_dim": self.v_head_dim}
        else:
            head_dims = {"qk_dims": list(self.qk_dims), "v_dims": list(self.v_dims)}
        return {"num_heads": self.num_heads, **head_dims, "hidden_size": self.hidden_size}

    @property
    def num_heads(self) -> int:
        return len(self.qk_dims)

    @property
    def is_uniform(self) -> bool:
        """Whether every head has the same dims (a headless layer has no heads that differ)."""
        return len(set(self.qk_dims)) <= 1 and len(set(self.v_dims)) <= 1

    @property
    def qk_head_dim(self) -> int:
        """The Q/K dim every head shares; a layer whose heads differ has none."""
        return _shared(self.qk_dims, "Q/K")

    @property
    def v_head_dim(self) -> int:
        """The V dim every head shares; a layer whose heads differ has none."""
        return _shared(self.v_dims, "V")

    @property
    def params(self) -> int:
        """Q/K/V/O weights and biases (the O bias included: it is attention, but never removable)."""
        qk, v = sum(self.qk_dims), sum(self.v_dims)
        return 2 * qk * (self.hidden_size + 1) + v * (self.hidden_size + 1) + v * self.hidden_size + self.hidden_size

    @property
    def qk_channel_params(self) -> int:
        """One Q row and one K row, with their biases."""
        return 2 * (self.hidden_size + 1)

    @property
    def vo_channel_params(self) -> int:
        """One V row with its bias and the matching O column."""
        return 2 * self.hidden_size + 1

    @property
    def head_params(self) -> tuple[int, ...]:
        """Parameters of each head (its Q/K and V/O channels)."""
        return tuple(
            qk * self.qk_channel_params + v * self.vo_channel_params for qk, v in zip(self.qk_dims, self.v_dims)
        )


def _shared(dims: tuple[int, ...], name: str) -> int:
    if not dims:
        raise ValueError(f"this layer has no heads, so no {name} head dim")
    if len(set(dims)) != 1:
        raise ValueError(f"the heads of this layer have different {name} dims {dims}; read the per-head dims")
    return dims[0]


def padded_index(dims: tuple[int, ...]) -> torch.Tensor:
    """Where each of the heads' channels (one head after another) lands when every head is padded to the widest."""
    width = max(dims)
    return torch.cat([head * width + torch.arange(dim) for head, dim in enumerate(dims)])


def pad_heads(
    x: torch.Tensor, dims: tuple[int, ...], axis: int = -1, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Split `axis` of `x` (the heads' channels, one head after another) into [heads, widest head].

    Narrower heads are zero-padded: zero channels change neither Q.K nor any kept output. `index` is
    `padded_index(dims)` on x's device, passed by callers that keep it; heads of equal dims need none.
    """
    heads, width = len(dims), max(dims)
    if min(dims) == width:
        return x.unflatten(axis, (heads, width))
    if index is None:
        index = padded_index(dims).to(x.device)
    shape = list(x.shape)
    shape[axis] = heads * width
    return x.new_zeros(shape).index_copy(axis, index, x).unflatten(axis, (heads, width))


def unpad_heads(x: torch.Tensor, dims: tuple[int, ...], index: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `pad_heads` on the last two axes ([..., heads, widest head] -> [..., channels])."""
    flat = x.flatten(-2)
    if min(dims) == max(dims):
        return flat
    return flat.index_select(-1, index if index is not None else padded_index(dims).to(x.device))


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; value may have a different head dim than query and key."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float,
) -> torch.Tensor:
    """torch's SDPA called directly (transformers' dispatch wrapper costs ~25 us a layer at batch 1).

    The fused kernels need one head dim for Q/K and V; where pruning made them differ, the smaller
    side is zero-padded (zeros change neither Q.K nor the kept outputs): on CPU at 1,214 tokens this
    is 4x faster than the unfused fallback torch would otherwise take.
    """
    qk_dim, v_dim = query.shape[-1], value.shape[-1]
    if qk_dim < v_dim:
        query = nn.functional.pad(query, (0, v_dim - qk_dim))
        key = nn.functional.pad(key, (0, v_dim - qk_dim))
    elif v_dim < qk_dim:
        value = nn.functional.pad(value, (0, qk_dim - v_dim))
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return output[..., :v_dim]


class PrunedAttention(nn.Module):
    """Self-attention over projections registered under the family's own names.

    `names` are the attribute names of the Q, K and V projections, and of O when the output
    projection lives in this module (AST, ViT); BERT keeps O in a sibling module, so `names`
    then has three entries and `o_sibling` is O's path from this module's parent. The attention kernel is the one the model's config selects
    (eager or SDPA), as in the unpruned model.

    Heads of different dims (`qk_dims`, `v_dims` after `variable_per_head`) are zero-padded to the
    layer's widest Q/K and V head and run in one batched kernel call: zero Q/K channels leave every
    score unchanged, and zero V channels give outputs that `unpad_heads` drops before O. Padding
    costs matmul work (1.2-1.4x what the kept channels need, at 30-50% sparsity in the benchmark
    below), but SDPA's time on CPU is far from proportional to the head dim (the softmax over the
    T x T map is per head), and the alternative, one SDPA call per group of equal-dim heads (up to
    one per head), measured no faster at 146 or 1,214 tokens (`benchmarks/granularity_latency.py`,
    its `grouped` rows). So: one call, and the same code as uniform layers, where padding is a view.
    """

    is_causal = False

    def __init__(
        self,
        projections: dict[str, nn.Linear],
        *,
        qk_dims: tuple[int, ...],
        v_dims: tuple[int, ...],
        scaling: float,
        dropout: float,
        config: object,
        o_sibling: str | None = None,
    ) -> None:
        super().__init__()
        if len(projections) not in (3, 4):
            raise ValueError(f"expected Q, K, V (and O) projections, got {list(projections)}")
        self.names = tuple(projections)
        for name, linear in projections.items():
            self.add_module(name, linear)
        self.scaling = scaling
        self.dropout_p = dropout
        self.config = config
        self.o_sibling = o_sibling
        self.set_dims(qk_dims, v_dims)

    def set_dims(self, qk_dims: tuple[int, ...], v_dims: tuple[int, ...]) -> None:
        """Record each head's Q/K and V dims, once the projections hold that many rows."""
        self.qk_dims, self.v_dims = tuple(qk_dims), tuple(v_dims)
        device = self.projection("q").weight.device
        for name, dims in (("qk_index", self.qk_dims), ("v_index", self.v_dims)):
            index = None if len(set(dims)) <= 1 else padded_index(dims).to(device)
            self.register_buffer(name, index, persistent=False)

    @property
    def num_heads(self) -> int:
        return len(self.qk_dims)

    def projection(self, role: str) -> nn.Linear:
        """The Q, K, V or O projection (role 'q', 'k', 'v', 'o')."""
        return getattr(self, self.names["qkvo".index(role)])

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.qk_dims:
            return self.headless_output(hidden_states), None
        query = pad_heads(self.projection("q")(hidden_states), self.qk_dims, index=self.qk_index).transpose(1, 2)
        key = pad_heads(self.projection("k")(hidden_states), self.qk_dims, index=self.qk_index).transpose(1, 2)
        value = pad_heads(self.projection("v")(hidden_states), self.v_dims, index=self.v_index).transpose(1, 2)
        dropout = self.dropout_p if self.training else 0.0
        implementation = getattr(self.config, "_attn_implementation", "eager")
        if implementation == "sdpa":
            output = fused_attention(query, key, value, attention_mask, dropout, self.scaling).transpose(1, 2)
            weights = None
        else:
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
            kwargs.pop("past_key_values", None)
            output, weights = attend(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
        output = unpad_heads(output, self.v_dims, self.v_index)
        if len(self.names) == 4:
            output = self.projection("o")(output)
        return output, weights

    def headless_output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What a layer without heads computes, with no matmul: O's bias at every token (what the dense layer
        gives with all its heads zeroed). Where O lives in a sibling (BERT), an empty context, which O's
        Linear (no input features) turns into its bias."""
        tokens = hidden_states.shape[:-1]
        if len(self.names) == 3:
            return hidden_states.new_zeros(*tokens, 0)
        o_proj = self.projection("o")
        if o_proj.bias is None:
            return hidden_states.new_zeros(*tokens, o_proj.out_features)
        return o_proj.bias.expand(*tokens, -1)
