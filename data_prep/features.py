"""AST's front end: Kaldi fbank log-mel features padded or cut to a fixed length, AST's normalization,
and streaming mean/std over a training split.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

from data_prep.audio import AudioError

# (mean, std) of the fbank features the pretrained AST checkpoints were trained on
AST_STATS: dict[str, tuple[float, float]] = {"audioset": (-4.2677393, 4.5689974), "speechcommands": (-6.845978, 5.5654526)}


def _samples(sample_rate: int, milliseconds: float) -> int:
    """Samples in `milliseconds`, rounded as torchaudio's Kaldi code rounds them (so our checks agree with it)."""
    return int(sample_rate * milliseconds * 0.001)


@dataclass(frozen=True)
class FeatureParams:
    """The fbank settings of a prepared data set (recorded in its manifest): AST's by default."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    max_length: int = 1024  # frames
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0

    def __post_init__(self) -> None:
        for name, minimum, why in (
            ("sample_rate", 41, " (the mel bank starts at 20 Hz, which must lie below Nyquist)"),
            ("num_mel_bins", 4, " (Kaldi's mel bank needs more than 3)"),
            ("max_length", 1, ""),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"FeatureParams.{name} must be an int >= {minimum}{why}, got {value!r}")
        for name, minimum in (("frame_length_ms", 2), ("frame_shift_ms", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"FeatureParams.{name} must be a finite number of milliseconds, got {value!r}")
            if _samples(self.sample_rate, value) < minimum:
                raise ValueError(
                    f"FeatureParams.{name} must span at least {minimum} samples at {self.sample_rate} Hz, got {value!r} ms"
                )
            object.__setattr__(self, name, float(value))  # 25 and 25.0 must give the same manifest and shard keys

    @property
    def window_samples(self) -> int:
        """Samples in one analysis window: a waveform needs at least this many to give one frame."""
        return _samples(self.sample_rate, self.frame_length_ms)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureParams:
        """From `to_dict`'s output; other keys (a manifest's `dtype`) are ignored, a missing one is an error."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"feature settings lack {missing} (have {sorted(data)})")
        return cls(**{name: data[name] for name in names})


def _mono_float32(waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The waveform as a float32 tensor; integer PCM is refused (AST's features expect [-1, 1], not 2**15 scale)."""
    samples = torch.as_tensor(waveform)
    if not samples.is_floating_point():
        raise TypeError(f"waveform must be floating point in [-1, 1] (load_audio's output), got {samples.dtype}")
    if samples.dim() != 1:
        raise ValueError(f"waveform must be mono, 1-D, got shape {tuple(samples.shape)}")
    return samples.to(torch.float32)


def checked_clip(waveform: np.ndarray | torch.Tensor, params: FeatureParams) -> torch.Tensor:
    """The clip as float32 on the CPU, or refused: AudioError "too_short" (no whole window) or "non_finite"
    (either would otherwise reach the shards and the training statistics as silent garbage); TypeError or
    ValueError for integer PCM or more than one channel."""
    samples = _mono_float32(waveform).cpu()
    if samples.numel() < params.window_samples:
        raise AudioError(
            "too_short",
            f"waveform of {samples.numel()} samples is shorter than one {params.frame_length_ms:g} ms "
            f"window ({params.window_samples} samples at {params.sample_rate} Hz)",
        )
    if not torch.isfinite(samples).all():
        raise AudioError("non_finite", "waveform has NaN or infinite samples")
    return samples


def fbank(waveform: np.ndarray | torch.Tensor, params: FeatureParams) -> tuple[torch.Tensor, int]:
    """Log-mel fbank of a mono waveform in [-1, 1] exactly as transformers' ASTFeatureExtractor computes it
    (torchaudio's Kaldi fbank, Hanning window, no dither, no 2**15 scaling), padded with zeros or cut to
    `params.max_length` frames: float32 [max_length, num_mel_bins], and the frame count before pad/cut.

    Refuses what `checked_clip` refuses. `prepare` computes the same features in batches
    (`data_prep.fbank.fbank_batch`); this per-clip path is the reference its tests hold it to.
    """
    samples = checked_clip(waveform, params)
    features = kaldi.fbank(
        samples.unsqueeze(0),
        sample_frequency=params.sample_rate,
        window_type="hanning",
        num_mel_bins=params.num_mel_bins,
        frame_length=params.frame_length_ms,
        frame_shift=params.frame_shift_ms,
        htk_compat=True,
        use_energy=False,
        dither=0.0,
    )
    frames = features.shape[0]
    if frames < params.max_length:
        features = torch.nn.functional.pad(features, (0, 0, 0, params.max_length - frames))
    return features[: params.max_length].contiguous(), frames


def normalize(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """AST's convention, (x - mean) / (2 * std): about zero mean and 0.5 std, as the checkpoints expect."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    return (features - mean) / (2 * std)


def _moments(values: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) in float64."""
    values = values.detach().to(torch.float64).reshape(-1)
    mean = values.mean()
    return values.numel(), float(mean), float(((values - mean) ** 2).sum())


def _combine(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s pairwise update: exact for any split of the data, stable for large counts."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    if n == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


@dataclass
class RunningStats:
    """Streaming mean/std (population) of feature values, fed only real frames (`features[:frames]`) so the
    zero padding does not bias them; per-shard stats `merge` into a split's. Empty: count 0, std nan."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from `mean`

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add every value of `features` (in place)."""
        values = torch.as_tensor(features)
        if values.numel():
            self.count, self.mean, self.m2 = _combine((self.count, self.mean, self.m2), _moments(values))

    def merge(self, other: RunningStats) -> RunningStats:
        """The stats of both together, as a new object (neither input changes)."""
        return RunningStats(*_combine((self.count, self.mean, self.m2), (other.count, other.mean, other.m2)))

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, data: dict) -> RunningStats:
        return cls(int(data["count"]), float(data["mean"]), float(data["m2"]))
