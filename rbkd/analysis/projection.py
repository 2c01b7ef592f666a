"""Penultimate-layer projections (thesis sections 4.7 and 5.4, figures 4.5, 5.14, 6.7).

Müller, Kornblith and Hinton, "When does label smoothing help?" (2019): the logit of class c is
x^T w_c, so the row w_c of the final layer is a *template* of class c. Pick three classes, find an
orthonormal basis of the plane through their three templates, and project the penultimate
activations x of examples of those classes onto it. Tight clusters mean the network keeps little
similarity information between classes (LS-like); broad clusters mean it keeps more.

Details fixed here:
- The bias is part of the template (eq. 4.2 "weights and biases"): x' = [x, 1], w'_c = [w_c, b_c].
- Basis by Gram-Schmidt on (w'_1 - w'_0, w'_2 - w'_0); origin at the centroid of the three
  templates, so the templates sit around (0, 0) and the plot is centred.
- `spread` per class: mean distance of its points to their centroid divided by the mean distance
  between the three class centroids (a scale-free number: larger = broader clusters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def final_layer(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of the model's head (the layer whose rows are the class templates)."""
    root = getattr(model, "head", model)
    linears = [m for m in root.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no final nn.Linear layer to take templates from"
        )
    return linears[-1]


def plane_basis(templates: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis [2, D] of the plane through 3 templates [3, D], and its origin [D]."""
    if templates.shape[0] != 3:
        raise ValueError(f"need exactly 3 templates, got {templates.shape[0]}")
    t = templates.double()
    u, v = t[1] - t[0], t[2] - t[0]
    e1 = u / u.norm().clamp_min(1e-12)
    scale = max(float(u.norm()), float(v.norm()))
    v = v - (v @ e1) * e1
    # relative 1e-6: float32 weights are only that exact, so a smaller residual is rounding
    if scale == 0 or v.norm() < 1e-6 * scale:
        raise ValueError("the three class templates are collinear; no plane passes through them")
    e2 = v / v.norm()
    return torch.stack([e1, e2]), t.mean(dim=0)


@dataclass
class Projection:
    classes: list[int]
    coords: Tensor  # [M, 2] float64
    labels: Tensor  # [M] int64
    indices: Tensor  # [M] int64 dataset indices
    template_coords: Tensor  # [3, 2]
    spread: dict[int, float]

    def rows(self) -> list[tuple[int, int, float, float]]:
        return [
            (int(i), int(y), float(a), float(b))
            for i, y, (a, b) in zip(
                self.indices.tolist(), self.labels.tolist(), self.coords.tolist(), strict=True
            )
        ]


def project_features(
    features: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    classes: Sequence[int],
    *,
    indices: Tensor | None = None,
) -> Projection:
    """Project penultimate features [M, D] of examples of `classes` onto the templates' plane."""
    classes = [int(k) for k in classes]
    if len(classes) != 3 or len(set(classes)) != 3:
        raise ValueError(f"need 3 distinct classes, got {','.join(map(str, classes))}")
    c, d = weight.shape
    bad = [k for k in classes if not 0 <= k < c]
    if bad:
        raise ValueError(f"class {bad[0]} does not exist; classes are 0..{c - 1}")
    if features.shape[1] != d:
        raise ValueError(f"features have {features.shape[1]} dimensions, the final layer {d}")
    x = features.double()
    w = weight.double()
    if bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        w = torch.cat([w, bias.double().unsqueeze(1)], dim=1)
    basis, origin = plane_basis(w[classes])
    coords = (x - origin) @ basis.T
    tmpl = (w[classes] - origin) @ basis.T
    labels = labels.long()
    indices = torch.arange(x.shape[0]) if indices is None else indices.long()

    centroids = {k: coords[labels == k].mean(dim=0) for k in classes if (labels == k).any()}
    pair = [
        (centroids[a] - centroids[b]).norm()
        for i, a in enumerate(centroids)
        for b in list(centroids)[i + 1 :]
    ]
    scale = float(torch.stack(pair).mean()) if pair else float("nan")
    spread = {
        k: float((coords[labels == k] - centroids[k]).norm(dim=1).mean()) / scale
        if k in centroids and scale > 0
        else float("nan")
        for k in classes
    }
    return Projection(classes, coords, labels, indices, tmpl, spread)


def sample_per_class(
    labels: Tensor, classes: Sequence[int], per_class: int, *, seed: int = 0
) -> Tensor:
    """Up to `per_class` random positions of each class (seeded), sorted."""
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for k in classes:
        rows = (labels.long() == int(k)).nonzero().flatten()
        picked.append(rows[torch.randperm(rows.numel(), generator=g)[:per_class]])
    return torch.sort(torch.cat(picked)).values


def project_model(
    model: nn.Module,
    dataset,
    classes: Sequence[int],
    *,
    per_class: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Projection:
    """Sample `per_class` examples of each class, take penultimate features via
    `rbkd.engine.penultimate_features` and project them (Müller et al.)."""
    from rbkd.engine import penultimate_features, resolve_device
    from rbkd.soft_label_file import dataset_labels

    labels = dataset_labels(dataset)
    c = final_layer(model).out_features
    bad = [k for k in classes if not 0 <= int(k) < c]
    if bad:
        raise ValueError(f"class {bad[0]} does not exist; classes are 0..{c - 1}")
    idx = sample_per_class(labels, classes, per_class, seed=seed)
    dev = resolve_device(device) if isinstance(device, str) else device
    feats = penultimate_features(model, dataset, device=dev, indices=idx).cpu()
    layer = final_layer(model)
    bias = layer.bias.detach().cpu() if layer.bias is not None else None
    return project_features(
        feats, labels[idx], layer.weight.detach().cpu(), bias, classes, indices=idx
    )
