"""`prepare`: audio -> AST fbank features -> Parquet shards per split, in parallel on Ray Data.

Each shard is planned up front from the listing (a fixed set of clips), computed by one Ray task and
written atomically (temp file, then rename) with a sidecar recording its stats and quarantined
files. A re-run skips shards whose sidecar matches, so a killed run resumes without duplicates.

Inside a shard, clips are decoded one after another and their features computed `feature_batch(features)`
at a time (`data_prep.fbank.fbank_batch`). The batches follow the shard's clip order and the feature size,
not the machine, so a shard's bytes are the same for any worker count. A small job on this
machine skips Ray, whose start-up would cost more than the job (`engine`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_prep.audio import AudioError, load_audio
from data_prep.fbank import fbank_batch
from data_prep.features import AST_STATS, FeatureParams, RunningStats, checked_clip
from data_prep.loader import DTYPES, MANIFEST
from data_prep.sources import SPLITS, Clip, Listing, list_source

NORMALIZATIONS = ("measured", "ast_speechcommands", "ast_audioset")
ENGINES = ("auto", "ray", "local")
DEVICES = ("cpu", "cuda")
# Frames per fbank_batch call. Measured on one thread: at 128 frames 16 clips a batch ran 2,726 clips/s, 32 ran
# 2,303; at 1,024 frames (AudioSet) 2 ran 258, 32 ran 151, slower than kaldi.fbank per clip (217): a big batch's
# spectra leave the cache.
FEATURE_FRAMES = 2048


def feature_batch(features: FeatureParams) -> int:
    """Clips per fbank_batch call: fixed by the feature size alone, so a shard's bytes never depend on the machine."""
    return max(1, FEATURE_FRAMES // features.max_length)
LOCAL_MAX_CLIPS = 5000  # `engine: auto` prepares at most this many clips in this process, without Ray
# Parquet settings of a shard: dictionary encoding only for the text columns (on the float16 features it
# doubled the write time and tripled the read time, for a size zstd then beats), zstd compression
DICTIONARY_COLUMNS = ["id", "split", "path"]
COMPRESSION = "zstd"
STAGES = ("decode", "features", "rows", "write")  # a shard task's stages, timed in its sidecar


@dataclass(frozen=True)
class PrepareConfig:
    """What `prune-search data prepare` was asked for; validated here, trusted inside."""

    source: str
    input: Path
    out: Path
    task: int = 35
    features: FeatureParams = field(default_factory=FeatureParams)
    dtype: str = "float16"
    normalization: str = "measured"
    shard_size: int = 512
    workers: int = 2
    strict: bool = False
    engine: str = "auto"  # ray, local (this process), or auto: local for a small job and no RAY_ADDRESS
    device: str = "cpu"  # where the features are computed: cpu or cuda

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu")


@dataclass(frozen=True)
class ShardSpec:
    """One shard to write: its split, index and clips; `key` changes whenever its content would."""

    split: str
    index: int
    clips: tuple[Clip, ...]
    key: str

    @property
    def name(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"


def plan_shards(listing: Listing, config: PrepareConfig) -> list[ShardSpec]:
    """Split each split's clips (sorted by id, so the plan is stable) into shards of `shard_size`."""
    settings = json.dumps({"features": config.features.to_dict(), "dtype": config.dtype, "task": listing.task})
    specs = []
    for split in SPLITS:
        clips = sorted((c for c in listing.clips if c.split == split), key=lambda c: c.id)
        for index, begin in enumerate(range(0, len(clips), config.shard_size)):
            chunk = tuple(clips[begin : begin + config.shard_size])
            digest = hashlib.sha256(settings.encode())
            for clip in chunk:
                digest.update(f"{clip.id}|{clip.path}|{clip.labels}|{clip.start}|{clip.end}\n".encode())
            specs.append(ShardSpec(split, index, chunk, digest.hexdigest()[:16]))
    return specs


def shard_schema(task: str, dtype: str, size: int) -> pa.Schema:
    """The columns of a shard: `size` features per row flattened into a fixed-size list."""
    label = pa.field("label", pa.int32()) if task == "single_label" else pa.field("labels", pa.list_(pa.int32()))
    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("split", pa.string()),
            label,
            pa.field("features", pa.list_(DTYPES[dtype], size)),
            pa.field("frames", pa.int32()),
            pa.field("path", pa.string()),
        ]
    )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_table(table: pa.Table, target: Path) -> None:
    """A shard's Parquet file, written atomically (a temporary file, then renamed), with the shard settings."""
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    pq.write_table(table, temporary, use_dictionary=DICTIONARY_COLUMNS, compression=COMPRESSION)
    os.replace(temporary, target)


def _decoded(clip: Clip, features: FeatureParams) -> torch.Tensor | AudioError:
    """The clip's samples (its segment, cut where frames past max_length would start), checked as the
    features need them; the AudioError to quarantine it with, instead of raising it, so a pool goes on.

    Only the file's first `start + seconds` are read: a one-second segment of a 60-second noise file (the
    silence class) reads about two seconds, not sixty. The one-second margin past the last frame keeps the
    resampler's edge away from every sample used; a float file's peak (its scale) is that of the part read."""
    seconds = features.max_length * features.frame_shift_ms / 1000 + 1.0
    try:
        audio = load_audio(clip.path, features.sample_rate, max_seconds=clip.start + seconds)
        begin = int(clip.start * features.sample_rate)
        end = None if clip.end is None else int(clip.end * features.sample_rate)
        return checked_clip(audio[begin:end][: int(seconds * features.sample_rate)], features)
    except AudioError as error:
        return error


def write_shard(spec: ShardSpec, out: Path, task: str, features: FeatureParams, dtype: str,
                device: str = "cpu") -> dict:
    """Compute one shard's features and write it atomically; returns its sidecar (stats, quarantine, and the
    seconds each stage took: decode, features, rows (statistics and dtype), write)."""
    rows: dict[str, list] = {name: [] for name in ("id", "split", "label", "features", "frames", "path")}
    stats = RunningStats()
    quarantined = []
    seconds = dict.fromkeys(STAGES, 0.0)
    mark = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        seconds[stage] += now - mark
        mark = now

    # one after another: a thread pool of 2-4 made decoding 2.3x slower per clip (0.35-0.39 ms against 0.15 ms on
    # 1 s clips): soundfile's read is a small share, the rest holds the GIL
    decoded = [_decoded(clip, features) for clip in spec.clips]
    lap("decode")
    kept = []
    for clip, audio in zip(spec.clips, decoded):
        if isinstance(audio, AudioError):
            quarantined.append({"path": clip.path, "id": clip.id, "reason": audio.reason, "detail": str(audio)})
        else:
            kept.append((clip, audio))
    batch = feature_batch(features)
    for start in range(0, len(kept), batch):
        group = kept[start: start + batch]
        matrices, counts = fbank_batch([audio for _, audio in group], features, device)
        lap("features")
        for (clip, _), matrix, frames in zip(group, matrices, counts):
            stats.update(matrix[:frames])
            rows["id"].append(clip.id)
            rows["split"].append(spec.split)
            rows["label"].append(clip.labels[0] if task == "single_label" else list(clip.labels))
            rows["features"].append(matrix.numpy().astype(np.float16 if dtype == "float16" else np.float32).ravel())
            rows["frames"].append(frames)
            rows["path"].append(clip.path)
        lap("rows")
    target = out / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if rows["id"]:
        schema = shard_schema(task, dtype, features.max_length * features.num_mel_bins)
        columns = {("label" if task == "single_label" else "labels") if k == "label" else k: v for k, v in rows.items()}
        columns["features"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate(rows["features"]), type=DTYPES[dtype]), features.max_length * features.num_mel_bins
        )
        write_table(pa.Table.from_pydict(columns, schema=schema), target)
    lap("write")
    sidecar = {
        "key": spec.key,
        "shard": spec.name,
        "rows": len(rows["id"]),
        "stats": stats.to_dict(),
        "quarantined": quarantined,
        "seconds": seconds,
    }
    _atomic_write_bytes(target.with_suffix(".json"), json.dumps(sidecar).encode())
    return sidecar


def _finished(spec: ShardSpec, out: Path) -> dict | None:
    """The sidecar of a shard finished with the same content key, if any."""
    sidecar_path = (out / spec.name).with_suffix(".json")
    if not sidecar_path.is_file():
        return None
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("key") != spec.key or (sidecar["rows"] and not (out / spec.name).is_file()):
        return None
    return sidecar


def _run_on_ray(pending: list[ShardSpec], config: PrepareConfig, task: str, on_done) -> None:
    """One Ray Data row per shard: read -> features -> write, `workers` at a time (a cluster when RAY_ADDRESS is set)."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=config.workers, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own bar counts files, Ray's would count shards
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spends Ray's one warning that its bars are off
    specs = {spec.name: spec for spec in pending}
    out, features, dtype, device = config.out, config.features, config.dtype, config.device

    def process(row: dict) -> dict:
        return {"sidecar": json.dumps(write_shard(specs[row["shard"]], out, task, features, dtype, device))}

    dataset = ray.data.from_items([{"shard": name} for name in specs], override_num_blocks=len(specs))
    tasks = ray.data.TaskPoolStrategy(size=config.workers)
    for row in dataset.map(process, compute=tasks, num_cpus=1).iter_rows():
        on_done(json.loads(row["sidecar"]))


def prepare(config: PrepareConfig) -> dict:
    """Prepare a data set folder into Parquet shards and `manifest.json`; returns the manifest."""
    started = time.perf_counter()
    listing = list_source(config.source, config.input, config.task)
    specs = plan_shards(listing, config)
    config.out.mkdir(parents=True, exist_ok=True)
    _remove_stale(config.out, {spec.name for spec in specs})
    done = {spec.name: sidecar for spec in specs if (sidecar := _finished(spec, config.out)) is not None}
    pending = [spec for spec in specs if spec.name not in done]
    total = sum(len(spec.clips) for spec in specs)
    progress = _Progress(total, sum(len(spec.clips) for spec in specs if spec.name in done))
    engine = None
    if pending:
        def on_done(sidecar: dict) -> None:
            done[sidecar["shard"]] = sidecar
            progress.advance(sidecar["rows"] + len(sidecar["quarantined"]))

        engine = _engine(config, sum(len(spec.clips) for spec in pending))
        print(f"prepare: {sum(len(spec.clips) for spec in pending)} clips in {len(pending)} shards, "
              + (f"in this process, {config.workers} shards at a time (a small job: Ray's start-up would cost more)"
                 if engine == "local"
                 else f"on Ray ({config.workers} worker{'s' if config.workers > 1 else ''})") + f", features on {config.device}", file=sys.stderr)
        if engine == "local":  # `workers` shards at once in threads: decoding, torch and Parquet release the GIL
            with ThreadPoolExecutor(config.workers) as pool:
                futures = [pool.submit(write_shard, spec, config.out, listing.task, config.features, config.dtype,
                                       config.device) for spec in pending]
                for future in as_completed(futures):
                    on_done(future.result())
        else:
            _run_on_ray(pending, config, listing.task, on_done)
    progress.close()
    manifest = _manifest(config, listing, specs, done, time.perf_counter() - started)
    manifest["engine"] = engine  # where this run computed its shards (None: all were done before)
    # seconds per stage summed over the shards this run computed (worker seconds, not wall time)
    manifest["stage_seconds"] = {stage: sum(done[spec.name]["seconds"][stage] for spec in pending) for stage in STAGES}
    _atomic_write_bytes(config.out / MANIFEST, json.dumps(manifest, indent=2).encode())
    _print_summary(manifest, config.out)
    return manifest


def _engine(config: PrepareConfig, clips: int) -> str:
    """Where the pending shards run: Ray when asked, when a cluster is (RAY_ADDRESS), or for a big job."""
    if config.engine != "auto":
        return config.engine
    return "local" if clips <= LOCAL_MAX_CLIPS and not os.environ.get("RAY_ADDRESS") else "ray"


def _remove_stale(out: Path, planned: set[str]) -> None:
    """Shards of an earlier, different plan would be mistaken for this one's; temp files of a killed run go too."""
    for split in SPLITS:
        for path in (out / split).glob(".part-*.tmp-*"):
            path.unlink()
        for path in (out / split).glob("part-*"):
            if f"{split}/{path.with_suffix('.parquet').name}" not in planned:
                path.unlink()


def _normalization(config: PrepareConfig, train: RunningStats) -> dict:
    if config.normalization == "measured":
        if train.count == 0:
            raise ValueError("--normalization measured needs training clips, and the train split is empty")
        return {"kind": "measured", "mean": train.mean, "std": train.std}
    mean, std = AST_STATS[config.normalization.removeprefix("ast_")]
    return {"kind": config.normalization, "mean": mean, "std": std}


def content_hash(out: Path, splits: dict) -> str:
    """sha256 over every shard's name and bytes, split by split: what a cached baseline is keyed on."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for name in splits[split]["shards"]:
            digest.update(name.encode())
            digest.update(hashlib.sha256((out / name).read_bytes()).digest())
    return digest.hexdigest()


def _manifest(config: PrepareConfig, listing: Listing, specs: list[ShardSpec], done: dict, seconds: float) -> dict:
    train = RunningStats()
    for spec in specs:
        if spec.split == "train":
            train = train.merge(RunningStats.from_dict(done[spec.name]["stats"]))
    quarantined = list(listing.quarantined) + [q for spec in specs for q in done[spec.name]["quarantined"]]
    splits = {}
    for split in SPLITS:
        names = [spec.name for spec in specs if spec.split == split and done[spec.name]["rows"]]
        splits[split] = {"rows": sum(done[name]["rows"] for name in names), "shards": names}
    return {
        "source": listing.source,
        "task": listing.task,
        "labels": list(listing.labels),
        "features": {
            **config.features.to_dict(),
            "input_key": "input_values",
            "shape": [config.features.max_length, config.features.num_mel_bins],
            "dtype": config.dtype,
        },
        "normalization": _normalization(config, train),
        "splits": splits,
        "quarantined": quarantined,
        "notes": list(listing.notes),
        "input": str(config.input),
        "seconds": round(seconds, 1),
        "content_hash": content_hash(config.out, splits),
    }


class _Progress:
    """Files done: a bar on a terminal (tqdm); elsewhere (a log, CI) a line about every 10% with an ETA."""

    def __init__(self, total: int, already: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=already, unit="file", desc="prepare", file=sys.stderr, disable=None)
        self.total, self.done, self.started_at, self.started = total, already, already, time.perf_counter()
        self.next_line = already + max(1, total // 10)

    def advance(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        if self.bar.disable and self.done >= self.next_line and self.done < self.total:
            rate = (self.done - self.started_at) / max(time.perf_counter() - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"prepare: {self.done}/{self.total} files ({self.done / self.total:.0%}), ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)
            self.next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        self.bar.close()


def _print_summary(manifest: dict, out: Path) -> None:
    counts = ", ".join(f"{split} {info['rows']}" for split, info in manifest["splits"].items())
    print(f"prepared {counts} clips into {out} ({manifest['seconds']} s)")
    quarantined = manifest["quarantined"]
    if quarantined:
        reasons = Counter(entry["reason"] for entry in quarantined)
        print(f"quarantined {len(quarantined)} files: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
        for entry in quarantined[:5]:
            print(f"  {entry['reason']}: {entry['path']}")
        if len(quarantined) > 5:
            print(f"  ... all of them in {out / MANIFEST}")
    for note in manifest["notes"]:
        print(f"note: {note}")
