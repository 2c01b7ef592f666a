"""Triton kernels of the fused KD ops (rbkd.kernels).

This folder sits at the top of the repository (kernels/) but is installed as `rbkd.kernels`:
pyproject.toml's scikit-build-core `wheel.packages` maps "rbkd/kernels" = "kernels" (and the
editable install redirects the same name here), so `import rbkd.kernels.kd_loss` reads
kernels/kd_loss.py. There is no top-level `kernels` module; import it as `rbkd.kernels`.
rbkd.ops.backends.triton is the one caller. (Where the repository root is on sys.path, as under
`python -m pytest` run from it, `import kernels` finds this folder before an installed
top-level `kernels`, Hugging Face's, which transformers imports: kernels/_shadow.py then hands the
import over to the installed package.)

One op per module; each exposes host launchers taking torch tensors:

    temperature_softmax_forward(x, T, log) / temperature_softmax_backward(y, grad, T, log)
    kd_loss_forward(student, teacher, labels, T, alpha, teacher_kind, t_squared, ignore_index,
                    grad_scale, need_grad, probs_tol) -> (loss[N] float32, grad[N, C] | None)
    scale_rows_(grad, scale)  # grad *= scale in place, scale read on the device
    soft_label_entropy_forward(x, temps, kind, normalize, probs_tol) -> [K, N] float32
    sparse_kd_forward(student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail,
                      opts) -> (loss[N] float32, grad[N, V] | None)   # tail bucket / renormalize
    capture_forward(x, k, temps) -> (topk ids, topk logits, logz [N, J], entropy [N, J])

Triton is an optional dependency (`pip install rbkd[gpu]`).

Importing this package never fails: without Triton (or with a broken install) TRITON_AVAILABLE is
False, TRITON_IMPORT_ERROR says why, and the launchers are absent.
"""

_HANDED_OVER = False
if __name__ == "kernels":  # imported as a top-level package from a checkout: see the docstring
    from ._shadow import installed_kernels

    _HANDED_OVER = installed_kernels(__file__) is not None  # this module is then discarded

TRITON_IMPORT_ERROR: str | None = None
try:
    import triton  # noqa: F401
except Exception as exc:  # noqa: BLE001 - a broken triton must not break `import rbkd`
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    TRITON_AVAILABLE = True

if TRITON_AVAILABLE and not _HANDED_OVER:
    from .capture import capture_forward
    from .kd_loss import kd_loss_forward, scale_rows_
    from .soft_label_entropy import soft_label_entropy_forward
    from .sparse_kd import sparse_kd_forward
    from .temperature_softmax import temperature_softmax_backward, temperature_softmax_forward

__all__ = [
    "TRITON_AVAILABLE",
    "TRITON_IMPORT_ERROR",
    "capture_forward",
    "kd_loss_forward",
    "scale_rows_",
    "soft_label_entropy_forward",
    "sparse_kd_forward",
    "temperature_softmax_backward",
    "temperature_softmax_forward",
]
