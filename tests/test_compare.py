"""`make run`'s job (hashexp.compare): vanilla, hashed, and a small net from scratch at the hashed widths."""

from __future__ import annotations

import json

import pytest

from hashexp.compare import main


@pytest.mark.slow
def test_compare_adds_a_small_from_scratch_run_at_the_hashed_widths(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HASHEXP_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    rc = main(["dataset=synthetic", "dataset.n_samples=800", "model.widths=[48,48]", "trainer.epochs=2",
               "trainer.batch_size=64", "schedule.start=5", "schedule.every=5", "++hashing.max_error=0.3",
               "trainer.logging.progress=none"])
    assert rc == 0
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    metrics = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("metrics.json")}
    hashed = next(m for m in metrics.values() if m["hashing"] == "simhash")
    small = metrics["small_from_scratch"]
    assert small["hashing"] == "none" and small["widths"] == hashed["widths"] != hashed["widths_before"]
    out = capsys.readouterr().out
    small_row = f"`model.widths=[{','.join(str(w) for w in hashed['widths'].values())}]`"
    table = [line for line in out.splitlines() if line.startswith("| synthetic")]
    assert len(table) == 3 and small_row in table[1] and "| simhash |" in table[2], table
