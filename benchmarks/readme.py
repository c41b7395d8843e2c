"""Regenerate the tables of benchmarks/README.md from benchmarks/results/*.json, so that no number in it is
typed by hand: each table sits between `<!-- table:NAME -->` and `<!-- /table -->` and is what the named
benchmark's `--from-json` prints for its results file.

    python -m benchmarks.readme            # rewrite the tables in place
    python -m benchmarks.readme --check    # exit 1, naming them, when tables are out of date
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

from benchmarks.common import RESULTS, ROOT

README = ROOT / "benchmarks" / "README.md"
# table name -> (benchmark module, its function that renders a results dict, results file)
TABLES = {
    "paper_proxy": ("paper_proxy", "markdown", "paper_proxy.json"),
    "transfer-vit": ("transfer", "markdown", "transfer-vit.json"),
    "transfer-bert": ("transfer", "markdown", "transfer-bert.json"),
    "data_prep": ("prepare_throughput", "markdown", "data_prep.json"),
    "search_efficiency": ("search_efficiency", "markdown", "search_efficiency.json"),
    "scoring_cost": ("scoring_cost", "markdown", "scoring_cost-cpu.json"),
    "granularity_latency": ("granularity_latency", "markdown", "granularity_latency-cpu.json"),
    "latency-summary": ("latency", "summary_markdown", "latency-cpu.json"),
    "latency": ("latency", "markdown", "latency-cpu.json"),
    "latency-recheck": ("latency", "markdown", "latency-cpu-recheck.json"),
    "depth_vs_width": ("depth_vs_width", "markdown", "depth_vs_width-cpu.json"),
    "speed_search": ("speed_search", "markdown", "speed_search-cpu.json"),
    "latency_model": ("latency_model", "markdown", "latency_model-cpu.json"),
    "onnx_runtime-opset18": ("onnx_runtime", "markdown", "onnx_runtime-opset18.json"),
    "onnx_runtime": ("onnx_runtime", "markdown", "onnx_runtime.json"),
    "storage": ("storage", "markdown", "storage.json"),
    "scale": ("scale", "markdown", "scale.json"),
}
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n).*?(<!-- /table -->)", re.S)


def render(name: str) -> str:
    module, function, results = TABLES[name]
    rendered = getattr(importlib.import_module(f"benchmarks.{module}"), function)
    return rendered(json.loads((RESULTS / results).read_text()))


def regenerate(text: str) -> str:
    """`text` with every marked table replaced by its rendering; an unknown or missing table is an error."""
    names = [match["name"] for match in BLOCK.finditer(text)]
    unknown, missing = sorted(set(names) - set(TABLES)), sorted(set(TABLES) - set(names))
    if unknown or missing:
        raise ValueError(f"README tables: unknown {unknown}, without a place {missing}")
    return BLOCK.sub(lambda match: f"{match[1]}{render(match['name'])}\n{match[3]}", text)


def stale(text: str) -> list[str]:
    """The tables of `text` that differ from what their results files render now."""
    fresh = {match["name"]: match[0] for match in BLOCK.finditer(regenerate(text))}
    return [match["name"] for match in BLOCK.finditer(text) if match[0] != fresh[match["name"]]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if args.check:
        outdated = stale(text)
        if outdated:
            print(f"{args.readme}: out of date: {', '.join(outdated)}; run `python -m benchmarks.readme`",
                  file=sys.stderr)
        return 1 if outdated else 0
    args.readme.write_text(regenerate(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
