"""Build the thesis's teachers and students from their specs; list and count them."""

from dataclasses import dataclass

import torch
from torch import nn

from rbkd.models.specs import DATASET_SHAPES, SPECS, ArchSpec

ARCHS = ("large", "small", "general", "baseline")


class RBKDModel(nn.Module):
    """A classifier split in two: `body` (input -> penultimate activations) and `head` (the
    output dense layer). `forward(x) == head(features(x))`, so the penultimate layer the thesis
    visualises (Figures 4.5, 5.4, 6.7) is always `features(x)`."""

    def __init__(self, dataset: str, arch: str, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.dataset = dataset
        self.arch = arch
        self.body = body
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations [B, D] (for a baseline: the flattened input)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @property
    def feature_dim(self) -> int:
        return self.head.in_features


def _build_body(spec: ArchSpec, in_shape: tuple[int, int, int]) -> tuple[nn.Sequential, int]:
    channels, height, width = in_shape
    layers: list[nn.Module] = []
    for conv in spec.convs:
        layers.append(
            nn.Conv2d(
                channels,
                conv.out_channels,
                conv.kernel,
                padding=conv.kernel // 2 if conv.same else 0,
            )
        )
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(conv.out_channels))
        layers.append(nn.ReLU(inplace=True))
        channels = conv.out_channels
        if not conv.same:
            height, width = height - conv.kernel + 1, width - conv.kernel + 1
        if conv.pool:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
    layers.append(nn.Flatten())
    dim = channels * height * width
    for units in spec.hidden:
        layers += [nn.Linear(dim, units), nn.ReLU(inplace=True)]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        dim = units
    return nn.Sequential(*layers), dim


def build_model(dataset: str, arch: str, *, seed: int | None = None) -> RBKDModel:
    """The thesis model for `dataset` ("mnist", "fashion-mnist", "cifar10") and `arch` ("large",
    "small" teachers; "general", "baseline" students). With `seed`, the initial weights depend on
    it alone (the global RNG is left untouched)."""
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {sorted(DATASET_SHAPES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {list(ARCHS)}")
    spec = SPECS[(dataset, arch)]
    in_shape, num_classes = DATASET_SHAPES[dataset]
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        body, dim = _build_body(spec, in_shape)
        return RBKDModel(dataset, arch, body, nn.Linear(dim, num_classes))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (what the thesis's "Total Parameters" column counts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class ModelInfo:
    dataset: str
    arch: str
    role: str  # "teacher" | "student"
    parameters: int  # of our implementation
    thesis_parameters: int  # Table A.1 / B.1
    conv: int
    dense: int  # including the output layer
    dropout: int
    bn: int
    description: str

    @property
    def relative_error(self) -> float:
        return (self.parameters - self.thesis_parameters) / self.thesis_parameters


def layer_counts(model: nn.Module) -> dict[str, int]:
    kinds = {"conv": nn.Conv2d, "dense": nn.Linear, "dropout": nn.Dropout, "bn": nn.BatchNorm2d}
    return {k: sum(isinstance(m, t) for m in model.modules()) for k, t in kinds.items()}


def list_models() -> list[ModelInfo]:
    """Every (dataset, arch) pair with our parameter count next to the thesis's."""
    infos = []
    for (dataset, arch), spec in SPECS.items():
        with torch.device("meta"):  # shapes only: no memory, no RNG, instant even for 27M params
            model = build_model(dataset, arch)
        infos.append(
            ModelInfo(
                dataset,
                arch,
                spec.role,
                count_parameters(model),
                spec.thesis_parameters,
                **layer_counts(model),
                description=spec.doc,
            )
        )
    return infos
