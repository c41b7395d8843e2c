"""Whole attention blocks removable (`min_heads=0`): a headless layer computes what the stock model computes with
all that layer's heads zeroed, costs only O's bias, saves, loads, and runs in a session.

References come from outside prune_core: the stock transformers model (its own attention modules), with the
weights of the heads to remove zeroed by hand, and parameter and MAC counts written out as formulas.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prune_core import (
    SCORERS,
    attention_params,
    attention_sparsity,
    load_pruned,
    macs_per_sample,
    plan_pruning,
    prune,
    save_pruned,
    total_params,
)
from prune_core.accounting import layer_sparsity
from prune_core.finetune import LoraSettings
from prune_core.session import PruningSession, SessionConfig, Strategy
from tests.conftest import ast_batches, attention_layers, tiny_ast, tiny_bert, tiny_vit, vit_batches
from tests.test_equivalence import assert_equivalent, assert_stock, outputs, padded_bert_batches, sharp

TOLERANCE = 1e-5
HIDDEN, HEADS, HEAD_DIM = 32, 4, 8  # every tiny model of conftest
DENSE_LAYER = 4 * (HIDDEN * HIDDEN + HIDDEN)  # Q, K, V, O weights and biases
# entire_head, global: the 4 weakened heads of one layer are 4192 of the two layers' 8448 attention parameters;
# 0.5 asks for 4224, within half a head (524) of them, so exactly those heads go
ONE_LAYER_AMOUNT = 0.5


def liven(model, seed: int = 5):
    """Give every all-zero parameter random values: the biases (a headless layer's O bias must not be zeros that
    look like no output) and AST's class tokens and position embeddings (at zero, AST's class-token queries are
    zero in the first layer, so its logits would not see that layer's softmax scale at all)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def weaken(model, layer: int, factor: float = 0.01):
    """Scale layer `layer`'s Q/K/V rows and O columns by `factor`, so that magnitude ranks its heads last."""
    found = attention_layers(model)[layer]
    with torch.no_grad():
        for role in ("q", "k", "v", "o"):
            found[role].weight.mul_(factor)
    return model


def zero_heads(stock, layer: int):
    """A copy of the stock model with every head of `layer` masked: Q/K/V rows with biases and O columns zeroed."""
    reference = copy.deepcopy(stock)
    found = attention_layers(reference)[layer]
    with torch.no_grad():
        for role in ("q", "k", "v"):
            found[role].weight.zero_()
            found[role].bias.zero_()
        found["o"].weight.zero_()
    return reference


def headless_ast():
    """A tiny AST whose layer 1 lost all its heads (entire_head + min_heads=0), and the stock model it came from."""
    stock = weaken(liven(tiny_ast()), 1)
    model = copy.deepcopy(stock)
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=ONE_LAYER_AMOUNT,
          min_heads=0)
    return model, stock


FAMILIES = {
    "ast-sdpa": (lambda: liven(sharp(tiny_ast, "sdpa")), ast_batches),
    "ast-eager": (lambda: liven(sharp(tiny_ast, "eager")), ast_batches),
    "vit-sdpa": (lambda: liven(sharp(tiny_vit, "sdpa")), vit_batches),
    "bert-eager": (lambda: liven(sharp(tiny_bert, "eager")), padded_bert_batches),  # O in a sibling; padding
}


@pytest.mark.parametrize("headless", [0, 1])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_headless_layer_computes_the_stock_model_with_its_heads_zeroed(family, headless):
    build, batches = FAMILIES[family]
    stock = weaken(build(), headless)
    model = copy.deepcopy(stock)
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=ONE_LAYER_AMOUNT,
          min_heads=0)
    layers, before, live = attention_layers(model), attention_layers(stock), 1 - headless
    assert [layers[headless][role].weight.shape[0] for role in ("q", "k", "v")] == [0, 0, 0]
    assert layers[headless]["o"].weight.shape == (HIDDEN, 0)
    assert all(torch.equal(layers[live][role].weight, before[live][role].weight) for role in ("q", "k", "v", "o"))
    reference = zero_heads(stock, headless)
    assert_stock(reference)
    for batch in batches():
        difference = (outputs(model, batch) - outputs(reference, batch)).abs().max().item()
        assert difference <= TOLERANCE, f"{family}: max abs difference {difference:.2e}"


@pytest.mark.parametrize("family", ["ast-sdpa", "vit-sdpa"])
def test_a_headless_attention_module_returns_o_bias_and_runs_no_projection(family):
    build, _ = FAMILIES[family]
    model = weaken(build(), 0)
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=ONE_LAYER_AMOUNT,
          min_heads=0)
    layer = attention_layers(model)[0]
    hidden = torch.randn(3, 7, HIDDEN)
    called = []
    handles = [layer[role].register_forward_hook(lambda *_, role=role: called.append(role))
               for role in ("q", "k", "v", "o")]
    try:
        with torch.no_grad():
            output, weights = layer["module"](hidden)
            batch = FAMILIES[family][1]()[0]
            outputs(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(output, layer["o"].bias.expand(3, 7, HIDDEN)) and weights is None
    assert called == [], f"a headless layer ran {called}"


def test_default_min_heads_never_empties_a_layer():
    """Even with one layer far weaker than the other, and at the most either granularity can remove."""
    for granularity, amount in (("entire_head", 0.74), ("hybrid", 0.95)):
        model = weaken(liven(tiny_ast()), 1)
        prune(model, granularity=granularity, scorer="magnitude", threshold="global", amount=amount)
        assert min(layer["q"].weight.shape[0] for layer in attention_layers(model)) >= 1, granularity
        assert min(layer["v"].weight.shape[0] for layer in attention_layers(model)) >= 1, granularity
    # 0.85 is more than 6 of the 8 heads: refused while each layer keeps a head, taken when it need not
    strategy = {"granularity": "entire_head", "scorer": "magnitude", "threshold": "global", "amount": 0.85}
    with pytest.raises(ValueError, match="can remove at most .* while keeping one head and one channel per head"):
        prune(weaken(liven(tiny_ast()), 1), **strategy)
    model = prune(weaken(liven(tiny_ast()), 1), **strategy, min_heads=0)
    assert attention_layers(model)[1]["q"].weight.shape[0] == 0


@pytest.mark.parametrize("granularity", ["entire_head", "hybrid"])
def test_min_heads_zero_lets_the_last_head_go(granularity):
    model = weaken(liven(tiny_ast()), 1)
    prune(model, granularity=granularity, scorer="magnitude", threshold="global", amount=0.6, min_heads=0)
    assert [len(layer["qk_dims"]) for layer in attention_layers(model)][1] == 0
    assert attention_layers(model)[1]["q"].weight.shape[0] == 0


def test_min_heads_zero_empties_every_layer_at_the_limit():
    model = tiny_ast()
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=0.99, min_heads=0)
    assert [len(layer["qk_dims"]) for layer in attention_layers(model)] == [0, 0]
    assert attention_params(model) == 2 * HIDDEN
    with pytest.raises(ValueError, match="every attention layer of the model is headless"):
        prune(model, granularity="per_head", scorer="magnitude", threshold="global", amount=0.1)


def test_hybrid_with_min_heads_zero_matches_the_masked_stock_model():
    """Surviving rows found by equality against the stock weights: one layer headless, the other shrunk."""
    model, batches = weaken(liven(sharp(tiny_ast, "sdpa")), 1), ast_batches()
    stock = copy.deepcopy(model)
    assert_equivalent(model, batches, original=stock, granularity="hybrid", scorer="magnitude", threshold="global",
                      amount=0.6, min_heads=0)
    layers = attention_layers(model)
    kept = layers[0]["q"].weight.shape[0] + layers[0]["v"].weight.shape[0]
    assert len(layers[1]["qk_dims"]) == 0 and 0 < kept < 2 * HEADS * HEAD_DIM


@pytest.mark.parametrize("scorer", SCORERS)
def test_every_scorer_prunes_a_model_with_a_headless_layer(scorer):
    """Headless layers are left out of scoring: the live layer prunes exactly, the headless one stays as it is."""
    model, batches = weaken(liven(sharp(tiny_ast, "sdpa")), 1), ast_batches()
    stock = copy.deepcopy(model)
    prune(model, granularity="entire_head", scorer="magnitude", threshold="global", amount=ONE_LAYER_AMOUNT,
          min_heads=0)
    assert_equivalent(model, batches, original=stock, granularity="per_head", scorer=scorer, threshold="global",
                      amount=0.3, min_heads=0)
    assert [len(layer["qk_dims"]) for layer in attention_layers(model)] == [4, 0]


@pytest.mark.parametrize("granularity", ["per_head", "same_channel", "variable_per_head"])
def test_min_heads_changes_nothing_for_channel_granularities(granularity):
    plans = {}
    for min_heads in (0, 1):
        model = weaken(liven(tiny_ast()), 1)
        _, plans[min_heads] = plan_pruning(model, granularity=granularity, scorer="magnitude", threshold="global",
                                           amount=0.8, min_heads=min_heads)
    for zero, one in zip(plans[0], plans[1]):
        assert torch.equal(zero.keep_heads, one.keep_heads) and len(zero.keep_heads) == HEADS
        assert all(torch.equal(a, b) for a, b in zip(zero.keep_qk, one.keep_qk))
        assert all(torch.equal(a, b) for a, b in zip(zero.keep_vo, one.keep_vo))
        assert min(len(row) for row in zero.keep_qk) >= 1 and min(len(row) for row in zero.keep_vo) >= 1


@pytest.mark.parametrize("bad", [2, -1, True, 0.0, "0", None])
def test_min_heads_other_than_0_or_1_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="min_heads must be 0 .* or 1"):
        prune(tiny_ast(), granularity="entire_head", scorer="magnitude", threshold="global", amount=0.3, min_heads=bad)
    with pytest.raises(ValueError, match="min_heads must be 0 .* or 1"):
        Strategy(granularity="entire_head", scorer="magnitude", threshold="global", min_heads=bad)


def test_a_headless_layer_counts_its_o_bias_only():
    model, stock = headless_ast()
    assert attention_params(model) == DENSE_LAYER + HIDDEN
    assert attention_sparsity(model) == pytest.approx(1 - (DENSE_LAYER + HIDDEN) / (2 * DENSE_LAYER))
    assert layer_sparsity(model) == [0.0, pytest.approx(1 - HIDDEN / DENSE_LAYER)]
    stock_params = sum(param.numel() for param in stock.parameters())
    assert total_params(model) == stock_params - (DENSE_LAYER - HIDDEN)
    config = model.config
    f, t = (config.num_mel_bins - 16) // 10 + 1, (config.max_length - 16) // 10 + 1
    tokens, inner = f * t + 2, 2 * HIDDEN
    conv = f * t * HIDDEN * 16 * 16
    mlp = 2 * tokens * HIDDEN * inner
    dense_layer = 4 * tokens * HIDDEN * HIDDEN + 2 * tokens * tokens * HIDDEN + mlp
    assert macs_per_sample(model) == conv + dense_layer + mlp + HIDDEN * 5  # the headless layer: its MLP only


def test_save_and_load_a_headless_layer(tmp_path):
    model, _ = headless_ast()
    batches = ast_batches()
    save_pruned(model, tmp_path)
    layers = json.loads((tmp_path / "pruning.json").read_text())["layers"]
    assert layers[1] == {"path": "audio_spectrogram_transformer.layers.1.attention", "num_heads": 0, "qk_dims": [],
                         "v_dims": [], "hidden_size": HIDDEN}
    assert set(layers[0]) == {"path", "num_heads", "qk_head_dim", "v_head_dim", "hidden_size"}
    loaded = load_pruned(tmp_path)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert attention_layers(loaded)[1]["q"].weight.shape == (0, HIDDEN)
    for batch in batches:
        assert torch.equal(outputs(loaded, batch), outputs(model, batch))
    assert attention_sparsity(loaded) == attention_sparsity(model)


def test_a_session_with_min_heads_zero_steps_and_resumes(tmp_path, monkeypatch):
    import prune_core.session

    data = ast_batches(count=3)
    strategy = Strategy(granularity="entire_head", scorer="magnitude", threshold="global", min_heads=0)
    config = SessionConfig(strategy=strategy, step_ratio=0.45, steps=2, schedule="linear",
                           lora=LoraSettings(rank=2, lr=1e-3, epochs=1), calib_batches=2)
    run = PruningSession(weaken(liven(tiny_ast()), 1), config, train=data, evaluation=data[:1])
    first = next(run)  # 0.45 of 8448 parameters: the weak layer's 4 heads (4192) are within half a head of it
    assert [len(layer["v_dims"]) for layer in attention_layers(run.model)] == [4, 0]
    assert first.layers[1]["num_heads"] == 0 and first.params < total_params(tiny_ast())
    run.save(tmp_path)
    assert json.loads((tmp_path / "session.json").read_text())["config"]["strategy"]["min_heads"] == 0

    seen = {}
    real_prune = prune_core.session.prune

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real_prune(model, **kwargs)

    monkeypatch.setattr(prune_core.session, "prune", spy)
    resumed = PruningSession.resume(tmp_path, train=data, evaluation=data[:1])
    assert resumed.config.strategy.min_heads == 0 and resumed.step == 1
    second = next(resumed)
    assert seen["min_heads"] == 0
    assert second.attention_sparsity > first.attention_sparsity
    assert [len(layer["v_dims"]) for layer in attention_layers(resumed.model)][1] == 0
    assert [record["strategy"] for record in resumed.history] == ["entire_head/magnitude/global/min_heads=0"] * 2
    assert Strategy(granularity="entire_head", scorer="magnitude", threshold="global").name == \
        "entire_head/magnitude/global"


def test_depth_vs_width_quick_mode_runs_and_reprints(tmp_path, monkeypatch, capsys):
    """The benchmark's --quick path end to end on a tiny AST in place of AST-base: the three variants keep the same
    attention parameters, blocks leaves k layers headless, and --from-json prints the same table."""
    from benchmarks import depth_vs_width

    tiny = {"num_labels": 5, "hidden_size": HIDDEN, "num_layers": 4, "num_heads": HEADS, "intermediate_size": 64,
            "num_mel_bins": 32, "max_length": 40}
    monkeypatch.setitem(depth_vs_width.SIZES, "base-sc", tiny)
    out = tmp_path / "quick.json"
    threads = torch.get_num_threads()
    try:
        assert depth_vs_width.main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick runs on one thread; the tests after this one keep theirs
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    points = {p["model"]: p for p in results["points"]}
    assert set(points) == {"dense", "blocks-3", "heads-3", "channels-3"}
    assert points["blocks-3"]["headless_layers"] == [1, 2, 3]
    assert points["heads-3"]["headless_layers"] == [] and points["channels-3"]["headless_layers"] == []
    kept = {points[name]["attention_params"] for name in ("blocks-3", "heads-3", "channels-3")}
    assert kept == {DENSE_LAYER + 3 * HIDDEN}
    assert all(p["rounds"] == 2 and len(p["timing"]["samples"]) == 2 for p in points.values())
    assert results["environment"]["torch_threads"] == 1
    assert depth_vs_width.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out == table
    assert "| 8 | 1 | 3 of 4 | 74.4% |" in table  # tokens of the tiny AST, batch, headless layers, sparsity
