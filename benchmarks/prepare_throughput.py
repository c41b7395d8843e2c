"""Data-prep throughput: `prepare` (in this process, and on Ray with 1 and 2 workers) vs a per-clip
ASTFeatureExtractor loop; the batched fbank alone vs torchaudio's Kaldi fbank per clip; and the memory-mapped
shard loader vs features computed on the fly.

    python -m benchmarks.prepare_throughput [--quick]    |    python -m benchmarks.prepare_throughput --from-json FILE
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import soundfile
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from transformers import ASTFeatureExtractor

import data_prep
from benchmarks.common import (RESULTS, add_from_json, comma_list, environment, log, markdown_table, paired_median,
                               print_from_json, rotated, write_results)
from data_prep.audio import load_audio
from data_prep.features import AST_STATS, FeatureParams, fbank, normalize
from data_prep.loader import LoaderConfig, make_loader
from data_prep.fbank import fbank_batch
from data_prep.shards import FEATURE_BATCH, PrepareConfig, prepare
from data_prep.sources import Clip, list_source
from data_prep.synth import SynthConfig, synthesize

SIZES: dict[str, tuple[int, int]] = {"demo": (64, 100), "base-sc": (128, 128)}  # (mel bins, frames)
SOURCE, TASK = "speechcommands", 35
WORKERS = (1, 2)
LOADER_WORKERS = (0, 2)  # DataLoader workers of the on-the-fly baseline
BATCH = 64
MIN_SAMPLE_S = 1.0  # a loader timing sample runs whole epochs until it lasts this long
QUIET_SHARE, SETTLE_MAX_S = 0.15, 60.0  # before each sample: wait until the CPUs are this idle, at most this long
PACKAGES = ("torch", "torchaudio", "transformers", "ray", "pyarrow", "numpy", "soundfile")  # versions recorded
QUICK = {"clips_per_word": 10, "rounds": 2, "out": Path(tempfile.gettempdir()) / "data_prep-quick.json"}


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
    runs = {
        "kaldi.fbank per clip": lambda: [fbank(waveform, params) for waveform in audio],
        f"fbank_batch x{FEATURE_BATCH}": lambda: [fbank_batch(audio[i: i + FEATURE_BATCH], params)
                                                  for i in range(0, len(audio), FEATURE_BATCH)],
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


# --- report -----------------------------------------------------------------------------------------------


def _workers(variant: str) -> int:
    """The shard tasks a `prepare` variant runs at once: `prepare-wN` N on Ray, `prepare-local` the default count."""
    return PrepareConfig.__dataclass_fields__["workers"].default if variant == "prepare-local" else int(variant[-1])


def markdown(results: dict) -> str:
    """Two tables: prepare vs the extractor loop, then the shard loader vs features on the fly."""
    env, settings = results["environment"], results["settings"]
    points = [p for size in results["sizes"].values() for p in (size.get("prepare"), size.get("loader")) if p]
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
        f"WAVs (page-cached); highest 1-min load average {highest:.1f}.",
        "",
        *markdown_table(("features", "clips", "variant", "clips/s (Ray up)", "speedup", "clips/s incl. Ray start",
                         "speedup", "Ray start s"), prepared),
        "",
        "Speedups against the faster extractor loop (`extractor-Nt`: soundfile.read + ASTFeatureExtractor per clip in "
        "one process with N torch threads, no writing); `prepare` also writes float16 Parquet shards, the "
        "train statistics and the manifest. `prepare-local`: in this process, end to end (what `engine: auto` picks "
        "for at most 5,000 clips); `prepare-wN`: on Ray with N workers. Ray start = `ray.init`, the workers' imports "
        "and Ray Data's actors (once per run of `prepare`).",
        "",
        *(markdown_table(("features", "clips", "features alone, 1 thread", "clips/s", "speedup"), fbanks) + [""]
          if fbanks else []),
        *(markdown_table(("features", "variant", "wall s", "decode s", "features s", "rows s", "write s",
                          "outside the shard tasks s"), stages)
          + ["", "Where `prepare`'s time goes: seconds per stage summed over its shard tasks (worker seconds: with 2 "
             "workers they add up to twice the wall time), medians over rounds; outside = wall x workers minus the "
             "stages (listing, planning, Ray's scheduling, statistics, the manifest and its content hash)", ""]
          if stages else []),
        *markdown_table(("features", "train rows", "loader", "samples/s", "shard loader speedup"), loaded),
        "",
        f"Batch {BATCH}, shuffled, no augmentation; on-the-fly-wN: a DataLoader with N (persistent) workers "
        "reading each WAV and computing fbank + normalize per item.",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--clips-per-word", type=int, default=SynthConfig().clips_per_word,
                        help="synthetic clips per word, 10 words (default: the demo's set, 5,040 clips)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "data_prep_bench",
                        help="scratch folder: the synthetic set (reused) and the prepared shards")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_prep.json", help="JSON results")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['clips_per_word']} clips per word, "
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
    if args.clips_per_word < 1 or args.rounds < 1:
        parser.error("--clips-per-word and --rounds must be >= 1")
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
    results = {"environment": {**environment(packages=PACKAGES), "data_prep": str(Path(data_prep.__file__).parent)},
               "settings": settings, "sizes": {}}
    for name in args.sizes:
        size = SIZES[name]
        prepared = args.work / f"prepared-{name}"
        log(f"{name} {size[0]} mel x {size[1]} frames")
        results["sizes"][name] = {"mel": size[0], "frames": size[1],
                                  "fbank": bench_fbank(size, source, args.rounds),
                                  "prepare": bench_prepare(size, source, prepared, args.rounds),
                                  "loader": bench_loader(size, source, prepared, args.rounds)}
        results["environment"]["wall_s"] = time.perf_counter() - start
        write_results(results, args.out)
    log(f"wrote {args.out} ({results['environment']['wall_s']:.0f} s)")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
