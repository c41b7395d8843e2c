"""`prepare` end to end on small folders in the real layouts, on local Ray: labels, splits, bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import soundfile as sf
import torch

from data_prep.audio import load_audio
from data_prep.features import FeatureParams, fbank
from data_prep.loader import ShardDataset
from data_prep.shards import PrepareConfig, prepare
from search.cli import main

FEATURES = FeatureParams(num_mel_bins=32, max_length=50)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, seed: int = 0, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * rate), channels)).astype("float32")
    sf.write(path, noise if channels > 1 else noise[:, 0], rate, subtype="PCM_16")


def speech_commands(root: Path, lists: bool = True) -> Path:
    """Words yes/no/cat, 5 speakers each; speaker 3 in validation, 4 in test; plus a bad-input zoo."""
    val, test = [], []
    for w, word in enumerate(["yes", "no", "cat"]):
        for s in range(5):
            name = f"{s:08x}_nohash_0.wav"
            write_wav(root / word / name, seed=10 * w + s)
            (val if s == 3 else test if s == 4 else []).append(f"{word}/{name}")
    write_wav(root / "yes" / "0000000a_nohash_0.wav", rate=44100, channels=2, seed=99)  # converted
    if lists:
        (root / "validation_list.txt").write_text("\n".join(val) + "\n")
        (root / "testing_list.txt").write_text("\n".join(test) + "\nno/ffffffff_nohash_0.wav\n")
    write_wav(root / "_background_noise_" / "white.wav", seconds=30, seed=5)
    (root / "yes" / "junk_nohash_0.wav").write_text("not audio at all")
    (root / "no" / "empty_nohash_0.wav").write_bytes(b"")
    (root / "cat" / "README.md").write_text("stray")
    return root


def config(root: Path, out: Path, **kwargs) -> PrepareConfig:
    return PrepareConfig(source="speechcommands", input=root, out=out, features=FEATURES, shard_size=4, **kwargs)


def test_speechcommands_12_class(tmp_path):
    manifest = prepare(config(speech_commands(tmp_path / "sc"), tmp_path / "out", task=12))
    assert manifest["labels"][-2:] == ["_silence_", "_unknown_"] and len(manifest["labels"]) == 12
    assert {s: manifest["splits"][s]["rows"] for s in manifest["splits"]} == {"train": 10 + 1, "validation": 3, "test": 3}
    reasons = sorted(entry["reason"] for entry in manifest["quarantined"])
    assert reasons == ["empty", "listed_missing", "not_audio", "stray_file"]
    train = ShardDataset(tmp_path / "out", "train")
    labels = [train.labels[int(train[i]["labels"])] for i in range(len(train))]
    assert labels.count("_unknown_") == 3 and labels.count("_silence_") == 1 and labels.count("yes") == 4
    table = pq.read_table(tmp_path / "out" / manifest["splits"]["train"]["shards"][0])
    assert table.schema.field("features").type.list_size == 32 * 50
    # no dictionary on the features (it doubled the write and tripled the read time), zstd on every column
    columns = pq.ParquetFile(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]).metadata.row_group(0)
    chunks = {columns.column(i).path_in_schema: columns.column(i) for i in range(columns.num_columns)}
    assert not chunks["features.list.element"].has_dictionary_page and chunks["id"].has_dictionary_page
    assert {chunk.compression for chunk in chunks.values()} == {"ZSTD"}
    assert (manifest["features"]["input_key"], manifest["features"]["shape"]) == ("input_values", [50, 32])
    assert train.input_key == "input_values" and train[0]["input_values"].shape == (50, 32)


def test_features_are_the_ast_front_end_of_the_file(tmp_path):
    root = speech_commands(tmp_path / "sc")
    manifest = prepare(config(root, tmp_path / "out", dtype="float32"))
    table = pq.read_table(tmp_path / "out" / "validation" / "part-00000.parquet").to_pylist()
    row = table[0]
    expected, frames = fbank(load_audio(row["path"]), FEATURES)
    assert row["frames"] == frames
    np.testing.assert_allclose(np.array(row["features"]).reshape(50, 32), expected.numpy(), atol=1e-5)
    dataset = ShardDataset(tmp_path / "out", "validation")
    mean, std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
    torch.testing.assert_close(dataset[0]["input_values"], (expected - mean) / (2 * std), atol=1e-4, rtol=0)


def test_missing_split_lists_use_the_hashing_rule(tmp_path):
    manifest = prepare(config(speech_commands(tmp_path / "sc", lists=False), tmp_path / "out"))
    assert any("hashing rule" in note for note in manifest["notes"])
    speakers = {
        split: {Path(r["path"]).name.split("_")[0] for shard in info["shards"] for r in pq.read_table(tmp_path / "out" / shard).to_pylist()}
        for split, info in manifest["splits"].items()
    }
    assert not (speakers["train"] & speakers["validation"]) and not (speakers["train"] & speakers["test"])
    assert sum(manifest["splits"][s]["rows"] for s in manifest["splits"]) == 16


def test_rerun_skips_finished_shards(tmp_path):
    settings = config(speech_commands(tmp_path / "sc"), tmp_path / "out")
    first = prepare(settings)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("part-*.parquet")}
    second = prepare(settings)
    assert second["content_hash"] == first["content_hash"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # where the time went: the first run computed every shard, the second none
    assert set(first["stage_seconds"]) == {"decode", "features", "rows", "write"}
    assert min(first["stage_seconds"].values()) > 0 and first["engine"] == "local"
    assert second["engine"] is None and set(second["stage_seconds"].values()) == {0}


def test_shards_are_the_same_bytes_on_ray_and_in_process_for_any_worker_count(tmp_path, capsys):
    """The feature batches follow the shard's clips, not the machine: same content hash every way; the run
    says which path it took. Quarantined files (the fixture has some) shift batches the same way everywhere."""
    root = speech_commands(tmp_path / "sc")
    hashes = {}
    for engine, workers in (("local", 1), ("ray", 1), ("ray", 2)):
        manifest = prepare(config(root, tmp_path / f"out-{engine}-{workers}", engine=engine, workers=workers))
        assert manifest["engine"] == engine and manifest["quarantined"]
        hashes[engine, workers] = manifest["content_hash"]
    assert len(set(hashes.values())) == 1, hashes
    err = capsys.readouterr().err
    assert "in this process" in err and "on Ray (2 workers)" in err
    assert prepare(config(root, tmp_path / "out-auto"))["engine"] == "local", "a small job skips Ray"


def test_resume_after_a_killed_run(tmp_path):
    root = speech_commands(tmp_path / "sc")
    for k in range(100):  # enough shards that the run is still going when it is killed
        write_wav(root / "cat" / f"{k + 100:08x}_nohash_1.wav", seed=1000 + k)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "search.cli", "data", "prepare", "--source", "speechcommands", "--input", str(root),
               "--out", str(out), "--max-length", "50", "--num-mel-bins", "32", "--shard-size", "2", "--workers", "1",
               "--engine", "ray"]  # on Ray (in this process the job can end before it is killed); resumed in this process
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("train/part-*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(out.glob("train/part-*.json")))
    assert 2 <= done_before and not (out / "manifest.json").exists(), "the run should have been killed half way"
    manifest = prepare(PrepareConfig(source="speechcommands", input=root, out=out, features=FEATURES, shard_size=2, workers=1))
    ids = [r["id"] for s in manifest["splits"] for shard in manifest["splits"][s]["shards"]
           for r in pq.read_table(out / shard, columns=["id"]).to_pylist()]
    assert len(ids) == len(set(ids)) == 15 + 1 + 100  # 3 words x 5 speakers, the 44.1 kHz clip, 100 more
    assert not list(out.rglob(".part-*.tmp-*"))


def test_strict_fails_after_the_summary(tmp_path, capsys):
    root = speech_commands(tmp_path / "sc")
    code = main(["data", "prepare", "--source", "speechcommands", "--input", str(root), "--out", str(tmp_path / "out"),
                 "--max-length", "50", "--num-mel-bins", "32", "--strict"])
    assert code == 1
    captured = capsys.readouterr()
    assert "quarantined 4 files" in captured.out and "--strict" in captured.err
    assert (tmp_path / "out" / "manifest.json").is_file(), "the work done is kept"


def audioset(root: Path) -> Path:
    (root / "audio").mkdir(parents=True)
    (root / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/0jbk,"Animal"\n'
    )
    header = "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=4\n# YTID, start_seconds, end_seconds, positive_labels\n"
    rows = ['--aaaaaaaaa, 30.000, 40.000, "/m/09x0r,/m/04rlf"', "--bbbbbbbbb, 0.000, 10.000, \"/m/0jbk\"",
            '--ccccccccc, 0.000, 10.000, "/m/zzzz"', '--ddddddddd, 0.000, 10.000, "/m/0jbk"']
    (root / "balanced_train_segments.csv").write_text(header + "\n".join(rows) + "\n")
    (root / "eval_segments.csv").write_text(header + '--eeeeeeeee, 0.000, 10.000, "/m/04rlf,/m/0jbk"\n')
    for ytid in ("--aaaaaaaaa", "--bbbbbbbbb", "--ccccccccc", "--eeeeeeeee"):
        write_wav(root / "audio" / f"Y{ytid}.wav" if ytid == "--bbbbbbbbb" else root / "audio" / f"{ytid}.wav", seconds=2)
    return root


def test_audioset_multi_label(tmp_path):
    manifest = prepare(
        PrepareConfig(source="audioset", input=audioset(tmp_path / "as"), out=tmp_path / "out", features=FEATURES,
                      normalization="ast_audioset")
    )
    assert manifest["task"] == "multi_label" and manifest["labels"] == ["Speech", "Music", "Animal"]
    assert manifest["normalization"] == {"kind": "ast_audioset", "mean": -4.2677393, "std": 4.5689974}
    assert sorted(e["reason"] for e in manifest["quarantined"]) == ["missing_audio", "unknown_label"]
    rows = sum(manifest["splits"][s]["rows"] for s in ("train", "validation"))
    assert rows == 2 and manifest["splits"]["test"]["rows"] == 1
    test = ShardDataset(tmp_path / "out", "test")
    assert test[0]["labels"].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("rate", [16000, 44100])
def test_a_segment_of_a_long_file_reads_only_what_its_frames_need(tmp_path, monkeypatch, rate):
    """A one-second segment 40 s into a 60 s file (the silence class's noise files): the samples `prepare` takes
    equal those of the whole file decoded and cut, also through the resampler (its edge stays in the margin)."""
    import data_prep.audio
    from data_prep.shards import _decoded
    from data_prep.sources import Clip

    read = []
    real_read = data_prep.audio.sf.SoundFile.read
    monkeypatch.setattr(data_prep.audio.sf.SoundFile, "read", lambda self, frames=-1, **kw: read.append(frames) or real_read(self, frames, **kw))

    path = tmp_path / "noise.wav"
    write_wav(path, seconds=60.0, rate=rate, seed=3)
    clip = Clip("noise-40", str(path), "train", (0,), start=40.0, end=41.0)
    whole = load_audio(path)[40 * 16000: 41 * 16000]
    read.clear()
    np.testing.assert_allclose(_decoded(clip, FEATURES).numpy(), whole, atol=1e-6, rtol=0)
    needed = 40.0 + FEATURES.max_length * FEATURES.frame_shift_ms / 1000 + 1.0  # the segment's frames, and a margin
    assert read == [int(np.ceil(needed * rate))], "the whole file was read"
