"""Load a bench script as a module, once per process, under the key `bench_<name>`.

Why: bench/ holds scripts, not a package, yet they share set-up (throughput.py's model loading and
trainer, limit.py's ceiling) and the tests load them by file: one key per script keeps one module
object per process, whoever loads it first. Scripts put the repository root on sys.path and import
this as `bench.siblings`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent


def load(name: str) -> ModuleType:
    """bench/<name>.py as module `bench_<name>`, executed on first use."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
