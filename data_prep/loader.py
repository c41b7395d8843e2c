"""Torch batches from prepared shards for prune_core's fine-tuning and the search: memory-mapped Arrow,
class-balanced sampling, and SpecAugment + mixup for training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, WeightedRandomSampler
from torch.utils.data import default_collate, get_worker_info

MANIFEST = "manifest.json"
CACHE_DIR = ".arrow-cache"
CACHE_VERSION = "1"  # bump when the cache layout changes, so old caches are rebuilt
DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "int32": pa.int32()}  # int32: token ids
CONVERT_BATCH_BYTES = 64 << 20  # bounds memory while converting one shard


def read_manifest(root: Path) -> dict:
    """The data set's manifest; a clear error when `root` is not a prepared data set."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a prepared data set (`prune-search data prepare`)")
    from prune_core.metrics import TASKS  # here, so that preparing data never imports transformers and peft

    manifest = json.loads(path.read_text())
    if manifest.get("task") not in TASKS:
        raise ValueError(f"{path}: task must be one of {TASKS}, got {manifest.get('task')!r}")
    dtype = manifest["features"].get("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{path}: features.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return manifest


def input_spec(manifest: dict) -> tuple[str, tuple[int, ...]]:
    """The model input a data set fills: its keyword (`input_values`, `pixel_values`, `input_ids`) and the
    shape of one sample. Manifests written before the key existed are AST features [max_length, mel bins]."""
    features = manifest["features"]
    shape = features.get("shape") or [features["max_length"], features["num_mel_bins"]]
    return features.get("input_key", "input_values"), tuple(int(n) for n in shape)


def _label_column(task: str) -> str:
    return "label" if task == "single_label" else "labels"


def _expected_fields(manifest: dict) -> dict[str, pa.DataType]:
    """The shard columns the manifest implies (the loader reads only the label and the features)."""
    features = manifest["features"]
    size = int(np.prod(input_spec(manifest)[1]))
    label = pa.int32() if manifest["task"] == "single_label" else pa.list_(pa.int32())
    return {
        "id": pa.string(),
        "split": pa.string(),
        _label_column(manifest["task"]): label,
        "features": pa.list_(DTYPES[features["dtype"]], size),
        "frames": pa.int32(),
        "path": pa.string(),
    }


def _check_schema(path: Path, schema: pa.Schema, expected: dict[str, pa.DataType]) -> None:
    problems = []
    for name, dtype in expected.items():
        if name not in schema.names:
            problems.append(f"missing column {name!r}")
        elif schema.field(name).type != dtype:
            problems.append(f"column {name!r} is {schema.field(name).type}, the manifest implies {dtype}")
    if problems:
        raise ValueError(f"{path} does not match {MANIFEST}: " + "; ".join(problems))


def _cache_path(root: Path, shard: str, source: Path) -> Path:
    """Where `shard`'s Arrow copy lives; the name carries the source's size and mtime, so an edit invalidates it."""
    stat = source.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    relative = Path(shard)
    return root / CACHE_DIR / relative.parent / f"{relative.stem}.{key}.arrow"


def _convert(source: Path, target: Path, columns: list[str], row_bytes: int) -> None:
    """Decode a Parquet shard once into an uncompressed Arrow IPC file (temp, then rename: never half-written),
    `CONVERT_BATCH_BYTES` of rows at a time; older caches of the shard are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{source.stem}.*.arrow"):
        stale.unlink(missing_ok=True)
    parquet = pq.ParquetFile(source)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    schema = pa.schema([parquet.schema_arrow.field(name) for name in columns])
    with pa.OSFile(str(temporary), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for batch in parquet.iter_batches(batch_size=max(1, CONVERT_BATCH_BYTES // row_bytes), columns=columns):
            nulls = [name for name in columns if batch.column(name).null_count]
            if nulls:
                temporary.unlink()
                raise ValueError(f"{source} has missing values in column(s) {nulls}")
            writer.write_batch(batch)
    os.replace(temporary, target)


def _map(path: Path) -> list[pa.RecordBatch]:
    """The record batches of an Arrow file, backed by a read-only memory map (the file handle is closed:
    the mapping lives as long as the batches do, so thousands of shards do not use thousands of descriptors)."""
    source = pa.memory_map(str(path), "r")
    try:
        reader = ipc.open_file(source)
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
    finally:
        source.close()


def _features_view(batch: pa.RecordBatch, shape: tuple[int, ...]) -> np.ndarray:
    """[rows, *shape] numpy view of the mapped features: zero-copy, so nothing is decoded or read until used."""
    return batch.column("features").flatten().to_numpy(zero_copy_only=True).reshape(-1, *shape)


class ShardDataset(Dataset):
    """One split of a prepared data set: {input key: the sample, "labels": class id (LongTensor scalar) or
    multi-hot FloatTensor [num_classes]}. The input is float32 normalized (AST features [T, F] as
    `input_values`, images as `pixel_values`) or int64 token ids (`input_ids`), as the manifest says.

    Each Parquet shard is converted once to an Arrow file under `<root>/.arrow-cache/` and memory-mapped;
    an item is a copy of one mapped row, so epochs decode nothing and the set need not fit in RAM.
    """

    def __init__(self, root: str | Path, split: str, *, normalize: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.root / MANIFEST} has no split {split!r}; known splits: {sorted(splits)}")
        self.input_key, self._shape = input_spec(self.manifest)
        self.tokens = self.manifest["features"]["dtype"] == "int32"
        norm = self.manifest["normalization"]
        if normalize and norm.get("kind") != "none":
            self._shift, self._scale = float(norm["mean"]), 2.0 * float(norm["std"])
        else:
            self._shift, self._scale = 0.0, 1.0
        self._caches = [self._cached(shard) for shard in splits[split]["shards"]]
        batches = [batch for path in self._caches for batch in _map(path)]
        self._load_targets(batches)
        self._starts = np.cumsum([0] + [batch.num_rows for batch in batches])
        self._views: list[np.ndarray] | None = [_features_view(b, self._shape) for b in batches]
        if len(self) != splits[split]["rows"]:
            expected = splits[split]["rows"]
            raise ValueError(f"{self.root / MANIFEST} says split {split!r} has {expected} rows, its shards hold {len(self)}")

    def _cached(self, shard: str) -> Path:
        """Check one shard against the manifest and return its Arrow cache, converting it if stale or missing."""
        source = self.root / shard
        if not source.is_file():
            raise FileNotFoundError(f"shard {source} listed in {self.root / MANIFEST} is missing")
        _check_schema(source, pq.read_schema(source), _expected_fields(self.manifest))
        target = _cache_path(self.root, shard, source)
        if not target.is_file():
            row_bytes = int(np.prod(self._shape)) * DTYPES[self.manifest["features"]["dtype"]].byte_width
            _convert(source, target, [_label_column(self.task), "features"], row_bytes)
        return target

    def _load_targets(self, batches: list[pa.RecordBatch]) -> None:
        """Labels are small: keep them in RAM (class ids, or CSR offsets + ids for multi-label) and check them."""
        columns = [batch.column(_label_column(self.task)) for batch in batches]
        empty = [np.zeros(0, np.int64)]
        if self.task == "single_label":
            self._label_ids = np.concatenate(empty + [np.asarray(c) for c in columns]).astype(np.int64)
            lengths = np.ones(len(self._label_ids), np.int64)
        else:
            self._label_ids = np.concatenate(empty + [np.asarray(c.flatten()) for c in columns]).astype(np.int64)
            lengths = np.concatenate(empty + [np.asarray(c.value_lengths()) for c in columns])
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        bad = (self._label_ids < 0) | (self._label_ids >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"split {self.split!r} of {self.root} has class id {self._label_ids[bad][0]} outside the "
                f"{self.num_classes} labels of {MANIFEST}"
            )

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def labels(self) -> list[str]:
        """Class names; the index is the class id."""
        return list(self.manifest["labels"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["labels"])

    def class_counts(self) -> np.ndarray:
        """Samples per class (multi-label: samples in which the class is present)."""
        return np.bincount(self._label_ids, minlength=self.num_classes)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = self._mapped()[chunk][index - self._starts[chunk]]
        if self.tokens:
            return {self.input_key: torch.from_numpy(row.astype(np.int64)), "labels": self._target(index)}
        values = row.astype(np.float32)
        values -= self._shift
        values /= self._scale
        return {self.input_key: torch.from_numpy(values), "labels": self._target(index)}

    def _target(self, index: int) -> torch.Tensor:
        ids = self._label_ids[self._offsets[index] : self._offsets[index + 1]]
        if self.task == "single_label":
            return torch.tensor(ids[0], dtype=torch.long)
        target = torch.zeros(self.num_classes)
        target[torch.from_numpy(ids)] = 1.0
        return target

    def _mapped(self) -> list[np.ndarray]:
        """The feature views, re-mapped after unpickling (in a spawned DataLoader worker)."""
        if self._views is None:
            self._views = [_features_view(batch, self._shape) for path in self._caches for batch in _map(path)]
        return self._views

    def __getstate__(self) -> dict:
        # Pickling a view would copy the whole mapped set into the message; workers map the files themselves.
        return {**self.__dict__, "_views": None}


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are drawn; augmentation and balanced/shuffled sampling apply only to training loaders."""

    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 0
    balanced: bool = False
    spec_augment: bool = False
    freq_mask: int = 48
    time_mask: int = 48
    num_masks: int = 1
    mixup: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_masks"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"LoaderConfig.eval_batch_size must be >= 1 or None, got {self.eval_batch_size}")
        for name in ("num_workers", "freq_mask", "time_mask", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"LoaderConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.mixup >= 0:
            raise ValueError(f"LoaderConfig.mixup (the Beta alpha; 0 = off) must be >= 0, got {self.mixup}")


class TrainCollate:
    """Stack samples, then mixup and SpecAugment on the whole batch.

    Batch-level because mixup pairs samples within the batch, and vectorised masking is cheaper once
    per batch; being a collate keeps `ShardDataset` augmentation-free (the same set serves evaluation)
    and runs in the DataLoader workers when there are any. Randomness is a numpy Generator seeded from
    `seed` in the main process, or from the worker's seed (drawn from the loader's seeded generator,
    new each epoch), so a run is reproducible for a seed.
    """

    def __init__(self, config: LoaderConfig, task: str, num_classes: int, input_key: str = "input_values") -> None:
        self.config = config
        self.task = task
        self.num_classes = num_classes
        self.input_key = input_key
        self._rng: np.random.Generator | None = None
        self._rng_seed: int | None = None

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        rng = self._generator()
        if self.config.mixup > 0:
            batch = self._mixup(batch, rng)
        if self.config.spec_augment:
            batch[self.input_key] = self._spec_augment(batch[self.input_key], rng)
        return batch

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        seed = self.config.seed if info is None else info.seed
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def _mixup(self, batch: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """x = lam*x + (1-lam)*x[perm] with lam ~ Beta(alpha, alpha) per batch; targets mixed the same way
        (single-label targets become soft [B, C] rows summing to 1 -- train with `soft_target_loss`)."""
        lam = float(rng.beta(self.config.mixup, self.config.mixup))
        perm = torch.from_numpy(rng.permutation(len(batch["labels"])))
        targets = batch["labels"]
        if self.task == "single_label":
            targets = nn.functional.one_hot(targets, self.num_classes).float()
        values = batch[self.input_key]
        return {
            self.input_key: lam * values + (1 - lam) * values[perm],
            "labels": lam * targets + (1 - lam) * targets[perm],
        }

    def _spec_augment(self, values: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """SpecAugment on normalized [B, T, F]: per sample, `num_masks` time and frequency bands of width
        U[0, max] set to 0 (the normalized mean), as torchaudio's Time/FrequencyMasking with iid masks."""
        size, time, mel = values.shape
        frames = _bands(rng, size, time, self.config.time_mask, self.config.num_masks)
        bins = _bands(rng, size, mel, self.config.freq_mask, self.config.num_masks)
        return values.masked_fill(frames[:, :, None] | bins[:, None, :], 0.0)


def _bands(rng: np.random.Generator, size: int, length: int, width: int, count: int) -> torch.Tensor:
    """[size, length] bool: `count` random bands per row, each of width U[0, width] (capped at `length`)."""
    widths = rng.integers(0, min(width, length) + 1, size=(size, count))
    starts = rng.integers(0, length - widths + 1)
    positions = np.arange(length)
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return torch.from_numpy(inside.any(axis=1))


def _balanced_weights(dataset: ShardDataset) -> torch.Tensor:
    """Per-sample weights 1/count(class); multi-label sums 1/count over a sample's labels (the AST
    AudioSet recipe), so rare classes are drawn about as often as common ones."""
    inverse = 1.0 / np.maximum(dataset.class_counts(), 1)
    lengths = np.diff(dataset._offsets)
    rows = np.repeat(np.arange(len(dataset)), lengths)
    weights = np.bincount(rows, weights=inverse[dataset._label_ids], minlength=len(dataset))
    if not weights.any():
        raise ValueError(f"balanced sampling needs labelled rows; split {dataset.split!r} of {dataset.root} has none")
    return torch.from_numpy(weights)


def make_loader(root: str | Path, split: str, config: LoaderConfig, *, train: bool) -> DataLoader:
    """A DataLoader over one split. train=True: shuffled (or class-balanced) with augmentation, both seeded
    by `config.seed`; train=False: shard order, no augmentation, `eval_batch_size`."""
    dataset = ShardDataset(root, split)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {root} has no rows to load")
    if not train:
        return DataLoader(
            dataset, batch_size=config.eval_batch_size or config.batch_size, sampler=SequentialSampler(dataset),
            num_workers=config.num_workers,
        )
    _check_augmentation(config, dataset)
    generator = torch.Generator().manual_seed(config.seed)
    if config.balanced:
        sampler = WeightedRandomSampler(_balanced_weights(dataset), len(dataset), replacement=True, generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
        collate_fn=TrainCollate(config, dataset.task, dataset.num_classes, dataset.input_key), generator=generator,
    )


def _check_augmentation(config: LoaderConfig, dataset: ShardDataset) -> None:
    """SpecAugment masks spectrogram bands and mixup blends inputs: refuse them where that means nothing."""
    where = f"{Path(dataset.root) / MANIFEST} ({dataset.input_key})"
    if config.spec_augment and dataset.input_key != "input_values":
        raise ValueError(f"loader.spec_augment applies to spectrograms (input_values), not to {where}; turn it off")
    if config.mixup > 0 and dataset.tokens:
        raise ValueError(f"loader.mixup cannot blend token ids of {where}; set it to 0")


def soft_target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Loss from the model's logits on the batch's inputs that takes mixup's soft targets (a `LossFn`).

    transformers' own loss cannot: with problem_type 'single_label_classification' it flattens [B, C]
    targets into a shape error, and with problem_type unset it silently switches the model to BCE (and
    sets problem_type to multi-label for good). Here: class ids -> cross entropy; float [B, C] targets ->
    cross entropy with probabilities (single-label) or BCE with logits (multi-label), told apart by
    `model.config.problem_type`, which must then be set.
    """
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    labels = batch["labels"].to(logits.device)
    if not labels.is_floating_point():
        return nn.functional.cross_entropy(logits, labels)
    problem = getattr(model.config, "problem_type", None)
    if problem == "single_label_classification":
        return nn.functional.cross_entropy(logits, labels.to(logits.dtype))
    if problem == "multi_label_classification":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(
        "soft_target_loss needs model.config.problem_type set to 'single_label_classification' or "
        f"'multi_label_classification' to tell soft single-label targets from multi-hot ones, got {problem!r}"
    )
