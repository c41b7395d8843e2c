"""Read one audio file robustly: mono float32 in [-1, 1] at the target rate, or an AudioError whose reason
goes into the manifest's quarantine list (a bad file never stops a run).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional

# What soundfile (libsndfile 1.1+) decodes and we accept; compared with a lower-cased suffix.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
# The first bytes of those containers: a file that starts like audio but does not parse is "corrupt",
# one that does not even start like audio is "not_audio".
AUDIO_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
# torchaudio's sinc resampler builds a kernel of about (rate/g) * (target/g) floats (g their gcd): rates
# past this (in practice broken headers such as 44099 Hz) would take gigabytes, so they are refused.
MAX_RESAMPLE_KERNEL = 1 << 24


class AudioError(Exception):
    """A file (or waveform) to quarantine: `reason` is a short code for the manifest, str() a sentence
    naming the file. Reasons: missing, unreadable, empty, corrupt, not_audio, non_finite, too_short,
    unsupported_rate."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)  # both in args, so it pickles across worker processes
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


def load_audio(
    path: str | Path, sample_rate: int = 16000, min_seconds: float = 0.025, max_seconds: float | None = None
) -> np.ndarray:
    """Mono float32 in [-1, 1] at `sample_rate`, read with soundfile; what cannot be converted raises AudioError.

    Conversions: every PCM width (8-bit unsigned, 16/24/32-bit signed) and float WAV are read as float32 in
    [-1, 1] by soundfile; channels are averaged; any other rate is resampled (torchaudio's sinc resampler);
    a clip longer than `max_seconds` is cut to it (only that much is read), none is cut when it is None.
    Samples past +-1 (a float file with headroom, an int-scaled float file, resampling overshoot) are
    divided by the peak, not clipped: the shape of the waveform is kept, where clipping would add distortion
    the model never saw and turn an int16-range float file into a square wave.
    A truncated WAV (header promising more frames than the file holds) is read up to where the data stops:
    libsndfile reports the frames actually present, and they are intact PCM.
    Silence is valid audio.

    Quarantined: a missing or unreadable path; 0 bytes or 0 frames ("empty"); a file soundfile cannot decode,
    "corrupt" if it starts like an audio container, else "not_audio" (a FLAC whose decoder loses sync
    mid-stream is "corrupt" as a whole); NaN/Inf samples ("non_finite": corrupt data is not repaired
    silently); fewer samples than `min_seconds` at `sample_rate` ("too_short"; the default is one 25 ms
    analysis window, the least that gives one fbank frame); a rate the resampler cannot handle
    ("unsupported_rate").
    """
    _check_arguments(sample_rate, min_seconds, max_seconds)
    path = Path(path)
    head = _head(path)
    try:
        with sf.SoundFile(path) as audio:
            rate = audio.samplerate
            # integer PCM read as float32 is finite and within [-1, 1): those checks are for float files only
            pcm = audio.subtype.startswith("PCM")
            frames = -1 if max_seconds is None else math.ceil(max_seconds * rate)
            data = audio.read(frames, dtype="float32")  # 1-D when mono: no copy to average one channel
    except sf.SoundFileError as error:
        reason, what = ("corrupt", "looks like audio but") if head.startswith(AUDIO_MAGIC) else ("not_audio", "is not audio:")
        raise AudioError(reason, f"{path} {what} soundfile cannot decode it ({error})") from None
    if data.shape[0] == 0:
        raise AudioError("empty", f"{path} holds no audio frames")
    if not pcm:
        finite = np.isfinite(data)
        if not finite.all():
            raise AudioError("non_finite", f"{path} has {finite.size - int(finite.sum())} NaN or infinite samples")
    samples = _resample(data if data.ndim == 1 else data.mean(axis=1, dtype=np.float32), rate, sample_rate, path)
    if max_seconds is not None:
        samples = samples[: round(max_seconds * sample_rate)]
    if samples.size < round(min_seconds * sample_rate):
        raise AudioError(
            "too_short",
            f"{path} is {samples.size / sample_rate * 1000:.1f} ms long, shorter than the minimum {min_seconds * 1000:g} ms",
        )
    if pcm and rate == sample_rate:
        return samples
    peak = float(np.abs(samples).max())
    return samples / peak if peak > 1.0 else samples


def _check_arguments(sample_rate: int, min_seconds: float, max_seconds: float | None) -> None:
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    if not min_seconds >= 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
    if max_seconds is not None and not max_seconds > max(min_seconds, 0.0):
        raise ValueError(f"max_seconds must be None or > min_seconds ({min_seconds}), got {max_seconds!r}")


def _head(path: Path) -> bytes:
    """The file's first bytes (to tell corrupt audio from non-audio); the path problems as AudioError."""
    if not path.is_file():
        raise AudioError("missing", f"{path} is missing or not a regular file")
    try:
        with path.open("rb") as file:
            head = file.read(16)
    except OSError as error:
        raise AudioError("unreadable", f"{path} cannot be read ({error.strerror})") from None
    if not head:
        raise AudioError("empty", f"{path} is an empty file (0 bytes)")
    return head


def _resample(samples: np.ndarray, rate: int, target: int, path: Path) -> np.ndarray:
    if rate == target:
        return samples
    common = math.gcd(rate, target)
    if (rate // common) * (target // common) > MAX_RESAMPLE_KERNEL:
        raise AudioError(
            "unsupported_rate", f"{path} is at {rate} Hz, too odd a rate to resample to {target} Hz (a broken header?)"
        )
    return torchaudio.functional.resample(torch.from_numpy(samples), rate, target).numpy()
