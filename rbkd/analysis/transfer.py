"""Transfer-set selection (thesis sections 4.4 and 4.6).

A transfer set is the set of training examples the student is distilled on. Two tools:

- exclude classes: drop every example of the given classes (the missing-class test of Hinton et
  al., section 4.4); the student meets those classes only through the soft labels of the others;
- per class N: keep N examples of each class, either the N whose soft labels have the highest
  entropy at T (section 4.6: high-entropy examples carry the most information per case) or N drawn
  at random (seeded), the control.

All functions work on dataset indices and return sorted int64 dataset indices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rbkd.config import SELECTIONS


@dataclass
class TransferSet:
    indices: Tensor  # [M] int64 sorted dataset indices
    per_class_counts: list[int]  # [C] examples kept per class
    excluded_classes: list[int] = field(default_factory=list)
    short_classes: list[int] = field(default_factory=list)  # classes with fewer than N examples

    def __len__(self) -> int:
        return int(self.indices.numel())


def check_classes(classes: Iterable[int], num_classes: int) -> list[int]:
    out = sorted({int(k) for k in classes})
    bad = [k for k in out if not 0 <= k < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} does not exist; classes are 0..{num_classes - 1}")
    return out


UNLABELLED = -100  # the label of an unlabelled example (kd_loss's ignore_index)


def select_transfer_set(
    labels: Tensor,
    *,
    num_classes: int,
    indices: Tensor | None = None,
    exclude_classes: Iterable[int] = (),
    per_class: int | None = None,
    select: str = "entropy",
    entropy: Tensor | None = None,
    seed: int = 0,
) -> TransferSet:
    """Choose the transfer set among candidate examples.

    labels [N] int64 hard labels of the candidates; indices [N] their dataset indices (default
    0..N-1); entropy [N] their soft-label entropy at T (needed for select="entropy"). With
    per_class=None every non-excluded candidate is kept. Ties in entropy go to the lower index, and
    random selection uses its own torch.Generator seeded with `seed`, so a selection is
    reproducible.
    """
    labels = labels.long().flatten()
    n = labels.numel()
    indices = torch.arange(n, dtype=torch.int64) if indices is None else indices.long().flatten()
    if indices.numel() != n:
        raise ValueError(f"indices has {indices.numel()} entries, labels {n}")
    excluded = check_classes(exclude_classes, num_classes)
    unlabelled = labels == UNLABELLED
    if bool(unlabelled.any()) and (excluded or per_class is not None):
        raise ValueError(
            f"{int(unlabelled.sum())} of the candidate examples are unlabelled (label "
            f"{UNLABELLED}): excluding a class or choosing N per class needs every label"
        )
    if len(excluded) >= num_classes:
        raise ValueError("cannot exclude every class: the transfer set would be empty")
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {per_class}")
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")
        if select == "entropy":
            if entropy is None:
                raise ValueError("entropy selection needs the soft-label entropy of each example")
            entropy = entropy.flatten().double()
            if entropy.numel() != n:
                raise ValueError(f"entropy has {entropy.numel()} entries, labels {n}")

    generator = torch.Generator().manual_seed(int(seed))
    chosen: list[Tensor] = []
    counts = [0] * num_classes
    short: list[int] = []
    for k in range(num_classes):
        if k in excluded:
            continue
        rows = (labels == k).nonzero().flatten()  # ascending positions
        if per_class is not None:
            if rows.numel() < per_class:
                short.append(k)
            elif select == "entropy":
                # stable sort on -entropy keeps the lower position first among equal entropies
                order = torch.sort(-entropy[rows], stable=True).indices
                rows = rows[order[:per_class]]
            else:
                rows = rows[torch.randperm(rows.numel(), generator=generator)[:per_class]]
        counts[k] = int(rows.numel())
        chosen.append(indices[rows])
    chosen.append(indices[unlabelled])  # in no class: the whole set's, as every class is
    picked = torch.cat(chosen)
    return TransferSet(torch.sort(picked).values, counts, excluded, short)
