"""Scripts and benchmarks of the repository, loaded as modules for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_file(relative: str, name: str) -> ModuleType:
    """The file ``relative`` (to the repository root) as module ``name``, registered in ``sys.modules``
    (its dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
