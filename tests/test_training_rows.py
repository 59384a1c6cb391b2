"""Calibration from the training forward (``hashing.calibration=training``).

Invariants: the rows recorded on a training batch are the rows a calibration pass on that batch
captures (all of them for a Linear site, sampled positions of the same features for a conv site);
the buffer holds at most the last K batches and about ``calib_samples`` rows; a rehash runs no
calibration forward; rows recorded on the slices of DDP ranks, joined in rank order, are the
single-process rows; on the same rows, the refit equals the pass-based refit; a run resumed
inside the window ends as the uninterrupted one, and an old checkpoint without the new keys
resumes with passes.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose, killed_run
from hashexp.errors import ConfigError
from hashexp.merge import calibration as cal
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.rehasher import Rehasher
from hashexp.merge.sites import model_sites
from hashexp.merge.training_rows import RecordedRows, TrainingCapture
from hashexp.models import build_model

# 1024 train samples, batch 32 (32 steps per epoch), rehash every 25 steps from step 10, a checkpoint every 11 steps
ROWS_RUN = ["dataset=synthetic", "dataset.n_samples=1280", "model.widths=[48,48]", "trainer.epochs=3",
            "trainer.batch_size=32", "trainer.logging.progress=none", "trainer.logging.every=3",
            "trainer.num_threads=1", "hashing=simhash", "hashing.max_error=0.4", "hashing.target_ratio=0.8",
            "hashing.calibration=training", "hashing.calib_batches=8", "hashing.calib_samples=128",
            "schedule.unit=step", "schedule.every=25", "schedule.start=10", "trainer.checkpoint.every_steps=11",
            "seed=4"]
SAME = ["test_acc", "train_acc", "test_loss", "train_loss", "widths", "rehashes", "steps", "flops"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _mlp(widths=(24, 16), n_in=12, seed=0):
    torch.manual_seed(seed)
    return build_model({"_target_": "hashexp.models.mlp.MLP", "widths": list(widths)}, (n_in,), 5)


def _record(model, capture: TrainingCapture, batches: list[torch.Tensor], n_global=None, lo=0):
    model.train()
    with torch.no_grad():
        for xb in batches:
            capture.begin_batch(lo, n_global or len(xb))
            model(xb)
            capture.end_batch()


def test_rows_recorded_on_a_batch_are_the_rows_a_pass_captures():
    model = _mlp()
    sites = model_sites(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(20, 12, generator=g) for _ in range(3)]
    capture = TrainingCapture(sites, batches=3, samples=60, conv_samples=256, seed=0)  # 20 rows a batch: all of them
    _record(model, capture, batches)
    rows = capture.gather()
    for site in sites:
        want = cal.capture_site(model, site, torch.cat(batches)).inputs
        got = rows.capture(site).inputs
        assert len(got) == len(want) == len(site.consumers)
        for a, b in zip(got, want):
            assert a.shape == (60, site.width) and torch.equal(a, b)
    # a smaller budget keeps ceil(rows / K) rows of each batch, each one a row of that batch's pass
    small = TrainingCapture(sites, batches=3, samples=30, conv_samples=256, seed=0)
    _record(model, small, batches)
    site = sites[1]
    for b, (_, r) in zip(batches, small.buffers[site.name][0]):
        full = cal.capture_site(model, site, b).inputs[0]
        assert r.shape == (10, site.width)
        match = (r[:, None, :] == full[None]).all(-1)  # (10, 20): each recorded row is one row of the pass
        assert match.any(1).all() and len(set(match.float().argmax(1).tolist())) == 10


def test_conv_rows_are_feature_vectors_at_sampled_positions_and_the_buffer_is_bounded():
    torch.manual_seed(0)
    model = build_model({"_target_": "hashexp.models.resnet.ResNet20"}, (3, 8, 8), 10)
    sites = model_sites(model)
    capture = TrainingCapture(sites, batches=4, samples=1024, conv_samples=16, seed=3)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(10)]
    model.eval()  # BatchNorm on running statistics: the pass and the recorded forward compute the same features
    for m in model.modules():
        m.training = not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        for xb in batches:
            capture.begin_batch(0, len(xb))
            model(xb)
            capture.end_batch()
    site = next(s for s in sites if s.name == "layer3.0.inner")  # 2x2 positions: 24 per batch, 16*4 rows wanted
    per_batch = math.ceil(min(16 * 4, cal.MAX_CONV_ROWS) / 4)
    buf = capture.buffers[site.name][0]
    assert [b for b, _ in buf] == [7, 8, 9, 10]  # the last K batches only
    for b, (_, r) in zip(batches[-4:], buf):
        x = cal.site_input(site.consumers[0], _consumer_input(model, site, b), site.width)
        full = x.movedim(1, -1).reshape(-1, site.width)
        assert r.shape == (per_batch, site.width)
        assert (torch.cdist(r, full).min(1).values < 1e-6).all()
    # bounded memory: every consumer of every site holds at most ceil(rows / K) rows of K batches
    for s in sites:
        for k, bufk in enumerate(capture.buffers[s.name]):
            assert len(bufk) == 4
            n = sum(len(r) for _, r in bufk)
            assert n <= 4 * math.ceil(cal.MAX_CONV_ROWS / 4) and n <= 4 * 6 * 64


def _consumer_input(model, site, xb):
    seen = {}
    h = site.consumers[0].module.register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0].detach().clone()))
    try:
        with torch.no_grad():
            model(xb)
    finally:
        h.remove()
    return seen["x"]


def test_ranks_slices_joined_in_rank_order_are_the_single_process_rows():
    model = _mlp(widths=(32, 16))
    sites = model_sites(model)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(15, 12, generator=g) for _ in range(4)]  # odd size: slices of 7 and 8
    one = TrainingCapture(sites, batches=3, samples=24, conv_samples=256, seed=9)  # 8 of 15 rows a batch
    _record(model, one, batches)
    ranks = []
    for r, (lo, hi) in enumerate([(0, 7), (7, 15)]):
        c = TrainingCapture(sites, batches=3, samples=24, conv_samples=256, seed=9)
        model.train()
        with torch.no_grad():
            for xb in batches:
                c.begin_batch(lo, len(xb))
                model(xb[lo:hi])
                c.end_batch()
        ranks.append(c)

    class FakeDist:
        def all_gather_object(self, obj):
            return [c.local_state() for c in ranks]

    joined = ranks[0].gather(FakeDist())
    single = one.gather()
    for s in sites:
        for a, b in zip(joined.rows[s.name], single.rows[s.name]):
            assert a.shape == b.shape == (24, s.width)
            assert torch.allclose(a, b, atol=1e-6)
    # a resume on one rank: rank 0 takes every rank's rows, and gathers the same
    merged = TrainingCapture.merged_state([c.local_state() for c in ranks], 0)
    c = TrainingCapture(sites, batches=3, samples=24, conv_samples=256, seed=9)
    c.load_local_state(merged)
    for s in sites:
        assert all(torch.equal(a, b) for a, b in zip(c.gather().rows[s.name], joined.rows[s.name]))


def test_on_the_same_rows_the_refit_equals_the_pass_refit():
    model = _mlp(widths=(40, 16), seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    sites = model_sites(model)
    comp = dict(bits=4, tables=16, min_width=2, seed=0, compensation="lsq", max_error=0.3, target_ratio=0.5)
    a = _mlp(widths=(40, 16), seed=3)
    ra = HashCompressor(**comp).compress(a, ["fc1"], None, None, 0, calib=x)
    b = _mlp(widths=(40, 16), seed=3)
    rows = RecordedRows({s.name: cal.capture_site(b, s, x).inputs for s in model_sites(b)})
    rb = HashCompressor(**comp).compress(b, ["fc1"], None, None, 0, calib=rows)
    assert ra[0]["after"] == rb[0]["after"] < ra[0]["before"] == 40
    assert rb[0]["error"] == pytest.approx(ra[0]["error"], rel=1e-4)  # measured on rows, without a pass
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5), k
    assert rows.rows["fc1"][0].shape == (300, rb[0]["after"])  # the rows follow the merge
    assert len(sites) == 2


def test_a_rehash_runs_no_calibration_forward(tmp_path, monkeypatch):
    from hashexp.app import train_run

    counts = {"passes": 0, "inside": 0}
    orig_capture = cal.capture_sites

    def counting_capture(*a, **kw):
        counts["passes"] += 1
        return orig_capture(*a, **kw)

    monkeypatch.setattr(cal, "capture_sites", counting_capture)
    orig_rehash = Rehasher.rehash

    def rehash(self, model, *a, **kw):
        h = model.register_forward_pre_hook(lambda m, i: counts.__setitem__("inside", counts["inside"] + 1))
        try:
            return orig_rehash(self, model, *a, **kw)
        finally:
            h.remove()

    monkeypatch.setattr(Rehasher, "rehash", rehash)
    run = [o for o in ROWS_RUN if not o.startswith("trainer.checkpoint")] + ["trainer.epochs=2"]
    out = train_run(compose(run), str(tmp_path / "rows"))
    assert out["rehashes"] == 3 and out["widths"] != out["widths_before"]
    assert counts == {"passes": 0, "inside": 0}
    train_run(compose([*run, "hashing.calibration=passes"]), str(tmp_path / "passes"))
    assert counts["passes"] > 0 and counts["inside"] > 0  # the count sees the passes where they run


def test_resume_inside_the_window_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    from hashexp.app import train_run
    from hashexp.train import Trainer

    ref = train_run(compose(ROWS_RUN), str(tmp_path / "full"))
    assert ref["rehashes"] == 4  # steps 10, 35, 60, 85
    # killed right after its 6th checkpoint (steps 11, 22, 32, 33, 44, 55), inside the window of the rehash at 60:
    # its rows come from batches 53..60
    ck = killed_run(monkeypatch, compose(ROWS_RUN), tmp_path / "killed", 6)
    assert ck["step"] == 55 and len(ck["rows"]) == 1 and ck["rows"][0]["batch"] == 55
    fc1 = ck["rows"][0]["rows"]["fc1"][0]
    # the ring buffer: 5 batches left from the window of the rehash at 35, then the window of 60 began
    assert fc1["ids"].tolist() == [31, 32, 33, 34, 35, 53, 54, 55] and fc1["x"].shape[1] == ck["model"]["widths"]["fc1"]
    assert fc1["x"].shape[0] == 8 * 16  # 128 rows in 8 batches
    out = train_run(compose([*ROWS_RUN, f"trainer.checkpoint.resume={tmp_path / 'killed'}"]), str(tmp_path / "res"))
    for k in SAME:
        assert out[k] == ref[k], k
    assert [e["error"] for e in out["rehash_events"]] == [e["error"] for e in ref["rehash_events"]]
    # the rows in the checkpoint matter: without them the next merge sees other rows
    monkeypatch.setattr(Trainer, "_rank_rows", lambda self, saved: None)
    lossy = train_run(compose([*ROWS_RUN, f"trainer.checkpoint.resume={tmp_path / 'killed'}"]), str(tmp_path / "lossy"))
    assert [e["error"] for e in lossy["rehash_events"]] != [e["error"] for e in ref["rehash_events"]]


def test_a_checkpoint_from_before_the_keys_resumes_with_passes(tmp_path, monkeypatch):
    from hashexp.app import train_run

    run = [o for o in ROWS_RUN if not o.startswith(("hashing.calib", "trainer.epochs"))] + ["trainer.epochs=2"]
    ref = train_run(compose(run), str(tmp_path / "full"))
    ck = killed_run(monkeypatch, compose(run), tmp_path / "old", 3)
    for key in ("calibration", "calib_batches"):  # as code before issue 19's item 2 wrote it
        del ck["config"]["hashing"][key]
    del ck["rows"]
    torch.save(ck, tmp_path / "old" / "checkpoint.pt")
    out = train_run(compose([*run, f"trainer.checkpoint.resume={tmp_path / 'old'}"]), str(tmp_path / "res"))
    for k in SAME:
        assert out[k] == ref[k], k
    assert "adopted" not in out["resumed"] and "hashing.calibration" not in out["resumed"]["changed"]


@pytest.mark.parametrize("overrides,match", [
    (["hashing.calibration=replay"], r"hashing.calibration='replay'; choose passes or training"),
    (["hashing.calibration=training", "hashing.compensation=weights"], r"needs compensation=lsq with representative=keep"),
    (["hashing.calibration=training", "hashing.representative=mean"], r"representative=mean\); set those"),
    (["hashing.calibration=training", "hashing.pull.steps=5"], r"does not serve a pull"),
    (["hashing.calib_batches=0"], r"hashing.calib_batches"),
])
def test_bad_calibration_settings_are_one_clear_error(tmp_path, overrides, match):
    from hashexp.app import train_run

    with pytest.raises(ConfigError, match=match):
        train_run(compose([*[o for o in ROWS_RUN if not o.startswith("hashing.calib")], *overrides]), str(tmp_path / "run"))


@pytest.mark.parametrize("clock", [["schedule.unit=step", "schedule.every=25", "schedule.start=10"],
                                   ["schedule.unit=epoch", "schedule.every=1", "schedule.start=1"]])
def test_recording_only_before_a_rehash_keeps_the_rows_of_recording_always(tmp_path, monkeypatch, clock):
    from hashexp.app import train_run
    from hashexp.schedules.fixed import FixedSchedule

    run = [o for o in ROWS_RUN if not o.startswith(("schedule.", "trainer.checkpoint"))] + clock
    calls = []
    orig = TrainingCapture.record

    def record(self, *a):
        if self.armed:
            calls.append(self.batch)
        return orig(self, *a)

    monkeypatch.setattr(TrainingCapture, "record", record)
    windowed = train_run(compose(run), str(tmp_path / "windowed"))
    recorded = sorted(set(calls))
    calls.clear()
    monkeypatch.setattr(FixedSchedule, "rehash_within", lambda self, *a: True)
    always = train_run(compose(run), str(tmp_path / "always"))
    assert len(set(calls)) == 96 and windowed["rehashes"] == always["rehashes"] >= 3
    for k in SAME:
        assert windowed[k] == always[k], k
    assert [e["error"] for e in windowed["rehash_events"]] == [e["error"] for e in always["rehash_events"]]
    # only the 8 batches before each rehash were recorded: steps 3..10, 28..35, 53..60, 78..85 / 25..32, 57..64, 89..96
    steps = [e["step"] for e in windowed["rehash_events"]]
    assert recorded == sorted({t for s in steps for t in range(s - 7, s + 1)})


def test_clocks_say_which_steps_a_rehash_can_use():
    from hashexp.schedules.fixed import FixedSchedule
    from hashexp.schedules.gradual import GradualSchedule

    steps = FixedSchedule(unit="step", every=25, start=10, max_rehashes=2)
    assert [t for t in range(1, 70) if steps.rehash_within(t, 4, 32)] == [7, 8, 9, 10, 32, 33, 34, 35, 57, 58, 59, 60]
    steps.count = 2  # both rehashes done: nothing left to record for
    assert not any(steps.rehash_within(t, 4, 32) for t in range(1, 200))
    epochs = FixedSchedule(unit="epoch", every=2, start=1)  # after epochs 1, 3, 5, ...: steps 32, 96, 160
    assert [t for t in range(1, 130) if epochs.rehash_within(t, 3, 32)] == [30, 31, 32, 94, 95, 96]
    assert [t for t in range(1, 40) if epochs.rehash_within(t, 40, 32)] == list(range(1, 33))  # K > an epoch
    ramp = GradualSchedule(start=4, end=28, every=8)
    assert [t for t in range(1, 40) if ramp.rehash_within(t, 2, 32)] == [3, 4, 11, 12, 19, 20, 27, 28]
