"""The synthetic spoken-commands set: SpeechCommands layout and format, speaker-disjoint splits,
determinism per seed, real speech in the clips, config errors, and re-runs into the same folder.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from data_prep import synth
from data_prep.sources import BACKGROUND
from data_prep.synth import EspeakError, SynthConfig, synthesize

# 16 speakers, all of them used (a few twice): small, yet every split gets speakers
SMALL = SynthConfig(
    words=("yes", "no", "stop"),
    clips_per_word=20,
    voices=("en", "en-us"),
    variants=("m3", "f2"),
    rates=(150, 200),
    pitches=(40, 60),
)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, synthesize(out, SMALL, progress=False)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.wav"))}


def listed(root: Path, name: str) -> list[str]:
    return (root / name).read_text().split()


def speaker_of(relative: str) -> str:
    return relative.split("/")[1].split("_nohash_")[0]


def test_layout_and_format(small_set):
    root, summary = small_set
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted((*SMALL.words, BACKGROUND))
    for word in SMALL.words:
        files = sorted((root / word).iterdir())
        assert len(files) == SMALL.clips_per_word
        for path in files:
            assert path.suffix == ".wav" and "_nohash_" in path.name
            info = soundfile.info(path)
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
    for name in ("validation_list.txt", "testing_list.txt"):
        assert listed(root, name) and all((root / rel).is_file() for rel in listed(root, name))
    noises = sorted((root / BACKGROUND).glob("*.wav"))
    assert len(noises) == 6
    assert all(soundfile.info(p).samplerate == 16000 and soundfile.info(p).duration >= 10 for p in noises)
    record = json.loads((root / "synth.json").read_text())
    assert record["complete"] and record["config"] == SMALL.to_dict()
    assert sum(summary.clips.values()) == len(SMALL.words) * SMALL.clips_per_word


def test_splits_are_speaker_disjoint(small_set):
    root, summary = small_set
    every = [f"{w}/{p.name}" for w in SMALL.words for p in (root / w).iterdir()]
    validation, test = set(listed(root, "validation_list.txt")), set(listed(root, "testing_list.txt"))
    splits = {"validation": validation, "test": test, "train": set(every) - validation - test}
    speakers = {split: {speaker_of(rel) for rel in files} for split, files in splits.items()}
    assert not validation & test
    assert all(speakers.values()), "each split should have speakers"
    assert not (speakers["train"] & speakers["validation"] or speakers["train"] & speakers["test"]
                or speakers["validation"] & speakers["test"])
    assert sum(len(ids) for ids in speakers.values()) == len({speaker_of(rel) for rel in every}) == 16
    assert summary.clips == {split: len(files) for split, files in splits.items()}
    assert summary.speakers == {split: len(ids) for split, ids in speakers.items()}


def test_deterministic_for_a_seed(small_set, tmp_path):
    root, _ = small_set
    again = synthesize(tmp_path / "again", SMALL, workers=2, progress=False)
    assert digest(again.out_dir) == digest(root)
    assert listed(again.out_dir, "testing_list.txt") == listed(root, "testing_list.txt")
    other = synthesize(tmp_path / "other", SynthConfig(**{**vars(SMALL), "seed": 1}), progress=False)
    base, different = digest(root), digest(other.out_dir)
    assert all(different[name] != base[name] for name in different.keys() & base.keys())


def test_clips_hold_speech(small_set):
    root, _ = small_set
    for path in sorted(root.glob("*/*.wav")):
        audio, _ = soundfile.read(path)
        assert np.sqrt(np.mean(audio**2)) > 0.005, f"{path} is nearly silent"


def _speak(word: str) -> np.ndarray:
    library, data = synth.espeak_paths()
    return synth.Espeak(library, data).speak(word, "en-us", "m3", 175, 50)


def high_band_share(audio: np.ndarray, rate: int = synth.ESPEAK_RATE) -> float:
    power = np.abs(np.fft.rfft(audio)) ** 2
    return float(power[np.fft.rfftfreq(len(audio), 1 / rate) > 4000].sum() / power.sum())


def test_words_differ():
    """'yes' ends in a hiss that 'no' lacks. eSpeak runs in a child: its state must not leak into later tests."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        yes, no = pool.map(_speak, ["yes", "no"])
    assert high_band_share(yes) > 5 * high_band_share(no)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"words": ()}, "words"),
        ({"words": ("yes", "yes")}, "words"),
        ({"words": ("Yes", "no")}, "words"),
        ({"words": ("yes", "go/stop")}, "words"),
        ({"clips_per_word": 0}, "clips_per_word"),
        ({"seed": -1}, "seed"),
        ({"sample_rate": 100}, "sample_rate"),
        ({"snr_db": (20.0, 5.0)}, "snr_db"),
        ({"gain_db": (1.0,)}, "gain_db"),
        ({"gain_db": ("loud", 6.0)}, "gain_db"),
        ({"rates": (40,)}, "rates"),
        ({"pitches": (150,)}, "pitches"),
        ({"voices": ("en+m3",)}, "voices"),
    ],
)
def test_bad_config(change, field):
    with pytest.raises(ValueError, match=f"SynthConfig.{field}"):
        SynthConfig(**change)


def test_unknown_voice_or_variant(tmp_path):
    for change, field in (({"voices": ("en-xx",)}, "voices"), ({"variants": ("nobody",)}, "variants")):
        with pytest.raises(ValueError, match=f"SynthConfig.{field}.*nobody|SynthConfig.{field}.*en-xx"):
            synthesize(tmp_path / "out", SynthConfig(**{**vars(SMALL), **change}), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_workers(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        synthesize(tmp_path, SMALL, workers=0)


def test_rerun_reuses_a_complete_folder(small_set):
    root, _ = small_set
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    summary = synthesize(root, SMALL, progress=False)
    assert summary.reused and summary.seconds < 2
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_rerun_finishes_an_interrupted_folder(small_set, tmp_path):
    root, _ = small_set
    out = tmp_path / "set"
    synthesize(out, SMALL, progress=False)
    victim = next((out / "no").iterdir())
    victim.unlink()
    (out / "no" / f".{victim.name}.part").write_bytes(b"truncated")
    summary = synthesize(out, SMALL, progress=False)
    assert not summary.reused and digest(out) == digest(root)
    assert not list(out.rglob("*.part"))


def test_other_config_or_foreign_folder_is_refused(small_set, tmp_path):
    root, _ = small_set
    with pytest.raises(ValueError, match=f"{re.escape(str(root))}.*different config"):
        synthesize(root, SynthConfig(**{**vars(SMALL), "seed": 3}), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))} is not empty"):
        synthesize(tmp_path, SMALL, progress=False)


def test_missing_library_is_a_clear_error(monkeypatch):
    import espeakng_loader

    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: "/nowhere/libespeak-ng.so")
    with pytest.raises(EspeakError, match="/nowhere/libespeak-ng.so.*espeakng-loader"):
        synth.espeak_paths()
