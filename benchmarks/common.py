"""What every benchmark shares: where results go, the record of where they were measured, paired timing
statistics, and reading a results file back (`--from-json`) instead of measuring again."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
T = TypeVar("T")


def timestamp() -> str:
    """Now, in UTC, to the second: when a result was measured."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def environment(device: str = "cpu", packages: Sequence[str] = ("torch", "transformers")) -> dict:
    """Where and when a benchmark ran: the date, the machine, torch's threads and the versions of `packages`.

    torch is imported here, not at the top, so that re-printing a results file stays light.
    """
    import torch

    accelerator = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return {
        "date": timestamp(), "device": device.split(":")[0], "device_name": accelerator or cpu_name(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages},
    }


def log(message: str) -> None:
    """Progress on stderr: stdout is for the tables."""
    print(message, file=sys.stderr, flush=True)


def paired_median(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-round ratios, so that noise which lasts a round cancels out."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def rotated(names: list[str], round_index: int) -> list[str]:
    """The variants in this round's order: the start rotates, so machine noise hits each alike."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def comma_list(kind: Callable[[str], T], text: str) -> list[T]:
    """`"1,8"` -> `[1, 8]`: a comma-separated command-line value."""
    return [kind(item) for item in text.split(",") if item]


def add_from_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="print the markdown tables of an existing results file and exit (measures nothing)")


def print_from_json(path: Path, render: Callable[[dict], str]) -> int:
    """`--from-json`: print `render` of a results file; exit status 2 when there is no such file."""
    if not path.is_file():
        print(f"error: --from-json: {path} does not exist", file=sys.stderr)
        return 2
    print(render(json.loads(path.read_text())))
    return 0


def write_results(results: dict, path: Path) -> None:
    """The results JSON, written again after every part so that an interrupted run keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def add_demo_inputs(parser: argparse.ArgumentParser) -> None:
    """--data and --baseline: the embedded data and baseline that `make demo` writes."""
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "commands")
    parser.add_argument("--baseline", type=Path, default=ROOT / "runs" / "baseline")


def demo_inputs_missing(args: argparse.Namespace) -> bool:
    """Says which of --data and --baseline is missing (True), before a search fails on it."""
    for path, what in ((args.data / "manifest.json", "--data"), (args.baseline / "config.json", "--baseline")):
        if not path.is_file():
            print(f"error: {what}: {path} is missing; `make demo` (or `prune-search data prepare` and "
                  "`prune-search baseline`) writes the embedded data and baseline", file=sys.stderr)
            return True
    return False


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]
