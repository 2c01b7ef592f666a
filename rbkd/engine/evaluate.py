"""Evaluation and inference over a whole dataset, batch by batch, on the given device."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _index_batches(n: int, indices: Tensor | None, batch_size: int, device: torch.device):
    rows = torch.arange(n) if indices is None else indices.to(torch.int64).cpu()
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size].to(device)


@torch.no_grad()
def _map_batches(model: nn.Module, dataset, fn, *, device, batch_size, indices=None):
    """Run `fn(model, x, rows)` over the dataset in eval mode; restores train mode afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        out = []
        for rows in _index_batches(len(dataset), indices, batch_size, device):
            x = dataset.normalize(dataset.images[rows.to(dataset.images.device)].to(device))
            out.append(fn(model, x, rows))
        return out
    finally:
        model.train(was_training)


def logits_of(output):
    """A model's logits: the output itself, or its `.logits` (a Hugging Face style output
    object), so such models train and evaluate without a wrapper."""
    return getattr(output, "logits", output)


def evaluation_sums(model, dataset, *, device, batch_size=1024, indices=None) -> Tensor:
    """float64 [3, C]: per class (correct, count, summed CE loss). Sums, not means, so that ranks
    holding different shards can all-reduce them into the exact full-dataset result."""
    c = dataset.num_classes
    device = torch.device(device)
    labels = dataset.labels.to(device)

    def batch_sums(model, x, rows):
        y = labels[rows]
        logits = logits_of(model(x)).float()
        loss = F.cross_entropy(logits, y, reduction="none").double()
        correct = (logits.argmax(1) == y).double()
        sums = torch.zeros(3, c, dtype=torch.float64, device=device)
        sums[0].index_add_(0, y, correct)
        sums[1].index_add_(0, y, torch.ones_like(correct))
        sums[2].index_add_(0, y, loss)
        return sums

    parts = _map_batches(
        model, dataset, batch_sums, device=device, batch_size=batch_size, indices=indices
    )
    return (
        torch.stack(parts).sum(0)
        if parts
        else torch.zeros(3, c, dtype=torch.float64, device=device)
    )


def metrics_from_sums(sums: Tensor) -> dict:
    correct, count, loss = sums.cpu().tolist()
    total = sum(count)
    return {
        "accuracy": sum(correct) / total if total else math.nan,
        # NaN where the class has no examples: 0 would read as "always wrong".
        "per_class_accuracy": [
            k / m if m else math.nan for k, m in zip(correct, count, strict=True)
        ],
        "loss": sum(loss) / total if total else math.nan,
        "count": int(total),
    }


def evaluate(model: nn.Module, dataset, *, device, batch_size: int = 1024, indices=None) -> dict:
    """Accuracy, per-class accuracy (C floats, NaN for an absent class), mean CE loss, count."""
    return metrics_from_sums(
        evaluation_sums(model, dataset, device=device, batch_size=batch_size, indices=indices)
    )


def predict_logits(model: nn.Module, dataset, *, device, batch_size: int = 1024) -> Tensor:
    """Logits [N, C] float32 on the CPU, rows in dataset order (what soft labels are made of)."""
    parts = _map_batches(
        model,
        dataset,
        lambda m, x, rows: logits_of(m(x)).float().cpu(),
        device=device,
        batch_size=batch_size,
    )
    return torch.cat(parts) if parts else torch.zeros(0, dataset.num_classes)


def penultimate_features(
    model: nn.Module, dataset, *, device, batch_size: int = 1024, indices=None
) -> Tensor:
    """Penultimate-layer activations [N, D] float32 on the CPU (model.features), for projections."""
    parts = _map_batches(
        model,
        dataset,
        lambda m, x, rows: m.features(x).float().cpu(),
        device=device,
        batch_size=batch_size,
        indices=indices,
    )
    return torch.cat(parts) if parts else torch.zeros(0, 0)
