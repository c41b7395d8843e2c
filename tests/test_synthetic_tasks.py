"""Non-audio tasks through the same data path as audio: written as prepared sets, loaded under the model's
own input name, and a ViT / BERT baseline trained on them (the search then prunes it like an AST)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from data_prep import synthetic_tasks as tasks
from data_prep.loader import LoaderConfig, ShardDataset, make_loader, soft_target_loss
from search.baseline import BaselineConfig, train_baseline
from search.cli import main
from tests.conftest import tiny_ast

COUNTS = {"train": 96, "validation": 32, "test": 32}
TINY = BaselineConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def relations(tmp_path_factory):
    out = tmp_path_factory.mktemp("relations")
    tasks.write_synthetic("relations", out, COUNTS)
    return out


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    out = tmp_path_factory.mktemp("markers")
    tasks.write_synthetic("markers", out, COUNTS)
    return out


def test_splits_are_fixed_by_their_seed_and_labelled_by_the_marker_relation():
    first, second = tasks.relation_images(32, seed=5), tasks.relation_images(32, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert first[0].shape == (32, 3, tasks.IMAGE, tasks.IMAGE) and first[0].dtype == np.float32
    assert tasks.direction(0, 5) == 0 and tasks.direction(0, -5) == 1 and tasks.direction(5, 0) == 2
    assert tasks.direction(1, 2) is None and tasks.direction(4, 5) is None  # overlapping; ambiguous axis
    for pixels, label in zip(*first):  # find A (red) and B (blue) as the best 3x3 colour match; check the label
        places = []
        for colour in tasks.COLORS[:2]:
            match = np.einsum("chw,c->hw", pixels, colour)
            windows = np.lib.stride_tricks.sliding_window_view(match, (tasks.MARKER, tasks.MARKER)).sum((-1, -2))
            places.append(np.unravel_index(windows.argmax(), windows.shape))
        (ay, ax), (by, bx) = places
        assert tasks.direction(int(by - ay), int(bx - ax)) == label
    ids, labels = tasks.marker_tokens(16, seed=5)
    assert ((ids == tasks.MARKER_A).sum(1) == 1).all() and ((ids == tasks.MARKER_B).sum(1) == 1).all()
    for row, label in zip(ids, labels):
        a, b = int(np.flatnonzero(row == tasks.MARKER_A)[0]), int(np.flatnonzero(row == tasks.MARKER_B)[0])
        assert label == (0 if a < b else len(tasks.DISTANCE_BINS)) + tasks.distance_bin(abs(a - b))


def test_images_load_as_normalized_pixel_values(relations):
    manifest = json.loads((relations / "manifest.json").read_text())
    assert manifest["features"] == {"input_key": "pixel_values", "shape": [3, 16, 16], "dtype": "float32"}
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == COUNTS
    dataset = ShardDataset(relations, "validation")
    pixels, labels = tasks.relation_images(COUNTS["validation"], tasks.SPLIT_SEEDS["validation"])
    norm = manifest["normalization"]
    sample = dataset[3]
    assert set(sample) == {"pixel_values", "labels"} and sample["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(sample["pixel_values"], torch.from_numpy((pixels[3] - norm["mean"]) / (2 * norm["std"])))
    assert int(sample["labels"]) == labels[3]
    train_pixels, _ = tasks.relation_images(COUNTS["train"], tasks.SPLIT_SEEDS["train"])
    assert norm["mean"] == pytest.approx(float(train_pixels.mean()), abs=1e-6)


def test_tokens_load_as_integer_ids_without_normalization(markers):
    dataset = ShardDataset(markers, "test")
    ids, labels = tasks.marker_tokens(COUNTS["test"], tasks.SPLIT_SEEDS["test"])
    sample = dataset[5]
    assert set(sample) == {"input_ids", "labels"} and sample["input_ids"].dtype == torch.int64
    assert torch.equal(sample["input_ids"], torch.from_numpy(ids[5]).long()) and int(sample["labels"]) == labels[5]


def test_a_written_set_is_kept_and_a_different_one_rewritten(tmp_path):
    first = tasks.write_synthetic("relations", tmp_path, COUNTS)
    shard = tmp_path / "train" / "part-00000.parquet"
    stamp = shard.stat().st_mtime_ns
    assert tasks.write_synthetic("relations", tmp_path, COUNTS) == first and shard.stat().st_mtime_ns == stamp
    changed = tasks.write_synthetic("relations", tmp_path, {**COUNTS, "train": 64})
    assert changed["splits"]["train"]["rows"] == 64 and changed["content_hash"] != first["content_hash"]
    with pytest.raises(ValueError, match="unknown synthetic task 'pictures'"):
        tasks.write_synthetic("pictures", tmp_path)
    with pytest.raises(ValueError, match="at least 1 sample"):
        tasks.write_synthetic("relations", tmp_path, {"train": 0})


def test_augmentations_that_mean_nothing_for_the_input_are_refused(relations, markers):
    with pytest.raises(ValueError, match=r"spec_augment applies to spectrograms.*pixel_values"):
        make_loader(relations, "train", LoaderConfig(spec_augment=True), train=True)
    with pytest.raises(ValueError, match=r"mixup cannot blend token ids.*input_ids"):
        make_loader(markers, "train", LoaderConfig(mixup=0.4), train=True)
    batch = next(iter(make_loader(relations, "train", LoaderConfig(batch_size=8, mixup=0.4), train=True)))
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["labels"].shape == (8, 4)  # soft targets
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=4, num_labels=4, problem_type="single_label_classification"))
    assert soft_target_loss(model, batch).isfinite()


@pytest.mark.parametrize("fixture, family", [("relations", "ViTForImageClassification"),
                                             ("markers", "BertForSequenceClassification")])
def test_the_baseline_is_the_model_the_input_calls_for(request, tmp_path, fixture, family):
    data = request.getfixturevalue(fixture)
    record = train_baseline(data, tmp_path / "baseline", TINY)
    model = transformers.AutoModelForImageClassification if fixture == "relations" else transformers.AutoModelForSequenceClassification
    loaded = model.from_pretrained(tmp_path / "baseline")
    assert type(loaded).__name__ == family and loaded.config.num_hidden_layers == 2
    assert loaded.config.id2label[0] == json.loads((data / "manifest.json").read_text())["labels"][0]
    assert 0 <= record["test"] <= 1 and record["params"] == sum(p.numel() for p in loaded.parameters())


def test_fine_tuning_a_checkpoint_of_another_modality_is_refused(relations, tmp_path, capsys):
    tiny_ast().save_pretrained(tmp_path / "ast")
    code = main(["baseline", "--data", str(relations), "--out", str(tmp_path / "b"), "--init", str(tmp_path / "ast")])
    assert code == 2
    assert "takes input_values, but" in capsys.readouterr().err and not (tmp_path / "b" / "config.json").exists()


def test_cli_writes_a_task_and_trains_its_baseline(tmp_path, capsys):
    out = tmp_path / "markers"
    assert main(["data", "synth-task", "--task", "markers", "--out", str(out), "--train", "64", "--validation", "16",
                 "--test", "16"]) == 0
    assert "input_ids [32]" in capsys.readouterr().out
    assert main(["baseline", "--data", str(out), "--out", str(tmp_path / "b"), "--epochs", "1", "--hidden-size", "16",
                 "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "32"]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 16 and config["vocab_size"] == tasks.VOCAB


def test_a_token_set_without_its_vocabulary_is_refused_by_name(markers, tmp_path):
    data = tmp_path / "markers"
    shutil.copytree(markers, data)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["features"]["vocab_size"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="features.vocab_size must give the token vocabulary"):
        train_baseline(data, tmp_path / "b", TINY)
