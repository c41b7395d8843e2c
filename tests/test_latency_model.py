"""The latency model: interpolation in a hand-made table (expected values computed by hand), refusals, the
`profile` command end to end, and the benchmark's smoke run."""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch

from benchmarks import latency_model as bench
from prune_core import prune
from prune_core.attention import LayerShape
from prune_core.latency_model import (LatencyTableError, LatencyTableWarning, _calibrate, device_name, layer_latency,
                                      load_table, predicted_latency, predicted_speedup, save_table)
from search.cli import main
from tests.conftest import attention_layers, tiny_ast, tiny_vit

HEADS, DIMS = (1, 2, 4), (1, 4, 8)
SCALE = {(8, 1): 1.0, (8, 4): 4.0, (32, 1): 16.0, (32, 4): 64.0}  # every cell of a (tokens, batch) is scaled by this


def cost(heads: int, qk: int, v: int) -> float:
    """The hand table's attention cell at scale 1: nonlinear in heads and Q/K dim, so a wrong bracket shows."""
    return heads * heads + qk * qk + v


def hand_table(padding_weight: float = 1.0, attention_scale: float = 1.0) -> dict:
    """A table for the tests' tiny AST (hidden 32, 4 heads of 8, MLP 64, 32 mel bins) on this machine:
    attention alone cost(heads, qk, v), headless 0.5, fixed 10 and rest 3 at scale 1, times SCALE."""
    attention = [{"tokens": t, "batch": b, "heads": n, "qk_dim": q, "v_dim": v, "ms": scale * cost(n, q, v)}
                 for (t, b), scale in SCALE.items() for n in HEADS for q in DIMS for v in DIMS]
    attention += [{"tokens": t, "batch": b, "heads": 0, "qk_dim": 0, "v_dim": 0, "ms": 0.5 * scale}
                  for (t, b), scale in SCALE.items()]
    return {
        "version": 1, "device": "cpu", "device_name": device_name("cpu"), "torch": torch.__version__,
        "dtype": "float32", "threads": torch.get_num_threads(), "clock": "wall",
        "architecture": {"family": "audio-spectrogram-transformer", "hidden_size": 32, "num_heads": 4, "num_layers": 2,
                         "intermediate_size": 64, "num_mel_bins": 32, "num_labels": 5},
        "axes": {"heads": list(HEADS), "dims": list(DIMS), "tokens": [8, 32], "batches": [1, 4]},
        "pairs": [list(pair) for pair in SCALE], "left_out": [],
        "attention": attention,
        "parts": [{"tokens": t, "batch": b, "fixed_ms": 10 * s, "rest_ms": 3 * s, "attention_scale": attention_scale,
                   "padding_weight": padding_weight} for (t, b), s in SCALE.items()],
    }


def layer(qk, v) -> LayerShape:
    return LayerShape(tuple(qk), tuple(v), 32)


# ---------------------------------------------------------------------------------------------- interpolation


def test_a_grid_cell_is_returned_as_profiled():
    assert layer_latency(hand_table(), layer([8] * 4, [8] * 4), tokens=8, batch=1) == 16 + 64 + 8
    assert layer_latency(hand_table(), layer([1] * 2, [4] * 2), tokens=32, batch=4) == 64 * (4 + 1 + 4)


def test_heads_and_dims_interpolate_linearly_between_the_surrounding_cells():
    # 3 heads: halfway between 2 and 4; Q/K dim 6: halfway between 4 and 8; V dim 8 on the grid.
    # cost(2,4,8) = 28, cost(2,8,8) = 76, cost(4,4,8) = 40, cost(4,8,8) = 88 -> mean 58 (cost(3,6,8) itself is 53)
    assert layer_latency(hand_table(), layer([6] * 3, [8] * 3), tokens=8, batch=1) == pytest.approx(58.0)
    # V dim 2: a third of the way from 1 to 4 -> 4 + 1 + 2 at 2 heads, Q/K dim 1
    assert layer_latency(hand_table(), layer([1] * 2, [2] * 2), tokens=8, batch=1) == pytest.approx(7.0)


def test_tokens_and_batch_interpolate_log_log():
    # 16 tokens is the geometric middle of 8 and 32: sqrt(1 x 16) = 4; batch 2 that of 1 and 4: sqrt(1 x 4) = 2;
    # both: (1 x 4 x 16 x 64) ** (1/4) = 8
    dense = layer([8] * 4, [8] * 4)
    assert layer_latency(hand_table(), dense, tokens=16, batch=1) == pytest.approx(4 * 88)
    assert layer_latency(hand_table(), dense, tokens=8, batch=2) == pytest.approx(2 * 88)
    assert layer_latency(hand_table(), dense, tokens=16, batch=2) == pytest.approx(8 * 88)


def test_a_headless_layer_costs_its_cell():
    assert layer_latency(hand_table(), layer([], []), tokens=8, batch=1) == 0.5
    assert layer_latency(hand_table(), layer([], []), tokens=32, batch=1) == 8.0


@pytest.mark.parametrize("weight, expected", [(1.0, 76.0), (0.0, 50.0), (0.25, 56.5)])
def test_ragged_heads_cost_what_the_padding_weight_says(weight, expected):
    # 2 heads of Q/K and V dims (4, 8): at their mean dims 6, cost = 4 + (16 + 64) / 2 + 6 = 50;
    # padded to the widest 8, cost(2, 8, 8) = 76; weight w gives 50 + w (76 - 50)
    ragged = layer([4, 8], [4, 8])
    assert layer_latency(hand_table(weight), ragged, tokens=8, batch=1) == pytest.approx(expected)


def test_a_whole_model_is_fixed_plus_each_layers_rest_and_attention():
    # tiny AST: 2 layers of 4 heads x 8 -> 10 + 2 x (3 + 88) = 192 at scale 1
    model = tiny_ast()
    assert predicted_latency(model, hand_table(), tokens=8, batch=1) == pytest.approx(192.0)
    assert predicted_latency(model, hand_table(), tokens=16, batch=2) == pytest.approx(8 * 192.0)


def test_attention_inside_the_model_is_its_time_alone_times_the_scale():
    # 10 + 2 x (3 + 1.5 x 88) = 280; headless: 1.5 x 0.5
    assert predicted_latency(tiny_ast(), hand_table(attention_scale=1.5), tokens=8, batch=1) == pytest.approx(280.0)
    assert layer_latency(hand_table(attention_scale=1.5), layer([], []), tokens=8, batch=1) == pytest.approx(0.75)


def test_the_anchor_fit_recovers_rest_and_scale_and_keeps_the_scale_physical():
    # whole models = fixed 5 + 12 x (rest 20 + scale 1.5 x attention alone) for attention alone 8, 6, 4, 2 ms
    anchors = [{"attention_ms": a, "ms": 5 + 12 * (20 + 1.5 * a), "spread": 0.02} for a in (8.0, 6.0, 4.0, 2.0)]
    rest, scale, fitted = _calibrate(anchors, 5.0, 12, (146, 1))
    assert (rest, scale, fitted) == pytest.approx((20.0, 1.5, 1.5))
    # one anchor of four 30% off (a burst): the repeated median still finds the line of the other three
    anchors[0]["ms"] *= 1.3
    assert _calibrate(anchors, 5.0, 12, (146, 1)) == pytest.approx((20.0, 1.5, 1.5))
    # a model that does not grow with its attention (noise): scale 1, rest the median of what is left
    flat = [{"attention_ms": a, "ms": 5 + 12 * 30, "spread": 0.02} for a in (8.0, 4.0, 2.0)]
    rest, scale, fitted = _calibrate(flat, 5.0, 12, (146, 1))
    assert (scale, fitted) == (1.0, pytest.approx(0.0))
    assert rest == pytest.approx(30 - 4)
    # the anchors' attention spans 12 x (8 - 2) = 72 ms, less than their spread (half of ~335 ms): no slope
    noisy = [{**a, "spread": 0.5} for a in anchors]
    assert _calibrate(noisy, 5.0, 12, (146, 1))[1:] == (1.0, None)


def test_a_pruned_model_is_predicted_faster_and_the_dense_speedup_is_one():
    dense = tiny_ast()
    pruned = prune(copy.deepcopy(dense), granularity="entire_head", scorer="magnitude", threshold="global", amount=0.5)
    heads = [len(layer["qk_dims"]) for layer in attention_layers(pruned)]
    assert sum(heads) < 8
    # every layer keeps 8-dim heads, so each costs 3 + cost(heads, 8, 8), interpolated between head grid points
    by_heads = {1: 1 + 72, 2: 4 + 72, 3: (4 + 16) / 2 + 72, 4: 16 + 72}
    expected = 10 + sum(3 + by_heads[n] for n in heads)
    assert predicted_latency(pruned, hand_table(), tokens=8, batch=1) == pytest.approx(expected)
    assert expected < 192.0
    assert predicted_speedup(dense, hand_table(), 8, 1) == 1.0
    assert predicted_speedup(pruned, hand_table(), 8, 1) == pytest.approx(192.0 / expected)


def test_a_variable_per_head_model_costs_its_ragged_layers_by_the_weight():
    model = prune(tiny_ast(), granularity="variable_per_head", scorer="magnitude", threshold="local", amount=0.4)
    layers = attention_layers(model)
    assert any(len(set(layer["qk_dims"])) > 1 for layer in layers)

    def by_hand(weight: float) -> float:  # 4 heads (on the grid): cost is linear in V, piecewise linear in Q/K
        def at(qk: float, v: float) -> float:
            low, high = max(d for d in DIMS if d <= qk), min(d for d in DIMS if d >= qk)
            share = 0.0 if low == high else (qk - low) / (high - low)
            return 16 + (1 - share) * low * low + share * high * high + v

        total = 10.0
        for layer in layers:
            qk, v = layer["qk_dims"], layer["v_dims"]
            mean, widest = at(sum(qk) / 4, sum(v) / 4), at(max(qk), max(v))
            total += 3 + mean + weight * (widest - mean)
        return total

    for weight in (0.0, 1.0):
        assert predicted_latency(model, hand_table(weight), tokens=8, batch=1) == pytest.approx(by_hand(weight))


# ---------------------------------------------------------------------------------------------- refusals


def test_a_table_from_another_device_is_refused():
    table = hand_table()
    table["device_name"] = "Some Other CPU 9000"
    here = re.escape(f"the model runs on cpu {device_name('cpu')!r}")
    with pytest.raises(LatencyTableError, match=f"profiled on cpu 'Some Other CPU 9000', {here}"):
        predicted_latency(tiny_ast(), table, tokens=8, batch=1)
    table = {**hand_table(), "device": "cuda", "device_name": "NVIDIA H200"}
    with pytest.raises(LatencyTableError, match="profiled on cuda 'NVIDIA H200', the model runs on cpu"):
        predicted_speedup(tiny_ast(), table, 8, 1)


def test_a_folder_of_tables_serves_each_node_type_its_own(tmp_path):
    """`latency_table: DIR`, one table per node type: a trial gets its own device's table, by type and name."""
    from prune_core.latency_model import table_for

    here = hand_table()
    gpu = {**hand_table(attention_scale=2.0), "device": "cuda", "device_name": "NVIDIA H200"}
    other_cpu = {**hand_table(attention_scale=3.0), "device_name": "Some Other CPU 9000"}
    for name, table in (("a-gpu", gpu), ("b-here", here), ("c-other", other_cpu)):
        save_table(table, tmp_path / "tables" / f"{name}.json")
    chosen = table_for(tmp_path / "tables", "cpu")
    assert chosen == load_table(tmp_path / "tables" / "b-here.json")
    assert predicted_latency(tiny_ast(), chosen, tokens=8, batch=1) > 0
    (tmp_path / "tables" / "b-here.json").unlink()
    with pytest.raises(LatencyTableError, match=r"no latency table for this node's cpu .*the folder has cuda "
                                                r"'NVIDIA H200', cpu 'Some Other CPU 9000'"):
        table_for(tmp_path / "tables", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatencyTableError, match="a folder with no latency table"):
        table_for(tmp_path / "empty", "cpu")
    assert table_for(tmp_path / "tables" / "a-gpu.json", "cpu")["device"] == "cuda", "a file is taken as it is"


def test_another_torch_version_warns_and_still_predicts():
    table = {**hand_table(), "torch": "1.13.0"}
    with pytest.warns(LatencyTableWarning, match=re.escape(f"torch 1.13.0, this is torch {torch.__version__}")):
        assert predicted_latency(tiny_ast(), table, tokens=8, batch=1) == pytest.approx(192.0)


def test_another_dtype_is_refused():
    with pytest.raises(LatencyTableError, match="profiled in float32, the model is float64"):
        predicted_latency(tiny_ast().double(), hand_table(), tokens=8, batch=1)


def test_another_hidden_size_is_refused():
    with pytest.raises(LatencyTableError, match="hidden_size 32, the model has 48"):
        predicted_latency(tiny_ast(hidden=48), hand_table(), tokens=8, batch=1)


@pytest.mark.parametrize("tokens, batch, message", [
    (64, 1, r"tokens 64 is outside the latency table's range 8\.\.32"),
    (4, 1, r"tokens 4 is outside the latency table's range 8\.\.32"),
    (8, 16, r"batch 16 is outside the latency table's range 1\.\.4"),
])
def test_tokens_or_batch_outside_the_table_are_refused(tokens, batch, message):
    with pytest.raises(LatencyTableError, match=message):
        predicted_latency(tiny_ast(), hand_table(), tokens=tokens, batch=batch)


def test_a_pair_that_was_not_profiled_is_refused_not_extrapolated():
    table = hand_table()  # like a CPU table: (32 tokens, batch 4) left out
    table["pairs"].remove([32, 4])
    table["attention"] = [c for c in table["attention"] if (c["tokens"], c["batch"]) != (32, 4)]
    table["parts"] = [p for p in table["parts"] if (p["tokens"], p["batch"]) != (32, 4)]
    model = tiny_ast()
    assert predicted_latency(model, table, tokens=16, batch=1) == pytest.approx(4 * 192.0)  # on an edge: fine
    with pytest.raises(LatencyTableError, match=r"\(tokens 32, batch 4\) was not profiled"):
        predicted_latency(model, table, tokens=16, batch=2)


def test_heads_beyond_the_grid_are_refused():
    with pytest.raises(LatencyTableError, match=r"heads 8 is outside the latency table's range 1\.\.4"):
        predicted_latency(tiny_ast(heads=8), hand_table(), tokens=8, batch=1)


def test_save_and_load_round_trip_and_bad_files_are_named(tmp_path):
    path = save_table(hand_table(0.25), tmp_path / "table.json")
    assert load_table(path) == hand_table(0.25)
    stale = {**hand_table(), "version": 0}
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(LatencyTableError, match=r"stale\.json: version 0, expected 1"):
        load_table(tmp_path / "stale.json")
    holes = hand_table()
    holes["attention"] = [c for c in holes["attention"] if (c["heads"], c["qk_dim"]) != (2, 4)]
    with pytest.raises(LatencyTableError, match=r"attention at \(8, 1\) lacks \(heads, qk_dim, v_dim\) \[\(2, 4, 1\)"):
        save_table(holes, tmp_path / "holes.json")
    with pytest.raises(LatencyTableError, match="no such latency table"):
        load_table(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- end to end


def test_profile_quick_through_the_cli_writes_a_table_the_tiny_ast_can_use(tmp_path, capsys):
    out = tmp_path / "table.json"
    threads = torch.get_num_threads()
    try:
        command = ["profile", "--device", "cpu", "--quick", "--threads", "1", "--clock", "cpu", "--out", str(out)]
        assert main(command) == 0
        table = load_table(out)
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # same machine, torch and threads: no warning
            dense = predicted_latency(tiny_ast(), table, tokens=8, batch=1)
    finally:
        torch.set_num_threads(threads)
    assert "wrote" in capsys.readouterr().out
    assert (table["device"], table["device_name"], table["threads"]) == ("cpu", device_name("cpu"), 1)
    assert table["pairs"] == [[8, 1], [8, 2]]
    # the dense model is predicted as the anchors' fit has it (at the table's own tokens and batch)
    dense_anchor = table["parts"][0]["anchors"][0]
    assert (dense_anchor["heads"], dense_anchor["head_dim"]) == (4, 8)
    assert dense == pytest.approx(dense_anchor["fitted_ms"], rel=1e-9)
    assert all(cell["ms"] > 0 and cell["spread"] >= 0 for cell in table["attention"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_profile_cuda_without_a_gpu_says_so(tmp_path, capsys):
    assert main(["profile", "--device", "cuda", "--quick", "--out", str(tmp_path / "t.json")]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_the_cpu_clock_needs_one_thread(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "t.json"
    assert main(["profile", "--quick", "--threads", "2", "--clock", "cpu", "--out", str(out)]) == 2
    assert "clock 'cpu' times the calling thread, so it needs device cpu and 1 torch thread" in capsys.readouterr().err
    assert torch.get_num_threads() == threads and not out.exists()


def test_profile_bad_tokens_are_named(tmp_path, capsys):
    assert main(["profile", "--quick", "--tokens", "9", "--out", str(tmp_path / "t.json")]) == 2
    assert "tokens 9: an AST with 32 mel bins has 2 + 2 x t tokens" in capsys.readouterr().err
    assert main(["profile", "--tokens", "146,many", "--out", str(tmp_path / "t.json")]) == 2
    assert "--tokens '146,many': expected comma-separated ints" in capsys.readouterr().err


def test_benchmark_quick_reports_errors_against_measurements(tmp_path, capsys):
    out = tmp_path / "latency_model.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    points = results["points"]
    assert len(points) == 2 * (1 + len(bench.GRANULARITY_NAMES) * 2)  # batches x (dense + granularities x 2 sparsities)
    dense = {(p["tokens"], p["batch"]): p for p in points if p["granularity"] == bench.DENSE}
    for point in points:
        assert point["error"] == pytest.approx(point["predicted_ms"] / point["measured"]["ms"] - 1)
        assert len(point["measured"]["samples"]) >= 3
        # measured speedup: the median over rounds of dense time / this model's time in the same round
        rounds = [m.get("interleaved", m)["samples"] for m in (dense[point["tokens"], point["batch"]]["measured"],
                                                               point["measured"])]
        speedup = float(np.median([d / t for d, t in zip(*rounds)]))
        assert point["measured_speedup"] == pytest.approx(speedup)
        assert point["speedup_error"] == pytest.approx(point["predicted_speedup"] / speedup - 1)
    pruned = [p for p in points if p["granularity"] != bench.DENSE]
    overall = results["summary"]["overall"]
    for key in ("error", "speedup_error"):
        errors = [abs(p[key]) for p in pruned]
        assert overall[f"median_abs_{key}"] == pytest.approx(float(np.median(errors)))
        assert overall[f"p90_abs_{key}"] == pytest.approx(float(np.percentile(errors, 90)))
    assert results["table"]["threads"] == 1
    capsys.readouterr()
    assert bench.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out.strip() == bench.markdown(results)


def test_profile_of_a_saved_model_uses_its_architecture_and_token_count(tmp_path, capsys):
    """`profile --model DIR`: the search's own baseline, not AST-base: 3 layers of 2 heads, 50 frames x 32 mel
    bins = 2 x 4 patches + 2 tokens, by hand."""
    from prune_core import build_ast

    model = build_ast(num_labels=3, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48, num_mel_bins=32,
                      max_length=50).eval()
    model.save_pretrained(tmp_path / "baseline")
    out = tmp_path / "table.json"
    threads = torch.get_num_threads()
    try:
        command = ["profile", "--device", "cpu", "--quick", "--model", str(tmp_path / "baseline"), "--threads", "1",
                   "--clock", "cpu", "--out", str(out)]
        assert main(command) == 0
        table = load_table(out)
        torch.set_num_threads(1)
        assert table["pairs"] == [[10, 1], [10, 2]]
        assert predicted_latency(model, table, tokens=10, batch=2) > 0  # the architecture check passes
        with pytest.raises(LatencyTableError):
            predicted_latency(tiny_ast(), table, tokens=10, batch=1)  # another architecture is refused
    finally:
        torch.set_num_threads(threads)
    tiny_vit().save_pretrained(tmp_path / "vit")
    assert main(["profile", "--model", str(tmp_path / "vit"), "--quick", "--out", str(tmp_path / "v.json")]) == 2
    assert "profiles ASTs only" in capsys.readouterr().err
