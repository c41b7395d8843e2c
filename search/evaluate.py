"""The Pareto front's models evaluated again on another split (the held-out test split, as a rule).

A search picks its front on its `eval_split`, so the front's metrics carry selection luck; the same
step checkpoints evaluated on data no choice saw do not. Results are cached per search, so a second
report does not evaluate again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.fs
import torch
from ray.tune import Checkpoint, ResultGrid

from data_prep.loader import make_loader, read_manifest
from prune_core import load_pruned
from prune_core.metrics import METRIC_NAME, evaluate
from prune_core.session import STATE_FILE
from search.space import SearchConfig
from search.tracking import run_key
from search.trainable import SEGMENT_FILE


def step_checkpoints(results: ResultGrid) -> dict[tuple[str, int], Checkpoint]:
    """Every step checkpoint of a search on its storage, by (trial segment's run key, step): the report's (trial, step).

    Read from the checkpoint folders themselves (the segment and step files the trainable writes beside the
    model), not from Tune's record of them: a search ended by its step budget stops its trials before Tune
    saves the last checkpoints they reported (seen: a front point's step 3 on disk, not in Tune's state).
    """
    checkpoints = {}
    for result in results:
        if not result.path:
            continue
        fs = result.filesystem
        for entry in fs.get_file_info(pyarrow.fs.FileSelector(result.path)):
            if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
                continue
            try:
                segment = json.loads(_read(fs, f"{entry.path}/{SEGMENT_FILE}"))
                step = int(json.loads(_read(fs, f"{entry.path}/{STATE_FILE}"))["step"])
            except FileNotFoundError:  # a checkpoint being written, or not a step checkpoint
                continue
            checkpoints[run_key(segment["trial_id"], int(segment["segment"])), step] = Checkpoint(entry.path, fs)
    return checkpoints


def _read(fs: pyarrow.fs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def evaluate_rows(
    front: pd.DataFrame, checkpoints: dict[tuple[str, int], Checkpoint], split: str, config: SearchConfig,
    search_id: str, cache: Path,
) -> pd.Series:
    """The metric on `split` of each front row's step checkpoint, indexed by (trial, step) and named by the split.

    Values already in `cache` (a JSON file of this search's evaluations on that split) are not evaluated again.
    """
    manifest = read_manifest(Path(config.data))
    if split not in manifest["splits"]:
        known = ", ".join(manifest["splits"])
        raise ValueError(f"the search's data set {config.data} has no split {split!r} (it has {known})")
    task = manifest["task"]
    done = _read_cache(cache, search_id)
    keys = [(str(trial), int(step)) for trial, step in zip(front["trial"], front["step"])]
    missing = [key for key in keys if str(key[1]) not in done.get(key[0], {})]
    if missing:
        batches = make_loader(config.data, split, config.loader, train=False)
        device = "cuda" if config.resources.gpu > 0 and torch.cuda.is_available() else "cpu"
        for trial, step in missing:
            checkpoint = checkpoints.get((trial, step))
            if checkpoint is None:
                raise ValueError(
                    f"no checkpoint of trial {trial} at step {step} is kept under {config.storage}: cannot evaluate it "
                    f"on {split!r} (is `checkpoints_to_keep` set in {config.source}?)"
                )
            with checkpoint.as_directory() as directory:
                model = load_pruned(directory).to(device)
            value = evaluate(model, batches, task)[METRIC_NAME[task]]
            done.setdefault(trial, {})[str(step)] = value
            _write_cache(cache, search_id, done)  # each result kept at once: an interrupted evaluation goes on
    index = pd.MultiIndex.from_tuples(keys, names=["trial", "step"])
    return pd.Series([done[trial][str(step)] for trial, step in keys], index=index, name=split, dtype=float)


def _read_cache(path: Path, search_id: str) -> dict[str, dict[str, float]]:
    """{trial: {step: value}} evaluated before for this search (a new search under the same name starts anew)."""
    if not path.is_file():
        return {}
    cached = json.loads(path.read_text())
    return cached["values"] if cached.get("search_id") == search_id else {}


def _write_cache(path: Path, search_id: str, values: dict[str, dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"search_id": search_id, "values": values}, indent=2))
