"""Bad input, backend choice, torch.library registration and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_backends

import rbkd.ops as ops
from rbkd.ops import library
from rbkd.ops.args import KDOptions

Z = torch.randn(6, 10)
T_ = torch.randn(6, 10)
Y = torch.randint(0, 10, (6,))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"teacher": torch.randn(6, 11)}, ValueError, "teacher has shape"),
        (
            {"teacher": torch.randn(6, 10, dtype=torch.float64)},
            TypeError,
            "teacher must be float32",
        ),
        ({"student_logits": torch.randn(6, 10).int()}, TypeError, "student_logits must be float32"),
        ({"student_logits": torch.tensor(1.0)}, ValueError, "student_logits must have a class"),
        ({"labels": Y.float()}, TypeError, "labels must be int64 or int32, got float32"),
        ({"labels": Y[:5]}, ValueError, r"labels must have shape \[6\]"),
        ({"labels": torch.tensor([0, 1, 2, 10, 4, 5])}, ValueError, r"labels\[3\] = 10 is outside"),
        ({"labels": torch.tensor([0, 1, 2, -5, 4, 5])}, ValueError, r"labels\[3\] = -5"),
        ({"T": 0.0}, ValueError, "T must be a finite number > 0"),
        ({"T": -2.0}, ValueError, "T must be a finite number > 0"),
        ({"T": float("nan")}, ValueError, "T must be a finite number > 0"),
        ({"T": float("inf")}, ValueError, "T must be a finite number > 0"),
        ({"T": "9"}, TypeError, "T must be a float"),
        ({"T": torch.tensor([1.0, 2, 3, 0, 1, 1])}, ValueError, r"T\[3\] = 0.0"),
        ({"T": 100.5}, ValueError, "above 100, the largest temperature"),
        ({"T": 1e30}, ValueError, "above 100, the largest temperature"),
        ({"T": torch.tensor([1.0, 2, 3, 101, 1, 1])}, ValueError, r"T\[3\] = 101.0.*\(0, 100\]"),
        ({"T": torch.ones(5)}, ValueError, "one value per row"),
        ({"alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\]"),
        ({"alpha": torch.tensor([0.5, 0.5, 2, 0.5, 0.5, 0.5])}, ValueError, r"alpha\[2\] = 2.0"),
        ({"teacher_kind": "logit"}, ValueError, "teacher_kind must be one of"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"teacher_kind": "probs"}, ValueError, "rows must be probabilities"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_kd_loss_bad_input_names_the_argument(kwargs, error, match):
    args = {"student_logits": Z, "teacher": T_, "labels": Y} | kwargs
    student, teacher, labels = args.pop("student_logits"), args.pop("teacher"), args.pop("labels")
    with pytest.raises(error, match=match):
        ops.kd_loss(student, teacher, labels, **args)


def test_other_ops_bad_input():
    with pytest.raises(ValueError, match="T must be a finite number > 0"):
        ops.temperature_softmax(Z, T=0)
    with pytest.raises(TypeError, match="logits must be float32"):
        ops.temperature_softmax(Z.long())
    with pytest.raises(ValueError, match="at least one class"):
        ops.temperature_softmax(torch.randn(3, 0))
    with pytest.raises(ValueError, match="T must be a finite number > 0"):
        ops.soft_label_entropy(Z, [1.0, -1.0])
    with pytest.raises(ValueError, match="T must be 1"):
        ops.soft_label_entropy(torch.softmax(Z, -1), 2.0, teacher_kind="probs")
    with pytest.raises(ValueError, match="rows must be probabilities"):
        ops.soft_label_entropy(Z, teacher_kind="probs")
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.soft_label_entropy(torch.randn(2, 3, 4))


def test_backend_selection(monkeypatch):
    assert "torch" in ops.available_backends()
    monkeypatch.setenv("RBKD_BACKEND", "torch")
    assert ops.select_backend(torch.device("cpu")).NAME == "torch"
    monkeypatch.setenv("RBKD_BACKEND", "nonsense")
    with pytest.raises(ops.BackendError, match="unknown backend 'nonsense'"):
        ops.kd_loss(Z, T_, Y)
    monkeypatch.delenv("RBKD_BACKEND")
    expected = "cpu" if "cpu" in ops.available_backends() else "torch"
    assert ops.select_backend(torch.device("cpu")).NAME == expected
    with ops.use_backend("torch"):
        assert ops.select_backend(torch.device("cpu")).NAME == "torch"
    assert ops.select_backend(torch.device("cpu")).NAME == expected


def test_named_backend_that_cannot_serve_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The CUDA C++ backend is gone (csrc/README.md): GPUs run Triton.
    with pytest.raises(ops.BackendError, match="unknown backend 'cuda'"):
        ops.use_backend("cuda").__enter__()
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match="triton"):
        ops.soft_label_entropy(Z)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    # kd_loss_op has no autograd formula of its own (KDLoss is the one autograd path), so its
    # inputs here do not require grad; need_grad=True still makes it write the saved gradient.
    z = torch.randn(6, 10)
    with ops.use_backend(backend):
        kd = KDOptions
        for args in [
            (z, T_, Y, None, 3.0, None, 0.5, 2, True, kd().encode()),
            (z, T_, None, torch.rand(6) + 0.5, 1.0, torch.rand(6), 0.0, 0, True,
             kd(t_squared=False, divergence=2, beta=0.3).encode()),
            (z, torch.softmax(T_, -1), Y, None, 2.0, None, 0.9, 1, True,
             kd(teacher_kind=1, divergence=6).encode()),
            (z, torch.log_softmax(T_, -1), Y.int(), None, 2.0, None, 0.9, 2, True,
             kd(teacher_kind=2, ignore_index=3).encode()),
            (z, T_, Y, None, 3.0, None, 0.5, 2, True, kd(standardize=True, divergence=5).encode()),
        ]:  # fmt: skip
            torch.library.opcheck(library.kd_loss_op, args)
        z.requires_grad_(True)
        torch.library.opcheck(library.temperature_softmax_op, (z, 2.0, True))
        torch.library.opcheck(library.soft_label_entropy_op, (z, torch.tensor([1.0, 9.0]), 0, True))


# torch.compile(fullgraph=True) of every op: tests/test_ops_gpu_path.py


def test_one_definition_of_each_record_and_limit():
    """The option records and numeric limits exist once in Python and once in C++/Triton, and
    the copies agree (field names in order, the T bound, the standardize epsilon)."""
    from rbkd import config
    from rbkd.ops import args
    from rbkd.ops.backends import torch_twin

    assert ops.KD_MAX_TEMPERATURE == config.KD_MAX_TEMPERATURE == torch_twin.KD_MAX_TEMPERATURE
    try:
        from rbkd import _C
    except ImportError:
        _C = None
    if _C is not None:
        assert list(_C.KD_OPTION_FIELDS) == args.field_names(args.KDOptions)
        assert list(_C.ENTROPY_OPTION_FIELDS) == args.field_names(args.EntropyOptions)
        assert _C.KD_MAX_TEMPERATURE == config.KD_MAX_TEMPERATURE
        assert abs(_C.STANDARDIZE_EPS - args.STANDARDIZE_EPS) <= 1e-7 * 2**-20
        native = _C.KdOptions()  # the C++ defaults are the Python defaults
        for name, value in zip(
            args.field_names(args.KDOptions), _astuple(args.KDOptions()), strict=True
        ):
            assert getattr(native, name) == pytest.approx(value), name
    from rbkd import kernels

    if kernels.TRITON_AVAILABLE:
        from rbkd.kernels import kd_loss as triton_kd

        assert triton_kd.KD_MAX_T.value == config.KD_MAX_TEMPERATURE


def _astuple(record):
    import dataclasses

    return dataclasses.astuple(record)


def test_options_record_round_trips_through_the_registered_op():
    from rbkd.ops.args import KDOptions

    opts = KDOptions(teacher_kind=2, divergence=3, skew=0.25, standardize=True)
    assert KDOptions.decode(opts.encode()) == opts


def test_a_temperature_just_above_the_bound_is_named_as_given():
    """Issue 13 item 18: T = 100.0001 was reported as "T = 100 is above 100"."""
    from rbkd.config import check_kd_temperature

    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"^T = 100\.0001 is above 100,"):
        ops.kd_loss(z, z, T=100.0001)
    with pytest.raises(ValueError, match=r"^T = 100\.0001 is above 100,"):
        check_kd_temperature(100.0001)
