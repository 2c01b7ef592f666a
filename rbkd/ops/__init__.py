"""rbkd.ops: the fused ops of response-based distillation.

    temperature_softmax(logits, T=1.0, *, log=False)
    kd_loss(student_logits, teacher, labels=None, *, T=4.0, alpha=0.9, teacher_kind="logits",
            t_squared=True, ignore_index=-100, reduction="mean", divergence="kl", beta=0.5,
            skew=0.1, dkd_alpha=1.0, dkd_beta=8.0, standardize=False)
    soft_label_entropy(logits, T=1.0, *, teacher_kind="logits", normalize=False)
    sparse_kd_loss(student_logits, topk_ids, topk_logits, labels=None, *, logz=None, T=1.0,
                   alpha=0.9, t_squared=True, tail="bucket", divergence="kl", ...)  (sparse.py)
    sparse_kd_loss_from_hidden(hidden, weight, topk_ids, topk_logits, labels=None, *, bias=None,
                               chunk_rows=None, **sparse_kd_loss's keywords)  (sparse_linear.py)
    capture_soft_labels(logits, k, temperatures, *, samples=0, sample_T=1.0, generator=None)

The backend is chosen per call from the tensors' device (see rbkd.ops.dispatch): the C++ CPU
kernels, Triton on GPUs (the `gpu` extra), and the pure-torch reference when nothing compiled
exists. On CUDA tensors no op synchronises the host unless RBKD_CHECKS=full (rbkd.ops.validation).

The ops live in rbkd.ops.functional and load on first use (PEP 562), as rbkd's own names do:
importing this package, or its torch-free rbkd.ops.args (the ops' options and limits, which the
torch-free rbkd.config reads), imports no torch.
"""

from __future__ import annotations

from rbkd._lazy import lazy_names
from rbkd.ops.args import DIVERGENCES, KD_MAX_TEMPERATURE

# name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "temperature_softmax": "rbkd.ops.functional",
    "kd_loss": "rbkd.ops.functional",
    "soft_label_entropy": "rbkd.ops.functional",
    "sparse_kd_loss": "rbkd.ops.sparse",
    "sparse_kd_loss_from_hidden": "rbkd.ops.sparse_linear",
    "capture_soft_labels": "rbkd.ops.capture",
    "SoftLabelCapture": "rbkd.ops.capture",
    "BackendError": "rbkd.ops.dispatch",
    "available_backends": "rbkd.ops.dispatch",
    "select_backend": "rbkd.ops.dispatch",
    "use_backend": "rbkd.ops.dispatch",
}
# Submodules reachable as attributes after a bare `import rbkd.ops` (rbkd.ops.validation...).
_SUBMODULES = (
    "args", "backends", "capture", "dispatch", "functional", "library", "sparse", "sparse_linear",
    "sparse_sampled", "sparse_twin", "validation",
)  # fmt: skip

__all__ = ["DIVERGENCES", "KD_MAX_TEMPERATURE", *_LAZY]


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY, _SUBMODULES)
