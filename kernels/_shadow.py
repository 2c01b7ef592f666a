"""Hand `import kernels` over to an installed top-level `kernels` when this folder shadows it.

rbkd imports this folder as `rbkd.kernels`. But where the repository root is on sys.path (a script
or `python -m pytest` run from the root), `import kernels` finds this folder first, and Hugging
Face's `kernels` package, which transformers 5 imports at start-up when it is installed, is hidden:
building any transformers model from the root failed with "cannot import name 'CUDAProperties'
from 'kernels'". The import machinery returns whatever sys.modules holds once a module has run,
so putting the installed package there makes `import kernels` give it.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from types import ModuleType


def installed_kernels(init_file: str) -> ModuleType | None:
    """Load the top-level `kernels` that sys.path holds outside this checkout, or None."""
    root = Path(init_file).resolve().parents[1]
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
    return module
