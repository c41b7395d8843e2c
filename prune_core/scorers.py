"""Scorers: how important each head, QK channel pair and VO channel pair is (low = prune first).

A scorer is a function `(model, sites, calib, loss_fn) -> list[LayerScores]` registered by name in
`SCORERS`. QK channel c of head h is row c of that head in W_q together with the same row of W_k;
VO channel c is row c of the head in W_v together with the matching column of W_o.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prune_core.adapters import AttentionSite
from prune_core.attention import pad_heads
from prune_core.batches import Batch, LossFn, eval_mode, to_device

FISHER_EPS = 1e-6  # the authors' floor, so that no structure scores exactly zero


@dataclass(frozen=True)
class LayerScores:
    """Scores of one layer: qk [heads, widest Q/K head], vo [heads, widest V head], head [heads].

    Where the heads of a layer have different dims, the narrower heads' rows are padded with
    entries that are no channel (see `LayerShape.qk_dims`, `v_dims`).
    """

    qk: torch.Tensor
    vo: torch.Tensor
    head: torch.Tensor


ScoreFn = Callable[[nn.Module, list[AttentionSite], Iterable[Batch] | None, LossFn], list[LayerScores]]


@dataclass(frozen=True)
class Scorer:
    """A registered scorer: its function, and whether it needs calibration batches (gradient scorers do)."""

    score: ScoreFn
    needs_data: bool

    def __call__(self, model, sites, calib, loss_fn) -> list[LayerScores]:
        return self.score(model, sites, calib, loss_fn)


SCORERS: dict[str, Scorer] = {}


def register(name: str, *, needs_data: bool) -> Callable[[ScoreFn], ScoreFn]:
    """Add a scorer function to the registry under `name`."""

    def add(score: ScoreFn) -> ScoreFn:
        SCORERS[name] = Scorer(score, needs_data)
        return score

    return add


def _summed(elementwise: list[torch.Tensor]) -> LayerScores:
    """Structure scores as sums of per-weight importances (Fisher, Taylor)."""
    q, k, v, o = (tensor.sum(-1) for tensor in elementwise)
    qk, vo = q + k, v + o
    return LayerScores(qk=qk, vo=vo, head=qk.sum(-1) + vo.sum(-1))


def magnitude_scorer(p: float) -> ScoreFn:
    """p-norm of each structure's rows/columns; p = 1 as in the authors' code."""

    def magnitude(model, sites, calib, loss_fn):
        scores = []
        with torch.no_grad():
            for site in sites:
                q, k, v, o = _as_structures(site, *(w.float() for w in _attention_weights(site)))
                norms = [torch.linalg.vector_norm(w, ord=p, dim=-1) for w in (q, k, v, o)]
                heads = torch.stack([torch.linalg.vector_norm(w.flatten(1), ord=p, dim=-1) for w in (q, k, v, o)])
                scores.append(
                    LayerScores(qk=(norms[0] + norms[1]) / 2, vo=(norms[2] + norms[3]) / 2, head=heads.mean(0))
                )
        return scores

    return magnitude


register("magnitude", needs_data=False)(magnitude_scorer(1.0))
register("magnitude_l2", needs_data=False)(magnitude_scorer(2.0))


@register("random", needs_data=False)
def random_scores(model, sites, calib, loss_fn):
    """Uniform random scores, the control; seed it with `torch.manual_seed`."""
    return [
        LayerScores(
            qk=torch.rand(s.shape.num_heads, max(s.shape.qk_dims)),
            vo=torch.rand(s.shape.num_heads, max(s.shape.v_dims)),
            head=torch.rand(s.shape.num_heads),
        )
        for s in sites
    ]


@contextmanager
def _only_attention_grads(model: nn.Module, sites: list[AttentionSite], enable: bool):
    """Gradients for the attention weights alone (or none), restored afterwards; model in eval mode."""
    flags = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    if enable:
        for site in sites:
            for weight in _attention_weights(site):
                weight.requires_grad_(True)
    with eval_mode(model):
        try:
            yield
        finally:
            for param, flag in flags.items():
                param.requires_grad_(flag)
                param.grad = None


def _attention_weights(site: AttentionSite) -> list[nn.Parameter]:
    return [site.attention.projection(role).weight for role in "qkv"] + [site.o_proj.weight]


def _require(calib: Iterable[Batch] | None, scorer: str) -> Iterable[Batch]:
    if calib is None:
        raise ValueError(f"scorer '{scorer}' needs calibration batches: pass calib=<iterable of batches>")
    return calib


def _weight_gradients(model, sites, calib, loss_fn, scorer: str, reduce: Callable[[torch.Tensor], torch.Tensor]):
    """Per attention weight, the mean over calibration batches of `reduce(batch gradient)`."""
    device = next(model.parameters()).device
    weights = [_attention_weights(site) for site in sites]
    totals = [[torch.zeros_like(w, dtype=torch.float32) for w in layer] for layer in weights]
    batches = 0
    with _only_attention_grads(model, sites, enable=True):
        for batch in _require(calib, scorer):
            model.zero_grad(set_to_none=True)
            loss_fn(model, to_device(batch, device)).backward()
            for layer, total in zip(weights, totals):
                for weight, acc in zip(layer, total):
                    acc += reduce(weight.grad.float())
            batches += 1
    if batches == 0:
        raise ValueError(f"scorer '{scorer}' got an empty calibration set")
    return [[acc / batches for acc in total] for total in totals]


def _as_structures(site: AttentionSite, q, k, v, o) -> list[torch.Tensor]:
    """Q, K, V rows and O columns as [heads, channels, weights]; narrower heads padded with zero rows."""
    shape = site.shape
    return [
        pad_heads(q, shape.qk_dims, axis=0),
        pad_heads(k, shape.qk_dims, axis=0),
        pad_heads(v, shape.v_dims, axis=0),
        pad_heads(o.t(), shape.v_dims, axis=0),
    ]


@register("fisher", needs_data=True)
def fisher(model, sites, calib, loss_fn):
    """The authors' diagonal empirical Fisher: squared batch gradients averaged over batches, summed per structure."""
    squares = _weight_gradients(model, sites, calib, loss_fn, "fisher", torch.square)
    return [_summed(_as_structures(site, *(s + FISHER_EPS for s in layer))) for site, layer in zip(sites, squares)]


@register("taylor", needs_data=True)
def taylor(model, sites, calib, loss_fn):
    """First-order Taylor: |w * mean gradient| summed per structure."""
    grads = _weight_gradients(model, sites, calib, loss_fn, "taylor", lambda g: g)
    scores = []
    with torch.no_grad():
        for site, layer in zip(sites, grads):
            weights = [w.float() for w in _attention_weights(site)]
            scores.append(_summed(_as_structures(site, *((w * g).abs() for w, g in zip(weights, layer)))))
    return scores


@register("fisher_mask", needs_data=True)
def fisher_mask(model, sites, calib, loss_fn):
    """Fisher of a multiplicative mask per structure (Michel et al. 2019, Kwon et al. 2022).

    A mask multiplies each Q channel and each head's context channel (the input of W_o); one backward
    gives every sample's mask gradient, since each sample owns its mask. Fisher = mean over samples of
    the squared gradient; a head's mask gradient is the sum of its context channels' gradients.
    """
    device = next(model.parameters()).device
    qk_sums = [torch.zeros(s.shape.num_heads, max(s.shape.qk_dims), device=device) for s in sites]
    vo_sums = [torch.zeros(s.shape.num_heads, max(s.shape.v_dims), device=device) for s in sites]
    head_sums = [torch.zeros(s.shape.num_heads, device=device) for s in sites]
    masks: dict[tuple[int, str], torch.Tensor] = {}

    def scale_output(index: int):
        def hook(module, inputs, output):
            masks[index, "qk"] = torch.ones(output.shape[0], 1, output.shape[-1], device=device, requires_grad=True)
            return output * masks[index, "qk"]

        return hook

    def scale_input(index: int):
        def hook(module, inputs):
            (context, *rest) = inputs
            masks[index, "vo"] = torch.ones(context.shape[0], 1, context.shape[-1], device=device, requires_grad=True)
            return (context * masks[index, "vo"], *rest)

        return hook

    handles = []
    for index, site in enumerate(sites):
        handles.append(site.attention.projection("q").register_forward_hook(scale_output(index)))
        handles.append(site.o_proj.register_forward_pre_hook(scale_input(index)))
    samples = 0
    try:
        with _only_attention_grads(model, sites, enable=False):
            for batch in _require(calib, "fisher_mask"):
                masks.clear()
                batch = to_device(batch, device)
                loss = loss_fn(model, batch)
                size = masks[0, "qk"].shape[0]
                (loss * size).backward()  # per-sample gradients of a mean loss
                for index, site in enumerate(sites):
                    shape = site.shape
                    qk = pad_heads(masks[index, "qk"].grad.view(size, -1), shape.qk_dims)
                    vo = pad_heads(masks[index, "vo"].grad.view(size, -1), shape.v_dims)
                    qk_sums[index] += qk.square().sum(0)
                    vo_sums[index] += vo.square().sum(0)
                    head_sums[index] += vo.sum(-1).square().sum(0)
                samples += size
    finally:
        for handle in handles:
            handle.remove()
    if samples == 0:
        raise ValueError("scorer 'fisher_mask' got an empty calibration set")
    return [
        LayerScores(qk=qk.cpu() / samples, vo=vo.cpu() / samples, head=head.cpu() / samples)
        for qk, vo, head in zip(qk_sums, vo_sums, head_sums)
    ]
