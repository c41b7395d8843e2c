"""benchmarks/transfer.py at --quick sizes: the result's structure, the dense-model cache and the verdict rule,
not the accuracies (a tiny model on 128 samples learns nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("transfer_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def threads():
    """The script sets torch's thread count; give the rest of the session its own back."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_quick_run_has_every_strategy_and_seed_and_answers(bench, tmp_path, threads, capsys):
    out = tmp_path / "transfer.json"
    args = ["--quick", "--seeds", "2", "--threads", str(threads), "--work", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())

    sizes, settings = bench.SIZES["quick"], results["settings"]
    assert settings["granularities"] == ["entire_head", "per_head"] and settings["thresholds"] == ["global"]
    expected = {(g, s, "global", seed) for g in ("entire_head", "per_head") for s in ("magnitude", "fisher")
                for seed in (0, 1)}
    rows = results["rows"]
    assert {(r["granularity"], r["scorer"], r["threshold"], r["seed"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        assert len(row["steps"]) == settings["steps"] == bench.steps_to_target(0.5) == 7
        reached = [step["attention_sparsity"] for step in row["steps"]]
        assert reached == sorted(reached) and reached[-1] >= 0.5
        assert row["attention_sparsity"] == reached[-1] and row["test"] == row["steps"][-1]["test"]
        assert all(0 <= step[split] <= 1 for step in row["steps"] for split in ("validation", "test"))
        assert len(row["layer_sparsity"]) == sizes.layers

    questions = {a["question"]: a for a in results["answers"]}
    assert set(questions) == {"Fisher beats magnitude", "entire head beats channel pruning"}  # no local: no 3rd
    fisher = questions["Fisher beats magnitude"]
    assert fisher["pairs"] == 4  # 2 granularities x 2 seeds
    assert fisher["verdict"] in ("yes", "no", "unclear (within noise)")
    assert fisher["test_wins"].startswith(tuple(f"{n}/4" for n in range(5)))
    assert {s["strategy"] for s in results["layers"]} == {f"{g}/{s}/global" for g, s, _, _ in expected}
    assert results["dense"]["cached"] is False

    printed = capsys.readouterr().out
    assert "| Fisher beats magnitude | 4 |" in printed

    # a second run finds the dense model in --work instead of training it again
    again = tmp_path / "again.json"
    args = ["--quick", "--seeds", "1", "--threads", str(threads), "--work", str(tmp_path / "work"), "--out", str(again)]
    assert bench.main(args) == 0
    cached = json.loads(again.read_text())["dense"]
    assert cached["cached"] is True and cached["validation"] == results["dense"]["validation"]

    capsys.readouterr()
    assert bench.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out.strip() == bench.tables(results)


def test_splits_are_fixed_by_their_seed_and_labelled_by_the_marker_relation(bench):
    first, second = bench.vit_split(32, seed=5), bench.vit_split(32, seed=5)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert first["pixel_values"].shape == (32, 3, bench.IMAGE, bench.IMAGE)
    assert bench.direction(0, 5) == 0 and bench.direction(0, -5) == 1 and bench.direction(5, 0) == 2
    assert bench.direction(1, 2) is None and bench.direction(4, 5) is None  # overlapping; ambiguous axis
    tokens = bench.bert_split(16, seed=5)
    assert ((tokens["input_ids"] == bench.MARKER_A).sum(1) == 1).all()
    for ids, label in zip(tokens["input_ids"], tokens["labels"]):
        a, b = int((ids == bench.MARKER_A).nonzero()), int((ids == bench.MARKER_B).nonzero())
        expected = (0 if a < b else len(bench.DISTANCE_BINS)) + bench.distance_bin(abs(a - b))
        assert int(label) == expected


def test_verdict_needs_three_pairs_in_four(bench):
    assert bench.verdict([0.01, 0.02, 0.01, -0.01]) == "yes"
    assert bench.verdict([-0.01, -0.02, 0.0, -0.01]) == "no"
    assert bench.verdict([0.01, -0.02, 0.0, 0.01]) == "unclear (within noise)"
    assert bench.verdict([0.0, 0.0]) == "unclear (within noise)"


def test_bad_arguments_are_refused_with_a_message(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--granularities", "entire_head,whole_layer"])
    assert "choose a comma-separated list of entire_head, per_head, same_channel" in capsys.readouterr().err
    assert bench.main(["--from-json", "/nonexistent/transfer.json"]) == 2
