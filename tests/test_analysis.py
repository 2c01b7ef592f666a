"""Pure functions of rbkd.analysis: temperatures, entropy tables, LS targets and reference curve,
transfer-set selection, noise, projections, plots and result files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from rbkd.analysis.entropy import (
    entropy_matrix,
    entropy_table,
    label_smoothing_curve,
    label_smoothing_entropy,
    label_smoothing_targets,
    parse_temperatures,
)
from rbkd.analysis.files import write_csv, write_json
from rbkd.analysis.plots import PNG_SIGNATURE, plot_entropy_curves, plot_lines, plot_projection
from rbkd.analysis.projection import final_layer, plane_basis, project_features
from rbkd.analysis.transfer import select_transfer_set
from rbkd.engine.noise import add_noise, parse_noise
from rbkd.ops.backends.torch_twin import entropy_rows


def entropy_reference(logits, temperatures):
    """The float64 oracle: rbkd.ops's pure-torch twin, one temperature at a time."""
    return torch.stack([entropy_rows(logits.double(), T, 0) for T in temperatures]).float()


# ---------------------------------------------------------------- temperatures
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9", [9.0]),
        ("1,3,6,9,12,15,18,20", [1, 3, 6, 9, 12, 15, 18, 20]),
        ("1:5", [1, 2, 3, 4, 5]),
        ("1:2:0.25", [1, 1.25, 1.5, 1.75, 2]),
        (" 0.5 , 2 ", [0.5, 2]),
    ],
)
def test_parse_temperatures(text, expected):
    assert parse_temperatures(text) == [float(t) for t in expected]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "T must be > 0, got 0.0"),
        ("3,-1", "T must be > 0, got -1.0"),
        ("nan", "T must be > 0"),
        ("a,b", "cannot read temperatures"),
        ("5:1", "cannot read temperatures"),
        ("1:2:0", "cannot read temperatures"),
        ("", "no temperature given"),
    ],
)
def test_parse_temperatures_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_temperatures(text)


# ---------------------------------------------------------------- entropy
def test_entropy_matrix_matches_reference_and_grows_with_T():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 5
    temps = [1, 3, 9, 20]
    h = entropy_matrix(logits, temps)
    assert h.shape == (4, 64)
    torch.testing.assert_close(h, entropy_reference(logits, temps), atol=1e-5, rtol=1e-5)
    assert (h[1:] >= h[:-1] - 1e-6).all()  # entropy rises with T
    assert float(h.max()) <= math.log(10) + 1e-5


def test_entropy_table_per_class():
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 0], [0, 0, 0]])
    labels = torch.tensor([0, 1, 1, 1])
    table = entropy_table(logits, labels, [1.0], num_classes=4)
    per_row = entropy_reference(logits, [1.0])[0]
    assert table.class_counts == [1, 3, 0, 0]
    assert table.mean[0] == pytest.approx(float(per_row.mean()), abs=1e-6)
    assert table.per_class[0][0] == pytest.approx(float(per_row[0]), abs=1e-6)
    assert table.per_class[0][1] == pytest.approx(float(per_row[1:].mean()), abs=1e-6)
    assert math.isnan(table.per_class[0][2])
    assert table.max_entropy == pytest.approx(math.log(4))
    d = table.to_dict()
    assert d["unit"] == "nats" and d["temperatures"] == [1.0]


def test_label_smoothing_targets_and_entropy():
    labels = torch.tensor([0, 2, 1])
    y = label_smoothing_targets(labels, 4, 0.2)
    assert torch.allclose(y.sum(1), torch.ones(3))
    assert y[0, 0] == pytest.approx(0.8 + 0.05) and y[0, 1] == pytest.approx(0.05)
    assert y.argmax(1).tolist() == [0, 2, 1]
    h = -(y * y.log()).sum(1)
    assert label_smoothing_entropy(0.2, 4) == pytest.approx(float(h[0]), abs=1e-6)
    assert label_smoothing_entropy(0.0, 10) == 0.0
    assert label_smoothing_entropy(1.0, 10) == pytest.approx(math.log(10))
    curve = label_smoothing_curve(10, [0.1, 0.5, 0.9])
    assert list(curve) == ["0.1", "0.5", "0.9"]
    assert curve["0.1"] < curve["0.5"] < curve["0.9"]  # entropy grows with A (thesis fig. 5.1)
    with pytest.raises(ValueError, match="A must be in"):
        label_smoothing_targets(labels, 4, 1.5)


# ---------------------------------------------------------------- transfer sets
def _labels():
    return torch.arange(30) % 3  # 10 examples of each of 3 classes


def test_exclude_classes():
    ts = select_transfer_set(_labels(), num_classes=3, exclude_classes=[1])
    assert ts.per_class_counts == [10, 0, 10]
    assert not (_labels()[ts.indices] == 1).any()
    assert ts.indices.tolist() == sorted(ts.indices.tolist())


def test_entropy_selection_picks_highest_and_breaks_ties_by_index():
    labels = _labels()
    entropy = torch.zeros(30)
    entropy[[0, 3, 27]] = 2.0  # class 0 high-entropy rows
    entropy[[1, 4]] = 1.0  # class 1
    ts = select_transfer_set(labels, num_classes=3, per_class=2, select="entropy", entropy=entropy)
    assert ts.per_class_counts == [2, 2, 2]
    # class 0: 0 and 3 beat 27 (tie at 2.0, lower index first); class 1: 1, 4; class 2: 2, 5
    assert ts.indices.tolist() == [0, 1, 2, 3, 4, 5]


def test_random_selection_is_seeded_and_maps_indices():
    labels = _labels()
    indices = torch.arange(100, 130)
    a = select_transfer_set(
        labels, num_classes=3, indices=indices, per_class=4, select="random", seed=7
    )
    b = select_transfer_set(
        labels, num_classes=3, indices=indices, per_class=4, select="random", seed=7
    )
    c = select_transfer_set(
        labels, num_classes=3, indices=indices, per_class=4, select="random", seed=8
    )
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert a.per_class_counts == [4, 4, 4]
    assert ((a.indices >= 100) & (a.indices < 130)).all()
    assert torch.bincount(labels[a.indices - 100], minlength=3).tolist() == [4, 4, 4]


def test_per_class_larger_than_class_keeps_all_and_reports():
    ts = select_transfer_set(_labels(), num_classes=4, per_class=12, select="random")
    assert ts.per_class_counts == [10, 10, 10, 0]
    assert ts.short_classes == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exclude_classes": [3]}, "class 3 does not exist; classes are 0..2"),
        ({"exclude_classes": [0, 1, 2]}, "cannot exclude every class"),
        ({"per_class": 0}, "--per-class must be >= 1"),
        ({"per_class": 2, "select": "entropy"}, "entropy selection needs"),
        ({"per_class": 2, "select": "best"}, "select must be one of entropy, random"),
    ],
)
def test_transfer_set_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_transfer_set(_labels(), num_classes=3, **kwargs)


# ---------------------------------------------------------------- noise
@pytest.mark.parametrize("spec", ["uniform:0.1", "normal:0.05", "normal:5"])
def test_noise_renormalises(spec):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 10, generator=g), dim=1)
    noisy = add_noise(probs, spec, generator=torch.Generator().manual_seed(1))
    assert noisy.shape == probs.shape
    assert (noisy >= 0).all()
    torch.testing.assert_close(noisy.sum(1), torch.ones(200), atol=1e-5, rtol=0)
    assert not torch.allclose(noisy, probs)
    again = add_noise(probs, spec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)


def test_noise_spec():
    assert parse_noise("uniform:0.1") == ("uniform", 0.1)
    assert parse_noise("Normal:2") == ("normal", 2.0)
    for bad in ["gauss:1", "normal", "normal:-1", "uniform:x", "uniform:0"]:
        with pytest.raises(ValueError, match="write uniform:S or normal:S"):
            parse_noise(bad)


# ---------------------------------------------------------------- projection
def test_plane_basis_is_orthonormal_and_contains_templates():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 16, generator=g)
    basis, origin = plane_basis(t)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2, dtype=torch.float64))
    # each template lies in the plane: projecting and lifting back gives it again
    back = ((t.double() - origin) @ basis.T) @ basis + origin
    torch.testing.assert_close(back, t.double())
    with pytest.raises(ValueError, match="collinear"):
        plane_basis(torch.stack([t[0], 2 * t[0], 3 * t[0]]))


def test_project_features_tight_vs_broad_clusters():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 8, generator=g)
    bias = torch.randn(5, generator=g)
    labels = torch.tensor([0, 2, 4] * 40)
    centre = weight[labels] * 3
    tight = project_features(
        centre + 0.01 * torch.randn(120, 8, generator=g), labels, weight, bias, [0, 2, 4]
    )
    broad = project_features(
        centre + 2.0 * torch.randn(120, 8, generator=g), labels, weight, bias, [0, 2, 4]
    )
    assert tight.coords.shape == (120, 2) and tight.template_coords.shape == (3, 2)
    assert all(tight.spread[k] < broad.spread[k] for k in (0, 2, 4))
    assert tight.rows()[0][:2] == (0, 0)
    with pytest.raises(ValueError, match="class 7 does not exist"):
        project_features(centre, labels, weight, bias, [0, 2, 7])
    with pytest.raises(ValueError, match="need 3 distinct classes"):
        project_features(centre, labels, weight, bias, [0, 0, 2])


def test_final_layer_is_last_linear_of_head():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    assert final_layer(model) is model[2]


# ---------------------------------------------------------------- files and plots
def test_plots_are_png(tmp_path):
    logits = torch.randn(40, 10)
    labels = torch.arange(40) % 10
    table = entropy_table(logits, labels, [1, 5, 9]).to_dict()
    p = plot_entropy_curves(
        tmp_path / "e.png",
        {"teacher": table},
        label_smoothing=label_smoothing_curve(10),
        max_entropy=math.log(10),
    )
    assert p.read_bytes().startswith(PNG_SIGNATURE)
    p = plot_projection(
        tmp_path / "sub" / "p.png", [[0, 0], [1, 1]], [0, 1], [0, 1, 2], [[0, 0], [1, 0], [0, 1]]
    )
    assert p.read_bytes().startswith(PNG_SIGNATURE)
    p = plot_lines(
        tmp_path / "l.png",
        {"a": ([32, 256], [0.5, 0.7])},
        xlabel="x",
        ylabel="y",
        title="t",
        logx=True,
    )
    assert p.read_bytes().startswith(PNG_SIGNATURE)


def test_json_and_csv_writers(tmp_path):
    write_json(tmp_path / "r.json", {"a": float("nan"), "t": torch.tensor([1.5, 2.0]), "n": 3})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "t": [1.5, 2.0], "n": 3}
    write_csv(tmp_path / "r.csv", ["x", "y"], [(1, 0.5), (2, None)])
    assert list(csv.reader((tmp_path / "r.csv").open())) == [["x", "y"], ["1", "0.5"], ["2", ""]]
