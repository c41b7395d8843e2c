"""Sources: list the clips of a data set folder in its real layout, with split and labels.

SpeechCommands v2 (one folder per word, official split lists, `_background_noise_/`; 35 words or the
12-class task) and AudioSet style (segments CSVs, `class_labels_indices.csv`, clips named by YTID).
Problems found while listing (a stray file, a listed file that is missing) become quarantine
entries, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.audio import AUDIO_SUFFIXES

SPLITS = ("train", "validation", "test")
SPLIT_LISTS = {"validation": "validation_list.txt", "test": "testing_list.txt"}  # SpeechCommands' split files
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
BACKGROUND = "_background_noise_"
SILENCE_SHARE = 0.1  # silence clips per split, as a share of the split's word clips (the TF recipe's 10%)
CLIP_SECONDS = 1.0
SOURCES = ("speechcommands", "audioset")


@dataclass(frozen=True)
class Clip:
    """One example: where its audio is, which split, its class ids; `start`/`end` cut a segment (seconds)."""

    id: str
    path: str
    split: str
    labels: tuple[int, ...]
    start: float = 0.0
    end: float | None = None


@dataclass(frozen=True)
class Listing:
    """Everything a source yields: class names, clips, quarantined files and notes for the manifest."""

    source: str
    task: str  # "single_label" or "multi_label"
    labels: tuple[str, ...]
    clips: tuple[Clip, ...]
    quarantined: tuple[dict, ...] = ()
    notes: tuple[str, ...] = field(default=())


def split_of(speaker_id: str, validation_percent: float = 10.0, testing_percent: float = 10.0) -> str:
    """The SpeechCommands README's split rule on a speaker id: a hash, so splits are speaker-disjoint."""
    max_per_class = 2**27 - 1
    percent = (int(hashlib.sha1(speaker_id.encode()).hexdigest(), 16) % (max_per_class + 1)) * (100.0 / max_per_class)
    if percent < validation_percent:
        return "validation"
    if percent < validation_percent + testing_percent:
        return "test"
    return "train"


def _which_set(filename: str) -> str:
    """The split of a SpeechCommands file by the speaker part of its name, for sets without lists."""
    return split_of(re.sub(r"_nohash_.*$", "", Path(filename).name))


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def speechcommands(root: str | Path, task: int = 35) -> Listing:
    """List a SpeechCommands v2 folder for the 35-word task or the 12-class task.

    Split lists missing: the README's hashing rule assigns splits instead (noted in the manifest).
    12-class: the 10 commands, `_unknown_` for every other word, `_silence_` cut as 1 s segments from
    the background noise files (each file's first 80% for train, then 10% validation, 10% test).
    """
    root = Path(root)
    if task not in (12, 35):
        raise ValueError(f"--task must be 12 or 35, got {task}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such SpeechCommands folder")
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not words:
        raise ValueError(f"{root}: no word folders found; expected the SpeechCommands layout <root>/<word>/*.wav")
    notes: list[str] = []
    lists: dict[str, set[str]] = {}
    for split, name in SPLIT_LISTS.items():
        if (root / name).is_file():
            lists[split] = _read_list(root / name)
        else:
            notes.append(f"{name} missing: {split} clips chosen by the SpeechCommands hashing rule")
    quarantined: list[dict] = []
    if task == 35:
        labels = tuple(words)
    else:
        labels = (*COMMANDS, SILENCE, UNKNOWN)
    index = {label: i for i, label in enumerate(labels)}
    clips: list[Clip] = []
    for word in words:
        for path in sorted((root / word).iterdir()):
            relative = f"{word}/{path.name}"
            if not path.is_file() or path.suffix.lower() not in AUDIO_SUFFIXES:
                quarantined.append({"path": str(path), "reason": "stray_file", "detail": "not an audio file name"})
                continue
            split = next((s for s, names in lists.items() if relative in names), None)
            if split is None:
                # unlisted: train, unless the hashing rule picks a split whose list is missing
                hashed = _which_set(relative)
                split = hashed if hashed != "train" and hashed not in lists else "train"
            label = word if task == 35 else (word if word in COMMANDS else UNKNOWN)
            clips.append(Clip(relative, str(path), split, (index[label],)))
    listed = set().union(*lists.values()) if lists else set()
    present = {clip.id for clip in clips}
    for missing in sorted(listed - present):
        quarantined.append({"path": str(root / missing), "reason": "listed_missing", "detail": "in a split list, not on disk"})
    if task == 12:
        clips.extend(_silence_clips(root, clips, index[SILENCE], quarantined))
    return Listing("speechcommands", "single_label", labels, tuple(clips), tuple(quarantined), tuple(notes))


def _silence_clips(root: Path, clips: list[Clip], label: int, quarantined: list[dict]) -> list[Clip]:
    """1 s segments of the background noise files, split by position in each file."""
    import soundfile

    folder = root / BACKGROUND
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if folder.is_dir() else []
    if not files:
        quarantined.append({"path": str(folder), "reason": "no_background_noise", "detail": "no _silence_ clips made"})
        return []
    durations = {}
    for path in files:
        try:
            durations[path] = soundfile.info(str(path)).duration
        except Exception as error:  # noqa: BLE001 - any unreadable noise file is quarantined, the rest used
            quarantined.append({"path": str(path), "reason": "corrupt", "detail": str(error)})
    bounds = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
    silence: list[Clip] = []
    for split, (low, high) in bounds.items():
        wanted = round(SILENCE_SHARE * sum(clip.split == split for clip in clips))
        segments = [
            (path, start)
            for path, duration in durations.items()
            for start in _starts(duration * low, duration * high)
        ]
        for k in range(min(wanted, len(segments)) if segments else 0):
            path, start = segments[(k * 7919) % len(segments)]  # spread picks over files and positions
            silence.append(
                Clip(f"{SILENCE}/{path.stem}@{start:.2f}", str(path), split, (label,), start, start + CLIP_SECONDS)
            )
    return silence


def _starts(begin: float, end: float, hop: float = 0.5) -> list[float]:
    count = int((end - begin - CLIP_SECONDS) / hop) + 1
    return [round(begin + i * hop, 2) for i in range(max(count, 0))]


AUDIOSET_SPLITS = {"balanced_train": "train", "unbalanced_train": "train", "eval": "test"}


def audioset(root: str | Path) -> Listing:
    """List an AudioSet-style folder: `class_labels_indices.csv`, `<name>_segments.csv`, clips in `audio/`.

    Clips are `<YTID>.wav` or `.flac` (also `Y<YTID>.*`, as some dumps name them), cut to
    start..end seconds. `balanced_train`/`unbalanced_train` are train, `eval` is test, and a 10%
    validation split is carved from train by a hash of the YTID.
    """
    root = Path(root)
    labels_csv = root / "class_labels_indices.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv} not found: an AudioSet folder needs class_labels_indices.csv")
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"{labels_csv}: expected columns index,mid,display_name")
    rows.sort(key=lambda row: int(row["index"]))
    labels = tuple(row["display_name"] for row in rows)
    by_mid = {row["mid"]: int(row["index"]) for row in rows}
    segment_files = sorted(root.glob("*_segments.csv"))
    if not segment_files:
        raise FileNotFoundError(f"{root}: no *_segments.csv files (e.g. balanced_train_segments.csv, eval_segments.csv)")
    audio = {_ytid(p.stem): p for p in _audio_files(root / "audio")}
    clips: list[Clip] = []
    quarantined: list[dict] = []
    for segments in segment_files:
        name = segments.name.removesuffix("_segments.csv")
        split = AUDIOSET_SPLITS.get(name)
        if split is None:
            quarantined.append({"path": str(segments), "reason": "unknown_split", "detail": f"not one of {list(AUDIOSET_SPLITS)}"})
            continue
        for line_no, fields in _segment_rows(segments):
            where = f"{segments}:{line_no}"
            if len(fields) < 4:
                quarantined.append({"path": where, "reason": "bad_row", "detail": "expected YTID, start, end, labels"})
                continue
            ytid, start, end, mids = fields[0], fields[1], fields[2], fields[3]
            try:
                start_s, end_s = float(start), float(end)
            except ValueError:
                quarantined.append({"path": where, "reason": "bad_row", "detail": f"start/end not numbers: {start!r}, {end!r}"})
                continue
            unknown = [mid for mid in mids.split(",") if mid.strip() not in by_mid]
            if unknown or not mids.strip():
                quarantined.append({"path": where, "reason": "unknown_label", "detail": f"labels {unknown or '(none)'}"})
                continue
            if ytid not in audio:
                quarantined.append({"path": where, "reason": "missing_audio", "detail": f"no audio/{ytid}.wav or .flac"})
                continue
            if split == "train" and split_of(ytid, validation_percent=10.0, testing_percent=0.0) == "validation":
                split_here = "validation"
            else:
                split_here = split
            ids = tuple(sorted({by_mid[mid.strip()] for mid in mids.split(",")}))
            # a clip file holds the segment already (as AudioSet dumps do), so it is read from its start
            clips.append(Clip(f"{name}/{ytid}", str(audio[ytid]), split_here, ids, 0.0, end_s - start_s))
    return Listing("audioset", "multi_label", labels, tuple(clips), tuple(quarantined))


def _ytid(stem: str) -> str:
    """YTIDs are 11 characters; some dumps prefix a 'Y'."""
    return stem[1:] if len(stem) == 12 and stem.startswith("Y") else stem


def _audio_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no audio folder; AudioSet clips go in <root>/audio/<YTID>.wav")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)


def _segment_rows(path: Path):
    """(line number, fields) of a segments CSV, skipping the '#' header lines of the official files."""
    with path.open(newline="") as handle:
        for line_no, fields in enumerate(csv.reader(handle, skipinitialspace=True), start=1):
            if fields and not fields[0].startswith("#"):
                yield line_no, [f.strip() for f in fields]


def list_source(source: str, root: str | Path, task: int = 35) -> Listing:
    """Dispatch on the source name; `task` matters for SpeechCommands only."""
    if source == "speechcommands":
        return speechcommands(root, task)
    if source == "audioset":
        return audioset(root)
    raise ValueError(f"unknown --source {source!r}; choose one of {SOURCES}")
