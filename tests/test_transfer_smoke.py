"""benchmarks.transfer at --quick sizes: the ViT goes through the same data, baseline and search path as
the AST, and the answers come out; not the accuracies (a tiny model on 256 samples learns nothing)."""

from __future__ import annotations

import json

import pytest
import ray

from benchmarks import transfer


@pytest.fixture(scope="module")
def bench():
    yield transfer
    if ray.is_initialized():
        ray.shutdown()


def test_quick_run_searches_a_vit_with_every_strategy_and_answers(bench, tmp_path, capsys):
    out = tmp_path / "transfer.json"
    assert bench.main(["--quick", "--seeds", "1", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert (results["model"], results["task"], results["target"]) == ("vit", "relations", 0.2)
    config = json.loads((tmp_path / "work" / "baseline-vit" / "config.json").read_text())
    assert config["model_type"] == "vit" and config["num_hidden_layers"] == 2

    expected = {(g, s, t) for g in ("entire_head", "per_head") for s in ("magnitude", "fisher")
                for t in ("global", "local")}
    rows = results["rows"]
    assert {(r["granularity"], r["scorer"], r["threshold"]) for r in rows} == expected and len(rows) == 8
    for row in rows:
        assert row["attention_sparsity"] >= 0.2 and row["seed"] == 0
        assert 0 <= row["validation"] <= 1 and 0 <= row["test"] <= 1
        assert row["dense"] == pytest.approx(results["dense"]["validation"])
    questions = {a["question"]: a for a in results["answers"]}
    assert set(questions) == {"Fisher beats magnitude", "global beats local", "entire head beats channel pruning"}
    assert questions["Fisher beats magnitude"]["pairs"] == 4  # 2 granularities x 2 thresholds
    assert all(a["verdict"] in ("yes", "no", "unclear (within noise)") for a in questions.values())
    assert {s["strategy"] for s in results["layers"]} == {"/".join(key) for key in expected}
    assert all(len(s["mean_layer_sparsity"]) == 2 for s in results["layers"])
    assert out.with_name("transfer_layers.png").stat().st_size > 0

    printed = capsys.readouterr().out
    assert "vit on the synthetic relations task" in printed and "| Fisher beats magnitude | 4 |" in printed
    assert bench.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out.strip() == bench.markdown(results)


def test_bad_arguments_are_refused_with_a_message(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--target", "1.5"])
    assert "--target must be in (0, 1)" in capsys.readouterr().err
    assert bench.main(["--from-json", "/nonexistent/transfer.json"]) == 2
