"""data_prep.features against transformers' ASTFeatureExtractor, and the streaming stats against numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

from data_prep.audio import AudioError
from data_prep.features import AST_STATS, FeatureParams, RunningStats, fbank, normalize

RATE = 16000


def waveforms() -> dict[str, np.ndarray]:
    """Noise, a tone, a clip too short for either max_length, one too long for both, and float64 input."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * RATE) / RATE
    return {
        "noise": (0.1 * rng.standard_normal(RATE)).astype(np.float32),
        "tone": (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        "short": (0.3 * rng.uniform(-1, 1, RATE // 4)).astype(np.float32),
        "long": (0.05 * rng.standard_normal(11 * RATE)).astype(np.float32),
        "float64": 0.2 * rng.standard_normal(RATE),
        "silence": np.zeros(RATE, np.float32),
    }


@pytest.mark.parametrize(("num_mel_bins", "max_length", "stats"), [(128, 1024, "audioset"), (64, 100, "speechcommands")])
def test_fbank_matches_ast_feature_extractor(num_mel_bins, max_length, stats):
    mean, std = AST_STATS[stats]
    extractor = transformers.ASTFeatureExtractor(
        num_mel_bins=num_mel_bins, max_length=max_length, mean=mean, std=std, do_normalize=True
    )
    params = FeatureParams(num_mel_bins=num_mel_bins, max_length=max_length)
    for name, waveform in waveforms().items():
        expected = extractor(waveform, sampling_rate=RATE, return_tensors="np")["input_values"][0]
        features, frames = fbank(waveform, params)
        assert features.dtype == torch.float32 and features.shape == (max_length, num_mel_bins), name
        assert frames == 1 + (len(waveform) - 400) // 160, name
        assert np.abs(normalize(features, mean, std).numpy() - expected).max() <= 1e-4, name
        assert torch.equal(features[frames:], torch.zeros_like(features[frames:])), name  # zero padding, raw scale


def test_fbank_accepts_tensors_and_refuses_what_ast_would_misread():
    params = FeatureParams(num_mel_bins=64, max_length=100)
    waveform = waveforms()["noise"]
    assert torch.equal(fbank(torch.from_numpy(waveform), params)[0], fbank(waveform, params)[0])
    with pytest.raises(AudioError) as error:
        fbank(waveform[:399], params)
    assert error.value.reason == "too_short" and "400 samples" in str(error.value)
    assert fbank(waveform[:400], params)[1] == 1
    bad = waveform.copy()
    bad[5] = np.inf
    with pytest.raises(AudioError, match="infinite") as error:
        fbank(bad, params)
    assert error.value.reason == "non_finite"
    with pytest.raises(TypeError, match="floating point"):
        fbank((waveform * 32767).astype(np.int16), params)
    with pytest.raises(ValueError, match="mono"):
        fbank(np.stack([waveform, waveform]), params)


def test_normalize_is_asts_convention():
    features = torch.tensor([[-4.0, 0.0], [2.0, 6.0]])
    assert torch.allclose(normalize(features, 2.0, 3.0), (features - 2.0) / 6.0)
    with pytest.raises(ValueError, match="std"):
        normalize(features, 0.0, 0.0)


def test_running_stats_equal_numpy_over_real_frames_and_merge():
    params = FeatureParams(num_mel_bins=64, max_length=100)
    matrices = [fbank(waveform, params) for waveform in waveforms().values()]
    real = np.concatenate([matrix[:frames].numpy() for matrix, frames in matrices]).astype(np.float64)
    whole, first, second = RunningStats(), RunningStats(), RunningStats()
    for index, (matrix, frames) in enumerate(matrices):
        whole.update(matrix[:frames])
        (first if index < 2 else second).update(matrix[:frames])
    assert whole.count == real.size
    assert math.isclose(whole.mean, real.mean(), rel_tol=1e-12)
    assert math.isclose(whole.std, real.std(), rel_tol=1e-12)
    merged = first.merge(second)
    assert merged.count == whole.count
    assert math.isclose(merged.mean, whole.mean, rel_tol=1e-12) and math.isclose(merged.std, whole.std, rel_tol=1e-12)
    assert first.count + second.count == merged.count  # merge leaves its inputs alone
    assert RunningStats.from_dict(json.loads(json.dumps(merged.to_dict()))) == merged
    assert whole.merge(RunningStats()) == whole and RunningStats().merge(whole) == whole


def test_empty_running_stats():
    stats = RunningStats()
    stats.update(torch.zeros(0, 64))
    assert stats.count == 0 and math.isnan(stats.std)


def test_feature_params_round_trip():
    params = FeatureParams(num_mel_bins=64, max_length=128, frame_length_ms=25)
    assert params == FeatureParams(num_mel_bins=64, max_length=128)  # 25 and 25.0 are one setting
    assert FeatureParams.from_dict(json.loads(json.dumps({**params.to_dict(), "dtype": "float16"}))) == params
    with pytest.raises(ValueError, match="max_length"):
        FeatureParams.from_dict({"sample_rate": 16000, "num_mel_bins": 64})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0),
        ("sample_rate", 16000.0),
        ("num_mel_bins", 3),
        ("num_mel_bins", True),
        ("max_length", 0),
        ("frame_length_ms", 0.1),
        ("frame_length_ms", math.nan),
        ("frame_shift_ms", 0.0),
        ("frame_shift_ms", "10"),
    ],
)
def test_feature_params_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"FeatureParams.{field} "):
        FeatureParams(**{field: value})
