"""Synthetic spoken commands: eSpeak NG (via the PyPI package `espeakng-loader`) speaks a word list into a
folder in the SpeechCommands v2 layout, with noise, time shifts and gain so that the task is not trivial.

Speakers are voice x variant x rate x pitch; the split lists are speaker-disjoint (the real set's hashing
rule on the speaker id). Every clip draws its randomness from (seed, word, clip index) and eSpeak runs in a
fresh process per chunk of clips (its state carries over between utterances), so a seed gives byte-identical
files whatever the number of workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from data_prep.sources import BACKGROUND, COMMANDS, SPLIT_LISTS, SPLITS, split_of

GENERATOR_VERSION = 1  # bump whenever the same config would give different files
DEFAULT_WORDS: tuple[str, ...] = COMMANDS  # the 12-class task's ten commands
DEFAULT_VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
DEFAULT_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "whisper")
# words for the babble noise: SpeechCommands' auxiliary words (the config's own words are left out)
BABBLE_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine", "one",
                "seven", "sheila", "six", "three", "tree", "two", "wow", "zero", "backward", "forward", "follow", "learn")
NOISE_SECONDS = {"white_noise": 60, "pink_noise": 60, "brown_noise": 60, "hum": 30, "running_tap": 60, "babble": 45}
RECORD = "synth.json"
CHUNK_CLIPS = 200  # clips per worker task; fixed, so the eSpeak call sequences do not depend on `workers`
WORD_RE = re.compile(r"^[a-z][a-z']*$")

ESPEAK_RATE = 22050
SPEECH_RMS = 0.1  # speech level (active part) before the clip's gain
MAX_CUT = 0.05  # at most this share of the word may fall outside the 1 s window
RATE_JITTER = 0.08  # a take's rate varies by up to +-8% around its speaker's
PITCH_JITTER = 4
LOWPASS_SHARE, REVERB_SHARE = 0.2, 0.2


class EspeakError(RuntimeError):
    """eSpeak NG cannot be loaded or refused a request."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(name: str, value: object, low: float, high: float) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError(f"SynthConfig.{name} must be a (low, high) pair of numbers in dB, got {value!r}")
    if not (low <= value[0] <= value[1] <= high):
        raise ValueError(f"SynthConfig.{name} must be low <= high within [{low}, {high}] dB, got {value!r}")
    return float(value[0]), float(value[1])


def _check_names(name: str, value: object) -> tuple:
    if not isinstance(value, (tuple, list)) or not value or len(set(value)) != len(value):
        raise ValueError(f"SynthConfig.{name} must be a non-empty sequence without repeats, got {value!r}")
    return tuple(value)


def _check_ints(name: str, value: object, low: int, high: int) -> tuple[int, ...]:
    values = _check_names(name, value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values):
        raise ValueError(f"SynthConfig.{name} must be ints within [{low}, {high}], got {value!r}")
    return values


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize; validated here, trusted inside. Speakers are voices x variants x rates x pitches."""

    words: tuple[str, ...] = DEFAULT_WORDS
    clips_per_word: int = 504
    seed: int = 0
    sample_rate: int = 16000
    snr_db: tuple[float, float] = (10.0, 35.0)  # noisy enough that a small model is not at 100% at once
    gain_db: tuple[float, float] = (-12.0, 6.0)
    voices: tuple[str, ...] = DEFAULT_VOICES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    rates: tuple[int, ...] = (135, 175, 220)  # words per minute (eSpeak's default is 175)
    pitches: tuple[int, ...] = (30, 50, 70)  # eSpeak's 0..99 (default 50)

    def __post_init__(self) -> None:
        words = _check_names("words", self.words)
        bad = [w for w in words if not isinstance(w, str) or not WORD_RE.match(w)]
        if bad:
            raise ValueError(f"SynthConfig.words must be lowercase words (letters, apostrophes), got {bad!r}")
        for name, low in (("clips_per_word", 1), ("seed", 0), ("sample_rate", 8000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SynthConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("voices", "variants"):
            names = _check_names(name, getattr(self, name))
            if not all(isinstance(v, str) and v and "+" not in v and "/" not in v for v in names):
                raise ValueError(f"SynthConfig.{name} must be eSpeak names (no '+' or '/'), got {names!r}")
            object.__setattr__(self, name, names)
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "rates", _check_ints("rates", self.rates, 80, 450))
        object.__setattr__(self, "pitches", _check_ints("pitches", self.pitches, 0, 99))
        object.__setattr__(self, "snr_db", _check_range("snr_db", self.snr_db, -20.0, 100.0))
        object.__setattr__(self, "gain_db", _check_range("gain_db", self.gain_db, -60.0, 20.0))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class SynthSummary:
    """What a run produced: clips and speakers per split; `reused` when the folder was complete already."""

    out_dir: Path
    clips: dict[str, int]
    speakers: dict[str, int]
    seconds: float
    reused: bool = False

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "clips": self.clips, "speakers": self.speakers,
                "seconds": round(self.seconds, 2), "reused": self.reused}


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker; its id (8 hex digits) names its files, as in SpeechCommands."""

    voice: str
    variant: str
    rate: int
    pitch: int

    @property
    def id(self) -> str:
        return hashlib.sha1(f"{self.voice}+{self.variant}/{self.rate}/{self.pitch}".encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ClipSpec:
    """Clip `index` of `word`, take `take` of its speaker."""

    word: str
    index: int
    speaker: Speaker
    take: int

    @property
    def path(self) -> str:
        return f"{self.word}/{self.speaker.id}_nohash_{self.take}.wav"


def _stable_int(text: str) -> int:
    """A process-independent integer for seeding (Python's hash() is salted per process)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def speakers(config: SynthConfig) -> list[Speaker]:
    """Every voice x variant x rate x pitch, in a fixed order."""
    return [Speaker(*combo) for combo in itertools.product(config.voices, config.variants, config.rates, config.pitches)]


def plan_clips(config: SynthConfig) -> list[ClipSpec]:
    """Each word gets its own seeded order of the speakers; clip k is spoken by the k-th (again on wrap-around)."""
    pool = speakers(config)
    plan = []
    for word in config.words:
        order = np.random.default_rng([config.seed, _stable_int("speakers"), _stable_int(word)]).permutation(len(pool))
        for k in range(config.clips_per_word):
            plan.append(ClipSpec(word, k, pool[order[k % len(pool)]], k // len(pool)))
    return plan


def summarize(plan: list[ClipSpec]) -> tuple[dict[str, int], dict[str, int]]:
    """Clips and distinct speakers per split."""
    clips = {split: 0 for split in SPLITS}
    ids: dict[str, set[str]] = {split: set() for split in SPLITS}
    for clip in plan:
        split = split_of(clip.speaker.id)
        clips[split] += 1
        ids[split].add(clip.speaker.id)
    return clips, {split: len(members) for split, members in ids.items()}


# --- eSpeak NG -----------------------------------------------------------------------------------------

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000
ESPEAK_RATE_PARAM, ESPEAK_PITCH_PARAM = 1, 3
POS_CHARACTER, CHARS_UTF8 = 1, 1
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def espeak_paths() -> tuple[str, Path]:
    """(shared library, espeak-ng-data folder) of `espeakng-loader`; a clear error when it is missing or broken."""
    try:
        import espeakng_loader
    except ImportError as error:
        raise EspeakError(
            "eSpeak NG not found: install the PyPI package `espeakng-loader` (see requirements.txt)"
        ) from error
    library = espeakng_loader.get_library_path()
    try:
        ctypes.CDLL(library)
        data = Path(espeakng_loader.get_data_path())
    except (OSError, RuntimeError) as error:
        raise EspeakError(
            f"cannot load eSpeak NG from {library}: {error}; "
            "it ships with the PyPI package `espeakng-loader` (reinstall it)"
        ) from error
    return library, data


def check_voices(config: SynthConfig, data: Path) -> None:
    """Unknown voices fail in eSpeak and unknown variants are silently ignored by it, so both are checked here."""
    voices = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    unknown = [v for v in config.voices if v.lower() not in voices]
    if unknown:
        english = sorted(v for v in voices if v.startswith("en"))
        raise ValueError(f"SynthConfig.voices: eSpeak NG ({data}) has no voice {unknown}; its English ones: {english}")
    variants = {p.name for p in (data / "voices" / "!v").iterdir()}
    unknown = [v for v in config.variants if v not in variants]
    if unknown:
        raise ValueError(f"SynthConfig.variants: eSpeak NG ({data}) has no variant {unknown}; it has {sorted(variants)}")


class Espeak:
    """The eSpeak NG engine of this process. The library is process-global state that carries over between
    utterances (the same call gives other samples after other calls), so drive it only in a process of its own:
    `synthesize` forks a fresh one per task, and the parent never speaks."""

    def __init__(self, library: str, data: Path) -> None:
        self._lib = ctypes.CDLL(library)
        self._libc = ctypes.CDLL(None)
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = self._lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data.parent).encode(), INITIALIZE_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise EspeakError(f"espeak_Initialize({data.parent}) returned {rate}, expected the sample rate {ESPEAK_RATE}")
        self._chunks: list[np.ndarray] = []
        self._callback = CALLBACK(self._collect)  # kept referenced: eSpeak calls it after this returns
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count: int, events) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def speak(self, text: str, voice: str, variant: str, rate: int, pitch: int) -> np.ndarray:
        """`text` as float32 samples at 22,050 Hz; the random seeds are reset first (breath noise)."""
        status = self._lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode())
        if status != 0:
            raise EspeakError(f"eSpeak NG refused voice {voice}+{variant} (status {status})")
        self._lib.espeak_SetParameter(ESPEAK_RATE_PARAM, rate, 0)
        self._lib.espeak_SetParameter(ESPEAK_PITCH_PARAM, pitch, 0)
        self._lib.espeak_ng_SetRandSeed(1)
        self._libc.srand(1)
        self._chunks = []
        encoded = text.encode() + b"\0"
        status = self._lib.espeak_Synth(encoded, len(encoded), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise EspeakError(f"eSpeak NG produced no audio for {text!r} ({voice}+{variant}, status {status})")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


# --- signal processing -----------------------------------------------------------------------------------


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain (exact for the silence-padded utterances eSpeak gives)."""
    down = source_rate // math.gcd(source_rate, target_rate)
    n = down * 2 ** math.ceil(math.log2(-(-len(audio) // down)))  # a multiple of `down` with a fast FFT size
    m = n * target_rate // source_rate
    spectrum = np.fft.rfft(audio, n)[: m // 2 + 1]
    return (np.fft.irfft(spectrum, m) * (m / n)).astype(np.float32)


def active_span(audio: np.ndarray, threshold: float = 0.02) -> tuple[int, int]:
    """First and one-past-last sample above `threshold` x peak: the word without eSpeak's silences."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    return int(loud[0]), int(loud[-1]) + 1


def place(word: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """`word` at a random offset in `length` samples; up to MAX_CUT of it may fall outside either edge."""
    cut = int(MAX_CUT * len(word))
    low, high = -cut, length - len(word) + cut
    offset = int(rng.integers(low, high + 1)) if high >= low else (length - len(word)) // 2
    out = np.zeros(length, np.float32)
    begin, end = max(offset, 0), min(offset + len(word), length)
    out[begin:end] = word[begin - offset : end - offset]
    return out


def lowpass(audio: np.ndarray, cutoff_hz: float, sample_rate: int, order: int = 4) -> np.ndarray:
    """Butterworth-shaped magnitude response applied in the frequency domain (a cheap phone or muffled mic)."""
    freqs = np.fft.rfftfreq(len(audio), 1.0 / sample_rate)
    response = 1.0 / np.sqrt(1.0 + (freqs / cutoff_hz) ** (2 * order))
    return np.fft.irfft(np.fft.rfft(audio) * response, len(audio)).astype(np.float32)


def reverb(audio: np.ndarray, rt60: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Convolution with an exponentially decaying noise tail (a small room), cut back to the input length."""
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    response = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 0.3
    response[0] = 1.0
    n = 2 ** math.ceil(math.log2(len(audio) + len(response)))
    wet = np.fft.irfft(np.fft.rfft(audio, n) * np.fft.rfft(response, n), n)[: len(audio)]
    return wet.astype(np.float32)


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0


def shaped_noise(count: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), scaled to unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(count))
    freqs = np.fft.rfftfreq(count)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), count)
    return (noise / rms(noise)).astype(np.float32)


def background(name: str, config: SynthConfig, engine: Espeak) -> np.ndarray:
    """One background noise file (unit-free level set by the SNR later), seeded by (seed, name)."""
    rate, count = config.sample_rate, NOISE_SECONDS[name] * config.sample_rate
    rng = np.random.default_rng([config.seed, _stable_int(f"noise:{name}")])
    t = np.arange(count) / rate
    if name in ("white_noise", "pink_noise", "brown_noise"):
        audio = shaped_noise(count, {"white_noise": 0.0, "pink_noise": 1.0, "brown_noise": 2.0}[name], rng)
    elif name == "hum":
        mains = rng.choice([50.0, 60.0])
        audio = sum(np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 9))
        audio = audio * (1 + 0.2 * np.sin(2 * np.pi * 0.3 * t)) + 0.05 * shaped_noise(count, 1.0, rng)
    elif name == "running_tap":
        white = shaped_noise(count, 0.0, rng)
        gurgle = lowpass(rng.standard_normal(count).astype(np.float32), 20.0, rate)
        audio = (lowpass(white, 4000.0, rate) - lowpass(white, 400.0, rate)) * np.exp(0.5 * gurgle / gurgle.std())
    else:
        audio = babble(count, config, engine, rng)
    return (0.1 * audio / rms(audio)).astype(np.float32)


def babble(count: int, config: SynthConfig, engine: Espeak, rng: np.random.Generator) -> np.ndarray:
    """Overlapping words of other speakers (about four at a time) that are not in the word list."""
    words = [w for w in BABBLE_WORDS if w not in config.words]
    pool = speakers(config)
    out = np.zeros(count, np.float32)
    for _ in range(int(count / config.sample_rate * 8)):
        who = pool[int(rng.integers(len(pool)))]
        word = str(words[int(rng.integers(len(words)))])
        audio = resample(engine.speak(word, who.voice, who.variant, who.rate, who.pitch), ESPEAK_RATE, config.sample_rate)
        start = int(rng.integers(0, count - len(audio)))
        out[start : start + len(audio)] += audio * float(rng.uniform(0.3, 1.0))
    return out


def make_clip(clip: ClipSpec, config: SynthConfig, engine: Espeak, noises: list[np.ndarray]) -> np.ndarray:
    """One 1 s clip: the speaker's take (jittered rate and pitch), shifted, maybe muffled or reverberant,
    mixed with a background noise segment at a random SNR, then scaled by a random gain and clipped."""
    rng = np.random.default_rng([config.seed, _stable_int(clip.word), clip.index])
    who = clip.speaker
    rate = int(np.clip(round(who.rate * rng.uniform(1 - RATE_JITTER, 1 + RATE_JITTER)), 80, 450))
    pitch = int(np.clip(who.pitch + rng.integers(-PITCH_JITTER, PITCH_JITTER + 1), 0, 99))
    audio = resample(engine.speak(clip.word, who.voice, who.variant, rate, pitch), ESPEAK_RATE, config.sample_rate)
    begin, end = active_span(audio)
    word = audio[begin:end] * (SPEECH_RMS / max(rms(audio[begin:end]), 1e-6))
    speech = place(word, config.sample_rate, rng)
    if rng.random() < LOWPASS_SHARE:
        speech = lowpass(speech, float(rng.uniform(1000.0, 4000.0)), config.sample_rate)
    if rng.random() < REVERB_SHARE:
        speech = reverb(speech, float(rng.uniform(0.15, 0.6)), config.sample_rate, rng)
    noise = noises[int(rng.integers(len(noises)))]
    start = int(rng.integers(0, len(noise) - config.sample_rate + 1))
    segment = noise[start : start + config.sample_rate]
    snr = rng.uniform(*config.snr_db)
    mixed = speech + segment * (SPEECH_RMS / 10 ** (snr / 20) / max(rms(segment), 1e-6))
    return np.clip(mixed * 10 ** (rng.uniform(*config.gain_db) / 20), -1.0, 1.0)


# --- files -------------------------------------------------------------------------------------------------


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV, written to a temp name and renamed: an interrupted run never leaves a truncated file.
    Encoded in memory first: soundfile syncs each file it closes to disk, which would dominate the run time."""
    encoded = io.BytesIO()
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    soundfile.write(encoded, pcm, sample_rate, subtype="PCM_16", format="WAV")
    partial = path.with_name(f".{path.name}.part")
    partial.write_bytes(encoded.getvalue())
    os.replace(partial, path)


def write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(text)
    os.replace(partial, path)


@dataclass(frozen=True)
class _Task:
    """Work for one fresh worker process: the noise files, or a fixed chunk of clips."""

    out: Path
    config: SynthConfig
    library: str
    data: Path
    clips: tuple[ClipSpec, ...] = field(default=())


def _run_task(task: _Task) -> int:
    """Runs in a fresh (forked) process, so eSpeak starts from its initial state: clips come out identical."""
    engine = Espeak(task.library, task.data)
    rate = task.config.sample_rate
    if not task.clips:
        for name in NOISE_SECONDS:
            write_wav(task.out / BACKGROUND / f"{name}.wav", background(name, task.config, engine), rate)
        return 0
    noises = [soundfile.read(task.out / BACKGROUND / f"{name}.wav", dtype="float32")[0] for name in NOISE_SECONDS]
    for clip in task.clips:
        write_wav(task.out / clip.path, make_clip(clip, task.config, engine, noises), rate)
    return len(task.clips)


def _record(config: SynthConfig) -> dict:
    """How the set is made: a folder is reused only when all of this matches."""
    loader = importlib.metadata.version("espeakng-loader")
    return {"generator": f"prune-search data synth v{GENERATOR_VERSION}, eSpeak NG from espeakng-loader {loader}",
            "config": config.to_dict()}


def _expected_paths(out: Path, plan: list[ClipSpec]) -> list[Path]:
    noise = [out / BACKGROUND / f"{name}.wav" for name in NOISE_SECONDS]
    return [out / c.path for c in plan] + noise + [out / name for name in SPLIT_LISTS.values()]


def _check_folder(out: Path, record: dict) -> bool:
    """True when `out` holds a finished set of this config; an error when it holds anything else."""
    path = out / RECORD
    if not out.exists() or not any(out.iterdir()):
        return False
    if not path.is_file():
        raise ValueError(f"{out} is not empty and has no {RECORD}: choose an empty or new --out folder")
    found = json.loads(path.read_text())
    if {key: found.get(key) for key in record} != record:
        raise ValueError(
            f"{out} holds a synthetic set made with a different config ({path}); "
            "choose another --out folder or delete this one"
        )
    return bool(found.get("complete"))


def synthesize(
    out_dir: str | Path, config: SynthConfig = SynthConfig(), workers: int = 1, progress: bool = True
) -> SynthSummary:
    """Write the set into `out_dir` (SpeechCommands layout plus synth.json); a complete folder of the same config is
    reused as is, an interrupted one is finished, and one holding anything else is an error."""
    started = time.perf_counter()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    library, data = espeak_paths()
    check_voices(config, data)
    out = Path(out_dir)
    plan = plan_clips(config)
    clip_counts, speaker_counts = summarize(plan)
    record = _record(config)
    complete = _check_folder(out, record)
    if complete and all(p.is_file() for p in _expected_paths(out, plan)):
        return SynthSummary(out, clip_counts, speaker_counts, time.perf_counter() - started, reused=True)
    for folder in (out, out / BACKGROUND, *(out / word for word in config.words)):
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".*.part"):
            leftover.unlink()
    write_text(out / RECORD, json.dumps({**record, "complete": False}, indent=2) + "\n")
    tasks = [_Task(out, config, library, data, tuple(plan[i : i + CHUNK_CLIPS])) for i in range(0, len(plan), CHUNK_CLIPS)]
    tasks = [t for t in tasks if not all((out / c.path).is_file() for c in t.clips)]
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        if not all((out / BACKGROUND / f"{name}.wav").is_file() for name in NOISE_SECONDS):
            pool.apply(_run_task, (_Task(out, config, library, data),))
        done = len(plan) - sum(len(t.clips) for t in tasks)
        for count in pool.imap_unordered(_run_task, tasks):
            done += count
            if progress:
                print(f"\rsynth: {done}/{len(plan)} clips", end="", file=sys.stderr, flush=True)
    if progress and tasks:
        print(file=sys.stderr)
    for split, name in SPLIT_LISTS.items():
        write_text(out / name, "".join(sorted(f"{c.path}\n" for c in plan if split_of(c.speaker.id) == split)))
    summary = SynthSummary(out, clip_counts, speaker_counts, time.perf_counter() - started)
    write_text(out / RECORD, json.dumps({**record, "complete": True, "summary": summary.to_dict()}, indent=2) + "\n")
    return summary
