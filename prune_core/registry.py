"""Registry names checked where a config enters, with one message for every registry."""

from __future__ import annotations

from collections.abc import Collection


def check(kind: str, name: str, registry: Collection[str]) -> None:
    """Raise "unknown scorer 'x'; choose one of [...]" (for `kind` scorer) unless `registry` holds `name`."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
