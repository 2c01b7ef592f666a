"""The argument record of each op: what its kernels take besides the tensors.

One frozen dataclass per op travels unchanged from the public function to every backend. The
C++ kernels take the same record (csrc/common/rbkd_args.h: the X-macro RBKD_KD_OPTIONS lists the
fields of KdOptions in this order; tests/test_ops_api.py checks that both sides agree), and the
Triton launchers pass its fields to the kernels. A new argument is one field here, one line in
that macro, one line in each kernel that uses it, and its tests.

Through torch.library the record travels as a short string (`encode`): custom ops take plain
types only, and torch.compile treats a string argument as a constant of the graph.

No torch here: rbkd.config (torch-free) takes DIVERGENCES and KD_MAX_TEMPERATURE from this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields


def _parse_bool(text: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(f"not a bool: {text!r}")
    return text == "True"


# Codes shared with the kernels (csrc/README.md).
TEACHER_KINDS = {"logits": 0, "probs": 1, "log_probs": 2}
DIVERGENCES = {
    "kl": 0,  # KL(p_t || p_s), Hinton et al.
    "reverse_kl": 1,  # KL(p_s || p_t), MiniLLM
    "jsd": 2,  # generalised Jensen-Shannon with beta (GKD, TRL, Liger)
    "skew_kl": 3,  # KL(p_t || skew p_t + (1 - skew) p_s), DistiLLM
    "skew_reverse_kl": 4,  # KL(p_s || skew p_s + (1 - skew) p_t), DistiLLM
    "tvd": 5,  # total variation, DistillKit
    "dkd": 6,  # decoupled KD, Zhao et al. 2022 (mdistiller)
}
ENTROPY_KINDS = {"logits": 0, "probs": 1}
# standardize: z' = (z - mean) / (std + STANDARDIZE_EPS), std unbiased, as Sun et al. (CVPR 2024)
# write it. csrc/common/rbkd_rows.h holds the same number (kStandardizeEps; tests tie them).
STANDARDIZE_EPS = 1e-7
# The largest T kd_loss accepts: its float32 KL loses digits as T^2 * 1e-7 (relative error against
# float64, measured on C = 10..32000: 5e-5 at T = 100, 3e-3 at T = 1000, 1e3 at 1e6), and T^2
# overflows float32 from T = 1.8e19. csrc/common/rbkd_rows.h holds the same number
# (kKdMaxTemperature; tests/test_ops_api.py ties them); rbkd.config imports it from here to refuse
# a larger T before a run starts.
KD_MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class KDOptions:
    """kd_loss's options (the tensors, T, alpha and the gradient scale travel beside it)."""

    teacher_kind: int = 0  # TEACHER_KINDS
    t_squared: bool = True  # scale the distillation term by T^2
    ignore_index: int = -100  # rows with this label count nowhere
    probs_tol: float = 1e-3  # probs / log_probs teacher rows must hold mass 1 within this
    divergence: int = 0  # DIVERGENCES
    beta: float = 0.5  # jsd: the teacher's weight in the mixture
    skew: float = 0.1  # skew_kl / skew_reverse_kl: lambda
    dkd_alpha: float = 1.0  # dkd: weight of the target-class term (TCKD)
    dkd_beta: float = 8.0  # dkd: weight of the non-target term (NCKD)
    standardize: bool = False  # z-score student and teacher rows before dividing by T

    def encode(self) -> str:
        # Plain reprs joined in field order: torch.compile traces this (json.dumps and
        # dataclasses.asdict it cannot), and the string becomes a constant of the graph.
        return "|".join([repr(getattr(self, name)) for name in _KD_FIELDS])

    @staticmethod
    def decode(text: str) -> KDOptions:
        return _decode_kd(text)


_KD_FIELDS = [f.name for f in fields(KDOptions)]
_KD_TYPES = {
    f.name: {"int": int, "bool": _parse_bool, "float": float}[f.type] for f in fields(KDOptions)
}


@functools.lru_cache(maxsize=256)
def _decode_kd(text: str) -> KDOptions:
    values = text.split("|")
    if len(values) != len(_KD_FIELDS):
        raise ValueError(f"not an encoded KDOptions: {text!r}")
    return KDOptions(
        **{name: _KD_TYPES[name](v) for name, v in zip(_KD_FIELDS, values, strict=True)}
    )


@dataclass(frozen=True)
class EntropyOptions:
    """soft_label_entropy's options (the logits and the temperatures travel beside it)."""

    kind: int = 0  # ENTROPY_KINDS
    normalize: bool = False  # divide by log(C)
    probs_tol: float = 1e-3


@dataclass(frozen=True)
class SoftmaxOptions:
    """temperature_softmax's options."""

    T: float = 1.0
    log: bool = False


def field_names(record: type) -> list[str]:
    """The record's fields in declaration order (the order of the C++ struct)."""
    return [f.name for f in fields(record)]
