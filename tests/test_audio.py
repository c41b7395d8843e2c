"""data_prep.audio over a zoo of good, odd and broken files generated here: each is converted or quarantined."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.audio import AUDIO_MAGIC, AUDIO_SUFFIXES, AudioError, load_audio

RATE = 16000


def tone(seconds: float, rate: int, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def write(path: Path, data: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> Path:
    sf.write(path, data, rate, subtype=subtype)
    return path


def reason(path: Path, **kwargs) -> str:
    with pytest.raises(AudioError) as error:
        load_audio(path, **kwargs)
    assert str(path) in str(error.value)  # the sentence names the file
    return error.value.reason


def test_pcm16_at_16k_mono_is_read_as_is(tmp_path):
    path = write(tmp_path / "a.wav", tone(1.0, RATE))
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (RATE,)
    assert np.array_equal(audio, sf.read(path, dtype="float32")[0])


@pytest.mark.parametrize("rate", [44100, 8000, 48000])
def test_other_rates_are_resampled(tmp_path, rate):
    audio = load_audio(write(tmp_path / "a.wav", tone(1.0, rate), rate))
    assert audio.shape == (RATE,)
    assert np.abs(audio - tone(1.0, RATE))[200:-200].max() < 1e-3  # the same 440 Hz tone, edges aside


def test_stereo_is_mixed_down(tmp_path):
    left, right = tone(1.0, RATE), tone(1.0, RATE, hz=1000.0, amplitude=0.25)
    path = write(tmp_path / "a.wav", np.stack([left, right], axis=1))
    stereo = sf.read(path, dtype="float32")[0]
    assert np.allclose(load_audio(path), stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(("suffix", "subtype", "tolerance"), [
    (".wav", "PCM_U8", 1 / 128), (".wav", "PCM_24", 2**-23), (".wav", "PCM_32", 2**-24), (".wav", "FLOAT", 0.0),
    (".flac", "PCM_16", 2**-15), (".flac", "PCM_24", 2**-23),
])
def test_sample_formats_read_as_float_in_unit_range(tmp_path, suffix, subtype, tolerance):
    original = tone(0.5, RATE, amplitude=0.9)
    audio = load_audio(write(tmp_path / f"a{suffix}", original, subtype=subtype))
    assert audio.dtype == np.float32 and audio.shape == original.shape
    assert np.abs(audio - original).max() <= tolerance


def test_samples_past_full_scale_are_divided_by_the_peak(tmp_path):
    original = tone(0.5, RATE, amplitude=0.9)
    audio = load_audio(write(tmp_path / "a.wav", original * 32768, subtype="FLOAT"))  # an int16-scaled float file
    assert np.abs(audio).max() == pytest.approx(1.0)
    assert np.allclose(audio, original / np.abs(original).max(), atol=1e-6)  # shape kept, not clipped
    square = np.sign(tone(1.0, 44100, hz=100.0))  # full scale; resampling overshoots it by ~17%
    assert np.abs(load_audio(write(tmp_path / "square.wav", square, 44100))).max() == pytest.approx(1.0)


def test_silence_is_valid_audio(tmp_path):
    audio = load_audio(write(tmp_path / "a.wav", np.zeros(RATE, np.float32)))
    assert audio.shape == (RATE,) and not audio.any()


def test_long_clips_are_whole_or_cut_to_max_seconds(tmp_path):
    original = (0.1 * np.random.default_rng(0).standard_normal(30 * RATE)).astype(np.float32)
    path = write(tmp_path / "a.wav", original)
    assert load_audio(path).shape == (30 * RATE,)
    cut = load_audio(path, max_seconds=10.0)
    assert np.array_equal(cut, load_audio(path)[: 10 * RATE])


def test_clip_as_short_as_one_window_is_kept_and_shorter_quarantined(tmp_path):
    assert load_audio(write(tmp_path / "window.wav", tone(0.025, RATE))).shape == (400,)
    assert reason(write(tmp_path / "short.wav", tone(0.010, RATE))) == "too_short"
    assert reason(write(tmp_path / "short44.wav", tone(0.010, 44100), 44100)) == "too_short"
    assert reason(write(tmp_path / "one.wav", tone(0.5, RATE)), min_seconds=1.0) == "too_short"


def test_truncated_wav_is_read_up_to_where_the_data_stops(tmp_path):
    original = tone(1.0, RATE)
    path = write(tmp_path / "a.wav", original)
    data = path.read_bytes()
    header = len(data) - 2 * RATE
    kept = 5000
    path.write_bytes(data[: header + 2 * kept + 1])  # cut mid-sample too
    audio = load_audio(path)
    assert audio.shape == (kept,)
    assert np.abs(audio - original[:kept]).max() <= 2**-15


def test_empty_files_are_quarantined(tmp_path):
    (tmp_path / "zero-bytes.wav").write_bytes(b"")
    assert reason(tmp_path / "zero-bytes.wav") == "empty"
    assert reason(write(tmp_path / "zero-frames.wav", np.zeros(0, np.float32))) == "empty"


def test_broken_audio_is_corrupt(tmp_path):
    path = write(tmp_path / "a.wav", tone(1.0, RATE))
    data = path.read_bytes()
    (tmp_path / "header.wav").write_bytes(data[:30])
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + np.random.default_rng(1).bytes(3000))
    flac = write(tmp_path / "a.flac", (0.1 * np.random.default_rng(2).standard_normal(RATE)).astype(np.float32))
    (tmp_path / "cut.flac").write_bytes(flac.read_bytes()[: len(flac.read_bytes()) // 2])
    for name in ("header.wav", "junk.wav", "cut.flac"):
        assert reason(tmp_path / name) == "corrupt", name


def test_non_audio_with_an_audio_name(tmp_path):
    noise = np.random.default_rng(3).bytes(5000)
    assert not noise.startswith(AUDIO_MAGIC)
    (tmp_path / "random.wav").write_bytes(noise)
    (tmp_path / "text.wav").write_text("not a sound\n" * 100)
    (tmp_path / "page.flac").write_text("<html><body>404</body></html>")
    for name in ("random.wav", "text.wav", "page.flac"):
        assert reason(tmp_path / name) == "not_audio", name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_quarantined_not_repaired(tmp_path, bad):
    data = tone(1.0, RATE)
    data[123] = bad
    assert reason(write(tmp_path / "a.wav", data, subtype="FLOAT")) == "non_finite"


def test_missing_paths_and_odd_rates(tmp_path):
    assert reason(tmp_path / "absent.wav") == "missing"
    (tmp_path / "folder.wav").mkdir()
    assert reason(tmp_path / "folder.wav") == "missing"
    assert reason(write(tmp_path / "odd.wav", tone(0.1, 44099), 44099)) == "unsupported_rate"


def test_audio_error_pickles_and_arguments_are_checked(tmp_path):
    error = pickle.loads(pickle.dumps(AudioError("corrupt", "x.wav is broken")))
    assert (error.reason, str(error)) == ("corrupt", "x.wav is broken")
    path = write(tmp_path / "a.wav", tone(1.0, RATE))
    for kwargs, name in (({"sample_rate": 0}, "sample_rate"), ({"min_seconds": -1.0}, "min_seconds"),
                         ({"max_seconds": 0.01}, "max_seconds")):
        with pytest.raises(ValueError, match=name):
            load_audio(path, **kwargs)
    assert all(s.startswith(".") and s == s.lower() for s in AUDIO_SUFFIXES) and {".wav", ".flac"} <= set(AUDIO_SUFFIXES)
