"""Cheaper rehashes that change no result: one calibration pass per site, survivors' columns kept.

Invariants: the refit pass of one site measures the next site exactly as a pass of its own does
(same widths, same weights, fewer passes); ``lsq_map(same=...)`` equals the full solve of a
pruning refit; a map whose columns are unit vectors copies them (``_dense_map``) to the same
result as the product.
"""

from __future__ import annotations

import pytest
import torch

from hashexp.merge import calibration as cal
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.surgery import _dense_map
from hashexp.models import build_model


def _compressor(**kw):
    return HashCompressor(**{"bits": 4, "tables": 16, "min_width": 2, "seed": 0, "compensation": "lsq", **kw})


def _counted(monkeypatch, piggyback: bool) -> list[int]:
    """Count calibration passes; without ``piggyback`` every site is measured by a pass of its own."""
    orig = cal.capture_sites
    calls: list[int] = []

    def capture(model, specs, x, conv_samples=cal.CONV_SAMPLES, optional=()):
        calls.append(len(specs))
        if piggyback:
            return orig(model, specs, x, conv_samples, optional)
        return orig(model, specs[:1], x, conv_samples) + [None] * (len(specs) - 1 + len(optional))

    monkeypatch.setattr(cal, "capture_sites", capture)
    return calls


@pytest.mark.parametrize("model", ["resnet", "mlp"])
def test_one_pass_per_site_gives_the_same_network_as_two(monkeypatch, model):
    def build():
        torch.manual_seed(0)
        if model == "resnet":
            return build_model({"_target_": "hashexp.models.resnet.ResNet20"}, (3, 12, 12), 10), \
                torch.randn(96, 3, 12, 12)
        return build_model({"_target_": "hashexp.models.mlp.MLP", "widths": [48, 40, 32]}, (20,), 5), \
            torch.randn(300, 20)

    results = {}
    for piggyback in (False, True):
        m, x = build()
        m.eval()
        calls = _counted(monkeypatch, piggyback)
        reps = _compressor(max_error=0.08, target_ratio=0.6).compress(m, None, None, None, step=0, calib=x)
        results[piggyback] = (m, reps, calls, x)
        monkeypatch.undo()
    (m0, r0, c0, x), (m1, r1, c1, _) = results[False], results[True]
    changed = sum(r["after"] < r["before"] for r in r0)
    assert changed >= 2, r0  # the case is not vacuous: several sites merge, one after the other
    assert m0.widths() == m1.widths() and [r["error"] for r in r0] == [r["error"] for r in r1]
    for (k, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(m0(x), m1(x))
    # separate: one pass per site plus a refit pass per changed site; piggybacked: each refit pass
    # but the last one measures the next site too
    assert len(c0) == len(r0) + changed
    assert len(c1) < len(c0) and sum(n > 1 for n in c1) >= 1


def test_lsq_map_with_unchanged_survivors_equals_the_full_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(400, 60, generator=g) @ torch.randn(60, 60, generator=g))
    keep = torch.zeros(60, dtype=torch.bool)
    keep[torch.randperm(60, generator=g)[:35]] = True
    kept = keep.nonzero().flatten()
    prior = torch.zeros(35, 60, dtype=torch.float64)
    prior[torch.arange(35), kept] = 1.0
    t_full, c_full = cal.lsq_map(x, x[:, kept], 1e-3, prior)
    t_fast, c_fast = cal.lsq_map(x, x[:, kept], 1e-3, prior, same=kept)
    assert torch.allclose(t_full, t_fast, atol=1e-9) and torch.allclose(c_full, c_fast, atol=1e-9)
    assert torch.equal(t_fast[:, kept], torch.eye(35, dtype=torch.float64))  # survivors: exactly their column
    assert t_fast[:, ~keep].abs().sum() > 1.0  # the removed neurons are regressed, not dropped


@pytest.mark.parametrize("shape", [(6, 9), (6, 9, 3, 3)])
def test_dense_map_copies_unit_columns_to_the_same_result(shape):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    tmap = torch.randn(5, 9, generator=g, dtype=torch.float64)
    for col, row in ((1, 0), (4, 3), (8, 3)):  # unit columns, two of them into one group
        tmap[:, col] = 0.0
        tmap[row, col] = 1.0
    tmap[:, 6] = 0.0
    tmap[2, 6] = 2.0  # one nonzero but not 1: multiplied, not copied
    ref = torch.einsum("oi...,gi->og...", t, tmap)
    assert torch.allclose(_dense_map(t, tmap), ref, atol=1e-12)
