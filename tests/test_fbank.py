"""data_prep.fbank.fbank_batch against the per-clip path (torchaudio's Kaldi fbank through features.fbank)
and transformers' ASTFeatureExtractor, on ragged batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from data_prep.audio import AudioError
from data_prep.fbank import fbank_batch
from data_prep.features import FeatureParams, fbank


def corpus(rate: int, max_length: int) -> dict[str, np.ndarray]:
    """Ragged clips: one window exactly, one window and a sample, a few hundred ms, 1 s, more than
    max_length frames (cut); noise, a sine, silence (the log floor), a loud clipped tone, a DC offset."""
    rng = np.random.default_rng(rate + max_length)
    window = int(rate * 0.025)
    t = np.arange(2 * rate) / rate
    too_long = (max_length + 20) * int(rate * 0.010) + window  # ~ max_length + 20 frames
    clips = {
        "one_window": 0.1 * rng.standard_normal(window),
        "window_plus_one": 0.3 * rng.uniform(-1, 1, window + 1),
        "300ms_sine": 0.5 * np.sin(2 * np.pi * 440 * t[: int(0.3 * rate)]),
        "1s_noise": 0.05 * rng.standard_normal(rate),
        "1s_silence": np.zeros(rate),
        "clipped_tone": np.clip(4.0 * np.sin(2 * np.pi * 180 * t[:rate]), -1.0, 1.0),
        "dc_offset": 0.4 + 0.01 * rng.standard_normal(int(0.45 * rate)),
        "cut_noise": 0.2 * rng.standard_normal(too_long),
        "cut_chirp": 0.3 * np.sin(2 * np.pi * (100 + 1000 * t[:too_long]) * t[:too_long]),
    }
    return {name: clip.astype(np.float32) for name, clip in clips.items()}


@pytest.mark.parametrize("rate", [16000, 8000])
@pytest.mark.parametrize(("num_mel_bins", "max_length"), [(128, 128), (64, 100), (128, 100)])
def test_batch_equals_per_clip_kaldi_fbank(rate, num_mel_bins, max_length):
    params = FeatureParams(sample_rate=rate, num_mel_bins=num_mel_bins, max_length=max_length)
    clips = corpus(rate, max_length)
    features, counts = fbank_batch(list(clips.values()), params)
    assert features.dtype == torch.float32 and features.shape == (len(clips), max_length, num_mel_bins)
    window, shift = int(rate * 0.025), int(rate * 0.010)
    for row, (name, clip) in enumerate(clips.items()):
        expected, frames = fbank(clip, params)
        assert counts[row] == frames == 1 + (len(clip) - window) // shift, name
        assert (features[row] - expected).abs().max() <= 1e-4, name
        assert torch.equal(features[row, frames:], torch.zeros_like(features[row, frames:])), name
    assert counts[0] == 1 and counts[-1] > max_length  # the corpus spans one frame to a cut
    silence = list(clips).index("1s_silence")
    floor = -23 * np.log(2)  # log of float32's eps, 2**-23: Kaldi's floor on mel energies
    assert torch.allclose(features[silence, : counts[silence]], torch.tensor(floor, dtype=torch.float32))


def test_batch_equals_ast_feature_extractor():
    """The user's reference: transformers' extractor with its own padding to max_length, unnormalized."""
    params = FeatureParams(num_mel_bins=128, max_length=128)
    extractor = transformers.ASTFeatureExtractor(num_mel_bins=128, max_length=128, do_normalize=False)
    chosen = ("one_window", "300ms_sine", "1s_noise", "cut_chirp")
    clips = [clip for name, clip in corpus(16000, 128).items() if name in chosen]
    features, _ = fbank_batch(clips, params)
    for row, clip in enumerate(clips):
        expected = extractor(clip, sampling_rate=16000, return_tensors="np")["input_values"][0]
        assert np.abs(features[row].numpy() - expected).max() <= 1e-4, row


def test_batch_composition_does_not_matter():
    params = FeatureParams(num_mel_bins=64, max_length=100)
    clips = list(corpus(16000, 100).values())[:7]
    together, counts = fbank_batch(clips, params)
    for row, clip in enumerate(clips):
        alone, (frames,) = fbank_batch([torch.from_numpy(clip)], params)
        assert frames == counts[row]
        assert (together[row] - alone[0]).abs().max() <= 1e-5, row


def test_empty_batch():
    features, counts = fbank_batch([], FeatureParams(num_mel_bins=64, max_length=100))
    assert features.shape == (0, 100, 64) and features.dtype == torch.float32 and counts == []


def test_bad_clips_name_their_index_and_reason():
    params = FeatureParams(num_mel_bins=64, max_length=100)
    good = corpus(16000, 100)["1s_noise"]
    with pytest.raises(AudioError) as error:
        fbank_batch([good, good, good, good[:100], good], params)
    assert error.value.reason == "too_short"
    message = str(error.value)
    assert message.startswith("clip 3: waveform of 100 samples is shorter") and "400 samples" in message
    for bad_value in (np.nan, np.inf):
        bad = good.copy()
        bad[7] = bad_value
        with pytest.raises(AudioError, match="^clip 2: .*NaN or infinite") as error:
            fbank_batch([good, good, bad], params)
        assert error.value.reason == "non_finite"
    with pytest.raises(TypeError, match="^clip 1: .*floating point"):
        fbank_batch([good, (good * 32767).astype(np.int16)], params)
    with pytest.raises(ValueError, match="^clip 0: .*mono"):
        fbank_batch([np.stack([good, good])], params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_per_clip_kaldi_fbank():
    params = FeatureParams(num_mel_bins=128, max_length=128)
    clips = list(corpus(16000, 128).values())
    features, counts = fbank_batch(clips, params, device="cuda")
    assert features.device.type == "cpu"
    for row, clip in enumerate(clips):
        expected, frames = fbank(clip, params)
        assert counts[row] == frames
        assert (features[row] - expected).abs().max() <= 1e-3, row
