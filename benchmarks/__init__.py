"""The benchmarks, run as modules from the root of a checkout: `python -m benchmarks.latency --help`.

The venv is shared between clones and its editable install points at whichever ran `make install` last,
so importing this package puts this checkout first on the import path: of this process, and (PYTHONPATH)
of every process it starts, Ray's workers included. A benchmark measures the code beside it.
"""

import os
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != _ROOT]
)
