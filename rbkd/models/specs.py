"""The thesis's architectures as plain data (Tables A.1 and B.1).

The thesis gives only layer counts and parameter totals; kernel sizes, channels, padding and
pooling below were found by a small exhaustive search over common choices (3x3/5x5 kernels,
power-of-two widths, "same"/"valid" padding, 2x2 max-pooling) for the total closest to the thesis
figure. Every conv is followed by ReLU (and BatchNorm where the table says BN), every hidden dense
layer by ReLU (and Dropout where the table says dropout). The dense count includes the output
layer. Parameter counts are trainable parameters (PyTorch `parameters()`; BatchNorm adds 2 per
channel, its running statistics are buffers).
"""

from dataclasses import dataclass, field

# Input geometry per dataset: (channels, height, width), number of classes.
DATASET_SHAPES = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


@dataclass(frozen=True)
class Conv:
    out_channels: int
    kernel: int  # square kernel
    same: bool  # True: "same" padding (kernel // 2), False: "valid" (no padding)
    pool: bool = False  # 2x2 max-pool after the activation


@dataclass(frozen=True)
class ArchSpec:
    role: str  # "teacher" or "student"
    thesis_parameters: int  # "Total Parameters" column of Table A.1 / B.1
    convs: tuple[Conv, ...] = ()
    hidden: tuple[int, ...] = ()  # widths of the hidden dense layers (output layer not included)
    dropout: float = 0.0  # after every hidden dense layer; 0 = no dropout layers
    batch_norm: bool = False  # BatchNorm2d after every conv
    doc: str = field(default="", compare=False)


def _c(out: int, k: int = 3, same: bool = True, pool: bool = False) -> Conv:
    return Conv(out, k, same, pool)


SPECS: dict[tuple[str, str], ArchSpec] = {
    # ---- MNIST --------------------------------------------------------------------------------
    ("mnist", "large"): ArchSpec(
        role="teacher",
        thesis_parameters=2_560_906,
        convs=(_c(16, 5, pool=True), _c(16, 5, pool=True), _c(192, 5)),
        hidden=(256, 256),
        dropout=0.5,
        doc="3x conv5x5 same (16 pool, 16 pool, 192) -> 7x7x192 -> dense 256-256 (dropout) -> 10",
    ),
    ("mnist", "small"): ArchSpec(
        role="teacher",
        thesis_parameters=1_433_610,
        convs=(_c(256, pool=True), _c(512, pool=True)),
        doc="conv3x3 same 256 pool, conv3x3 same 512 pool -> 7x7x512 -> 10",
    ),
    ("mnist", "general"): ArchSpec(
        role="student",
        thesis_parameters=20_490,
        convs=(_c(16, pool=True), _c(32, pool=True)),
        doc="conv3x3 same 16 pool, conv3x3 same 32 pool -> 7x7x32 -> 10",
    ),
    # ---- Fashion-MNIST ------------------------------------------------------------------------
    ("fashion-mnist", "large"): ArchSpec(
        role="teacher",
        thesis_parameters=2_339_850,
        convs=(_c(64, pool=True), _c(128, pool=True), _c(256, pool=True), _c(256)),
        hidden=(512, 256, 256),
        dropout=0.5,
        doc="4x conv3x3 same (64 pool, 128 pool, 256 pool, 256) -> 3x3x256 -> dense 512-256-256 "
        "(dropout) -> 10",
    ),
    ("fashion-mnist", "small"): ArchSpec(
        role="teacher",
        thesis_parameters=1_558_538,
        # Pooling after the first two convs, not the last: the same parameter budget at a third
        # of the FLOPs (48M instead of 135M multiply-adds per image), so the teacher trains
        # ~2.8x faster on a CPU.
        convs=(_c(128, same=False, pool=True), _c(262, same=False, pool=True), _c(512, same=False)),
        doc="conv3x3 valid 128 pool, 262 pool, 512 -> 3x3x512 -> 10",
    ),
    ("fashion-mnist", "general"): ArchSpec(
        role="student",
        thesis_parameters=50_186,
        convs=(_c(32, pool=True), _c(64, pool=True)),
        doc="conv3x3 same 32 pool, conv3x3 same 64 pool -> 7x7x64 -> 10",
    ),
    # ---- CIFAR-10 -----------------------------------------------------------------------------
    ("cifar10", "large"): ArchSpec(
        role="teacher",
        thesis_parameters=26_902_442,
        convs=(
            _c(64),
            _c(64, pool=True),
            _c(256),
            _c(256, pool=True),
            _c(512),
            _c(512, pool=True),
            _c(512),
            _c(512),
        ),
        hidden=(2048, 512),
        dropout=0.5,
        batch_norm=True,
        doc="VGG-like: 8x conv3x3 same + BN (64 64 pool, 256 256 pool, 512 512 pool, 512 512) -> "
        "4x4x512 -> dense 2048-512 (dropout) -> 10",
    ),
    ("cifar10", "small"): ArchSpec(
        role="teacher",
        thesis_parameters=5_674_634,
        convs=(_c(256, same=False), _c(384), _c(384)),
        doc="conv3x3 valid 256, conv3x3 same 384, conv3x3 same 384 (no pooling) -> 30x30x384 -> 10",
    ),
    ("cifar10", "general"): ArchSpec(
        role="student",
        thesis_parameters=534_666,
        convs=(_c(64, pool=True), _c(128, pool=True), _c(256)),
        doc="conv3x3 same 64 pool, 128 pool, 256 -> 8x8x256 -> 10",
    ),
}

# Baselines: a single dense layer on the flattened image (logistic regression), exactly
# pixels * 10 + 10 parameters: 7,850 for 28x28x1 and 30,730 for 32x32x3.
for _name, ((_ch, _h, _w), _k) in DATASET_SHAPES.items():
    SPECS[(_name, "baseline")] = ArchSpec(
        role="student",
        thesis_parameters=_ch * _h * _w * _k + _k,
        doc=f"flatten {_ch}x{_h}x{_w} -> {_k} (softmax regression)",
    )


def spec_summary(dataset: str, arch: str) -> dict:
    """Trainable parameters and layer counts of SPECS[(dataset, arch)], computed from the spec
    alone (no torch: `rbkd models` answers at once). It follows zoo._build_body layer for layer;
    tests/test_models.py checks it against the built models."""
    spec = SPECS[(dataset, arch)]
    (channels, height, width), classes = DATASET_SHAPES[dataset]
    parameters = 0
    for conv in spec.convs:
        parameters += channels * conv.out_channels * conv.kernel**2 + conv.out_channels
        if spec.batch_norm:
            parameters += 2 * conv.out_channels  # weight and bias; running stats are buffers
        channels = conv.out_channels
        if not conv.same:
            height, width = height - conv.kernel + 1, width - conv.kernel + 1
        if conv.pool:
            height, width = height // 2, width // 2
    dim = channels * height * width
    for units in (*spec.hidden, classes):
        parameters += dim * units + units
        dim = units
    return {
        "parameters": parameters,
        "conv": len(spec.convs),
        "dense": len(spec.hidden) + 1,
        "dropout": len(spec.hidden) if spec.dropout > 0 else 0,
        "bn": len(spec.convs) if spec.batch_norm else 0,
    }
