"""data_prep.loader over small shards written here in the `prepare` format (manifest + Parquet per split)."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from data_prep import loader
from data_prep.loader import LoaderConfig, ShardDataset, make_loader, soft_target_loss

T, F = 24, 16  # AST's 16x16 patches need at least 16 frames and 16 mel bins
MEAN, STD = -4.2731, 2.31  # no float16 value equals MEAN, so only masks make exact zeros
SPLIT_ROWS = {"train": (7, 5), "validation": (3, 2), "test": (2, 2)}  # rows of the 2 shards per split


def write_shard(path: Path, split: str, labels: list, features: np.ndarray, task: str, dtype: str = "float16") -> None:
    if task == "single_label":
        label = ("label", pa.array(labels, pa.int32()))
    else:
        label = ("labels", pa.array(labels, pa.list_(pa.int32())))
    arrow_dtype = pa.float16() if dtype == "float16" else pa.float32()
    table = pa.table(
        {
            "id": [f"{split}-{path.stem}-{i}" for i in range(len(labels))],
            "split": [split] * len(labels),
            label[0]: label[1],
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel(), arrow_dtype), T * F),
            "frames": pa.array([T] * len(labels), pa.int32()),
            "path": [f"/audio/{i}.wav" for i in range(len(labels))],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_set(root: Path, task: str = "single_label", classes: int = 4, rows: dict | None = None, seed: int = 0,
             label_fn=None) -> dict[str, tuple[np.ndarray, list]]:
    """Write a prepared set (2 shards per split); returns each split's raw features [N, T, F] and labels, in order."""
    rng = np.random.default_rng(seed)
    splits, data = {}, {}
    for split, sizes in (rows or SPLIT_ROWS).items():
        names, all_features, all_labels = [], [], []
        for index, size in enumerate(sizes):
            features = (rng.normal(MEAN, STD, (size, T, F))).astype(np.float16)
            if label_fn is not None:
                labels = [label_fn(len(all_labels) + i) for i in range(size)]
            elif task == "single_label":
                labels = [int(c) for c in rng.integers(0, classes, size)]
            else:
                labels = [sorted({int(c) for c in rng.integers(0, classes, rng.integers(1, 3))}) for _ in range(size)]
            name = f"{split}/part-{index:05d}.parquet"
            write_shard(root / name, split, labels, features, task)
            names.append(name)
            all_features.append(features)
            all_labels += labels
        splits[split] = {"rows": sum(sizes), "shards": names}
        data[split] = (np.concatenate(all_features), all_labels)
    manifest = {
        "source": "speechcommands" if task == "single_label" else "audioset",
        "task": task,
        "labels": [f"class{c}" for c in range(classes)],
        "features": {"sample_rate": 16000, "num_mel_bins": F, "max_length": T, "frame_length_ms": 25.0,
                     "frame_shift_ms": 10.0, "dtype": "float16"},
        "normalization": {"mean": MEAN, "std": STD, "kind": "measured"},
        "splits": splits,
        "quarantined": [],
        "content_hash": "test",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return data


def normalized(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float64) - MEAN) / (2 * STD)


def batches(data_loader) -> dict[str, torch.Tensor]:
    parts = list(data_loader)
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def test_items_have_the_manifest_shape_and_ast_normalization(tmp_path):
    data = make_set(tmp_path)
    dataset = ShardDataset(tmp_path, "train")
    raw, labels = data["train"]
    assert len(dataset) == 12 and dataset.task == "single_label" and dataset.num_classes == 4
    assert dataset.labels == ["class0", "class1", "class2", "class3"]
    assert dataset.class_counts().tolist() == np.bincount(labels, minlength=4).tolist()
    for index in (0, 6, 7, 11, -1):  # both shards, and the last row through a negative index
        item = dataset[index]
        assert item["input_values"].dtype == torch.float32 and item["input_values"].shape == (T, F)
        np.testing.assert_allclose(item["input_values"].numpy(), normalized(raw[index]), rtol=1e-6, atol=1e-6)
        assert item["labels"].dtype == torch.long and item["labels"].shape == ()
        assert item["labels"].item() == labels[index]
    raw_item = ShardDataset(tmp_path, "train", normalize=False)[3]["input_values"]
    assert np.array_equal(raw_item.numpy(), raw[3].astype(np.float32))
    with pytest.raises(IndexError):
        dataset[12]


def test_multi_label_targets_are_multi_hot(tmp_path):
    data = make_set(tmp_path, task="multi_label", classes=5)
    dataset = ShardDataset(tmp_path, "validation")
    _, labels = data["validation"]
    assert dataset.task == "multi_label"
    for index, classes in enumerate(labels):
        target = dataset[index]["labels"]
        assert target.dtype == torch.float32 and target.shape == (5,)
        assert torch.nonzero(target).flatten().tolist() == classes
    assert dataset.class_counts().tolist() == np.bincount([c for row in labels for c in row], minlength=5).tolist()


def test_features_are_memory_mapped_from_a_reused_arrow_cache(tmp_path, monkeypatch):
    make_set(tmp_path)
    first = ShardDataset(tmp_path, "train")
    caches = sorted((tmp_path / ".arrow-cache" / "train").glob("*.arrow"))
    assert [path.name.split(".")[0] for path in caches] == ["part-00000", "part-00001"]
    view = first._mapped()[0]
    assert not view.flags.owndata and not view.flags.writeable  # a view of a read-only mapping, not a decoded copy
    mapped = Path("/proc/self/maps")
    if mapped.exists():
        assert str(caches[0]) in mapped.read_text()
    stamps = [path.stat().st_mtime_ns for path in caches]

    def no_decoding(*args):
        raise AssertionError("a cached shard was decoded again")

    monkeypatch.setattr(loader, "_convert", no_decoding)
    second = ShardDataset(tmp_path, "train")
    assert torch.equal(second[5]["input_values"], first[5]["input_values"])
    assert [path.stat().st_mtime_ns for path in caches] == stamps
    monkeypatch.undo()

    source = tmp_path / "train" / "part-00000.parquet"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # the shard was rewritten
    ShardDataset(tmp_path, "train")
    rebuilt = sorted((tmp_path / ".arrow-cache" / "train").glob("part-00000.*.arrow"))
    assert len(rebuilt) == 1 and rebuilt[0] != caches[0]


def test_shards_split_into_many_record_batches_index_correctly(tmp_path, monkeypatch):
    data = make_set(tmp_path)
    monkeypatch.setattr(loader, "CONVERT_BATCH_BYTES", 2 * T * F * 2)  # 2 rows per record batch
    dataset = ShardDataset(tmp_path, "train")
    assert len(dataset._mapped()) == 4 + 3
    raw, labels = data["train"]
    for index in range(len(dataset)):
        np.testing.assert_allclose(dataset[index]["input_values"].numpy(), normalized(raw[index]), rtol=1e-6, atol=1e-6)
        assert dataset[index]["labels"].item() == labels[index]


def test_eval_loader_keeps_shard_order_and_train_loader_is_seeded(tmp_path):
    data = make_set(tmp_path)
    config = LoaderConfig(batch_size=4, eval_batch_size=5)
    evaluation = make_loader(tmp_path, "train", config, train=False)
    assert [len(batch["labels"]) for batch in evaluation] == [5, 5, 2]
    raw, labels = data["train"]
    merged = batches(evaluation)
    np.testing.assert_allclose(merged["input_values"].numpy(), normalized(raw), rtol=1e-6, atol=1e-6)
    assert merged["labels"].tolist() == labels

    def order(seed: int) -> list[int]:
        train = batches(make_loader(tmp_path, "train", LoaderConfig(batch_size=4, seed=seed), train=True))
        return [int(np.argmin(np.abs(normalized(raw) - row.numpy()).sum(axis=(1, 2)))) for row in train["input_values"]]

    assert order(3) == order(3) and sorted(order(3)) == list(range(12)) and order(3) != order(4)


def test_workers_get_the_same_batches_without_copying_the_mapping(tmp_path):
    make_set(tmp_path)
    dataset = ShardDataset(tmp_path, "train")
    assert len(pickle.dumps(dataset)) < 10_000  # the features stay in the mapped files
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[8]["input_values"], dataset[8]["input_values"])
    config = LoaderConfig(batch_size=4, spec_augment=True, mixup=0.5, seed=1)
    with_workers = [batches(make_loader(tmp_path, "train", replace(config, num_workers=2), train=True))
                    for _ in range(2)]
    assert torch.equal(with_workers[0]["input_values"], with_workers[1]["input_values"])
    evaluation = [batches(make_loader(tmp_path, "test", LoaderConfig(num_workers=n), train=False)) for n in (0, 2)]
    assert torch.equal(evaluation[0]["input_values"], evaluation[1]["input_values"])


def test_spec_augment_zeros_bands_in_training_only(tmp_path):
    make_set(tmp_path)
    plain = batches(make_loader(tmp_path, "train", LoaderConfig(batch_size=12, seed=2), train=True))["input_values"]
    config = LoaderConfig(batch_size=12, spec_augment=True, freq_mask=6, time_mask=8, num_masks=2, seed=2)
    masked = batches(make_loader(tmp_path, "train", config, train=True))["input_values"]
    zero = masked == 0
    assert torch.equal(masked[~zero], plain[~zero])  # masking only zeroes, in the same sample order
    frames_zeroed = zero.all(dim=2).sum().item()
    bins_zeroed = zero.all(dim=1).sum().item()
    assert frames_zeroed > 0 and bins_zeroed > 0
    assert (zero & ~(zero.all(dim=2, keepdim=True) | zero.all(dim=1, keepdim=True))).sum() == 0  # whole bands only
    evaluation = batches(make_loader(tmp_path, "train", config, train=False))["input_values"]
    assert (evaluation == 0).sum() == 0


def test_mixup_mixes_inputs_and_makes_soft_targets(tmp_path):
    make_set(tmp_path)
    plain = batches(make_loader(tmp_path, "train", LoaderConfig(batch_size=12, seed=5), train=True))
    mixed = batches(make_loader(tmp_path, "train", LoaderConfig(batch_size=12, mixup=0.4, seed=5), train=True))
    soft = mixed["labels"]
    assert soft.dtype == torch.float32 and soft.shape == (12, 4)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(12))
    # mixing with a permutation of the batch keeps the batch sums of inputs and targets
    torch.testing.assert_close(soft.sum(dim=0), torch.nn.functional.one_hot(plain["labels"], 4).float().sum(dim=0))
    torch.testing.assert_close(mixed["input_values"].sum(dim=0), plain["input_values"].sum(dim=0), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(mixed["input_values"], plain["input_values"])
    b = int(torch.nonzero((soft > 0).sum(dim=1) == 2)[0])  # a sample mixed with one of another class
    lam = soft[b, plain["labels"][b]]
    residual = mixed["input_values"][b] - lam * plain["input_values"][b] - (1 - lam) * plain["input_values"]
    assert residual.abs().amax(dim=(1, 2)).min() < 1e-5


def test_multi_label_mixup_mixes_multi_hot_targets(tmp_path):
    make_set(tmp_path, task="multi_label", classes=5)
    batch = next(iter(make_loader(tmp_path, "train", LoaderConfig(batch_size=12, mixup=0.4), train=True)))
    assert batch["labels"].shape == (12, 5) and batch["labels"].min() >= 0 and batch["labels"].max() <= 1
    assert ((batch["labels"] > 0) & (batch["labels"] < 1)).any()


def test_balanced_sampling_draws_a_rare_class_often(tmp_path):
    rows = {"train": (100, 100)}
    make_set(tmp_path, rows=rows, label_fn=lambda i: 3 if i % 50 == 0 else i % 3)  # class 3: 4 of 200 rows
    config = LoaderConfig(batch_size=50, balanced=True, seed=7)

    def drawn() -> torch.Tensor:
        epochs = make_loader(tmp_path, "train", config, train=True)
        return torch.cat([batches(epochs)["labels"] for _ in range(3)])

    labels = drawn()
    assert len(labels) == 600
    assert (labels == 3).float().mean() > 0.15  # about 1/4 when balanced, against 2% of the data
    assert torch.equal(labels, drawn())
    uniform = batches(make_loader(tmp_path, "train", LoaderConfig(batch_size=50, seed=7), train=True))["labels"]
    assert (uniform == 3).sum() == 4


def test_multi_label_balanced_weights_sum_inverse_counts(tmp_path):
    rows = [[0], [0, 1], [0], [0, 2]]
    make_set(tmp_path, task="multi_label", classes=3, rows={"train": (3, 1)}, label_fn=lambda i: rows[i])
    weights = loader._balanced_weights(ShardDataset(tmp_path, "train"))
    torch.testing.assert_close(weights, torch.tensor([1 / 4, 1 / 4 + 1, 1 / 4, 1 / 4 + 1], dtype=torch.float64))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardDataset(tmp_path, "train")
    make_set(tmp_path)
    with pytest.raises(ValueError, match=r"manifest\.json has no split 'dev'.*'test', 'train', 'validation'"):
        ShardDataset(tmp_path, "dev")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["test"]["rows"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json says split 'test' has 5 rows, its shards hold 4"):
        ShardDataset(tmp_path, "test")
    shard = tmp_path / "validation" / "part-00001.parquet"
    write_shard(shard, "validation", [1, 2], np.zeros((2, T, F)), "single_label", dtype="float32")
    with pytest.raises(ValueError, match=f"{shard}.*column 'features' is fixed_size_list<element: float>"):
        ShardDataset(tmp_path, "validation")
    pq.write_table(pq.read_table(shard).drop_columns(["frames"]), shard)
    with pytest.raises(ValueError, match=f"{shard}.*missing column 'frames'"):
        ShardDataset(tmp_path, "validation")
    write_shard(shard, "validation", [1, None], np.zeros((2, T, F)), "single_label")
    with pytest.raises(ValueError, match=f"{shard} has missing values in column.*'label'"):
        ShardDataset(tmp_path, "validation")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard)):
        ShardDataset(tmp_path, "validation")


def test_labels_outside_the_manifest_are_rejected(tmp_path):
    make_set(tmp_path, classes=4, label_fn=lambda i: 9 if i == 3 else 0)
    with pytest.raises(ValueError, match="class id 9 outside the 4 labels"):
        ShardDataset(tmp_path, "test")


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 0), ("eval_batch_size", 0), ("num_workers", -1), ("freq_mask", -1), ("time_mask", -2),
     ("num_masks", 0), ("mixup", -0.1), ("seed", -1)],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"LoaderConfig.{field} "):
        LoaderConfig(**{field: value})


def tiny_ast(classes: int, problem_type: str | None) -> transformers.ASTForAudioClassification:
    torch.manual_seed(0)
    config = transformers.ASTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_mel_bins=F,
        max_length=T, num_labels=classes, problem_type=problem_type,
    )
    return transformers.ASTForAudioClassification(config)


def backpropagates(model: torch.nn.Module, loss: torch.Tensor) -> bool:
    model.zero_grad()
    loss.backward()
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_batches_train_a_tiny_ast(tmp_path):
    make_set(tmp_path)
    model = tiny_ast(4, "single_label_classification")
    hard = next(iter(make_loader(tmp_path, "train", LoaderConfig(batch_size=6, spec_augment=True), train=True)))
    loss = model(**hard).loss
    assert backpropagates(model, loss)
    torch.testing.assert_close(soft_target_loss(model, hard), loss)  # one LossFn serves training and evaluation

    mixed = next(iter(make_loader(tmp_path, "train", LoaderConfig(batch_size=6, mixup=0.4), train=True)))
    loss = soft_target_loss(model, mixed)
    logits = model(input_values=mixed["input_values"]).logits
    torch.testing.assert_close(loss, -(mixed["labels"] * logits.log_softmax(-1)).sum(-1).mean())
    assert backpropagates(model, loss)
    with pytest.raises(ValueError, match="problem_type"):
        soft_target_loss(tiny_ast(4, None), mixed)


def test_multi_label_batches_train_a_tiny_ast(tmp_path):
    make_set(tmp_path, task="multi_label", classes=5)
    model = tiny_ast(5, "multi_label_classification")
    batch = next(iter(make_loader(tmp_path, "train", LoaderConfig(batch_size=6, mixup=0.4), train=True)))
    loss = soft_target_loss(model, batch)
    torch.testing.assert_close(loss, model(**batch).loss)  # transformers' BCE takes mixed multi-hot targets as is
    assert backpropagates(model, loss)
