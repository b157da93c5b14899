"""The served model (one tensor in, one out) of every family, and registered models' names."""

from __future__ import annotations

import sys
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vaebench.models import MODELS, build_model
from vaebench.reporting.best_models import registry_name
from vaebench.spec.config import ModelConfig
from vaebench.tracking.served import IMAGE_SHAPE, ServedVAE


def family(arch: str) -> ServedVAE:
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, hidden=[32], z_dim=3, channels=[4, 8], categories=5)
    return ServedVAE(build_model(config, IMAGE_SHAPE)).eval()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_family_reconstructs_encodes_and_decodes_as_its_module(arch):
    served = family(arch)
    images = torch.rand(6, *IMAGE_SHAPE)
    labels = torch.arange(6) % 10
    rows = served.rows(images, labels)
    assert rows.shape == (6, 784 + served.conditional) and rows.dtype == torch.float32
    conditional = labels if served.conditional else None
    assert served.conditional == (arch == "cvae")
    # the served model reads its images out of the rows (a strided view, 785 wide for a
    # conditional model), where a product may round a last bit apart from the module's
    same = partial(torch.testing.assert_close, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        expected = torch.sigmoid(served.model.reconstruct(images, conditional)).flatten(1)
        same(served(rows), expected)
        same(served.encode(rows), served.model.encode(images, conditional)[0])
        z = torch.randn(6, 3)
        c = torch.eye(5)[torch.arange(6) % 5] if arch == "gumbel" else None
        decoded = torch.sigmoid(served.model.decode_sample(z, c, conditional)).flatten(1)
        assert torch.equal(served.decode(z, c, conditional), decoded)
        assert served.sample(4, seed=1).shape == (4, 784)
        assert torch.equal(served.sample(4, seed=1), served.sample(4, seed=1))


def test_rows_of_the_wrong_width_are_one_clear_error():
    with pytest.raises(ValueError, match=r"expected rows of 785 values \(pixels and a label\)"):
        family("cvae")(torch.rand(2, 784))
    with pytest.raises(ValueError, match=r"expected rows of 784 values \(pixels\)"):
        family("mlp")(torch.rand(2, 1, 28, 28))


def test_registered_names():
    assert registry_name("quick", "all runs") == "quick"
    assert registry_name("quick", "loss.recon=mse") == "quick.mse"
    assert registry_name("bounds", "likelihood_of=p(x|y)") == "bounds.p-x-y"
    assert registry_name("g", "data.dataset=mnist, loss.recon=bce") == "g.mnist-bce"


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4))
def test_a_registered_name_is_uri_safe(values):
    group = ", ".join(f"key{i}={v}" for i, v in enumerate(values))
    name = registry_name("grid", group)
    assert name.startswith("grid")
    assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)


FIXTURES = Path(__file__).parent / "fixtures"
LAST_BITS = {"rtol": 1e-6, "atol": 1e-7}  # a few float32 units in the last place


def test_a_model_logged_before_the_move_to_packages_loads_and_gives_its_numbers(
    monkeypatch, tmp_path
):
    """tests/fixtures/model-before-move.tar.gz is a model vaebench logged (a one-run grid of a
    tiny mlp, registered as ``before-move`` version 1) at commit 2a41155, when ``ServedVAE``
    lived in the flat module ``vaebench.served``: the folder MLflow wrote, packed as it was
    (its copy of that commit's code included); the .npz holds its outputs on four rows of its
    input example, computed then. With today's vaebench imported, unpickling finds the class
    through the alias module and the model gives the same numbers: to float32's last bits, which
    follow the CPU's matrix kernels (computed on a Xeon; an AMD EPYC differs in 11 of 3,136
    outputs by one unit in the last place). A weight of another model or a layer missed would
    differ in the first digits."""
    import mlflow.pytorch

    with tarfile.open(FIXTURES / "model-before-move.tar.gz") as packed:
        packed.extractall(tmp_path, filter="data")
    # loading puts the model's copy of vaebench's code first on sys.path, for this process and
    # the processes it spawns later: the old code must not shadow today's in other tests
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = mlflow.pytorch.load_model(str(tmp_path / "model-before-move"))
    assert type(model) is ServedVAE  # the class of today's package, not the logged code copy
    expected = np.load(FIXTURES / "model-before-move-expected.npz")
    rows = torch.from_numpy(expected["rows"])
    with torch.no_grad():
        np.testing.assert_allclose(model(rows).numpy(), expected["reconstruction"], **LAST_BITS)
        np.testing.assert_allclose(model.encode(rows).numpy(), expected["z"], **LAST_BITS)
