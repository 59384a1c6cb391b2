"""Models: FLOPs equal the analytic count; model.pt round-trips through load_model."""

from __future__ import annotations

import pytest
import torch

from hashexp.metrics import count_flops, count_params
from hashexp.models import build_model, load_model, save_model

MLP = {"_target_": "hashexp.models.mlp.MLP"}


@pytest.mark.parametrize("widths,shape,classes", [([300, 100], (1, 28, 28), 10), ([2048, 2048], (784,), 10),
                                                  ([7], (20,), 2), ([64, 32, 16], (3, 8, 8), 5)])
def test_mlp_flops_equal_analytic_count(widths, shape, classes):
    m = build_model({**MLP, "widths": widths}, shape, classes)
    dims = [int(torch.tensor(shape).prod()), *widths, classes]
    analytic = 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    assert count_flops(m, shape) == analytic
    assert count_params(m) == sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_mlp_sites_and_activations(act):
    m = build_model({**MLP, "widths": [12, 9], "activation": act, "bias": False}, (5,), 3)
    sites = m.merge_sites()
    assert [s.name for s in sites] == ["fc1", "fc2"]
    assert [s.width for s in sites] == [12, 9]
    assert sites[0].homogeneous == (act == "relu")
    assert sites[0].neuron_vectors().shape == (12, 5 + 1)
    assert m(torch.randn(4, 5)).shape == (4, 3)


def test_model_pt_roundtrip_with_merged_widths(tmp_path):
    m = build_model({**MLP, "widths": [10, 6]}, (4,), 3, site_widths={"fc1": 7})
    assert m.widths() == {"fc1": 7, "fc2": 6}
    save_model(m, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["widths"] == {"fc1": 7, "fc2": 6}
    m2 = load_model(tmp_path / "model.pt")
    x = torch.randn(5, 4)
    assert torch.equal(m(x), m2(x))


def test_load_model_errors(tmp_path):
    from hashexp.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable hashexp model.pt"):
        load_model(tmp_path / "junk.pt")
