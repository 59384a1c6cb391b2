"""Measured latency: hashexp.metrics.measure_latency / compare_latency on real models, and the
results table's latency columns from run dirs holding real model.pt files."""

from __future__ import annotations

import json

import pytest
import torch

from hashexp import results as R
from hashexp.metrics import compare_latency, count_flops, measure_latency
from hashexp.models import build_model, save_model
from hashexp.models.mlp import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_latency_reports_consistent_numbers():
    m = MLP((20,), 2, widths=(64, 64))
    m.train()
    r = measure_latency(m, (20,), batch_size=32, repeats=9, warmup=2)
    assert set(r) == {"median_ms", "min_ms", "p90_ms", "batch_size", "per_sample_us"}
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] < 1000
    assert r["batch_size"] == 32
    assert r["per_sample_us"] == pytest.approx(1000 * r["median_ms"] / 32)
    assert m.training  # forward mode measures in eval mode and restores the flag


def test_training_step_latency_leaves_the_model_alone():
    m = MLP((20,), 3, widths=(32, 32))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = measure_latency(m, (20,), batch_size=16, mode="train", repeats=5, warmup=1)
    assert r["median_ms"] > 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # steps ran on a copy
    with pytest.raises(ValueError, match="mode"):
        measure_latency(m, (20,), mode="backward")


def test_side_by_side_latency_follows_a_large_flop_gap():
    """784-1024-1024 vs 784-32-32: 41x the FLOPs; at batch 256 the larger network must be
    measurably slower (its matmuls dominate; a loose bound, the machine may be busy)."""
    big, small = MLP((784,), 10, widths=(1024, 1024)), MLP((784,), 10, widths=(32, 32))
    assert count_flops(big, (784,)) / count_flops(small, (784,)) > 40
    r = compare_latency({"big": big, "small": small}, (784,), batch_size=256, repeats=7, warmup=2)
    assert r["big"]["median_ms"] > 3 * r["small"]["median_ms"]


def _run(tmp, name, hashing, widths, seed=0):
    from test_results import make_run

    d = make_run(tmp / name, hashing, seed, 0.9, flops=count_flops(MLP((20,), 2, widths=widths), (20,)),
                 params=100, wall=10.0, train=8.0, widths=(512, 512), final=widths)
    model = build_model({"_target_": "hashexp.models.mlp.MLP", "widths": list(widths)}, (20,), 2)
    save_model(model, d / "model.pt")
    return d


def test_results_table_gets_measured_latency_next_to_flops(tmp_path):
    _run(tmp_path, "v", "none", (512, 512))
    _run(tmp_path, "h", "simhash", (16, 16))
    plain = R.collect_runs([str(tmp_path)])
    assert all(r.get("latency_ms") is None for r in plain)
    assert "latency" not in R.markdown_table(R.summarize(plain))  # no columns unless measured
    runs = R.collect_runs([str(tmp_path)], latency_batch=256, latency_repeats=7)
    by = {r["hashing"]: r for r in runs}
    assert by["none"]["latency_ms"] > 0 and by["simhash"]["latency_ms"] > 0
    assert by["none"]["latency_batch"] == 256
    # 512-512 vs 16-16 on 20 inputs: ~400x the FLOPs, so the vanilla twin is slower
    assert by["simhash"]["latency_speedup"] == pytest.approx(by["none"]["latency_ms"] / by["simhash"]["latency_ms"])
    assert by["simhash"]["latency_speedup"] > 2
    assert by["none"]["latency_speedup"] == pytest.approx(1.0)
    md = R.markdown_table(R.summarize(runs))
    head = md.splitlines()[0].split(" | ")
    assert head.index("latency ms") == head.index("FLOPs ↓") + 1 and "latency ↓" in head
    row = next(line for line in md.splitlines() if "simhash" in line)
    assert f"{by['simhash']['latency_speedup']:.2f}×" in row


def test_latency_from_metrics_json_is_kept(tmp_path):
    d = _run(tmp_path, "v", "none", (512, 512))
    m = json.loads((d / "metrics.json").read_text())
    m["latency_ms"] = 123.0
    (d / "metrics.json").write_text(json.dumps(m))
    runs = R.collect_runs([str(tmp_path)], latency_batch=8, latency_repeats=3)
    assert runs[0]["latency_ms"] == 123.0  # not re-measured


def test_cli_latency_flag(tmp_path, capsys):
    _run(tmp_path, "v", "none", (512, 512))
    _run(tmp_path, "h", "simhash", (16, 16))
    assert R.main([str(tmp_path), "--latency", "64", "--no-plots", "--out", str(tmp_path / "res")]) == 0
    md = (tmp_path / "res" / "results.md").read_text()
    assert "latency ms" in md and "at batch 64" in md
    assert R.main([str(tmp_path), "--latency", "0", "--no-plots"]) == 2
    assert "--latency must be a batch size >= 1" in capsys.readouterr().err
