"""Model zoo: parameter counts and layer structure of Tables A.1 / B.1, shapes, determinism."""

import pytest
import torch

from rbkd.models import (
    DATASET_SHAPES,
    SPECS,
    build_model,
    count_parameters,
    layer_counts,
    list_models,
    spec_summary,
)

# dataset, arch, conv, dense (incl. output), dropout?, bn?, thesis parameters
THESIS = [
    ("mnist", "large", 3, 3, True, False, 2_560_906),
    ("mnist", "small", 2, 1, False, False, 1_433_610),
    ("fashion-mnist", "large", 4, 4, True, False, 2_339_850),
    ("fashion-mnist", "small", 3, 1, False, False, 1_558_538),
    ("cifar10", "large", 8, 3, True, True, 26_902_442),
    ("cifar10", "small", 3, 1, False, False, 5_674_634),
    ("mnist", "general", 2, 1, False, False, 20_490),
    ("fashion-mnist", "general", 2, 1, False, False, 50_186),
    ("cifar10", "general", 3, 1, False, False, 534_666),
    ("mnist", "baseline", 0, 1, False, False, 7_850),
    ("fashion-mnist", "baseline", 0, 1, False, False, 7_850),
    ("cifar10", "baseline", 0, 1, False, False, 30_730),
]
CHEAP = [(d, a) for d, a, *_ in THESIS if a in ("general", "baseline")] + [("mnist", "large")]


@pytest.mark.parametrize("dataset,arch,conv,dense,dropout,bn,thesis", THESIS)
def test_structure_and_parameter_count(dataset, arch, conv, dense, dropout, bn, thesis):
    with torch.device("meta"):
        model = build_model(dataset, arch)
    n = count_parameters(model)
    assert abs(n - thesis) / thesis <= 0.02, f"{dataset}/{arch}: {n:,} vs thesis {thesis:,}"
    counts = layer_counts(model)
    assert (counts["conv"], counts["dense"]) == (conv, dense)
    assert (counts["dropout"] > 0) == dropout
    assert (counts["bn"] > 0) == bn


@pytest.mark.parametrize("dataset", list(DATASET_SHAPES))
def test_baseline_is_exact(dataset):
    (c, h, w), k = DATASET_SHAPES[dataset]
    assert count_parameters(build_model(dataset, "baseline")) == c * h * w * k + k


def test_list_models_covers_everything():
    infos = {(m.dataset, m.arch): m for m in list_models()}
    assert len(infos) == len(THESIS)
    for dataset, arch, conv, dense, _, _, thesis in THESIS:
        info = infos[(dataset, arch)]
        assert info.thesis_parameters == thesis and abs(info.relative_error) <= 0.02
        assert (info.conv, info.dense) == (conv, dense)
        assert info.role == ("teacher" if arch in ("large", "small") else "student")


@pytest.mark.parametrize("dataset,arch", CHEAP)
def test_forward_and_features_shapes(dataset, arch):
    (c, h, w), k = DATASET_SHAPES[dataset]
    model = build_model(dataset, arch, seed=0).eval()
    x = torch.randn(3, c, h, w)
    logits, feats = model(x), model.features(x)
    assert logits.shape == (3, k)
    assert feats.shape == (3, model.feature_dim)
    torch.testing.assert_close(model.head(feats), logits)
    assert (model.dataset, model.arch) == (dataset, arch)


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_model("mnist", "general", seed=3), build_model("mnist", "general", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    c = build_model("mnist", "general", seed=4)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_unknown_names_are_rejected_with_choices():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("svhn", "large")
    with pytest.raises(ValueError, match="choose one of"):
        build_model("mnist", "huge")


@pytest.mark.parametrize(("dataset", "arch"), sorted(SPECS))
def test_spec_summary_counts_what_the_built_model_has(dataset, arch):
    """`rbkd models` reads spec_summary (no torch); it must agree with the real modules."""

    with torch.device("meta"):
        model = build_model(dataset, arch)
    summary = spec_summary(dataset, arch)
    assert summary["parameters"] == count_parameters(model)
    assert {k: summary[k] for k in ("conv", "dense", "dropout", "bn")} == layer_counts(model)


def test_rbkd_models_json_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, json, io, contextlib\n"
        "from rbkd.cli.app import main\n"
        "sys.argv = ['rbkd', 'models', '--json']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main()\n"
        "rows = json.loads(out.getvalue())\n"
        "print(len(rows), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(SPECS)), "False"]
