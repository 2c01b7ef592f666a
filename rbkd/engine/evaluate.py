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


def _weights_dtype(model, name: str) -> torch.dtype | None:
    """The floating dtype a module's weights hold (its inputs are cast to it: a float64 or
    float16 teacher answers in float32 logits all the same); None for a function. A module on
    the meta device has no values to answer with: one line."""
    if not isinstance(model, nn.Module):
        return None
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"teacher {name} has weights on the meta device (shapes only, no values); load its "
            "weights first, e.g. model.to_empty(device='cpu') and then load_state_dict(...)"
        )
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _checked_logits(output, rows: int, name: str) -> Tensor:
    out = logits_of(output)
    if not isinstance(out, Tensor):
        raise ValueError(f"teacher {name} returned {type(out).__name__}; it must return logits")
    if out.dim() != 2 or out.shape[0] != rows or not out.dtype.is_floating_point:
        raise ValueError(
            f"teacher {name} returned {out.dtype} {list(out.shape)} for a batch of {rows}; it "
            f"must return float logits [{rows}, num_classes]"
        )
    return out.detach().float().cpu()


@torch.no_grad()
def predict_logits(model, dataset, *, device, batch_size: int = 1024) -> Tensor:
    """Logits [N, C] float32 on the CPU, rows in dataset order (what soft labels are made of).

    `model`: an nn.Module (run in eval mode, its train mode restored afterwards) or any function
    of a normalised batch; its output is logits [batch, C] or an object with `.logits` (Hugging
    Face). Inputs are cast to the module's weight dtype. A wrong output shape or a NaN/inf logit
    is one ValueError line naming the model."""
    if not callable(model):
        raise ValueError(
            f"teacher must be an nn.Module or a function of a batch, got {type(model).__name__}"
        )
    name = type(model).__name__ if isinstance(model, nn.Module) else repr(model)
    dtype = _weights_dtype(model, name)

    def batch_logits(m, x, rows):
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        return _checked_logits(m(x), x.shape[0], name)

    if isinstance(model, nn.Module):
        parts = _map_batches(model, dataset, batch_logits, device=device, batch_size=batch_size)
    else:  # a function: no train mode to switch
        device = torch.device(device)
        parts = [
            batch_logits(model, dataset.normalize(dataset.images[rows.cpu()].to(device)), rows)
            for rows in _index_batches(len(dataset), None, batch_size, device)
        ]
    logits = torch.cat(parts) if parts else torch.zeros(0, dataset.num_classes)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).nonzero()[0])
        raise ValueError(f"teacher {name} returned NaN or inf logits (first at row {bad})")
    return logits


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
