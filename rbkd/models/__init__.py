"""The thesis's teacher and student models (Tables A.1 and B.1).

The specs (plain data) load without torch; the torch modules of `zoo` load on first use, so
`rbkd models` lists the zoo without importing torch.
"""

import importlib

from rbkd.models.specs import DATASET_SHAPES, SPECS, ArchSpec, Conv, spec_summary

_FROM_ZOO = (
    "ARCHS",
    "ModelInfo",
    "RBKDModel",
    "build_model",
    "count_parameters",
    "layer_counts",
    "list_models",
)

__all__ = ["DATASET_SHAPES", "SPECS", "ArchSpec", "Conv", "spec_summary", *_FROM_ZOO]


def __getattr__(name: str):
    if name in _FROM_ZOO:
        value = getattr(importlib.import_module("rbkd.models.zoo"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rbkd.models' has no attribute {name!r}")
