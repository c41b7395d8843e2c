"""Data-prep throughput: `prepare` (in this process, and on Ray with 1 and 2 workers) vs a per-clip
ASTFeatureExtractor loop; the batched fbank alone vs torchaudio's Kaldi fbank per clip; the memory-mapped
shard loader vs features computed on the fly; and `prepare` at scale in a fresh process, start-up included,
with the peak memory of its whole process tree.

Sizes: `demo` (64 mel x 100 frames) and `base-sc` (128 x 128) on the synthetic 1 s spoken commands;
`audioset` (128 x 1,024) on 10 s clips made from them (`make_long_clips`): each is ten 1 s clips of one
word end to end (a seeded draw from that word's clips) plus a segment of one of the set's background noise
files (seeded file and offset) 20 dB below the speech, written as 16 kHz PCM_16 WAV in the SpeechCommands
layout (no split lists: the hashing rule splits them).
Scale (`--scale-clips`, 5,000 and 50,000 1 s clips at base-sc size): the smallest set is synthesized, the
larger ones are hard links to it under new names (`make_scale_set`); each run is a fresh `prune-search data
prepare --engine auto` or a fresh extractor-loop script, timed from start to exit, with the peak RSS of its
process tree (Ray's processes included).

    python -m benchmarks.prepare_throughput [--quick]    |    python -m benchmarks.prepare_throughput --from-json FILE
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import soundfile
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from transformers import ASTFeatureExtractor

import data_prep
from benchmarks.common import (RESULTS, ROOT, add_from_json, comma_list, environment, log, markdown_table,
                               paired_median, print_from_json, rotated, write_results)
from data_prep.audio import load_audio
from data_prep.features import AST_STATS, FeatureParams, fbank, normalize
from data_prep.loader import MANIFEST, LoaderConfig, make_loader
from data_prep.fbank import fbank_batch
from data_prep.shards import LOCAL_MAX_CLIPS, PrepareConfig, feature_batch, prepare
from data_prep.sources import BACKGROUND, SPLIT_LISTS, Clip, list_source
from data_prep.synth import SynthConfig, rms, synthesize

SIZES: dict[str, tuple[int, int]] = {"demo": (64, 100), "base-sc": (128, 128), "audioset": (128, 1024)}  # mel, frames
LONG_SIZES = ("audioset",)  # measured on the 10 s clips of `make_long_clips`, the others on the 1 s synthetic clips
LONG_PARTS, LONG_SNR_DB, LONG_SEED = 10, 20.0, 0  # 1 s clips per long clip, its noise level, its draws' seed
SCALE_SIZE = "base-sc"  # the scale part's features: SpeechCommands length
LOOP_SAMPLE = 5000  # the scale part's extractor loop times at most this many clips (every k-th), then extrapolates
RSS_INTERVAL_S = 0.2  # how often the scale part samples its process tree's memory
MEMORY_GROWTH = 1.25  # "bounded": Ray's peak RSS at the largest count within this factor of it at the smallest
SOURCE, TASK = "speechcommands", 35
WORKERS = (1, 2)
LOADER_WORKERS = (0, 2)  # DataLoader workers of the on-the-fly baseline
BATCH = 64
MIN_SAMPLE_S = 1.0  # a loader timing sample runs whole epochs until it lasts this long
QUIET_SHARE, SETTLE_MAX_S = 0.15, 60.0  # before each sample: wait until the CPUs are this idle, at most this long
PACKAGES = ("torch", "torchaudio", "transformers", "ray", "pyarrow", "numpy", "soundfile")  # versions recorded
QUICK = {"clips_per_word": 10, "long_clips_per_word": 3, "scale_clips": "100,300", "rounds": 2,
         "out": Path(tempfile.gettempdir()) / "data_prep-quick.json"}


def load() -> float:
    return os.getloadavg()[0]


def busy_share(interval: float) -> float | None:
    """Share of all cores' time spent busy over `interval` seconds (from /proc/stat); None where there is none."""
    def totals() -> tuple[int, int]:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total, idle = totals()
        time.sleep(interval)
        total_after, idle_after = totals()
    except OSError:
        return None
    return 1.0 - (idle_after - idle) / max(total_after - total, 1)


def settle() -> dict:
    """Flush writes, then wait (at most SETTLE_MAX_S) for near-idle CPUs: the previous variant's leftovers (Ray
    shutting down, write-back) would slow the next one, the multi-threaded extractor loop most of all."""
    os.sync()
    start, share = time.perf_counter(), busy_share(0.5)
    while share is not None and share > QUIET_SHARE and time.perf_counter() - start < SETTLE_MAX_S:
        share = busy_share(0.5)
    return {"settle_s": time.perf_counter() - start, "busy_share_before": share}


def timed(run: Callable[[], dict]) -> dict:
    """`run()`'s result on settled CPUs, with the 1-min load average before and after it."""
    settled = settle()
    before = load()
    result = run()
    return {**result, **settled, "loadavg_1min": {"before": before, "after": load()}}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


# --- the data sets ----------------------------------------------------------------------------------------


def make_long_clips(base: Path, out: Path, clips_per_word: int) -> dict:
    """AudioSet-length clips (LONG_PARTS s) in the SpeechCommands layout, made from the 1 s set `base`: per clip,
    LONG_PARTS clips of one word drawn with a seeded generator (with replacement only where the word has fewer),
    end to end, plus a segment of one of `base`'s background noise files (seeded file and offset) at LONG_SNR_DB,
    clipped to [-1, 1]. `out` is reused when it holds this recipe; returns the recipe (for the settings)."""
    recipe = {"base": str(base), "clips_per_word": clips_per_word, "parts": LONG_PARTS, "snr_db": LONG_SNR_DB,
              "seed": LONG_SEED, "how": f"each clip: {LONG_PARTS} 1 s clips of one word (a seeded draw from that "
              f"word's clips) end to end, plus a segment of one of the set's {BACKGROUND} files (seeded file and "
              f"offset) scaled to {LONG_SNR_DB:g} dB below the speech's RMS, clipped to [-1, 1], 16 kHz PCM_16 WAV; "
              "split by the SpeechCommands hashing rule on its name"}
    record = out / "long.json"
    if record.is_file() and json.loads(record.read_text()) == recipe:
        return recipe
    shutil.rmtree(out, ignore_errors=True)
    listing = list_source(SOURCE, base, TASK)
    by_word: dict[str, list[str]] = {}
    for clip in listing.clips:
        by_word.setdefault(listing.labels[clip.labels[0]], []).append(clip.path)
    noises = [soundfile.read(path, dtype="float32")[0] for path in sorted((base / BACKGROUND).glob("*.wav"))]
    for index, (word, paths) in enumerate(sorted(by_word.items())):
        (out / word).mkdir(parents=True)
        for take in range(clips_per_word):
            rng = np.random.default_rng([LONG_SEED, index, take])
            picks = rng.choice(len(paths), LONG_PARTS, replace=len(paths) < LONG_PARTS)
            speech = np.concatenate([soundfile.read(paths[i], dtype="float32")[0] for i in picks])
            noise = noises[int(rng.integers(len(noises)))]
            if len(noise) < len(speech):
                raise ValueError(f"{base / BACKGROUND}: a noise file is shorter than {LONG_PARTS} s; remake the set")
            start = int(rng.integers(0, len(noise) - len(speech) + 1))
            segment = noise[start: start + len(speech)]
            mixed = speech + segment * (rms(speech) / max(rms(segment), 1e-9) / 10 ** (LONG_SNR_DB / 20))
            name = hashlib.sha1(f"{word}/{take}".encode()).hexdigest()[:8]  # the "speaker" the hashing rule splits by
            soundfile.write(out / word / f"{name}_nohash_0.wav", np.clip(mixed, -1.0, 1.0), 16000, subtype="PCM_16")
    record.write_text(json.dumps(recipe))
    return recipe


def make_scale_set(base: Path, out: Path, copies: int) -> Path:
    """`copies` times the set `base` (its word folders and split lists) under new names, as hard links: a big set
    in seconds whose every file decodes as before. Copy k of `word/x.wav` is `word/ck-x.wav`, so a clip's copies
    sort a word's worth of clips apart (adjacent repeats would let zstd shrink the shards)."""
    if copies == 1:
        return base
    record = {"base": str(base), "copies": copies}
    marker = out / "scale.json"
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return out
    shutil.rmtree(out, ignore_errors=True)
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        (out / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir()):
            for k in range(copies):
                os.link(path, out / folder.name / f"c{k}-{path.name}")
    for name in SPLIT_LISTS.values():
        if (base / name).is_file():
            listed = [Path(line) for line in (base / name).read_text().split()]
            (out / name).write_text("".join(f"{p.parent}/c{k}-{p.name}\n" for p in listed for k in range(copies)))
    marker.write_text(json.dumps(record))
    return out


# --- prepare vs the extractor loop ------------------------------------------------------------------------


def extractor_loop(clips: list[Clip], size: tuple[int, int], threads: int) -> dict:
    """What a user without `prepare` runs: per file, soundfile.read then ASTFeatureExtractor (no writing)."""
    mel, frames = size
    mean, std = AST_STATS["speechcommands"]
    extractor = ASTFeatureExtractor(num_mel_bins=mel, max_length=frames, sampling_rate=16000, do_normalize=True,
                                    mean=mean, std=std)
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        for clip in clips:
            audio, rate = soundfile.read(clip.path, dtype="float32")
            extractor(audio, sampling_rate=rate, return_tensors="pt")
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(default)
    return {"seconds": seconds, "clips_per_s": len(clips) / seconds}


def _warm_worker() -> dict:
    """Runs in a Ray worker: the imports a shard task needs, and the threads torch gets there."""
    import data_prep.shards

    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
            "data_prep": str(Path(data_prep.shards.__file__).parent)}


def start_ray(workers: int) -> dict:
    """A local Ray as `prepare` starts it, then what its first run would pay once: the workers' imports (a task
    per worker; Ray keeps the processes for the shard tasks) and Ray Data's actors (a trivial pipeline)."""
    import ray

    marks = [time.perf_counter()]
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    marks.append(time.perf_counter())
    seen = ray.get([ray.remote(num_cpus=1)(_warm_worker).remote() for _ in range(workers)])
    marks.append(time.perf_counter())
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(workers, override_num_blocks=workers).map(lambda row: row, num_cpus=1).take_all()
    marks.append(time.perf_counter())
    parts = ("ray_init_s", "worker_import_s", "ray_data_start_s")
    return {**{part: b - a for part, a, b in zip(parts, marks, marks[1:])}, "workers_seen": seen}


def ray_prepare(source: Path, out: Path, size: tuple[int, int], workers: int, clips: int) -> dict:
    """`prepare` into an empty `out` with Ray already up (`start_ray`, timed apart), then Ray shut down."""
    import ray

    shutil.rmtree(out, ignore_errors=True)
    try:
        started = start_ray(workers)
        config = PrepareConfig(source=SOURCE, input=source, out=out, task=TASK, engine="ray",
                               features=FeatureParams(num_mel_bins=size[0], max_length=size[1]), workers=workers)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # its summary; stdout is for the table
            manifest = prepare(config)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    start_s = sum(started[part] for part in ("ray_init_s", "worker_import_s", "ray_data_start_s"))
    return {**started, "seconds": seconds, "ray_start_s": start_s, "clips_per_s": clips / seconds,
            "end_to_end_clips_per_s": clips / (seconds + start_s), "stage_seconds": manifest["stage_seconds"]}


def local_prepare(source: Path, out: Path, size: tuple[int, int], clips: int) -> dict:
    """`prepare` into an empty `out` in this process (`engine: local`, no Ray to start): end to end."""
    shutil.rmtree(out, ignore_errors=True)
    config = PrepareConfig(source=SOURCE, input=source, out=out, task=TASK, engine="local",
                           features=FeatureParams(num_mel_bins=size[0], max_length=size[1]))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        manifest = prepare(config)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "clips_per_s": clips / seconds, "stage_seconds": manifest["stage_seconds"]}


def bench_fbank(size: tuple[int, int], source: Path, rounds: int, clips: int = 512) -> dict:
    """The features alone, on `clips` decoded clips: torchaudio's Kaldi fbank per clip vs `fbank_batch` in
    `prepare`'s batches, one thread each (as in a Ray task), interleaved."""
    params = FeatureParams(num_mel_bins=size[0], max_length=size[1])
    listed = sorted(list_source(SOURCE, source, TASK).clips, key=lambda c: c.path)[:clips]
    audio = [load_audio(clip.path, params.sample_rate) for clip in listed]
    batch = feature_batch(params)
    runs = {
        "kaldi.fbank per clip": lambda: [fbank(waveform, params) for waveform in audio],
        f"fbank_batch x{batch}": lambda: [fbank_batch(audio[i: i + batch], params) for i in range(0, len(audio), batch)],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):
            for name in rotated(list(runs), r):
                start = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    reference = "kaldi.fbank per clip"
    return {"clips": len(audio), "threads": 1, "variants": {
        name: {"clips_per_s": summary([len(audio) / s for s in values]),
               "speedup": paired_median(seconds[reference], values)} for name, values in seconds.items()}}


def bench_prepare(size: tuple[int, int], source: Path, out: Path, rounds: int) -> dict:
    """Interleaved rounds of the extractor loop (default and 1 torch thread) and `prepare` at each worker count;
    speedups are against the faster extractor loop."""
    clips = sorted(list_source(SOURCE, source, TASK).clips, key=lambda c: c.path)
    threads = torch.get_num_threads()
    runs: dict[str, Callable[[], dict]] = {f"extractor-{threads}t": lambda: extractor_loop(clips, size, threads)}
    if threads != 1:
        runs["extractor-1t"] = lambda: extractor_loop(clips, size, 1)
    runs["prepare-local"] = lambda: local_prepare(source, out, size, len(clips))
    for workers in WORKERS:
        runs[f"prepare-w{workers}"] = lambda workers=workers: ray_prepare(source, out, size, workers, len(clips))
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in rotated(list(runs), r):
            samples[name].append(timed(runs[name]))
            log(f"  prepare {size} round {r + 1}/{rounds} {name}: {samples[name][-1]['clips_per_s']:.0f} clips/s")
    seconds = {name: [s["seconds"] for s in runs_] for name, runs_ in samples.items()}
    baseline = min((name for name in runs if name.startswith("extractor")), key=lambda n: statistics.median(seconds[n]))
    variants = {}
    for name, runs_ in samples.items():
        variants[name] = {"clips_per_s": summary([s["clips_per_s"] for s in runs_]), "runs": runs_,
                          "speedup": paired_median(seconds[baseline], seconds[name])}
        if name.startswith("prepare"):  # where the shard tasks' time went, summed over shards (worker seconds)
            variants[name]["stage_seconds"] = {stage: statistics.median(s["stage_seconds"][stage] for s in runs_)
                                               for stage in runs_[0]["stage_seconds"]}
        if name.startswith("prepare-w"):
            variants[name]["end_to_end_clips_per_s"] = summary([s["end_to_end_clips_per_s"] for s in runs_])
            for part in ("ray_start_s", "ray_init_s", "worker_import_s", "ray_data_start_s"):
                variants[name][part] = summary([s[part] for s in runs_])
            end_to_end = [s["seconds"] + s["ray_start_s"] for s in runs_]
            variants[name]["end_to_end_speedup"] = paired_median(seconds[baseline], end_to_end)
    return {"clips": len(clips), "baseline": baseline, "variants": variants}


# --- shard loader vs features on the fly ------------------------------------------------------------------


class OnTheFly(Dataset):
    """The loader without prepared shards: per item, read the WAV, fbank, normalize (the set's own mean/std)."""

    def __init__(self, clips: list[Clip], params: FeatureParams, mean: float, std: float) -> None:
        self.clips, self.params, self.mean, self.std = clips, params, mean, std

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip = self.clips[index]
        features, _ = fbank(load_audio(clip.path, self.params.sample_rate), self.params)
        return {"input_values": normalize(features, self.mean, self.std), "labels": torch.tensor(clip.labels[0])}


def on_the_fly_loader(source: Path, manifest: dict, size: tuple[int, int], workers: int) -> DataLoader:
    clips = [clip for clip in list_source(SOURCE, source, TASK).clips if clip.split == "train"]
    norm = manifest["normalization"]
    dataset = OnTheFly(clips, FeatureParams(num_mel_bins=size[0], max_length=size[1]), norm["mean"], norm["std"])
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)


def time_epochs(loader: DataLoader, rows: int) -> dict:
    """Whole epochs until MIN_SAMPLE_S has passed: samples/s over them."""
    start, epochs = time.perf_counter(), 0
    while epochs == 0 or time.perf_counter() - start < MIN_SAMPLE_S:
        for _ in loader:
            pass
        epochs += 1
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "epochs": epochs, "samples_per_s": rows * epochs / seconds}


def bench_loader(size: tuple[int, int], source: Path, prepared: Path, rounds: int) -> dict:
    """One untimed epoch each (forks the persistent workers), then interleaved rounds."""
    start = time.perf_counter()
    shards = make_loader(prepared, "train", LoaderConfig(batch_size=BATCH), train=True)  # builds the Arrow cache
    open_s = time.perf_counter() - start
    manifest = shards.dataset.manifest
    loaders = {"shards": shards}
    for workers in LOADER_WORKERS:
        loaders[f"on-the-fly-w{workers}"] = on_the_fly_loader(source, manifest, size, workers)
    rows = len(shards.dataset)
    if any(len(loader.dataset) != rows for loader in loaders.values()):
        raise RuntimeError(f"the on-the-fly train split differs from the prepared one ({rows} rows)")
    for loader in loaders.values():
        for _ in loader:
            pass
    samples: dict[str, list[dict]] = {name: [] for name in loaders}
    for r in range(rounds):
        for name in rotated(list(loaders), r):
            samples[name].append(timed(lambda: time_epochs(loaders[name], rows)))
            log(f"  loader {size} round {r + 1}/{rounds} {name}: {samples[name][-1]['samples_per_s']:.0f} samples/s")
    rates = {name: [s["samples_per_s"] for s in runs] for name, runs in samples.items()}
    variants = {name: {"samples_per_s": summary(rates[name]), "runs": runs,
                       "shards_speedup": paired_median(rates["shards"], rates[name])} for name, runs in samples.items()}
    return {"rows": rows, "batch": BATCH, "open_s_with_cache_build": open_s, "dtype": manifest["features"]["dtype"],
            "variants": variants}


# --- scale: fresh processes, start-up included, and their memory --------------------------------------------

# What a user without `prepare` runs, as a fresh script (the imports it needs and no more): list the WAVs, then per
# file soundfile.read and ASTFeatureExtractor. Times the loop over every `every`-th file and prints it as JSON.
LOOP_SCRIPT = """\
import json, sys, time
from pathlib import Path
import soundfile
from transformers import ASTFeatureExtractor
root, mel, frames, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
paths = sorted(p for p in root.glob("*/*.wav") if not p.parent.name.startswith("_"))
extractor = ASTFeatureExtractor(num_mel_bins=mel, max_length=frames, sampling_rate=16000)
start = time.perf_counter()
for path in paths[::every]:
    audio, rate = soundfile.read(path, dtype="float32")
    extractor(audio, sampling_rate=rate, return_tensors="pt")
print(json.dumps({"listed": len(paths), "timed": len(paths[::every]), "loop_s": time.perf_counter() - start}))
"""


def process_tree_rss(root: psutil.Process) -> list[int]:
    """RSS in bytes of `root` and each of its descendants alive now: Ray's GCS, raylet and workers are children of
    the driver that started them, or of its raylet."""
    try:
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    sizes = []
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            sizes.append(member.memory_info().rss)
    return sizes


def run_sampled(command: list[str], log_path: Path) -> dict:
    """Run `command` in a fresh process (RAY_ADDRESS unset: a local run) and time it from start to exit; meanwhile a
    thread samples its process tree every RSS_INTERVAL_S: the peak of the summed RSS (shared pages count once per
    process) and of the largest process. Its stdout comes back; stderr goes to `log_path`."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    peak = {"total": 0, "largest": 0, "processes": 0, "samples": 0}
    finished = threading.Event()

    def sample(root: psutil.Process) -> None:
        while True:
            sizes = process_tree_rss(root)
            if sizes:
                peak["samples"] += 1
                if sum(sizes) > peak["total"]:
                    peak["total"], peak["processes"] = sum(sizes), len(sizes)
                peak["largest"] = max(peak["largest"], max(sizes))
            if finished.wait(RSS_INTERVAL_S):
                return

    with log_path.open("w") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
        sampler = threading.Thread(target=sample, args=(psutil.Process(process.pid),), daemon=True)
        sampler.start()
        stdout, _ = process.communicate()
        seconds = time.perf_counter() - start
        finished.set()
        sampler.join()
    if process.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {process.returncode}; its log {log_path}:\n{tail}")
    return {"seconds": seconds, "peak_rss_total_mb": peak["total"] / 2**20,
            "peak_rss_largest_mb": peak["largest"] / 2**20, "processes_at_peak": peak["processes"],
            "rss_samples": peak["samples"], "stdout": stdout}


def scale_prepare(source: Path, out: Path, clips: int, engine: str) -> dict:
    """`prune-search data prepare` of `source` into an empty `out` (SCALE_SIZE features, default shard size and
    workers) as a fresh process: wall time from start to exit, peak memory, and what its manifest says."""
    shutil.rmtree(out, ignore_errors=True)
    mel, frames = SIZES[SCALE_SIZE]
    command = [sys.executable, "-m", "search.cli", "data", "prepare", "--source", SOURCE, "--input", str(source),
               "--out", str(out), "--task", str(TASK), "--num-mel-bins", str(mel), "--max-length", str(frames),
               "--engine", engine]
    run = run_sampled(command, out.with_name(f"{out.name}-{engine}.log"))
    run.pop("stdout")
    manifest = json.loads((out / MANIFEST).read_text())
    rows = sum(split["rows"] for split in manifest["splits"].values())
    if rows != clips:
        raise RuntimeError(f"prepare of {source} wrote {rows} rows, expected {clips} ({len(manifest['quarantined'])} "
                           f"quarantined; see {out / MANIFEST})")
    return {**run, "clips_per_s": clips / run["seconds"], "engine": manifest["engine"],
            "prepare_s": manifest["seconds"], "stage_seconds": manifest["stage_seconds"],
            "shards": sum(len(split["shards"]) for split in manifest["splits"].values())}


def scale_loop(source: Path, clips: int, log_path: Path) -> dict:
    """LOOP_SCRIPT as a fresh process over every k-th of `source`'s `clips` clips (at most LOOP_SAMPLE timed); its
    seconds for all of them: the run's wall time with the timed loop scaled up per clip to the whole set."""
    every = -(-clips // LOOP_SAMPLE)
    mel, frames = SIZES[SCALE_SIZE]
    run = run_sampled([sys.executable, "-c", LOOP_SCRIPT, str(source), str(mel), str(frames), str(every)], log_path)
    loop = json.loads(run.pop("stdout").splitlines()[-1])
    if loop["listed"] != clips:
        raise RuntimeError(f"the extractor loop listed {loop['listed']} clips in {source}, expected {clips}")
    measured = run["seconds"]
    seconds = measured + loop["loop_s"] * (loop["listed"] / loop["timed"] - 1)
    return {**run, **loop, "every": every, "measured_s": measured, "seconds": seconds, "clips_per_s": clips / seconds}


def bench_scale(base: Path, work: Path, counts: list[int], rounds: int) -> dict:
    """Per count, interleaved rounds of `prepare --engine auto` (and `--engine ray` where auto stays in-process, so
    that one engine is measured at every count) and the extractor loop, each a fresh process, start-up included;
    `base` holds `counts[0]` clips, the larger sets are copies of it."""
    points = []
    out = work / "prepared-scale"
    for count in counts:
        source = make_scale_set(base, work / f"scale-{count}", count // counts[0])
        engines = ("auto", "ray") if count <= LOCAL_MAX_CLIPS else ("auto",)
        runs: dict[str, Callable[[], dict]] = {
            f"prepare-{engine}": lambda engine=engine, source=source, count=count: scale_prepare(source, out, count,
                                                                                                 engine)
            for engine in engines}
        runs["loop"] = lambda source=source, count=count: scale_loop(source, count, work / "scale-loop.log")
        samples: dict[str, list[dict]] = {name: [] for name in runs}
        for r in range(rounds):
            for name in rotated(list(runs), r):
                samples[name].append(timed(runs[name]))
                last = samples[name][-1]
                log(f"  scale {count} round {r + 1}/{rounds} {name}: {last['clips_per_s']:.0f} clips/s, "
                    f"{last['seconds']:.1f} s, peak RSS {last['peak_rss_total_mb']:.0f} MB")
        loop_seconds = [s["seconds"] for s in samples["loop"]]
        variants = {}
        for name, runs_ in samples.items():
            variants[name] = {"seconds": summary([s["seconds"] for s in runs_]),
                              "clips_per_s": summary([s["clips_per_s"] for s in runs_]),
                              "peak_rss_total_mb": max(s["peak_rss_total_mb"] for s in runs_),
                              "peak_rss_largest_mb": max(s["peak_rss_largest_mb"] for s in runs_), "runs": runs_}
            if name != "loop":
                variants[name].update(engine=runs_[0]["engine"], shards=runs_[0]["shards"],
                                      loop_ratio=paired_median(loop_seconds, [s["seconds"] for s in runs_]))
        points.append({"clips": count, "source": str(source), "copies": count // counts[0],
                       "loop_every": samples["loop"][0]["every"], "variants": variants})
    shutil.rmtree(out, ignore_errors=True)
    return {"size": SCALE_SIZE, "mel": SIZES[SCALE_SIZE][0], "frames": SIZES[SCALE_SIZE][1],
            "shard_size": PrepareConfig.__dataclass_fields__["shard_size"].default,
            "workers": PrepareConfig.__dataclass_fields__["workers"].default, "rss_interval_s": RSS_INTERVAL_S,
            "loop_sample": LOOP_SAMPLE, "base": str(base),
            "how": f"the {counts[0]}-clip synthetic set, and for each larger count that many copies of it as hard "
                   "links under new names (split lists copied likewise); prepare: `python -m search.cli data "
                   "prepare --engine auto|ray` in a fresh process, wall time from start to exit; loop: a fresh "
                   f"script (soundfile + ASTFeatureExtractor) timed on every k-th clip (at most {LOOP_SAMPLE}), "
                   "its loop time scaled up per clip to the whole set; peak RSS: the process and all its "
                   f"descendants sampled every {RSS_INTERVAL_S} s",
            "points": points}


# --- report -----------------------------------------------------------------------------------------------


def _workers(variant: str) -> int:
    """The shard tasks a `prepare` variant runs at once: `prepare-wN` N on Ray, `prepare-local` the default count."""
    return PrepareConfig.__dataclass_fields__["workers"].default if variant == "prepare-local" else int(variant[-1])


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets, each as (target, measured, met): 3x the extractor loop with Ray up at SpeechCommands
    length; faster than the loop with start-up counted at each scale count; Ray's peak memory bounded."""
    met = []
    for name, size in results["sizes"].items():
        ray = size["prepare"]["variants"].get("prepare-w2")
        if name not in LONG_SIZES and ray:
            met.append((f"{name}: prepare on Ray, 2 workers, Ray up >= 3x the extractor loop",
                        f"{ray['speedup']:.2f}x", ray["speedup"] >= 3))
    ray_peaks = []
    for point in results["scale"]["points"]:
        auto = point["variants"]["prepare-auto"]
        met.append((f"{point['clips']} clips, engine auto ({auto['engine']}): faster than the loop, start-up counted",
                    f"{auto['loop_ratio']:.2f}x", auto["loop_ratio"] > 1))
        ray_peaks += [(point["clips"], v["peak_rss_total_mb"]) for v in point["variants"].values()
                      if v.get("engine") == "ray"]
    if len({clips for clips, _ in ray_peaks}) > 1:
        (low, low_mb), (high, high_mb) = min(ray_peaks), max(ray_peaks)
        met.append((f"peak RSS on Ray bounded: at {high} clips <= {MEMORY_GROWTH}x that at {low} clips",
                    f"{high_mb:.0f} MB vs {low_mb:.0f} MB ({high_mb / low_mb:.2f}x)",
                    high_mb <= MEMORY_GROWTH * low_mb))
    return met


def scale_markdown(scale: dict) -> list[str]:
    """The scale table: per count, `prepare` and the extractor loop as fresh processes, and their peak memory."""
    rows = []
    for point in scale["points"]:
        loop = point["variants"]["loop"]
        for name, v in point["variants"].items():
            engine = {"loop": "extractor loop", "prepare-auto": f"auto: {v.get('engine')}"}.get(name, v.get("engine"))
            rows.append((point["clips"], engine, f"{v['seconds']['median']:.1f}", f"{v['clips_per_s']['median']:.0f}",
                         f"{loop['clips_per_s']['median']:.0f}",
                         f"{v['loop_ratio']:.2f}x" if "loop_ratio" in v else "",
                         f"{v['peak_rss_total_mb']:.0f} / {v['peak_rss_largest_mb']:.0f}",
                         f"{v['shards']} x <= {scale['shard_size']}" if "shards" in v else ""))
    sampled = [f"{p['clips']} clips: every {p['loop_every']}th clip timed" for p in scale["points"]
               if p["loop_every"] > 1]
    return [*markdown_table(("clips", "engine", "wall s incl. start-up", "clips/s", "loop clips/s", "ratio",
                             "peak RSS total / largest process MB", "shards"), rows),
            "",
            f"{scale['size']} features ({scale['mel']}x{scale['frames']}), {scale['workers']} workers. Each run is a "
            "fresh process timed from start to exit: `python -m search.cli data prepare --engine auto` (what "
            f"`prune-search data prepare` runs; in-process up to {LOCAL_MAX_CLIPS:,} clips, Ray above) or `--engine "
            "ray`, against the extractor loop as a fresh script (soundfile + ASTFeatureExtractor per clip, no writing)"
            + (f"; the loop's time is extrapolated per clip from a sample ({'; '.join(sampled)})" if sampled else "")
            + ". Ratio: the loop's seconds over prepare's, medians of per-round ratios. Sets above "
            f"{scale['points'][0]['clips']:,} clips are hard-linked copies of the synthetic set under new names. Peak "
            "RSS: the process and every descendant (Ray's GCS, raylet and workers) sampled every "
            f"{scale['rss_interval_s']} s, the peak of their sum (pages shared between processes, such as torch's "
            "libraries, count once per process) and of the largest one, the highest over rounds.",
            ""]


def markdown(results: dict) -> str:
    """Tables: prepare vs the extractor loop, the features alone, where prepare's time goes, the shard loader vs
    features on the fly; with a scale part, prepare at scale and the issue's targets, met or missed."""
    env, settings = results["environment"], results["settings"]
    points = [p for size in results["sizes"].values() for p in (size.get("prepare"), size.get("loader")) if p]
    points += results.get("scale", {}).get("points", [])
    highest = max((run["loadavg_1min"]["after"] for p in points for v in p["variants"].values() for run in v["runs"]),
                  default=0.0)
    prepared, loaded, fbanks, stages = [], [], [], []
    for name, size in results["sizes"].items():
        features = f"{name} {size['mel']}x{size['frames']}"
        part = size["prepare"]
        for variant, v in part["variants"].items():
            ray = (f"{v['end_to_end_clips_per_s']['median']:.0f}", f"{v['end_to_end_speedup']:.2f}x",
                   f"{v['ray_start_s']['median']:.1f}") if variant.startswith("prepare-w") else ("", "", "")
            prepared.append((features, part["clips"], variant, f"{v['clips_per_s']['median']:.0f}",
                             f"{v['speedup']:.2f}x", *ray))
        for variant, v in part["variants"].items():
            if "stage_seconds" in v:
                wall = statistics.median(run["seconds"] for run in v["runs"])
                spent = v["stage_seconds"]
                stages.append((features, variant, f"{wall:.1f}", *(f"{spent[s]:.1f}" for s in spent),
                               f"{wall * _workers(variant) - sum(spent.values()):.1f}"))
        part = size.get("fbank")
        if part:
            fbanks += [(features, part["clips"], variant, f"{v['clips_per_s']['median']:.0f}", f"{v['speedup']:.2f}x")
                       for variant, v in part["variants"].items()]
        part = size["loader"]
        loaded += [(features, part["rows"], variant, f"{v['samples_per_s']['median']:.0f}", f"{v['shards_speedup']:.2f}x")
                   for variant, v in part["variants"].items()]
    return "\n".join([
        f"{env['cpu']} ({env['cpu_count']} cores, torch {env['torch']} with {env['torch_threads']} threads, Ray "
        f"{env['ray']}), {env['date'][:10]}; medians of {settings['rounds']} interleaved rounds (speedups: medians "
        f"of per-round ratios), each run started on settled CPUs (<= {QUIET_SHARE:.0%} busy); synthetic 1 s 16 kHz "
        f"WAVs (page-cached); highest 1-min load average {highest:.1f}."
        + (f" {', '.join(n for n in results['sizes'] if n in LONG_SIZES)}: {settings['long_clips']['clips_per_word']} "
           f"clips of {settings['long_clips']['parts']} s per word; {settings['long_clips']['how']}."
           if "long_clips" in settings else ""),
        *(["",
           *markdown_table(("features", "clips", "variant", "clips/s (Ray up)", "speedup", "clips/s incl. Ray start",
                            "speedup", "Ray start s"), prepared),
           "",
           "Speedups against the faster extractor loop (`extractor-Nt`: soundfile.read + ASTFeatureExtractor per clip "
           "in one process with N torch threads, no writing); `prepare` also writes float16 Parquet shards, the "
           "train statistics and the manifest. `prepare-local`: in this process, end to end (what `engine: auto` "
           "picks for at most 5,000 clips); `prepare-wN`: on Ray with N workers. Ray start = `ray.init`, the workers' "
           "imports and Ray Data's actors (once per run of `prepare`).",
           "",
           *(markdown_table(("features", "clips", "features alone, 1 thread", "clips/s", "speedup"), fbanks) + [""]
             if fbanks else []),
           *(markdown_table(("features", "variant", "wall s", "decode s", "features s", "rows s", "write s",
                             "outside the shard tasks s"), stages)
             + ["", "Where `prepare`'s time goes: seconds per stage summed over its shard tasks (worker seconds: "
                "with 2 workers they add up to twice the wall time), medians over rounds; outside = wall x workers "
                "minus the stages (listing, planning, Ray's scheduling, statistics, the manifest and its content "
                "hash)", ""]
             if stages else []),
           *markdown_table(("features", "train rows", "loader", "samples/s", "shard loader speedup"), loaded),
           "",
           f"Batch {BATCH}, shuffled, no augmentation; on-the-fly-wN: a DataLoader with N (persistent) workers "
           "reading each WAV and computing fbank + normalize per item."] if results["sizes"] else []),
        *(["", *scale_markdown(results["scale"]),
           *markdown_table(("target", "measured", "verdict"),
                           [(target, value, "met" if ok else "missed") for target, value, ok in targets(results)])]
          if "scale" in results else []),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--clips-per-word", type=int, default=SynthConfig().clips_per_word,
                        help="synthetic clips per word, 10 words (default: the demo's set, 5,040 clips)")
    parser.add_argument("--long-clips-per-word", type=int, default=50,
                        help=f"{LONG_PARTS} s clips per word for the {', '.join(LONG_SIZES)} size (10 words)")
    parser.add_argument("--scale-clips", default="5000,50000",
                        help="clip counts of the scale part, multiples of the smallest (10 words); '' skips it")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "data_prep_bench",
                        help="scratch folder: the synthetic set (reused) and the prepared shards")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_prep.json", help="JSON results")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['clips_per_word']} clips per word, "
                        f"{QUICK['long_clips_per_word']} long ones, --scale-clips {QUICK['scale_clips']}, "
                        f"{QUICK['rounds']} rounds, --out {QUICK['out']}")
    add_from_json(parser)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    args.sizes = comma_list(str, args.sizes)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size: {', '.join(unknown)}")
    if args.clips_per_word < 1 or args.long_clips_per_word < 1 or args.rounds < 1:
        parser.error("--clips-per-word, --long-clips-per-word and --rounds must be >= 1")
    words = len(SynthConfig().words)
    try:
        args.scale_clips = sorted(comma_list(int, args.scale_clips))
    except ValueError:
        parser.error(f"--scale-clips: comma-separated whole numbers, such as 5000,50000; got {args.scale_clips!r}")
    if args.scale_clips and (args.scale_clips[0] < words or any(n % words for n in args.scale_clips)
                             or any(n % args.scale_clips[0] for n in args.scale_clips)):
        parser.error(f"--scale-clips: counts must be multiples of {words} (the words) and of the smallest count "
                     f"(the larger sets are copies of it), got {args.scale_clips}")
    if not args.sizes and not args.scale_clips:
        parser.error("--sizes and --scale-clips are both empty: nothing to measure")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return print_from_json(args.from_json, markdown)
    start = time.perf_counter()
    source = args.work / f"synth-{args.clips_per_word}"
    made = synthesize(source, SynthConfig(clips_per_word=args.clips_per_word, seed=0), workers=2, progress=False)
    log(f"synthetic set {source}: {sum(made.clips.values())} clips ({'reused' if made.reused else 'made'})")
    settings = {"clips_per_word": args.clips_per_word, "rounds": args.rounds, "source": str(source),
                "min_loader_sample_s": MIN_SAMPLE_S}
    long_source = args.work / f"long-{args.clips_per_word}-{args.long_clips_per_word}"
    if any(name in LONG_SIZES for name in args.sizes):
        made_at = time.perf_counter()
        settings["long_clips"] = make_long_clips(source, long_source, args.long_clips_per_word)
        log(f"{LONG_PARTS} s clips {long_source}: ready in {time.perf_counter() - made_at:.1f} s")
    results = {"environment": {**environment(packages=PACKAGES), "data_prep": str(Path(data_prep.__file__).parent)},
               "settings": settings, "sizes": {}}
    for name in args.sizes:
        size, clips = SIZES[name], long_source if name in LONG_SIZES else source
        prepared = args.work / f"prepared-{name}"
        log(f"{name} {size[0]} mel x {size[1]} frames")
        results["sizes"][name] = {"mel": size[0], "frames": size[1], "source": str(clips),
                                  "fbank": bench_fbank(size, clips, args.rounds),
                                  "prepare": bench_prepare(size, clips, prepared, args.rounds),
                                  "loader": bench_loader(size, clips, prepared, args.rounds)}
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
    if args.scale_clips:
        words = len(SynthConfig().words)
        base = args.work / f"synth-{args.scale_clips[0] // words}"
        synthesize(base, SynthConfig(clips_per_word=args.scale_clips[0] // words, seed=0), workers=2, progress=False)
        log(f"scale {', '.join(map(str, args.scale_clips))} clips from {base}")
        results["scale"] = bench_scale(base, args.work, args.scale_clips, args.rounds)
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
