"""Load a script under bench/ or tools/ as a module, for the tests of the scripts' own logic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as the module ``bench_<name>``."""
    return _load(BENCH_DIR / f"{name}.py", f"bench_{name}")


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as the module ``tools_<name>``."""
    return _load(REPO / "tools" / f"{name}.py", f"tools_{name}")


def _load(path: Path, module_name: str) -> ModuleType:
    """Registered in sys.modules before it runs: dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
