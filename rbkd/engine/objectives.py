"""What the model is trained against: hard labels, a teacher's soft labels, or smoothed labels.

An objective maps a batch (logits, hard labels, dataset indices of the rows) to the SUM of the
per-example losses (float32). The loop divides by the global batch size itself, which is what
keeps the gradient of a data-parallel step equal to the single-process one (see loop.py).
"""

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rbkd.config import LossSpec, check_alpha, check_kd_temperature
from rbkd.engine.noise import add_noise, parse_noise
from rbkd.engine.seeds import make_generator
from rbkd.ops import kd_loss

_NOISE_STREAM = 2  # seed stream id of soft-label noise (batch order is 0, dropout 1)


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


IGNORE_INDEX = -100  # the label of an unlabelled training example (kd_loss's ignore_index)


class CrossEntropy:
    """Teacher training (and the no-distillation baseline): CE on the hard labels."""

    name = "cross_entropy"
    loss_name = "CE loss"  # what the epoch lines call the objective's loss

    def describe(self) -> dict:
        return {"name": self.name}

    def validate(self, train, rows: Tensor | None = None) -> None:
        pass

    def to(self, device: torch.device) -> "CrossEntropy":
        return self

    def start_epoch(self, epoch: int, seed: int) -> None:
        pass

    def __call__(self, logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="sum")


class Distillation:
    """Response-based KD (thesis eq. 3.5, Hinton et al. 2015) against precomputed teacher logits.

    `teacher_logits[i]` belongs to row i of the TRAINING dataset (not of the transfer subset).
    With `noise`, the thesis's section 4.8 experiment: noise U is added to the teacher's
    probabilities at T, which are renormalised and redrawn every epoch (so one example gets a
    different target each epoch): "uniform:S" adds U[0, S); "normal:S" adds N(0, S^2) and clamps
    at 0 (a probability cannot be negative) before renormalising. `loss` (rbkd.config.LossSpec)
    chooses kd_loss's divergence; the default is forward KL.
    """

    name = "distillation"
    loss_name = "KD loss"  # what the epoch lines call the objective's loss

    def __init__(
        self,
        teacher_logits: Tensor,
        T: float,
        alpha: float,
        t_squared: bool = True,
        noise: str | None = None,
        loss: LossSpec | None = None,
    ):
        if teacher_logits.ndim != 2:
            raise ValueError(
                f"teacher_logits must be [N, C], got shape {tuple(teacher_logits.shape)}"
            )
        # Checked here, before fit opens a run folder, not at the first kd_loss call inside it.
        T, alpha = check_kd_temperature(T), check_alpha(alpha)
        self.teacher_logits = teacher_logits.detach().float()
        self.T, self.alpha, self.t_squared, self.noise = float(T), float(alpha), t_squared, noise
        self._noise = None if noise is None else parse_noise(noise)
        self.loss = LossSpec() if loss is None else loss
        self.loss.check(str)
        if self._noise is not None and self.loss.standardize:
            raise ValueError(
                "standardize z-scores logits; with noise the targets are probabilities"
            )
        self._targets = self.teacher_logits  # what kd_loss sees this epoch (probs with noise)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "T": self.T,
            "alpha": self.alpha,
            "t_squared": self.t_squared,
            "noise": self.noise,
            # only when not forward KL: a run made before divergences existed still resumes
            **({} if self.loss.is_default() else {"loss": self.loss.describe()}),
            "teacher_logits_sha256": tensor_sha256(self.teacher_logits),
        }

    def validate(self, train, rows: Tensor | None = None) -> None:
        """Refuse a teacher table that does not fit `train`, or whose rows used for training
        (`rows`, all when None) hold NaN or +inf or are all -inf: kd_loss would turn such a row
        into a NaN student (or, on some backends, a silent zero loss)."""
        n, c = self.teacher_logits.shape
        if n != len(train) or c != train.num_classes:
            raise ValueError(
                f"teacher_logits has shape {(n, c)} but the training set {train.name}/"
                f"{train.split} has {len(train)} rows and {train.num_classes} classes: soft "
                "labels must come from the same dataset and split as the training set"
            )
        self._check_labels(train, rows)
        table = self.teacher_logits if rows is None else self.teacher_logits[rows.cpu()]
        # -inf entries are legitimate logits (probability 0); NaN, +inf and all--inf rows are not.
        bad = (table.isnan() | (table == math.inf)).any(1) | (table == -math.inf).all(1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            row = first if rows is None else int(rows[first])
            raise ValueError(
                f"the teacher's soft labels (teacher logits) hold NaN or inf in {int(bad.sum())} "
                f"of the {len(table)} training rows (first: row {row}): the teacher is broken "
                "(NaN weights?); retrain the teacher, or regenerate its soft labels with "
                "`rbkd soft-labels --teacher RUN`"
            )

    def _check_labels(self, train, rows: Tensor | None) -> None:
        """Unlabelled training rows (label IGNORE_INDEX) learn from the teacher alone: alpha = 1
        for them. Refuse what they cannot do: the CE term with no label at all, dkd (which
        splits off the target class)."""
        labels = train.labels if rows is None else train.labels[rows.to(train.labels.device)]
        missing = labels == IGNORE_INDEX
        self._unlabelled = bool(missing.any())
        if not self._unlabelled:
            return
        if self.loss.divergence == "dkd":
            raise ValueError(
                f"divergence dkd needs every training example's label (it splits off the target "
                f"class), but {int(missing.sum())} are unlabelled; use another divergence"
            )
        if self.alpha < 1 and bool(missing.all()):
            raise ValueError(
                f"alpha = {self.alpha:g} < 1 weights a cross-entropy on hard labels, but the "
                "training data has no labels: use alpha=1 (pure distillation) or give labels"
            )

    def to(self, device: torch.device) -> "Distillation":
        self.teacher_logits = self.teacher_logits.to(device)
        self._targets = self._targets.to(device)
        return self

    def start_epoch(self, epoch: int, seed: int) -> None:
        if self._noise is None:
            return
        # Drawn on the CPU from (seed, epoch): every device and every rank sees the same noise.
        gen = make_generator(seed, epoch, _NOISE_STREAM)
        probs = torch.softmax(self.teacher_logits / self.T, dim=1)
        self._targets = add_noise(probs, self.noise, generator=gen).to(probs.device)

    def __call__(self, logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        alpha: float | Tensor = self.alpha
        # dkd splits the target class from the others: it needs the labels even at alpha 1
        use_labels = self.alpha < 1 or self.loss.divergence == "dkd"
        if use_labels and getattr(self, "_unlabelled", False):
            # A partly labelled transfer set: the unlabelled rows take the KD term alone
            # (alpha 1 per row; their label is then never read, any class will do).
            missing = labels == IGNORE_INDEX
            alpha = torch.where(missing, 1.0, self.alpha).to(logits.dtype)
            labels = labels.masked_fill(missing, 0)
        return kd_loss(
            logits,
            self._targets[index],
            labels if use_labels else None,
            T=self.T,
            alpha=alpha,
            teacher_kind="logits" if self._noise is None else "probs",
            t_squared=self.t_squared,
            reduction="sum",
            **self.loss.used().kd_kwargs(),
        )


class LabelSmoothing:
    """Label smoothing (Szegedy et al. 2016): targets (1 - A) * onehot + A / C. Computed as KL
    against the smoothed targets, which differs from CE against them by the targets' (constant)
    entropy and so has the same gradient."""

    name = "label_smoothing"
    loss_name = "LS loss"  # what the epoch lines call the objective's loss

    def __init__(self, A: float):
        if not 0 <= A <= 1:
            raise ValueError(f"A must be in [0, 1], got {A}")
        self.A = float(A)

    def describe(self) -> dict:
        return {"name": self.name, "A": self.A}

    def validate(self, train, rows: Tensor | None = None) -> None:
        pass

    def to(self, device: torch.device) -> "LabelSmoothing":
        return self

    def start_epoch(self, epoch: int, seed: int) -> None:
        pass

    def __call__(self, logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        c = logits.shape[1]
        targets = F.one_hot(labels, c).float() * (1 - self.A) + self.A / c
        return kd_loss(
            logits,
            targets,
            None,
            T=1.0,
            alpha=1.0,
            teacher_kind="probs",
            t_squared=False,
            reduction="sum",
        )
