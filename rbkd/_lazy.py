"""Lazy names for a package's __init__ (PEP 562): each name is imported from the module that
defines it when it is first used, so importing the package imports neither torch nor the rest.
rbkd, rbkd.ops, rbkd.data and rbkd.study use it; the CLI's --help stays fast that way."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_names(
    package: str, namespace: dict, names: dict[str, str], submodules: tuple[str, ...] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: `names` maps each name to its module, `submodules`
    are reachable as attributes; `namespace` is the package's globals()."""

    def __getattr__(name: str) -> object:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # next time a plain attribute: no more __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(submodules))

    return __getattr__, __dir__
