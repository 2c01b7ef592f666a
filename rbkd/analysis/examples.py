"""The highest-entropy training examples of each class (thesis section 5.3, figures 5.6-5.13).

At temperature T, the examples whose soft labels have the highest entropy are those the teacher
finds most ambiguous: for a teacher that keeps similarity information they look like crossovers
between classes; for one that lost it, they are mostly distorted or mislabelled images. These
are also the examples an entropy-selected transfer set starts with.

Entropy comes from `rbkd.ops.soft_label_entropy` (float32, nats). Among equal entropies the lower
dataset index comes first, the same rule as `select_transfer_set(select="entropy")`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rbkd.analysis.entropy import check_temperature, entropy_at


def check_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1 (examples per class), got {count!r}")
    return count


def _per_class(
    entropy: Tensor, labels: Tensor, indices: Tensor, count: int, num_classes: int
) -> list[Tensor]:
    """Positions (into the rows) of the `count` highest-entropy rows of each class."""
    out = []
    for k in range(num_classes):
        rows = (labels == k).nonzero().flatten()
        rows = rows[torch.sort(indices[rows], stable=True).indices]  # lower index first ...
        order = torch.sort(-entropy[rows].double(), stable=True).indices  # ... among ties
        out.append(rows[order[:count]])
    return out


def top_entropy_examples(
    logits: Tensor,
    labels: Tensor,
    indices: Tensor,
    T: float,
    count: int,
    *,
    num_classes: int | None = None,
) -> list[list[int]]:
    """For each class k (by hard label), the dataset indices of its `count` training examples of
    highest soft-label entropy at T, highest first (fewer when the class has fewer examples).

    logits [N, C] raw teacher logits, labels [N] hard labels, indices [N] their dataset indices.
    """
    T = check_temperature(T)
    count = check_count(count)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    n, c = logits.shape
    labels, indices = labels.long().flatten(), indices.long().flatten()
    if labels.numel() != n or indices.numel() != n:
        raise ValueError(
            f"logits have {n} rows, labels {labels.numel()}, indices {indices.numel()}"
        )
    h = entropy_at(logits, T) if n else torch.empty(0)
    rows = _per_class(h, labels, indices, count, int(num_classes or c))
    return [indices[r].tolist() for r in rows]


@dataclass
class TopEntropyExamples:
    """The selection for one teacher run, with what a figure or table needs."""

    teacher: Path
    dataset: object  # the rbkd.data.ImageDataset the indices refer to
    T: float
    count: int
    indices: list[list[int]]  # [C][<= count] dataset indices, highest entropy first
    entropies: list[list[float]]  # [C][<= count] their entropy (nats)
    predictions: list[list[int]]  # [C][<= count] the teacher's class (argmax of its logits)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)


def _prefix(soft, n: int):
    """Keep the soft-label rows of the first `n` examples of the split (a --limit run)."""
    keep = soft.indices < n
    if bool(keep.all()):
        return soft
    return dataclasses.replace(
        soft, logits=soft.logits[keep], labels=soft.labels[keep], indices=soft.indices[keep]
    )


def teacher_examples(
    run_dir: str | os.PathLike,
    T: float,
    count: int,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    split: str = "train",
) -> TopEntropyExamples:
    """Top-`count` entropy examples per class of a teacher run's saved soft labels of `split`
    (checked against its weights and against the dataset), on the first `limit` examples when
    given."""
    from rbkd.data import load_dataset
    from rbkd.engine import read_config
    from rbkd.soft_label_file import check_matches_dataset, read_teacher_soft_labels

    T = check_temperature(T)
    count = check_count(count)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    dataset = load_dataset(config["dataset"], split, Path(data_dir) if data_dir else None)
    if limit is not None and limit < len(dataset):
        dataset = dataclasses.replace(
            dataset, images=dataset.images[:limit], labels=dataset.labels[:limit]
        )
    soft = _prefix(read_teacher_soft_labels(run_dir, split), len(dataset))
    check_matches_dataset(soft, dataset)
    h = entropy_at(soft.logits, T)
    rows = _per_class(h, soft.labels.long(), soft.indices.long(), count, dataset.num_classes)
    pred = soft.logits.argmax(dim=1)
    return TopEntropyExamples(
        teacher=run_dir,
        dataset=dataset,
        T=T,
        count=count,
        indices=[soft.indices[r].tolist() for r in rows],
        entropies=[h[r].tolist() for r in rows],
        predictions=[pred[r].tolist() for r in rows],
    )


def plot_top_entropy_examples(
    path: str | os.PathLike,
    examples: TopEntropyExamples,
    *,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """The image grid of figures 5.6-5.13: one row per class, highest entropy on the left, each
    image captioned with its entropy and, where the teacher's own prediction differs from the
    label, the class it predicts."""
    from rbkd.analysis.plots import figure_format, plot_image_grid

    figure_format(path)
    names = list(class_names or examples.class_names)
    images = examples.dataset.images
    rows = [[images[i] for i in idx] for idx in examples.indices]
    captions = []
    for k, (hs, preds) in enumerate(zip(examples.entropies, examples.predictions, strict=True)):
        row = []
        for h, p in zip(hs, preds, strict=True):
            text = f"H={h:.2f}"
            if p != k:
                text += f"\n→ {names[p] if p < len(names) else p}"
            row.append(text)
        captions.append(row)
    if title is None:
        title = (
            f"{examples.dataset.name}: top {examples.count} highest-entropy training images per "
            f"class at T={examples.T:g} ({examples.teacher.name})"
        )
    return plot_image_grid(path, rows, names, title=title, captions=captions)
