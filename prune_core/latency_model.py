"""A latency model per device: profile an AST's parts once, then predict any pruned model's forward time.

A measured latency per trial is noisy on a shared machine and not comparable across nodes. Like
ZipLM's latency tables, `profile` times, on this machine, one `PrunedAttention` layer over a grid of
shapes (heads x Q/K dim x V dim, a few ragged layers, the headless layer) and a few whole models per
(tokens, batch); `predicted_latency` sums a model's layers from that table:

    predicted = fixed + sum over layers of (rest + attention_scale x attention alone(layer's shape))

- attention alone: one `PrunedAttention` (the module pruned models run) timed by itself, per grid cell
  (every head at the cell's Q/K and V dims), per ragged layer, and headless (0 heads: O's bias only).
- fixed: what does not repeat per layer (patch embedding, final layernorm, head): the stock
  transformers AST with zero layers.
- rest and attention_scale: fitted (a robust line) on "anchors", whole models whose layers all have
  one shape (dense, half the heads, half the dims, a third of the heads at half the dims). A layer's
  attention costs more inside the model than alone (at 146 tokens, batch 1 on CPU, about 1.5x: its
  weights are no longer in cache when it runs); taking the rest of a block as the dense model minus its
  attention alone would book that excess on the MLP, which pruning never shrinks, and under-predict
  every speedup. The anchors say how much of a whole model moves with its attention.

Interpolation: linear in heads and dims, where a layer's time is close to affine (projections grow
with heads x dims, SDPA with heads x (T^2 x dim + T^2)); log-log in tokens and batch, where it grows
like a power (T to T^2) and the grid is geometric. Only inside the grid: a value outside an axis, or
a (tokens, batch) whose surrounding cells were not profiled, is an error, never an extrapolation.

Ragged layers (heads of different dims, after `variable_per_head`) run padded to the widest head in
one SDPA call, while their projections are only as wide as the kept channels. A `padding_weight` w
per (tokens, batch), fitted by least squares on measured ragged layers, places them between the two:
t = t(heads at their mean dims) + w x (t(heads at the widest dims) - t(heads at their mean dims)),
so w = 0 costs a ragged layer like the channels it keeps (the sum), w = 1 like every head padded to the
widest (the max). Per (tokens, batch), because SDPA's share of a layer, which pays the padding, grows
with the tokens.

A table is refused for another device or dtype (`LatencyTableError`); another torch version, or another
torch thread count on CPU, only warns (`LatencyTableWarning`): kernels and threads change speed, not
what the model computes, and a user may knowingly reuse a table.

Times are wall-clock by default. On a CPU shared with other jobs, wall time follows their load; a table
profiled with one torch thread and `clock="cpu"` holds the thread's CPU time instead, which leaves out
the waiting for other processes (cell spreads fell from 20-50% to about 4% on a 2-core VM at load 5).
It still counts what the host of a VM takes: there, even CPU time moved by 20-40% within minutes, and a
table holds the speed the machine had while it was profiled.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn.utils import skip_init

from prune_core.accounting import dense_record
from prune_core.adapters import attention_sites
from prune_core.attention import LayerShape, PrunedAttention

TABLE_VERSION = 1
FAMILY = "audio-spectrogram-transformer"
HEADS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32)  # grid points, cut at the architecture's head count
DIMS = (1, 8, 16, 32, 48, 64, 96, 128)  # grid points, cut at the architecture's head dim
CPU_TOKENS_PER_CALL = 2048  # on CPU, (tokens, batch) with tokens x batch above this are left out (1,214 x 8 is)
MIN_PADDING_WEIGHT, MAX_PADDING_WEIGHT = 0.0, 2.0  # a fit outside this range is noise, clipped
OUTLIER_FACTOR = 2.0  # a call spreading this many times more than the median call is measured again alone
ATTENTION_SCALE = (1.0, 3.0)  # in-model / alone cost of attention: a fit outside this is noise, clipped


class LatencyTableError(ValueError):
    """A latency table that cannot answer (another device, architecture or dtype, shapes outside its grid), or
    a profile too noisy to make one."""


class LatencyTableWarning(UserWarning):
    """A latency table measured under another torch version or thread count: predictions may be off."""


@dataclass(frozen=True)
class ASTShape:
    """The AST a table profiles: its width, dense heads and depth, MLP width and input (patch 16, stride 10)."""

    hidden_size: int = 768
    num_heads: int = 12
    num_layers: int = 12
    intermediate_size: int = 3072
    num_mel_bins: int = 128
    num_labels: int = 35

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_mel_bins < 16:
            raise ValueError(f"num_mel_bins must be >= 16 (one 16-bin patch), got {self.num_mel_bins}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def config(self, tokens: int, num_layers: int | None = None) -> transformers.ASTConfig:
        """The AST config whose input gives `tokens` tokens (2 + frequency patches x time patches)."""
        frequency = (self.num_mel_bins - 16) // 10 + 1
        if tokens < 2 + frequency or (tokens - 2) % frequency:
            raise ValueError(
                f"tokens {tokens}: an AST with {self.num_mel_bins} mel bins has 2 + {frequency} x t tokens "
                f"(t >= 1 time patches), e.g. {2 + frequency * 12} (128 frames) or {2 + frequency * 101} (1,024 frames)"
            )
        frames = 16 + 10 * ((tokens - 2) // frequency - 1)
        return transformers.ASTConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers if num_layers is None else num_layers, num_mel_bins=self.num_mel_bins,
            max_length=frames, num_labels=self.num_labels,
        )


QUICK = {  # `--quick`: the tests' tiny AST (tests/conftest.py), seconds on a CPU
    "tokens": (8,), "batches": (1, 2), "hidden_size": 32, "num_heads": 4, "num_layers": 2, "intermediate_size": 64,
    "num_mel_bins": 32, "num_labels": 5, "rounds": 5, "min_sample_s": 0.01,
}


def device_name(device: torch.device | str) -> str:
    """The accelerator's name, or the CPU model (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


# ---------------------------------------------------------------------------------------------- measuring


def measure_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    rounds: int = 7,
    min_sample_s: float = 0.02,
    max_spread: float = 0.1,
    clock: str = "wall",
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Median milliseconds of each call, measured round-robin so that machine noise hits every call alike.

    `clock` is what a millisecond is: "wall" (elapsed time) or "cpu" (the CPU time of the calling thread,
    what the call costs when it does not wait for other processes; meaningful for one torch thread on CPU).

    Each sample repeats its call until it lasts `min_sample_s`; each round visits every call once, starting
    further along each round. An outlier, a call whose spread ((q3 - q1) / median) exceeds both `max_spread`
    and `OUTLIER_FACTOR` times the median spread of all calls, is measured again alone, and the measurement
    with the smaller spread is kept (the interleaved one stays under "interleaved"). Relative, because on a
    busy machine every call spreads, and measuring them all again alone would double the time and gain
    nothing; a burst that hit one call is what it fixes.
    """
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3 (for the quartiles), got {rounds}")
    device = torch.device(device)
    timer = _clock(clock, device, torch.get_num_threads())
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def sample(call: Callable[[], object], number: int) -> float:
        synchronize()
        start = timer()
        for _ in range(number):
            call()
        synchronize()
        return (timer() - start) * 1000 / number

    names = list(calls)
    with torch.inference_mode():
        numbers = {}
        for name in names:
            sample(calls[name], 1)  # warm-up
            numbers[name] = max(1, math.ceil(min_sample_s * 1000 / max(sample(calls[name], 1), 1e-6)))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            shift = round_index * max(1, len(names) // rounds) % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(sample(calls[name], numbers[name]))
            if progress:
                progress(f"round {round_index + 1}/{rounds} done")
        stats = {name: _stats(samples[name], numbers[name]) for name in names}
        limit = max(max_spread, OUTLIER_FACTOR * statistics.median(s["spread"] for s in stats.values()))
        for name in [name for name in names if stats[name]["spread"] > limit]:
            again = _stats([sample(calls[name], numbers[name]) for _ in range(rounds)], numbers[name])
            first = stats[name]
            stats[name] = {**(again if again["spread"] < first["spread"] else first), "remeasured": True,
                           "interleaved": first, "alone_spread": again["spread"]}
    return stats


def _clock(clock: str, device: torch.device, threads: int) -> Callable[[], float]:
    """The timer of `clock`; the CPU clock counts only the calling thread, so it needs one torch thread on CPU."""
    if clock == "wall":
        return time.perf_counter
    if clock != "cpu":
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if device.type != "cpu" or threads != 1:
        raise ValueError(f"clock 'cpu' times the calling thread, so it needs device cpu and 1 torch thread, got "
                         f"{device.type} with {threads} threads; use clock 'wall' (or threads 1)")
    return time.thread_time


def _pooled(first: dict, second: dict) -> dict:
    """The timing of one call from two of its entries in a round-robin (e.g. twice a round)."""
    pooled = _stats(first["samples"] + second["samples"], first["number"])
    return pooled | ({"remeasured": True} if "remeasured" in first or "remeasured" in second else {})


def _stats(samples: list[float], number: int) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"ms": median, "q1": q1, "q3": q3, "spread": (q3 - q1) / median, "number": number, "samples": samples}


# ---------------------------------------------------------------------------------------------- profiling


def _linear(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    with warnings.catch_warnings():  # a headless layer's projections have no rows
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        linear = skip_init(nn.Linear, in_features, out_features, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02)
        linear.bias.zero_()
    return linear


def attention_module(shape: LayerShape, config: transformers.ASTConfig, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> PrunedAttention:
    """A `PrunedAttention` of `shape` with random weights, as an AST layer would run it (`config`'s kernel)."""
    device = torch.device(device)
    qk, v, hidden = sum(shape.qk_dims), sum(shape.v_dims), shape.hidden_size
    projections = {"q_proj": _linear(hidden, qk, device, dtype), "k_proj": _linear(hidden, qk, device, dtype),
                   "v_proj": _linear(hidden, v, device, dtype), "o_proj": _linear(v, hidden, device, dtype)}
    return PrunedAttention(projections, qk_dims=shape.qk_dims, v_dims=shape.v_dims, scaling=1.0, dropout=0.0,
                           config=config).eval()


def ragged_shapes(shape: ASTShape) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The ragged layers a profile times (Q/K dims, V dims), like those `variable_per_head` leaves: every head
    kept, dims spread evenly from 0.7x to 1.3x of a mean at a quarter, half, three quarters and 0.9 of the
    dense head dim (capped at it), Q/K and V in opposite orders in every other one."""
    heads, dim = shape.num_heads, shape.head_dim
    patterns = []
    for index, fraction in enumerate((0.25, 0.5, 0.75, 0.9)):
        low, high = 0.7 * fraction * dim, 1.3 * fraction * dim
        dims = tuple(max(1, min(dim, round(low + (high - low) * head / max(1, heads - 1)))) for head in range(heads))
        patterns.append((dims, dims[::-1] if index % 2 else dims))
    return [(qk, v) for qk, v in dict.fromkeys(patterns) if len(set(qk)) > 1 or len(set(v)) > 1]


def profile(
    device: str = "cpu",
    tokens: Sequence[int] = (146, 1214),
    batches: Sequence[int] = (1, 8),
    hidden_size: int = 768,
    *,
    num_heads: int = 12,
    num_layers: int = 12,
    intermediate_size: int = 3072,
    num_mel_bins: int = 128,
    num_labels: int = 35,
    heads: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    rounds: int = 7,
    min_sample_s: float = 0.02,
    max_spread: float = 0.1,
    threads: int | None = None,
    clock: str = "wall",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure the latency table of this machine's `device` for an AST (default: AST-base, `ASTConfig()`'s
    sizes) at every (tokens, batch) a CPU can afford (tokens x batch <= `CPU_TOKENS_PER_CALL`; on GPU every
    pair). Returns the table (a JSON-ready dict, see `save_table`).

    Every round times the attention layers once and the whole models twice, as two blocks half a round
    apart: the anchors the fit compares are timed seconds apart, and in the same minutes as the layers
    they calibrate (on a shared machine, its speed moves from minute to minute). `heads` and `dims` are the
    attention grid (default: `HEADS`, `DIMS` up to the architecture's), `threads` the torch threads to
    measure with (default: as set), `clock` "wall" or, for one thread on a shared CPU, "cpu" (see
    `measure_interleaved`).
    """
    started = time.perf_counter()
    device_ = _profiled_device(device)
    shape = ASTShape(hidden_size, num_heads, num_layers, intermediate_size, num_mel_bins, num_labels)
    heads = _grid("heads", heads, HEADS, shape.num_heads)
    dims = _grid("dims", dims, DIMS, shape.head_dim)
    tokens, batches = _positive("tokens", tokens), _positive("batches", batches)
    for count in tokens:
        shape.config(count)  # every token count must be an AST input
    pairs = [(t, b) for t in tokens for b in batches]
    left_out = [pair for pair in pairs if device_.type == "cpu" and pair[0] * pair[1] > CPU_TOKENS_PER_CALL]
    pairs = [pair for pair in pairs if pair not in left_out]
    if not pairs:
        raise ValueError(f"every (tokens, batch) pair has tokens x batch > {CPU_TOKENS_PER_CALL}, too slow for a CPU")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        _clock(clock, device_, torch.get_num_threads())  # before minutes of set-up
        calls, cells = _profile_calls(shape, pairs, heads, dims, device_, dtype)
        layers = [name for name in calls if cells[name][0] == "attention"]
        models = [name for name in calls if cells[name][0] != "attention"]
        half = len(layers) // 2
        ordered = {**{f"{name} #1": calls[name] for name in models}, **{name: calls[name] for name in layers[:half]},
                   **{f"{name} #2": calls[name] for name in models}, **{name: calls[name] for name in layers[half:]}}
        if progress:
            progress(f"timing {len(layers)} attention layers and {len(models)} whole models (twice a round) on "
                     f"{device_name(device_)}, {rounds} interleaved rounds")
        timed = measure_interleaved(ordered, device=device_, rounds=rounds, min_sample_s=min_sample_s,
                                    max_spread=max_spread, clock=clock, progress=progress)
        stats = {name: timed[name] for name in layers}
        stats |= {name: _pooled(timed[f"{name} #1"], timed[f"{name} #2"]) for name in models}
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    table = _assemble(shape, pairs, heads, dims, cells, stats)
    return {
        "version": TABLE_VERSION, "device": device_.type, "device_name": device_name(device_),
        "torch": torch.__version__, "dtype": _dtype_name(dtype), "threads": used_threads, "clock": clock,
        "architecture": {"family": FAMILY, **asdict(shape)},
        "axes": {"heads": list(heads), "dims": list(dims), "tokens": list(tokens), "batches": list(batches)},
        "pairs": [list(pair) for pair in pairs], "left_out": [list(pair) for pair in left_out],
        **table,
        "settings": {"rounds": rounds, "min_sample_s": min_sample_s, "max_spread": max_spread},
        "profiled": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.perf_counter() - started,
                     "cells": len(stats), "remeasured": sum("remeasured" in s for s in stats.values()),
                     "worst_spread": max(s["spread"] for s in stats.values())},
    }


def _profiled_device(device: str) -> torch.device:
    try:
        device_ = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device (cpu or cuda)") from error
    if device_.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: profile measures cpu or cuda")
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA device on this machine; profile on a GPU node, or use cpu")
    return device_


def _grid(name: str, given: Sequence[int] | None, default: Sequence[int], largest: int) -> tuple[int, ...]:
    """The grid along `name`: `given`, or `default` cut at `largest` (the dense model's), which it always holds."""
    if given is None:
        return tuple(sorted({*(value for value in default if value < largest), largest}))
    values = _positive(name, given)
    if largest not in values:
        raise ValueError(f"{name} {list(values)} must include the dense model's {largest} (the dense model is the "
                         "first anchor of the fit)")
    return values


def _positive(name: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {list(values)}")
    return tuple(sorted(set(values)))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def anchor_shapes(shape: ASTShape) -> list[tuple[int, int]]:
    """The (heads, head dim) of the whole models timed to calibrate isolated layers: dense, half the heads,
    half the dims, and a third of the heads at half the dims (every layer alike)."""
    heads, dim = shape.num_heads, shape.head_dim
    return list(dict.fromkeys([(heads, dim), (max(1, heads // 2), dim), (heads, max(1, dim // 2)),
                               (max(1, heads // 3), max(1, dim // 2))]))


def _with_attention(dense: nn.Module, layer: LayerShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`dense` with every attention layer replaced by a fresh one of `layer`'s shape; all else shared with it."""
    attention = tuple(site.path + "." for site in attention_sites(dense))
    shared = {id(p): p for name, p in dense.named_parameters() if not name.startswith(attention)}
    model = copy.deepcopy(dense, memo=shared)
    for site in attention_sites(model):
        model.set_submodule(site.path, attention_module(layer, model.config, device, dtype))
    return model.eval()


def _profile_calls(
    shape: ASTShape, pairs: list[tuple[int, int]], heads: tuple[int, ...], dims: tuple[int, ...],
    device: torch.device, dtype: torch.dtype,
) -> tuple[dict[str, Callable[[], object]], dict[str, tuple]]:
    """Every call to time, by name, and what each is: ("attention", pair, qk_dims, v_dims), ("fixed", pair) or
    ("model", pair, heads, head dim).

    The whole models are the stock transformers AST with zero layers (`fixed`), and with every layer's
    attention a `PrunedAttention` of an anchor shape (`model`; the first anchor is the dense model). The
    attention cells take the dense model's config, so its attention kernel.
    """
    torch.manual_seed(0)
    anchors = anchor_shapes(shape)
    models = {}
    for tokens in sorted({t for t, _ in pairs}):
        dense = transformers.ASTForAudioClassification(shape.config(tokens)).to(device, dtype).eval()
        attention_sites(dense)
        whole = {anchor: dense if anchor == anchors[0] else
                 _with_attention(dense, LayerShape.uniform(anchor[0], anchor[1], anchor[1], shape.hidden_size),
                                 device, dtype) for anchor in anchors}
        fixed = transformers.ASTForAudioClassification(shape.config(tokens, num_layers=0)).to(device, dtype).eval()
        models[tokens] = (whole, fixed)
    config = models[min(models)][0][anchors[0]].config  # the dense model's: its attention kernel
    uniform = [LayerShape.uniform(n, qk, v, shape.hidden_size) for n in heads for qk in dims for v in dims]
    layers = uniform + [LayerShape((), (), shape.hidden_size)] + [
        LayerShape(qk, v, shape.hidden_size) for qk, v in ragged_shapes(shape)]
    modules = [attention_module(layer, config, device, dtype) for layer in layers]
    calls: dict[str, Callable[[], object]] = {}
    cells: dict[str, tuple] = {}
    for tokens, (whole, fixed) in models.items():
        frames = fixed.config.max_length
        for batch in [b for t, b in pairs if t == tokens]:
            pair = (tokens, batch)
            hidden = torch.randn(batch, tokens, shape.hidden_size, device=device, dtype=dtype)
            features = torch.randn(batch, frames, shape.num_mel_bins, device=device, dtype=dtype)
            for layer, module in zip(layers, modules):
                name = f"attention {tokens}x{batch} qk={layer.qk_dims} v={layer.v_dims}"
                calls[name] = (lambda m=module, h=hidden: m(h))
                cells[name] = ("attention", pair, layer.qk_dims, layer.v_dims)
            for anchor, model in whole.items():
                name = f"model {tokens}x{batch} heads={anchor[0]} dim={anchor[1]}"
                calls[name] = (lambda m=model, x=features: m(input_values=x))
                cells[name] = ("model", pair, *anchor)
            calls[f"fixed {tokens}x{batch}"] = (lambda m=fixed, x=features: m(input_values=x))
            cells[f"fixed {tokens}x{batch}"] = ("fixed", pair)
    return calls, cells


def _assemble(shape: ASTShape, pairs: list[tuple[int, int]], heads: tuple[int, ...], dims: tuple[int, ...],
              cells: dict[str, tuple], stats: dict[str, dict]) -> dict:
    """The table's cells from the timings: uniform attention, headless, ragged (with the padding weight), and per
    (tokens, batch) the fixed parts, the rest of a block and the attention scale (fitted on the anchors)."""
    attention, ragged = [], []
    fixed, anchors = {}, {pair: [] for pair in pairs}
    for name, cell in cells.items():
        kind, pair = cell[:2]
        if kind == "fixed":
            fixed[pair] = _cell(stats[name])
        elif kind == "model":
            anchors[pair].append({"heads": cell[2], "head_dim": cell[3], **_cell(stats[name])})
        else:
            qk, v = cell[2:]
            record = {"tokens": pair[0], "batch": pair[1], "heads": len(qk), **_cell(stats[name])}
            if len(set(qk)) <= 1 and len(set(v)) <= 1:
                attention.append({**record, "qk_dim": qk[0] if qk else 0, "v_dim": v[0] if v else 0})
            else:
                ragged.append({**record, "qk_dims": list(qk), "v_dims": list(v)})
    grids = {pair: _Grid(heads, dims, {(c["heads"], c["qk_dim"], c["v_dim"]): c["ms"] for c in attention
                                       if (c["tokens"], c["batch"]) == pair and c["heads"]}) for pair in pairs}
    for cell in ragged:
        cell["as_mean_ms"], cell["as_widest_ms"] = grids[cell["tokens"], cell["batch"]].bounds(
            tuple(cell["qk_dims"]), tuple(cell["v_dims"]))
    parts = []
    for pair in pairs:
        for anchor in anchors[pair]:
            anchor["attention_ms"] = grids[pair].uniform(anchor["heads"], anchor["head_dim"], anchor["head_dim"])
        rest, scale, fitted = _calibrate(anchors[pair], fixed[pair]["ms"], shape.num_layers, pair)
        for anchor in anchors[pair]:
            anchor["fitted_ms"] = fixed[pair]["ms"] + shape.num_layers * (rest + scale * anchor["attention_ms"])
        parts.append({"tokens": pair[0], "batch": pair[1], "fixed_ms": fixed[pair]["ms"], "rest_ms": rest,
                      "attention_scale": scale, "fitted_attention_scale": fitted,
                      "padding_weight": _padding_weight([c for c in ragged if (c["tokens"], c["batch"]) == pair]),
                      "fixed_spread": fixed[pair]["spread"], "anchors": anchors[pair]})
    return {"attention": attention, "parts": parts, "ragged": ragged}


def _calibrate(anchors: list[dict], fixed_ms: float, layers: int,
               pair: tuple[int, int]) -> tuple[float, float, float | None]:
    """(rest, scale) in model = fixed + layers x (rest + scale x attention alone), fitted on the anchors;
    returns rest, the scale clipped to `ATTENTION_SCALE`, and the scale as fitted (None: not fitted).

    An attention layer costs more inside the model than alone (its weights are no longer in cache when it
    runs): `scale` is that factor, and `rest` what a block costs besides its attention. The fit is Siegel's
    repeated median (per anchor the median slope to the others, then their median; the rest a median too),
    so one anchor hit by a burst does not move it. Where the anchors' attention spans less than the whole
    models' own spread (attention is a sliver of a tiny model), or there is one anchor, no slope can be
    told from noise and the scale is 1; a fitted scale outside `ATTENTION_SCALE` is clipped.
    """
    xs = [layers * a["attention_ms"] for a in anchors]
    ys = [a["ms"] - fixed_ms for a in anchors]
    noise = statistics.median(a["spread"] * a["ms"] for a in anchors)
    fitted = None
    if max(xs) - min(xs) > noise:
        fitted = statistics.median(statistics.median((y2 - y1) / (x2 - x1) for x2, y2 in zip(xs, ys) if x2 != x1)
                                   for x1, y1 in zip(xs, ys))
    scale = 1.0 if fitted is None else min(ATTENTION_SCALE[1], max(ATTENTION_SCALE[0], fitted))
    rest = statistics.median(y - scale * x for x, y in zip(xs, ys)) / layers
    if rest <= 0:
        models, alone = (", ".join(f"{value:.1f}" for value in values) for values in ([a["ms"] for a in anchors], xs))
        raise LatencyTableError(
            f"at {pair[0]} tokens, batch {pair[1]}: the whole models ({models} ms) cost less than their attention "
            f"layers ({alone} ms alone); the machine was too noisy: profile again (more rounds, a quieter machine, "
            "one thread with clock='cpu')"
        )
    return rest, scale, fitted


def _cell(stats: dict) -> dict:
    """What the table keeps of a timing: the median, the spread, and whether it was measured again alone."""
    return {"ms": stats["ms"], "spread": stats["spread"], **({"remeasured": True} if "remeasured" in stats else {})}


def _padding_weight(ragged: list[dict]) -> float:
    """Least-squares w in measured = as_mean + w (as_widest - as_mean), clipped to a plausible range; 1
    (padded, as `PrunedAttention` runs them) when no ragged layer was measured."""
    gaps = [(c["ms"] - c["as_mean_ms"], c["as_widest_ms"] - c["as_mean_ms"]) for c in ragged]
    denominator = sum(gap * gap for _, gap in gaps)
    if not denominator:
        return 1.0
    weight = sum(excess * gap for excess, gap in gaps) / denominator
    return min(MAX_PADDING_WEIGHT, max(MIN_PADDING_WEIGHT, weight))


# ---------------------------------------------------------------------------------------------- predicting


@dataclass(frozen=True)
class _Grid:
    """Uniform attention cells of one (tokens, batch): ms by (heads, Q/K dim, V dim)."""

    heads: tuple[int, ...]
    dims: tuple[int, ...]
    cells: Mapping[tuple[int, int, int], float]

    def uniform(self, heads: float, qk: float, v: float) -> float:
        """Trilinear in heads, Q/K dim and V dim."""
        return sum(
            wn * wq * wv * self.cells[n, q, d]
            for n, wn in _bracket(self.heads, heads, "heads")
            for q, wq in _bracket(self.dims, qk, "Q/K head dim")
            for d, wv in _bracket(self.dims, v, "V head dim")
        )

    def bounds(self, qk_dims: tuple[int, ...], v_dims: tuple[int, ...]) -> tuple[float, float]:
        """A ragged layer as its heads at their mean dims, and as every head padded to the widest."""
        heads = len(qk_dims)
        return (self.uniform(heads, sum(qk_dims) / heads, sum(v_dims) / heads),
                self.uniform(heads, max(qk_dims), max(v_dims)))


@dataclass(frozen=True)
class _Table:
    """A table read for prediction: grids and parts by (tokens, batch)."""

    tokens: tuple[int, ...]
    batches: tuple[int, ...]
    grids: Mapping[tuple[int, int], _Grid]
    headless: Mapping[tuple[int, int], float]
    fixed: Mapping[tuple[int, int], float]
    rest: Mapping[tuple[int, int], float]
    attention_scale: Mapping[tuple[int, int], float]
    padding_weight: Mapping[tuple[int, int], float]

    def at(self, values: Callable[[tuple[int, int]], float], tokens: int, batch: int) -> float:
        """Log-log interpolation in tokens and batch of `values(pair)`; every surrounding pair must be profiled."""
        corners = [((t, b), wt * wb) for t, wt in _bracket(self.tokens, tokens, "tokens", log=True)
                   for b, wb in _bracket(self.batches, batch, "batch", log=True)]
        for pair, _ in corners:
            if pair not in self.grids:
                raise LatencyTableError(
                    f"tokens {tokens}, batch {batch} lies between profiled points, but (tokens {pair[0]}, batch "
                    f"{pair[1]}) was not profiled (profiled: {sorted(self.grids)}); profile it where it is affordable"
                )
        if len(corners) == 1:
            return values(corners[0][0])
        return math.exp(sum(weight * math.log(values(pair)) for pair, weight in corners))

    def attention_ms(self, qk_dims: tuple[int, ...], v_dims: tuple[int, ...], tokens: int, batch: int) -> float:
        """One attention layer inside the model: its time alone (uniform, ragged or headless) x the scale."""
        def inside(pair: tuple[int, int]) -> float:
            if not qk_dims:
                alone = self.headless[pair]
            elif len(set(qk_dims)) <= 1 and len(set(v_dims)) <= 1:
                alone = self.grids[pair].uniform(len(qk_dims), qk_dims[0], v_dims[0])
            else:
                mean, widest = self.grids[pair].bounds(qk_dims, v_dims)
                alone = mean + self.padding_weight[pair] * (widest - mean)
            return self.attention_scale[pair] * alone

        return self.at(inside, tokens, batch)

    def model_ms(self, shapes: Sequence[LayerShape], tokens: int, batch: int) -> float:
        fixed = self.at(self.fixed.__getitem__, tokens, batch)
        rest = self.at(self.rest.__getitem__, tokens, batch)
        return fixed + sum(rest + self.attention_ms(s.qk_dims, s.v_dims, tokens, batch) for s in shapes)


def _bracket(grid: Sequence[int], value: float, axis: str, log: bool = False) -> list[tuple[int, float]]:
    """The grid points around `value` and their weights (one point, weight 1, on the grid); outside the
    grid an error names the axis, the value and the grid's range."""
    if not grid[0] <= value <= grid[-1]:
        raise LatencyTableError(
            f"{axis} {value:g} is outside the latency table's range {grid[0]}..{grid[-1]} (grid {list(grid)}); "
            f"profile a table whose {axis} grid covers it"
        )
    upper = bisect.bisect_left(grid, value)
    if grid[upper] == value:
        return [(grid[upper], 1.0)]
    low, high = grid[upper - 1], grid[upper]
    weight = math.log(value / low) / math.log(high / low) if log else (value - low) / (high - low)
    return [(low, 1.0 - weight), (high, weight)]


def _read(table: Mapping, source: str = "the latency table") -> _Table:
    """Validate `table` and index it; errors name `source` and the field."""
    try:
        version = table.get("version")
        if version != TABLE_VERSION:
            raise LatencyTableError(f"{source}: version {version!r}, expected {TABLE_VERSION}; profile it again")
        for key in ("device", "device_name", "torch", "dtype", "threads", "clock", "architecture", "axes", "pairs",
                    "attention", "parts"):
            if key not in table:
                raise LatencyTableError(f"{source}: missing field {key!r}; is this a table written by save_table?")
        axes = table["axes"]
        heads, dims = tuple(axes["heads"]), tuple(axes["dims"])
        tokens, batches = tuple(axes["tokens"]), tuple(axes["batches"])
        for name, values in (("heads", heads), ("dims", dims), ("tokens", tokens), ("batches", batches)):
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise LatencyTableError(f"{source}: axes.{name} {list(values)} must be increasing positive values")
        pairs = [tuple(pair) for pair in table["pairs"]]
        cells: dict[tuple[int, int], dict] = {pair: {} for pair in pairs}
        headless: dict[tuple[int, int], float] = {}
        for cell in table["attention"]:
            pair = (cell["tokens"], cell["batch"])
            if pair not in cells:
                raise LatencyTableError(f"{source}: attention cell at {pair} is not in pairs {pairs}")
            if cell["heads"] == 0:
                headless[pair] = _positive_ms(cell["ms"], source, "headless attention", pair)
            else:
                key = (cell["heads"], cell["qk_dim"], cell["v_dim"])
                cells[pair][key] = _positive_ms(cell["ms"], source, "attention", pair)
        grid_keys = {(n, q, v) for n in heads for q in dims for v in dims}
        for pair in pairs:
            missing = sorted(grid_keys - set(cells[pair]))
            if missing or pair not in headless:
                what = f"(heads, qk_dim, v_dim) {missing[:3]}" if missing else "the headless cell (heads 0)"
                more = " ..." if len(missing) > 3 else ""
                raise LatencyTableError(f"{source}: attention at {pair} lacks {what}{more}")
        parts = {(p["tokens"], p["batch"]): p for p in table["parts"]}
        if set(parts) != set(pairs):
            raise LatencyTableError(f"{source}: parts cover {sorted(parts)}, pairs are {sorted(pairs)}")
        weights = {pair: p["padding_weight"] for pair, p in parts.items()}
        for pair, weight in weights.items():
            if not isinstance(weight, (int, float)) or not MIN_PADDING_WEIGHT <= weight <= MAX_PADDING_WEIGHT:
                raise LatencyTableError(f"{source}: padding_weight at {pair} is {weight!r}, not in "
                                        f"[{MIN_PADDING_WEIGHT}, {MAX_PADDING_WEIGHT}]")
        return _Table(
            tokens, batches, {pair: _Grid(heads, dims, cells[pair]) for pair in pairs}, headless,
            {pair: _positive_ms(p["fixed_ms"], source, "fixed", pair) for pair, p in parts.items()},
            {pair: _positive_ms(p["rest_ms"], source, "rest", pair) for pair, p in parts.items()},
            {pair: _positive_ms(p["attention_scale"], source, "attention_scale", pair) for pair, p in parts.items()},
            weights,
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise LatencyTableError(f"{source}: malformed ({type(error).__name__}: {error}); profile it again") from error


def _positive_ms(value: object, source: str, what: str, pair: tuple) -> float:
    if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise LatencyTableError(f"{source}: {what} at {pair} is {value!r}, not a positive number")
    return float(value)


def check_table(model: nn.Module, table: Mapping) -> None:
    """Refuse `table` for `model` when it was profiled on another device, dtype or architecture (an error),
    and warn when torch's version or thread count differs from the table's."""
    parameter = next(model.parameters())
    device = parameter.device
    here = (device.type, device_name(device))
    profiled = (table["device"], table["device_name"])
    if here != profiled:
        raise LatencyTableError(
            f"the latency table was profiled on {profiled[0]} {profiled[1]!r}, the model runs on {here[0]} "
            f"{here[1]!r}; profile this device: prune-search profile --device {here[0]} --out FILE"
        )
    if _dtype_name(parameter.dtype) != table["dtype"]:
        raise LatencyTableError(f"the latency table was profiled in {table['dtype']}, the model is "
                                f"{_dtype_name(parameter.dtype)}; profile with its dtype")
    architecture, config = table["architecture"], model.config
    if getattr(config, "model_type", None) != architecture["family"]:
        raise LatencyTableError(f"the latency table profiles {architecture['family']} models, this one is "
                                f"{getattr(config, 'model_type', type(model).__name__)!r}")
    for key in ("hidden_size", "intermediate_size", "num_mel_bins"):
        if getattr(config, key, None) != architecture[key]:
            raise LatencyTableError(f"the latency table was profiled at {key} {architecture[key]}, the model has "
                                    f"{getattr(config, key, None)}; profile a table for this architecture")
    if table["torch"] != torch.__version__:
        warnings.warn(f"the latency table was profiled with torch {table['torch']}, this is torch "
                      f"{torch.__version__}: its kernels may be faster or slower", LatencyTableWarning, stacklevel=3)
    if device.type == "cpu" and table["threads"] != torch.get_num_threads():
        warnings.warn(f"the latency table was profiled with {table['threads']} torch threads, torch now uses "
                      f"{torch.get_num_threads()}: predictions are for {table['threads']}", LatencyTableWarning,
                      stacklevel=3)


def predicted_latency(model: nn.Module, table: Mapping, *, tokens: int, batch: int) -> float:
    """Predicted milliseconds of one forward of `model` on `batch` inputs of `tokens` tokens, on the device
    the table was profiled on: the fixed parts, plus per layer the rest of a block and its attention."""
    read = _read(table)
    check_table(model, table)
    return read.model_ms([site.shape for site in attention_sites(model)], tokens, batch)


def layer_latency(table: Mapping, shape: LayerShape, *, tokens: int, batch: int) -> float:
    """Predicted milliseconds of one attention layer of `shape` (headless, uniform or ragged) inside the model."""
    return _read(table).attention_ms(shape.qk_dims, shape.v_dims, tokens, batch)


def predicted_speedup(model: nn.Module, table: Mapping, tokens: int, batch: int) -> float:
    """Predicted dense time over predicted time of `model` (dense shapes from the model's dense record)."""
    read = _read(table)
    check_table(model, table)
    pruned = [site.shape for site in attention_sites(model)]
    dense = [LayerShape.from_dict(layer) for layer in dense_record(model)["dense_layers"]]
    return read.model_ms(dense, tokens, batch) / read.model_ms(pruned, tokens, batch)


def save_table(table: Mapping, path: str | Path) -> Path:
    """Write a table (validated first) as JSON."""
    _read(table, "the table to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def tables_in(path: str | Path) -> list[dict]:
    """The tables `path` names: the file itself, or every `*.json` table in a folder (one per node type)."""
    path = Path(path)
    if not path.is_dir():
        return [load_table(path)]
    tables = [load_table(file) for file in sorted(path.glob("*.json"))]
    if not tables:
        raise LatencyTableError(f"{path}: a folder with no latency table (*.json); write one per node type with "
                                "prune-search profile --out {path}/<name>.json")
    return tables


def table_for(path: str | Path, device: torch.device | str) -> dict:
    """The table for `device` (this machine's, by type and name) from `path`: a file is returned as it is (its
    device is checked when it predicts); from a folder, the table profiled on this device, else an error
    naming the devices the folder covers."""
    tables = tables_in(path)
    if not Path(path).is_dir():
        return tables[0]
    device = torch.device(device)
    here = (device.type, device_name(device))
    found = [table for table in tables if (table["device"], table["device_name"]) == here]
    if not found:
        covered = ", ".join(f"{t['device']} {t['device_name']!r}" for t in tables)
        raise LatencyTableError(f"{path}: no latency table for this node's {here[0]} {here[1]!r} (the folder has "
                                f"{covered}); profile it there with prune-search profile --device {here[0]}")
    return found[0]


def load_table(path: str | Path) -> dict:
    """Read and validate a table `save_table` wrote."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise LatencyTableError(f"{path}: no such latency table; write one with prune-search profile") from error
    except json.JSONDecodeError as error:
        raise LatencyTableError(f"{path}: not JSON ({error})") from error
    if not isinstance(table, dict):
        raise LatencyTableError(f"{path}: a latency table is a JSON object, got {type(table).__name__}")
    _read(table, str(path))
    return table
