"""The thesis's teacher and student models (Tables A.1 and B.1)."""

from rbkd.models.specs import DATASET_SHAPES, SPECS, ArchSpec, Conv
from rbkd.models.zoo import (
    ARCHS,
    ModelInfo,
    RBKDModel,
    build_model,
    count_parameters,
    layer_counts,
    list_models,
)

__all__ = [
    "ARCHS",
    "DATASET_SHAPES",
    "SPECS",
    "ArchSpec",
    "Conv",
    "ModelInfo",
    "RBKDModel",
    "build_model",
    "count_parameters",
    "layer_counts",
    "list_models",
]
