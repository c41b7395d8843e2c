"""variable_per_head: heads of a layer keep different channel counts, physically, exactly and reloadably."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prune_core import (
    GRANULARITIES,
    SCORERS,
    attention_params,
    attention_sites,
    load_pruned,
    macs_per_sample,
    plan_pruning,
    prune,
    save_pruned,
)
from prune_core.accounting import dense_record, layer_sparsity
from prune_core.attention import LayerShape, pad_heads, unpad_heads
from prune_core.granularities import LayerPlan
from prune_core.removal import apply_plan, mask_plan
from tests.conftest import ast_batches, tiny_ast
from tests.test_equivalence import assert_equivalent, outputs
from tests.test_selection import scaled_layers


def dims(model):
    return [(site.shape.qk_dims, site.shape.v_dims) for site in attention_sites(model)]


def ragged_model(layers: int = 2):
    """A tiny AST after one variable_per_head step: its layers' heads have different dims."""
    model = tiny_ast(layers=layers)
    prune(model, granularity="variable_per_head", scorer="magnitude", threshold="local", amount=0.4)
    assert any(not site.shape.is_uniform for site in attention_sites(model))
    return model


def test_heads_keep_different_counts_and_the_lowest_channels_go():
    model = tiny_ast()
    scores = SCORERS["magnitude"](model, attention_sites(model), None, None)
    _, plans = plan_pruning(model, granularity="variable_per_head", scorer="magnitude", threshold="local", amount=0.5)
    for score, plan in zip(scores, plans):
        qk_dims, v_dims = plan.kept_dims
        assert len(set(qk_dims)) > 1 and len(set(v_dims)) > 1, "heads should keep different counts"
        for family, rows in (("qk", plan.keep_qk), ("vo", plan.keep_vo)):
            family_scores = getattr(score, family)
            kept = torch.zeros_like(family_scores, dtype=torch.bool)
            for head, row in enumerate(rows):
                kept[head, row] = True
                assert kept[head, family_scores[head].argmax()], "a head always keeps its best channel"
            best = torch.zeros_like(kept)
            best[torch.arange(4), family_scores.argmax(-1)] = True
            # ranked across the heads of the layer: every removed channel scores below every kept one
            assert family_scores[~kept].max() <= family_scores[kept & ~best].min()


def test_global_ranks_channels_across_layers_local_does_not():
    glob = prune(scaled_layers(), granularity="variable_per_head", scorer="magnitude", threshold="global", amount=0.3)
    local = prune(scaled_layers(), granularity="variable_per_head", scorer="magnitude", threshold="local", amount=0.3)
    assert dims(glob)[0] == ((8,) * 4, (8,) * 4), "global pruning should spare the large-weight layer"
    assert sum(dims(glob)[1][0]) < 32
    (first_qk, first_v), (second_qk, second_v) = dims(local)
    assert sum(first_qk) < 32 and sum(second_qk) < 32, "local pruning should cut both layers"
    assert abs(sum(first_qk) - sum(second_qk)) <= 1 and abs(sum(first_v) - sum(second_v)) <= 1


def test_every_head_keeps_one_channel_of_each_family():
    model = tiny_ast()
    for _ in range(12):
        try:
            prune(model, granularity="variable_per_head", scorer="magnitude", threshold="global", amount=0.5)
        except ValueError as error:
            assert "nothing left to prune" in str(error) or "can remove at most" in str(error)
            break
    assert dims(model) == [((1,) * 4, (1,) * 4)] * 2


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_ragged_heads_compute_what_the_masked_model_does(implementation):
    model = tiny_ast(layers=3)
    model.config._attn_implementation = implementation
    assert_equivalent(model, ast_batches(), granularity="variable_per_head", scorer="fisher", threshold="global",
                      amount=0.4)
    assert any(not site.shape.is_uniform for site in attention_sites(model))


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_ragged_layers_prune_again_exactly(scorer):
    """Steps on layers already ragged (scoring padded heads) keep pruned == masked."""
    model, batches = ragged_model(layers=3), ast_batches()
    for granularity in ("variable_per_head", "entire_head"):
        assert_equivalent(model, batches, granularity=granularity, scorer=scorer, threshold="global", amount=0.3)


@pytest.mark.parametrize("scorer", ["magnitude", "magnitude_l2", "fisher", "taylor", "fisher_mask"])
def test_channel_scores_of_ragged_layers_are_those_of_the_masked_model(scorer):
    """Scoring pads narrower heads; a kept channel must score as it does in the dense model with the
    removed channels zeroed (same function, same weights, same gradients)."""
    model, batches = tiny_ast(), ast_batches()
    sites, plans = plan_pruning(model, granularity="variable_per_head", scorer="magnitude", threshold="local",
                                amount=0.4)
    masked = copy.deepcopy(model)
    for site, plan in zip(attention_sites(masked), plans):
        mask_plan(site, plan)
    for site, plan in zip(sites, plans):
        apply_plan(model, site, plan)
    pruned_scores = SCORERS[scorer](model, attention_sites(model), batches, lambda m, b: m(**b).loss)
    masked_scores = SCORERS[scorer](masked, attention_sites(masked), batches, lambda m, b: m(**b).loss)
    for plan, pruned, reference in zip(plans, pruned_scores, masked_scores):
        for family, rows in (("qk", plan.keep_qk), ("vo", plan.keep_vo)):
            for head, row in enumerate(rows):
                expected = getattr(reference, family)[head, row]
                torch.testing.assert_close(getattr(pruned, family)[head, : len(row)], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("granularity", sorted(name for name, g in GRANULARITIES.items() if not g.ragged_heads))
def test_uniform_granularities_refuse_ragged_layers_by_name(granularity):
    with pytest.raises(ValueError, match=rf"granularity '{granularity}' needs .* audio_spectrogram_transformer"):
        prune(ragged_model(), granularity=granularity, scorer="magnitude", threshold="global", amount=0.2)


def hand_ragged():
    """Tiny AST (hidden 32, 4 heads of 8) with layer 0 cut to Q/K dims (8, 5, 3, 1) and V dims (2, 8, 4, 6)."""
    model = tiny_ast(hidden=32, heads=4, layers=2)
    dense_record(model)  # what prune does first: remember the dense shapes
    plan = LayerPlan(
        torch.arange(4),
        tuple(torch.arange(n) for n in (8, 5, 3, 1)),
        tuple(torch.arange(n) for n in (2, 8, 4, 6)),
    )
    apply_plan(model, attention_sites(model)[0], plan)
    return model


def test_params_macs_and_layer_sparsity_of_a_ragged_layer_in_closed_form():
    model = hand_ragged()
    assert dims(model)[0] == ((8, 5, 3, 1), (2, 8, 4, 6))
    d, inner, qk, v = 32, 64, 17, 20
    dense_layer = 4 * (d * d + d)
    ragged_layer = 2 * qk * (d + 1) + v * (d + 1) + v * d + d  # Q, K rows; V rows; O columns; O bias
    assert attention_params(model) == dense_layer + ragged_layer
    assert layer_sparsity(model) == [pytest.approx(1 - ragged_layer / dense_layer), 0.0]
    config = model.config
    f, t = (config.num_mel_bins - 16) // 10 + 1, (config.max_length - 16) // 10 + 1
    tokens = f * t + 2
    conv = f * t * d * 16 * 16
    mlp = 2 * tokens * d * inner
    dense_macs = 4 * tokens * d * d + tokens * tokens * d * 2 + mlp
    ragged_macs = tokens * d * (2 * qk + 2 * v) + tokens * tokens * (qk + v) + mlp
    assert macs_per_sample(model) == conv + dense_macs + ragged_macs + d * 5


def test_pad_heads_round_trip():
    x = torch.randn(2, 3, 17)
    padded = pad_heads(x, (8, 5, 3, 1))
    assert padded.shape == (2, 3, 4, 8)
    assert torch.equal(padded[..., 1, :5], x[..., 8:13]) and torch.all(padded[..., 1, 5:] == 0)
    assert torch.equal(unpad_heads(padded, (8, 5, 3, 1)), x)


def test_round_trip_keeps_per_head_dims_and_uniform_layers_in_the_old_form(tmp_path):
    model, batches = hand_ragged(), ast_batches()
    save_pruned(model, tmp_path)
    layers = json.loads((tmp_path / "pruning.json").read_text())["layers"]
    assert layers[0]["qk_dims"] == [8, 5, 3, 1] and layers[0]["v_dims"] == [2, 8, 4, 6]
    assert set(layers[1]) == {"path", "num_heads", "qk_head_dim", "v_head_dim", "hidden_size"}
    loaded = load_pruned(tmp_path)
    assert dims(loaded) == dims(model)
    assert torch.equal(outputs(loaded, batches[0]), outputs(model, batches[0]))


def test_layer_shape_reads_both_forms_and_names_bad_values():
    uniform = {"num_heads": 4, "qk_head_dim": 8, "v_head_dim": 6, "hidden_size": 32}
    assert LayerShape.from_dict(uniform) == LayerShape((8,) * 4, (6,) * 4, 32)
    assert LayerShape.from_dict(uniform).to_dict() == uniform
    ragged = LayerShape((8, 5), (2, 8), 32)
    assert LayerShape.from_dict(ragged.to_dict()) == ragged
    with pytest.raises(ValueError, match=r"different Q/K dims \(8, 5\)"):
        ragged.qk_head_dim
    with pytest.raises(ValueError, match=r"num_heads 3 but 2 per-head dims"):
        LayerShape.from_dict({**ragged.to_dict(), "num_heads": 3})
    with pytest.raises(ValueError, match=r"\(8, 0\)"):
        LayerShape((8, 0), (2, 8), 32)


@pytest.mark.parametrize("granularity", ["variable_per_head", "hybrid"])
def test_session_steps_finetune_save_and_resume(tmp_path, granularity):
    """The iterative loop on the new granularities: LoRA wraps and merges ragged layers, a checkpoint resumes."""
    from prune_core.finetune import LoraSettings
    from prune_core.session import PruningSession, SessionConfig, Strategy

    data = ast_batches(count=3)
    config = SessionConfig(strategy=Strategy(granularity, "fisher", "global"), step_ratio=0.2, steps=3,
                           lora=LoraSettings(rank=2, lr=1e-3, epochs=1), calib_batches=2)
    run = PruningSession(tiny_ast(), config, train=data, evaluation=data[:1])
    first = next(run)
    assert first.attention_sparsity == pytest.approx(0.2, abs=0.05)
    assert not any("lora" in name for name in run.model.state_dict()), "LoRA must be merged after each step"
    run.save(tmp_path)
    resumed = PruningSession.resume(tmp_path, train=data, evaluation=data[:1])
    assert dims(resumed.model) == dims(run.model)
    assert torch.equal(outputs(resumed.model, data[0]), outputs(run.model, data[0]))
    assert [r.step for r in resumed] == [2, 3]
    if granularity == "variable_per_head":
        assert any(not site.shape.is_uniform for site in attention_sites(resumed.model))


def test_a_bad_per_head_shape_in_pruning_json_names_the_file_and_layer(tmp_path):
    save_pruned(hand_ragged(), tmp_path)
    description = json.loads((tmp_path / "pruning.json").read_text())
    description["layers"][0]["v_dims"] = [2, 8, 4]
    (tmp_path / "pruning.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match=r"pruning.json: layer '.*layers\.0\.attention' has no valid shape"):
        load_pruned(tmp_path)
