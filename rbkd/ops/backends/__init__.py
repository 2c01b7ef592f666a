"""Backends of the fused ops. Each module here exposes the same small interface:

    NAME: str
    is_available() -> bool             # built / importable at all
    supports(device) -> bool           # can serve tensors on this device
    softmax_forward(x, T, log) -> Tensor                      # x: [N, C], x.stride(-1) == 1
    softmax_backward(y, grad, T, log) -> Tensor               # y: forward output, contiguous
    kd_loss_forward(student, teacher, labels, T, alpha, teacher_kind, t_squared, ignore_index,
                    grad_scale, need_grad, probs_tol)
        -> (loss[N] float32, grad[N, C] in student dtype | None)
    entropy_forward(x, temps, kind, normalize, probs_tol) -> Tensor[K, N] float32

Conventions (the caller in rbkd/ops has validated shapes, dtypes and Python scalars; tensor values
only where rbkd.ops.validation.host_value_checks says so, hence the rule below):
- 2-D inputs have a unit stride in the last dimension; row strides may be anything.
- `T` and `alpha` are Python floats or contiguous float32 [N] tensors on the inputs' device.
- `labels` is None (pure distillation: no CE term, alpha taken as 1) or int64 / int32 [N].
- The non-finite rule (README, "The loss convention"): ignored rows give 0 and read nothing; a
  counted row with a label outside [0, C), T outside (0, 100], alpha outside [0, 1], a student
  or teacher row with NaN or +inf or no finite value, or a probs / log_probs row whose mass is
  off 1 by more than `probs_tol`, gives loss NaN and a NaN gradient row. Entropy: NaN for such
  rows (and for a temperature that is not finite and > 0).
- `teacher_kind`: 0 logits, 1 probs, 2 log_probs.  `kind` for entropy: 0 logits, 1 probs.
- `grad_scale`: a Python float or a float32 0-dim tensor on the device; the saved gradient is
  dL_i/dz_i times it (1/count for reduction="mean"), so backward can usually return it as is.
- `temps`: float32 [K] on the inputs' device (the CPU backend reads it on the host).
The math is written out in csrc/README.md and in torch_twin.py, the oracle every backend is tested
against.
"""
