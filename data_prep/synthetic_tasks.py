"""Non-audio synthetic tasks written as prepared data sets, so the search prunes a ViT or a BERT exactly
as it prunes an AST (the paper's open question: does Fisher's advantage transfer?).

Each task is one that only attention can solve: the label is a relation between two marked places.
  relations (ViT, `pixel_values` [3, 16, 16]): noise with a red square A, a blue square B and two green
      distractors at random pixel positions (straddling 4x4 patches); label = where B lies from A.
  markers (BERT, `input_ids` [32]): random tokens with markers A and B; label = order x distance bin.
Splits are drawn from fixed seeds, so a set is the same on every machine.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.loader import DTYPES, MANIFEST
from data_prep.shards import content_hash, shard_schema, write_table

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_COUNTS = {"train": 8000, "validation": 1000, "test": 2000}

IMAGE, MARKER, MARGIN = 16, 3, 2
COLORS = np.array([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]], np.float32)  # A red, B blue, others green
DIRECTIONS = ("right", "left", "below", "above")

LENGTH, VOCAB, CLS, MARKER_A, MARKER_B = 32, 64, 1, 2, 3  # filler tokens are 4..VOCAB-1
DISTANCE_BINS = ((1, 4), (7, 10), (13, LENGTH))  # gaps between bins keep the classes unambiguous


def direction(dy: int, dx: int) -> int | None:
    """Class of B's offset from A, or None when the markers overlap or the dominant axis is ambiguous."""
    if max(abs(dx), abs(dy)) < MARKER or abs(abs(dx) - abs(dy)) < MARGIN:
        return None
    if abs(dx) > abs(dy):
        return 0 if dx > 0 else 1
    return 2 if dy > 0 else 3


def relation_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` noise images [count, 3, 16, 16] with markers A, B and two distractors; label = direction of B from A."""
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed).standard_normal((count, 3, IMAGE, IMAGE), dtype=np.float32) * 0.35
    labels = np.empty(count, np.int64)
    spots = IMAGE - MARKER + 1
    for index in range(count):
        while True:
            (ay, ax), (by, bx) = [(rng.randrange(spots), rng.randrange(spots)) for _ in range(2)]
            label = direction(by - ay, bx - ax)
            if label is not None:
                break
        places = [(ay, ax), (by, bx)]
        while len(places) < 4:  # distractors never cover A or B, so the two markers always read clearly
            y, x = rng.randrange(spots), rng.randrange(spots)
            if all(max(abs(y - py), abs(x - px)) >= MARKER for py, px in places[:2]):
                places.append((y, x))
        for color, (y, x) in zip((0, 1, 2, 2), places):
            pixels[index, :, y:y + MARKER, x:x + MARKER] += COLORS[color][:, None, None]
        labels[index] = label
    return pixels, labels


def distance_bin(distance: int) -> int | None:
    return next((i for i, (low, high) in enumerate(DISTANCE_BINS) if low <= distance <= high), None)


def marker_tokens(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` token sequences [count, 32] with markers A and B; label = order x distance bin of the two."""
    rng = random.Random(seed)
    ids = np.random.default_rng(seed).integers(MARKER_B + 1, VOCAB, (count, LENGTH), dtype=np.int32)
    ids[:, 0] = CLS
    labels = np.empty(count, np.int64)
    for index in range(count):
        while True:
            a, b = rng.sample(range(1, LENGTH), 2)
            distance = distance_bin(abs(a - b))
            if distance is not None:
                break
        ids[index, a], ids[index, b] = MARKER_A, MARKER_B
        labels[index] = (0 if a < b else len(DISTANCE_BINS)) + distance
    return ids, labels


@dataclass(frozen=True)
class SyntheticTask:
    """A task: the model input it fills (key, shape, dtype), its classes, and how to draw `count` samples."""

    input_key: str
    shape: tuple[int, ...]
    dtype: str
    labels: tuple[str, ...]
    make: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    vocab_size: int | None = None


SYNTHETIC_TASKS = {
    "relations": SyntheticTask("pixel_values", (3, IMAGE, IMAGE), "float32", DIRECTIONS, relation_images),
    "markers": SyntheticTask(
        "input_ids", (LENGTH,), "int32",
        tuple(f"{order} {low}-{high}" for order in ("A<B", "B<A") for low, high in DISTANCE_BINS),
        marker_tokens, vocab_size=VOCAB,
    ),
}


def _normalization(task: SyntheticTask, train: np.ndarray) -> dict:
    """Float inputs get the loader's (x - mean) / (2 std) with the train split's stats; token ids none."""
    if task.dtype == "int32":
        return {"kind": "none"}
    return {"kind": "measured", "mean": float(train.mean()), "std": float(train.std())}


def write_synthetic(name: str, out: str | Path, counts: dict[str, int] | None = None) -> dict:
    """Write task `name` as a prepared data set (one Parquet shard per split + manifest.json) in `out`;
    returns the manifest. A folder already holding the same task and counts is kept as it is."""
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    unknown = sorted(set(counts) - set(SPLIT_SEEDS))
    if unknown or any(not isinstance(n, int) or n < 1 for n in counts.values()):
        raise ValueError(f"counts: splits {sorted(SPLIT_SEEDS)} with at least 1 sample each, got {counts}")
    task, out = SYNTHETIC_TASKS[name], Path(out)
    source = f"synthetic-{name}"
    existing = out / MANIFEST
    if existing.is_file():
        manifest = json.loads(existing.read_text())
        if manifest.get("source") == source and {s: v["rows"] for s, v in manifest["splits"].items()} == counts:
            return manifest
    size = int(np.prod(task.shape))
    splits, train = {}, None
    for split, seed in SPLIT_SEEDS.items():
        inputs, labels = task.make(counts[split], seed)
        if split == "train":
            train = inputs
        shard = f"{split}/part-00000.parquet"
        columns = {
            "id": [f"{split}-{i:06d}" for i in range(len(labels))],
            "split": [split] * len(labels),
            "label": labels.astype(np.int32),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(inputs.ravel(), type=DTYPES[task.dtype]), size),
            "frames": np.zeros(len(labels), np.int32),  # audio frames: no meaning here
            "path": [""] * len(labels),
        }
        target = out / shard
        target.parent.mkdir(parents=True, exist_ok=True)
        write_table(pa.Table.from_pydict(columns, schema=shard_schema("single_label", task.dtype, size)), target)
        splits[split] = {"rows": len(labels), "shards": [shard]}
    features = {"input_key": task.input_key, "shape": list(task.shape), "dtype": task.dtype}
    if task.vocab_size is not None:
        features["vocab_size"] = task.vocab_size
    manifest = {
        "source": source,
        "task": "single_label",
        "labels": list(task.labels),
        "features": features,
        "normalization": _normalization(task, train),
        "splits": splits,
        "quarantined": [],
        "notes": [f"drawn with split seeds {SPLIT_SEEDS} by data_prep/synthetic_tasks.py"],
        "content_hash": content_hash(out, splits),
    }
    temporary = existing.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, existing)
    return manifest

